"""Benchmark the project's training pipeline against a naive one, on the same model, size and batch, in ONE run.

    python bench_busi.py --device cpu                  # the default model (LiteUNet lite0, 192 px) on the CPU
    python bench_busi.py --device cpu --encoder none --image-size 128 --base-channels 16   # the plain UNet
    python bench_busi.py --device cuda                 # GPU

(a) project: decoded uint8 tensors kept on the device, batched on-device augmentation (augment.py),
    channels_last, bf16 autocast where supported, fused AdamW: exactly training.TrainStep, as train_unet_busi.py runs it.
(b) naive: the way a typical repo does it: a Dataset that decodes the PNGs with PIL, resizes and augments
    per item, in a DataLoader with worker processes, an fp32 NCHW model and a plain AdamW.
Prints a table and, as its LAST line, `speedup_vs_naive: X.XX` (project train img/s / naive train img/s).
On a GPU it also prints the achieved fraction of the bf16 dense peak; on a CPU, the CPU's measured ceiling (a large
matrix product's GFLOP/s), each pipeline's fraction of it, and the largest speedup any pipeline of this model
could reach on that CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path

import storage
import utils  # (torch-free: --help is answered before torch loads, below)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--data-dir", default=None,
                   help="BUSI layout dir (default: ./Dataset_BUSI_with_GT, else the bundled sample)")
    # model defaults: train_unet_busi.py's default recipe (LiteUNet lite0 at 192 px)
    p.add_argument("--encoder", default="lite0", choices=("none", "lite0", "lite1", "lite2"),
                   help="none: UNet (--base-channels, --depth); liteN: LiteUNet on an EfficientNet-LiteN encoder")
    p.add_argument("--image-size", type=utils.positive_int, default=192)
    p.add_argument("--full-res-decoder", action=argparse.BooleanOptionalAction, default=False,
                   help="LiteUNet: a last decoder stage at full resolution")
    p.add_argument("--base-channels", type=utils.positive_int, default=16)
    p.add_argument("--depth", type=utils.positive_int, default=4)
    # the loss as train_unet_busi.py's defaults set it when the README's figures were measured
    p.add_argument("--deep-supervision", type=float, default=0.5,
                   help="weight of the aux losses, as in training; 0 = no aux heads (default: %(default)s)")
    p.add_argument("--dice-per-image", action=argparse.BooleanOptionalAction, default=True,
                   help="soft-Dice loss per image, as in training (default: %(default)s)")
    p.add_argument("--batch-size", type=utils.positive_int, default=16)
    p.add_argument("--steps", type=utils.positive_int, default=20, help="timed steps per pipeline")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotuning, workers start)")
    p.add_argument("--naive-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes of the naive pipeline")
    p.add_argument("--no-amp", action="store_true", help="project pipeline in fp32 too")
    p.add_argument("--compile", action="store_true", help="torch.compile the project model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also profile the project's step: time per op type, forward/backward, decoder, roofline")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    backends = p.add_argument_group("inference backends (instead of the training benchmark)")
    backends.add_argument("--backends", action="store_true",
                          help="inference images/s of a checkpoint as torch and as its onnxruntime export, through "
                               "predict's pipeline (decode, resize, the model and its flipped pass for the trust "
                               "score, the map back at each scan's size, the mask) on the same scans, in rounds "
                               "that alternate between them, at each of --threads; and how far their outputs differ")
    backends.add_argument("--checkpoint", default=str(utils.shown_path(utils.DEFAULT_CHECKPOINT)),
                          help="with --backends: the model")
    backends.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                          help="with --backends: the scans (the committed split's, else a computed one)")
    backends.add_argument("--threads", type=utils.positive_int_list, default=[1, 2],
                          help="with --backends: inference threads, comma-separated (default: 1,2)")
    backends.add_argument("--rounds", type=utils.positive_int, default=3,
                          help="with --backends: timed passes per backend")
    return p


if __name__ == "__main__":
    utils.answer_help_early(build_parser)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import dataset  # noqa: E402
import image_io
import tensor_cache
import inference  # noqa: E402
import unet  # noqa: E402
from augment import AugmentConfig  # noqa: E402
from losses import BCEDiceLoss, total_loss  # noqa: E402
from training import TrainStep, make_grad_scaler, make_optimizer  # noqa: E402
from unet import LiteUNet, UNet  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' datasheets, matched by device name.
BF16_PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0}


class NaiveBUSIDataset(torch.utils.data.Dataset):
    """Per item: decode the PNGs with PIL, resize, flip/rotate with PIL, to tensor (the baseline)."""

    def __init__(self, data_dir, samples, size, augment=True):
        self.root, self.samples, self.size, self.augment = Path(data_dir), samples, size, augment

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        image, mask = image_io.load_sample(self.root, self.samples[i])
        image = Image.fromarray(image_io.resize_image(image, self.size))
        mask = Image.fromarray(image_io.resize_mask(mask, self.size).astype(np.uint8) * 255)
        if self.augment:
            if random.random() < 0.5:
                image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
            angle = random.uniform(-15, 15)
            image, mask = image.rotate(angle, Image.BILINEAR), mask.rotate(angle, Image.NEAREST)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
        y = torch.from_numpy((np.asarray(mask) > 127).astype(np.float32))[None]
        return x, y, self.samples[i].label_index


def naive_train_step(model, optimizer, loss_fn, cls_weight, x, y, labels, ds_weight=0.0):
    """fp32, NCHW, no fusion: the baseline's step (the same loss as the project's, deep supervision included)."""
    loss = total_loss(loss_fn, model(x, with_aux=True), y, labels, cls_weight, ds_weight)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def cpu_name() -> str:
    """The CPU's model name as lscpu shows it (/proc/cpuinfo), for the benchmark's record."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """torch's FLOP formula for a convolution's backward, with the weight gradient of a grouped (depthwise)
    convolution counted per group: torch.utils.flop_counter counts it as if the convolution were dense, `groups`
    times too many (a 32-channel depthwise 3x3 on 64x64, batch 2: 160 M instead of 14 M for forward + backward)."""
    from torch.utils.flop_counter import conv_backward_flop

    on_shapes = getattr(conv_backward_flop, "__wrapped__", conv_backward_flop)  # torch's, before its shape wrapper
    shapes = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    grad_input = on_shapes(*shapes, [output_mask[0], False, False], out_shape)
    grad_weight = on_shapes(*shapes, [False, output_mask[1], False], out_shape)
    return grad_input + grad_weight // groups


def flop_formulas() -> dict:
    """aten op -> FLOP formula (args, out_val=...): torch's, with the grouped convolution's backward corrected."""
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    return {**flop_registry, torch.ops.aten.convolution_backward: shape_wrapper(conv_backward_flops)}


def flops_per_image(model, size, device, dtype) -> float:
    """Training FLOPs (forward + backward, multiply-adds counted as 2; convolutions and matrix products only, as
    is usual) per image, deep-supervision heads included as in training."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(2, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})
    with counter, utils.autocast(device, dtype):
        seg, cls, aux = model(x, with_aux=True)
        (seg.float().mean() + (cls.float().mean() if cls is not None else 0) + sum(a.float().mean() for a in aux)
         ).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def bf16_peak(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def cpu_gemm_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a large square matrix product on this CPU: the practical ceiling of a conv net's training step
    (convolutions run as GEMM-like kernels on the same FMA units; none runs faster than a big GEMM)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def cpu_ceiling(project_gflops: float, naive_gflops: float, project_dtype: str) -> dict:
    """What this CPU allows: its GEMM ceiling in fp32 (and bf16 where it has bf16 instructions; emulated bf16 is
    hundreds of times slower and not measured), each pipeline's achieved fraction of its precision's ceiling,
    and the largest speedup over the naive pipeline that any pipeline of the same model (same FLOPs) can reach."""
    native_bf16 = utils.cpu_has_native_bf16()
    gemm = {"float32": cpu_gemm_gflops(torch.float32)}
    if native_bf16:
        gemm["bfloat16"] = cpu_gemm_gflops(torch.bfloat16)
    return {"capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16,
            "gemm_gflops": gemm, "project_fraction": project_gflops / gemm.get(project_dtype, gemm["float32"]),
            "naive_fraction": naive_gflops / gemm["float32"], "speedup_bound": max(gemm.values()) / naive_gflops}


# --------------------------------------------------------------------------------------------------------------
# Profile: where a training step's time goes, against what this CPU could do for each op
# --------------------------------------------------------------------------------------------------------------
ACTIVATIONS = ("hardtanh", "hardtanh_", "hardtanh_backward", "relu", "relu_", "threshold_backward", "clamp",
               "clamp_", "clamp_min", "clamp_min_", "sigmoid", "sigmoid_backward")
NORMS = ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
         "native_batch_norm_backward", "batch_norm_backward", "_batch_norm_with_update")
