"""On-device augmentation keeps image and mask aligned; the fast and naive data paths agree; the bench runs."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import image_io
import tensor_cache
from augment import AugmentConfig, augment_batch, to_unit_float
from bench_busi import NaiveBUSIDataset
from losses import BCEDiceLoss
from unet import UNet


def _squares(b=16, s=64):
    """Bright squares on black as images, the same squares as masks: any misalignment shows."""
    images = torch.zeros(b, 1, s, s, dtype=torch.uint8)
    masks = torch.zeros_like(images)
    g = torch.Generator().manual_seed(0)
    for i in range(b):
        y0, x0 = torch.randint(8, s // 2, (2,), generator=g).tolist()
        h, w = torch.randint(10, s // 3, (2,), generator=g).tolist()
        images[i, :, y0:y0 + h, x0:x0 + w] = 255
        masks[i, :, y0:y0 + h, x0:x0 + w] = 1
    return images, masks


def test_geometry_moves_image_and_mask_together_and_mask_stays_binary():
    images, masks = _squares()
    cfg = AugmentConfig(brightness=0, contrast=0, gamma=0, noise=0)  # geometry only
    x, y = augment_batch(images, masks, cfg, torch.Generator().manual_seed(1))
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    moved = (y != masks.float()).flatten(1).any(1)
    assert moved.sum() >= 12  # the transform really did something to most samples
    bright = x > 0.5
    inter = (bright & (y > 0)).flatten(1).sum(1).float()
    union = (bright | (y > 0)).flatten(1).sum(1).float()
    assert (inter / union).min() > 0.85  # the square in the image is where the mask says


def test_intensity_transforms_leave_the_mask_alone_and_stay_in_range():
    images, masks = _squares()
    cfg = AugmentConfig(hflip=0, rotate_deg=0, scale=0, translate=0)  # intensity only
    x, y = augment_batch(images, masks, cfg, torch.Generator().manual_seed(2), torch.Generator().manual_seed(3))
    assert torch.equal(y, masks.float())
    assert x.min() >= 0 and x.max() <= 1 and not torch.equal(x, to_unit_float(images))


def test_scanner_transforms_keep_image_and_mask_aligned_and_leave_the_old_stream_alone():
    """Aspect jitter moves image and mask by one grid; speckle, blur and the gain ramp touch the image only. With
    the scanner transforms off (the default), the random stream is the one the earlier recipes trained with."""
    images, masks = _squares()
    geometry = AugmentConfig(brightness=0, contrast=0, gamma=0, noise=0).with_scanner(1.0)
    x, y = augment_batch(images, masks, geometry, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    bright = x > 0.35  # speckle, blur and the gain ramp dim the square's edge and body a little
    inter = (bright & (y > 0)).flatten(1).sum(1).float()
    union = (bright | (y > 0)).flatten(1).sum(1).float()
    assert (inter / union).min() > 0.75
    plain = AugmentConfig(brightness=0, contrast=0, gamma=0, noise=0)
    x0, y0 = augment_batch(images, masks, plain, torch.Generator().manual_seed(1))
    assert not torch.equal(y, y0)  # the aspect jitter changed the geometry
    intensity = AugmentConfig(hflip=0, rotate_deg=0, scale=0, translate=0, brightness=0, contrast=0, gamma=0,
                              noise=0).with_scanner(1.0)
    xi, yi = augment_batch(images, masks, intensity, torch.Generator().manual_seed(3), torch.Generator().manual_seed(4))
    assert torch.equal(yi, masks.float()) and xi.min() >= 0 and xi.max() <= 1
    assert not torch.equal(xi, to_unit_float(images))
    gen = torch.Generator().manual_seed(5)
    augment_batch(images, masks, AugmentConfig(), gen, torch.Generator().manual_seed(6))
    assert torch.equal(gen.get_state(), _after_nine_rows(images.shape[0]))


def _after_nine_rows(b: int) -> torch.Tensor:
    """The generator state after the original draw of 9 rows of B numbers."""
    gen = torch.Generator().manual_seed(5)
    torch.rand(9, b, generator=gen)
    return gen.get_state()


def test_augmentation_is_reproducible_from_the_generators():
    images, masks = _squares()
    a = augment_batch(images, masks, AugmentConfig(), torch.Generator().manual_seed(5), torch.Generator().manual_seed(6))
    b = augment_batch(images, masks, AugmentConfig(), torch.Generator().manual_seed(5), torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    off = augment_batch(images, masks, AugmentConfig().scaled(0), torch.Generator().manual_seed(5))
    assert torch.equal(off[0], to_unit_float(images)) and torch.equal(off[1], masks.float())


def test_device_path_and_naive_path_give_the_same_loss_without_augmentation(busi_dir):
    root, _ = busi_dir
    samples = image_io.discover_samples(root)[:6]
    cache = tensor_cache.build_cache(root, samples, 32, None, progress=False)
    fast_x, fast_y = augment_batch(cache["images"], cache["masks"], AugmentConfig().scaled(0),
                                   torch.Generator().manual_seed(0))
    naive = NaiveBUSIDataset(root, samples, 32, augment=False)
    items = [naive[i] for i in range(len(samples))]
    naive_x = torch.stack([it[0] for it in items])
    naive_y = torch.stack([it[1] for it in items])
    torch.manual_seed(0)
    model = UNet(1, 1, 4, 2).eval()
    loss = BCEDiceLoss()
    with torch.no_grad():
        fast = loss(model(fast_x.contiguous(memory_format=torch.channels_last))[0], fast_y)
        slow = loss(model(naive_x)[0], naive_y)
    assert torch.equal(fast_x, naive_x) and torch.equal(fast_y, naive_y)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6)


def test_bench_smoke(busi_dir, tmp_path):
    root, _ = busi_dir
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench_busi.py"), "--device", "cpu", "--data-dir", str(root), "--encoder", "none",
         "--image-size", "32", "--base-channels", "4", "--depth", "2", "--batch-size", "4", "--steps", "2", "--warmup", "1",
         "--naive-workers", "0", "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"speedup_vs_naive: \d+\.\d\d", last)
    figures = json.loads(out.read_text())
    assert figures["project"]["train_img_s"] > 0 and figures["naive"]["train_img_s"] > 0
    assert figures["train_gflop_per_image"] > 0
    assert float(last.split()[-1]) == round(figures["speedup_vs_naive"], 2)
    # on a CPU: the measured ceiling, and the speedup bound it puts on any pipeline of this model
    ceiling = figures["cpu_ceiling"]
    assert ceiling["gemm_gflops"]["float32"] > 0 and "CPU ceiling" in result.stdout
    naive_gflops = figures["train_gflop_per_image"] * figures["naive"]["train_img_s"]
    assert ceiling["speedup_bound"] == pytest.approx(max(ceiling["gemm_gflops"].values()) / naive_gflops)
    assert ceiling["naive_fraction"] == pytest.approx(naive_gflops / ceiling["gemm_gflops"]["float32"])


def test_bench_defaults_are_the_training_scripts_default_model():
    """bench_busi.py writes the default model's settings out (no script imports another): they must stay the
    training script's defaults, or its figures stop describing the default recipe."""
    import bench_busi
    import train_unet_busi

    bench = vars(bench_busi.build_parser().parse_args([]))
    train = vars(train_unet_busi.build_parser().parse_args([]))
    shared = ["encoder", "image_size", "full_res_decoder", "base_channels", "depth", "deep_supervision",
              "dice_per_image", "batch_size"]
    assert {k: bench[k] for k in shared} == {k: train[k] for k in shared}


