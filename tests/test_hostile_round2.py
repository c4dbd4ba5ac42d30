"""A second round of hostile use: refused flag combinations, diverged runs, damaged checkpoints and caches, runs
killed before their first checkpoint, malformed split files, and odd files in a data folder. Real files, real
processes (SIGKILL), a real damaged zip member; where a fault is injected into a live run, the test says how."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from test_train import TINY, train

import checkpoints
import image_io
import inspect_busi_predictions_gui as gui
import predict_busi
import storage
import tensor_cache
import train_unet_busi as T
import training
import utils


def _last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def run_of_two_epochs(busi_dir, tmp_path_factory):
    """A finished two-epoch run of the tiny UNet (best.pt, latest.pt, metrics.json)."""
    out = tmp_path_factory.mktemp("runs")
    assert train(busi_dir[0], out, "--epochs", "2", "--run-name", "r") == 0
    return out / "r"


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# ------------------------------------------------------------------------------------------------------------------
# 1. --resume with --eval-only
# ------------------------------------------------------------------------------------------------------------------
def test_resume_combined_with_eval_only_is_refused_and_the_run_is_untouched(busi_dir, run_of_two_epochs, tmp_path,
                                                                          capsys):
    before = _files(run_of_two_epochs)
    other = tmp_path / "other.pt"
    shutil.copy(run_of_two_epochs / "best.pt", other)
    with pytest.raises(SystemExit) as exit_:
        train(busi_dir[0], tmp_path, "--resume", str(run_of_two_epochs), "--eval-only", "--checkpoint", str(other))
    assert exit_.value.code == 2
    assert "--eval-only and --resume cannot be combined" in capsys.readouterr().err
    assert _files(run_of_two_epochs) == before


# ------------------------------------------------------------------------------------------------------------------
# 2. Diverged runs
# ------------------------------------------------------------------------------------------------------------------
def test_a_run_that_diverges_saves_no_best_pt_and_exits_non_zero(busi_dir, tmp_path, capsys):
    assert train(busi_dir[0], tmp_path, "--epochs", "5", "--lr", "1e30", "--run-name", "d") == 2
    assert "training diverged" in _last_error(capsys)
    assert not (tmp_path / "d" / "best.pt").exists() and not (tmp_path / "d" / "metrics.json").exists()


def test_outputs_that_overflow_in_validation_never_make_best_pt_and_stop_the_run(busi_dir, tmp_path, capsys,
                                                                                monkeypatch):
    """Injected: from epoch 2 on, one BatchNorm running mean is set to NaN before validation (as a diverged
    BatchNorm leaves it). Training, in train mode, does not use it and stays finite; validation's outputs are
    NaN and the real code must see it."""
    real = training.validate
    epochs = []

    def poisoned(model, *args, **kwargs):
        epochs.append(1)
        if len(epochs) >= 2:
            bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_mean.fill_(float("nan"))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(training, "validate", poisoned)
    assert train(busi_dir[0], tmp_path, "--epochs", "6", "--run-name", "v") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not finite: epoch not saved" in err
    last = err.strip().splitlines()[-1]
    assert "training diverged" in last and f"for {training.MAX_BAD_EPOCHS} epochs" in last, last
    assert len(epochs) == 1 + training.MAX_BAD_EPOCHS  # stopped at once: epochs 2-4 bad, 5-6 never run
    for name in ("best.pt", "latest.pt"):  # both still epoch 1, finite
        state = checkpoints.load_checkpoint(tmp_path / "v" / name)
        assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                           if v.is_floating_point())
    assert not (tmp_path / "v" / "metrics.json").exists()


def test_a_non_finite_validation_loss_is_never_the_best_epoch(busi_dir):
    import argparse

    hp = argparse.Namespace(**{f: getattr(T.Hyperparameters, f) for f in T.HYPERPARAMETERS})
    hp.encoder, hp.epochs = "none", 1
    trainer = training.Trainer(torch.nn.Conv2d(1, 1, 1), hp, torch.device("cpu"), None, n_train=4)
    summary = {"normal_fp_rate": 0.0, "lesion_dice": 0.0, "lesion_iou": 0.0, "all_dice": 1 / 3, "n_lesion": 2,
               "missed_lesions": 2}
    assert trainer.end_epoch(1.0, 1.0, 4, summary, float("nan"), 1.0)[1] is False
    assert trainer.bad_epochs == 1 and trainer.best_epoch is None
    assert trainer.end_epoch(1.0, 1.0, 4, summary, 0.5, 1.0)[1] is True and trainer.bad_epochs == 0


# ------------------------------------------------------------------------------------------------------------------
# 4. A checkpoint whose tensor bytes are damaged
# ------------------------------------------------------------------------------------------------------------------
def _damage_a_tensor(src, dst):
    """Copy `src` with one byte flipped inside its largest tensor's stored bytes (the zip member's CRC then fails;
    torch.load would read it without a word)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = int.from_bytes(data[member.header_offset + 26:member.header_offset + 28], "little"), \
        int.from_bytes(data[member.header_offset + 28:member.header_offset + 30], "little")
    start = member.header_offset + 30 + name_len + extra_len  # the local header's own extra field
    data[start + member.file_size // 2] ^= 0x5A
    dst.write_bytes(bytes(data))
    torch.load(dst, weights_only=True)  # the damage is invisible to torch itself


def test_a_damaged_checkpoint_is_refused_by_every_tool_and_nothing_is_overwritten(busi_dir, run_of_two_epochs,
                                                                                  tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_of_two_epochs, run)
    _damage_a_tensor(run_of_two_epochs / "latest.pt", run / "latest.pt")
    before = _files(run)
    assert train(busi_dir[0], tmp_path, "--resume", str(run), "--epochs", "3") == 2
    assert "checkpoint damaged" in _last_error(capsys)
    assert _files(run) == before
    assert train(busi_dir[0], tmp_path, "--eval-only", "--checkpoint", str(run / "latest.pt")) == 2
    assert "checkpoint damaged" in _last_error(capsys)
    assert predict_busi.main(["--checkpoint", str(run / "latest.pt"), "--input", str(busi_dir[0] / "benign"),
                              "--output", str(tmp_path / "preds"), "--quiet", "--device", "cpu"]) == 2
    assert "checkpoint damaged" in _last_error(capsys)
    with pytest.raises(checkpoints.CheckpointError, match="checkpoint damaged"):  # the GUI's loader too
        checkpoints.load_model(run / "latest.pt")
    assert not (tmp_path / "preds").exists()


# ------------------------------------------------------------------------------------------------------------------
# 5. --resume with another architecture or input size
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, saved", [("--image-size", "64", "32"), ("--encoder", "lite0", "none"),
                                                ("--depth", "3", "2"), ("--base-channels", "8", "4"),
                                                ("--input-norm", "per_image", "fixed")])
