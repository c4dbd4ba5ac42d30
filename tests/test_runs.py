"""Training and evaluation runs under hostile conditions: refused flag combinations, diverged runs, damaged and
crafted checkpoints, resumes and interrupts (signals, a live owner, another folder), a real full disk, two runs
racing for one folder, repeated evaluations, empty splits, lone last batches and abbreviated flags."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
import zipfile

import pytest
import torch
from conftest import ROOT, fill_file_system
from test_core import _Planted
from test_train import TINY, history, train

import checkpoints
import dataset
import image_io
import inspect_busi_predictions_gui as gui
import predict_busi
import storage
import tensor_cache
import train_unet_busi as T
import training


def _last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------------------------
# A real full file system
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("leave", [100_000, 0], ids=["checkpoint-larger-than-the-space-left", "no-byte-left"])
def test_full_disk_on_a_real_tmpfs_gives_the_promised_error_and_keeps_checkpoints(busi_dir, small_tmpfs, tmp_path,
                                                                                 capsys, leave):
    """Where the checkpoint is larger than what is left, torch's own zip writer used to fail with an opaque
    RuntimeError ('unexpected pos'); with no byte left, the first write fails."""
    root, _ = busi_dir
    out = small_tmpfs / "runs"

    def run(*flags):
        return T.main(["--data-dir", str(root), "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
                       *TINY, "--base-channels", "16", *flags])

    assert run("--epochs", "3", "--run-name", "d", "--stop-after", "1") == 0
    good = (out / "d" / "latest.pt").read_bytes()
    assert len(good) > 5 * leave  # the next checkpoint cannot fit
    fill_file_system(small_tmpfs, leave)
    capsys.readouterr()
    assert run("--resume", str(out / "d")) == 2
    err = _last_error(capsys)
    assert err.startswith("error:") and "No space left" in err and "intact" in err, err
    assert (out / "d" / "latest.pt").read_bytes() == good
    assert not [p.name for p in (out / "d").iterdir() if p.name.endswith(".tmp")]
    # a new run on the full disk ends the same way
    assert run("--epochs", "1", "--run-name", "e") == 2
    err = _last_error(capsys)
    assert err.startswith("error:") and "No space left" in err, err


# ------------------------------------------------------------------------------------------------------------------
# Run folders: claimed once, never overwritten
# ------------------------------------------------------------------------------------------------------------------
def test_a_folder_holding_a_finished_run_without_latest_pt_is_not_overwritten(busi_dir, tmp_path, capsys):
    root, _ = busi_dir
    run = tmp_path / "old"
    run.mkdir()
    (run / "best.pt").write_bytes(b"the best model of an earlier run")
    (run / "metrics.json").write_text('{"test": {}}')
    assert train(root, tmp_path, "--epochs", "1", "--run-name", "old") == 2
    assert "already holds a run" in _last_error(capsys)
    assert (run / "best.pt").read_bytes() == b"the best model of an earlier run"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "metrics.json"]


@pytest.mark.slow
def test_two_trainings_with_one_run_name_started_together_one_is_refused(busi_dir, tmp_path):
    root, _ = busi_dir
    cmd = [sys.executable, "train_unet_busi.py", "--data-dir", str(root), "--output-dir", str(tmp_path),
           "--cache-dir", str(tmp_path / "cache"), *TINY, "--epochs", "2", "--run-name", "same"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "Traceback" not in refused and ("already holds a run" in refused or "another run" in refused), refused
    assert [int(h["epoch"]) for h in history(tmp_path / "same")] == [1, 2]
    assert json.loads((tmp_path / "same" / "metrics.json").read_text())["best_epoch"] in (1, 2)


def test_default_names_taken_in_the_same_second_get_a_suffix(tmp_path):
    first = storage.claim_run_dir(tmp_path, None, "20261125-120000")
    second = storage.claim_run_dir(tmp_path, None, "20261125-120000")
    assert (first.name, second.name) == ("20261125-120000", "20261125-120000-2")
    empty_by_hand = tmp_path / "mine"
    empty_by_hand.mkdir()
    assert storage.claim_run_dir(tmp_path, "mine", "x") == empty_by_hand  # an empty folder may be used once
    with pytest.raises(ValueError, match="another run"):
        storage.claim_run_dir(tmp_path, "mine", "x")


def test_atomic_writes_of_one_file_from_two_writers_never_collide(tmp_path):
    """Writer A is held inside its write while writer B writes the same file: both finish, each temp file is
    its own, and the file is one writer's bytes in full."""
    target = tmp_path / "curves.png"
    inside, release = threading.Event(), threading.Event()

    def slow(f):
        f.write(b"A" * 1000)
        inside.set()
        release.wait(10)
        f.write(b"A" * 1000)

    a = threading.Thread(target=storage.atomic_write, args=(target, slow))
    a.start()
    assert inside.wait(10)
    storage.atomic_write(target, b"B" * 3000)
    assert target.read_bytes() == b"B" * 3000
    release.set()
    a.join()
    assert target.read_bytes() == b"A" * 2000
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