MOVES = ("cat", "constant_pad_nd", "copy_", "_to_copy", "fill_", "zero_", "slice_backward", "new_zeros", "zeros_like",
         "clone", "contiguous", "_foreach_copy_", "where")


def op_category(name: str, args, phase: str, part: str) -> str:
    """The profile's row for one aten op: by training phase, then by op type (convolutions by kernel shape)."""
    if phase != "forward" and phase != "backward":
        return phase  # augmentation, loss, optimizer
    if name in ("convolution", "convolution_backward"):
        weight = args[2] if name == "convolution_backward" else args[1]
        transposed = args[7] if name == "convolution_backward" else args[6]
        groups = args[9] if name == "convolution_backward" else args[8]
        kind = ("transposed conv" if transposed else "depthwise conv" if groups > 1
                else "1x1 conv" if weight.shape[-1] == 1 else "3x3 conv")
        return f"{kind} ({part})"
    if name in NORMS:
        return "BatchNorm"
    if name in ACTIVATIONS:
        return "activations"
    if name in MOVES:
        return "copies, concat, padding"
    return "other"


class StepProfile(TorchDispatchMode):
    """Every aten op of the steps run under it: its wall time (CPU ops run synchronously), its FLOPs (the
    corrected formulas) and the bytes of its tensor inputs and outputs (a view moves none), under the `phase`
    and model `part` that the caller and the module hooks set."""

    def __init__(self):
        super().__init__()
        self.formulas, self.records = flop_formulas(), []
        self.phase, self.part = "other", "encoder"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        seconds = time.perf_counter() - t0
        formula = self.formulas.get(func.overloadpacket)
        flops = formula(*args, **kwargs, out_val=out) if formula else 0
        tensors = [t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        moved = 0 if func.is_view else sum(t.numel() * t.element_size() for t in tensors)
        name = func.overloadpacket.__name__
        self.records.append((op_category(name, args, self.phase, self.part), self.phase, self.part, seconds, flops,
                             moved))
        return out


def cpu_bandwidth_gbs(reps: int = 5) -> float:
    """The best streaming rate of an elementwise op (c = a + b: read 2, write 1) over working sets from 1 to 64 MB:
    what a memory-bound op (BatchNorm, activations, copies) can reach here, caches included."""
    best = 0.0
    for n in (2**18, 2**21, 2**24):  # floats per tensor: 1, 8, 64 MB
        a, b = torch.rand(n), torch.rand(n)
        c = a + b
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.add(a, b, out=c)
        best = max(best, 3 * 4 * n * reps / (time.perf_counter() - t0) / 1e9)
    return best


def profile_step(args, device, cache, steps: int = 3) -> dict:
    """Run `steps` training steps of the project's pipeline piece by piece (augmentation, forward, loss, backward,
    optimizer: the parts of training.TrainStep) under StepProfile; returns the share of time per row, forward vs
    backward, the decoder's share, and a roofline: each op's least time on this CPU, max(FLOPs / GEMM ceiling,
    bytes / streaming bandwidth), summed, against the time it took."""
    from augment import augment_batch

    dtype = utils.amp_dtype(device, not args.no_amp)
    torch.manual_seed(args.seed)
    model = make_model(args).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, 1e-3, 1e-2, device)
    loss_fn = BCEDiceLoss(dice_per_image=args.dice_per_image)
    images, masks, labels = (cache[k][:args.batch_size].to(device) for k in ("images", "masks", "labels"))
    cfg, gen = AugmentConfig(), torch.Generator().manual_seed(args.seed)
    prof = StepProfile()
    # modules that return one tensor (a backward hook needs that): LiteUNet's encoder stages, UNet's stem and downs
    encoder = ([model.encoder.stem, *model.encoder.stages, model.encoder.head] if hasattr(model, "encoder")
               else [model.stem, *model.downs])
    parts = [("encoder", m) for m in encoder] + [("decoder", up) for up in model.ups] + \
        [("heads", m) for m in (model.head, model.classifier, *(model.aux_heads or [])) if m is not None]
    hooks = []
    for name, module in parts:
        hooks.append(module.register_forward_pre_hook(lambda *_, n=name: setattr(prof, "part", n)))
        hooks.append(module.register_full_backward_pre_hook(lambda *_, n=name: setattr(prof, "part", n)))

    def step(profiled: bool):
        with prof if profiled else contextlib.nullcontext():
            prof.phase = "augmentation"
            x, y = augment_batch(images, masks, cfg, gen)
            x = x.contiguous(memory_format=torch.channels_last)
            prof.phase = "forward"
            with utils.autocast(device, dtype):
                outputs = model(x, with_aux=args.deep_supervision > 0)
            prof.phase = "loss"
            loss = total_loss(loss_fn, outputs, y, labels, 0.2, args.deep_supervision)
            prof.phase, prof.part = "backward", "heads"
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            prof.phase = "optimizer"
            optimizer.step()

    step(False)  # warm-up: oneDNN primitives, allocator
    t0 = time.perf_counter()
    for _ in range(steps):
        step(True)
    wall = time.perf_counter() - t0
    for hook in hooks:
        hook.remove()
    gemm = max(cpu_gemm_gflops(torch.float32), cpu_gemm_gflops(torch.bfloat16) if utils.cpu_has_native_bf16()
               else 0.0) * 1e9
    bandwidth = cpu_bandwidth_gbs() * 1e9
    total = sum(r[3] for r in prof.records)
    rows: dict[str, list[float]] = {}
    for category, phase, part, seconds, flops, moved in prof.records:
        row = rows.setdefault(category, [0.0, 0.0, 0.0])
        row[0] += seconds
        row[1] += max(flops / gemm, moved / bandwidth)  # the op's least time here
        row[2] += flops

    def share(test) -> float:
        return sum(r[3] for r in prof.records if test(r)) / total

    bound = sum(r[1] for r in rows.values())
    return {"steps": steps, "seconds_per_step": total / steps, "wall_per_step_with_profiler": wall / steps,
            "gemm_gflops": gemm / 1e9, "bandwidth_gbs": bandwidth / 1e9, "roofline_fraction": bound / total,
            "rows": {k: {"share": v[0] / total, "roofline_fraction": v[1] / v[0] if v[0] else None,
                         "gflop_per_image": v[2] / steps / args.batch_size / 1e9}
                     for k, v in sorted(rows.items(), key=lambda kv: -kv[1][0])},
            "forward_share": share(lambda r: r[1] == "forward"), "backward_share": share(lambda r: r[1] == "backward"),
            "decoder_share": share(lambda r: r[2] == "decoder" and r[1] in ("forward", "backward")),
            "train_gflop_per_image": sum(r[4] for r in prof.records) / steps / args.batch_size / 1e9}


