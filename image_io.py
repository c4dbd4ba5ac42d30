"""Scans as files in BUSI's layout: the discovery of images and their masks (`Sample`), and their decoding into
grey arrays (EXIF orientation applied; 1-bit, RGB, RGBA and 16-bit masks merged into one lesion mask), resized for
the model. Every problem with a file raises `utils.DataError` with a one-line message naming it."""
from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

import utils
from prediction_table import PREDICTION_STEMS
from utils import CLASSES, IMAGE_EXTENSIONS, DataError

# PIL refuses images above 2x this as "decompression bombs"; raise the limit so that a legitimately huge scan
# loads (it is reduced before anything else is done with it), while a corrupt header claiming gigapixels
# still fails.
Image.MAX_IMAGE_PIXELS = 250_000_000

IGNORED_NAMES = {"thumbs.db", "desktop.ini"}
# DOTALL and \Z: a name with a newline in it is still one name ($ would also match before a trailing newline)
MASK_RE = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<index>\d+))?\Z", re.DOTALL)


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



def natural_key(path: Path) -> list:
    """Sort 'x (2).png' before 'x (10).png'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)] + [str(path)]


def map_threads(fn, items, progress: bool, desc: str) -> list:
    """[fn(item) for item in items] on a few threads, with a progress bar when asked and interactive."""
    from tqdm import tqdm

    # PIL releases the GIL while decoding and resizing, so threads give a real speed-up here.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 1)) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, leave=False,
                         disable=not progress or not utils.interactive()))
