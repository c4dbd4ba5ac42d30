"""What the prediction inspector lists and knows, apart from its window (no Tk, no Matplotlib; tested without a
display): the items (a split's scans with their ground truth, or opened files and DICOM frames), the class filter
and the sort order that make the list, the predictions cached per item, and each one's Dice at the threshold."""
from __future__ import annotations

import functools
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import dataset
import dicom_io
import image_io
import metrics
import utils
from inference import Prediction

CLASS_FILTERS = ("all", *utils.CLASSES)
REVIEW_MARK = "\u2691"  # a flag: trust below the review threshold
OUT_OF_RANGE_BADGE = "\u26a0"  # a warning sign: unlike the scans the model was fitted on


@dataclass(eq=False)  # identity: the same file opened twice is two list entries
class Item:
    """One image in the list; dataset images carry their `sample` (ground truth), opened files do not."""

    path: Path
    label: str | None = None
    data_dir: Path | None = None
    sample: image_io.Sample | None = None
    frame: int | None = None  # the frame of a multi-frame DICOM file (1-based)
    frames: int = 1
    # what the file says of its geometry, known once loaded: the ultrasound region (predicted alone) and the
    # size of a pixel in mm
    region: tuple[int, int, int, int] | None = None
    spacing: tuple[float, float] | None = None

    @functools.cached_property
    def key(self) -> str:
        """Cache key: the same file opened twice, by different relative paths, is predicted once."""
        return str(self.path.resolve()) + ("" if self.frame is None else f"#{self.frame}")

    @property
    def name(self) -> str:
        return self.path.name + ("" if self.frame is None else f" [frame {self.frame}/{self.frames}]")

    @property
    def has_truth(self) -> bool:
        return self.sample is not None

    def load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Grey uint8 image and bool ground truth (None for opened files); raises utils.DataError."""
        if self.sample is not None:
            return image_io.load_sample(self.data_dir, self.sample)
        scan = dicom_io.load_scan(self.path, self.frame)  # an image or a DICOM file
        self.region, self.spacing = scan.region, scan.spacing
        return scan.image, None


def packed_truth(truth: np.ndarray | None) -> np.ndarray | None:
    """np.packbits of a bool ground truth: 1/8 of the memory while it waits in the cache."""
    return None if truth is None else np.packbits(truth)


def dice_iou_at(prediction: Prediction, truth_bits: np.ndarray | None, threshold: float) -> tuple[float, float] | None:
    """(Dice, IoU) of the prediction's mask at `threshold` against its packed ground truth; None without truth."""
    if truth_bits is None:
        return None
    h, w = prediction.probability.shape
    truth = np.unpackbits(truth_bits, count=h * w).reshape(h, w).astype(bool)
    return metrics.dice_iou(torch.from_numpy(prediction.mask_at(threshold)), torch.from_numpy(truth))


def file_items(path: Path, check: bool = False) -> list[Item]:
    """The list entries of one opened file: one, or one per frame of a cine loop (each decoded when shown). A
    DICOM file whose header cannot be read is one entry that fails, with its reason, when shown; DataError
    instead with `check`."""
    try:
        frames = dicom_io.frame_count(path)
    except utils.DataError:
        if check:
            raise
        frames = 1
    if frames == 1:
        return [Item(path)]
    return [Item(path, frame=n, frames=frames) for n in range(1, frames + 1)]


def dataset_items(data_dir: str | os.PathLike, split: str = "test",
                  split_file: str | os.PathLike = utils.DEFAULT_SPLIT_FILE) -> tuple[list[Item], str]:
    """The items of one split of a BUSI-layout folder, and a note on where the split came from.

    The split file is used when it lists exactly this folder's images; otherwise (e.g. the bundled sample) a
    leakage-safe split is computed with splitting.compute_split, as training does. A file (a data bundle made by
    `python dataset.py --bundle`, which training takes) is refused: the window shows the scans themselves.
    """
    if split not in utils.SPLITS:
        raise ValueError(f"unknown split {split!r} (choose from {', '.join(utils.SPLITS)})")
    root = Path(data_dir)
    if root.is_file():  # else "data dir not found", which sends the user looking for a missing path
        needs = "the inspector needs the image folder (benign/, malignant/, normal/)"
        if zipfile.is_zipfile(root):  # a bundle is a torch.save zip archive
            raise utils.DataError(f"{root} is a data bundle: {needs} it was made from")
        raise utils.DataError(f"{root} is a file, not a data folder: {needs}")
    samples = image_io.discover_samples(root)
    note = f"{root}: all {len(samples)} images"
    if split != "all":
        chosen, source = dataset.choose_split(root, samples, split_file)
        note = f"{root}: {split} split ({Path(source).name if source.endswith('.json') else source})"
        names = set(chosen[split])
        samples = [s for s in samples if s.image in names]
    items = [Item(root / s.image, s.label, root, s) for s in samples]
    return sorted(items, key=lambda it: image_io.natural_key(it.path)), note