def print_profile(profile: dict) -> None:
    print(f"\nprofile of the training step ({profile['steps']} steps, {profile['seconds_per_step']:.2f} s of ops per "
          f"step): forward {profile['forward_share']:.0%}, backward {profile['backward_share']:.0%}, decoder (fwd + "
          f"bwd) {profile['decoder_share']:.0%}")
    print(f"{'':<34}{'share':>8}{'of its roofline':>17}{'GFLOP/img':>11}")
    for name, row in profile["rows"].items():
        roof = "" if row["roofline_fraction"] is None else f"{row['roofline_fraction']:.0%}"
        print(f"{name:<34}{row['share']:>8.1%}{roof:>17}{row['gflop_per_image']:>11.3f}")
    print(f"roofline: each op's least time on this CPU, max(FLOPs / {profile['gemm_gflops']:.0f} GFLOP/s GEMM "
          f"ceiling, bytes / {profile['bandwidth_gbs']:.0f} GB/s streaming), summed = "
          f"{profile['roofline_fraction']:.0%} of the time the ops took")


def make_model(args) -> torch.nn.Module:
    """The benchmarked model, with a class head and (when weighted) deep-supervision heads, as in training."""
    heads = {"num_classes": 3, "deep_supervision": args.deep_supervision > 0}
    if args.encoder == "none":
        return UNet(1, 1, args.base_channels, args.depth, **heads)
    return LiteUNet(args.encoder, pretrained=False, **heads,  # speed does not depend on the starting weights
                    decoder_channels=unet.LITE_DECODER[:5 if args.full_res_decoder else 4])


