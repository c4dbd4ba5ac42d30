"""Segment breast-ultrasound lesions in new images with a trained BUSI U-Net.

    python predict_busi.py --input scans/ --output preds
    python predict_busi.py --input "scans/*.jpg" --output preds --threshold 0.4 --tta
    python predict_busi.py --checkpoint checkpoints/busi_busbra_lite0_192.pt --input one_scan.png --output preds
    python predict_busi.py --input scans/ more/*.png --input one_scan.png --output preds
    python predict_busi.py --input dicom_export/ --output preds            # DICOM files, cine loops: sizes in mm

--input takes one or more files, folders and glob patterns (repeat it, or list several after it; an unquoted glob
is expanded by the shell); all are predicted, a file reached twice once, and a spec that matches nothing is an
error that names it.

For every input <stem>.<ext> the output folder receives <stem>_pred.png (8-bit, 0 = background, 255 = lesion,
the input's own width and height as displayed), <stem>_overlay.png (the scan with the predicted outline drawn on
it), and one predictions.csv for the whole run, listing exactly the mask and overlay files written. When several
inputs share a stem (ignoring case), each keeps its extension: a.png -> a.png_pred.png, a.jpg -> a.jpg_pred.png;
the same name from two folders of a glob gets _2, _3, ... (a.png_2_pred.png). DICOM files (dicom_io.py: found by
content, so extension-less files too) give one output per frame, <stem>_f003_pred.png, or only --frame N; their
ultrasound region alone is predicted, and sizes come in mm where the file records its pixel spacing (or
--pixel-spacing gives it). Files named X_mask.png or
X_mask_N.png (ground truth in the BUSI layout, image_io.MASK_RE), hidden files and non-image files in an input
folder are skipped. A file that cannot be read is reported on stderr and skipped; the exit code is then 1 (0 when
every file was written, 2 when nothing could start: bad checkpoint, no inputs, a refused output folder; 2 also
when the model's outputs are not finite, NaN or inf: nothing of that chunk is written, and a run that wrote
nothing leaves no predictions.csv and no folder it created).

The output folder: no file that this run did not create is ever overwritten, except, with --overwrite, the files
an earlier run of this script listed in the folder's predictions.csv (ground truth never is: an output folder
that holds a file with one of this run's output names, which no predictions.csv there lists, is refused). Without
--overwrite, a folder holding predictions.csv or any of this run's output names is refused. Every file is
written to a temp file in the same folder and renamed into place, so no file is ever seen half-written.
SIGINT (Ctrl-C) / SIGTERM: no new image is started, those in flight are finished, predictions.csv then lists
exactly the files written, and the exit code is 130.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import signal
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import storage
import utils  # (torch-free: --help is answered from it before torch loads, below)
from utils import DEFAULT_CHECKPOINT, default_threads


# --------------------------------------------------------------------------------------------------------------
# Command line (first, so that --help needs nothing heavier than argparse)
# --------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Segment breast-ultrasound lesions in new images with a trained BUSI U-Net. Research use "
                    "only: not a medical device, not for clinical decisions (the shipped model's card: "
                    "checkpoints/README.md). Writes "
                    "<stem>_pred.png (0/255, the input's displayed size), <stem>_overlay.png (predicted outline on "
                    "the scan) and predictions.csv (lesion size in pixels, and in mm where the pixel spacing is "
                    "known, max probability, malignancy probability, a check column "
                    "flagging a class head that says normal beside a non-empty mask, `trust` (the fitted "
                    "probability that the outline is right) and `review` (trust below the cut chosen on "
                    "validation: look at these first), `presence_probability` and `no_lesion` (the 'no lesion' gate "
                    "emptied the mask of a scan it judged lesion-free), and the "
                    "mask and overlay file names: exactly the files written) into --output. A checkpoint without "
                    "these fitted parts gets them from `python fit_trust.py`. Inputs that share a "
                    "stem keep their extension (a.png -> a.png_pred.png, a.jpg -> a.jpg_pred.png); the same name "
                    "from two folders gets _2, _3, ... Every file is written under a temp name and renamed into "
                    "place. DICOM files (also without an extension) are read too: every frame of a cine loop, "
                    "the ultrasound region alone predicted; no patient data is copied to any output. "
                    "Ctrl-C / SIGTERM: the images in flight are finished, predictions.csv lists exactly the "
                    "files written, exit code 130.",
        epilog="Exit codes: 0 all written; 1 some input files could not be read (named on stderr, the rest are "
               "written); 2 bad checkpoint, bad option, an --input that matches nothing, a refused --output folder, "
               "or a model whose outputs are not finite (NaN or inf); "
               "130 interrupted.",
    )
    p.add_argument("--checkpoint", default=str(utils.shown_path(DEFAULT_CHECKPOINT)), help="trained model or ensemble (.pt); default: %(default)s")
    p.add_argument("--input", required=True, action="extend", nargs="+", metavar="INPUT",
                   help="one or more image files, folders (their images; ground-truth files X_mask.png, "
                        "X_mask_N.png are skipped) or glob patterns such as 'scans/*.png' (quoted: expanded here; "
                        "unquoted: by the shell); repeat it (--input a --input b) or list several (--input a b). "
                        "All are predicted, a file reached twice once; one that matches nothing is an error")
    p.add_argument("--output", required=True,
                   help="folder for the masks, overlays and predictions.csv; a file this run did not create is "
                        "never overwritten, and a folder holding an earlier run's outputs (predictions.csv, or "
                        "files with this run's output names) is refused unless --overwrite is given")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier run that are listed in the output folder's "
                        "predictions.csv and that this run writes again; predictions.csv then lists exactly this "
                        "run's files (the earlier run's other files stay, unlisted). A file no predictions.csv "
                        "lists, e.g. ground truth X_mask.png when --output is the input folder, is never replaced: "
                        "such a folder is refused")
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
    p.add_argument("--gate", choices=("auto", "apply", "mark"), default="auto",
                   help="the 'no lesion' gate: auto = empty the mask of a scan it judges lesion-free only where the "
                        "gate was fitted on these scans' own site (fit_trust.py --data-dir SITE, or a site run), "
                        "else mark it 'likely lesion-free' and keep the mask; apply = always empty it; mark = never; "
                        "default: %(default)s")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                   help="what runs the model: onnx = onnxruntime on the CPU (the checkpoint exported to ONNX on first "
                        "use and cached beside it; --checkpoint may also be such an .onnx file), torch = PyTorch; "
                        "auto = onnx on the CPU where onnxruntime and onnx are installed (faster: "
                        "docs/performance.md), else torch; default: %(default)s")
    p.add_argument("--frame", type=utils.positive_int, default=None, metavar="N",
                   help="predict only frame N (1-based) of each multi-frame DICOM file (a cine loop); default: "
                        "every frame, written as <stem>_f001_pred.png, ... with the frame number in the CSV")
    p.add_argument("--pixel-spacing", type=utils.positive_float, default=None, metavar="MM",
                   help="the size of a pixel in mm (square pixels), for scans whose file records none (PNG, JPEG, "
                        "... exports): adds the lesion's area in mm^2 and its two diameters in mm to the CSV. A DICOM "
                        "file's own spacing (its ultrasound region's, else Pixel Spacing) is used where it has one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


if __name__ == "__main__":
    utils.answer_help_early(build_parser)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import checkpoints  # noqa: E402
import image_io
import prediction_table
import dicom_io  # noqa: E402
import metrics  # noqa: E402
import onnx_backend  # noqa: E402
import trust  # noqa: E402
from dicom_io import gather_inputs  # noqa: E402
from inference import Prediction, contradiction, predict_scans  # noqa: E402

CSV_NAME, CSV_FIELDS = prediction_table.PREDICTIONS_CSV, prediction_table.PREDICTIONS_FIELDS  # (the format: dataset.py)
MODEL_CARD = utils.shown_path(DEFAULT_CHECKPOINT.parent / "README.md")
NO_LESION = "mask emptied"  # the `no_lesion` column: the "no lesion" gate judged the scan lesion-free
LIKELY_LESION_FREE = "likely lesion-free"  # ... where the gate does not apply (trust.gate_applies): mask kept
OUT_OF_RANGE = "OUT OF RANGE"  # the `out_of_range` column: unlike the scans the model was fitted on
ADAPT_HINT = ("the outlines, the 'no lesion' gate and the trust score were fitted on other hospitals' scans: adapt "
              "the model to these scans with  python adapt.py --checkpoint CKPT --scans FOLDER --output NEW.pt  "
              "(README, 'Your own scans')")
# _pred, never _mask: a prediction copied beside its scan must not pass for ground truth (image_io.MASK_RE)
MASK_SUFFIX, OVERLAY_SUFFIX = (stem + ".png" for stem in prediction_table.PREDICTION_STEMS)
OUTLINE_RGB = (255, 64, 0)  # orange-red: stands out on grey ultrasound and is told apart from cyan ground truth
# A chunk of inputs is decoded, predicted and written together. Besides --batch-size, a chunk stops growing at
# this many original pixels (~ 64 MB of grey uint8) so that a folder of huge scans never sits in memory at once.
CHUNK_PIXEL_BUDGET = 64_000_000
IO_THREADS = min(4, os.cpu_count() or 1)  # PIL releases the GIL while decoding/encoding PNGs


def _stem(path: Path) -> str:
    """The file's stem; the whole name of a DICOM file named without a DICOM extension (1.2.840.1234: its last part
    is not an extension)."""
    known = path.suffix.lower() in utils.IMAGE_EXTENSIONS or dicom_io.is_dicom_name(path)
    return path.name if not known and dicom_io.is_dicom(path) else path.stem


def output_stems(paths: list[Path], frames: list[int | None] | None = None) -> list[str]:
    """One output stem per input, unique ignoring case (A_pred.png and a_pred.png are one file on macOS and
    Windows): the input's stem; its whole name when other inputs share the stem (a.png -> a.png, a.jpg -> a.jpg);
    _f003 after it for frame 3 of a multi-frame file (`frames`: one frame number or None per entry of `paths`, in
    which a file then stands once per frame); then _2, _3, ... for the same name twice (a glob over several
    folders)."""
    frames = frames or [None] * len(paths)
    stems_of = {p: _stem(p) for p in paths}
    shared = Counter(stem.casefold() for stem in stems_of.values())
    width = max([3] + [len(str(f)) for f in frames if f is not None])
    bases = [(p.name if shared[stems_of[p].casefold()] > 1 else stems_of[p]) + ("" if f is None else f"_f{f:0{width}d}")
             for p, f in zip(paths, frames)]
    reserved = {b.casefold() for b in bases}  # a suffixed name must not take a later input's own name
    taken: set[str] = set()
    stems = []
    for base in bases:
        stem, n = base, 1
        while stem.casefold() in taken or (n > 1 and stem.casefold() in reserved):
            n += 1
            stem = f"{base}_{n}"
        taken.add(stem.casefold())
        stems.append(fitting(stem))
    return stems


NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


def fitting(stem: str) -> str:
    """`stem`, or where its longest output name (<stem>_overlay.png) would pass NAME_MAX bytes, its start with a
    hash of the whole (~1a2b3c4d): a long but legal scan name still gets its files, and two such names stay two."""
    if len(os.fsencode(stem + OVERLAY_SUFFIX)) <= NAME_MAX:
        return stem
    digest = "~" + hashlib.sha1(os.fsencode(stem)).hexdigest()[:8]
    room = NAME_MAX - len(os.fsencode(OVERLAY_SUFFIX + digest))
    short = os.fsencode(stem)[:room].decode(errors="ignore")  # whole characters only
    return short + digest


def display_names(paths: list[Path]) -> list[str]:
    """The `file` column: each input's path relative to the folder that holds them all (its name when they share
    one folder), so that a.png from two folders gives two rows one can tell apart; a symbolic link is named as
    given, not by its target."""
    given = [p.parent.resolve() / p.name for p in paths]  # a linked file keeps the name it was given, not its target's
    common = Path(os.path.commonpath([g.parent for g in given])) if given else Path()
    return [str(g.relative_to(common)) for g in given]


def output_names(stem: str) -> tuple[str, str]:
    return stem + MASK_SUFFIX, stem + OVERLAY_SUFFIX


shown = utils.printable  # a file name or message on one printable line (\xff, \n for a newline), never a crash


# --------------------------------------------------------------------------------------------------------------
# The output folder: what may be written
# --------------------------------------------------------------------------------------------------------------
class RefusedOutput(Exception):
    """The output folder would lose a file; the message says which and what to do."""


class NonFiniteOutput(Exception):
    """The model gave NaN or inf for an image (damaged weights); the message names the image."""


def earlier_outputs(table: Path) -> set[str]:
    """The files an earlier run listed in `table` (its predictions.csv), as they appear in a CSV
    (prediction_table.predictions_listed). Raises RefusedOutput for a file of that name that is not such a table: it is
    someone else's.
    """
    try:
        return prediction_table.predictions_listed(table)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise RefusedOutput(f"{shown(table)} exists and is not a table written by predict_busi.py; it is never "
                            f"overwritten: choose another --output") from exc


def check_output_folder(out_dir: Path, stems: list[str], overwrite: bool) -> set[str]:
    """The rule for --output (see the module docstring); returns the existing names this run may replace.

    Raises RefusedOutput before anything is written.
    """
    if not out_dir.is_dir():
        return set()
    table = out_dir / CSV_NAME
    has_table = os.path.lexists(table)
    listed = earlier_outputs(table) if has_table else set()
    labels = sorted(p.name for p in out_dir.iterdir() if image_io.MASK_RE.match(p.stem) and
                    p.suffix.lower() in utils.IMAGE_EXTENSIONS and shown(p.name) not in listed)
    if labels:  # a data folder (an older predict's X_mask.png, listed in its table, is not ground truth)
        raise RefusedOutput(f"{shown(out_dir)} holds ground truth ({shown(labels[0])}): predictions are never written "
                            f"beside labels, and a label is never overwritten; choose another --output")
    names = [n for stem in stems for n in output_names(stem)]
    existing = [n for n in names if os.path.lexists(out_dir / n)]
    if not existing and not has_table:
        return set()
    foreign = [n for n in existing if shown(n) not in listed]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise RefusedOutput(f"{shown(out_dir / foreign[0])}{more} exists and was not written by predict_busi.py "
                            f"(ground truth?); it is never overwritten: choose another --output")
    if not overwrite:
        what = f"{CSV_NAME} and {len(existing)} of this run's output files" if existing else CSV_NAME
        raise RefusedOutput(f"{shown(out_dir)} holds an earlier run's outputs ({what}); pass --overwrite to "
                            f"replace them or choose another --output")
    return set(existing) | ({CSV_NAME} if has_table else set())


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------
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
    trust: float | None = None  # the probability that the outline is right (trust.py); None: not available
    review: bool = False  # trust below the checkpoint's review threshold
    presence_probability: float | None = None  # the fitted probability that a lesion is present; None: no gate
    gated: bool = False  # the "no lesion" gate emptied the mask
    lesion_free: bool = False  # the gate judged it lesion-free but does not apply here: the mask is kept
    familiarity: float | None = None  # <= 1: like the scans the model was fitted on; None: not fitted
    out_of_range: bool = False  # familiarity above 1
    frame: int | None = None  # the frame of a multi-frame DICOM file
    region: tuple[int, int, int, int] | None = None  # the ultrasound region predicted: (x0, y0, x1, y1)
    spacing: tuple[float, float] | None = None  # (x, y) mm per pixel
    spacing_source: str = dicom_io.NO_SPACING_IMAGE
    size: metrics.LesionSize | None = None  # in mm; None without spacing or for an empty mask

    @classmethod
    def of(cls, prediction: Prediction, file: str, mask: str, overlay: str) -> Result:
        """The row of a written prediction (its figures only: the maps are not kept)."""
        height, width = prediction.probability.shape
        return cls(file, width, height, int(prediction.mask.sum()), float(prediction.probability.max()),
                   prediction.malignancy_probability, prediction.predicted_class, mask, overlay, prediction.trust,
                   bool(prediction.review), prediction.presence_probability, prediction.gated,
                   prediction.marked_only, prediction.familiarity, bool(prediction.out_of_range), prediction.frame,
                   prediction.region, prediction.spacing_mm, prediction.spacing_source, prediction.size_mm)

    def row(self) -> list:
        fraction = self.lesion_pixels / (self.width * self.height)
        return [shown(self.file), self.width, self.height, self.lesion_pixels, f"{fraction:.6f}",
                f"{self.max_probability:.4f}",
                "" if self.malignancy_probability is None else f"{self.malignancy_probability:.4f}",
                self.predicted_class or "", shown(self.mask), shown(self.overlay),
                contradiction(self.predicted_class, bool(self.lesion_pixels)),
                "" if self.trust is None else f"{self.trust:.4f}", "REVIEW" if self.review else "",
                "" if self.presence_probability is None else f"{self.presence_probability:.4f}",
                NO_LESION if self.gated else LIKELY_LESION_FREE if self.lesion_free else ""] + self.size_columns() + \
            ["" if self.familiarity is None else f"{self.familiarity:.3f}", OUT_OF_RANGE if self.out_of_range else ""]

    def size_columns(self) -> list:
        """frame, region, spacing and the sizes in mm: empty where unknown (spacing_source says why); an empty
        mask measures 0."""
        region = "" if self.region is None else ",".join(map(str, self.region))
        spacing = "" if self.spacing is None else f"{self.spacing[0]:.6g},{self.spacing[1]:.6g}"
        size = self.size
        if self.spacing is None:
            sizes = ["", "", ""]
        elif size is None:
            sizes = ["0.00", "0.00", "0.00"]
        else:
            sizes = [f"{size.area:.2f}", f"{size.longest:.2f}", f"{size.perpendicular:.2f}"]
        return ["" if self.frame is None else self.frame, region, spacing, self.spacing_source, *sizes]


def peek_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, from the file header (PIL decodes no pixels for it): an EXIF orientation of
    5-8 swaps them, as the loader's EXIF transpose does. A DICOM file's frame size."""
    if dicom_io.is_dicom(path):
        header = dicom_io.read_header(path)
        return header.columns, header.rows
    with Image.open(path) as im:
        width, height = im.size
        # PNG: an eXIf chunk after the pixels is only found by decoding them (getexif() would); use what the
        # header gave. The pixel count, all the chunk budget needs, is the same either way.
        if im.format == "PNG" and "exif" not in im.info:
            return width, height
        orientation = image_io.exif_orientation(im)  # the loader's reading (a damaged EXIF block: none)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _chunks(paths: list[Path], stems: list[str], batch_size: int):
    """Group inputs into chunks of (index, path, stem), at most `batch_size` files and (roughly)
    CHUNK_PIXEL_BUDGET pixels.

    The pixel count comes from the file header (peek_size); unreadable files count as 0 and fail later with a
    proper message.
    """
    chunk, pixels = [], 0
    for index, (path, stem) in enumerate(zip(paths, stems)):
        try:
            width, height = peek_size(path)
            n = width * height
        except Exception:  # noqa: BLE001 - any failure is reported by image_io.load_image below
            n = 0
        if chunk and (len(chunk) >= batch_size or pixels + n > CHUNK_PIXEL_BUDGET):
            yield chunk
            chunk, pixels = [], 0
        chunk.append((index, path, stem))
        pixels += n
    if chunk:
        yield chunk