class Browser:
    """The list: `items`, the ones shown (`visible`, indices into items, filtered by `class_filter` and ordered by
    `sort_mode`: name, dice (worst first) or trust (lowest first)), the predictions cached per Item.key (maps in
    float16: half the memory, far finer than the threshold's 0.01) with the packed ground truth, and `threshold`."""

    def __init__(self, items=()):
        self.items: list[Item] = list(items)
        self.visible: list[int] = []
        self.cache: dict[str, Prediction] = {}
        self.truth_bits: dict[str, np.ndarray | None] = {}
        self._dice_memo: dict[tuple[str, float], float | None] = {}
        self.class_filter = "all"
        self.sort_mode = "name"
        self.threshold = 0.5

    def forget(self) -> None:
        """Drop every prediction (another model)."""
        self.cache.clear()
        self.truth_bits.clear()
        self._dice_memo.clear()

    def store(self, item: Item, prediction: Prediction, truth: np.ndarray | None) -> None:
        self.cache[item.key] = prediction
        self.truth_bits[item.key] = packed_truth(truth)

    def unpredicted(self, mode: str) -> list[int]:
        """The listed items a sort by `mode` still has to predict (a sort by Dice: those with ground truth)."""
        return [i for i in self.visible if self.items[i].key not in self.cache
                and (self.items[i].has_truth or mode == "trust")]

    def dice_of(self, i: int) -> float | None:
        """Dice of item i at the threshold from its cached map (None: no truth or not predicted)."""
        key = self.items[i].key
        prediction = self.cache.get(key)
        if prediction is None:
            return None
        memo = (key, self.threshold)
        if memo not in self._dice_memo:  # re-filtering a sorted list must not redo hundreds of full-size masks
            figures = dice_iou_at(prediction, self.truth_bits[key], self.threshold)
            self._dice_memo[memo] = None if figures is None else figures[0]
        return self._dice_memo[memo]

    def arrange(self) -> list[int]:
        """`visible` made again from the filter and the sort order."""
        visible = [i for i, item in enumerate(self.items)
                   if self.class_filter == "all" or item.label == self.class_filter]
        if self.sort_mode == "dice":
            dice = {i: self.dice_of(i) for i in visible}
            visible.sort(key=lambda i: (dice[i] is None, dice[i] if dice[i] is not None else 0.0))
        elif self.sort_mode == "trust":
            trust = {i: getattr(self.cache.get(self.items[i].key), "trust", None) for i in visible}
            visible.sort(key=lambda i: (trust[i] is None, trust[i] if trust[i] is not None else 0.0))
        self.visible = visible
        return visible

    def title(self) -> str:
        """The list's heading: how many, which class, in which order."""
        order = {"dice": f", Dice at threshold {self.threshold:.2f}, worst first",
                 "trust": ", trust, lowest first"}.get(self.sort_mode, "")
        return f"{len(self.visible)} images ({self.class_filter}){order}"

    def entry(self, i: int) -> str:
        """One list line: once predicted, Dice at the threshold ("-" without ground truth) and trust (a flag below
        the review threshold), then the file name."""
        item = self.items[i]
        prediction = self.cache.get(item.key)
        if prediction is None:
            return item.name
        dice = self.dice_of(i)
        text = "  -  " if dice is None else f"{dice:.3f}"
        if prediction.trust is not None:
            text += f"  trust {prediction.trust:.2f}" + (f" {REVIEW_MARK}" if prediction.review else "  ") + (
                f"{OUT_OF_RANGE_BADGE}" if prediction.out_of_range else " ")
        return f"{text}  {item.name}"

    def flagged(self) -> int:
        """How many listed, predicted scans are flagged for review."""
        return sum(bool(self.cache[self.items[i].key].review) for i in self.visible if self.items[i].key in self.cache)

    def summary(self) -> str:
        """The listed images' figures as the README reports them: lesion Dice (benign and malignant images),
        and normal images with any predicted lesion pixel."""
        lesion = [d for i in self.visible if self.items[i].label in ("benign", "malignant")
                  for d in [self.dice_of(i)] if d is not None]
        normal = [self.cache[self.items[i].key] for i in self.visible
                  if self.items[i].label == "normal" and self.items[i].key in self.cache]
        fp = sum(bool(p.mask_at(self.threshold).any()) for p in normal)
        return ((f" | lesion Dice {np.mean(lesion):.3f} (n={len(lesion)})" if lesion else "")
                + (f" | normal FP {fp} of {len(normal)}" if normal else ""))
