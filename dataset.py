"""BUSI data: discovery, image/mask loading, near-duplicate grouping, leakage-safe splits, tensor cache.

Layout (Kaggle "breast-ultrasound-images-dataset"):

    <data-dir>/{benign,malignant,normal}/X.png
    <data-dir>/{benign,malignant,normal}/X_mask.png, X_mask_1.png, X_mask_2.png, ...

Every problem with the files raises `DataError` with a one-line message naming the file; the scripts turn it
into `error: ...` and a non-zero exit. Run `python dataset.py --help` to (re)generate a split file, or to pack
the decoded data into one compressed bundle file (to train on a machine that does not hold the PNGs).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import utils
from utils import CLASSES, DEFAULT_SPLIT_FILE, atomic_write  # noqa: F401 (CLASSES: dataset.CLASSES for its users)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IGNORED_NAMES = {"thumbs.db", "desktop.ini"}
# DOTALL and \Z: a name with a newline in it is still one name ($ would also match before a trailing newline)
# the stems predict_busi.py gives its outputs (<stem>_pred.png, <stem>_overlay.png): never a scan, never a label
PREDICTION_STEMS = ("_pred", "_overlay")
# predict_busi.py's table of what it wrote: its name and columns, written there and read here (predictions_listed)
PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_FIELDS = ("file", "width", "height", "lesion_pixels", "lesion_fraction", "max_probability",
                      "malignancy_probability", "predicted_class", "mask", "overlay", "check", "trust", "review",
                      "presence_probability", "no_lesion", "frame", "region", "pixel_spacing_mm", "spacing_source",
                      "area_mm2", "longest_diameter_mm", "perpendicular_diameter_mm", "familiarity", "out_of_range")
OLDEST_PREDICTIONS_FIELDS = PREDICTIONS_FIELDS[:8]  # the first table's columns: any table of ours starts with them
OLD_MASK_SUFFIX = "_mask.png"  # what predict_busi.py versions before _pred named their masks
MASK_RE = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<index>\d+))?\Z", re.DOTALL)
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
SPLIT_SEED = 0
# Two images are near-duplicates when their 64-bit perceptual hashes differ in at most this many bits.
# Chosen by looking at BUSI's pairs: the same scan re-saved, re-cropped or re-annotated with calipers sits at
# 0-12 bits (dense at 0-6, sparse at 8-12), while the bulk of distinct scans is at 14+ (some true pairs too).
# Erring towards grouping is safe: a wrongly grouped pair only moves together, it cannot leak.
DUPLICATE_MAX_BITS = 12
# Across two sources (two hospitals) distinct scans come closer: BUSI and BUS-BRA have 20 pairs at 10-12 bits and
# none below. A copy of one scan (re-saved, re-sized) sits at 0-6: near-duplicates across sources are those.
CROSS_SOURCE_MAX_BITS = 6
CACHE_VERSION = 2  # 2: EXIF orientation applied, 0/1 masks read as lesion (older caches hold other pixels)
BUNDLE_FORMAT = "busi-bundle-v1"
BUNDLE_SIZE_MULTIPLE = 16  # 2**4: a bundle's size must suit the U-Net's default depth


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python dataset.py` (here, before numpy, torch and PIL load: --help needs none)."""
    parser = argparse.ArgumentParser(
        description="Discover a BUSI-layout data dir, group near-duplicate images by perceptual hash and write a "
                    "leakage-safe, class-stratified train/val/test split (JSON).")
    parser.add_argument("--data-dir", default=None,
                        help="folder with benign/, malignant/, normal/ (default: ./Dataset_BUSI_with_GT, as for "
                             "train_unet_busi.py; never the bundled sample, whose split would replace BUSI's)")
    parser.add_argument("--out", default=None,
                        help="where to write the split (default: the split in the repo's splits/ that lists "
                             "exactly these images, such as busi_split.json, regenerated; for other images a new "
                             "splits/<folder name>_split.json: a split of other data is never replaced)")
    parser.add_argument("--seed", type=int, default=SPLIT_SEED, help="shuffle seed (default: %(default)s)")
    parser.add_argument("--fractions", type=float, nargs=3, default=SPLIT_FRACTIONS, metavar=("TRAIN", "VAL", "TEST"),
                        help="shares of each class for train, val and test; a test share of 0 writes no test part "
                             "(a source whose test sets are held elsewhere) (default: %(default)s)")
    parser.add_argument("--patient-pattern", default=None, metavar="REGEX",
                        help="keep the images of one patient together: a regular expression whose first (group) "
                             "captures the patient from the file name, e.g. '^(bus_[0-9]+)-' for BUS-BRA")
    parser.add_argument("--groups-csv", default=None, metavar="CSV",
                        help="keep together the images that share a 'group' in this CSV (columns image, group)")
    parser.add_argument("--bundle", default=None, metavar="FILE",
                        help="instead of a split, write the data decoded at --image-size into one compressed file "
                             "that train_unet_busi.py --data-dir FILE trains from (for a machine without the PNGs)")
    parser.add_argument("--image-size", type=utils.positive_int, default=256,
                        help=f"image size of --bundle, a multiple of {BUNDLE_SIZE_MULTIPLE} as training at the "
                             f"default depth needs (default: %(default)s)")
    return parser


if __name__ == "__main__":
    utils.answer_help_early(build_parser)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: E402

# PIL refuses images above 2x this as "decompression bombs"; raise the limit so that a legitimately huge scan
# loads (it is reduced before anything else is done with it), while a corrupt header claiming gigapixels
# still fails.
Image.MAX_IMAGE_PIXELS = 250_000_000


class DataError(Exception):
    """A problem with the data on disk; the message names the file."""


@dataclass
class Sample:
    """One image with all of its ground-truth masks; paths are relative to the data dir."""

    image: str
    masks: list[str] = field(default_factory=list)
    label: str = "benign"

    @property
    def label_index(self) -> int:
        return CLASSES.index(self.label)


# --------------------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------------------
def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES or Path(name).suffix.lower() not in IMAGE_EXTENSIONS