# ------------------------------------------------------------------------------------------------------------------
# --eval-only never overwrites results
# ------------------------------------------------------------------------------------------------------------------
def test_eval_only_scores_the_test_part_of_the_split_the_run_trained_with(busi_dir, tmp_path, capsys):
    """A run trained with its own --split-file: a split computed afresh would put some of its training scans in
    "test". --eval-only on that source uses the run's split, an explicit --split-file still wins, and a recorded
    split that is gone is one line naming it."""
    import splitting
    root, _ = busi_dir
    fresh = splitting.compute_split(root, progress=False)
    custom = {"train": fresh["train"][4:] + fresh["test"], "val": fresh["val"], "test": fresh["train"][:4]}
    split = tmp_path / "custom.json"
    split.write_text(json.dumps(custom))
    assert train(root, tmp_path, "--epochs", "1", "--run-name", "r", "--split-file", f"{root.name}={split}") == 0
    capsys.readouterr()

    def scored(folder):
        with open(tmp_path / folder / "test_predictions.csv") as f:
            return sorted(row["file"] for row in __import__("csv").DictReader(f))

    assert train(root, tmp_path, "--eval-only", "--checkpoint", str(tmp_path / "r" / "best.pt"),
                 "--run-name", "ev") == 0
    assert f"from {split.resolve()}" in capsys.readouterr().out
    assert scored("ev") == sorted(custom["test"]) and not set(scored("ev")) & set(custom["train"])
    other = tmp_path / "other.json"
    other.write_text(json.dumps(fresh))
    assert train(root, tmp_path, "--eval-only", "--checkpoint", str(tmp_path / "r" / "best.pt"),
                 "--run-name", "ev2", "--split-file", str(other)) == 0
    assert scored("ev2") == sorted(fresh["test"])
    split.unlink()
    capsys.readouterr()
    assert train(root, tmp_path, "--eval-only", "--checkpoint", str(tmp_path / "r" / "best.pt"),
                 "--run-name", "ev3") == 2
    err = _last_error(capsys)
    assert "custom.json" in err and "--split-file" in err and "not found" in err


