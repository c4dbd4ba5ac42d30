"""Scans as files hold them, for every tool that predicts: DICOM files (as scanners and archives write them) and
image files, read as the grey image the model takes, with the part of it the model should see and the physical
size of a pixel where the file says it.

DICOM is read with pydicom. A file is DICOM when it carries the 'DICM' marker at byte 128 (whatever its name:
archives often write files without an extension). Only the elements needed are ever read from a file: the pixel
description, frame count, spacing and the Sequence of Ultrasound Regions. Patient and study elements (name, ID,
dates, ...) are never parsed, so they cannot reach an output, a log line or an error message; pydicom's own
warnings and log lines, which may quote element values, are silenced. Every problem is a `utils.DataError`
with one line naming the file.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import glob

import numpy as np

import image_io
import prediction_table
import utils

DICOM_EXTENSIONS = (".dcm", ".dicom")
MARKER_OFFSET = 128  # a DICOM file: a 128-byte preamble, then b"DICM"
READABLE_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR",
                        "YBR_RCT", "YBR_ICT")  # the last two: JPEG 2000 colour, which the decoder gives as RGB
# What a missing decoder is installed with (a transfer syntax's UID prefix -> pip packages). Pillow, a dependency
# anyway, decodes JPEG Baseline/Extended and JPEG 2000; RLE and uncompressed data need nothing.
DECODER_PACKAGES = {"1.2.840.10008.1.2.4.8": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS
                    "1.2.840.10008.1.2.4.5": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Lossless, 12-bit
                    "1.2.840.10008.1.2.4.7": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Lossless SV1
                    "1.2.840.10008.1.2.4.20": "pylibjpeg pylibjpeg-openjpeg"}  # HTJ2K
HEADER_TAGS = ["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "PhotometricInterpretation",
               "BitsAllocated", "BitsStored", "PixelRepresentation", "PixelSpacing", "ImagerPixelSpacing",
               "SequenceOfUltrasoundRegions"]
PALETTE_TAGS = [f"{c}{kind}" for c in ("Red", "Green", "Blue")
                for kind in ("PaletteColorLookupTableDescriptor", "PaletteColorLookupTableData",
                             "SegmentedPaletteColorLookupTableData")]
CM_UNITS = 3  # Physical Units X/Y Direction: 3 = centimetres
SPATIAL_2D = 1  # Region Spatial Format: 1 = a 2-D (B-mode) image; 2 M-mode, 3 spectral, 4 waveform, ...
NO_SPACING_IMAGE = "none: an image file records no pixel spacing (--pixel-spacing MM gives it)"
NO_SPACING_DICOM = "none: the file records no pixel spacing"
GIVEN = "--pixel-spacing"
# What a scanner's pixel can measure, in mm: a spacing outside this is a damaged or made-up value, never a size
SPACING_RANGE_MM = (0.001, 10.0)
MIN_REGION = 16  # pixels a side: an ultrasound region smaller than this cannot hold a lesion, it is not an image

# pydicom reports odd values through warnings and its logger, quoting them: say nothing of a file's contents
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)


@dataclass(frozen=True)
class Header:
    """What a DICOM file says about its pixels, and nothing else."""

    rows: int
    columns: int
    frames: int
    photometric: str
    region: tuple[int, int, int, int] | None  # (x0, y0, x1, y1), ends exclusive: the ultrasound image region
    spacing: tuple[float, float] | None  # (x, y) mm per pixel
    spacing_source: str  # where the spacing comes from, or "none: why"
    note: str | None = None  # something in the file that is not used, and why (a stated skip)


@dataclass
class Scan:
    """One grey frame, the part of it the model sees, and the physical size of its pixels."""

    image: np.ndarray  # grey uint8 HxW: the whole frame as displayed
    region: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1), ends exclusive; None: the whole frame
    spacing: tuple[float, float] | None = None  # (x, y) mm per pixel; None: unknown (sizes stay in pixels)
    spacing_source: str = NO_SPACING_IMAGE
    frame: int | None = None  # 1-based frame number of a multi-frame file; None: a single image
    frames: int = 1

    def model_input(self) -> np.ndarray:
        """The pixels the model sees: the ultrasound region (the scanner's text, calipers and colour bar cut
        away), or the whole frame."""
        if self.region is None:
            return self.image
        x0, y0, x1, y1 = self.region
        return np.ascontiguousarray(self.image[y0:y1, x0:x1])

    def full_frame(self, prob: np.ndarray) -> np.ndarray:
        """A probability map of `model_input()` placed back in the whole frame (zero outside the region)."""
        if self.region is None:
            return prob
        x0, y0, x1, y1 = self.region
        full = np.zeros(self.image.shape, dtype=prob.dtype)
        full[y0:y1, x0:x1] = prob
        return full


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a file with the 'DICM' marker at byte 128, whatever its name; False for anything unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(MARKER_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_name(path: Path) -> bool:
    return path.suffix.lower() in DICOM_EXTENSIONS


def read_header(path: str | os.PathLike) -> Header:
    """The pixel description, frame count, image region and spacing of a DICOM file; DataError for a file that
    is not DICOM, is damaged, holds no image, or holds pixels this project cannot read."""
    import pydicom

    path = Path(path)
    if not is_dicom(path):
        raise utils.DataError(f"not a DICOM file (no 'DICM' marker at byte 128): {path}")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        transfer = ds.file_meta.get("TransferSyntaxUID")
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        photometric = str(ds.get("PhotometricInterpretation") or "").strip()
        frames = int(ds.get("NumberOfFrames") or 1)
        bits = (int(ds.get("BitsAllocated") or 0), int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0),
                int(ds.get("PixelRepresentation") or 0))
    except Exception:  # noqa: BLE001 - pydicom's message may quote the file's values: say what, not what it read
        raise utils.DataError(f"cannot read DICOM file (damaged or truncated header): {path}") from None
    if not rows or not columns or not photometric:
        if _image_object(ds):
            raise utils.DataError(f"cannot read DICOM file (damaged or truncated header: it ends before its image "
                                    f"description): {path}")
        raise utils.DataError(f"no image in DICOM file (a report or another object without pixels): {path}")
    _check_decodable(path, transfer)
    if photometric not in READABLE_PHOTOMETRIC:
        raise utils.DataError(f"cannot read DICOM file: photometric interpretation {photometric} is not one of "
                                f"{', '.join(READABLE_PHOTOMETRIC)}: {path}")
    if bits[0] != 8 or bits[1] != 8 or bits[2] != 0:  # fewer bits used: a grey scale of its own, not guessed
        raise utils.DataError(f"cannot read DICOM file: {bits[0]}-bit {'signed' if bits[2] else 'unsigned'} "
                                f"pixels ({bits[1]} bits used); scanners store ultrasound as 8-bit unsigned, and no "
                                f"grey scale is guessed for others: {path}")
    if frames < 1:
        raise utils.DataError(f"cannot read DICOM file: it says it holds {frames} frames: {path}")
    try:
        region, item, note = _region(ds, rows, columns)
        spacing, source, spacing_note = _spacing(ds, item, note)
    except Exception:  # noqa: BLE001 - a malformed geometry element costs the sizes in mm, not the scan
        region, note = None, "its ultrasound region or pixel spacing cannot be read: not used (no size in mm)"
        spacing, source, spacing_note = None, "none: the file's ultrasound region or pixel spacing is malformed", None
    return Header(rows, columns, frames, photometric, region, spacing, source, note or spacing_note)


def _image_object(ds) -> bool:
    """Whether a header read without an image description belongs to an image object (its SOP class is an image
    storage, or the header ends before naming one): pydicom reads a truncated file silently, up to where it ends,
    so such a header is a damaged file, not a report."""
    sop = ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None
    sop = sop or ds.get("SOPClassUID")
    if not sop:
        return True
    return "Image" in getattr(sop, "name", "")


def _check_decodable(path: Path, transfer) -> None:
    """DataError, naming the package to install where one would do, for pixel data no installed decoder reads."""
    from pydicom.pixels import get_decoder

    if not transfer:
        raise utils.DataError(f"cannot read DICOM file: no transfer syntax in its header: {path}")
    try:
        decoder = get_decoder(transfer)
    except (NotImplementedError, ValueError):
        raise utils.DataError(f"cannot read DICOM file: its pixel data are encoded as {transfer.name}, which "
                                f"no decoder here reads (export it as uncompressed or JPEG): {path}") from None
    if not decoder.is_available:
        package = next((p for prefix, p in DECODER_PACKAGES.items() if str(transfer).startswith(prefix)), None)
        fix = f"pip install {package}" if package else "install a pydicom decoder for it"
        raise utils.DataError(f"cannot read DICOM file: its pixel data are encoded as {transfer.name}, whose "
                                f"decoder is not installed ({fix}): {path}")


def _region(ds, rows: int, columns: int):
    """(box, its sequence item, None) for the file's 2-D ultrasound region (the largest where there are several),
    (None, None, None) without one, or (None, None, why it is not used)."""
    items = [r for r in ds.get("SequenceOfUltrasoundRegions") or [] if r.get("RegionSpatialFormat") == SPATIAL_2D]
    if not items:
        return None, None, None
    try:
        boxes = [tuple(int(r.get(k)) for k in ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1",
                                                "RegionLocationMaxY1")) for r in items]
    except (TypeError, ValueError):
        return None, None, "its ultrasound region has no location: not used (the whole frame is predicted)"
    index = max(range(len(boxes)), key=lambda i: (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1]))
    x0, y0, x1, y1 = boxes[index]
    # Some scanners write the far edge one past the last pixel (the width, not the last index): clipped.
    x1, y1 = min(x1, columns - 1) if x1 == columns else x1, min(y1, rows - 1) if y1 == rows else y1
    if not (0 <= x0 <= x1 < columns and 0 <= y0 <= y1 < rows):
        return None, None, (f"its ultrasound region (x {x0}-{x1}, y {y0}-{y1}) lies outside the {columns}x{rows} "
                            f"image: not used (the whole frame is predicted, and no size in mm is given)")
    if x1 - x0 + 1 < MIN_REGION or y1 - y0 + 1 < MIN_REGION:
        return None, None, (f"its ultrasound region ({x1 - x0 + 1}x{y1 - y0 + 1} pixels) is too small to hold a "
                            f"lesion (under {MIN_REGION}x{MIN_REGION}): not used (the whole frame is predicted, and "
                            f"no size in mm is given)")
    return (x0, y0, x1 + 1, y1 + 1), items[index], None


def _spacing(ds, region, region_note: str | None) -> tuple[tuple[float, float] | None, str, str | None]:
    """((x, y) mm per pixel or None, its source or "none: why", a note when a recorded spacing is refused), from
    the region's physical deltas (cm per pixel), else Pixel Spacing, else Imager Pixel Spacing."""
    if region_note is not None:  # a region not used: its deltas do not describe these pixels
        where = "lies outside the image" if "outside" in region_note else "is too small to hold a lesion"
        return None, f"none: the file's ultrasound region {where}", None
    if region is not None and region.get("PhysicalUnitsXDirection") == CM_UNITS \
            and region.get("PhysicalUnitsYDirection") == CM_UNITS:
        deltas = _positive(region.get("PhysicalDeltaX"), region.get("PhysicalDeltaY"))
        if deltas is None:
            return None, "none: the ultrasound region's physical delta is 0, negative or missing", \
                "its ultrasound region's physical delta is 0, negative or missing: no size in mm is given"
        return _bounded((deltas[0] * 10, deltas[1] * 10), "ultrasound region", "ultrasound region's physical delta")
    for keyword, name in (("PixelSpacing", "Pixel Spacing"), ("ImagerPixelSpacing", "Imager Pixel Spacing")):
        value = ds.get(keyword)
        if value is None:
            continue
        # one value is read as a number, not a list (VM 1); a pair is stored as (row, column) = (y, x)
        try:
            values = [value] if isinstance(value, (str, bytes)) else list(value)
        except TypeError:
            values = [value]
        pair = _positive(*(values[::-1] if len(values) == 2 else [None]))
        if pair is None:
            why = f"has {len(values)} value(s), not 2 (row, column)" if len(values) != 2 else \
                "is 0, negative or malformed"
            return None, f"none: the file's {name} {why}", f"its {name} {why}: no size in mm is given"
        return _bounded(pair, name, name)
    if region is not None:
        return None, "none: the ultrasound region is not in centimetres, and the file records no Pixel Spacing", None
    return None, NO_SPACING_DICOM, None