def _check_finite(good: list, predictions: list, written: int) -> None:
    """Raise NonFiniteOutput, naming the first image whose probability map or class probabilities hold NaN or
    inf: its empty mask and `nan` row would pass for a prediction."""
    for (_, path, _, _), prediction in zip(good, predictions):
        classes = prediction.class_probabilities
        if not (bool(np.isfinite(prediction.probability).all())
                and (classes is None or all(math.isfinite(v) for v in classes.values()))):
            raise NonFiniteOutput(f"the model's outputs are not finite (NaN or inf) for {shown(path)} (damaged "
                                  f"weights?); " + (f"{CSV_NAME} lists the {written} images written before it"
                                                    if written else "nothing was written"))


def _write_outputs(image: np.ndarray, prediction: Prediction, stem: str, out_dir: Path, display_name: str,
                   replaceable: set[str] = frozenset()) -> Result:
    """Write one prediction's mask (empty where the "no lesion" gate says so) and overlay PNGs (atomically, both
    or neither); runs in an I/O thread (numpy only)."""
    mask = prediction.mask
    mask_name, overlay_name = output_names(stem)
    mask_png = Image.fromarray(mask.astype(np.uint8) * 255)
    overlay_png = Image.fromarray(overlay_image(image, mask))
    # Low zlib levels: 3-4x faster to write than the default, and the files are still small (masks are flat).
    storage.atomic_write_all([(out_dir / mask_name, lambda f: mask_png.save(f, format="PNG", compress_level=1)),
                            (out_dir / overlay_name, lambda f: overlay_png.save(f, format="PNG", compress_level=3))],
                           replaceable)
    return Result.of(prediction, display_name, mask_name, overlay_name)


