"""Train a U-Net on BUSI (breast-ultrasound lesion segmentation) and report honest held-out numbers.

    python train_unet_busi.py                       # bundled sample, or ./Dataset_BUSI_with_GT if present
    python train_unet_busi.py --data-dir PATH/Dataset_BUSI_with_GT        # the defaults: 256 px, base 32 (a GPU)
    python train_unet_busi.py --data-dir PATH/Dataset_BUSI_with_GT --image-size 128 --base-channels 16
                                                    # the small recipe: about 20 min on 2 CPU cores with bf16
    python train_unet_busi.py --resume --run-name NAME   # continue a killed run
    python train_unet_busi.py --eval-only --checkpoint checkpoints/busi_unet_small.pt

Every hyperparameter below is a plain name: edit it here, or override it with the --flag of the same name.
The run folder <output-dir>/<run-name>/ receives latest.pt (every epoch), best.pt (best validation score),
history.csv, curves.png, and at the end metrics.json + test_predictions.csv from ONE evaluation of best.pt on
the test split (and test_report.png: Dice per class, malignancy ROC curve, confusion matrix). The test split
never chooses anything: the checkpoint and threshold are chosen on validation.
"""
from __future__ import annotations

# ------------------------------------------------------------------------------------------------------------------
# Hyperparameters (defaults of the command-line flags)
# ------------------------------------------------------------------------------------------------------------------
DATA_DIR = None                  # None: ./Dataset_BUSI_with_GT if present, else the bundled sample data/busi_sample
SPLIT_FILE = "splits/busi_split.json"  # committed leakage-safe split of BUSI; other data gets a split computed per run
OUTPUT_DIR = "checkpoints"       # run folders go here
RUN_NAME = None                  # None: a timestamp
EPOCHS = 100                     # passes over the training split (100 beat 50 on validation, 3 seeds, 128 px)
BATCH_SIZE = 16
LR = 2e-3                        # peak AdamW learning rate (after warm-up; cosine decay to 0 by the last step)
WEIGHT_DECAY = 1e-4
WARMUP_EPOCHS = 2                # linear warm-up, avoids early BatchNorm/Adam blow-ups at this LR
IMAGE_SIZE = 256                 # images are squashed to IMAGE_SIZE x IMAGE_SIZE (a multiple of 2**DEPTH)
BASE_CHANNELS = 32               # width of the first U-Net stage; doubles at every level
DEPTH = 4                        # number of down-sampling steps
BCE_WEIGHT = 1.0                 # loss = BCE_WEIGHT * BCE + DICE_WEIGHT * (1 - soft Dice) + CLS_WEIGHT * CE
DICE_WEIGHT = 1.0
DICE_PER_IMAGE = True            # soft Dice per image, then averaged (as the metric is), not pooled over the batch
                                 # (higher validation Dice on 3 of 3 seeds at 128 px; see RESULTS.md)
CLS_WEIGHT = 0.2                 # weight of the normal/benign/malignant head on the bottleneck (0 = no head)
DEEP_SUPERVISION = 0.5           # weight of the same seg loss on the coarser decoder outputs (0 = off, no aux heads)
AUGMENT = 1.0                    # strength of the on-device augmentation (0 = none; see augment.AugmentConfig)
EMA = 0.0                        # decay of a moving average of the weights used for validation and checkpoints (0 = off)
THRESHOLD = 0.5                  # probability above which a pixel is lesion
TTA = False                      # average predictions with the left-right flipped image at evaluation
TUNE_THRESHOLD = False           # pick the threshold on the VALIDATION split (0.3-0.7) before the one test evaluation
SEED = 42
DETERMINISTIC = False            # deterministic cuDNN kernels (slower); CPU runs are deterministic anyway
DEVICE = "auto"                  # auto = cuda > mps > cpu
AMP = True                       # mixed precision: bf16 on GPUs and CPUs that have it, fp16 + GradScaler on older GPUs
COMPILE = False                  # torch.compile the model (falls back to eager if it cannot)
CACHE_DIR = ".cache"             # decoded uint8 tensors, keyed by data and size: later runs start in seconds
EVAL_BATCH_SIZE = 32
MAX_BAD_STEPS = 5                # stop after this many non-finite losses in a row (checked every 10 steps)