def test_resume_refuses_a_changed_architecture_or_input_size(busi_dir, run_of_two_epochs, tmp_path, capsys, flag,
                                                             value, saved):
    run = tmp_path / "run"
    shutil.copytree(run_of_two_epochs, run)
    before = _files(run)
    assert train(busi_dir[0], tmp_path, "--resume", str(run), "--epochs", "3", flag, value) == 2
    err = _last_error(capsys)
    assert f"{flag} {value} differs from the run's {saved}" in err and "cannot change mid-run" in err, err
    assert _files(run) == before


# ------------------------------------------------------------------------------------------------------------------
# 6. Malformed split files (trainer and GUI)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, needle", [("twice", "twice in 'train'"), ("number", "is 7, not an image path"),
                                            ("dict", "is {'a': 1}, not an image path")])
def test_a_malformed_split_file_is_one_line_naming_the_entry(busi_dir, run_of_two_epochs, tmp_path, capsys, damage,
                                                             needle):
    split = json.loads((run_of_two_epochs / "split.json").read_text())
    split["train"].append({"twice": split["train"][0], "number": 7, "dict": {"a": 1}}[damage])
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split))
    assert train(busi_dir[0], tmp_path, "--split-file", str(path), "--epochs", "1", "--run-name", "s") == 2
    assert needle in _last_error(capsys)
    items, _, error = gui.resolve_items(gui.build_parser().parse_args(["--data-dir", str(busi_dir[0]),
                                                                       "--split-file", str(path)]))
    assert items == [] and needle in error


