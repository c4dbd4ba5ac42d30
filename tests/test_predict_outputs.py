"""predict_busi.py against a hostile user: output folders holding ground truth or an earlier run, colliding
output names, signals mid-run, file names that are not UTF-8, scans named *_mask*-ish, EXIF-rotated JPEGs.

Everything here runs the real thing: real files, real subprocesses and real signals; no mocks.
"""
from __future__ import annotations

import csv
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, fill_file_system
from PIL import Image
from test_predict import checkpoint, read_csv, scan
from test_predict import save_tiny_checkpoint

import checkpoints
import image_io
import predict_busi
import prediction_table
import utils


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
# 1. Ground truth is never overwritten
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_output_into_a_busi_folder_never_overwrites_its_ground_truth(tmp_path, checkpoint):
    """--output = --input on a BUSI-layout folder: refused before any work, with and without --overwrite."""
    folder = tmp_path / "benign"
    for i in (1, 2):
        save_scan(folder / f"benign ({i}).png", 30 + i, 20, seed=i)
        save_scan(folder / f"benign ({i})_mask.png", 30 + i, 20, seed=10 + i)
    save_scan(folder / "benign (2)_mask_1.png", 32, 20, seed=20)
    before = snapshot(folder)
    for extra in ([], ["--overwrite"]):
        proc = cli(checkpoint, "--input", folder, "--output", folder, *extra)
        assert proc.returncode == 2, proc.stderr
        line = one_error_line(proc.stderr)
        assert "_mask.png" in line and "never overwritten" in line
        assert snapshot(folder) == before  # not one byte changed, no predictions.csv, no temp file

    # A folder of plain scans (no ground truth) can still take its own predictions.
    plain = tmp_path / "plain"
    save_scan(plain / "x.png", 30, 20)
    scans = snapshot(plain)
    assert cli(checkpoint, "--input", plain, "--output", plain).returncode == 0
    assert {n: (plain / n).read_bytes() for n in scans} == scans
    assert sorted(p.name for p in plain.iterdir()) == ["predictions.csv", "x.png", "x_overlay.png", "x_pred.png"]


def test_a_file_predict_did_not_write_is_never_overwritten(tmp_path, checkpoint, capsys):
    """An existing file with an output's name, or a predictions.csv that is not ours, stays, even with --overwrite."""
    save_scan(tmp_path / "in" / "a.png", 30, 20)
    out = tmp_path / "out"
    save_scan(out / "a_overlay.png", 8, 8)  # the user's own file, no predictions.csv lists it
    before = snapshot(out)
    for extra in ([], ["--overwrite"]):
        code = predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "in"),
                                  "--output", str(out), "--quiet", *extra])
        assert code == 2
        assert "a_overlay.png" in one_error_line(capsys.readouterr().err)
        assert snapshot(out) == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "predictions.csv").write_text("my own notes\n")
    code = predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "in"),
                              "--output", str(other), "--quiet", "--overwrite"])
    assert code == 2 and "predictions.csv" in one_error_line(capsys.readouterr().err)
    assert snapshot(other) == {"predictions.csv": b"my own notes\n"}


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
        "a.png": "a.png_pred.png", "a.jpg": "a.jpg_pred.png", "a_2.png": "a_2_pred.png"}
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
# 3. A re-run into an earlier run's folder
# ------------------------------------------------------------------------------------------------------------------
def test_rerun_needs_overwrite_and_then_lists_exactly_its_own_files(tmp_path, checkpoint, capsys):
    first_in, second_in, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    save_scan(first_in / "a.png", 30, 20)
    save_scan(first_in / "b.png", 34, 22)
    save_scan(second_in / "a.png", 40, 26, seed=1)
    save_scan(second_in / "c.png", 38, 24, seed=2)
    args = ["--checkpoint", str(checkpoint), "--output", str(out), "--quiet"]
    assert predict_busi.main([*args, "--input", str(first_in)]) == 0
    first = snapshot(out)

    # refused before any work: predictions.csv and a_pred.png are an earlier run's
    assert predict_busi.main([*args, "--input", str(second_in)]) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == first
    # also when no output name clashes: the earlier predictions.csv would be replaced
    assert predict_busi.main([*args, "--input", str(second_in / "c.png")]) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr().err)
    assert snapshot(out) == first

    assert predict_busi.main([*args, "--input", str(second_in), "--overwrite"]) == 0
    rows = read_csv(out / "predictions.csv")
    assert sorted(r["file"] for r in rows) == ["a.png", "c.png"]  # exactly this run's outputs
    assert Image.open(out / "a_pred.png").size == (40, 26)  # replaced by this run's prediction
    now = snapshot(out)
    assert now["b_pred.png"] == first["b_pred.png"] and now["b_overlay.png"] == first["b_overlay.png"]
    assert set(now) == set(first) | {"c_pred.png", "c_overlay.png"}  # nothing else, no temp file
    for row in rows:
        assert (out / row["mask"]).is_file() and (out / row["overlay"]).is_file()


