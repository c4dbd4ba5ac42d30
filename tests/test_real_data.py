"""Tests on the real BUSI data (../shared/data/Dataset_BUSI_with_GT); skipped when it is absent."""
from __future__ import annotations

import collections
import json

import numpy as np

import dataset
from conftest import REAL_DATA, requires_real_data

pytestmark = requires_real_data


def test_discovery_counts():
    samples = dataset.discover_samples(REAL_DATA)
    assert len(samples) == 780
    assert collections.Counter(s.label for s in samples) == {"benign": 437, "malignant": 210, "normal": 133}
    assert sum(len(s.masks) > 1 for s in samples) == 17
    assert sum(len(s.masks) for s in samples) == 798


def test_rgba_and_multi_masks_merge_and_normals_are_empty():
    samples = {s.image: s for s in dataset.discover_samples(REAL_DATA)}
    s = samples["benign/benign (4).png"]  # two masks, the second RGBA
    image, merged = dataset.load_sample(REAL_DATA, s)
    parts = [dataset.load_mask([REAL_DATA / m]) for m in s.masks]
    assert merged.sum() == np.logical_or.reduce(parts).sum() > max(p.sum() for p in parts)
    for name in ("normal/normal (1).png", "normal/normal (34).png"):
        assert not dataset.load_sample(REAL_DATA, samples[name])[1].any()


def test_committed_split_covers_the_data_and_no_duplicate_group_straddles_it():
    samples = dataset.discover_samples(REAL_DATA)
    split = dataset.read_split(dataset.DEFAULT_SPLIT_FILE, samples)
    assert dataset.split_matches(split, samples)
    where = {n: k for k in ("train", "val", "test") for n in split[k]}
    for group in split["duplicate_groups"]:
        assert len({where[n] for n in group}) == 1, group
    # the known cross-class duplicates are detected
    grouped = {n: tuple(g) for g in split["duplicate_groups"] for n in g}
    assert "malignant/malignant (145).png" in grouped["benign/benign (433).png"]
    assert "normal/normal (34).png" in grouped["benign/benign (437).png"]
    # stratified ~70/15/15 per class
    for label, n in (("benign", 437), ("malignant", 210), ("normal", 133)):
        for key, frac in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
            count = sum(x.startswith(label + "/") for x in split[key])
            assert abs(count - frac * n) <= 0.03 * n + 2, (label, key, count)


def test_committed_split_is_what_the_command_regenerates():
    regenerated = dataset.compute_split(REAL_DATA, progress=False)
    committed = json.loads(dataset.DEFAULT_SPLIT_FILE.read_text())
    assert regenerated == committed
