"""What a hostile user tried, round three: arrays of every kind into the Python API, bad thresholds and devices,
trust entries with impossible numbers, a fit that saw no right outline, and fit_trust.py at its edges."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from test_predict import save_tiny_checkpoint, scan

import checkpoints
import dataset
import inference
import trust


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return inference.Predictor(save_tiny_checkpoint(tmp_path_factory.mktemp("api") / "tiny.pt"))


def test_arrays_are_read_as_the_file_loader_reads_the_same_pixels(predictor, tmp_path):
    grey = scan(48, 40, seed=3)
    reference = predictor(grey)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "s16.png")  # a 16-bit PNG of the same pixels
    for given in (grey.astype(np.float32) / 255,  # 0-1 floats
                  grey.astype(np.uint16) * 257,  # 16-bit by its full scale
                  grey.astype(np.int64), grey.astype(np.float64),  # 0-255 integers and floats
                  np.stack([grey] * 3, -1), np.dstack([grey] * 3 + [np.full_like(grey, 255)]),  # RGB, RGBA
                  Image.fromarray(grey), tmp_path / "s16.png"):
        result = predictor(given)
        np.testing.assert_array_equal(result.mask, reference.mask)
        assert result.trust == pytest.approx(reference.trust, abs=1e-5)
    binary = grey > 128  # bool: 0 / 255, not black
    np.testing.assert_array_equal(dataset.grey_from_array(binary), binary.astype(np.uint8) * 255)


@pytest.mark.parametrize("bad, words", [
    (np.zeros((0, 0), np.uint8), "shape 0x0"), (np.zeros((1, 40, 48), np.uint8), "shape 1x40x48"),
    (np.full((40, 48), np.nan, np.float32), "NaN"), (np.full((40, 48), -3, np.int16), "values from -3"),
    (np.zeros((40, 48), complex), "complex"), ([[0, 1], [2, 3]], "a list is not an image"),
    (None, "a NoneType is not an image")])
def test_what_is_not_an_image_is_refused_with_one_value_error(predictor, bad, words):
    with pytest.raises(ValueError, match="accepted: a grey HxW") as info:
        predictor(bad)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_threshold_and_device_are_checked_as_the_command_lines_check_them(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    for bad in (1.5, -1, 0, 1, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            inference.Predictor(ckpt, threshold=bad)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        inference.Predictor(ckpt, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            inference.Predictor(ckpt, device="cuda")


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
