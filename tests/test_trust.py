"""The per-image trust score and the calibration (trust.py): the maths against hand counts, the shipped model's
score on real scans and on scans unlike them, a checkpoint without (or with a damaged or impossible) trust
entry, and fit_trust.py."""
from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image, ImageFilter
from test_predict import save_tiny_checkpoint, scan

import checkpoints
import dataset
import image_io
import metrics
import predict_busi
import reports
import trust
from inference import Predictor

SAMPLE = ROOT / "data" / "busi_sample"


def test_a_source_where_every_scan_failed_says_so_not_no_failures(capsys):
    """Its failure AUROC is undefined because no outline was right, not because none failed."""
    import evaluation
    import reports

    rng = np.random.default_rng(0)
    records = []
    for i in range(12):
        source, good = ("A", i % 2 == 0) if i < 6 else ("B", False)
        records.append({"file": f"{source}/benign/{i}.png", "label": "benign", "dice": 0.9 if good else 0.1,
                        "iou": 0.8 if good else 0.05, "pred_pixels": 50, "gt_pixels": 50, "inter": 45 if good else 3,
                        "trust": float(rng.random()), "max_probability": float(rng.random()), "review": False,
                        "source": source})
    summary = evaluation.summarize(records, with_trust=True)
    assert summary["per_source"]["B"]["trust"]["n_failures"] == 6
    reports.print_summary("validation", summary)
    lines = {line.split(":")[0].strip(): line for line in capsys.readouterr().out.splitlines()}
    assert "n/a (every scan failed)" in lines["source B"] and "no failures" not in lines["source B"]
    assert "n/a" not in lines["source A"]


# ---------------------------------------------------------------------------------------------- the maths
def test_logistic_fit_separates_and_the_temperature_is_recovered():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    y = (x[:, 0] - 0.5 * x[:, 1] + 0.3 * rng.normal(size=400) > 0).astype(float)
    w, b = trust.fit_logistic(x, y)
    assert w[0] > 0 > w[1] and abs(w[0] / w[1] + 2) < 0.6  # the direction of the rule that made the labels
    # logits twice as sure as the truth: a temperature of about 2 undoes it
    true_logit = rng.normal(scale=2.0, size=4000)
    labels = rng.random(4000) < 1 / (1 + np.exp(-true_logit))
    assert trust.fit_temperature(2 * true_logit, labels) == pytest.approx(2.0, rel=0.1)
    assert trust.fit_temperature(true_logit, np.ones(10)) == 1.0  # one class only: nothing to fit


def test_calibration_error_risk_coverage_and_flagged_share_by_hand():
    # bins [0.1, 0.2): p 0.1, 0.1 -> 1 of 2 positive (|0.5 - 0.1| = 0.4); [0.9, 1]: 0.9, 1.0 -> 2 of 2 (|1 - 0.95|)
    assert metrics.expected_calibration_error([0.1, 0.1, 0.9, 1.0], [1, 0, 1, 1]) == \
        pytest.approx((0.4 * 2 + 0.05 * 2) / 4)
    # most trusted first: trust 0.9 (Dice 1.0), 0.5 (0.0), 0.1 (0.5), 0.7 (0.8)
    curve = dict((c, d) for c, d in metrics.risk_coverage([0.9, 0.5, 0.1, 0.7], [1.0, 0.0, 0.5, 0.8], (1.0, 0.5, 0.25)))
    assert curve == pytest.approx({1.0: 0.575, 0.5: 0.9, 0.25: 1.0})
    # 10 images, the riskiest 20 % = 2: one of the two failures is among them
    risk = np.arange(10.0)
    failed = np.zeros(10, bool)
    failed[[9, 3]] = True
    assert metrics.caught_in_flagged(risk, failed, 0.2) == 0.5
    assert trust.review_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([True, True, False, False])) == \
        pytest.approx(0.5)