def bench_project(args, device, cache, n_train):
    dtype = utils.amp_dtype(device, not args.no_amp)
    torch.manual_seed(args.seed)
    model = make_model(args).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, 1e-3, 1e-2, device)
    scaler = make_grad_scaler(device, dtype)
    step = TrainStep(model, optimizer, scaler, BCEDiceLoss(dice_per_image=args.dice_per_image), 0.2, device, dtype,
                     args.compile, ds_weight=args.deep_supervision)
    images, masks, labels = (cache[k][:n_train].to(device) for k in ("images", "masks", "labels"))
    cfg = AugmentConfig()
    param_gen = torch.Generator().manual_seed(args.seed)
    noise_gen = torch.Generator(device=device).manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)

    def batch_index():
        return torch.randint(0, n_train, (args.batch_size,), generator=param_gen).to(device)

    for _ in range(args.warmup):
        step(*(t[i] for t in (images, masks, labels) for i in [batch_index()]), cfg, param_gen, noise_gen)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        i = batch_index()
        step(images[i], masks[i], labels[i], cfg, param_gen, noise_gen)
    sync(device)
    step_time = (time.perf_counter() - t0) / args.steps
    # data share: the same slicing + augmentation alone
    from augment import augment_batch
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        i = batch_index()
        augment_batch(images[i], masks[i], cfg, param_gen, noise_gen)
    sync(device)
    data_time = (time.perf_counter() - t0) / args.steps
    flops = flops_per_image(model, args.image_size, device, dtype)
    # inference, as predict_busi.py runs it
    n_inf = min(len(cache["images"]), max(args.batch_size * 4, 64))
    inf_images = cache["images"][:n_inf].to(device)
    infer_dtype = utils.inference_dtype(device, not args.no_amp)  # what predict_busi.py runs
    list(inference.predict_batches(model, inf_images[:args.batch_size], device, infer_dtype, batch_size=32))
    sync(device)
    t0 = time.perf_counter()
    for _ in inference.predict_batches(model, inf_images, device, infer_dtype, batch_size=32):
        pass
    sync(device)
    infer = n_inf / (time.perf_counter() - t0)
    return {"train_img_s": args.batch_size / step_time, "step_s": step_time, "data_share": data_time / step_time,
            "peak_mem_mb": peak_memory_mb(device), "flops_per_img": flops, "infer_img_s": infer,
            "dtype": str(dtype).replace("torch.", "") if dtype else "float32", "layout": "channels_last"}


