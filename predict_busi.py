"""Segment breast-ultrasound lesions in new images with a trained BUSI U-Net.

    python predict_busi.py --input scans/ --output preds
    python predict_busi.py --input "scans/*.jpg" --output preds --threshold 0.4 --tta
    python predict_busi.py --checkpoint checkpoints/busi_unet_small.pt --input one_scan.png --output preds

For every input <stem>.<ext> the output folder receives <stem>_mask.png (8-bit, 0 = background, 255 = lesion, the
input's own width and height), <stem>_overlay.png (the scan with the predicted outline drawn on it), and one
predictions.csv for the whole run, listing the mask and overlay file of each input. When several inputs share a
stem (ignoring case), each keeps its extension: a.png -> a.png_mask.png, a.jpg -> a.jpg_mask.png; the same name
from two folders of a glob gets _2, _3, ... (a.png_2_mask.png). Files named X_mask.png or X_mask_N.png (ground
truth in the BUSI layout, dataset.MASK_RE), hidden files and non-image files in an input folder are skipped. A file
that cannot be read is reported on stderr and skipped; the exit code is then 1 (0 when every file was written, 2
when nothing could start: bad checkpoint, no inputs).
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dataset
import utils

ROOT = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "busi_unet_small.pt"
CSV_NAME = "predictions.csv"
CSV_FIELDS = ("file", "width", "height", "lesion_pixels", "lesion_fraction", "max_probability",
              "malignancy_probability", "predicted_class", "mask", "overlay")
MASK_SUFFIX, OVERLAY_SUFFIX = "_mask.png", "_overlay.png"
ORIENTATION_TAG = 0x0112  # EXIF; values 5-8 are a quarter turn (width and height swap)
OUTLINE_RGB = (255, 64, 0)  # orange-red: stands out on grey ultrasound and is told apart from cyan ground truth
# A chunk of inputs is decoded, predicted and written together. Besides --batch-size, a chunk stops growing at
# this many original pixels (~ 64 MB of grey uint8) so that a folder of huge scans never sits in memory at once.
CHUNK_PIXEL_BUDGET = 64_000_000
IO_THREADS = min(4, os.cpu_count() or 1)  # PIL releases the GIL while decoding/encoding PNGs


def default_threads() -> int:
    """PyTorch CPU threads: half the cores (at least 1, at most 8). The rest decode and write images; and when
    another job (a training run) keeps the cores busy, PyTorch's full-size thread pool slows down several times
    over (measured: 1.0 s instead of 0.03 s for one 128-px image on 2 busy cores)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