def test_calibrated_probabilities_keep_their_order_and_sum_to_one():
    cls = torch.softmax(torch.randn(50, 3, generator=torch.Generator().manual_seed(0)) * 3, 1)
    fitted = {"temperatures": [2.0, 0.5]}
    out = trust.calibrated(cls, fitted)
    assert torch.allclose(out.sum(1), torch.ones(50), atol=1e-5)
    raw_lesion, raw_mal = trust.class_logits(cls)
    new_lesion, new_mal = trust.class_logits(out)
    assert torch.allclose(new_lesion, raw_lesion / 2.0, atol=1e-3) and torch.allclose(new_mal, raw_mal / 0.5, atol=1e-2)
    assert trust.calibrated(cls, None) is cls


def test_failures_are_poor_outlines_missed_lesions_and_outlines_on_normal_scans():
    records = [{"label": "benign", "dice": 0.7, "pred_pixels": 5}, {"label": "benign", "dice": 0.3, "pred_pixels": 5},
               {"label": "malignant", "dice": 0.0, "pred_pixels": 0},
               {"label": "normal", "dice": 0.0, "pred_pixels": 3},
               {"label": "normal", "dice": 1.0, "pred_pixels": 0}]
    assert metrics.failures(records).tolist() == [False, True, True, True, False]


# ---------------------------------------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def predictor():
    return Predictor()


def sample_scans(label: str) -> list:
    return sorted(p for p in (SAMPLE / label).glob("*.png") if "_mask" not in p.name)


def test_shipped_trust_is_deterministic_in_unit_range_and_lower_for_scans_unlike_its_training(predictor):
    """Every benign scan of the bundled sample: the same score twice, in [0, 1]; and where the scan's own outline
    is trusted (not flagged for review), a lower score for pure noise, the inverted scan and the heavily blurred
    scan. (A flagged scan, such as one whose mask the gate emptied, is already distrusted: a confident empty
    mask on its inverted copy can score higher.)"""
    assert predictor.fitted_trust is not None and predictor.why_no_trust is None
    rng, checked = np.random.default_rng(0), 0
    for path in sample_scans("benign"):
        image = image_io.load_image(path)
        first, again = predictor(image), predictor(path)
        assert first.trust == again.trust and 0.0 <= first.trust <= 1.0
        assert first.review == (first.trust < predictor.fitted_trust["review_below"])
        if first.review:
            continue
        checked += 1
        blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(max(image.shape) / 40)))
        for name, other in (("noise", rng.integers(0, 256, image.shape, dtype=np.uint8)),
                            ("inverted", 255 - image), ("blurred", blurred)):
            score = predictor(other).trust
            assert 0.0 <= score < first.trust, (path.name, name, score, first.trust)
    assert checked >= len(sample_scans("benign")) // 2


def test_shipped_malignancy_probability_is_the_calibrated_one(predictor):
    path = sample_scans("malignant")[0]
    result = predictor(path)
    raw = Predictor()
    raw.loaded = dataclasses.replace(raw.loaded, trust=None)  # the model's own softmax, as before calibration
    uncalibrated = raw(path)
    t_lesion, t_malignancy = predictor.fitted_trust["temperatures"]
    logit = np.log(uncalibrated.class_probabilities["malignant"] / uncalibrated.class_probabilities["benign"])
    assert result.malignancy_probability == pytest.approx(1 / (1 + np.exp(-logit / t_malignancy)), abs=1e-4)
    assert uncalibrated.trust is None