def bench_naive(args, device, data_dir, samples):
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = make_model(args).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = BCEDiceLoss(dice_per_image=args.dice_per_image)  # the training default, as in the project's step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loader = torch.utils.data.DataLoader(NaiveBUSIDataset(data_dir, samples, args.image_size),
                                         batch_size=args.batch_size, shuffle=True,
                                         drop_last=len(samples) >= args.batch_size,
                                         num_workers=args.naive_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.naive_workers > 0)

    def batches():
        while True:
            yield from loader  # not empty: drop_last only where a full batch exists

    it = batches()
    for _ in range(args.warmup):
        x, y, lab = next(it)
        naive_train_step(model, optimizer, loss_fn, 0.2, x.to(device), y.to(device), lab.to(device),
                         args.deep_supervision)
    sync(device)
    data_wait, t0 = 0.0, time.perf_counter()
    for _ in range(args.steps):
        t_wait = time.perf_counter()
        x, y, lab = next(it)
        data_wait += time.perf_counter() - t_wait
        naive_train_step(model, optimizer, loss_fn, 0.2, x.to(device), y.to(device), lab.to(device),
                         args.deep_supervision)
    sync(device)
    step_time = (time.perf_counter() - t0) / args.steps
    # naive inference: fp32 NCHW on images decoded per call
    model.eval()
    n_inf = min(len(samples), max(args.batch_size * 4, 64))
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, n_inf, 32):
            x = torch.stack([torch.from_numpy(image_io.resize_image(image_io.load_image(data_dir / s.image),
                                                                   args.image_size) / np.float32(255))[None]
                             for s in samples[start:start + 32]]).to(device)
            torch.sigmoid(model(x)[0])
    sync(device)
    infer = n_inf / (time.perf_counter() - t0)
    return {"train_img_s": args.batch_size / step_time, "step_s": step_time, "data_share": data_wait / step_time / 1,
            "peak_mem_mb": peak_memory_mb(device), "flops_per_img": None, "infer_img_s": infer, "dtype": "float32",
            "layout": "NCHW"}


