"""predict_busi.py against a hostile user: output folders holding ground truth or an earlier run, colliding
output names, signals mid-run, file names that are not UTF-8, scans named *_mask*-ish, EXIF-rotated JPEGs.

Everything here runs the real thing: real files, real subprocesses and real signals; no mocks.
"""
from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict_busi
from conftest import ROOT
from test_predict import read_csv, save_tiny_checkpoint, scan


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """predict_busi.main() sets PyTorch's thread count for the process; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def save_scan(path: Path, width: int, height: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scan(width, height, seed)).save(path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in `folder` (hidden ones too) with its bytes."""
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def cli(checkpoint, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "predict_busi.py", "--checkpoint", str(checkpoint), "--quiet",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    return lines[0]


def listed_outputs(rows) -> set[str]:
    """The mask and overlay files a predictions.csv lists (a table without those columns: <stem>_mask.png...)."""
    stems = [Path(r["file"]).stem for r in rows]
    return ({r.get("mask", f"{s}_mask.png") for r, s in zip(rows, stems)}
            | {r.get("overlay", f"{s}_overlay.png") for r, s in zip(rows, stems)})


# ------------------------------------------------------------------------------------------------------------------
# 2. One input, one set of outputs
# ------------------------------------------------------------------------------------------------------------------
def check_outputs_match_the_csv(out: Path, rows) -> None:
    """Outputs on disk == outputs listed; each has its row's size."""
    assert len({r["mask"] for r in rows}) == len(rows)
    on_disk = {p.name for p in out.iterdir()} - {"predictions.csv"}
    assert on_disk == listed_outputs(rows)
    for row in rows:
        size = (int(row["width"]), int(row["height"]))
        assert Image.open(out / row["mask"]).size == size and Image.open(out / row["overlay"]).size == size


def test_inputs_with_the_same_stem_get_their_own_outputs(tmp_path, checkpoint, capsys):
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    sizes = {d1 / "a.png": (30, 20), d1 / "a_2.png": (50, 28), d2 / "a.png": (36, 22)}
    for path, (w, h) in sizes.items():
        save_scan(path, w, h)
    Image.fromarray(np.dstack([scan(40, 24)] * 3)).save(d1 / "a.jpg")
    sizes[d1 / "a.jpg"] = (40, 24)

    out = tmp_path / "out1"
    assert predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(d1), "--output", str(out),
                              "--quiet"]) == 0
    rows = {r["file"]: r for r in read_csv(out / "predictions.csv")}
    # the documented rule: a stem shared by several inputs keeps each one's extension
    assert {f: r["mask"] for f, r in rows.items()} == {
        "a.png": "a.png_mask.png", "a.jpg": "a.jpg_mask.png", "a_2.png": "a_2_mask.png"}
    for name, row in rows.items():
        assert (int(row["width"]), int(row["height"])) == sizes[d1 / name]
    check_outputs_match_the_csv(out, list(rows.values()))

    # a glob over two folders: the same file name twice, plus the stem clashes
    out = tmp_path / "out2"
    assert predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "d*" / "*"),
                              "--output", str(out), "--quiet"]) == 0
    rows = read_csv(out / "predictions.csv")
    assert len(rows) == 4
    assert sorted((int(r["width"]), int(r["height"])) for r in rows) == sorted(sizes.values())
    check_outputs_match_the_csv(out, rows)


def test_output_stems_are_unique_ignoring_case():
    """On macOS and Windows, A_mask.png and a_mask.png are one file."""
    paths = [Path(p) for p in ("d/A.png", "d/a.png", "e/a.png", "d/a.png_2.png", "d/b.tif", "d/b_2.png")]
    stems = predict_busi.output_stems(paths)
    assert len({s.casefold() for s in stems}) == len(paths)
    assert stems[4:] == ["b", "b_2"]  # no clash, no change


# ------------------------------------------------------------------------------------------------------------------
# 9. The ground-truth rule is the loader's (dataset.MASK_RE)
# ------------------------------------------------------------------------------------------------------------------
def test_a_scan_whose_name_merely_contains_mask_is_predicted(tmp_path, checkpoint, capsys):
    inputs = tmp_path / "in"
    for name in ("case_masked_liver.png", "x_mask_notes.png", "x.png", "x_mask.png", "x_mask_1.png"):
        save_scan(inputs / name, 30, 20)
    for spec in (inputs, inputs / "*.png"):
        out = tmp_path / f"out{len(str(spec))}"
        assert predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(spec), "--output", str(out),
                                  "--quiet"]) == 0
        files = sorted(r["file"] for r in read_csv(out / "predictions.csv"))
        assert files == ["case_masked_liver.png", "x.png", "x_mask_notes.png"]  # ground truth only skipped
    assert "3 of 3 images" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------------
# 8. EXIF orientation
# ------------------------------------------------------------------------------------------------------------------
def save_rotated_jpeg(path: Path) -> Path:
    """A 40 x 24 JPEG whose EXIF orientation 6 says: display it turned a quarter, 24 x 40."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.dstack([scan(40, 24)] * 3)).save(path, exif=exif)
    return path


def test_the_size_peek_reports_the_displayed_size(tmp_path):
    assert predict_busi.peek_size(save_rotated_jpeg(tmp_path / "rotated.jpg")) == (24, 40)
    assert predict_busi.peek_size(save_scan(tmp_path / "plain.png", 40, 24)) == (40, 24)


def test_mask_of_an_exif_rotated_jpeg_has_the_displayed_size(tmp_path, checkpoint, capsys):
    """Passes only once dataset.load_image applies PIL.ImageOps.exif_transpose (another branch, dataset.py):
    predict_busi.py takes the pixels, hence the mask's size, from the loader."""
    save_rotated_jpeg(tmp_path / "in" / "rotated.jpg")
    out = tmp_path / "out"
    assert predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "in"), "--output",
                              str(out), "--quiet"]) == 0
    (row,) = read_csv(out / "predictions.csv")
    assert (int(row["width"]), int(row["height"])) == (24, 40)
    assert Image.open(out / "rotated_mask.png").size == (24, 40)
    assert Image.open(out / "rotated_overlay.png").size == (24, 40)