# ------------------------------------------------------------------------------------------------------------------
# 4. SIGINT / SIGTERM mid-run
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_run_leaves_complete_files_listed_exactly(tmp_path, checkpoint, signum):
    inputs, out = tmp_path / "in", tmp_path / "out"
    first = save_scan(inputs / "scan (1).png", 640, 480)  # big enough that 40 take a few seconds
    for i in range(2, 41):
        shutil.copyfile(first, inputs / f"scan ({i}).png")
    proc = subprocess.Popen([sys.executable, "predict_busi.py", "--checkpoint", str(checkpoint), "--input",
                             str(inputs), "--output", str(out), "--batch-size", "2", "--threads", "1", "--quiet"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not any(out.glob("*_pred.png")):  # final names only (a temp file is hidden)
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no mask appeared"
            time.sleep(0.002)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    rows = read_csv(out / "predictions.csv")
    # every file on disk is listed (no temp file, no unlisted mask) and every listed file is a complete PNG
    assert {p.name for p in out.iterdir()} == listed_outputs(rows) | {"predictions.csv"}
    message = stderr.strip().splitlines()[-1]
    assert re.search(rf"\b{len(rows)} of 40 images written\b", message) and "lists exactly" in message, stderr
    assert 0 < len(rows) < 40, "the signal came too late to test anything"
    for row in rows:
        for name, mode in ((row["mask"], "L"), (row["overlay"], "RGB")):
            with Image.open(out / name) as image:
                image.load()  # raises on a truncated file
                assert image.mode == mode and image.size == (640, 480)


# ------------------------------------------------------------------------------------------------------------------
# 5. File names that are not UTF-8
# ------------------------------------------------------------------------------------------------------------------
def test_a_file_name_that_is_not_utf8_is_predicted_and_listed_escaped(tmp_path, checkpoint):
    inputs, out = tmp_path / "in", tmp_path / "out"
    good = save_scan(inputs / "good.png", 30, 20)
    try:
        with open(os.fsencode(inputs) + b"/bad\xff name.png", "wb") as f:
            f.write(good.read_bytes())
        with open(os.fsencode(inputs) + b"/broken\xfe.png", "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    except OSError as exc:  # e.g. macOS: APFS refuses names that are not UTF-8
        pytest.skip(f"the file system refuses a non-UTF-8 name: {exc}")
    shutil.copyfile(good, inputs / "zz last.png")  # sorted after the odd name
    proc = cli(checkpoint, "--input", inputs, "--output", out)
    assert proc.returncode == 1, proc.stderr  # one unreadable file
    assert "Traceback" not in proc.stderr
    assert "broken\\xfe.png" in one_error_line(proc.stderr)
    text = (out / "predictions.csv").read_bytes().decode("utf-8")  # valid UTF-8 whatever the names
    rows = list(csv.DictReader(io.StringIO(text)))
    assert sorted(r["file"] for r in rows) == ["bad\\xff name.png", "good.png", "zz last.png"]
    on_disk = set(os.listdir(os.fsencode(out)))
    assert {b"bad\xff name_pred.png", b"bad\xff name_overlay.png", b"zz last_pred.png"} <= on_disk
    assert len(on_disk) == 2 * len(rows) + 1


# ------------------------------------------------------------------------------------------------------------------
# 9. The ground-truth rule is the loader's (image_io.MASK_RE)
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
    """predict_busi.py takes the pixels, hence the mask's size, from the loader, which applies the EXIF
    orientation (PIL.ImageOps.exif_transpose)."""
    save_rotated_jpeg(tmp_path / "in" / "rotated.jpg")
    out = tmp_path / "out"
    assert predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "in"), "--output",
                              str(out), "--quiet"]) == 0
    (row,) = read_csv(out / "predictions.csv")
    assert (int(row["width"]), int(row["height"])) == (24, 40)
    assert Image.open(out / "rotated_pred.png").size == (24, 40)
    assert Image.open(out / "rotated_overlay.png").size == (24, 40)