@pytest.mark.parametrize("flags", [["--threads", "0"], ["--threads", "-1"], ["--threads", "1,x"],
                                   ["--rounds", "0"], ["--steps", "0"], ["--batch-size", "-2"]])
def test_bench_refuses_counts_below_one_in_argparse(flags):
    """--threads 0 / -1 and --rounds 0 ended in tracebacks deep in the benchmark."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench_busi.py"), "--backends", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: argument {flags[0]}" in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_training_flop_count_equals_a_hand_count_for_each_layer_type():
    """Forward + backward of depthwise 3x3, pointwise 1x1, dense 3x3 and 2x2 transposed convolutions, counted by
    hand (a multiply-add is 2 FLOPs; each layer's backward computes the input gradient where the input needs
    one, and the weight gradient, each as many multiply-adds as the forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench_busi import conv_backward_flops

    n, c, h, w = 2, 32, 64, 64
    model = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),  # depthwise
                                torch.nn.Conv2d(c, 16, 1, bias=False),  # pointwise
                                torch.nn.Conv2d(16, 8, 3, padding=1, bias=False),  # dense 3x3
                                torch.nn.ConvTranspose2d(8, 4, 2, stride=2, bias=False))  # doubles the size
    macs = [n * h * w * c * 9, n * h * w * c * 16, n * h * w * 16 * 8 * 9, n * h * w * 8 * 4 * 4]
    x = torch.rand(n, c, h, w, requires_grad=True)  # so the first layer computes an input gradient too
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})
    with counter:
        model(x).sum().backward()
    assert counter.get_total_flops() == sum(3 * 2 * m for m in macs)
    plain = FlopCounterMode(display=False)  # torch's own count: the depthwise weight gradient as if dense
    with plain:
        model(x).sum().backward()
    assert plain.get_total_flops() - counter.get_total_flops() == 2 * macs[0] * (c - 1)


def test_profile_of_a_step_adds_up_and_stays_under_the_cpus_roofline(busi_dir):
    import argparse

    import bench_busi

    args = bench_busi.build_parser().parse_args(["--image-size", "64", "--batch-size", "4"])
    samples = image_io.discover_samples(busi_dir[0])
    cache = tensor_cache.build_cache(busi_dir[0], samples, 64, None, progress=False)
    profile = bench_busi.profile_step(argparse.Namespace(**vars(args)), torch.device("cpu"), cache, steps=1)
    rows = profile["rows"]
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1)
    assert {"depthwise conv (encoder)", "3x3 conv (decoder)", "transposed conv (decoder)", "BatchNorm",
            "augmentation", "loss", "optimizer"} <= set(rows)
    assert profile["forward_share"] + profile["backward_share"] < 1 and 0 < profile["decoder_share"] < 1
    assert 0 < profile["roofline_fraction"] <= 1
    model = bench_busi.make_model(args)
    assert profile["train_gflop_per_image"] * 1e9 == pytest.approx(
        bench_busi.flops_per_image(model, 64, torch.device("cpu"), None), rel=1e-6)