import argparse  # noqa: E402
import csv  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent
SAMPLE_DIR = ROOT / "data" / "busi_sample"
CONFIG_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "image_size", "base_channels",
               "depth", "bce_weight", "dice_weight", "dice_per_image", "cls_weight", "deep_supervision", "augment",
               "ema", "threshold", "tta", "seed")


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    import utils

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Defaults are the names at the top of train_unet_busi.py: edit them there.")
    g = p.add_argument_group("data and output")
    g.add_argument("--data-dir", default=DATA_DIR,
                   help="folder with benign/, malignant/, normal/, or a bundle file from `python dataset.py "
                        "--bundle` (default: ./Dataset_BUSI_with_GT if present, else the bundled sample "
                        "data/busi_sample)")
    g.add_argument("--split-file", default=SPLIT_FILE,
                   help="split JSON (default: %(default)s, used when it lists exactly the data dir's images; "
                        "for other data a leakage-safe split is computed and written into the run folder)")
    g.add_argument("--output-dir", default=OUTPUT_DIR, help="parent folder of run folders (default: %(default)s)")
    g.add_argument("--run-name", default=RUN_NAME, help="run folder name (default: a timestamp)")
    g.add_argument("--cache-dir", default=CACHE_DIR,
                   help="cache of decoded tensors, '' for none (default: %(default)s)")
    g = p.add_argument_group("model")
    g.add_argument("--image-size", type=utils.positive_int, default=IMAGE_SIZE,
                   help="square training/inference size, a multiple of 2**depth (default: %(default)s)")
    g.add_argument("--base-channels", type=utils.positive_int, default=BASE_CHANNELS,
                   help="width of the first U-Net stage (default: %(default)s)")
    g.add_argument("--depth", type=utils.positive_int, default=DEPTH,
                   help="number of down-sampling steps (default: %(default)s)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=utils.positive_int, default=EPOCHS, help="epochs (default: %(default)s)")
    g.add_argument("--batch-size", type=utils.positive_int, default=BATCH_SIZE, help="batch size (default: %(default)s)")
    g.add_argument("--lr", type=utils.positive_float, default=LR, help="peak AdamW learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=utils.non_negative_float, default=WEIGHT_DECAY,
                   help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--warmup-epochs", type=utils.non_negative_float, default=WARMUP_EPOCHS,
                   help="linear warm-up before the cosine decay (default: %(default)s)")
    g.add_argument("--bce-weight", type=utils.non_negative_float, default=BCE_WEIGHT,
                   help="weight of the BCE term (default: %(default)s)")
    g.add_argument("--dice-weight", type=utils.non_negative_float, default=DICE_WEIGHT,
                   help="weight of the soft-Dice term (default: %(default)s)")
    g.add_argument("--dice-per-image", action=argparse.BooleanOptionalAction, default=DICE_PER_IMAGE,
                   help="soft-Dice loss per image, averaged over the batch (as the reported Dice is), instead of "
                        "pooled over the batch's pixels")
    g.add_argument("--cls-weight", type=utils.non_negative_float, default=CLS_WEIGHT,
                   help="weight of the normal/benign/malignant head, 0 = no head (default: %(default)s)")
    g.add_argument("--deep-supervision", type=utils.non_negative_float, default=DEEP_SUPERVISION,
                   help="weight of the auxiliary seg losses on the coarser decoder outputs, 0 = off "
                        "(default: %(default)s)")
    g.add_argument("--augment", type=utils.non_negative_float, default=AUGMENT,
                   help="augmentation strength, 0 = off (default: %(default)s)")
    g.add_argument("--ema", type=utils.non_negative_float, default=EMA,
                   help="weight moving-average decay, e.g. 0.99; 0 = off (default: %(default)s)")
    g.add_argument("--seed", type=int, default=SEED, help="random seed (default: %(default)s)")
    g.add_argument("--deterministic", action="store_true", default=DETERMINISTIC,
                   help="deterministic cuDNN kernels (slower; CPU runs are deterministic anyway)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--threshold", type=utils.probability, default=THRESHOLD,
                   help="lesion probability threshold (default: %(default)s)")
    g.add_argument("--tta", action="store_true", default=TTA, help="average with the flipped image's prediction")
    g.add_argument("--tune-threshold", action="store_true", default=TUNE_THRESHOLD,
                   help="choose the threshold on the validation split before the test evaluation")
    g.add_argument("--eval-batch-size", type=utils.positive_int, default=EVAL_BATCH_SIZE,
                   help="batch size of evaluation (default: %(default)s)")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=DEVICE, help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps "
                                                    "(default: %(default)s)")
    g.add_argument("--no-amp", dest="amp", action="store_false", default=AMP,
                   help="train in fp32 (by default training autocasts to bf16 on CUDA GPUs that have it and on "
                        "CPUs with bf16 instructions, fp16 + GradScaler on older GPUs)")
    g.add_argument("--compile", action="store_true", default=COMPILE,
                   help="torch.compile the model (falls back to eager where it cannot)")
    g = p.add_argument_group("resume and evaluation only")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run from its latest.pt: the run of --run-name, or the given run folder or file")
    g.add_argument("--stop-after", type=utils.positive_int, default=None, metavar="N",
                   help="train at most N epochs in this invocation, then save and exit (for time-limited jobs; "
                        "continue with --resume)")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate --checkpoint once on the test split and write metrics.json")
    g.add_argument("--checkpoint", default=None, help="checkpoint file for --eval-only: a run's best.pt, or a model or ensemble "
                        "exported with utils.export_checkpoint")
    g.add_argument("--eval-split", choices=("test", "val", "train"), default="test",
                   help="split that --eval-only scores (default: %(default)s); compare levers such as --tta or "
                        "--threshold on val, so the test split chooses nothing")
    return p