def _bounded(pair: tuple[float, float], source: str, name: str):
    """`_spacing`'s answer for a recorded spacing (mm per pixel): used within SPACING_RANGE_MM, else unknown with the
    reason (1e300 cm would give infinite areas, 1e-300 a lesion of 0.00 mm)."""
    low, high = SPACING_RANGE_MM
    if all(low <= v <= high for v in pair):
        return pair, source, None
    why = (f"its {name} ({pair[0]:.3g} x {pair[1]:.3g} mm per pixel) lies outside the {low:g}-{high:g} mm a "
           f"scanner's pixel measures")
    return None, f"none: {why}", f"{why}: no size in mm is given"


def _positive(*values) -> tuple[float, float] | None:
    try:
        pair = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return pair if len(pair) == 2 and all(math.isfinite(v) and v > 0 for v in pair) else None


def read_frames(path: str | os.PathLike, header: Header, frames: list[int]):
    """Yield the grey uint8 image of each 1-based frame number in `frames`, decoding one at a time (a cine loop
    is never held whole). DataError for a frame that cannot be decoded (truncated or damaged pixel data)."""
    from pydicom import Dataset
    from pydicom.pixels import apply_color_lut, iter_pixels

    path = Path(path)
    for number in frames:
        if not 1 <= number <= header.frames:
            raise utils.DataError(f"no frame {number} in DICOM file of {header.frames} frame(s): {path}")
    luts = Dataset()
    pixels = iter_pixels(path, indices=[n - 1 for n in frames], ds_out=luts, specific_tags=PALETTE_TAGS)
    for number in frames:
        try:
            array = next(pixels)
            if header.photometric == "PALETTE COLOR":
                array = apply_color_lut(array, luts)
            elif header.photometric == "MONOCHROME1":  # 0 is white
                array = 255 - array
            grey = image_io.grey_from_array(np.asarray(array))
        except Exception:  # noqa: BLE001 - pydicom's message may quote the file's values: say what, not what it read
            where = f"frame {number} of " if header.frames > 1 else ""
            raise utils.DataError(f"cannot decode {where}DICOM file (no pixel data, or truncated or damaged): "
                                    f"{path}") from None
        if grey.shape != (header.rows, header.columns):
            raise utils.DataError(f"cannot decode DICOM file: its pixels are {grey.shape[1]}x{grey.shape[0]}, its "
                                    f"header says {header.columns}x{header.rows}: {path}")
        yield grey