# ------------------------------------------------------------------------------------------------------------------
# 8. A run killed before its first checkpoint
# ------------------------------------------------------------------------------------------------------------------
def test_a_folder_left_by_a_run_killed_before_its_first_checkpoint_is_taken_over(busi_dir, tmp_path, capsys):
    """A real training process, SIGKILLed once it has claimed its folder and before it saved a checkpoint."""
    cmd = [sys.executable, "train_unet_busi.py", "--data-dir", str(busi_dir[0]), "--output-dir", str(tmp_path),
           "--cache-dir", str(tmp_path / "cache"), *TINY, "--image-size", "256", "--epochs", "1", "--run-name", "k"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "k"
    deadline = time.monotonic() + 120
    while not (run / ".claimed").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # while it lives, the folder is its own
    assert train(busi_dir[0], tmp_path, "--epochs", "1", "--run-name", "k") == 2
    assert "being used by another run" in _last_error(capsys)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = {p.name for p in run.iterdir()}
    assert ".claimed" in left and "latest.pt" not in left, left
    assert train(busi_dir[0], tmp_path, "--resume", "--run-name", "k") == 2
    err = _last_error(capsys)
    assert "nothing to resume" in err and "without --resume" in err, err
    assert train(busi_dir[0], tmp_path, "--epochs", "1", "--run-name", "k") == 0
    assert "taking over" in capsys.readouterr().out
    assert (run / "best.pt").is_file() and (run / "metrics.json").is_file()


def test_a_claimed_folder_is_not_taken_while_its_owner_lives_even_in_another_process(tmp_path):
    code = ("import sys, time, storage; storage.claim_run_dir(sys.argv[1], 'x', 'x'); print('claimed', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "claimed"
        with pytest.raises(ValueError, match="being used by another run"):
            storage.claim_run_dir(tmp_path, "x", "x")
        assert storage.claim_run_dir(tmp_path, None, "x") == tmp_path / "x-2"  # a default name moves on
    finally:
        proc.kill()
        proc.wait()
    assert storage.claim_run_dir(tmp_path, "x", "x") == tmp_path / "x"  # its owner is gone: taken over
    storage.release_run_dir(tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------------------------
# 9. A cache file with wrong contents
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["key missing", "labels too short", "a full-size mask too short", "not a dict"])
def test_a_cache_with_wrong_contents_is_rebuilt(busi_dir, tmp_path, capfd, damage):
    root, _ = busi_dir
    samples = image_io.discover_samples(root)
    good = tensor_cache.build_cache(root, samples, 32, tmp_path, progress=False)
    (cache_file,) = tmp_path.glob("busi_32_*.pt")
    bad = dict(good)
    if damage == "key missing":
        del bad["full_sizes"]
    elif damage == "labels too short":
        bad["labels"] = bad["labels"][:-3]
    elif damage == "a full-size mask too short":
        bad["full_masks"] = [m[:-1] for m in bad["full_masks"]]
    else:
        bad = [1, 2, 3]
    torch.save(bad, cache_file)
    capfd.readouterr()
    again = tensor_cache.build_cache(root, samples, 32, tmp_path, progress=False)
    assert "data cache" in capfd.readouterr().err
    assert torch.equal(again["labels"], good["labels"]) and torch.equal(again["full_sizes"], good["full_sizes"])
    assert all(torch.equal(a, b) for a, b in zip(again["full_masks"], good["full_masks"]))
    assert tensor_cache.cache_problem(torch.load(cache_file, weights_only=True), 32, [s.image for s in samples]) is None


def test_a_training_run_over_a_damaged_cache_rebuilds_it(busi_dir, tmp_path, capsys):
    assert train(busi_dir[0], tmp_path, "--epochs", "1", "--run-name", "a") == 0
    (cache_file,) = (tmp_path / "cache").glob("busi_32_*.pt")
    cache = torch.load(cache_file, weights_only=True)
    cache["images"] = cache["images"][:5]
    torch.save(cache, cache_file)
    assert train(busi_dir[0], tmp_path, "--epochs", "1", "--run-name", "b") == 0
    assert "is damaged" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# 10. No segmentation loss at all
# ------------------------------------------------------------------------------------------------------------------
def test_all_loss_weights_zero_is_refused_at_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        T.parse_args(["--bce-weight", "0", "--dice-weight", "0", "--cls-weight", "0", "--deep-supervision", "0"])
    assert exit_.value.code == 2 and "learn nothing" in capsys.readouterr().err
    T.parse_args(["--bce-weight", "0"])  # one of the two is enough


# ------------------------------------------------------------------------------------------------------------------
# 11-14. Odd files in a data folder
# ------------------------------------------------------------------------------------------------------------------
def test_a_float_mask_on_a_0_to_1_scale_is_read_as_lesion(tmp_path):
    values = np.zeros((20, 30), np.float32)
    values[5:12, 4:20] = 0.9
    Image.fromarray(values, mode="F").save(tmp_path / "m.tif")
    np.testing.assert_array_equal(image_io.load_mask([tmp_path / "m.tif"]), values > 0)
    Image.fromarray(values * 255).save(tmp_path / "m255.tif")  # a 0-255 float mask keeps the half-scale rule
    np.testing.assert_array_equal(image_io.load_mask([tmp_path / "m255.tif"]), values > 0)
    grey = np.full((20, 30), 0.5, np.float32)  # a float image on a 0-1 scale is mid-grey, not black
    Image.fromarray(grey, mode="F").save(tmp_path / "i.tif")
    assert set(np.unique(image_io.load_image(tmp_path / "i.tif"))) == {128}


def test_a_broken_symbolic_link_named_like_an_image_is_an_error_naming_it(fresh_busi_dir):
    root, _ = fresh_busi_dir
    os.symlink(root / "gone" / "scan.png", root / "benign" / "benign (99).png")
    with pytest.raises(utils.DataError, match=r"broken symbolic link: .*benign \(99\)\.png"):
        image_io.discover_samples(root)


def test_a_file_name_with_a_newline_is_paired_and_printed_on_one_line(fresh_busi_dir, tmp_path):
    root, _ = fresh_busi_dir
    folder = root / "benign"
    try:
        (folder / "benign (3).png").rename(folder / "benign\n(3).png")
        (folder / "benign (3)_mask.png").rename(folder / "benign\n(3)_mask.png")
    except OSError as exc:
        pytest.skip(f"this file system refuses a newline in a name: {exc}")
    sample = next(s for s in image_io.discover_samples(root) if "\n" in s.image)
    assert sample.masks == ["benign/benign\n(3)_mask.png"]
    (folder / "benign\n(3)_mask.png").unlink()
    result = subprocess.run([sys.executable, "dataset.py", "--data-dir", str(root), "--out", str(tmp_path / "s.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "image without a mask" in result.stderr, result.stderr
    assert "benign\\n(3).png" in result.stderr


def test_an_image_of_an_unsupported_type_beside_its_mask_is_named(fresh_busi_dir):
    root, _ = fresh_busi_dir
    folder = root / "benign"
    Image.open(folder / "benign (1).png").convert("P").save(folder / "benign (1).gif")
    (folder / "benign (1).png").unlink()
    with pytest.raises(utils.DataError) as error:
        image_io.discover_samples(root)
    message = str(error.value)
    assert message.startswith("unsupported image type") and "benign (1).gif" in message and ".png" in message