def explicit_flags(argv=None) -> set[str]:
    """The options given on the command line, as '--name' of their destination, read from a second parse with
    no defaults: abbreviations (--epoch for --epochs) and --no-X (sets X) count like the full spelling."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = parser.parse_args(argv)
    return {"--" + dest.replace("_", "-") for dest in vars(given)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = explicit_flags(argv)
    multiple = 2 ** args.depth
    if args.image_size % multiple:
        parser.error(f"argument --image-size: {args.image_size} is not a multiple of {multiple} "
                     f"(the U-Net halves it {args.depth} times; try {max(multiple, round(args.image_size / multiple) * multiple)})")
    if not 0 <= args.ema < 1:
        parser.error(f"argument --ema: must be in [0, 1), got {args.ema}")
    if args.eval_only and not args.checkpoint:
        parser.error("--eval-only needs --checkpoint PATH")
    if args.device != "auto":
        import torch
        try:
            torch.device(args.device)
        except (RuntimeError, ValueError):
            parser.error(f"argument --device: unknown device {args.device!r} (auto, cpu, cuda, cuda:N or mps)")
    return args


# ------------------------------------------------------------------------------------------------------------------
# The experiment
# ------------------------------------------------------------------------------------------------------------------
def eval_folder_name(checkpoint: str, split: str) -> str:
    """eval-<checkpoint>[-<split>]; a run's best.pt / latest.pt is named with its run folder (eval-r1-best)."""
    path = Path(checkpoint)
    name = f"{path.parent.name}-{path.stem}" if path.stem in ("best", "latest") and path.parent.name else path.stem
    return f"eval-{name}" + ("" if split == "test" else f"-{split}")


def resolve_data_dir(data_dir: str | None) -> Path:
    if data_dir:
        return Path(data_dir)
    if Path("Dataset_BUSI_with_GT").is_dir():
        return Path("Dataset_BUSI_with_GT")
    banner = "=" * 100
    print(f"{banner}\n  NO --data-dir GIVEN AND ./Dataset_BUSI_with_GT NOT FOUND: using the bundled sample "
          f"({SAMPLE_DIR.relative_to(ROOT)}, a handful of images).\n  Its numbers mean nothing. For real results "
          f"download BUSI from Kaggle ('breast-ultrasound-images-dataset') and\n  pass --data-dir "
          f"PATH/Dataset_BUSI_with_GT (or unpack it into this folder).\n{banner}", flush=True)
    return SAMPLE_DIR


def choose_split(args, data_dir: Path, samples, run_dir: Path) -> tuple[dict, str]:
    """The committed split when it fits this data (or an explicit --split-file), else one computed now."""
    import dataset

    split_path = Path(args.split_file)
    if not split_path.is_absolute() and not split_path.exists():
        split_path = ROOT / split_path
    if "--split-file" in args.explicit:
        return dataset.read_split(split_path, samples), str(split_path)
    if split_path.is_file():
        split = dataset.read_split(split_path)
        if dataset.split_matches(split, samples):
            return split, str(split_path)
    if dataset.is_bundle(data_dir):
        raise dataset.DataError(f"{split_path} does not list the images of the bundle {data_dir}, and a bundle "
                                f"has no full-size images to group duplicates: pass --split-file with a split "
                                f"of its images")
    print(f"{split_path.name} does not list this data dir's images: computing a leakage-safe split "
          f"(near-duplicate grouping + stratification) into {run_dir / 'split.json'}", flush=True)
    split = dataset.compute_split(data_dir, samples)
    dataset.write_split(split, run_dir / "split.json")
    return split, str(run_dir / "split.json")


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_figure(fig, path: Path) -> None:
    """Write a Matplotlib figure as PNG atomically (a killed run never leaves half a PNG) and close it."""
    import matplotlib.pyplot as plt

    import utils

    fig.tight_layout()
    try:
        utils.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def write_csv(path: Path, header, rows) -> None:
    """A CSV file, written atomically."""
    import io

    import utils

    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    utils.atomic_write(path, text.getvalue().encode("utf-8", "surrogateescape"))  # undecodable file names: their own bytes