def discover_samples(data_dir: str | os.PathLike) -> list[Sample]:
    """Pair every image in <data_dir>/{benign,malignant,normal}/ with its masks; sorted by path."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data dir not found: {root} (expected the Kaggle layout {root}/{{benign,malignant,normal}}/)")
    samples: list[Sample] = []
    present = [label for label in CLASSES if (root / label).is_dir()]
    if not present:  # a source may lack a class (BUS-BRA has no normal scans), but not all of them
        raise DataError(f"no class folder in {root} (expected one or more of {', '.join(CLASSES)})")
    for label in present:
        folder = root / label
        images: dict[str, Sample] = {}
        masks: list[tuple[str, str]] = []  # (stem, file name)
        try:
            entries = sorted(os.listdir(folder))
        except OSError as exc:  # e.g. no read permission
            raise DataError(f"cannot list {folder}: {exc.strerror or exc}") from None
        # files of another type by stem, to name X.gif when only its X_mask.png is found
        other_types = {Path(e).stem: e for e in entries if not e.startswith(".") and _is_ignored(e)}
        for entry in entries:
            if _is_ignored(entry):
                continue
            if not (folder / entry).is_file():
                if (folder / entry).is_symlink() and not (folder / entry).exists():  # a lost image, not litter
                    raise DataError(f"broken symbolic link: {folder / entry} -> {os.readlink(folder / entry)}")
                continue
            stem = Path(entry).stem
            match = MASK_RE.match(stem)
            if match:
                masks.append((match.group("stem"), entry))
            elif stem in images:  # X.png and X.jpg: which one the masks belong to is anyone's guess
                raise DataError(f"two images with one name: {folder / Path(images[stem].image).name} and "
                                f"{folder / entry} (keep one, or rename the other with its masks)")
            else:
                images[stem] = Sample(image=f"{label}/{entry}", label=label)
        if not images:
            raise DataError(f"class folder has no images: {folder}")
        for stem, sample in images.items():  # predict_busi.py's outputs copied in: never a scan, never a label
            if stem.endswith(PREDICTION_STEMS) and stem.rsplit("_", 1)[0] in images:
                raise DataError(f"a prediction in a data folder: {root / sample.image} (predict_busi.py's output for "
                                f"{stem.rsplit('_', 1)[0]}, not a scan and not a label): move predictions out of it")
        for stem, name in masks:
            if stem not in images:
                if stem in other_types:
                    raise DataError(f"unsupported image type: {folder / other_types[stem]} (the image of {name}; "
                                    f"supported: {', '.join(IMAGE_EXTENSIONS)})")
                raise DataError(f"mask without an image: {folder / name}")
            images[stem].masks.append(f"{label}/{name}")
        for sample in images.values():
            if not sample.masks:
                raise DataError(f"image without a mask: {root / sample.image} (expected {Path(sample.image).stem}_mask.png)")
            sample.masks.sort(key=_mask_order)
        samples.extend(images.values())
    samples.sort(key=lambda s: s.image)
    return samples


def earlier_prediction(path: Path, listed: dict[Path, set] | None = None) -> str | None:
    """Why an image file is an earlier run's output of predict_busi.py and not a scan, or None. One rule for
    every tool: a predictions.csv beside it lists it (its mask or overlay column), or it is X_pred.png /
    X_overlay.png beside an image X.* (the training loader refuses such a file in a data folder). `listed`
    keeps each folder's table once read, for a caller that asks about many files of one folder."""
    import glob

    stem = path.stem
    if stem.endswith(PREDICTION_STEMS):
        base = stem.rsplit("_", 1)[0]
        if any(p != path and p.suffix.lower() in IMAGE_EXTENSIONS for p in path.parent.glob(glob.escape(base) + ".*")):
            return f"predict_busi.py's output for {base}"
    listed = {} if listed is None else listed
    if path.parent not in listed:
        try:
            listed[path.parent] = predictions_listed(path.parent / PREDICTIONS_CSV)
        except (OSError, ValueError):  # none there, or not a table of predict_busi.py's: nothing is listed
            listed[path.parent] = set()
    return f"listed as an output in {PREDICTIONS_CSV}" if path.name in listed[path.parent] else None


def predictions_listed(table: Path) -> set[str]:
    """The files a table of predict_busi.py's (its predictions.csv) lists, as they appear in it: the mask and
    overlay columns; a table of a version before those columns lists <stem>_mask.png and <stem>_overlay.png.
    OSError where it cannot be read, ValueError (UnicodeDecodeError and csv.Error included) where it is no such
    table."""
    import csv

    with open(table, newline="", encoding="utf-8") as f:
        try:
            reader = csv.DictReader(f)
            if list((reader.fieldnames or [])[:len(OLDEST_PREDICTIONS_FIELDS)]) != list(OLDEST_PREDICTIONS_FIELDS):
                raise ValueError(f"{table} is not a table written by predict_busi.py")
            listed = set()
            for row in reader:
                stem = Path(row["file"] or "").stem
                listed.update((row.get("mask") or stem + OLD_MASK_SUFFIX,
                               row.get("overlay") or stem + PREDICTION_STEMS[1] + ".png"))
            return listed
        except csv.Error as exc:
            raise ValueError(f"{table}: {exc}") from None


def _mask_order(path: str) -> int:
    index = MASK_RE.match(Path(path).stem).group("index")
    return 0 if index is None else int(index)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def _open(path: Path) -> tuple[Image.Image, int]:
    """The decoded image turned upright by its EXIF orientation (as viewers show it), and that orientation."""
    try:
        if path.stat().st_size == 0:
            raise DataError(f"empty file: {path}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
            orientation = exif_orientation(image)
            if orientation != 1:  # only then: exif_transpose copies the pixels
                image = ImageOps.exif_transpose(image)
        return image, orientation
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def exif_orientation(image: Image.Image) -> int:
    """EXIF orientation tag 2..8, else 1 (none, or a value no viewer would apply)."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block is ignored, as viewers ignore it
        return 1
    return orientation if orientation in range(2, 9) else 1


def _describe_orientation(orientation: int) -> str:
    """'none' or e.g. '6 (turned 90 degrees)'."""
    if orientation == 1:
        return "none"
    turn = {2: "mirrored", 3: "turned 180 degrees", 4: "mirrored"}.get(orientation, "turned 90 degrees")
    return f"{orientation} ({turn})"


def _grey_and_alpha(image: Image.Image) -> tuple[np.ndarray, int, np.ndarray | None]:
    """(grey array, its full-scale value, alpha uint8 array or None) for any PIL mode, without float copies.

    Integer arithmetic keeps a 10000 x 10000 mask at a few hundred MB rather than gigabytes of float32.
    """
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "1":
        return np.asarray(image, dtype=np.uint8), 1, None
    if image.mode.startswith("I;16"):
        return np.asarray(image, dtype=np.uint16), 65535, None
    if image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float32)
        peak = array.max(initial=0)
        # a float image or mask that never exceeds 1 is on a 0-1 scale (0 / 0.9 is a lesion, not background)
        scale = 1 if image.mode == "F" and peak <= 1 else 65535 if peak > 255 else 255
        return array, scale, None
    alpha = None
    if image.mode in ("LA", "RGBA", "PA", "La", "RGBa"):
        alpha = np.asarray(image.getchannel("A"), dtype=np.uint8)
    grey = image if image.mode == "L" else image.convert("L")
    return np.asarray(grey, dtype=np.uint8), 255, alpha


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read any image as one grey uint8 channel (HxW), upright as displayed (EXIF orientation applied).
    16-bit, palette and alpha images are handled."""
    return _load_image(Path(path))[0]


def _load_image(path: Path) -> tuple[np.ndarray, int]:
    """`load_image` and the EXIF orientation that was applied (1: none)."""
    image, orientation = _open(path)
    return _grey_uint8(image), orientation


def _grey_uint8(image: Image.Image) -> np.ndarray:
    """Any PIL image as one grey uint8 channel, scaled by its full scale (16-bit by 65535, a 0-1 float by 1)."""
    grey, full_scale, _ = _grey_and_alpha(image)
    if full_scale == 255 and grey.dtype == np.uint8:
        return np.array(grey, dtype=np.uint8)  # a copy: PIL's buffer is released with the image
    return np.round(np.clip(grey, 0, full_scale) * (255.0 / full_scale)).astype(np.uint8)


def load_mask(paths: list[str | os.PathLike], size: tuple[int, int] | None = None) -> np.ndarray:
    """OR-merge one or more masks into a bool HxW array; `size` is the image's (width, height) to check against.

    A pixel is lesion when its luminance, composited over black by its alpha, is at least half scale: this reads
    1-bit, L, RGB and RGBA masks alike (a transparent pixel is background, whatever its colour). A mask whose
    maximum is exactly 1 (8-bit or 16-bit 0/1, float 0.0/1.0) has a scale of 1: any nonzero integer pixel is
    lesion, and a soft float one from 0.5 up.
    Masks are turned upright by their EXIF orientation, like images.
    """
    return _load_mask(paths, size, 1)


def _load_mask(paths, size, image_orientation: int) -> np.ndarray:
    """`load_mask`; `image_orientation` (the image's applied EXIF orientation) only words the size error."""
    merged = None
    for path in paths:
        image, orientation = _open(Path(path))
        if size is not None and image.size != tuple(size):
            note = ""
            if image_orientation != 1 or orientation != 1:  # the turn is the likely cause: say so
                note = (f" after applying EXIF orientation (image: {_describe_orientation(image_orientation)}, "
                        f"mask: {_describe_orientation(orientation)}); a mask must match its image as displayed")
            raise DataError(f"mask size {image.size[0]}x{image.size[1]} differs from its image's "
                            f"{size[0]}x{size[1]}{note}: {path}")
        grey, full_scale, alpha = _grey_and_alpha(image)
        if full_scale > 1 and grey.max(initial=0) == 1:  # 0/1 mask: a 0/255 one never peaks at exactly 1
            lesion = grey >= 0.5  # half of its scale of 1: any nonzero pixel of an integer mask
            if alpha is not None:
                lesion &= alpha >= 128
        elif alpha is None:  # half scale: 128 of 255, 0.5 of a float 0-1 mask
            lesion = grey >= (0.5 if full_scale == 1 else (full_scale + 1) // 2)
        else:  # composite over black: grey * alpha / 255 >= half scale, in uint16 (255 * 255 fits)
            lesion = grey.astype(np.uint16) * alpha >= 128 * 255
        del grey, alpha
        merged = lesion if merged is None else (merged | lesion)
    return merged


def grey_from_array(array) -> np.ndarray:
    """A scan given as an array (or a PIL image) as the grey uint8 HxW image `load_image` would make of the same
    pixels in a file: bool and 0-1 float scaled to 0-255, 16-bit by its full scale, RGB/RGBA to grey by luma.
    ValueError, naming what was given and what is accepted, for anything else (empty, not 2-D or HxWx3/4,
    negative, not finite, not numbers)."""
    accepted = ("accepted: a grey HxW or an RGB/RGBA HxWx3/4 array of bool, uint8, uint16 or other non-negative "
                "integers up to 65535, or floats (0-1, or 0-255), or a PIL image")
    if isinstance(array, Image.Image):
        return _grey_uint8(array)
    if not isinstance(array, np.ndarray):
        raise ValueError(f"a {type(array).__name__} is not an image ({accepted})")
    shape = "x".join(map(str, array.shape))
    if array.dtype.kind not in "biuf":
        raise ValueError(f"an array of {array.dtype} is not an image ({accepted})")
    if array.size == 0 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"an array of shape {shape or '()'} is not an image ({accepted})")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"the {shape} {array.dtype} array holds NaN or infinite values ({accepted})")
    if array.dtype.kind == "b":
        scaled = array.astype(np.uint8) * 255
    elif array.dtype == np.uint8:
        scaled = array
    else:
        low, peak = float(array.min()), float(array.max())
        if low < 0 or (array.dtype.kind in "iu" and peak > 65535):
            raise ValueError(f"the {shape} {array.dtype} array holds values from {low:g} to {peak:g} ({accepted})")
        # as the file loader reads them: a float image that never exceeds 1 is on a 0-1 scale, 16-bit on 0-65535
        scale = 1 if array.dtype.kind == "f" and peak <= 1 else 65535 if array.dtype == np.uint16 or peak > 255 else 255
        if array.dtype.kind == "f" and peak > 65535:
            raise ValueError(f"the {shape} {array.dtype} array holds values up to {peak:g} ({accepted})")
        scaled = np.round(array.astype(np.float64) * (255.0 / scale)).astype(np.uint8)
    if scaled.ndim == 3:
        scaled = np.asarray(Image.fromarray(np.ascontiguousarray(scaled[..., :3])).convert("L"), dtype=np.uint8)
    return np.ascontiguousarray(scaled)