def test_eval_only_never_overwrites_a_run_or_an_earlier_evaluation(busi_dir, tmp_path, capsys):
    root, _ = busi_dir
    for name in ("r1", "r2"):
        assert train(root, tmp_path, "--epochs", "1", "--run-name", name, "--seed", str(len(name) + ord(name[1]))) == 0
    r1_metrics = (tmp_path / "r1" / "metrics.json").read_bytes()
    # into the run's own folder: refused, its results intact
    assert train(root, tmp_path, "--eval-only", "--checkpoint", str(tmp_path / "r1" / "best.pt"),
                 "--run-name", "r1") == 2
    assert "already holds a run" in _last_error(capsys)
    assert (tmp_path / "r1" / "metrics.json").read_bytes() == r1_metrics
    # two runs' best.pt by default: two folders; the same command again: a third, the first untouched
    for name in ("r1", "r2", "r1"):
        assert train(root, tmp_path, "--eval-only", "--checkpoint", str(tmp_path / name / "best.pt")) == 0
    made = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("eval-"))
    assert made == ["eval-r1-best", "eval-r1-best-2", "eval-r2-best"]
    first = json.loads((tmp_path / "eval-r1-best" / "metrics.json").read_text())
    again = json.loads((tmp_path / "eval-r1-best-2" / "metrics.json").read_text())
    other = json.loads((tmp_path / "eval-r2-best" / "metrics.json").read_text())
    assert first["checkpoint"].endswith(os.path.join("r1", "best.pt"))
    assert other["checkpoint"].endswith(os.path.join("r2", "best.pt"))
    assert first["test"] == again["test"]


# ------------------------------------------------------------------------------------------------------------------
# Empty splits and NaN
# ------------------------------------------------------------------------------------------------------------------
def _split_of(root, tmp_path, **parts):
    assert train(root, tmp_path, "--epochs", "1", "--run-name", "s" + uuid.uuid4().hex[:6], "--stop-after", "1") == 0
    split = json.loads(next(tmp_path.glob("s*/split.json")).read_text())
    split.update(parts)
    path = tmp_path / f"split-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(split))
    return split, path


def test_a_split_without_validation_images_is_refused_up_front_and_one_without_test_images_trains(busi_dir,
                                                                                                    tmp_path, capsys):
    """No validation part: refused before any work, with the counts. No test part (BUS-BRA's split, a site's
    labelled scans): the run trains, fits on validation and says in metrics.json that nothing was tested."""
    root, _ = busi_dir
    split, path = _split_of(root, tmp_path)
    split["train"] += split.pop("val")
    split["val"] = []
    path.write_text(json.dumps(split))
    capsys.readouterr()
    assert train(root, tmp_path, "--epochs", "1", "--split-file", str(path), "--run-name", "no-val") == 2
    err = _last_error(capsys)
    assert "has no validation images" in err and "Dataset_BUSI_with_GT" in err, err
    assert not (tmp_path / "no-val").exists()  # the refused run gives its name back
    split, path = _split_of(root, tmp_path)
    split["train"] += split.pop("test")
    split["test"] = []
    path.write_text(json.dumps(split))
    assert train(root, tmp_path, "--epochs", "1", "--split-file", str(path), "--run-name", "no-test") == 0
    metrics = json.loads((tmp_path / "no-test" / "metrics.json").read_text())
    assert metrics["test"] is None and "has a test part" in metrics["why_no_test"] and metrics["val_fitted"]
    assert "no test evaluation" in capsys.readouterr().out