def print_table(project: dict, naive: dict, device) -> tuple[float, float, float | None, dict | None]:
    """The side-by-side table, FLOPs and (on a CPU) the measured ceiling; returns (GFLOP per image, achieved
    TFLOP/s, bf16 peak or None, the CPU ceiling or None)."""
    n_train = 546  # images in the committed BUSI training split: one epoch
    peak = bf16_peak(device)
    rows = [("train img/s", "{:.1f}", "train_img_s"), ("train step (ms)", "{:.1f}", "step_s"),
            ("epoch of 546 images (s)", "{:.2f}", "epoch_s"), ("data-time share", "{:.1%}", "data_share"),
            ("peak memory (MiB)", "{:.0f}", "peak_mem_mb"), ("inference img/s", "{:.1f}", "infer_img_s"),
            ("precision / layout", "{}", "kind")]
    for r in (project, naive):
        r["epoch_s"] = n_train / r["train_img_s"]
        r["kind"] = f"{r['dtype']} / {r['layout']}"
    print(f"\n{'':<26}{'project':>18}{'naive':>18}")
    for label, fmt, key in rows:
        vals = [project[key], naive[key]]
        if key == "step_s":
            vals = [v * 1000 for v in vals]
        print(f"{label:<26}" + "".join(f"{fmt.format(v):>18}" for v in vals))
    gflops = project["flops_per_img"] / 1e9
    achieved = project["flops_per_img"] * project["train_img_s"] / 1e12
    print(f"\nmodel training FLOPs per image (fwd+bwd): {gflops:.2f} GFLOP; achieved {achieved:.2f} TFLOP/s"
          + (f" = {achieved / peak:.1%} of the {peak:.0f} TFLOP/s bf16 dense peak" if peak else ""))
    ceiling = None
    if device.type == "cpu":
        naive_gflops = project["flops_per_img"] * naive["train_img_s"] / 1e9
        ceiling = cpu_ceiling(achieved * 1e3, naive_gflops, project["dtype"])
        gemm = ", ".join(f"{k} {v:.0f}" for k, v in ceiling["gemm_gflops"].items())
        print(f"CPU ceiling ({ceiling['capability']}, {'with' if ceiling['native_bf16'] else 'no'} bf16 instructions; "
              f"2048x2048 GEMM, GFLOP/s): {gemm}. Project {achieved * 1e3:.0f} GFLOP/s = "
              f"{ceiling['project_fraction']:.0%} of its precision's ceiling; naive {naive_gflops:.0f} GFLOP/s = "
              f"{ceiling['naive_fraction']:.0%} of fp32's.\nAt this model's FLOPs no pipeline can be more than "
              f"{ceiling['speedup_bound']:.2f}x faster than the naive one on this CPU (best ceiling / naive).")
        print("(peak memory on CPU is the process's peak RSS, so the naive column includes the project's)")
    return gflops, achieved, peak, ceiling