def frame_count(path: str | os.PathLike) -> int:
    """How many frames predict makes of a file: a DICOM file's frame count, 1 for an image file; DataError for a
    DICOM file that cannot be read."""
    return read_header(path).frames if is_dicom(path) else 1


def load_scan(path: str | os.PathLike, frame: int | None = None, pixel_spacing: float | None = None) -> Scan:
    """One scan from a file: a DICOM file's frame `frame` (1-based; needed for a multi-frame file) with its region
    and spacing, or an image file read as image_io.load_image reads it. `pixel_spacing` (mm per pixel) stands in
    where the file records no usable spacing. DataError, one line naming the file, for anything unreadable."""
    path = Path(path)
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, numbers.Integral) or frame < 1):
        raise ValueError(f"frame must be a frame number from 1 (frames are counted from 1), got {frame!r}")
    if not (is_dicom(path) or is_dicom_name(path)):
        image = image_io.load_image(path)
        if frame not in (None, 1):
            raise utils.DataError(f"no frame {frame} in a single image: {path}")
        return with_spacing(Scan(image), pixel_spacing)
    header = read_header(path)
    if frame is None and header.frames > 1:
        raise utils.DataError(f"a DICOM file of {header.frames} frames: choose a frame (1-{header.frames}): {path}")
    image = next(read_frames(path, header, [frame or 1]))
    return with_spacing(Scan(image, header.region, header.spacing, header.spacing_source,
                            frame if header.frames > 1 else None, header.frames), pixel_spacing)