def _load(path: Path, frame: int | None = None,
          pixel_spacing: float | None = None) -> tuple[dicom_io.Scan | None, str | None]:
    """(the scan: an image file, or frame `frame` of a DICOM file, None), or (None, why it cannot be read)."""
    try:
        return dicom_io.load_scan(path, frame, pixel_spacing), None
    except utils.DataError as exc:
        return None, shown(exc)


def expand_frames(paths: list[Path], frame: int | None = None) -> tuple[list[Path], list[int | None], list[str]]:
    """One entry per scan to predict: (paths, frame numbers, notes). An image file and a single-frame DICOM file
    stand once (frame None); a multi-frame DICOM file once per frame, or once for `frame`. A note, one line per
    file, says what in a file is not used (a region outside the image, a spacing of 0). A DICOM file whose
    header cannot be read stands once and fails, with its reason, when it is loaded."""
    out_paths, frames, notes = [], [], []
    for path in paths:
        try:
            header = dicom_io.read_header(path) if dicom_io.is_dicom(path) else None
        except utils.DataError:
            header = None
        if header is not None and header.note:
            notes.append(f"note: {shown(path)}: {header.note}")
        if header is None or header.frames == 1:
            out_paths.append(path)
            frames.append(None)
        else:
            numbers = [frame] if frame is not None else range(1, header.frames + 1)
            out_paths += [path] * len(numbers)
            frames += list(numbers)
    return out_paths, frames, notes


