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
import image_io
import inference
import prediction_table
import tensor_cache
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
    np.testing.assert_array_equal(image_io.grey_from_array(binary), binary.astype(np.uint8) * 255)


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


# ------------------------------------------------------------------------------------------------ runs
TINY = ["--encoder", "none", "--image-size", "32", "--base-channels", "4", "--depth", "2", "--batch-size", "4",
        "--device", "cpu", "--eval-batch-size", "16"]


def train_args(root, out, *extra):
    return ["--data-dir", str(root), "--output-dir", str(out), "--cache-dir", str(out / "cache"), *TINY, *extra]


@pytest.mark.slow
def test_a_resume_refuses_a_run_folder_that_a_live_process_holds_and_names_its_pid(busi_dir, tmp_path):
    """A real second process: the run still training holds its folder; a resume beside it is refused (pid named);
    once the first is gone (SIGKILL), the resume goes on."""
    import signal
    import time

    root, _ = busi_dir
    command = [sys.executable, "-u", "train_unet_busi.py", *train_args(root, tmp_path)]
    first = subprocess.Popen(command + ["--epochs", "100000", "--run-name", "live"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "live" / "latest.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        second = subprocess.run(command + ["--resume", str(tmp_path / "live")], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
        assert first.poll() is None  # the live run is untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    state = checkpoints.load_checkpoint(tmp_path / "live" / "latest.pt")
    third = subprocess.run(command + ["--resume", str(tmp_path / "live"), "--epochs", str(state["epoch"] + 1)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr


def test_an_epoch_stopped_mid_way_and_resumed_has_the_row_of_an_epoch_run_straight(busi_dir, tmp_path):
    """The partial sums are saved with the position inside the epoch: the resumed epoch's train loss and images
    seen are those of the whole epoch. (The stop flag is set directly here; the signals that set it are tested
    with real SIGINT/SIGTERM in test_train.py.)"""
    import train_unet_busi as T
    import training

    root, _ = busi_dir
    samples = image_io.discover_samples(root)
    data = tensor_cache.build_cache(root, samples, 32, None, progress=False)
    data["sources"] = ["x"] * len(samples)
    hp = T.parse_args(train_args(root, tmp_path, "--epochs", "1"))

    def trainer():
        torch.manual_seed(0)
        from unet import UNet
        return training.Trainer(UNet(1, 1, 4, 2, num_classes=3), hp, torch.device("cpu"), None, len(samples))

    train = training.epoch_set(data, "", 0, torch.device("cpu"))
    straight = trainer().train_epoch(train, training.StopRequest(), tmp_path)
    first = trainer()
    stop = training.StopRequest()
    stop.requested = True  # as Ctrl-C leaves it: the epoch stops after its first step
    assert first.train_epoch(train, stop, tmp_path) is None and first.step == 1
    checkpoints.save_checkpoint(first.state({}), tmp_path / "mid.pt")
    resumed, state = trainer(), checkpoints.load_checkpoint(tmp_path / "mid.pt")
    resumed.model.load_state_dict(state["model"])  # as the training script builds it from the checkpoint
    resumed.restore(state)
    done = resumed.train_epoch(train, training.StopRequest(), tmp_path)
    assert done[0] == pytest.approx(straight[0], rel=1e-6) and done[2] == straight[2] == len(samples)


def test_sigterm_interrupts_like_ctrl_c():
    """A real SIGTERM to this process, inside the training script's handler: a KeyboardInterrupt, not a kill."""
    import os
    import signal

    import utils

    with pytest.raises(KeyboardInterrupt):
        with utils.sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                sum(range(100))


@pytest.mark.parametrize("where", ["load_parts", "fit_and_describe"])
def test_an_interrupt_while_preparing_data_or_fitting_trust_is_one_line_and_resume_finishes(
        busi_dir, tmp_path, monkeypatch, capsys, where):
    """Ctrl-C arriving while the data is decoded (nothing saved) or during the end-of-training trust fit (best.pt
    kept; --resume finishes): one line, exit 130, no traceback. The interrupt is raised where the signal would
    land (simulated: the real signal handling is the test above)."""
    import evaluation
    import train_unet_busi as T

    root, _ = busi_dir
    target = dataset if where == "load_parts" else evaluation
    real = getattr(target, where)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, where, interrupted)
    assert T.main(train_args(root, tmp_path, "--epochs", "1", "--run-name", "r")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().count("\n") == 0
    if where == "load_parts":
        assert "nothing was saved" in err and not (tmp_path / "r").exists()
        return
    assert "--resume" in err and (tmp_path / "r" / "best.pt").is_file() and not (tmp_path / "r" / "metrics.json").exists()
    monkeypatch.setattr(target, where, real)
    assert T.main(train_args(root, tmp_path, "--resume", str(tmp_path / "r"))) == 0
    assert (tmp_path / "r" / "metrics.json").is_file()


def test_resume_from_another_folder_of_a_run_recorded_with_relative_paths_stops_and_names_them(
        busi_dir, tmp_path, monkeypatch, capsys):
    """Runs from before absolute paths recorded `--data-dir scans` as given: from another working folder that is
    not found, and the resume stops naming it instead of training on the sample; a new run records absolute
    paths and resumes from anywhere."""
    import shutil

    import train_unet_busi as T

    root, _ = busi_dir
    shutil.copytree(root, tmp_path / "scans")
    monkeypatch.chdir(tmp_path)
    assert T.main(["--data-dir", "scans", "--output-dir", "runs", "--cache-dir", "cache", *TINY, "--epochs", "1",
                   "--run-name", "r"]) == 0
    state = checkpoints.load_checkpoint(tmp_path / "runs" / "r" / "latest.pt")
    assert state["config"]["data_dir"] == [f"scans={tmp_path / 'scans'}"]
    old = {**state, "config": {**state["config"], "data_dir": "scans", "split_file": "runs/r/split.json"}}
    checkpoints.save_checkpoint(old, tmp_path / "runs" / "r" / "latest.pt")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    before = (tmp_path / "runs" / "r" / "split.json").read_bytes()
    assert T.main(["--resume", str(tmp_path / "runs" / "r"), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "data source scans (scans) is not found" in err and "--data-dir" in err
    assert T.main(["--resume", str(tmp_path / "runs" / "r"), "--epochs", "2", "--data-dir",
                   str(tmp_path / "scans")]) == 2
    assert "split runs/r/split.json is not found" in capsys.readouterr().err  # never another split, silently
    assert (tmp_path / "runs" / "r" / "split.json").read_bytes() == before


# ------------------------------------------------------------------------------------------------ predict's inputs
def predict(*args):
    return subprocess.run([sys.executable, "predict_busi.py", *map(str, args), "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def rows_of(folder):
    import csv

    with open(folder / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_an_earlier_runs_outputs_in_the_input_folder_are_skipped_with_a_note_by_one_rule(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a", "b"):
        Image.fromarray(scan(40, 36, seed=len(name))).save(scans / f"{name}.png")
    Image.fromarray(scan(40, 36, seed=9)).save(scans / "notes_pred.png")  # a scan that merely ends in _pred
    first = predict("--checkpoint", ckpt, "--input", scans, "--output", scans)  # outputs into the input folder
    assert first.returncode == 0, first.stderr
    assert sorted(r["file"] for r in rows_of(scans)) == ["a.png", "b.png", "notes_pred.png"]
    again = predict("--checkpoint", ckpt, "--input", scans, "--output", tmp_path / "second")
    assert again.returncode == 0, again.stderr
    assert sorted(r["file"] for r in rows_of(tmp_path / "second")) == ["a.png", "b.png", "notes_pred.png"]
    assert "6 file(s) skipped as an earlier run's outputs" in again.stderr and "a_pred.png" in again.stderr
    # the training loader's rule is the same one: X_pred.png beside X.png is never a scan
    assert prediction_table.earlier_prediction(scans / "a_overlay.png") and prediction_table.earlier_prediction(scans / "a.png") is None


def test_two_inputs_of_one_name_from_two_folders_get_rows_one_can_tell_apart(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    for folder in ("left", "right"):
        (tmp_path / folder).mkdir()
        Image.fromarray(scan(40, 36, seed=len(folder))).save(tmp_path / folder / "scan.png")
    done = predict("--checkpoint", ckpt, "--input", tmp_path / "left", tmp_path / "right", "--output", tmp_path / "o")
    assert done.returncode == 0, done.stderr
    assert sorted(r["file"] for r in rows_of(tmp_path / "o")) == ["left/scan.png", "right/scan.png"]


def test_a_legal_name_too_long_for_its_outputs_still_gets_them_and_the_rest_are_written(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    scans = tmp_path / "scans"
    scans.mkdir()
    long = "x" * 245 + ".png"  # 249 bytes: legal; its _overlay.png would be 257
    for name in (long, "z.png"):
        Image.fromarray(scan(40, 36)).save(scans / name)
    done = predict("--checkpoint", ckpt, "--input", scans, "--output", tmp_path / "o")
    assert done.returncode == 0, done.stderr
    rows = rows_of(tmp_path / "o")
    assert sorted(r["file"] for r in rows) == sorted([long, "z.png"])
    assert all((tmp_path / "o" / r["overlay"]).is_file() and len(r["overlay"]) <= 255 for r in rows)


def test_a_dangling_link_is_named_with_its_target_and_the_rest_is_done(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(scan(40, 36)).save(scans / "good.png")
    (scans / "lost.png").symlink_to(tmp_path / "moved" / "lost.png")  # a real dangling link
    done = predict("--checkpoint", ckpt, "--input", scans, "--output", tmp_path / "o")
    assert done.returncode == 1 and "broken symbolic link" in done.stderr and "moved/lost.png" in done.stderr
    assert [r["file"] for r in rows_of(tmp_path / "o")] == ["good.png"]
    direct = predict("--checkpoint", ckpt, "--input", scans / "lost.png", "--output", tmp_path / "o2")
    assert direct.returncode == 2 and "broken symbolic link" in direct.stderr and "moved/lost.png" in direct.stderr