# ---------------------------------------------------------------------------------------------- predict's table
def read_rows(folder):
    with open(folder / "predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_predict_writes_trust_and_review_columns_and_counts_the_flagged(tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    fitted = checkpoints.fitted_trust(checkpoints.load_checkpoint(ckpt))[0]
    fitted["review_below"] = 0.5  # half-way, so that this tiny model's scans fall on both sides of it
    checkpoints.save_checkpoint({**checkpoints.load_checkpoint(ckpt), "trust": fitted}, ckpt)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(8):
        Image.fromarray(scan(48, 40, seed=i)).save(src / f"s{i}.png")
    assert predict_busi.main(["--checkpoint", str(ckpt), "--input", str(src), "--output", str(tmp_path / "out"),
                              "--quiet"]) == 0
    rows = read_rows(tmp_path / "out")
    scores = [float(r["trust"]) for r in rows]
    assert len(rows) == 8 and all(0 <= s <= 1 for s in scores)
    assert [r["review"] for r in rows] == ["REVIEW" if s < 0.5 else "" for s in scores]
    flagged = sum(s < 0.5 for s in scores)
    assert f"{flagged} of 8 flagged for review" in capsys.readouterr().out


def test_a_checkpoint_without_trust_statistics_still_predicts_with_one_warning(tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "plain.pt", with_trust=False)
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(scan(48, 40, seed=1)).save(src / "a.png")
    assert predict_busi.main(["--checkpoint", str(ckpt), "--input", str(src), "--output", str(tmp_path / "out"),
                              "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "trust scores unavailable" in err[0]
    row = read_rows(tmp_path / "out")[0]
    assert row["trust"] == "" and row["review"] == "" and row["max_probability"]
    result = Predictor(ckpt)(src / "a.png")
    assert result.trust is None and result.review is None and result.mask.shape == (40, 48)


def test_a_damaged_trust_entry_is_named_and_ignored(tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    state = checkpoints.load_checkpoint(ckpt)
    state["trust"]["weights"] = state["trust"]["weights"][:3]  # a truncated regression
    checkpoints.save_checkpoint(state, tmp_path / "damaged.pt")
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(scan(48, 40, seed=2)).save(src / "a.png")
    assert predict_busi.main(["--checkpoint", str(tmp_path / "damaged.pt"), "--input", str(src), "--output",
                              str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "trust entry is unusable (weights should be 12 numbers)" in err
    assert read_rows(tmp_path / "out")[0]["trust"] == ""


# --------------------------------------------------------------------------------------------- fit_trust.py
def test_trust_command_adds_the_entry_to_an_older_checkpoint_and_never_overwrites(busi_dir, tmp_path, capsys):
    import fit_trust
    import train_unet_busi

    root, _ = busi_dir
    assert train_unet_busi.main(["--data-dir", str(root), "--output-dir", str(tmp_path), "--cache-dir",
                                 str(tmp_path / "cache"), "--encoder", "none", "--image-size", "32", "--base-channels",
                                 "4", "--depth", "2", "--batch-size", "8", "--device", "cpu", "--epochs", "1",
                                 "--run-name", "r"]) == 0
    state = checkpoints.load_checkpoint(tmp_path / "r" / "best.pt")
    del state["trust"]  # as checkpoints trained before the trust score were
    checkpoints.save_checkpoint(state, tmp_path / "old.pt")
    args = ["--checkpoint", str(tmp_path / "old.pt"), "--data-dir", str(root), "--split-file",
            str(tmp_path / "r" / "split.json"), "--output", str(tmp_path / "new.pt"), "--device", "cpu"]
    capsys.readouterr()
    assert fit_trust.main(args) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "new_calibration.png").is_file()
    new = checkpoints.load_checkpoint(tmp_path / "new.pt")
    fitted, why_not = checkpoints.fitted_trust(new)
    assert why_not is None and fitted["n_fit"] > 0
    assert all(torch.equal(new["model"][k], state["model"][k]) for k in state["model"])  # the weights untouched
    before = (tmp_path / "new.pt").read_bytes()
    assert fit_trust.main(args) == 2  # a repeated command changes nothing
    assert "exists" in capsys.readouterr().err and (tmp_path / "new.pt").read_bytes() == before


def test_no_class_head_no_validation_lesions_and_a_foreign_entry(tmp_path):
    """A model without a class head gets a trust score but no temperatures and no calibration figure; a split
    without lesion scans still draws its figure; statistics of another model's width are refused by name."""
    import evaluation
    from test_predict import IMAGE_SIZE
    from unet import UNet

    torch.manual_seed(0)
    model = UNet(1, 1, base_channels=4, depth=2, num_classes=0).eval()
    images = torch.from_numpy(np.stack([scan(IMAGE_SIZE, IMAGE_SIZE, seed=s) for s in range(6)]))[:, None]
    masks = torch.zeros(6, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    masks[:3, :, 8:20, 8:20] = 1
    split = {"images": images, "masks": masks, "labels": torch.tensor([0, 1, 0, 2, 2, 2]),
             "names": [f"s{i}.png" for i in range(6)], "full_sizes": torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * 6),
             "full_masks": [torch.from_numpy(np.packbits(m[0].numpy().astype(bool))) for m in masks]}  # as the cache
    fitted, records = evaluation.fit_trust_entry(model, split, split, torch.device("cpu"), None, 0.5, False, 4, "test")
    assert "temperatures" not in fitted and trust.trust_problem(fitted) is None
    assert reports.write_calibration_figure(tmp_path / "c.png", records, fitted) is False
    assert not (tmp_path / "c.png").exists()
    normal_only = [dict(r, label="normal", class_probs=[0.1, 0.1, 0.8]) for r in records]
    assert reports.write_calibration_figure(tmp_path / "n.png", normal_only, {"temperatures": [1.0, 1.0]})
    state = {"model": {"ups.0.up.weight": torch.zeros(7, 3, 2, 2)}, "trust": fitted}
    entry, why_not = checkpoints.fitted_trust(state)
    assert entry is None and "the model's deepest features 7" in why_not


@pytest.mark.parametrize("damage, words", [
    (lambda t: t["weights"].fill_(float("nan")), "weights holds NaN"),
    (lambda t: t["feature_std"].zero_(), "feature_std should be > 0"),
    (lambda t: t["statistics"]["variances"].fill_(float("inf")), "NaN or infinite"),
    (lambda t: t.update(temperatures=[float("inf"), 1.0]), "temperatures should be two finite"),
])
def test_a_trust_entry_with_impossible_numbers_is_unusable(tmp_path, damage, words):
    state = checkpoints.load_checkpoint(save_tiny_checkpoint(tmp_path / "tiny.pt"))
    damage(state["trust"])
    fitted, why = checkpoints.fitted_trust(state)
    assert fitted is None and "its trust entry is unusable" in why and words in why


def test_a_fit_that_saw_no_right_outline_flags_everything_and_says_so(tmp_path):
    scores, failed = np.linspace(0, 1, 10), np.ones(10, bool)
    assert trust.review_threshold(scores, failed) > 1  # every scan below it
    assert trust.review_threshold(scores, ~failed) == 0.0  # nothing failed: none flagged
    state = checkpoints.load_checkpoint(save_tiny_checkpoint(tmp_path / "tiny.pt"))
    state["trust"].update(review_below=trust.ALL_FLAGGED, no_right_outline=True)
    checkpoints.save_checkpoint(state, tmp_path / "all_wrong.pt")
    Image.fromarray(scan(40, 36)).save(tmp_path / "s.png")
    done = subprocess.run([sys.executable, "predict_busi.py", "--checkpoint", str(tmp_path / "all_wrong.pt"),
                           "--input", str(tmp_path / "s.png"), "--output", str(tmp_path / "out"), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "outlines that were all wrong" in done.stderr and "1 of 1 flagged for review" in done.stdout


@pytest.mark.slow
def test_trust_command_takes_a_bundle_refuses_a_bad_device_and_never_replaces_a_figure(busi_dir, tmp_path):
    root, _ = busi_dir
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt", with_trust=False)
    bundle = tmp_path / "busi.pt"
    assert dataset.main(["--data-dir", str(root), "--bundle", str(bundle), "--image-size", "32"]) == 0
    split = tmp_path / "split.json"
    assert dataset.main(["--data-dir", str(root), "--out", str(split)]) == 0

    def run(*args):
        return subprocess.run([sys.executable, "fit_trust.py", "--checkpoint", str(ckpt), *args], cwd=ROOT,
                              capture_output=True, text=True)

    done = run("--data-dir", str(bundle), "--split-file", str(split), "--output", str(tmp_path / "new.pt"))
    assert done.returncode == 0, done.stderr
    assert checkpoints.fitted_trust(checkpoints.load_checkpoint(tmp_path / "new.pt"))[1] is None
    bad = run("--data-dir", str(root), "--output", str(tmp_path / "x.pt"), "--device", "tpu")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
    (tmp_path / "other_calibration.png").write_bytes(b"mine")
    kept = run("--data-dir", str(root), "--split-file", str(split), "--output", str(tmp_path / "other.pt"))
    assert kept.returncode == 2 and "exists" in kept.stderr
    assert (tmp_path / "other_calibration.png").read_bytes() == b"mine" and not (tmp_path / "other.pt").exists()