def test_metrics_json_is_strict_json_when_a_figure_is_undefined(busi_dir, tmp_path, capsys):
    """A test split without normal images has no normal FP rate: null in metrics.json, never NaN."""
    root, _ = busi_dir
    split, path = _split_of(root, tmp_path)
    normal = [n for n in split["test"] if n.startswith("normal/")]
    assert normal
    split["test"] = [n for n in split["test"] if n not in normal]
    split["train"] += normal
    path.write_text(json.dumps(split))
    assert train(root, tmp_path, "--epochs", "1", "--split-file", str(path), "--run-name", "nn") == 0

    def refuse(constant):
        raise AssertionError(f"{constant} in metrics.json")

    metrics = json.loads((tmp_path / "nn" / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["test"]["normal_fp_rate"] is None
    assert metrics["test"]["lesion_dice"] >= 0


# ------------------------------------------------------------------------------------------------------------------
# A last batch of one image at a 1x1 bottleneck
# ------------------------------------------------------------------------------------------------------------------
def test_a_lone_last_image_never_makes_a_batch_of_one(busi_dir, tmp_path, capsys):
    root, _ = busi_dir
    split, _ = _split_of(root, tmp_path)
    batch = len(split["train"]) - 1  # leaves one image for a last batch
    flags = ["--encoder", "none", "--image-size", "16", "--depth", "4", "--batch-size", str(batch), "--epochs", "2"]
    assert T.main(["--data-dir", str(root), "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
                   "--base-channels", "4", "--device", "cpu", *flags, "--run-name", "one"]) == 0, capsys.readouterr()
    assert [int(h["epoch"]) for h in history(tmp_path / "one")] == [1, 2]


# ------------------------------------------------------------------------------------------------------------------
# Crafted checkpoints with the right format tag: one loader, one message, every tool
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_run(busi_dir, tmp_path_factory):
    root, _ = busi_dir
    out = tmp_path_factory.mktemp("crafted")
    assert train(root, out, "--epochs", "1", "--run-name", "base") == 0
    return out / "base"


CRAFTED = {
    "config is a list": lambda s: s.update(config=[1, 2, 3]),
    "weights are not tensors": lambda s: s["model"].update({next(iter(s["model"])): [0.0, 1.0]}),
    "image size 50": lambda s: s["config"].update(image_size=50),
    "model_config is a string": lambda s: s.update(model_config="UNet"),
}


@pytest.mark.parametrize("craft", list(CRAFTED))
@pytest.mark.parametrize("tool", ["eval-only", "resume", "predict"])
def test_crafted_checkpoints_end_in_one_clear_error_in_every_tool(busi_dir, real_run, tmp_path, capsys, craft, tool):
    root, facts = busi_dir
    state = torch.load(real_run / "latest.pt", weights_only=True)
    CRAFTED[craft](state)
    run = tmp_path / "crafted"
    run.mkdir()
    torch.save(state, run / "latest.pt")
    if tool == "predict":
        code = predict_busi.main(["--checkpoint", str(run / "latest.pt"), "--input", str(root / "benign"),
                                  "--output", str(tmp_path / "preds"), "--quiet"])
    else:
        flags = ["--resume", str(run)] if tool == "resume" else ["--eval-only", "--checkpoint", str(run / "latest.pt")]
        code = train(root, tmp_path, *flags)
    assert code == 2
    err = _last_error(capsys)
    assert err.startswith("error:") and "damaged or was not written by this project" in err, err


# ------------------------------------------------------------------------------------------------------------------
# Abbreviated flags on resume
# ------------------------------------------------------------------------------------------------------------------
def test_explicit_flags_come_from_the_parse_so_abbreviations_count():
    assert "--epochs" in T.parse_args(["--epoch", "150"]).explicit
    assert T.parse_args(["--epoch", "150"]).epochs == 150
    assert {"--dice-per-image", "--amp", "--split-file"} <= T.parse_args(
        ["--no-dice-per-image", "--no-amp", "--split=x.json"]).explicit
    assert "--epochs" not in T.parse_args(["--lr", "1e-3"]).explicit


def test_resume_with_an_abbreviated_flag_applies_it(busi_dir, tmp_path):
    root, _ = busi_dir
    assert train(root, tmp_path, "--epochs", "1", "--run-name", "ab") == 0
    assert train(root, tmp_path, "--resume", "--run-name", "ab", "--epoch", "2") == 0
    assert [int(h["epoch"]) for h in history(tmp_path / "ab")] == [1, 2]
    assert checkpoints.load_checkpoint(tmp_path / "ab" / "latest.pt")["config"]["epochs"] == 2


@pytest.mark.parametrize("code,text", [(errno.ENOSPC, "No space left"), (errno.EROFS, "Read-only")])
def test_full_or_read_only_disk_gives_a_clear_error_and_keeps_the_last_checkpoint(
        busi_dir, tmp_path, monkeypatch, capsys, code, text):
    root, _ = busi_dir
    assert train(root, tmp_path, "--epochs", "3", "--run-name", "d", "--stop-after", "1") == 0
    good = torch.load(tmp_path / "d" / "latest.pt", weights_only=True)

    def failing_mkstemp(*args, **kwargs):
        raise OSError(code, {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system"}[code])

    monkeypatch.setattr(storage.tempfile, "mkstemp", failing_mkstemp)
    capsys.readouterr()
    assert train(root, tmp_path, "--resume", str(tmp_path / "d")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and text in err and "intact" in err
    monkeypatch.undo()
    after = torch.load(tmp_path / "d" / "latest.pt", weights_only=True)
    assert after["epoch"] == good["epoch"] == 1
    assert all(torch.equal(after["model"][k], good["model"][k]) for k in good["model"])


@pytest.mark.parametrize("entry", ["resume", "eval-only"])
def test_hostile_checkpoint_is_refused_by_training_entry_points(busi_dir, tmp_path, capsys, entry):
    root, _ = busi_dir
    target = tmp_path / "created_by_unpickling.txt"
    run = tmp_path / "evil"
    run.mkdir()
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "model": {}, "x": _Planted(str(target))}, run / "latest.pt")
    flags = ["--resume", str(run)] if entry == "resume" else ["--eval-only", "--checkpoint", str(run / "latest.pt")]
    assert train(root, tmp_path, *flags) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not target.exists()


def test_checkpoint_of_another_width_names_the_mismatch(busi_dir, tmp_path, capsys):
    root, _ = busi_dir
    assert train(root, tmp_path, "--epochs", "1", "--run-name", "w") == 0
    state = torch.load(tmp_path / "w" / "best.pt", weights_only=True)
    state["model_config"]["base_channels"] = 6
    torch.save(state, tmp_path / "w6.pt")
    capsys.readouterr()
    assert train(root, tmp_path, "--eval-only", "--checkpoint", str(tmp_path / "w6.pt")) == 2
    err = capsys.readouterr().err
    assert "weights do not fit" in err and "base_channels': 6" in err


def test_grad_scaler_is_on_for_fp16_only_and_skips_overflowing_steps():
    cpu = torch.device("cpu")
    assert not training.make_grad_scaler(cpu, None).is_enabled()
    assert not training.make_grad_scaler(cpu, torch.bfloat16).is_enabled()
    scaler = training.make_grad_scaler(cpu, torch.float16)
    assert scaler.is_enabled()
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scale = scaler.get_scale()
    scaler.scale((p * float("inf")).sum()).backward()  # an overflowing gradient
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.ones(3)) and scaler.get_scale() < scale


def test_bad_values_of_every_numeric_flag_are_refused(capsys):
    for flags in (["--epochs", "0"], ["--image-size", "-32"], ["--base-channels", "0"], ["--lr", "-1"],
                  ["--threshold", "1.5"], ["--depth", "0"], ["--epochs", "two"]):
        with pytest.raises(SystemExit):
            T.parse_args(flags + TINY[:0])
        assert "error: argument" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_of_two_epochs(busi_dir, tmp_path_factory):
    """A finished two-epoch run of the tiny UNet (best.pt, latest.pt, metrics.json)."""
    out = tmp_path_factory.mktemp("runs")
    assert train(busi_dir[0], out, "--epochs", "2", "--run-name", "r") == 0
    return out / "r"


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


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


def test_all_loss_weights_zero_is_refused_at_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        T.parse_args(["--bce-weight", "0", "--dice-weight", "0", "--cls-weight", "0", "--deep-supervision", "0"])
    assert exit_.value.code == 2 and "learn nothing" in capsys.readouterr().err
    T.parse_args(["--bce-weight", "0"])  # one of the two is enough


TINY4 = ["--encoder", "none", "--image-size", "32", "--base-channels", "4", "--depth", "2", "--batch-size", "4",
        "--device", "cpu", "--eval-batch-size", "16"]


def train_args(root, out, *extra):
    return ["--data-dir", str(root), "--output-dir", str(out), "--cache-dir", str(out / "cache"), *TINY4, *extra]


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
    assert T.main(["--data-dir", "scans", "--output-dir", "runs", "--cache-dir", "cache", *TINY4, "--epochs", "1",
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