# ------------------------------------------------------------------------------------------------------------------
# Several inputs
# ------------------------------------------------------------------------------------------------------------------
def predicted(out: Path) -> list[str]:
    return [r["file"] for r in read_csv(out / "predictions.csv")]


def test_several_inputs_are_all_predicted_and_a_file_reached_twice_once(tmp_path, checkpoint):
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    a, c = save_scan(d1 / "a.png", 30, 20), save_scan(d2 / "c.png", 36, 24, seed=2)
    save_scan(d1 / "b.png", 34, 22, seed=1)
    proc = cli(checkpoint, "--input", c, "--input", a, "--output", tmp_path / "repeated")
    assert proc.returncode == 0, proc.stderr
    assert predicted(tmp_path / "repeated") == ["d2/c.png", "d1/a.png"]  # in the order given, told apart
    # one flag, several specs: a folder, a glob and a file, reaching a.png three times (once by another spelling)
    proc = cli(checkpoint, "--input", a, d1, d1 / ".." / "d*" / "*.png", "--output", tmp_path / "listed")
    assert proc.returncode == 0, proc.stderr
    assert predicted(tmp_path / "listed") == ["d1/a.png", "d1/b.png", "d2/c.png"]
    # an unquoted glob, expanded by a real shell
    command = (f"{shlex.quote(sys.executable)} predict_busi.py --checkpoint {shlex.quote(str(checkpoint))} --quiet "
               f"--input {shlex.quote(str(tmp_path))}/d*/*.png --output {shlex.quote(str(tmp_path / 'shell'))}")
    proc = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(predicted(tmp_path / "shell")) == ["d1/a.png", "d1/b.png", "d2/c.png"]
    assert len(list((tmp_path / "shell").glob("*_pred.png"))) == 3


def test_a_symbolic_link_is_listed_by_the_name_given_not_its_target(tmp_path, checkpoint):
    target = save_scan(tmp_path / "store" / "x" / "scan.png", 30, 20)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "patientA.png").symlink_to(target)
    proc = cli(checkpoint, "--input", tmp_path / "in" / "patientA.png", "--output", tmp_path / "one")
    assert proc.returncode == 0, proc.stderr
    assert predicted(tmp_path / "one") == ["patientA.png"]
    save_scan(tmp_path / "in" / "b.png", 34, 22, seed=1)
    proc = cli(checkpoint, "--input", tmp_path / "in", "--output", tmp_path / "folder")
    assert proc.returncode == 0, proc.stderr
    assert predicted(tmp_path / "folder") == ["b.png", "patientA.png"]
    assert (tmp_path / "folder" / "patientA_pred.png").is_file()


def test_an_input_that_matches_nothing_is_named_and_nothing_is_written(tmp_path, checkpoint):
    save_scan(tmp_path / "in" / "a.png", 30, 20)
    proc = cli(checkpoint, "--input", tmp_path / "typo*.png", "--input", tmp_path / "in", "--output", tmp_path / "out")
    assert proc.returncode == 2
    assert "typo*.png" in one_error_line(proc.stderr)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------------