def bench_backends(args, data_dir: Path) -> dict:
    """torch against onnxruntime on one CPU, interleaved: per thread count, `args.rounds` rounds, each timing one
    pass of each backend over the same scans (the order alternating), as predict runs them; the median images/s
    of each and their ratio; then the two paths' outputs compared (inference.compare)."""
    import checkpoints
    import onnx_backend

    samples = image_io.discover_samples(data_dir)
    if args.split != "all":
        chosen, _ = dataset.choose_split(data_dir, samples)
        samples = [s for s in samples if s.image in set(chosen[args.split])]
    paths = [data_dir / s.image for s in samples]
    loaded = checkpoints.load_model(args.checkpoint)
    data = onnx_backend.export(loaded)
    model, threshold = loaded.model, loaded.threshold
    cpu = torch.device("cpu")

    def one_pass(engine):
        """Decode, predict and threshold every scan, `args.batch_size` at a time: (seconds, the outputs)."""
        start, outputs = time.perf_counter(), []
        for i in range(0, len(paths), args.batch_size):
            images = [image_io.load_image(p) for p in paths[i:i + args.batch_size]]
            for output in inference.predict_images(dataclasses.replace(loaded, model=engine), images, cpu, None,
                                                   args.batch_size):
                outputs.append(output)
                _ = output.mask  # the mask
        return time.perf_counter() - start, outputs

    figures = {"images": len(paths), "checkpoint": str(args.checkpoint), "batch_size": args.batch_size, "runs": []}
    for threads in args.threads:
        torch.set_num_threads(threads)
        engines = {"torch": model, "onnx": onnx_backend.OnnxModel(data, threads)}
        one_pass(engines["onnx"])  # warm-up (onnxruntime plans its kernels on the first run)
        rates, last = {name: [] for name in engines}, {}
        for r in range(args.rounds):
            for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
                seconds, last[name] = one_pass(engines[name])
                rates[name].append(len(paths) / seconds)
        run = {"threads": threads, **{f"{n}_img_s": float(np.median(v)) for n, v in rates.items()},
               **{f"{n}_rounds": v for n, v in rates.items()}}
        run["speedup"] = run["onnx_img_s"] / run["torch_img_s"]
        run["parity"] = inference.compare(last["torch"], last["onnx"], threshold)
        figures["runs"].append(run)
        print(f"threads {threads}: torch {run['torch_img_s']:.1f} img/s, onnxruntime {run['onnx_img_s']:.1f} img/s "
              f"(rounds {', '.join(f'{a:.1f}/{b:.1f}' for a, b in zip(rates['torch'], rates['onnx']))}): "
              f"{run['speedup']:.2f}x", flush=True)
    parity = figures["runs"][-1]["parity"]
    print(f"parity over {parity['images']} scans: masks identical on {parity['pixel_agreement']:.6%} of pixels "
          f"({parity['differing_pixels']} of {parity['pixels']} differ), min Dice {parity['min_dice']:.6f}, class "
          f"agreement {parity['class_agreement']:.0%}, max malignancy difference "
          f"{parity['max_malignancy_difference']:.2e}, max probability difference "
          f"{parity['max_probability_difference']:.2e}, max trust difference {parity['max_trust_difference']:.2e}")
    figures["parity_failures"] = inference.parity_failures(parity)
    return figures


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.backends:
        import onnx_backend
        try:
            data_dir = dataset.resolve_data_dir(args.data_dir)
            print(f"bench: {data_dir}, {args.split} split | {utils.printable(args.checkpoint)} | torch "
                  f"{torch.__version__} against onnxruntime | cpu: {cpu_name()}", flush=True)
            figures = bench_backends(args, data_dir)
        except (utils.DataError, onnx_backend.checkpoints.CheckpointError, ValueError) as exc:
            print(f"error: {utils.printable(exc)}", file=sys.stderr)
            return 2
        figures.update(cpu=cpu_name(), torch=torch.__version__, onnxruntime=__import__("onnxruntime").__version__)
        if args.json:
            storage.write_json(args.json, figures)
        if figures["parity_failures"]:
            print(f"error: the two paths differ: {'; '.join(figures['parity_failures'])}", file=sys.stderr)
            return 1
        return 0
    multiple = unet.size_multiple({"encoder": args.encoder, "depth": args.depth})
    if args.image_size % multiple:
        p.error(f"--image-size must be a multiple of {multiple}")
    try:
        device = utils.pick_device(args.device)
    except ValueError as exc:
        p.error(str(exc))
    data_dir = dataset.resolve_data_dir(args.data_dir)
    try:
        samples = image_io.discover_samples(data_dir)
        cache = tensor_cache.build_cache(data_dir, samples, args.image_size, ".cache", progress=False)
    except utils.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"bench: {data_dir} ({len(samples)} images) | device {device}"
          f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} | torch {torch.__version__} "
          f"| threads {torch.get_num_threads()} | "
          f"{f'UNet base {args.base_channels} depth {args.depth}' if args.encoder == 'none' else 'LiteUNet ' + args.encoder} "
          f"(deep supervision {args.deep_supervision:g}) | "
          f"{args.image_size}px | batch {args.batch_size} | {args.steps} timed steps", flush=True)

    project = bench_project(args, device, cache, len(samples))
    naive = bench_naive(args, device, data_dir, samples)
    gflops, achieved, peak, ceiling = print_table(project, naive, device)
    profile = None
    if args.profile:
        profile = profile_step(args, device, cache)
        print_profile(profile)
    speedup = project["train_img_s"] / naive["train_img_s"]
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args),
              "project": project, "naive": naive, "train_gflop_per_image": gflops, "achieved_tflops": achieved,
              "bf16_peak_tflops": peak, "fraction_of_peak": achieved / peak if peak else None, "cpu_ceiling": ceiling,
              "speedup_vs_naive": speedup, "profile": profile}
    if args.json:
        storage.atomic_write(args.json, (json.dumps(result, indent=2, default=str) + "\n").encode())
    fractions = [f for f in ((ceiling or {}).get("project_fraction"), (profile or {}).get("roofline_fraction"))
                 if f is not None]
    if any(f > 1 for f in fractions):  # a ceiling that is passed is not a ceiling: the count or the ceiling is wrong
        print(f"error: a measured fraction of this CPU's ceiling is above 100 % ({max(fractions):.0%}): the FLOP or "
              f"byte count, or the measured ceiling, is wrong", file=sys.stderr)
        return 1
    print(f"speedup_vs_naive: {speedup:.2f}")
    return 0 if math.isfinite(speedup) else 1


if __name__ == "__main__":
    sys.exit(main())