def write_history(run_dir: Path, history: list[dict]) -> None:
    """history.csv and curves.png (loss and validation Dice per epoch), rewritten every epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    fields = list(history[0])
    write_csv(run_dir / "history.csv", fields, [[h.get(k, "") for k in fields] for h in history])
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax1.legend()
    ax2.plot(epochs, [h["val_lesion_dice"] for h in history], label="lesion Dice")
    ax2.plot(epochs, [h["val_lesion_iou"] for h in history], label="lesion IoU")
    ax2.plot(epochs, [h["val_score"] for h in history], label="all-image Dice (selects best.pt)")
    ax2.set(xlabel="epoch", ylabel="validation", title="Validation (original resolution)", ylim=(0, 1))
    ax2.legend(loc="lower right")
    save_figure(fig, run_dir / "curves.png")


def write_test_report(run_dir: Path, summary: dict, records: list[dict], extra: dict, split: str = "test") -> None:
    """metrics.json ({split: summary, ...}) and <split>_predictions.csv."""
    import dataset

    import utils

    utils.write_json(run_dir / "metrics.json", {split: summary, **extra})  # NaN (e.g. no normal images) -> null
    fields = ["file", "class", "dice", "iou", "pred_pixels", "gt_pixels"]
    if records and "malignancy" in records[0]:
        fields += ["malignancy_probability", "predicted_class"]
    rows = []
    for r in records:
        row = [r["file"], r["label"], f"{r['dice']:.4f}", f"{r['iou']:.4f}", r["pred_pixels"], r["gt_pixels"]]
        if "malignancy" in r:
            row += [f"{r['malignancy']:.4f}", dataset.CLASSES[max(range(3), key=lambda k: r["class_probs"][k])]]
        rows.append(row)
    write_csv(run_dir / f"{split}_predictions.csv", fields, rows)


def write_report_figure(run_dir: Path, summary: dict, records: list[dict], split: str = "test") -> None:
    """<split>_report.png: per-image Dice by class, the malignancy ROC curve and the confusion matrix."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import dataset
    import utils

    has_cls = "malignancy_auc" in summary
    fig, axes = plt.subplots(1, 3 if has_cls else 1, figsize=(15 if has_cls else 5.5, 4.5), squeeze=False)
    ax = axes[0, 0]
    lesion_classes = [c for c in ("benign", "malignant") if c in summary["per_class"]]
    dice = [[r["dice"] for r in records if r["label"] == c] for c in lesion_classes]
    if dice:
        ax.boxplot(dice, showmeans=True)
        ax.set_xticks(range(1, len(dice) + 1), lesion_classes)
        for k, values in enumerate(dice, start=1):  # every image as a dot beside its box
            ax.scatter(np.full(len(values), k + 0.25), values, s=6, alpha=0.5)
    fp = summary["normal_fp_rate"]
    ax.set(ylim=(-0.02, 1.02), ylabel="Dice per image (original resolution)",
           xlabel="box: median and quartiles; triangle: mean; dots: images",
           title=f"{split}: lesion Dice {summary['lesion_dice']:.3f}"
                 + (f", normal FP rate {fp:.2f}" if fp == fp else ""))
    if has_cls:
        lesion = [r for r in records if r["label"] != "normal"]
        fpr, tpr = utils.roc_curve([r["malignancy"] for r in lesion], [r["label"] == "malignant" for r in lesion])
        ax = axes[0, 1]
        ax.plot(fpr, tpr, drawstyle="default", label=f"AUC {summary['malignancy_auc']:.3f} (n={len(lesion)})")
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        ax.set(xlabel="benign called malignant (FPR)", ylabel="malignant found (TPR)",
               title="Malignant vs benign, lesion images", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right")
        ax = axes[0, 2]
        counts = np.array(summary["confusion_matrix"]["counts"])
        ax.imshow(counts, cmap="Blues")
        for (i, j), v in np.ndenumerate(counts):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > counts.max() / 2 else "black")
        ax.set_xticks(range(len(dataset.CLASSES)), dataset.CLASSES)
        ax.set_yticks(range(len(dataset.CLASSES)), dataset.CLASSES)
        ax.set(xlabel="predicted", ylabel="true", title=f"Class head: accuracy {summary['class_accuracy']:.3f}")
    save_figure(fig, run_dir / f"{split}_report.png")