def with_spacing(scan: Scan, pixel_spacing: float | None) -> Scan:
    """`scan` with `pixel_spacing` (mm per pixel, square pixels, given by the user) where its file records none
    (a spacing the file records but that is refused, such as a region outside the image, is not replaced)."""
    if pixel_spacing is not None and (scan.spacing_source in (NO_SPACING_IMAGE, NO_SPACING_DICOM)
                                      or scan.spacing_source.startswith("none: an array")):
        scan.spacing, scan.spacing_source = (float(pixel_spacing), float(pixel_spacing)), GIVEN
    return scan


# --------------------------------------------------------------------------------------------------------------
# The scans a user names: files, folders, globs (predict_busi.py, adapt.py)
# --------------------------------------------------------------------------------------------------------------
def _is_candidate(path: Path) -> bool:
    """An image or DICOM file that is not ground truth (X_mask.png, X_mask_N.png: the loader's rule), hidden, or of
    another type. DICOM is recognised by content too (archives write files without an extension); a DICOMDIR is
    an archive's index, not a scan."""
    name = path.name
    known = path.suffix.lower() in utils.IMAGE_EXTENSIONS or is_dicom_name(path)
    return (not name.startswith(".") and image_io.MASK_RE.match(path.stem) is None
            and name.lower() not in image_io.IGNORED_NAMES and name.upper() != "DICOMDIR" and path.is_file()
            and (known or is_dicom(path)))