def run(paths: list[Path], loaded: checkpoints.LoadedModel, device: torch.device, out_dir: Path,
        batch_size: int = 16, tta: bool = False, progress: bool = True, replaceable: set[str] = frozenset(),
        stop: threading.Event | None = None, frames: list[int | None] | None = None,
        pixel_spacing: float | None = None, gate_mode: str = "auto") -> tuple[list[Result], list[str]]:
    """Predict every path with `loaded` (at its threshold), write its mask and overlay, and predictions.csv.
    Returns the results (in input order) and one message per unreadable file. A fitted trust entry adds the trust
    and review columns.
    `frames` (expand_frames) gives each entry's frame of a multi-frame DICOM file; `pixel_spacing` (mm) stands in
    where a file records none.

    predictions.csv is rewritten (atomically) after every chunk and on the way out, whatever the reason: it always
    lists exactly the files written. Once `stop` is set, no new chunk is started; the one in flight is finished.
    Only names in `replaceable` (checked by check_output_folder) may replace existing files. Raises
    NonFiniteOutput, before anything of that chunk is written, when the model's outputs are not finite; when
    nothing was written, the header-only predictions.csv is removed too.
    """
    from tqdm import tqdm

    dtype = utils.inference_dtype(device)
    stop = stop or threading.Event()
    frames = frames or [None] * len(paths)
    stems, names = output_stems(paths, frames), display_names(paths)
    done: dict[int, Result] = {}  # input index -> written; filled by the I/O threads once both files are in place
    rows: dict[int, list] = {}  # input index -> its row of the table
    failures: list[str] = []
    table = out_dir / CSV_NAME
    bar = tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress or not utils.interactive(),
               dynamic_ncols=True)

    def write(index: int, *args) -> None:
        result = _write_outputs(*args, replaceable)
        rows[index] = result.row()
        done[index] = result

    table_is_ours = False  # once written by this run, the table may be replaced

    def save_table() -> None:
        nonlocal table_is_ours
        # UTF-8 whatever the file names: the rows hold them as shown()
        storage.write_csv(table, CSV_FIELDS, [rows[i] for i in sorted(done)],
                        replace=table_is_ours or CSV_NAME in replaceable)
        table_is_ours = True

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        try:
            save_table()  # the header now: no earlier run's rows stay, and a read-only folder fails here
            for chunk in _chunks(paths, stems, batch_size):
                if stop.is_set():
                    break
                decoded = list(pool.map(lambda item: _load(item[1], frames[item[0]], pixel_spacing), chunk))
                good = []
                for (index, path, stem), (image, error) in zip(chunk, decoded):
                    if error is not None:
                        failures.append(error)
                        bar.write(f"error: {error}", file=sys.stderr)
                    else:
                        good.append((index, path, stem, image))
                if stop.is_set():
                    break  # drop the decoded images: nothing of theirs was written
                predictions = list(predict_scans(loaded, [g[3] for g in good], device, dtype, batch_size, tta,
                                                 gate_mode))
                _check_finite(good, predictions, len(done))
                jobs = [pool.submit(write, index, scan.image, prediction, stem, out_dir, names[index])
                        for (index, path, stem, scan), prediction in zip(good, predictions)]
                del decoded, good, predictions  # the chunk's images now live only until their files are written
                for job in jobs:
                    job.result()
                save_table()
                bar.update(len(chunk))
        except BaseException as exc:
            pool.shutdown(wait=True)  # the writes in flight end (each one atomic), then the table lists them
            with contextlib.suppress(OSError):
                if isinstance(exc, NonFiniteOutput) and not done:
                    table.unlink()  # its header only: a run that wrote nothing leaves nothing
                elif table_is_ours:
                    save_table()
            raise
        finally:
            bar.close()
    return [done[i] for i in sorted(done)], failures


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """While inside: SIGINT and SIGTERM set `stop` (the run then ends cleanly) instead of killing it mid-file."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------------------------
# The command (its parser is at the top)
# --------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.output)
    torch.set_num_threads(args.threads)
    skipped = {"earlier": [], "broken": []}
    try:
        device = utils.pick_device(args.device)
        paths = gather_inputs(args.input, skipped)
    except ValueError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if skipped["earlier"]:
        print(f"note: {len(skipped['earlier'])} file(s) skipped as an earlier run's outputs, not scans: "
              + ", ".join(skipped["earlier"][:5]) + (", ..." if len(skipped["earlier"]) > 5 else ""), file=sys.stderr)
    paths, frames, notes = expand_frames(paths, args.frame)
    try:  # before any work: a refused folder costs nothing and changes nothing
        replaceable = check_output_folder(out_dir, output_stems(paths, frames), args.overwrite)
    except RefusedOutput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # removed again if nothing is written
    try:
        loaded = onnx_backend.load(args.checkpoint, device, args.backend).at_threshold(args.threshold)
        out_dir.mkdir(parents=True, exist_ok=True)
    except checkpoints.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # e.g. the device ran out of memory while taking the weights
        print(f"error: cannot load {args.checkpoint} on {device}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot create the output folder {shown(out_dir)}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: nothing written", file=sys.stderr)
        return 130
    if loaded.why_no_trust:
        print(f"warning: {shown(args.checkpoint)}: {loaded.why_no_trust}", file=sys.stderr)
    elif loaded.trust.get("no_right_outline"):
        print(f"warning: {shown(args.checkpoint)}: {trust.NO_RIGHT_OUTLINE}", file=sys.stderr)
    stop = threading.Event()
    try:
        with stop_on_signals(stop):
            for note in notes:
                print(note, file=sys.stderr)
            results, failures = run(paths, loaded, device, out_dir, args.batch_size, args.tta,
                                    progress=not args.quiet, replaceable=replaceable, stop=stop, frames=frames,
                                    pixel_spacing=args.pixel_spacing, gate_mode=args.gate)
        for message in skipped["broken"]:  # a lost scan: named, and the exit code says not all were done
            print(f"error: {message}", file=sys.stderr)
        failures += skipped["broken"]
    except OSError as exc:  # full disk, read-only folder: nothing later would succeed either
        where = f" ({shown(exc.filename)})" if exc.filename else ""
        print(f"error: cannot write to {shown(out_dir)}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except NonFiniteOutput as exc:
        for folder in made:  # deepest first; one that holds anything stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        print(f"error: {shown(args.checkpoint)}: {exc}", file=sys.stderr)
        return 2
    if stop.is_set():
        print(f"\ninterrupted: {len(results)} of {len(paths)} images written to {shown(out_dir)}/; {CSV_NAME} "
              f"lists exactly them", file=sys.stderr)
        return 130
    print_summary(results, len(paths), failures, out_dir, loaded.threshold, loaded.trust, args.gate,
                  Path(args.checkpoint).resolve() == DEFAULT_CHECKPOINT.resolve())
    return 1 if failures else 0


def print_summary(results: list[Result], n_inputs: int, failures: list[str], out_dir: Path, threshold: float,
                  fitted: dict | None, gate_mode: str = "auto", shipped: bool = True) -> None:
    """What was written, how many scans to look at first, what the gate emptied, and what this is not (with the
    shipped model's card where that model ran)."""
    print(f"{len(results)} of {n_inputs} images -> {shown(out_dir)}/ (masks, overlays, {CSV_NAME}; threshold "
          f"{threshold:g})" + (f"; {len(failures)} could not be read" if failures else ""))
    if fitted:
        flagged = sum(r.review for r in results)
        print(f"{flagged} of {len(results)} flagged for review (trust below {fitted['review_below']:.2f}, or out of "
              f"range: the `review` column; the lowest trust first: sort by `trust`)")
        if fitted.get("presence"):
            free = sum(r.gated or r.lesion_free for r in results)
            print(f"{free} of {len(results)} judged lesion-free by the 'no lesion' gate (presence probability below "
                  f"{fitted['presence']['cut']:.2f}, `no_lesion` column): "
                  + ("masks emptied" if trust.gate_applies(fitted, gate_mode)
                     else "masks kept, as the gate was fitted at other hospitals (--gate apply empties them)"))
        if fitted.get("familiarity"):
            out = sum(r.out_of_range for r in results)
            print(f"{out} of {len(results)} out of range (unlike the scans the model was fitted on: `out_of_range` "
                  f"column, always flagged for review)")
            if results and out > len(results) / 2:
                print(f"note: most of these scans are out of range: {ADAPT_HINT}")
    print("research use only, not for clinical decisions" + (
        f": what the shipped model is and where it fails: {MODEL_CARD}" if shipped else
        " (this checkpoint's figures: the metrics.json and test report of the run that made it)"))


if __name__ == "__main__":
    sys.exit(main())
