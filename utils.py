"""Shared plumbing: seeding, device and mixed precision, metrics, inference, checkpoints."""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import math
import os
import pickle
import random
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unet import UNet, UNetEnsemble

CHECKPOINT_FORMAT = "busi-unet-v1"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why."""


# --------------------------------------------------------------------------------------------------------------
# Command-line value checks (argparse `type=` functions: a bad value is refused with the reason)
# --------------------------------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 < value < 1):
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


# --------------------------------------------------------------------------------------------------------------
# Reproducibility, device, mixed precision
# --------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); `deterministic` also pins cuDNN to deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda > mps > cpu; otherwise the named device, checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here (use --device cpu)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} asked for, but MPS is not available here (use --device cpu)")
    return device


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast is a real speed-up."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype, or None for fp32.

    CUDA: bf16 where supported, else fp16 (with a GradScaler). CPU: bf16 only where the CPU has bf16
    instructions (measured 1.75x faster training than fp32 on a 2-core AVX512-BF16 machine); fp32 elsewhere,
    since emulated bf16 is slower. MPS: fp32.
    """
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def inference_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """Autocast dtype for evaluation and prediction: as `amp_dtype` on CUDA, fp32 on CPU and MPS.

    On a CPU an image takes milliseconds anyway, and fp32 keeps written masks and reported metrics identical
    on every CPU, with or without bf16 instructions (`--eval-only` prints the same figures everywhere).
    """
    return amp_dtype(device, enabled) if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for `dtype`, or a no-op when it is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW, fused where PyTorch has the fused kernel (CUDA and CPU): one kernel over all parameters instead of
    a Python loop over them (several times faster per step on CPU; on CUDA, far fewer kernel launches)."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=dtype == torch.float16)


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------
def dice_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Dice and IoU of two bool masks. Convention: both empty -> (1, 1); one empty -> (0, 0)."""
    inter = torch.logical_and(pred, target).sum().item()
    return dice_iou_from_counts(inter, pred.sum().item(), target.sum().item())


def dice_iou_from_counts(inter: int, pred: int, target: int) -> tuple[float, float]:
    """Dice and IoU from pixel counts (intersection, predicted, ground truth), with `dice_iou`'s conventions."""
    if pred + target == 0:
        return 1.0, 1.0
    return 2.0 * inter / (pred + target), inter / (pred + target - inter)


def roc_auc(scores, positives) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half); nan when a class is absent."""
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    pos, neg = scores[positives], scores[~positives]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def roc_curve(scores, positives) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) from (0, 0) to (1, 1), one point per distinct score;
    the trapezoid area under it equals `roc_auc` (ties give a diagonal step)."""
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    scores, positives = scores[order], positives[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1] if len(scores) else np.zeros(0, int)
    tps, fps = np.cumsum(positives)[last_of_tie], np.cumsum(~positives)[last_of_tie]
    n_pos, n_neg = max(1, positives.sum()), max(1, (~positives).sum())
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def summarize(records: list[dict], class_names=("benign", "malignant", "normal")) -> dict:
    """Aggregate per-image records (keys: label, dice, iou, pred_pixels, inter, gt_pixels[, class_probs]).

    lesion_* are means over images with a lesion (benign + malignant); normal_fp_rate is the fraction of
    normal images with any predicted lesion pixel; pooled_dice sums pixels over all lesion images.
    """
    out: dict = {"n_images": len(records)}
    lesion = [r for r in records if r["label"] != "normal"]
    normal = [r for r in records if r["label"] == "normal"]
    mean = lambda rs, k: float(np.mean([r[k] for r in rs])) if rs else float("nan")  # noqa: E731
    out["lesion_dice"] = mean(lesion, "dice")
    out["lesion_iou"] = mean(lesion, "iou")
    pooled = sum(r["pred_pixels"] + r["gt_pixels"] for r in lesion)
    out["lesion_pooled_dice"] = 2 * sum(r["inter"] for r in lesion) / pooled if pooled else float("nan")
    out["normal_fp_rate"] = float(np.mean([r["pred_pixels"] > 0 for r in normal])) if normal else float("nan")
    out["all_dice"] = mean(records, "dice")
    per_class = {}
    for name in class_names:
        rs = [r for r in records if r["label"] == name]
        if not rs:
            continue
        entry = {"n": len(rs), "dice": mean(rs, "dice"), "iou": mean(rs, "iou")}
        if name == "normal":
            entry["fp_rate"] = out["normal_fp_rate"]
        per_class[name] = entry
    out["per_class"] = per_class
    if records and "class_probs" in records[0]:
        out.update(classification_summary(records, class_names))
    return out


