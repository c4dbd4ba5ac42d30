"""Tests on the real BUSI data (../shared/data/Dataset_BUSI_with_GT); skipped when it is absent."""
from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest
from conftest import REAL_BUSBRA, REAL_DATA, ROOT, requires_busbra, requires_real_data

import checkpoints
import dataset
import image_io
import inference
import metrics
import splitting
import train_unet_busi
import utils

pytestmark = requires_real_data


def test_discovery_counts():
    samples = image_io.discover_samples(REAL_DATA)
    assert len(samples) == 780
    assert collections.Counter(s.label for s in samples) == {"benign": 437, "malignant": 210, "normal": 133}
    assert sum(len(s.masks) > 1 for s in samples) == 17
    assert sum(len(s.masks) for s in samples) == 798


def test_rgba_and_multi_masks_merge_and_normals_are_empty():
    samples = {s.image: s for s in image_io.discover_samples(REAL_DATA)}
    s = samples["benign/benign (4).png"]  # two masks, the second RGBA
    image, merged = image_io.load_sample(REAL_DATA, s)
    parts = [image_io.load_mask([REAL_DATA / m]) for m in s.masks]
    assert merged.sum() == np.logical_or.reduce(parts).sum() > max(p.sum() for p in parts)
    for name in ("normal/normal (1).png", "normal/normal (34).png"):
        assert not image_io.load_sample(REAL_DATA, samples[name])[1].any()


def test_committed_split_covers_the_data_and_no_duplicate_group_straddles_it():
    samples = image_io.discover_samples(REAL_DATA)
    split = splitting.read_split(utils.DEFAULT_SPLIT_FILE, samples)
    assert splitting.split_matches(split, samples)
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
    regenerated = splitting.compute_split(REAL_DATA, progress=False)
    committed = json.loads(utils.DEFAULT_SPLIT_FILE.read_text())
    assert regenerated == committed


SHIPPED = checkpoints.DEFAULT_CHECKPOINT


def readme_row(section: str, label: str) -> list[float]:
    """The 0.xxx figures of the Markdown table row (README, RESULTS.md) that starts with `label`."""
    row = next(line for line in section.splitlines() if line.startswith(f"| {label}"))
    return [float(v) for v in re.findall(r"\b\d\.\d{3}\b", row)]


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.is_file(), reason="shipped model absent")
def test_shipped_model_prints_the_figures_the_docs_claim(tmp_path):
    results = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    section = results[results.index("### The shipped model"):results.index("### Against the literature")]
    assert train_unet_busi.main(["--eval-only", "--checkpoint", str(SHIPPED), "--data-dir", str(REAL_DATA),
                                 "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
                                 "--device", "cpu"]) == 0
    t = json.loads((tmp_path / f"eval-{SHIPPED.stem}" / "metrics.json").read_text())["test"]
    claims = {"lesion images (benign + malignant), per-image mean": [t["lesion_dice"], t["lesion_iou"]],
              "lesion images, pooled over pixels": [t["lesion_pooled_dice"]],
              "benign": [t["per_class"]["benign"]["dice"], t["per_class"]["benign"]["iou"]],
              "malignant": [t["per_class"]["malignant"]["dice"], t["per_class"]["malignant"]["iou"]],
              "normal: images with any predicted lesion pixel": [t["normal_fp_rate"]],
              "ROC AUC, malignant vs benign": [t["malignancy_auc"]],
              "3-way accuracy": [t["class_accuracy"]]}
    for label, measured in claims.items():
        assert readme_row(section, label) == [round(v, 3) for v in measured], label
    # the double-check table of docs/results.md: the trust score and the calibration, as this evaluation measures them
    section = results[results.index("### Which outputs to double-check"):results.index("### More in RESULTS.md")]
    trust = t["trust"]
    assert readme_row(section, "BUSI test") == [round(v, 3) for v in (
        trust["auroc_trust"], trust["auroc_max_probability"], trust["lesion_dice_all"],
        trust["lesion_dice_most_trusted_80pct"], trust["malignancy_ece"])]


@pytest.mark.slow
def test_mask_round_trip_through_the_training_size_costs_what_results_md_says():
    """Ground truth -> training size (image_io.resize_mask, as the cache does) -> original size (the evaluation's
    own resize) -> Dice against itself: the ceiling that the input size alone puts on per-image Dice. Lesion
    images of train + val (the test split is not looked at)."""
    import torch


    results = (ROOT / "RESULTS.md").read_text(encoding="utf-8")
    section = results[results.index("### Where the Dice is lost"):results.index("### Open work")]
    split = json.loads(utils.DEFAULT_SPLIT_FILE.read_text())
    names = set(split["train"]) | set(split["val"])
    sizes = (128, 192, 256, 320, 384)
    dice = {size: [] for size in sizes}
    for sample in image_io.discover_samples(REAL_DATA):
        if sample.image not in names or sample.label == "normal":
            continue
        mask = image_io.load_mask([REAL_DATA / m for m in sample.masks])
        for size in sizes:
            small = torch.from_numpy(image_io.resize_mask(mask, size))[None].float()
            back = inference.probs_to_original(small, *mask.shape) > 0.5
            dice[size].append(metrics.dice_iou(back, torch.from_numpy(mask))[0])
    assert len(dice[128]) == 550
    for size in sizes:
        assert readme_row(section, f"{size} px") == [round(float(np.mean(dice[size])), 3),
                                                     round(float(np.min(dice[size])), 3)], size


@requires_busbra
def test_busbra_split_keeps_every_patient_on_one_side_and_is_what_the_command_regenerates():
    """The committed BUS-BRA split: all 1492 images, train and val only (the test sets are held back), no patient
    (bus_NNNN) on both sides, found by its images whatever --split-file says, and regenerated by dataset.py."""
    samples = image_io.discover_samples(REAL_BUSBRA)
    assert len(samples) == 1492 and {s.label for s in samples} == {"benign", "malignant"}
    path = ROOT / "splits" / "busbra_split.json"
    split, source = dataset.choose_split(REAL_BUSBRA, samples)
    assert source == str(path.resolve()) and split["test"] == []
    side = collections.defaultdict(set)
    for part in ("train", "val"):
        for name in split[part]:
            side[re.search(r"(bus_\d+)-", name).group(1)].add(part)
    assert len(side) == 852 and all(len(parts) == 1 for parts in side.values())
    regenerated = splitting.compute_split(REAL_BUSBRA, samples, progress=False, fractions=(0.8, 0.2, 0.0),
                                        patient_pattern=r"^(bus_[0-9]+)-")
    del regenerated["test"]
    assert regenerated == json.loads(path.read_text())
