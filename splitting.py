"""Leakage-safe splits: perceptual hashes and near-duplicate groups, patient groups, the stratified split
that keeps every group on one side, and split files (read, written, matched against a folder)."""
from __future__ import annotations

import hashlib
import json
import re
import sys
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

import utils
from image_io import Sample, discover_samples, load_image, map_threads
from utils import CLASSES, SPLIT_FRACTIONS, SPLIT_SEED, DataError

# Two images are near-duplicates when their 64-bit perceptual hashes differ in at most this many bits.
from storage import atomic_write
# Chosen by looking at BUSI's pairs: the same scan re-saved, re-cropped or re-annotated with calipers sits at
# 0-12 bits (dense at 0-6, sparse at 8-12), while the bulk of distinct scans is at 14+ (some true pairs too).
# Erring towards grouping is safe: a wrongly grouped pair only moves together, it cannot leak.
DUPLICATE_MAX_BITS = 12
# Across two sources (two hospitals) distinct scans come closer: BUSI and BUS-BRA have 20 pairs at 10-12 bits and
# none below. A copy of one scan (re-saved, re-sized) sits at 0-6: near-duplicates across sources are those.
CROSS_SOURCE_MAX_BITS = 6


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
                      map_threads(lambda s: perceptual_hash(load_image(root / s.image)), samples, progress, "hashing")))
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