def print_summary(title: str, s: dict) -> None:
    print(f"{title}: lesion Dice {s['lesion_dice']:.4f} | lesion IoU {s['lesion_iou']:.4f} | "
          f"pooled Dice {s['lesion_pooled_dice']:.4f} | normal FP rate {s['normal_fp_rate']:.3f} "
          f"| n={s['n_images']}")
    for name, c in s["per_class"].items():
        extra = f" | FP rate {c['fp_rate']:.3f}" if "fp_rate" in c else ""
        print(f"  {name:<9} n={c['n']:<4} Dice {c['dice']:.4f} | IoU {c['iou']:.4f}{extra}")
    if "malignancy_auc" in s:
        print(f"  classification: accuracy {s['class_accuracy']:.4f} | malignant-vs-benign ROC AUC "
              f"{s['malignancy_auc']:.4f} | confusion (rows true, cols pred: benign, malignant, normal) "
              f"{s['confusion_matrix']['counts']}")


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: stopping after this step and saving latest.pt "
              f"(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run(args) -> int:
    import torch
    from tqdm import tqdm

    import dataset
    import utils
    from augment import AugmentConfig
    from losses import BCEDiceLoss
    from unet import UNet

    device = utils.pick_device(args.device)
    output_dir = Path(args.output_dir)

    # ---- resume / eval-only: the checkpoint's own config wins over the defaults ----
    state = None
    if args.resume is not None:
        if args.resume:
            ckpt_path = Path(args.resume)
            ckpt_path = ckpt_path / "latest.pt" if ckpt_path.is_dir() else ckpt_path
        elif args.run_name:
            ckpt_path = output_dir / args.run_name / "latest.pt"
        else:
            raise ValueError("--resume needs --run-name NAME (or --resume PATH to a run folder or latest.pt)")
        state = utils.load_checkpoint(ckpt_path)
        if "optimizer" not in state:  # an exported model (or ensemble): weights only
            raise ValueError(f"{ckpt_path} holds weights only (an exported model), not a training run to resume: "
                             f"evaluate it with --eval-only --checkpoint {ckpt_path}")
        run_dir = ckpt_path.parent
    elif args.eval_only:
        state = utils.load_checkpoint(args.checkpoint)
        run_dir = utils.claim_run_dir(output_dir, args.run_name, eval_folder_name(args.checkpoint, args.eval_split))
    else:
        run_dir = utils.claim_run_dir(output_dir, args.run_name, time.strftime("%Y%m%d-%H%M%S"))
    if state is not None:
        saved = {"dice_per_image": False, **state.get("config", {})}  # runs from before the option pooled the Dice
        for key in CONFIG_KEYS:
            if key in saved and ("--" + key.replace("_", "-")) not in args.explicit:
                setattr(args, key, saved[key])
        if not args.data_dir and saved.get("data_dir") and Path(saved["data_dir"]).exists() and args.resume is not None:
            args.data_dir = saved["data_dir"]
        if (args.resume is not None and "--split-file" not in args.explicit and saved.get("split_file")
                and Path(saved["split_file"]).is_file()):  # the split the run started with
            args.split_file = saved["split_file"]
            args.explicit.add("--split-file")
    run_dir.mkdir(parents=True, exist_ok=True)

    # ---- data: discover, split, decode once, keep on the device ----
    data_dir = resolve_data_dir(args.data_dir)
    if dataset.is_bundle(data_dir):  # one file from `python dataset.py --bundle`: already decoded
        cache = dataset.read_bundle(data_dir, args.image_size)
        samples = dataset.bundle_samples(cache)
    else:
        samples = dataset.discover_samples(data_dir)
        cache = None
    split, split_source = choose_split(args, data_dir, samples, run_dir)
    if cache is None:
        cache = dataset.build_cache(data_dir, samples, args.image_size, args.cache_dir or None)
    train, val, test = (dataset.subset(cache, split[k]) for k in ("train", "val", "test"))
    counts = {k: len(split[k]) for k in ("train", "val", "test")}
    print(f"data: {data_dir} | {len(samples)} images | split {counts} from {split_source} | device {device}",
          flush=True)
    needed = (args.eval_split,) if args.eval_only else ("train", "val", "test")
    if any(counts[k] == 0 for k in needed):
        empty = ", ".join(k for k in needed if counts[k] == 0)
        raise ValueError(f"the split leaves no {empty} images ({counts}); add data or pass a --split-file")
    if not args.eval_only and counts["train"] < 2:
        raise ValueError(f"training needs at least 2 images (BatchNorm), the split has {counts['train']}")

    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    config.update(data_dir=str(data_dir), split_file=split_source, device=str(device), amp=args.amp)
    dtype = utils.amp_dtype(device, args.amp)          # training
    eval_dtype = utils.inference_dtype(device, args.amp)  # validation and test: fp32 on CPU, see utils

    # ---- model ----
    utils.seed_everything(args.seed, args.deterministic)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if state is not None:
        model = utils.build_model(state, args.checkpoint or "latest.pt")
        if "train_model" in state and not args.eval_only:  # an EMA run: "model" holds the averaged weights
            model.load_state_dict(state["train_model"])
        args.base_channels, args.depth = model.config["base_channels"], model.config["depth"]
        config.update(base_channels=args.base_channels, depth=args.depth)
    else:
        model = UNet(1, 1, args.base_channels, args.depth, num_classes=3 if args.cls_weight > 0 else 0,
                     deep_supervision=args.deep_supervision > 0)
    model = model.to(device, memory_format=torch.channels_last)
    config["model"] = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__}{model.config} | {n_params / 1e6:.2f} M parameters | autocast: train {dtype}, "
          f"eval {eval_dtype} | image {args.image_size}px",
          flush=True)

    def evaluate(net, data):
        return utils.evaluate(net, data, device, eval_dtype, args.threshold, args.eval_batch_size, args.tta)

    if args.eval_only:
        split_name = args.eval_split
        summary, records = evaluate(model, {"test": test, "val": val, "train": train}[split_name])
        extra = {"checkpoint": str(args.checkpoint), "best_epoch": state.get("best_epoch"), "config": config,
                 "val_at_best": state.get("best_val")}
        write_test_report(run_dir, summary, records, extra, split_name)
        write_report_figure(run_dir, summary, records, split_name)
        print_summary(f"{split_name} ({args.checkpoint}{', flip TTA' if args.tta else ''}, threshold "
                      f"{args.threshold})", summary)
        print(f"wrote {run_dir / 'metrics.json'}, {run_dir / f'{split_name}_predictions.csv'} and "
              f"{run_dir / f'{split_name}_report.png'}")
        return 0

    # ---- optimisation ----
    steps_per_epoch = math.ceil(len(train["names"]) / args.batch_size)
    if len(train["names"]) % args.batch_size == 1:
        # BatchNorm cannot train on a batch of one image (at a 1x1 bottleneck it fails outright): the lone last
        # image of each shuffled epoch sits that epoch out
        steps_per_epoch -= 1
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = max(1, round(args.warmup_epochs * steps_per_epoch))
    optimizer = utils.make_optimizer(model, args.lr, args.weight_decay, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps))
    scaler = utils.make_grad_scaler(device, dtype)
    seg_loss = BCEDiceLoss(args.bce_weight, args.dice_weight, dice_per_image=args.dice_per_image)
    aug_cfg = AugmentConfig().scaled(args.augment)
    param_gen = torch.Generator().manual_seed(args.seed)
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1) if device.type != "mps" else None

    ema_model = None
    if args.ema > 0:
        import copy
        ema_model = copy.deepcopy(model).eval()
        if state is not None:
            ema_model.load_state_dict(state["model"])
        ema_params, model_params = list(ema_model.parameters()), list(model.parameters())
        ema_buffers, model_buffers = list(ema_model.buffers()), list(model.buffers())
    eval_model = ema_model if ema_model is not None else model

    start_epoch, start_step, epoch_perm, history = 0, 0, None, []
    best_score, best_epoch, best_val = -1.0, None, None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_step, epoch_perm = state["epoch"], state.get("step", 0), state.get("epoch_perm")
        history = list(state.get("history", []))
        best_score, best_epoch, best_val = state["best_score"], state["best_epoch"], state.get("best_val")
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        param_gen.set_state(rng["param_gen"])
        if noise_gen is not None and "noise_gen" in rng:
            noise_gen.set_state(rng["noise_gen"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        print(f"resuming {run_dir} at epoch {start_epoch + 1}" + (f", step {start_step}" if start_step else ""),
              flush=True)
        if start_epoch >= args.epochs:
            print(f"nothing to train: the run already has {start_epoch} of {args.epochs} epochs")

    def checkpoint_state(epoch: int, step: int, perm) -> dict:
        rng = {"torch": torch.get_rng_state(), "param_gen": param_gen.get_state()}
        if noise_gen is not None:
            rng["noise_gen"] = noise_gen.get_state()
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        weights = {"model": eval_model.state_dict()}
        if ema_model is not None:
            weights["train_model"] = model.state_dict()
        return {"format": utils.CHECKPOINT_FORMAT, **weights, "model_config": model.config,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "epoch_perm": perm,
                "best_score": best_score, "best_epoch": best_epoch, "best_val": best_val, "config": config,
                "history": history, "rng": rng}

    # The training split lives on the device as uint8 for the whole run.
    train_images = train["images"].to(device)
    train_masks = train["masks"].to(device)
    train_labels = train["labels"].to(device)
    val_on_device = {**val, "images": val["images"].to(device), "masks": val["masks"].to(device)}  # once, not per epoch
    # non-finite losses, counted on the device: the current streak, the longest one, and the total
    bad_run, bad_longest, bad_total = (torch.zeros((), dtype=torch.long, device=device) for _ in range(3))
    bad_reported = 0
    step_fn = TrainStep(model, optimizer, scaler, seg_loss, args.cls_weight, device, dtype, args.compile,
                        ds_weight=args.deep_supervision)

    with StopRequest() as stop:
        for epoch in range(start_epoch, args.epochs):
            model.train()
            perm = epoch_perm if epoch_perm is not None else torch.randperm(len(train["names"]), generator=param_gen)
            epoch_perm = None
            t0, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)
            good_seen = torch.zeros((), dtype=torch.long, device=device)
            bar = tqdm(range(start_step, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                       dynamic_ncols=True, initial=start_step, total=steps_per_epoch)
            for step in bar:
                idx = perm[step * args.batch_size:(step + 1) * args.batch_size].to(device)
                loss, finite = step_fn(train_images[idx], train_masks[idx], train_labels[idx], aug_cfg, param_gen,
                                       noise_gen)
                scheduler.step()
                # Bookkeeping stays on the device (no host sync per step); a skipped step adds nothing.
                bad_run = torch.where(finite, 0, bad_run + 1)
                bad_longest = torch.maximum(bad_longest, bad_run)
                bad_total += ~finite
                if ema_model is not None:  # decay ramps up so the average forgets the random init quickly
                    done = scheduler.last_epoch
                    weight = finite.float() * (1 - min(args.ema, (1 + done) / (10 + done)))
                    with torch.no_grad():
                        torch._foreach_lerp_(ema_params, model_params, weight)
                        torch._foreach_copy_(ema_buffers, model_buffers)
                loss_sum += torch.where(finite, loss, 0) * len(idx)
                good_seen += finite * len(idx)
                seen += len(idx)
                if step % 10 == 0 or step == steps_per_epoch - 1:  # the one read-back every 10 steps
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                    total, longest = torch.stack([bad_total, bad_longest]).tolist()
                    if total > bad_reported:
                        print(f"warning: {total - bad_reported} non-finite loss(es) by epoch {epoch + 1} step "
                              f"{step + 1}: each step skipped, nothing updated (longest streak {longest})",
                              file=sys.stderr, flush=True)
                        bad_reported = total
                        if longest >= MAX_BAD_STEPS:
                            raise FloatingPointError(
                                f"loss was non-finite {longest} steps in a row (epoch {epoch + 1}); stopping. The "
                                f"last good checkpoints in {run_dir} are untouched; try a lower --lr or --no-amp")
                if stop.requested:
                    bar.close()
                    next_step = step + 1
                    if next_step >= steps_per_epoch:
                        break  # the epoch is complete: finish it normally (validation + checkpoints) below
                    utils.save_checkpoint(checkpoint_state(epoch, next_step, perm), run_dir / "latest.pt")
                    print(f"interrupted at epoch {epoch + 1}, step {next_step}/{steps_per_epoch}: saved "
                          f"{run_dir / 'latest.pt'}.\nResume with: python train_unet_busi.py --resume "
                          f"{run_dir}", file=sys.stderr, flush=True)
                    return 130
            bar.close()
            start_step = 0
            train_seconds = time.perf_counter() - t0

            # ---- validation at each image's original resolution ----
            val_summary, val_loss = validate(eval_model, val_on_device, seg_loss, args, device, eval_dtype)
            score = val_summary["all_dice"]
            seconds = time.perf_counter() - t0
            row = {"epoch": epoch + 1, "train_loss": round(float(loss_sum) / max(1, int(good_seen)), 5),
                   "val_loss": round(val_loss, 5), "val_lesion_dice": round(val_summary["lesion_dice"], 5),
                   "val_lesion_iou": round(val_summary["lesion_iou"], 5),
                   "val_normal_fp_rate": round(val_summary["normal_fp_rate"], 5)
                   if not math.isnan(val_summary["normal_fp_rate"]) else "",
                   "val_score": round(score, 5), "lr": optimizer.param_groups[0]["lr"],
                   "seconds": round(seconds, 2), "train_img_per_s": round(seen / max(train_seconds, 1e-9), 1)}
            if "malignancy_auc" in val_summary:
                row["val_malignancy_auc"] = round(val_summary["malignancy_auc"], 5)
            history.append(row)
            improved = score > best_score
            if improved:
                best_score, best_epoch, best_val = score, epoch + 1, val_summary
            print(f"epoch {epoch + 1:>3}/{args.epochs} | train loss {row['train_loss']:.4f} | val loss "
                  f"{row['val_loss']:.4f} | val Dice {row['val_lesion_dice']:.4f} | val IoU "
                  f"{row['val_lesion_iou']:.4f} | val score {score:.4f}{' *' if improved else '  '} | lr "
                  f"{row['lr']:.2e} | {seconds:.1f} s | {row['train_img_per_s']:.0f} img/s", flush=True)
            ckpt = checkpoint_state(epoch + 1, 0, None)
            if improved:
                utils.save_checkpoint(ckpt, run_dir / "best.pt")
            utils.save_checkpoint(ckpt, run_dir / "latest.pt")
            write_history(run_dir, history)
            if args.stop_after is not None and epoch + 1 - start_epoch >= args.stop_after and epoch + 1 < args.epochs:
                print(f"stopping after {args.stop_after} epoch(s) as asked; continue with: python "
                      f"train_unet_busi.py --resume {run_dir}", flush=True)
                return 0
            if stop.requested:
                print(f"interrupted after epoch {epoch + 1}: saved {run_dir / 'latest.pt'}.\nResume with: "
                      f"python train_unet_busi.py --resume {run_dir}", file=sys.stderr, flush=True)
                return 130

    # ---- one evaluation of best.pt on the test split ----
    if best_epoch is None:
        raise ValueError("no epoch finished, so there is no best.pt to evaluate")
    best_model = utils.load_model(run_dir / "best.pt", device)[0].to(memory_format=torch.channels_last)
    if args.tune_threshold:
        grid = [round(0.3 + 0.05 * k, 2) for k in range(9)]
        scores = {t: r[0]["all_dice"] for t, r in utils.evaluate_thresholds(
            best_model, val_on_device, device, eval_dtype, grid, args.eval_batch_size, args.tta).items()}
        args.threshold = max(grid, key=lambda t: (scores[t], -abs(t - 0.5)))
        config["threshold"] = args.threshold
        print("threshold chosen on validation: " + ", ".join(f"{t}: {v:.4f}" for t, v in scores.items())
              + f" -> {args.threshold}", flush=True)
        best_state = utils.load_checkpoint(run_dir / "best.pt")
        best_state["config"] = config  # predict_busi.py and the GUI read the threshold from here
        utils.save_checkpoint(best_state, run_dir / "best.pt")
    summary, records = evaluate(best_model, test)
    write_test_report(run_dir, summary, records, {"best_epoch": best_epoch, "val_at_best": best_val,
                                                  "config": config, "checkpoint": str(run_dir / "best.pt")})
    write_report_figure(run_dir, summary, records)
    print(f"best epoch {best_epoch} (validation all-image Dice {best_score:.4f})")
    print_summary("test (best.pt, evaluated once)", summary)
    print(f"wrote {run_dir}/: best.pt latest.pt history.csv curves.png metrics.json test_predictions.csv "
          f"test_report.png")
    return 0


class TrainStep:
    """One optimisation step of the project's pipeline, shared by the training loop and bench_busi.py.

    uint8 batch already on the device -> batched augmentation -> channels_last -> autocast forward ->
    float32 loss -> backward -> fused optimizer step. Returns `(loss, finite)`, two 0-dim tensors on the device.
    Nothing is read back to the host, so the CPU can queue the next steps while the GPU works. A non-finite
    loss still skips the step completely, decided on the device: the fused AdamW kernel takes a `found_inf`
    flag (the same input GradScaler uses) and leaves weights and optimizer state alone, and the BatchNorm
    running statistics, which the forward pass changes before the loss is known, are restored from a snapshot
    (a few KB).
    """

    def __init__(self, model, optimizer, scaler, seg_loss, cls_weight, device, dtype, compile=False, ds_weight=0.0):
        import torch

        self.model, self.optimizer, self.scaler, self.seg_loss = model, optimizer, scaler, seg_loss
        self.cls_weight, self.ds_weight, self.device, self.dtype = cls_weight, ds_weight, device, dtype
        self.with_aux = bool(ds_weight)  # a deep-supervision model resumed with weight 0 skips its aux heads
        self.forward = model
        if compile:
            try:
                self.forward = torch.compile(model)
            except Exception as exc:  # noqa: BLE001 - any backend problem: run eagerly
                print(f"warning: torch.compile unavailable ({exc}); running eagerly", file=sys.stderr)
        self.buffers = list(model.buffers())  # BatchNorm running mean/var and num_batches_tracked
        self.snapshot = [b.clone() for b in self.buffers]
        self.skips_on_device = bool(optimizer.defaults.get("fused"))

    def __call__(self, images, masks, labels, aug_cfg, param_gen, noise_gen):
        import torch
        import torch.nn.functional as F

        import augment
        import losses
        import utils

        x, y = augment.augment_batch(images, masks, aug_cfg, param_gen, noise_gen)
        x = x.contiguous(memory_format=torch.channels_last)
        torch._foreach_copy_(self.snapshot, self.buffers)
        with utils.autocast(self.device, self.dtype):
            try:
                seg_logits, cls_logits, *aux_logits = self.forward(x, with_aux=self.with_aux)
            except Exception as exc:  # noqa: BLE001 - torch.compile fails lazily, at the first call
                if self.forward is self.model:
                    raise
                print(f"warning: torch.compile failed ({type(exc).__name__}); running eagerly", file=sys.stderr)
                self.forward = self.model
                torch._foreach_copy_(self.buffers, self.snapshot)
                seg_logits, cls_logits, *aux_logits = self.model(x, with_aux=self.with_aux)
        aux_logits = aux_logits[0] if aux_logits else []  # the list is only returned when asked for
        loss = self.seg_loss(seg_logits, y)
        if aux_logits:  # deep supervision: each coarser output vs the mask average-pooled to it
            loss = loss + self.ds_weight * losses.deep_supervision_loss(self.seg_loss, aux_logits, y)
        if cls_logits is not None and self.cls_weight:
            loss = loss + self.cls_weight * F.cross_entropy(cls_logits.float(), labels)
        finite = torch.isfinite(loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():  # fp16: GradScaler sees the inf/NaN gradients and skips the step itself
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.skips_on_device:
            loss.backward()
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
            del self.optimizer.found_inf
        elif bool(finite):  # an unfused optimizer (MPS) cannot skip on the device: one host sync
            loss.backward()
            self.optimizer.step()
        torch._foreach_copy_(self.buffers, [torch.where(finite, b, s) for b, s in zip(self.buffers, self.snapshot)])
        return loss.detach(), finite


def validate(model, data, seg_loss, args, device, dtype) -> tuple[dict, float]:
    """One pass over the validation split: its summary at the original resolution (utils.evaluate) and the mean
    training loss (no augmentation) at the training size, from the same forward passes."""
    import torch
    import torch.nn.functional as F

    import utils

    total = torch.zeros((), device=device)  # summed on the device: one host sync at the end, not per batch
    masks, labels = data["masks"].to(device), data["labels"].to(device)  # no copy where already on the device

    def add_loss(start, seg_logits, cls_logits):
        nonlocal total
        n = seg_logits.shape[0]
        loss = seg_loss(seg_logits, masks[start:start + n])
        if cls_logits is not None and args.cls_weight:
            loss = loss + args.cls_weight * F.cross_entropy(cls_logits.float(), labels[start:start + n])
        total = total + loss.float() * n

    summary, _ = utils.evaluate(model, data, device, dtype, args.threshold, args.eval_batch_size, args.tta,
                                on_logits=add_loss)
    return summary, float(total) / max(1, len(data["names"]))


def main(argv=None) -> int:
    args = parse_args(argv)
    import dataset
    import utils

    try:
        return run(args)
    except (dataset.DataError, utils.CheckpointError, ValueError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # full disk, read-only output dir, ...
        print(f"error: {exc.strerror or exc} ({exc.filename or ''}); earlier checkpoints are intact",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