def find_inputs(spec: str, skipped: dict | None = None) -> list[Path]:
    """Expand --input: one file (taken as given), a folder (its images, not recursive) or a glob pattern.

    An earlier run's outputs in a folder (prediction_table.earlier_prediction: listed by a predictions.csv there, or
    X_pred.png / X_overlay.png beside a scan X) are not taken as new scans: named in `skipped["earlier"]`; a
    dangling symbolic link, which cannot be read, in `skipped["broken"]`.
    """
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        entries = list(path.iterdir())
    else:
        entries = [Path(p) for p in glob.glob(spec)]
    found, listed = [], {}  # (each folder's predictions.csv read once)
    for p in sorted(entries, key=image_io.natural_key):
        if p.is_symlink() and not p.exists() and not p.name.startswith("."):
            if skipped is not None:
                skipped["broken"].append(f"broken symbolic link: {utils.printable(p)} -> {utils.printable(os.readlink(p))}")
        elif _is_candidate(p):
            why = prediction_table.earlier_prediction(p, listed)
            if why is None:
                found.append(p)
            elif skipped is not None:
                skipped["earlier"].append(f"{utils.printable(p.name)} ({why})")
    return found


def gather_inputs(specs: list[str], skipped: dict | None = None) -> list[Path]:
    """Every spec's inputs (find_inputs), in order, each file once (the first time its resolved path is reached).

    Raises ValueError naming a spec that matches nothing (a broken link given directly: naming its target).
    """
    paths, seen = [], set()
    for spec in specs:
        found = find_inputs(spec, skipped)
        if not found and Path(spec).is_symlink() and not Path(spec).exists():
            raise ValueError(f"broken symbolic link: {utils.printable(spec)} -> {os.readlink(spec)}")
        if not found:
            what = "folder has no images" if Path(spec).is_dir() else "no file matches"
            raise ValueError(f"{what}: {utils.printable(spec)}")
        for path in found:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                paths.append(path)
    return paths