# --------------------------------------------------------------------------------------------------------------
# Finding the inputs
# --------------------------------------------------------------------------------------------------------------
def natural_key(path: Path) -> list:
    """Sort 'x (2).png' before 'x (10).png'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)] + [str(path)]


def _is_candidate(path: Path) -> bool:
    """An image file that is not ground truth (X_mask.png, X_mask_N.png: the loader's rule), hidden, or of
    another type."""
    name = path.name
    return (not name.startswith(".") and path.suffix.lower() in dataset.IMAGE_EXTENSIONS
            and dataset.MASK_RE.match(path.stem) is None and name.lower() not in dataset.IGNORED_NAMES
            and path.is_file())


def find_inputs(spec: str, output_dir: Path | None = None) -> list[Path]:
    """Expand --input: one file (taken as given), a folder (its images, not recursive) or a glob pattern.

    Overlays written by an earlier run into the same folder are not taken as new scans.
    """
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        candidates = [p for p in path.iterdir() if _is_candidate(p)]
    else:
        candidates = [Path(p) for p in glob.glob(spec) if _is_candidate(Path(p))]
    if output_dir is not None:
        out = output_dir.resolve()
        candidates = [p for p in candidates if not (p.stem.endswith("_overlay") and p.parent.resolve() == out)]
    return sorted(candidates, key=natural_key)


def output_stems(paths: list[Path]) -> list[str]:
    """One output stem per input, unique ignoring case (A_mask.png and a_mask.png are one file on macOS and
    Windows): the input's stem; its whole name when other inputs share the stem (a.png -> a.png, a.jpg -> a.jpg);
    then _2, _3, ... for the same name twice (a glob over several folders)."""
    shared = Counter(p.stem.casefold() for p in paths)
    bases = [p.name if shared[p.stem.casefold()] > 1 else p.stem for p in paths]
    reserved = {b.casefold() for b in bases}  # a suffixed name must not take a later input's own name
    taken: set[str] = set()
    stems = []
    for base in bases:
        stem, n = base, 1
        while stem.casefold() in taken or (n > 1 and stem.casefold() in reserved):
            n += 1
            stem = f"{base}_{n}"
        taken.add(stem.casefold())
        stems.append(stem)
    return stems


def output_names(stem: str) -> tuple[str, str]:
    return stem + MASK_SUFFIX, stem + OVERLAY_SUFFIX


# --------------------------------------------------------------------------------------------------------------
# Inference (shared with the GUI)
# --------------------------------------------------------------------------------------------------------------
def predict_images(model, images: list[np.ndarray], image_size: int, device: torch.device,
                   dtype: torch.dtype | None = None, batch_size: int = 16, tta: bool = False):
    """Yield (probability map [H,W] float32 on the CPU at each image's own size, class probabilities [3] or None).

    `images` are grey uint8 HxW arrays of any size; they are squashed to the model's square input as in training.
    """
    if not images:
        return
    batch = torch.from_numpy(np.stack([dataset.resize_image(img, image_size) for img in images]))[:, None]
    i = 0
    for probs, cls in utils.predict_batches(model, batch, device, dtype, batch_size, tta):
        for j in range(probs.shape[0]):
            h, w = images[i].shape
            prob = utils.probs_to_original(probs[j], h, w).cpu()
            yield prob, (None if cls is None else cls[j].float().cpu())
            i += 1


def outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Pixels just outside `mask` (square dilation minus the mask), `thickness` pixels wide; bool HxW."""
    if not mask.any():
        return np.zeros_like(mask)
    # A square dilation is separable: OR-ing shifted copies along rows, then along columns, costs 4 * thickness
    # whole-array operations instead of (2 * thickness + 1) ** 2.
    rows = mask.copy()
    for s in range(1, thickness + 1):
        rows[s:] |= mask[:-s]
        rows[:-s] |= mask[s:]
    grown = rows.copy()
    for s in range(1, thickness + 1):
        grown[:, s:] |= rows[:, :-s]
        grown[:, :-s] |= rows[:, s:]
    return grown & ~mask


def overlay_image(image: np.ndarray, mask: np.ndarray, colour=OUTLINE_RGB) -> np.ndarray:
    """The grey image as RGB uint8 with the mask's outline drawn in `colour` (thicker on bigger images)."""
    thickness = max(1, round(max(image.shape) / 300))
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    rgb[outline(mask, thickness)] = colour
    return rgb


# --------------------------------------------------------------------------------------------------------------
# The batch run
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    """One written prediction: a row of predictions.csv."""

    file: str
    width: int
    height: int
    lesion_pixels: int
    max_probability: float
    malignancy_probability: float | None
    predicted_class: str | None
    mask: str = ""
    overlay: str = ""

    def row(self) -> list:
        fraction = self.lesion_pixels / (self.width * self.height)
        return [self.file, self.width, self.height, self.lesion_pixels, f"{fraction:.6f}",
                f"{self.max_probability:.4f}",
                "" if self.malignancy_probability is None else f"{self.malignancy_probability:.4f}",
                self.predicted_class or "", self.mask, self.overlay]


def peek_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, from the file header (PIL decodes no pixels for it): an EXIF orientation of
    5-8 swaps them, as the loader's EXIF transpose does."""
    with Image.open(path) as im:
        width, height = im.size
        # PNG: an eXIf chunk after the pixels is only found by decoding them (getexif() would); use what the
        # header gave. The pixel count, all the chunk budget needs, is the same either way.
        if im.format == "PNG" and "exif" not in im.info:
            return width, height
        orientation = im.getexif().get(ORIENTATION_TAG, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _chunks(paths: list[Path], stems: list[str], batch_size: int):
    """Group inputs into chunks of at most `batch_size` files and (roughly) CHUNK_PIXEL_BUDGET pixels.

    The pixel count comes from the file header (peek_size); unreadable files count as 0 and fail later with a
    proper message.
    """
    chunk, pixels = [], 0
    for path, stem in zip(paths, stems):
        try:
            width, height = peek_size(path)
            n = width * height
        except Exception:  # noqa: BLE001 - any failure is reported by dataset.load_image below
            n = 0
        if chunk and (len(chunk) >= batch_size or pixels + n > CHUNK_PIXEL_BUDGET):
            yield chunk
            chunk, pixels = [], 0
        chunk.append((path, stem))
        pixels += n
    if chunk:
        yield chunk


def _write_outputs(image: np.ndarray, prob: np.ndarray, cls, threshold: float, stem: str, out_dir: Path,
                   display_name: str) -> Result:
    """Threshold one probability map, write its mask and overlay PNGs; runs in an I/O thread (numpy only)."""
    mask = prob > threshold
    mask_name, overlay_name = output_names(stem)
    # Low zlib levels: 3-4x faster to write than the default, and the files are still small (masks are flat).
    Image.fromarray(mask.astype(np.uint8) * 255).save(out_dir / mask_name, compress_level=1)
    Image.fromarray(overlay_image(image, mask)).save(out_dir / overlay_name, compress_level=3)
    malignancy = predicted = None
    if cls is not None:
        malignancy = float(utils.malignancy_probability(cls))
        predicted = dataset.CLASSES[int(cls.argmax())]
    return Result(display_name, image.shape[1], image.shape[0], int(mask.sum()), float(prob.max()),
                  malignancy, predicted, mask_name, overlay_name)


def run(paths: list[Path], model, image_size: int, device: torch.device, threshold: float, out_dir: Path,
        batch_size: int = 16, tta: bool = False, progress: bool = True) -> tuple[list[Result], list[str]]:
    """Predict every path, write its mask and overlay, and predictions.csv (row by row, so that an interrupted
    run keeps the rows of the files it wrote). Returns the results and one message per unreadable file."""
    from tqdm import tqdm

    dtype = utils.inference_dtype(device)
    stems = output_stems(paths)
    results: list[Result] = []
    failures: list[str] = []
    bar = tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress, dynamic_ncols=True)

    def load(path: Path):
        try:
            return dataset.load_image(path), None
        except dataset.DataError as exc:
            return None, str(exc)

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool, open(out_dir / CSV_NAME, "w", newline="") as table:
        writer = csv.writer(table)
        writer.writerow(CSV_FIELDS)
        for chunk in _chunks(paths, stems, batch_size):
            loaded = list(pool.map(lambda item: load(item[0]), chunk))
            good = []
            for (path, stem), (image, error) in zip(chunk, loaded):
                if error is not None:
                    failures.append(error)
                    bar.write(f"error: {error}", file=sys.stderr)
                else:
                    good.append((path, stem, image))
            predictions = list(predict_images(model, [g[2] for g in good], image_size, device, dtype,
                                              batch_size, tta))
            jobs = [pool.submit(_write_outputs, image, prob.numpy(), cls, threshold, stem, out_dir, path.name)
                    for (path, stem, image), (prob, cls) in zip(good, predictions)]
            del loaded, good, predictions  # the chunk's images now live only until their files are written
            for job in jobs:
                results.append(job.result())
                writer.writerow(results[-1].row())
            table.flush()
            bar.update(len(chunk))
    bar.close()
    return results, failures


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Segment breast-ultrasound lesions in new images with a trained BUSI U-Net. Writes "
                    "<stem>_mask.png (0/255, the input's size), <stem>_overlay.png (predicted outline on the scan) "
                    "and predictions.csv (lesion size, max probability, malignancy probability, mask and overlay "
                    "file names) into --output. Inputs that share a stem keep their extension (a.png -> "
                    "a.png_mask.png, a.jpg -> a.jpg_mask.png); the same name from two folders gets _2, _3, ...",
        epilog="Exit codes: 0 all written; 1 some input files could not be read (named on stderr, the rest are "
               "written); 2 bad checkpoint, bad option or no input found.",
    )
    default_checkpoint = DEFAULT_CHECKPOINT.relative_to(ROOT) if Path.cwd() == ROOT else DEFAULT_CHECKPOINT
    p.add_argument("--checkpoint", default=str(default_checkpoint), help="trained model or ensemble (.pt); default: %(default)s")
    p.add_argument("--input", required=True,
                   help="an image file, a folder (its images; *_mask* ground-truth files are skipped) or a quoted "
                        "glob pattern such as 'scans/*.png'")
    p.add_argument("--output", required=True, help="folder for the masks, overlays and predictions.csv")
    p.add_argument("--threshold", type=utils.probability, default=None,
                   help="lesion probability threshold (default: the checkpoint's, else 0.5)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps; default: %(default)s")
    p.add_argument("--batch-size", type=utils.positive_int, default=16,
                   help="images per forward pass and per chunk held in memory; default: %(default)s")
    p.add_argument("--threads", type=utils.positive_int, default=default_threads(),
                   help="CPU threads for inference; default: %(default)s (half the cores: an oversubscribed CPU "
                        "runs PyTorch many times slower)")
    p.add_argument("--tta", action="store_true", help="average with the left-right flipped prediction")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.output)
    torch.set_num_threads(args.threads)
    try:
        device = utils.pick_device(args.device)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    paths = find_inputs(args.input, out_dir)
    if not paths:
        what = "folder has no images" if Path(args.input).is_dir() else "no file matches"
        print(f"error: {what}: {args.input}", file=sys.stderr)
        return 2
    try:
        model, state = utils.load_model(args.checkpoint, device)
        out_dir.mkdir(parents=True, exist_ok=True)
    except utils.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # e.g. the device ran out of memory while taking the weights
        print(f"error: cannot load {args.checkpoint} on {device}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot create the output folder {out_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    config = state.get("config") or {}
    image_size = int(config.get("image_size", 256))
    threshold = args.threshold if args.threshold is not None else float(config.get("threshold", 0.5))
    try:
        results, failures = run(paths, model, image_size, device, threshold, out_dir, args.batch_size, args.tta,
                                progress=not args.quiet)
    except OSError as exc:  # full disk, read-only folder: nothing later would succeed either
        print(f"error: cannot write to {out_dir}: {exc.strerror or exc} ({exc.filename or ''})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the files written so far are in {out_dir}/ (and listed in {CSV_NAME})",
              file=sys.stderr)
        return 130
    print(f"{len(results)} of {len(paths)} images -> {out_dir}/ (masks, overlays, {CSV_NAME}; threshold "
          f"{threshold:g})" + (f"; {len(failures)} could not be read" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