def classification_summary(records: list[dict], class_names) -> dict:
    """3-way accuracy and confusion matrix, and malignant-vs-benign ROC AUC on the lesion images."""
    k = len(class_names)
    truth = np.array([class_names.index(r["label"]) for r in records])
    probs = np.array([r["class_probs"] for r in records])
    confusion = np.zeros((k, k), dtype=int)
    for t, p in zip(truth, probs.argmax(1)):
        confusion[t, p] += 1
    lesion = [r for r in records if r["label"] != "normal"]
    return {
        "class_accuracy": float((probs.argmax(1) == truth).mean()),
        "confusion_matrix": {"rows_true_cols_pred": list(class_names), "counts": confusion.tolist()},
        "malignancy_auc": roc_auc([r["malignancy"] for r in lesion], [r["label"] == "malignant" for r in lesion]),
    }


# --------------------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def predict_batches(model: UNet, images: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None,
                    batch_size: int = 32, tta: bool = False, with_logits: bool = False):
    """Yield (probabilities float32 [b,1,S,S] on `device`, class probabilities [b,C] or None) per batch.

    `images` are uint8 [N,1,S,S] on any device. `tta` averages with the left-right flipped prediction.
    `with_logits` adds a third item, the raw (mask logits, class logits or None) of the unflipped input, so a
    caller can compute a loss from the same forward pass.
    """
    model.eval()
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True).float().div_(255.0)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            seg_logits, cls_logits = model(x)
            seg = torch.sigmoid(seg_logits.float())
            cls = None if cls_logits is None else torch.softmax(cls_logits.float(), 1)
            if tta:
                seg_f, cls_f = model(torch.flip(x, dims=[3]))
                seg = (seg + torch.sigmoid(torch.flip(seg_f, dims=[3]).float())) / 2
                cls = None if cls is None else (cls + torch.softmax(cls_f.float(), 1)) / 2
        if with_logits:
            yield seg, cls, (seg_logits, cls_logits)
        else:
            yield seg, cls


