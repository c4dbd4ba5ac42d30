"""Training and evaluation runs under hostile conditions: a real full disk, two runs racing for one folder,
repeated evaluations, empty splits, lone last batches, crafted checkpoints and abbreviated flags."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid

import pytest
import torch
from conftest import ROOT, fill_file_system
from test_train import TINY, history, train

import checkpoints
import predict_busi
import storage
import train_unet_busi as T


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
