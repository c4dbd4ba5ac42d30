"""predict_busi.py's table of what it wrote (predictions.csv): its name and columns, and the one rule by which
every tool tells an earlier prediction (a mask, an overlay) from a scan."""
from __future__ import annotations

from pathlib import Path

from utils import IMAGE_EXTENSIONS

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