def load_sample(data_dir: str | os.PathLike, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Grey uint8 image and merged bool mask at the original resolution, both upright as displayed."""
    root = Path(data_dir)
    image, orientation = _load_image(root / sample.image)
    mask = _load_mask([root / m for m in sample.masks], (image.shape[1], image.shape[0]), orientation)
    return image, mask


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize of a grey uint8 image (antialiased bilinear)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Square resize of a bool mask: area-weighted, then >= 50% coverage, so thin lesions are not lost to nearest."""
    soft = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return np.asarray(soft, dtype=np.uint8) >= 128


# --------------------------------------------------------------------------------------------------------------
# Near-duplicates and splits
# --------------------------------------------------------------------------------------------------------------
def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * x + 1) * k / (2 * n))


_DCT32 = _dct_matrix(32)


def perceptual_hash(image: np.ndarray) -> int:
    """64-bit pHash: 32x32 grey thumbnail -> 2-D DCT -> 8x8 lowest frequencies vs their median."""
    thumb = np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR), dtype=np.float64)
    coeffs = (_DCT32 @ thumb @ _DCT32.T)[:8, :8].flatten()
    bits = coeffs[1:] > np.median(coeffs[1:])  # the DC term only says how bright the image is
    bits = np.concatenate([[coeffs[0] > 0], bits])
    return int("".join("1" if b else "0" for b in bits), 2)