# A model whose outputs are not finite
# ------------------------------------------------------------------------------------------------------------------
FAULTS = {  # a real tiny model's weights (nothing trained), changed so that the forward pass really breaks
    "NaN mask head": lambda w: w["head.weight"].fill_(float("nan")),
    "NaN class head": lambda w: w["classifier.fc.2.weight"].fill_(float("nan")),  # masks finite, classes not
    "overflowing weights": lambda w: [t.mul_(1e38) for t in w.values() if t.dim() == 4],  # every conv: inf - inf
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_model_whose_outputs_are_not_finite_is_one_error_and_writes_nothing(tmp_path, checkpoint, fault):
    """Empty masks and `nan` rows would pass for a prediction: one error naming the checkpoint and the first
    image, and no file or folder left behind."""
    state = torch.load(checkpoint, weights_only=True)
    FAULTS[fault](state["model"])
    broken = tmp_path / "broken.pt"
    checkpoints.save_checkpoint(state, broken)
    save_scan(tmp_path / "in" / "a.png", 30, 20)
    save_scan(tmp_path / "in" / "b.png", 34, 22, seed=1)

    new = tmp_path / "new" / "out"  # created by the run, parent included: gone again
    proc = cli(broken, "--input", tmp_path / "in", "--output", new)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "not finite" in line and "broken.pt" in line and "a.png" in line, line
    assert not (tmp_path / "new").exists()

    mine = tmp_path / "mine"  # the user's folder stays, as it was
    save_scan(mine / "notes.png", 8, 8)
    before = snapshot(mine)
    proc = cli(broken, "--input", tmp_path / "in", "--output", mine)
    assert proc.returncode == 2 and "not finite" in one_error_line(proc.stderr)
    assert snapshot(mine) == before


# ------------------------------------------------------------------------------------------------------------------
# A full disk
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("leave", [0, 200_000], ids=["no-byte-left", "room-for-the-table-only"])
def test_a_full_disk_names_the_file_that_could_not_be_written(tmp_path, checkpoint, small_tmpfs, leave):
    """A real 4 MB tmpfs, filled; write() fails with ENOSPC, which names no file of its own."""
    noise = np.random.default_rng(0).integers(0, 256, (400, 600), dtype=np.uint8)  # its overlay: ~700 KB
    Image.fromarray(noise).save(tmp_path / "noise.png")
    out = small_tmpfs / "preds"
    out.mkdir()
    fill_file_system(small_tmpfs, leave)
    proc = cli(checkpoint, "--input", tmp_path / "noise.png", "--output", out)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)  # no traceback either
    assert "No space left" in line and "()" not in line, line
    names = [str(out / "predictions.csv")] if leave == 0 else [str(out / n) for n in predict_busi.output_names("noise")]
    assert any(name in line for name in names), line
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_predictions_copied_beside_their_scans_never_become_labels(fresh_busi_dir, tmp_path, checkpoint):
    """Predicted masks are <stem>_pred.png: copied into a BUSI class folder they are named as predictions by the
    loader, never read as the scan's ground truth (which <stem>_mask.png would have been)."""
    root, facts = fresh_busi_dir
    out = tmp_path / "preds"
    assert predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(root / "benign" / "benign (3).png"),
                              "--output", str(out), "--quiet"]) == 0
    (pred,) = out.glob("*_pred.png")
    assert pred.name == "benign (3)_pred.png" and image_io.MASK_RE.match(pred.stem) is None
    shutil.copy(pred, root / "benign" / pred.name)
    with pytest.raises(utils.DataError, match=r"a prediction in a data folder: .*benign \(3\)_pred\.png"):
        image_io.discover_samples(root)


def test_an_earlier_runs_mask_named_outputs_are_still_its_own(tmp_path, checkpoint):
    """A folder written before predictions were named _pred (its table lists <stem>_mask.png) is recognised
    as predict's own: --overwrite replaces its table, and its old files stay untouched and are never read as
    ground truth of the new run."""
    save_scan(tmp_path / "in" / "a.png", 30, 20)
    out = tmp_path / "out"
    out.mkdir()
    save_scan(out / "a_mask.png", 30, 20, seed=3)
    save_scan(out / "a_overlay.png", 30, 20, seed=4)
    (out / "predictions.csv").write_text(",".join(predict_busi.CSV_FIELDS) + "\n"
                                         "a.png,30,20,5,0.008333,0.9,0.5,benign,a_mask.png,a_overlay.png\n")
    old = (out / "a_mask.png").read_bytes()
    args = ["--checkpoint", str(checkpoint), "--input", str(tmp_path / "in"), "--output", str(out), "--quiet"]
    assert predict_busi.main(args) == 2  # an earlier run's folder: --overwrite asked for, not a ground-truth refusal
    assert predict_busi.main([*args, "--overwrite"]) == 0
    assert (out / "a_mask.png").read_bytes() == old and (out / "a_pred.png").is_file()
    assert [r["mask"] for r in read_csv(out / "predictions.csv")] == ["a_pred.png"]


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