def probs_to_original(prob: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[1,S,S] probability map -> [H,W] at the image's own size (bilinear)."""
    return F.interpolate(prob[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def malignancy_probability(class_probs: torch.Tensor, class_names=("benign", "malignant", "normal")) -> torch.Tensor:
    """P(malignant | lesion) = p_malignant / (p_benign + p_malignant), from 3-way class probabilities."""
    b, m = class_probs[..., class_names.index("benign")], class_probs[..., class_names.index("malignant")]
    return m / (b + m).clamp_min(1e-8)


def evaluate(model: UNet, data: dict, device: torch.device, dtype: torch.dtype | None = None,
             threshold: float = 0.5, batch_size: int = 32, tta: bool = False,
             class_names=("benign", "malignant", "normal"), on_logits=None) -> tuple[dict, list[dict]]:
    """Per-image Dice/IoU at each image's ORIGINAL resolution (prediction resized back), and their summary.

    `data` is a dataset.subset(...) dict: images [N,1,S,S] uint8, labels, names, full_masks, full_sizes.
    `on_logits(start, mask_logits, class_logits)` is called for every batch (the training loop computes its
    validation loss there, from the same forward pass).
    """
    return evaluate_thresholds(model, data, device, dtype, [threshold], batch_size, tta, class_names,
                               on_logits)[threshold]


def ground_truth_on(data: dict, device: torch.device) -> list[torch.Tensor]:
    """The full-resolution bool masks of `data` on `device`, unpacked once and kept in `data` for later calls
    (validation runs every epoch; about 0.3 MB per BUSI image)."""
    from dataset import unpack_mask  # local: utils stays importable without the data module's PIL setup

    key = f"ground_truth[{device}]"
    if key not in data:
        data[key] = [unpack_mask(m, s).to(device) for m, s in zip(data["full_masks"], data["full_sizes"].tolist())]
    return data[key]


def evaluate_thresholds(model: UNet, data: dict, device: torch.device, dtype: torch.dtype | None,
                        thresholds, batch_size: int = 32, tta: bool = False,
                        class_names=("benign", "malignant", "normal"), on_logits=None) -> dict:
    """`evaluate` for several thresholds from one inference pass: {threshold: (summary, records)}.

    The pixel counts stay on the device until one copy at the end: no host sync per image, so a GPU is not
    left idle while Python walks the split.
    """
    truths = ground_truth_on(data, device)
    cuts = torch.tensor(list(thresholds), dtype=torch.float32, device=device).view(-1, 1, 1)
    counts, class_probs, i = [], [], 0
    for probs, cls, (seg_logits, cls_logits) in predict_batches(model, data["images"], device, dtype, batch_size,
                                                                 tta, with_logits=True):
        if on_logits is not None:
            on_logits(i, seg_logits, cls_logits)
        if cls is not None:
            class_probs.append(cls.float())
        for j in range(probs.shape[0]):
            gt = truths[i]
            preds = probs_to_original(probs[j], *gt.shape) > cuts  # [T,H,W], one per threshold
            counts.append(torch.stack([torch.logical_and(preds, gt).sum((1, 2)), preds.sum((1, 2)),
                                       gt.sum().expand(len(thresholds))], 1))  # [T,3]
            i += 1
    counts = torch.stack(counts).cpu().tolist() if counts else []  # [N,T,3]
    cls_all = torch.cat(class_probs).cpu() if class_probs else None
    per_t: dict = {t: [] for t in thresholds}
    for i, per_image in enumerate(counts):
        extra = {}
        if cls_all is not None:
            extra = {"class_probs": cls_all[i].tolist(), "malignancy": float(malignancy_probability(cls_all[i],
                                                                                                   class_names))}
        for t, (inter, pred, gt) in zip(thresholds, per_image):
            d, iou = dice_iou_from_counts(inter, pred, gt)
            per_t[t].append({"file": data["names"][i], "label": class_names[int(data["labels"][i])], "dice": d,
                             "iou": iou, "pred_pixels": pred, "gt_pixels": gt, "inter": inter, **extra})
    return {t: (summarize(records, class_names), records) for t, records in per_t.items()}


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, data) -> None:
    """Write `data` (bytes, or a callable that writes to a binary file object) to `path` atomically: a unique
    temp file in the same folder, fsync, then rename over `path`.

    A run killed at any moment leaves either the old file or the new one, never a torn one; two writers never
    share a temp file; a failed write (full disk) removes its temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; ours are as readable as any other file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def json_safe(value):
    """`value` with every non-finite float turned into None: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike, obj) -> None:
    """Strict JSON (NaN written as null), atomically."""
    atomic_write(path, (json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n").encode())


def claim_run_dir(parent: str | os.PathLike, name: str | None, default_name: str) -> Path:
    """Create and return a run or evaluation folder that no other run owns.

    The claim is atomic (an exclusive mkdir, or an exclusive marker file in an empty folder), so two runs
    started at once never share a folder. An explicit `name` whose folder already holds files is refused; a
    default name that is taken gets a suffix (-2, -3, ...).
    """
    parent = Path(parent)
    candidates = [name] if name else [default_name] + [f"{default_name}-{k}" for k in range(2, 1000)]
    for candidate in candidates:
        run_dir = parent / candidate
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:
            if not run_dir.is_dir() or any(p.name != ".claimed" for p in run_dir.iterdir()):
                if name:
                    raise ValueError(f"{run_dir} already holds a run (or other files): choose another --run-name, "
                                     f"or continue a training run with --resume {run_dir}") from None
                continue
        try:  # an empty folder (made by hand, or just now by us) becomes ours only if no one else claimed it
            os.close(os.open(run_dir / ".claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return run_dir
        except FileExistsError:
            if name:
                raise ValueError(f"{run_dir} is being used by another run: choose another --run-name") from None
    raise ValueError(f"no free folder name for {default_name} in {parent}")


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Serialise in memory, then `atomic_write`: torch's own file writer fails on a full disk with an opaque
    RuntimeError, while a plain write raises the OSError (ENOSPC) that names the cause."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getbuffer())


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """torch.load with weights_only=True (a checkpoint never runs code); clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint (no zip archive inside)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln or "GLOBAL" in ln]
        reason = lines[0] if lines else "objects beyond tensors and plain data"
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain data, "
                              f"which could run code ({reason[:160]})") from None
    except Exception as exc:  # noqa: BLE001 - zip/EOF/runtime errors of a torn or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint or damaged "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected format {CHECKPOINT_FORMAT!r})")
    problem = checkpoint_problem(state)
    if problem:
        raise CheckpointError(f"{path} is damaged or was not written by this project: {problem}")
    return state


def size_multiple(model_config: dict) -> int:
    """The input size a model takes must be a multiple of this: 2 ** (number of down-sampling steps)."""
    return 2 ** int(model_config.get("depth", 4))


def checkpoint_problem(state: dict) -> str | None:
    """What is structurally wrong with a loaded checkpoint dict, or None: every tool loads through
    `load_checkpoint`, so a crafted file ends in one clear message, not a traceback deep inside a tool."""
    weights, model_config, config = state["model"], state.get("model_config", {}), state.get("config", {})
    if not isinstance(weights, dict):
        return f"'model' should be a dict of tensors, got {type(weights).__name__}"
    bad = [k for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        return f"'model' entry {bad[0]!r} is a {type(weights[bad[0]]).__name__}, not a tensor"
    if not isinstance(model_config, dict):
        return f"'model_config' should be a dict, got {type(model_config).__name__}"
    if not isinstance(config, dict):
        return f"'config' should be a dict, got {type(config).__name__}"
    depth = model_config.get("depth", 4)  # (a missing model_config is named by build_model)
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= 8:
        return f"model_config depth should be an integer from 1 to 8, got {depth!r}"
    size = config.get("image_size")
    if size is not None:
        multiple = size_multiple(model_config)
        if not isinstance(size, int) or isinstance(size, bool) or size < multiple or size % multiple:
            return f"config image_size should be a positive multiple of {multiple}, got {size!r}"
    threshold = config.get("threshold")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
        return f"config threshold should be a number in (0, 1), got {threshold!r}"
    return None


def build_model(state: dict, path: str | os.PathLike = "checkpoint") -> UNet | UNetEnsemble:
    """Rebuild the UNet (or ensemble of UNets) described by a checkpoint and load its weights, naming any
    mismatch."""
    config = state.get("model_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has no model_config")
    try:
        unet_config = {k: v for k, v in config.items() if k != "members"}
        if "members" in config:
            n = config["members"]
            if not isinstance(n, int) or n < 1:
                raise TypeError(f"members must be a positive integer, got {n!r}")
            model = UNetEnsemble([UNet(**unet_config) for _ in range(n)])
        else:
            model = UNet(**unet_config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: model_config {config} does not describe this project's UNet ({exc})") from None
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {shapes[0]} is {tuple(weights[shapes[0]].shape)}, "
                       f"expected {tuple(expected[shapes[0]].shape)}")
        raise CheckpointError(f"{path}: weights do not fit UNet{config}: {detail}")
    model.load_state_dict(weights)
    return model


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[UNet, dict]:
    """Load a checkpoint into a ready-to-use UNet in eval mode on `device`; also returns the checkpoint dict."""
    state = load_checkpoint(path)
    model = build_model(state, path).to(device).eval()
    return model, state


def export_checkpoint(src, dst: str | os.PathLike, half: bool = True) -> dict:
    """Strip a training checkpoint to what inference needs (weights, model config, run config, validation
    figures), with fp16 weights by default: the shipped model. Returns the exported dict.

    `src` may also be a list of checkpoints: they become ONE ensemble checkpoint (see unet.UNetEnsemble),
    which every tool loads like a single model. Its members must share the architecture, the input size and
    the threshold; the first member's run config is kept, and each member's source, best epoch and
    validation figures are listed under `members`.
    """
    sources = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    states = [load_checkpoint(s) for s in sources]
    first = states[0]
    if len(states) > 1:
        for s, state in zip(sources, states):
            if "members" in (state.get("model_config") or {}):
                raise CheckpointError(f"cannot ensemble {s}: it is an ensemble already (list its members instead)")
    for s, state in zip(sources[1:], states[1:]):
        for what, a, b in (("model_config", first.get("model_config"), state.get("model_config")),
                           ("image_size", first.get("config", {}).get("image_size"),
                            state.get("config", {}).get("image_size")),
                           ("threshold", first.get("config", {}).get("threshold"),
                            state.get("config", {}).get("threshold"))):
            if a != b:
                raise CheckpointError(f"cannot ensemble {sources[0]} and {s}: their {what} differ ({a} vs {b})")

    def slim_weights(state):
        return {k: v.half() if (half and v.is_floating_point()) else v for k, v in state["model"].items()}

    if len(states) == 1:
        weights, model_config = slim_weights(first), first["model_config"]
        best_epoch, best_val, members = first.get("best_epoch"), first.get("best_val"), first.get("members")
    else:
        weights = {f"members.{i}.{k}": v for i, state in enumerate(states) for k, v in slim_weights(state).items()}
        model_config = dict(first["model_config"], members=len(states))
        best_epoch, best_val = None, None  # an ensemble has no epoch; its members' figures are listed
        members = [{"source": str(s), "best_epoch": state.get("best_epoch"), "best_val": state.get("best_val"),
                    "seed": state.get("config", {}).get("seed")} for s, state in zip(sources, states)]
    slim = {"format": CHECKPOINT_FORMAT, "model": weights, "model_config": model_config,
            "config": first.get("config", {}), "best_epoch": best_epoch, "best_val": best_val}
    if members:
        slim["members"] = members
    save_checkpoint(slim, dst)
    return slim