def duplicate_groups(hashes: dict[str, int], max_bits: int = DUPLICATE_MAX_BITS) -> list[list[str]]:
    """Connected components (size >= 2) of the graph 'pHash distance <= max_bits'; sorted lists of paths."""
    names = sorted(hashes)
    parent = {n: n for n in names}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    values = np.array([hashes[n] for n in names], dtype=np.uint64)
    for i, name in enumerate(names[:-1]):
        xor = np.bitwise_xor(values[i + 1:], values[i])
        distance = np.unpackbits(xor.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        for j in np.nonzero(distance <= max_bits)[0]:
            parent[find(names[i + 1 + j])] = find(name)
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(find(name), []).append(name)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def make_split(samples: list[Sample], groups: list[list[str]], fractions=SPLIT_FRACTIONS,
               seed: int = SPLIT_SEED) -> dict:
    """Stratified, deterministic train/val/test split that keeps every duplicate group inside one split.

    Units are duplicate groups (or single images). Each unit counts towards the class of its first member in
    class order (benign < malignant < normal); units are shuffled with `seed` and handed, largest first, to the
    split that is furthest below its target share of that class.
    """
    label_of = {s.image: s.label for s in samples}
    in_group = {name for g in groups for name in g}
    units = [list(g) for g in groups] + [[s.image] for s in samples if s.image not in in_group]
    rng = random.Random(seed)
    split_names = ("train", "val", "test")
    result: dict[str, list[str]] = {k: [] for k in split_names}
    for label in CLASSES:
        class_units = [u for u in units if min(label_of[n] for n in u) == label]
        rng.shuffle(class_units)
        class_units.sort(key=len, reverse=True)  # stable: shuffled order within each size
        total = sum(len(u) for u in class_units)
        counts = dict.fromkeys(split_names, 0)
        for unit in class_units:
            deficit = {k: fractions[i] * total - counts[k] for i, k in enumerate(split_names)}
            target = max(split_names, key=lambda k: deficit[k])
            counts[target] += len(unit)
            result[target].extend(unit)
    return {k: sorted(v) for k, v in result.items()}


def patient_groups(samples: list[Sample], pattern: str | None = None, groups_csv: str | os.PathLike | None = None,
                   report: list[str] | None = None) -> list[list[str]]:
    r"""Images of one patient (size >= 2 groups of paths), which must stay on one side of a split: those whose
    file names give the same value for the first group of the regular expression `pattern` (searched in the
    file name, e.g. r"^(bus_\d+)-" for BUS-BRA's bus_NNNN-x.png), and/or those with the same `group` in a CSV
    with columns `image` (a file name or a path relative to the data folder) and `group`.

    A pattern or CSV that groups no image (an empty capture groups none) is a DataError: its grouping would be
    silently absent. How many images each one matched, and how many it left ungrouped, is appended to `report`.
    """
    keys: dict[str, list[str]] = {}
    if pattern:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise DataError(f"patient pattern {pattern!r} is not a regular expression ({exc})") from None
        if regex.groups < 1:
            raise DataError(f"patient pattern {pattern!r} needs a (group) that captures the patient")
        matched = 0
        for s in samples:
            match = regex.search(Path(s.image).name)
            if match and match.group(1):
                keys.setdefault(f"pattern:{match.group(1)}", []).append(s.image)
                matched += 1
        if not matched:
            example = Path(samples[0].image).name if samples else "none"
            raise DataError(f"patient pattern {pattern!r} captures a patient in none of the {len(samples)} file "
                            f"names (e.g. {example!r}; its first group must capture a non-empty patient id)")
        if report is not None:
            report.append(f"patient pattern {pattern!r} matched {matched} of {len(samples)} images" +
                          (f"; {len(samples) - matched} left ungrouped" if matched < len(samples) else ""))
    if groups_csv:
        import csv
        by_name = {Path(s.image).name: s.image for s in samples} | {s.image: s.image for s in samples}
        try:
            with open(groups_csv, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM is no column
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"cannot read the patient groups CSV {groups_csv}: {exc}") from None
        if rows and not {"image", "group"} <= set(rows[0]):
            raise DataError(f"the patient groups CSV {groups_csv} needs columns 'image' and 'group' (it has "
                            f"{', '.join(repr(k) for k in rows[0] if k is not None)})")
        named: set[str] = set()
        for row in rows:
            if row["image"] in by_name and row["group"]:
                keys.setdefault(f"csv:{row['group']}", []).append(by_name[row["image"]])
                named.add(by_name[row["image"]])
        if not named:
            example = rows[0]["image"] if rows else "no rows"
            raise DataError(f"the patient groups CSV {groups_csv} names none of the {len(samples)} images of the "
                            f"data folder (its first image: {example!r}; give file names or paths such as "
                            f"{samples[0].image if samples else 'benign/X.png'!r})")
        if report is not None:
            report.append(f"patient groups CSV {groups_csv} named {len(named)} of {len(samples)} images" +
                          (f"; {len(samples) - len(named)} left ungrouped" if len(named) < len(samples) else "") +
                          (f"; {len(rows) - len(named)} of its rows name no image here" if len(rows) > len(named)
                           else ""))
    return merge_groups([g for g in keys.values() if len(g) > 1])


def merge_groups(groups: list[list[str]]) -> list[list[str]]:
    """Groups that share an image joined into one (transitively); sorted lists, sorted by first member."""
    parent: dict[str, str] = {}

    def find(n: str) -> str:
        parent.setdefault(n, n)
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for group in groups:
        for name in group:
            parent[find(name)] = find(group[0])
    joined: dict[str, set[str]] = {}
    for name in list(parent):
        joined.setdefault(find(name), set()).add(name)
    return sorted((sorted(g) for g in joined.values() if len(g) > 1), key=lambda g: g[0])


def compute_split(data_dir: str | os.PathLike, samples: list[Sample] | None = None, seed: int = SPLIT_SEED,
                  progress: bool = True, fractions=SPLIT_FRACTIONS, patient_pattern: str | None = None,
                  groups_csv: str | os.PathLike | None = None) -> dict:
    """Hash every image, group near-duplicates (and one patient's images, see `patient_groups`) and split; the
    dict is what `splits/busi_split.json` holds."""
    samples = samples if samples is not None else discover_samples(data_dir)
    root = Path(data_dir)
    hashes = dict(zip([s.image for s in samples],
                      _map(lambda s: perceptual_hash(load_image(root / s.image)), samples, progress, "hashing")))
    duplicates = duplicate_groups(hashes)
    report: list[str] = []
    patients = patient_groups(samples, patient_pattern, groups_csv, report)
    for line in report:
        print(f"note: {utils.printable(line)}", flush=True)
    groups = merge_groups(duplicates + patients)
    split = make_split(samples, groups, fractions=tuple(fractions), seed=seed)
    split["duplicate_groups"] = groups
    by = f"; one patient's images kept together ({len(patients)} patients with several)" if patients else ""
    split["method"] = (f"64-bit pHash, near-duplicate = at most {DUPLICATE_MAX_BITS} bits apart, grouped "
                       f"transitively{by}; stratified by class {tuple(fractions)} with seed {seed}")
    return split


def write_split(split: dict, path: str | os.PathLike) -> None:
    """Write a split as JSON, atomically. ASCII only: a name that is not valid UTF-8 is kept as a \\udcXX escape."""
    text = json.dumps(split, indent=1, ensure_ascii=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("ascii")))


def read_split(path: str | os.PathLike, samples: list[Sample] | None = None) -> dict:
    """Load a split file and check it against the discovered samples (when given). A split without a 'test'
    list (a training source whose test sets are held elsewhere) has an empty one."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"split file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"split file is not valid JSON: {path} ({exc})") from None
    if isinstance(split, dict) and "test" not in split:
        split["test"] = []
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "val", "test")):
        raise DataError(f"split file needs lists 'train' and 'val' (and 'test', or none): {path}")
    seen: set[str] = set()
    for key in ("train", "val", "test"):
        for i, name in enumerate(split[key]):
            if not isinstance(name, str):
                raise DataError(f"split file entry {i + 1} of {key!r} is {name!r}, not an image path: {path}")
        if len(set(split[key])) < len(split[key]):
            twice = next(n for n in split[key] if split[key].count(n) > 1)
            raise DataError(f"split file lists {twice!r} twice in {key!r}: {path}")
        overlap = seen.intersection(split[key])
        if overlap:
            raise DataError(f"split file lists {sorted(overlap)[0]!r} in more than one split: {path}")
        seen.update(split[key])
    if samples is not None:
        known = {s.image for s in samples}
        missing = sorted(seen - known)
        if missing:
            raise DataError(f"split file names {len(missing)} image(s) not in the data dir, "
                            f"e.g. {missing[0]!r}: {path}")
    return split


def split_matches(split: dict, samples: list[Sample]) -> bool:
    """True when the split covers exactly the discovered images (so it was made for this data)."""
    return set(split["train"]) | set(split["val"]) | set(split["test"]) == {s.image for s in samples}


# --------------------------------------------------------------------------------------------------------------
# Decoded tensor cache
# --------------------------------------------------------------------------------------------------------------
def _map(fn, items, progress: bool, desc: str):
    from tqdm import tqdm

    # PIL releases the GIL while decoding and resizing, so threads give a real speed-up here.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 1)) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, leave=False,
                         disable=not progress or not utils.interactive()))


def _cache_key(data_dir: Path, samples: list[Sample], image_size: int) -> str:
    digest = hashlib.sha1(f"v{CACHE_VERSION} size={image_size}".encode())
    for sample in samples:
        for rel in [sample.image, *sample.masks]:
            st = (data_dir / rel).stat()
            # fsencode: a name that is not valid UTF-8 hashes as its own bytes (surrogate escape)
            digest.update(os.fsencode(rel) + f":{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def build_cache(data_dir: str | os.PathLike, samples: list[Sample], image_size: int,
                cache_dir: str | os.PathLike | None = ".cache", progress: bool = True) -> dict:
    """Decode every sample once; return (and keep on disk) uint8 tensors at `image_size`.

    Keys: images/masks uint8 [N,1,S,S] (masks 0/1), labels int64 [N], names (list of paths), and the
    original-resolution masks as bit-packed uint8 tensors (`full_masks`, `full_sizes` as [N,2] of H, W) so that
    metrics at each image's own resolution need no more PNG decoding.
    """
    root = Path(data_dir)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"busi_{image_size}_{_cache_key(root, samples, image_size)}.pt"
        if cache_file.is_file():
            try:
                cache = torch.load(cache_file, map_location="cpu", weights_only=True)
                problem = cache_problem(cache, image_size, [s.image for s in samples])
            except Exception as exc:  # noqa: BLE001 - a torn file
                problem = f"unreadable ({type(exc).__name__})"
            if problem is None:
                warn_empty_masks(cache)
                return cache
            print(f"warning: the data cache {cache_file} is damaged ({utils.printable(problem)}): rebuilding it",
                  file=sys.stderr)

    def decode(sample: Sample):
        image, mask = load_sample(root, sample)
        return (resize_image(image, image_size), resize_mask(mask, image_size),
                torch.from_numpy(np.packbits(mask)), mask.shape)

    decoded = _map(decode, samples, progress, f"decoding {len(samples)} images at {image_size}px")
    cache = {
        "images": torch.from_numpy(np.stack([d[0] for d in decoded]))[:, None].contiguous(),
        "masks": torch.from_numpy(np.stack([d[1] for d in decoded]).astype(np.uint8))[:, None].contiguous(),
        "labels": torch.tensor([s.label_index for s in samples], dtype=torch.int64),
        "names": [s.image for s in samples],
        "full_masks": [d[2] for d in decoded],
        "full_sizes": torch.tensor([d[3] for d in decoded], dtype=torch.int64),
    }
    if cache_file is not None:
        try:
            utils.torch_save(cache, cache_file)
        except OSError as exc:  # a read-only or full disk only costs the next run its head start
            print(f"warning: could not write the data cache {cache_file}: {exc}", file=sys.stderr)
    warn_empty_masks(cache)
    return cache


def cache_problem(cache, image_size: int | None = None, names: list[str] | None = None) -> str | None:
    """What is wrong with a decoded cache (or a bundle's): a key missing, a tensor of the wrong type or length;
    None when every part fits `build_cache`'s layout (and the given image size and names)."""
    if not isinstance(cache, dict):
        return f"a {type(cache).__name__}, not a dict"
    missing = [k for k in ("images", "masks", "labels", "names", "full_masks", "full_sizes") if k not in cache]
    if missing:
        return f"no {missing[0]!r}"
    images, masks, labels, sizes = cache["images"], cache["masks"], cache["labels"], cache["full_sizes"]
    if not all(isinstance(t, torch.Tensor) for t in (images, masks, labels, sizes)):
        return "images, masks, labels and full_sizes should be tensors"
    n = len(cache["names"]) if isinstance(cache["names"], list) else -1
    if n < 0 or not all(isinstance(name, str) for name in cache["names"]):
        return "'names' should be a list of paths"
    if names is not None and cache["names"] != names:
        return "its image names are not this data's"
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[:2] != (n, 1) \
            or images.shape[2] != images.shape[3] or image_size not in (None, images.shape[2]):
        return f"images of shape {tuple(images.shape)} for {n} images at {image_size} px"
    if masks.shape != images.shape or masks.dtype != torch.uint8:
        return f"masks of shape {tuple(masks.shape)}, images {tuple(images.shape)}"
    if labels.shape != (n,) or (n and not 0 <= int(labels.min()) <= int(labels.max()) < len(CLASSES)):
        return f"labels of shape {tuple(labels.shape)} for {n} images (or outside 0-{len(CLASSES) - 1})"
    if sizes.shape != (n, 2) or (n and int(sizes.min()) < 1):
        return f"full_sizes of shape {tuple(sizes.shape)} for {n} images"
    packed = cache["full_masks"]
    if not isinstance(packed, list) or len(packed) != n:
        return f"full_masks should be a list of {n} tensors"
    for name, bits, (h, w) in zip(cache["names"], packed, sizes.tolist()):
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.numel() != -(-h * w // 8):
            return f"the full-size mask of {name} does not fit its {w}x{h} size"
    return None


def warn_empty_masks(cache: dict, shown: int = 3) -> list[str]:
    """Warn on stderr (one line) about benign/malignant images whose merged mask is empty; returns their names.

    Such an image trains as "no lesion"; a mask format read wrongly looks exactly like this, so say it aloud.
    """
    empty = [name for name, label, packed in zip(cache["names"], cache["labels"].tolist(), cache["full_masks"])
             if CLASSES[label] != "normal" and not bool(packed.any())]  # packbits pads with zero bits only
    if empty:
        listed = utils.printable(", ".join(empty[:shown]) + (", ..." if len(empty) > shown else ""))
        verb, pronoun = ("image has", "it trains") if len(empty) == 1 else ("images have", "they train")
        print(f"warning: {len(empty)} benign/malignant {verb} an empty mask ({listed}): {pronoun} as \"no lesion\"",
              file=sys.stderr, flush=True)
    return empty


def unpack_mask(packed: torch.Tensor, size) -> torch.Tensor:
    """Inverse of the bit-packing in `build_cache`: bool tensor of shape `size` (H, W)."""
    h, w = int(size[0]), int(size[1])
    return torch.from_numpy(np.unpackbits(packed.numpy())[: h * w].reshape(h, w).astype(bool))


# --------------------------------------------------------------------------------------------------------------
# Bundle: the decoded cache in one compressed file
# --------------------------------------------------------------------------------------------------------------
def is_bundle(path: str | os.PathLike) -> bool:
    return Path(path).is_file()


def _zip(array: np.ndarray) -> torch.Tensor:
    return torch.frombuffer(bytearray(zlib.compress(np.ascontiguousarray(array).tobytes(), 6)), dtype=torch.uint8)


def _unzip(blob: torch.Tensor, dtype, shape) -> np.ndarray:
    return np.frombuffer(zlib.decompress(blob.numpy().tobytes()), dtype=dtype).reshape(shape)


def write_bundle(cache: dict, image_size: int, path: str | os.PathLike) -> int:
    """Write `build_cache`'s tensors as one file; returns its size in bytes.

    Images are stored as left-neighbour differences (like PNG's "Sub" filter) and zlib-compressed, masks
    bit-packed: all of BUSI at 256 px is about a quarter of its PNGs. Everything needed to train and to score
    at the original resolution is inside; the PNGs are not (no GUI, no duplicate grouping from a bundle).
    """
    images = cache["images"].numpy()
    deltas = np.diff(images, axis=-1, prepend=np.zeros_like(images[..., :1]))  # uint8 wrap-around is lossless
    packed = [m.numpy() for m in cache["full_masks"]]
    bundle = {
        "format": BUNDLE_FORMAT, "image_size": image_size, "names": list(cache["names"]), "labels": cache["labels"],
        "full_sizes": cache["full_sizes"], "images_shape": list(images.shape), "images": _zip(deltas),
        "masks": _zip(np.packbits(cache["masks"].numpy())),
        "full_mask_lengths": torch.tensor([len(m) for m in packed], dtype=torch.int64),
        "full_masks": _zip(np.concatenate(packed) if packed else np.zeros(0, np.uint8)),
    }
    utils.torch_save(bundle, path)
    return Path(path).stat().st_size


def read_bundle(path: str | os.PathLike, image_size: int | None = None) -> dict:
    """The cache dict of `build_cache` from a bundle file (DataError for anything else, or another size)."""
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise DataError(f"{path} is a file but not a data bundle made by `python dataset.py --bundle` "
                        f"({type(exc).__name__})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise DataError(f"{path} is a file but not a data bundle made by `python dataset.py --bundle`")
    if image_size is not None and bundle.get("image_size") != image_size:
        raise DataError(f"{path} holds {bundle.get('image_size')} px images, not {image_size} px: pass "
                        f"--image-size {bundle.get('image_size')} or make a bundle at {image_size} px")
    try:
        shape = bundle["images_shape"]
        images = np.cumsum(_unzip(bundle["images"], np.uint8, shape), axis=-1, dtype=np.uint8)
        n_pixels = int(np.prod(shape))
        masks = np.unpackbits(_unzip(bundle["masks"], np.uint8, (-1,)))[:n_pixels].reshape(shape)
        flat = _unzip(bundle["full_masks"], np.uint8, (-1,))
        ends = np.cumsum(bundle["full_mask_lengths"].numpy())
        full = [torch.from_numpy(flat[e - n:e].copy()) for e, n in zip(ends, bundle["full_mask_lengths"].tolist())]
        cache = {"images": torch.from_numpy(images.copy()), "masks": torch.from_numpy(masks.copy()),
                 "labels": bundle["labels"], "names": list(bundle["names"]), "full_masks": full,
                 "full_sizes": bundle["full_sizes"]}
    except Exception as exc:  # noqa: BLE001 - a key missing, bytes that do not decompress or reshape
        raise DataError(f"{path} is a damaged data bundle ({type(exc).__name__}: {exc})") from None
    problem = cache_problem(cache, image_size)
    if problem:
        raise DataError(f"{path} is a damaged data bundle: {problem}")
    warn_empty_masks(cache)
    return cache


def bundle_samples(cache: dict) -> list[Sample]:
    """Samples (image name and class, no mask paths) for the images of a bundle, for split checks."""
    return [Sample(image=n, label=CLASSES[int(k)]) for n, k in zip(cache["names"], cache["labels"])]


def subset(cache: dict, names: list[str]) -> dict:
    """The cache entries for `names` (in that order)."""
    index = {n: i for i, n in enumerate(cache["names"])}
    idx = [index[n] for n in names]
    t = torch.tensor(idx, dtype=torch.long)
    return {
        "images": cache["images"][t], "masks": cache["masks"][t], "labels": cache["labels"][t],
        "names": list(names), "full_masks": [cache["full_masks"][i] for i in idx],
        "full_sizes": cache["full_sizes"][t],
    }


# --------------------------------------------------------------------------------------------------------------
# Command line: (re)generate a split file
# --------------------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------------------------
# Which data and which split: one rule for every tool
# ------------------------------------------------------------------------------------------------------------------
SAMPLE_DIR = Path(__file__).resolve().parent / "data" / "busi_sample"
LOCAL_DATA_DIR = Path("Dataset_BUSI_with_GT")  # where the Kaggle download unpacks, beside the scripts


def resolve_data_dir(data_dir: str | os.PathLike | None, announce: bool = True) -> Path:
    """The folder (or bundle) given, else ./Dataset_BUSI_with_GT if present, else the bundled sample; the sample
    is announced in a banner, since its numbers mean nothing."""
    if data_dir:
        return Path(data_dir)
    if LOCAL_DATA_DIR.is_dir():
        return LOCAL_DATA_DIR
    if announce:
        banner = "=" * 100
        print(f"{banner}\n  NO --data-dir GIVEN AND ./Dataset_BUSI_with_GT NOT FOUND: using the bundled sample "
              f"(data/busi_sample, a handful of images).\n  Its numbers mean nothing. For real results download BUSI "
              f"from Kaggle ('breast-ultrasound-images-dataset') and\n  pass --data-dir PATH/Dataset_BUSI_with_GT "
              f"(or unpack it into this folder).\n{banner}", flush=True)
    return SAMPLE_DIR


SOURCE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")


def _resolved(path: Path) -> Path:
    """`path` with its symbolic links followed; a loop of links is a DataError naming it (Path.resolve raises a
    RuntimeError for one)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "a loop of symbolic links"
        raise DataError(f"cannot follow {utils.printable(path)}: {why}") from None


def default_source_name(path: Path) -> str:
    """A source's name when none is given: its folder's (or bundle's) name, with what a name may not hold (`=`,
    spaces, ...) made `_`, so that the NAME=PATH a run records reads back as that source."""
    raw = path.stem if path.is_file() else (_resolved(path).name or "data")
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", raw)
    return name if SOURCE_NAME_RE.match(name) else f"data_{name}"


def resolve_sources(specs, announce: bool = True) -> list[tuple[str, Path]]:
    """The data sources of --data-dir values: [(name, folder or bundle)]. A value is PATH or NAME=PATH; the name
    (the folder's own name by default, see `default_source_name`) labels the source's images in every report. No
    value: one source, `resolve_data_dir`'s default. One folder given twice (under two names, or through a link)
    is a DataError: it would be trained on twice."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    if not specs:
        path = resolve_data_dir(None, announce)
        return [(path.name, path)]
    sources: list[tuple[str, Path]] = []
    for spec in map(str, specs):
        name, _, rest = spec.partition("=")
        if rest and SOURCE_NAME_RE.match(name) and not Path(spec).exists():
            path = Path(rest)
        else:
            path = Path(spec)
            name = default_source_name(path)
        if name in CLASSES:  # --repeat normal=4 would weigh the class and the source at once
            raise DataError(f"a data source may not be named like a class ({name!r}: {path}): name it, e.g. "
                            f"--data-dir {name}_data={path} (NAME=PATH)")
        if any(name == n for n, _ in sources):
            raise DataError(f"two data sources named {name!r}: name them, e.g. --data-dir {name}_2={path} "
                            f"(NAME=PATH)")
        twin = next((n for n, p in sources if same_folder(p, path)), None)
        if twin is not None:
            raise DataError(f"the data sources {twin} and {name} are one folder ({_resolved(path)}): give it once")
        _resolved(path)  # a loop of links: named now, not as a traceback later
        sources.append((name, path))
    return sources


def source_spec(name: str, path: Path) -> str:
    """NAME=ABSOLUTE_PATH: how a run records a source, so that a resume from any folder finds it."""
    return f"{name}={_resolved(Path(path))}"


def concat(parts: list[dict]) -> dict:
    """One split dict from several sources' (`subset` dicts with 'sources'), in order."""
    if len(parts) == 1:
        return parts[0]
    return {"images": torch.cat([p["images"] for p in parts]), "masks": torch.cat([p["masks"] for p in parts]),
            "labels": torch.cat([p["labels"] for p in parts]), "names": [n for p in parts for n in p["names"]],
            "full_masks": [m for p in parts for m in p["full_masks"]],
            "full_sizes": torch.cat([p["full_sizes"] for p in parts]),
            "sources": [s for p in parts for s in p["sources"]]}


def of_sources(part: dict, names) -> dict:
    """The images of a joined part (`concat`) that come from the sources `names`, in their order."""
    keep = [i for i, s in enumerate(part["sources"]) if s in names]
    if len(keep) == len(part["names"]):
        return part
    idx = torch.tensor(keep, dtype=torch.long)
    return {**{k: part[k][idx.to(part[k].device)] for k in ("images", "masks", "labels", "full_sizes")},
            **{k: [part[k][i] for i in keep] for k in ("names", "full_masks", "sources")}}


def recorded_sources(config: dict, check_data: bool = True, given=None, run_dir: Path | None = None
                     ) -> tuple[list[str] | None, list[str] | None]:
    """The sources and splits a run or checkpoint records (absolute paths; runs from before that, as they were
    given), as --data-dir and --split-file values, or None where it records none. One that cannot be found is a
    DataError naming it and the flag that replaces it: never another folder or split, silently. With `run_dir` (a
    resume), --data-dir values `given` must name the recorded sources (`same_sources`)."""
    data = config.get("data_dir")
    data = data if isinstance(data, list) else [data] if data else None
    for name, path in resolve_sources(data, announce=False) if data and check_data else []:
        if not path.exists():
            raise DataError(f"the recorded data source {name} ({path}) is not found from {Path.cwd()}: pass "
                            f"--data-dir with its folder")
    splits = config.get("split_file")
    if not splits:
        return data, same_sources(given, data, None, run_dir) if run_dir else None
    found = []
    for name, path in (splits if isinstance(splits, dict) else {None: splits}).items():
        if not str(path).endswith(".json"):  # "every image", or a split computed and not written
            continue
        committed = DEFAULT_SPLIT_FILE.parent / Path(path).name
        if not Path(path).is_file() and Path(path).parent.name == "splits" and committed.is_file():
            path = str(committed)  # a committed split, recorded in another clone of this repository
        if not Path(path).is_file():
            raise DataError(f"the recorded split {path} is not found from {Path.cwd()}: pass --split-file with it")
        found.append(str(path) if name is None else f"{name}={path}")
    return data, same_sources(given, data, found, run_dir) if run_dir else found


def same_folder(a: Path, b: Path) -> bool:
    """Whether two paths name one existing folder or file (through symbolic links, `..`, bind mounts)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def recorded_splits_for(config: dict, data_dir) -> list[str] | None:
    """--split-file values (NAME=PATH) that give each of `sources` that a checkpoint was trained on (the same
    folder; or the same name, where the recorded folder is gone) the split it was trained with, so that its test
    part is never another split's training scans. A source the run never saw gets none (its committed split, or
    one computed now). A recorded split that cannot be found, or that was never written, is a DataError naming
    the source and the flag that replaces it. `data_dir`: the --data-dir values; None where nothing is recorded."""
    sources = resolve_sources(data_dir, announce=False)
    data = config.get("data_dir")
    data = data if isinstance(data, list) else [data] if data else []
    splits = config.get("split_file")
    if not data or not splits:
        return None
    try:
        recorded = resolve_sources(data, announce=False)
    except DataError:
        return None
    if not isinstance(splits, dict):  # runs of one source recorded its split as a path
        splits = {recorded[0][0]: splits} if len(recorded) == 1 else {}
    given = []
    for name, path in sources:
        match = next((r for r, rpath in recorded if same_folder(path, rpath)), None) or \
            next((r for r, rpath in recorded if r == name and not rpath.exists()), None)
        if match is None or match not in splits:
            continue
        split = str(splits[match])
        if not split.endswith(".json"):
            raise DataError(f"the checkpoint was trained on {name} with a split it did not write ({split}): pass "
                            f"--split-file {name}=FILE with that split, or --eval-split all")
        committed = DEFAULT_SPLIT_FILE.parent / Path(split).name
        if not Path(split).is_file() and Path(split).parent.name == "splits" and committed.is_file():
            split = str(committed)  # a committed split, recorded in another clone of this repository
        if not Path(split).is_file():
            raise DataError(f"the split the checkpoint was trained with on {name} ({split}) is not found from "
                            f"{Path.cwd()}: pass --split-file {name}=FILE with it (another split's test part may "
                            f"hold its training scans)")
        given.append(f"{name}={split}")
    return given or None


def same_sources(given: list[str] | None, recorded: list[str] | None, splits: list[str] | None,
                 run_dir: Path) -> list[str] | None:
    """Check, before anything is trained, that --data-dir given to --resume names the run's sources (each source's
    history columns, validation score and split are kept by its name); a DataError naming the recorded ones if
    not. A run of one source may find it under another name (the folder moved): its recorded split follows it.
    Returns the recorded splits, as --split-file values for the sources given (as they are, without both)."""
    if not given or not recorded:
        return splits
    names = [n for n, _ in resolve_sources(given, announce=False)]
    before = [n for n, _ in resolve_sources(recorded, announce=False)]
    if len(names) == len(before) == 1:
        return [f"{names[0]}={s.partition('=')[2]}" if s.partition("=")[0] == before[0] else s
                for s in splits] if splits else splits
    if sorted(names) != sorted(before):
        raise DataError(f"the run in {run_dir} trained on the sources {', '.join(before)} ({', '.join(recorded)}); "
                        f"--data-dir names {', '.join(names)}: a run's sources cannot change mid-run (give the "
                        f"same names, NAME=PATH, or leave --data-dir out to use the recorded ones)")
    return splits


def split_files_by_source(specs, sources: list[tuple[str, Path]]) -> dict:
    """{source name: split file} from --split-file values (NAME=PATH, or a PATH: the only source's)."""
    out = {}
    for spec in [specs] if isinstance(specs, (str, os.PathLike)) else specs or []:
        name, _, path = str(spec).partition("=")
        if path and any(name == n for n, _ in sources):
            out[name] = path
        elif len(sources) == 1:
            out[sources[0][0]] = str(spec)
        else:
            raise DataError(f"--split-file {spec}: with several sources name the source (NAME=PATH; sources: "
                            f"{', '.join(n for n, _ in sources)})")
    return out


def load_parts(sources: list[tuple[str, Path]], split_specs, image_size: int, cache_dir: str | None,
               split_dir: Path | None, every_image: bool = False, only: str | None = None) -> tuple[dict, dict]:
    """Every source's train/val/test parts (or "all" its images with `every_image`), decoded once at `image_size`,
    joined: each image keeps its source (the part's "sources"), and with several sources its name is
    SOURCE/class/file. A source's split is the one `split_specs` names for it, else `choose_split`'s; a split
    computed now is written into `split_dir` (split.json, or split_<source>.json with several; None: not
    written; `only`: decode just that part, e.g. the split an evaluation scores). Returns the parts and {source:
    where its split came from (an absolute path)}."""
    chosen = split_files_by_source(split_specs, sources)
    several, joined, split_sources, loaded = len(sources) > 1, {}, {}, {}
    for name, data_dir in sources:
        if is_bundle(data_dir):  # one file from `python dataset.py --bundle`: already decoded
            cache = read_bundle(data_dir, image_size)
            samples = bundle_samples(cache)
        else:
            samples, cache = discover_samples(data_dir), None
        if every_image:
            split, source = {"all": sorted(s.image for s in samples)}, "every image"
        else:
            written = None if split_dir is None else split_dir / (f"split_{name}.json" if several else "split.json")
            split, source = choose_split(data_dir, samples, chosen.get(name, DEFAULT_SPLIT_FILE), name in chosen,
                                         write_to=written)
            source = str(Path(source).resolve()) if source.endswith(".json") else source
        if not every_image and only is None and not split["val"]:
            # each source's validation score is half of what picks best.pt, the gate and the trust score
            raise DataError(f"the split of source {name} ({source}) has no validation images: best.pt, the 'no "
                            f"lesion' gate and the trust score would be chosen without it; give it a split with a "
                            f"validation part")
        counts = {k: len(split[k]) for k in ("train", "val", "test", "all") if k in split and only in (None, k)}
        if cache is None:
            wanted = {n for k in counts for n in split[k]}
            cache = build_cache(data_dir, [s for s in samples if s.image in wanted], image_size, cache_dir)
        print(f"data: {name}: {data_dir} | {len(samples)} images "
              f"({', '.join(sorted({s.label for s in samples}))}) | split {counts} from {source}", flush=True)
        for k in counts:
            part = subset(cache, split[k])
            loaded.setdefault(name, {})[k] = part
            part["sources"] = [name] * len(part["names"])
            if several:
                part["names"] = [f"{name}/{n}" for n in part["names"]]
            joined.setdefault(k, []).append(part)
        split_sources[name] = source
    if several and not every_image and all("train" in parts for parts in loaded.values()):
        check_across_sources(loaded)
    return {k: concat(v) for k, v in joined.items()}, split_sources


def check_across_sources(loaded: dict[str, dict[str, dict]]) -> None:
    """Each source's split keeps its own duplicates on one side, but not another source's: a scan held out
    (validation, test) in one source whose pixels are identical to a training scan of another is a DataError
    naming them; near-duplicates (at most CROSS_SOURCE_MAX_BITS apart) and scans trained on twice are warnings
    naming them. `loaded`: {source: {part: `subset` dict}}, the images at the training size."""
    held, train = [], []
    for source, parts in loaded.items():
        for part, data in parts.items():
            for name, image in zip(data["names"], data["images"]):
                pixels = image.numpy()
                entry = (source, part, name, hashlib.sha1(pixels.tobytes()).hexdigest(), perceptual_hash(pixels[0]))
                (train if part == "train" else held).append(entry)

    def pairs(rows):
        return ", ".join(f"{a[2]} ({a[1]}) = {b[2]} (train)" for a, b in rows[:3]) + \
            (f" and {len(rows) - 3} more pair(s)" if len(rows) > 3 else "")

    def count(rows) -> int:  # distinct scans of the first column
        return len({a[2] for a, _ in rows})

    by_pixels: dict[str, list] = {}
    for entry in train:
        by_pixels.setdefault(entry[3], []).append(entry)
    leaks = [(h, t) for h in held for t in by_pixels.get(h[3], []) if t[0] != h[0]]
    if leaks:
        raise DataError(utils.printable(f"{count(leaks)} held-out scan(s) of one source are identical to training "
                                        f"scans of another: {pairs(leaks)}; remove the copies, or give the sources "
                                        f"splits that keep them on one side"))
    twice = [(a, b) for a in train for b in by_pixels[a[3]] if b[0] > a[0]]  # each pair once, across sources
    if twice:
        print(utils.printable(f"warning: {count(twice)} training scan(s) appear in two sources and are trained on "
                              f"twice: {pairs(twice)}"), file=sys.stderr, flush=True)
    if not held or not train:
        return
    train_hashes = np.array([t[4] for t in train], dtype=np.uint64)
    near = []
    for h in held:
        xor = np.bitwise_xor(train_hashes, np.uint64(h[4]))
        distance = np.unpackbits(xor.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        near += [(h, train[j]) for j in np.nonzero(distance <= CROSS_SOURCE_MAX_BITS)[0] if train[j][0] != h[0]]
    if near:
        print(utils.printable(f"warning: {count(near)} held-out scan(s) of one source are near-duplicates (at most "
                              f"{CROSS_SOURCE_MAX_BITS} of 64 hash bits apart) of training scans of another: "
                              f"{pairs(near)}; their scores may be too good"), file=sys.stderr, flush=True)


SCANNER_TABLE = "bus_data.csv"  # BUS-BRA's per-image table: ID (the file's stem) and Device (the scanner)


def scanners(sources: list[tuple[str, Path]]) -> dict[str, str]:
    """{image name as the joined parts give it: scanner} for the sources whose folder holds a SCANNER_TABLE
    (columns ID, Device); empty for others."""
    import csv
    several, out = len(sources) > 1, {}
    for name, folder in sources:
        table = Path(folder) / SCANNER_TABLE
        if not table.is_file():
            continue
        try:
            with open(table, newline="") as f:
                device = {row["ID"]: row["Device"] for row in csv.DictReader(f) if row.get("ID") and row.get("Device")}
        except (OSError, KeyError, UnicodeDecodeError, csv.Error):
            continue  # a table it cannot read only costs the per-scanner breakdown
        for label in CLASSES:
            for path in (Path(folder) / label).glob("*"):
                if path.stem in device:
                    out[f"{name}/{label}/{path.name}" if several else f"{label}/{path.name}"] = device[path.stem]
    return out


def natural_key(path: Path) -> list:
    """Sort 'x (2).png' before 'x (10).png'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)] + [str(path)]


def choose_split(data_dir: Path, samples: list[Sample], split_file: str | os.PathLike = DEFAULT_SPLIT_FILE,
                 explicit: bool = False, write_to: Path | None = None) -> tuple[dict, str]:
    """(split, where it came from): the split file when it lists exactly these images (an `explicit` one must),
    else the committed split in splits/ that does (BUSI's, BUS-BRA's), else a leakage-safe split computed now
    (and written to `write_to`). A damaged split file is an error."""
    split_path = Path(split_file)
    if not split_path.is_absolute() and not split_path.exists():
        split_path = Path(__file__).resolve().parent / split_path  # the repo's own splits/ from any folder
    if explicit:
        return read_split(split_path, samples), str(split_path.resolve())
    committed = sorted(DEFAULT_SPLIT_FILE.parent.glob("*.json"))
    candidates = [c for c in [split_path] + [c for c in committed if c.resolve() != split_path.resolve()]
                  if c.is_file()]
    for candidate in candidates:
        split = read_split(candidate)
        if split_matches(split, samples):
            return split, str(candidate.resolve())
    if is_bundle(data_dir):
        raise DataError(f"{split_path} does not list the images of the bundle {data_dir}, and a bundle has no "
                        f"full-size images to group duplicates: pass --split-file with a split of its images")
    where = f" into {write_to}" if write_to else ""
    print(f"{split_path.name} does not list this data dir's images: computing a leakage-safe split (near-duplicate "
          f"grouping + stratification){where}", flush=True)
    split = compute_split(data_dir, samples, progress=write_to is not None)
    if write_to is None:
        return split, "computed for this folder"
    write_split(split, write_to)
    return split, str(write_to)


def _check_writable(path: Path) -> None:
    """DataError unless a file can be created at `path` (utils.unwritable), before any slow work."""
    problem = utils.unwritable(path)
    if problem:
        raise DataError(problem)


def default_split_out(data_dir: Path, samples: list[Sample]) -> Path:
    """Where `python dataset.py` writes a split without --out: the split in splits/ that lists exactly these images
    (regenerated: the same data), else a new splits/<source name>_split.json. A file of that name that lists other
    images is a DataError asking for --out: a split of other data is never replaced."""
    folder = DEFAULT_SPLIT_FILE.parent
    for candidate in sorted(folder.glob("*.json")):
        try:
            if split_matches(read_split(candidate), samples):
                return candidate
        except DataError:
            continue
    target = folder / f"{default_source_name(Path(data_dir))}_split.json"
    if target.exists():
        raise DataError(f"{target} is a split of other images: pass --out FILE (a split of other data is never "
                        f"replaced)")
    print(f"note: no split in {folder} lists these images: writing a new one, {target.name} (--out chooses)",
          flush=True)
    return target


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = utils.not_a_multiple(args.image_size, BUNDLE_SIZE_MULTIPLE)
    if problem:
        parser.error(f"argument --image-size: {problem}")
    data_dir = resolve_data_dir(args.data_dir, announce=False)
    try:
        if data_dir == SAMPLE_DIR:  # its split would replace BUSI's committed one
            raise DataError("no --data-dir given and ./Dataset_BUSI_with_GT not found: pass --data-dir "
                            "PATH/Dataset_BUSI_with_GT")
        samples = discover_samples(data_dir)
        out = Path(args.bundle or args.out or default_split_out(data_dir, samples))
        _check_writable(out)  # fail now, not after decoding or hashing every image
        if args.bundle:
            cache = build_cache(data_dir, samples, args.image_size, None)
            try:
                size = write_bundle(cache, args.image_size, out)
            except OSError as exc:  # e.g. the disk filled up: atomic_write left no partial file
                raise DataError(f"cannot write {out}: {exc.strerror or exc}") from None
            print(f"{len(samples)} images at {args.image_size} px -> {out} ({size / 2**20:.1f} MiB)")
            return 0
        if not (all(f >= 0 for f in args.fractions) and abs(sum(args.fractions) - 1) < 1e-6
                and min(args.fractions[:2]) > 0):
            raise DataError(f"--fractions {args.fractions}: train and val shares must be > 0, test >= 0, summing to 1")
        split = compute_split(data_dir, samples, seed=args.seed, fractions=args.fractions,
                              patient_pattern=args.patient_pattern, groups_csv=args.groups_csv)
        empty = [k for k, f in zip(("train", "val", "test"), args.fractions) if f > 0 and not split[k]]
        if empty:  # asked for, but whole groups filled the other parts
            largest = max((len(g) for g in split["duplicate_groups"]), default=1)
            raise DataError(f"the split leaves no {' and no '.join(empty)} images (fractions {args.fractions}, "
                            f"{len(samples)} images, the largest group kept together holds {largest}): the grouping "
                            f"is too coarse for these shares; nothing written")
        if args.fractions[2] == 0:
            del split["test"]
        try:
            write_split(split, out)
        except OSError as exc:
            raise DataError(f"cannot write {out}: {exc.strerror or exc}") from None
    except DataError as exc:
        print(f"error: {utils.printable(exc)}", file=sys.stderr)
        return 2
    counts = {k: len(split[k]) for k in ("train", "val", "test") if k in split}
    print(f"{len(samples)} images, {len(split['duplicate_groups'])} groups kept together "
          f"({sum(len(g) for g in split['duplicate_groups'])} images); split {counts} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
