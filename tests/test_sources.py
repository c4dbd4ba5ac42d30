"""Several data sources in one run (BUSI + BUS-BRA's layout): per-source splits and validation, the mean of the
sources choosing best.pt, patient groups, sampling, resume from another folder, and the "no lesion" gate in the
evaluation, predict_busi.py and the Python API."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, synthetic_scan
from PIL import Image
from test_predict import save_tiny_checkpoint, scan

import checkpoints
import dataset
import evaluation
import image_io
import inference
import predict_busi
import splitting
import tensor_cache
import train_unet_busi as T
import training
import trust
import utils

TINY = ["--encoder", "none", "--image-size", "32", "--base-channels", "4", "--depth", "2", "--batch-size", "8",
        "--device", "cpu", "--eval-batch-size", "16"]
PATIENT = r"^(bus_\d+)-"


def make_bra_dir(root, patients: int = 9, seed: int = 1):
    """BUS-BRA's layout: benign/ and malignant/ only (no normal scans); bus_NNNN-l.png and bus_NNNN-r.png are two
    views of one patient, different enough that no pixel hash pairs them."""
    rng = np.random.default_rng(seed)
    for p in range(1, patients + 1):
        label = "malignant" if p % 3 == 0 else "benign"
        (root / label).mkdir(parents=True, exist_ok=True)
        for view in "lr":
            image, lesion = synthetic_scan(rng, 88, 72)
            name = root / label / f"bus_{p:04d}-{view}"
            Image.fromarray(image).save(f"{name}.png")
            Image.fromarray(lesion).convert("1").save(f"{name}_mask.png")
    return root


@pytest.fixture(scope="module")
def two_sources(busi_dir, tmp_path_factory):
    """A BUS-BRA-like folder and its patient-grouped train/val split made with dataset.py's command."""
    tmp = tmp_path_factory.mktemp("sources")
    bra = make_bra_dir(tmp / "BRA")
    split = tmp / "bra_split.json"
    assert dataset.main(["--data-dir", str(bra), "--patient-pattern", PATIENT, "--fractions", "0.6", "0.4", "0",
                         "--out", str(split)]) == 0
    return busi_dir[0], bra, split


def patients_on_both_sides(split: dict) -> set:
    side = {}
    for part in ("train", "val", "test"):
        for name in split.get(part, []):
            side.setdefault(re.search(r"(bus_\d+)-", name).group(1), set()).add(part)
    return {p for p, parts in side.items() if len(parts) > 1}


def test_patient_pattern_and_groups_csv_keep_a_patients_views_on_one_side(two_sources, tmp_path):
    _, bra, split_file = two_sources
    split = json.loads(split_file.read_text())
    assert "test" not in split and split["train"] and split["val"]  # a test share of 0: no test part
    assert patients_on_both_sides(split) == set() and "one patient's images kept together" in split["method"]
    samples = image_io.discover_samples(bra)
    assert {s.label for s in samples} == {"benign", "malignant"}  # a source without normal scans is valid
    by_pattern = splitting.patient_groups(samples, PATIENT)
    assert len(by_pattern) == 9 and all(len(g) == 2 for g in by_pattern)
    table = tmp_path / "groups.csv"  # the same groups from a table (file names, or paths in the data folder)
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "group"])
        for s in samples:
            writer.writerow([s.image if s.label == "benign" else s.image.split("/")[1], s.image[-10:-6]])
    assert splitting.patient_groups(samples, groups_csv=table) == by_pattern
    # the near-duplicate rule alone cannot see that two views are one patient's: the split puts some apart
    assert patients_on_both_sides(splitting.compute_split(bra, samples, fractions=(0.6, 0.4, 0), progress=False))
    with pytest.raises(utils.DataError, match="needs a"):  # a pattern that captures nothing is refused
        splitting.patient_groups(samples, "bus_")


def test_a_grouping_that_matches_nothing_or_leaves_a_part_empty_is_refused_and_partial_ones_are_counted(
        two_sources, tmp_path, capsys):
    """A pattern or CSV that groups no file would leave every patient free to straddle the split; one that puts
    all files in one group leaves the asked-for parts empty. Both: one line, exit code 2, nothing written."""
    _, bra, _ = two_sources
    out = tmp_path / "split.json"

    def split(*flags):
        capsys.readouterr()
        code = dataset.main(["--data-dir", str(bra), "--fractions", "0.6", "0.4", "0", "--out", str(out), *flags])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return code, captured.out, captured.err.strip()

    samples = image_io.discover_samples(bra)
    none_named, some_named = tmp_path / "none.csv", tmp_path / "some.csv"
    none_named.write_text("image,group\npatient_1.png,1\npatient_2.png,1\n")
    with open(some_named, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "group"])
        for s in samples[:6]:
            writer.writerow([Path(s.image).name, Path(s.image).name[:8]])
    for flags, said in [(["--patient-pattern", "^(patient_[0-9]+)_"], "captures a patient in none of the 18"),
                        (["--patient-pattern", "^()bus"], "non-empty"),
                        (["--groups-csv", str(none_named)], "names none of the 18 images"),
                        (["--patient-pattern", "(bus)"], "leaves no val images")]:
        code, _, err = split(*flags)
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and said in err, (flags, err)
        assert not out.exists()
    code, printed, _ = split("--groups-csv", str(some_named))
    assert code == 0 and "named 6 of 18 images; 12 left ungrouped" in printed and out.is_file()
    out.unlink()
    code, printed, _ = split("--patient-pattern", r"^(bus_000[1-3])-")
    assert code == 0 and "matched 6 of 18 images; 12 left ungrouped" in printed


def test_a_groups_csv_saved_with_a_byte_order_mark_is_read(two_sources, tmp_path):
    """Spreadsheets save 'UTF-8 CSV' with a BOM: its first column is still 'image'."""
    _, bra, _ = two_sources
    samples = image_io.discover_samples(bra)
    table = tmp_path / "groups.csv"
    rows = "".join(f"{Path(s.image).name},{Path(s.image).name[:8]}\r\n" for s in samples)
    table.write_bytes(("image,group\r\n" + rows).encode("utf-8-sig"))
    assert splitting.patient_groups(samples, groups_csv=table) == splitting.patient_groups(samples, PATIENT)


def history(run_dir):
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def test_two_sources_validate_each_choose_on_their_mean_and_resume_from_another_folder(two_sources, tmp_path,
                                                                                       monkeypatch, capsys):
    busi, bra, split_file = two_sources
    out = tmp_path / "runs"
    args = ["--data-dir", str(busi), f"BRA={bra}", "--split-file", f"BRA={split_file}", "--output-dir", str(out),
            "--cache-dir", str(tmp_path / "cache"), *TINY, "--repeat", "normal=2,BRA=2", "--run-name", "two"]
    assert T.main([*args, "--epochs", "2"]) == 0
    run = out / "two"
    log = capsys.readouterr().out
    assert "data: BRA:" in log and "(benign, malignant)" in log and "sampling 'normal=2,BRA=2'" in log
    rows = history(run)
    for row in rows:  # each source's own figures, and the score that picks best.pt is their mean
        mean = (float(row["BRA:val_score"]) + float(row["Dataset_BUSI_with_GT:val_score"])) / 2
        assert float(row["val_score"]) == pytest.approx(mean, abs=1e-4)
        assert row["BRA:val_normal_fp_rate"] == ""  # no normal scans there
    state = checkpoints.load_checkpoint(run / "best.pt")
    busi_split = json.loads((run / "split_Dataset_BUSI_with_GT.json").read_text())
    n_lesion = len(json.loads(split_file.read_text())["val"]) + sum("normal" not in n for n in busi_split["val"])
    found = {r["epoch"]: int(r["BRA:val_missed"]) + int(r["Dataset_BUSI_with_GT:val_missed"]) < n_lesion for r in rows}
    # an epoch that finds no lesion at all is best only until one that does (Trainer.end_epoch)
    assert state["best_epoch"] == int(max(rows, key=lambda r: (found[r["epoch"]], float(r["val_score"])))["epoch"])
    assert state["config"]["split_file"]["BRA"] == str(split_file.resolve())
    assert all(spec.split("=", 1)[1].startswith("/") for spec in state["config"]["data_dir"])  # absolute
    assert (run / "split_Dataset_BUSI_with_GT.json").is_file() and not (run / "split_BRA.json").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["val_fitted"]["per_source"]) == {"BRA", "Dataset_BUSI_with_GT"}
    assert "per_source" not in metrics["test"]  # only BUSI has a test part
    with open(run / "test_predictions.csv") as f:
        assert all(r["file"].startswith("Dataset_BUSI_with_GT/") for r in csv.DictReader(f))
    # a resume from another working folder finds the run's own sources and splits (recorded as absolute paths)
    monkeypatch.chdir(tmp_path)
    assert T.main(["--resume", str(run), "--epochs", "3", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert [int(r["epoch"]) for r in history(run)] == [1, 2, 3]
    assert "data: BRA:" in capsys.readouterr().out
    # ... and stops, naming it, when a recorded source has gone
    (tmp_path / "gone").mkdir()
    moved = bra.rename(tmp_path / "gone" / "BRA")
    try:
        assert T.main(["--resume", str(run), "--epochs", "4"]) == 2
        assert "data source BRA" in capsys.readouterr().err
    finally:
        moved.rename(bra)


def test_a_held_out_source_is_scored_every_epoch_chooses_nothing_and_is_not_trained_on_at_repeat_0(
        two_sources, tmp_path, capsys):
    """Leave one hospital out: BRA's validation is logged each epoch beside BUSI's, best.pt, the gate and the test
    are BUSI's alone, and --repeat BRA=0 keeps its scans out of training."""
    busi, bra, split_file = two_sources
    name = busi.name
    code, err = _train_sources(tmp_path, capsys, busi, f"BRA={bra}", extra=(
        "--split-file", f"BRA={split_file}", "--select-on", name, "--repeat", "normal=2,BRA=0", "--epochs", "2",
        "--run-name", "held"))
    assert code == 0, err
    run = tmp_path / "runs" / "held"
    busi_split = json.loads((run / "split_Dataset_BUSI_with_GT.json").read_text())
    rows = history(run)
    assert all("BRA:val_score" not in r and r["BRA:held_out_lesion_dice"] != "" for r in rows)
    best = checkpoints.load_checkpoint(run / "best.pt")
    assert best["config"]["select_on"] == name
    # the logged figures are best.pt's own on BRA's validation part, and the selection score is BUSI's alone
    model = checkpoints.load_model(run / "best.pt").model
    val = dataset.load_parts([("BRA", bra)], [str(split_file)], 32, None, None)[0]["val"]
    summary, _ = evaluation.evaluate(model, val, torch.device("cpu"), None, 0.5, 16)
    row = rows[best["best_epoch"] - 1]
    assert float(row["BRA:held_out_lesion_dice"]) == pytest.approx(summary["lesion_dice"], abs=1e-4)
    assert int(row["BRA:held_out_missed"]) == summary["missed_lesions"]
    assert float(row["val_score"]) == pytest.approx(best["best_val"]["all_dice"], abs=1e-4)
    assert "per_source" not in best["best_val"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert "per_source" not in metrics["val_fitted"] and metrics["val_fitted"]["n_images"] == len(busi_split["val"])
    assert training.repeat_index(["benign"] * 4, ["A", "A", "BRA", "BRA"], "BRA=0", seed=0).tolist() == [0, 1]
    # a held-out source is not one the checkpoint was trained on (its gate does not apply there by default)
    assert checkpoints.trained_on(best, [(name, busi)]) and not checkpoints.trained_on(best, [("BRA", bra)])
    # a resume keeps the sources that choose; a chosen source must be trained on
    capsys.readouterr()
    assert T.main(["--resume", str(run), "--select-on", "BRA", "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "choosing sources cannot change" in err, err
    code, err = _train_sources(tmp_path, capsys, busi, f"BRA={bra}", extra=(
        "--split-file", f"BRA={split_file}", "--select-on", "BRA", "--repeat", "BRA=0", "--run-name", "untrained"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "trains on none of BRA" in err, err
    code, err = _train_sources(tmp_path, capsys, busi, f"BRA={bra}", extra=(
        "--split-file", f"BRA={split_file}", "--select-on", "NOPE", "--run-name", "nope"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--select-on names NOPE" in err, err


def test_leave_one_out_trains_each_direction_keeps_finished_runs_and_tables_them_with_the_seed_ensemble(
        two_sources, tmp_path, capsys):
    import leave_one_out
    busi, bra, split_file = two_sources
    work = tmp_path / "loho"
    flags = " ".join([*TINY, "--epochs", "2", "--cache-dir", str(tmp_path / "cache")])
    args = ["--busi", str(busi), "--busbra", str(bra), "--work-dir", str(work), "--recipe-flags", flags]
    assert leave_one_out.main([*args, "--seeds", "1", "2"]) == 0, (work / "loho_busbra_s1.log").read_text()
    runs = sorted(work.glob("loho_*_s?"))
    assert [r.name for r in runs] == ["loho_busbra_s1", "loho_busbra_s2", "loho_busi_s1", "loho_busi_s2"]
    held = history(work / "loho_busbra_s1")[0]
    assert "Dataset_BUSI_with_GT:held_out_normal_fp_rate" in held and "BRA:held_out_lesion_dice" not in held
    before = {r: (r / "best.pt").stat().st_mtime_ns for r in runs}
    capsys.readouterr()
    assert leave_one_out.main([*args, "--seeds", "1"]) == 0  # repeated: the finished runs are kept
    assert capsys.readouterr().out.count("done already (kept)") == 2
    assert before == {r: (r / "best.pt").stat().st_mtime_ns for r in runs}
    assert leave_one_out.main(["--table", *map(str, runs), "--out", str(tmp_path / "loho.png")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "loho.png").is_file() and "| default | BRA | Dataset_BUSI_with_GT | 1 |" in out
    # the ensemble row is the two seeds' models as one checkpoint, scored on the held-out validation split
    checkpoints.export_checkpoint([work / "loho_busbra_s1" / "best.pt", work / "loho_busbra_s2" / "best.pt"],
                                  tmp_path / "ens.pt", half=False)
    model = checkpoints.load_model(tmp_path / "ens.pt").model
    part = dataset.load_parts([("Dataset_BUSI_with_GT", busi)], [str(work / "loho_busbra_s1" /
                              "split_Dataset_BUSI_with_GT.json")], 32, None, None, only="val")[0]["val"]
    summary, _ = evaluation.evaluate(model, part, torch.device("cpu"), None, 0.5, 16)
    row = next(line for line in out.splitlines() if line.startswith("| default | ") and "ensemble" not in line
               and line.count("|") == 8)
    assert row.split("|")[7].strip().endswith(f"/ {summary['lesion_dice']:.3f} ({summary['missed_lesions']} missed)")
    assert leave_one_out.main(["--table", str(tmp_path / "cache")]) == 2  # not a run of this command: one line


def _train_sources(tmp_path, capsys, *data_dir, extra=()):
    capsys.readouterr()
    code = T.main(["--data-dir", *map(str, data_dir), "--output-dir", str(tmp_path / "runs"), "--cache-dir",
                   str(tmp_path / "cache"), *TINY, "--epochs", "1", *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_one_folder_given_as_two_sources_is_refused(busi_dir, tmp_path, capsys):
    """Under two names, or once through a symbolic link: it would be trained on twice."""
    root = busi_dir[0]
    link = tmp_path / "link"
    link.symlink_to(root)
    for second in (f"B={root}", str(link)):
        code, err = _train_sources(tmp_path, capsys, f"A={root}", second)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "are one folder" in err, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_link_loop_is_one_line_and_the_suggested_name_for_a_second_source_works(busi_dir, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, err = _train_sources(tmp_path, capsys, loop)
    assert code == 2 and err.strip() == f"error: cannot follow {loop}: a loop of symbolic links", err
    other = tmp_path / "b" / busi_dir[0].name  # another folder of the same name
    make_bra_dir(other)
    with pytest.raises(utils.DataError) as caught:
        dataset.resolve_sources([str(busi_dir[0]), str(other)])
    suggested = re.search(r"--data-dir (\S+=\S+)", str(caught.value)).group(1)
    assert suggested == f"{busi_dir[0].name}_2={other}"
    names = [n for n, _ in dataset.resolve_sources([str(busi_dir[0]), suggested])]
    assert names == [busi_dir[0].name, f"{busi_dir[0].name}_2"]


def test_identical_and_near_duplicate_scans_across_sources_are_refused_or_named(busi_dir, tmp_path, capsys):
    """A copy of a source whose split tests on the other source's training scans: refused, naming them. The same
    with the copies re-saved slightly brighter (near-duplicates, not identical): trained, with a warning naming
    them; and scans in both training parts: a warning that they are trained on twice."""
    import shutil

    root = busi_dir[0]
    fresh = splitting.compute_split(root, progress=False)
    copy = tmp_path / "Copy"
    shutil.copytree(root, copy)
    leaked = fresh["train"][:3]
    split = tmp_path / "copy_split.json"
    split.write_text(json.dumps({"train": fresh["train"][3:], "val": fresh["val"], "test": fresh["test"] + leaked}))
    flags = ("--split-file", f"Copy={split}")
    code, err = _train_sources(tmp_path, capsys, root, copy, extra=flags)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "3 held-out scan(s)" in err and "identical to training scans" in err and leaked[0] in err, err
    for name in leaked:  # re-saved 2 grey levels brighter: no longer identical, still the same scan
        pixels = np.asarray(Image.open(copy / name).convert("L"), dtype=np.int16)
        Image.fromarray(np.clip(pixels + 2, 0, 255).astype(np.uint8)).save(copy / name)
    code, err = _train_sources(tmp_path, capsys, root, copy, extra=(*flags, "--run-name", "near"))
    assert code == 0, err
    assert "3 held-out scan(s) of one source are near-duplicates" in err and leaked[0] in err, err
    assert "trained on twice" in err


def test_a_source_whose_split_has_no_validation_part_is_refused(two_sources, tmp_path, capsys):
    busi, bra, split_file = two_sources
    split = json.loads(split_file.read_text())
    empty_val = tmp_path / "no_val.json"
    empty_val.write_text(json.dumps({"train": split["train"] + split["val"], "val": []}))
    code, err = _train_sources(tmp_path, capsys, busi, f"BRA={bra}", extra=("--split-file", f"BRA={empty_val}"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "source BRA" in err and "no validation images" in err and "no_val.json" in err, err


def test_a_list_flag_given_twice_takes_both_values(two_sources, tmp_path, capsys):
    """--data-dir A --data-dir B trained on B alone: every list flag adds its values, as predict's --input does."""
    import fit_trust

    busi, bra, split_file = two_sources
    args = T.parse_args(["--data-dir", str(busi), "--data-dir", f"BRA={bra}", "--split-file", f"BRA={split_file}",
                         "--split-file", "X=y.json"])
    assert args.data_dir == [str(busi), f"BRA={bra}"] and args.split_file == [f"BRA={split_file}", "X=y.json"]
    parsed = fit_trust.build_parser().parse_args(["--checkpoint", "c.pt", "--output", "o.pt", "--data-dir", "a",
                                                  "--data-dir", "b", "c",
                                                  "--split-file", "s", "--split-file", "t"])
    assert parsed.data_dir == ["a", "b", "c"] and parsed.split_file == ["s", "t"]
    code, _ = _train_sources(tmp_path, capsys, busi, extra=("--data-dir", f"BRA={bra}", "--split-file",
                                                             f"BRA={split_file}", "--run-name", "twice"))
    assert code == 0
    assert set(checkpoints.load_checkpoint(tmp_path / "runs" / "twice" / "best.pt")["config"]["split_file"]) == \
        {"BRA", busi.name}


def test_resume_refuses_a_changed_set_of_sources_and_a_folder_named_with_an_equals_sign_resumes(
        two_sources, tmp_path, capsys):
    """A renamed source trained every epoch and then failed in the history writer; a dropped one read NAME=PATH as a
    path. Both are refused up front, naming the recorded sources; the run is untouched. A folder whose name holds
    '=' is recorded under a name that reads back, and resumes."""
    import shutil

    busi, bra, split_file = two_sources
    flags = ("--epochs", "2", "--stop-after", "1")
    code, _ = _train_sources(tmp_path, capsys, busi, f"BRA={bra}",
                             extra=("--split-file", f"BRA={split_file}", "--run-name", "r", *flags))
    assert code == 0
    run = tmp_path / "runs" / "r"
    before = (run / "latest.pt").read_bytes()
    for data_dir in ([busi, f"NEW={bra}"], [busi]):
        capsys.readouterr()
        assert T.main(["--resume", str(run), "--data-dir", *map(str, data_dir), "--cache-dir",
                       str(tmp_path / "cache")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "trained on the sources" in err and "BRA" in err, err
        assert (run / "latest.pt").read_bytes() == before and len(history(run)) == 1
    assert T.main(["--resume", str(run), "--data-dir", str(busi), f"BRA={bra}", "--cache-dir",
                   str(tmp_path / "cache")]) == 0
    assert len(history(run)) == 2
    odd = tmp_path / "hosp=B"
    shutil.copytree(bra, odd)
    code, _ = _train_sources(tmp_path, capsys, busi, odd, extra=("--run-name", "eq", *flags))
    assert code == 0
    recorded = checkpoints.load_checkpoint(tmp_path / "runs" / "eq" / "latest.pt")["config"]["data_dir"]
    assert f"hosp_B={odd}" in recorded
    assert T.main(["--resume", str(tmp_path / "runs" / "eq"), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert len(history(tmp_path / "runs" / "eq")) == 2 and "hosp_B:val_score" in history(tmp_path / "runs" / "eq")[0]
    # a run of one source whose folder moved to another name: its recorded split follows it
    parts = json.loads(split_file.read_text())
    own = tmp_path / "own_split.json"  # one source needs a test part
    own.write_text(json.dumps({"train": parts["train"][2:], "val": parts["val"], "test": parts["train"][:2]}))
    code, err = _train_sources(tmp_path, capsys, bra, extra=("--split-file", str(own), "--run-name", "one", *flags))
    assert code == 0, err
    moved = tmp_path / "Moved"
    shutil.copytree(bra, moved)
    capsys.readouterr()
    assert T.main(["--resume", str(tmp_path / "runs" / "one"), "--data-dir", str(moved), "--cache-dir",
                   str(tmp_path / "cache")]) == 0
    assert f"from {own.resolve()}" in capsys.readouterr().out and len(history(tmp_path / "runs" / "one")) == 2


def test_the_mean_of_the_sources_ranks_epochs_not_the_pooled_images():
    """Source A (8 images) gains 0.1 where source B (2 images) loses 0.3: pooled, the epoch wins; on the mean it
    does not."""
    def records(a: float, b: float):
        return [{"label": "benign", "dice": a, "iou": a, "pred_pixels": 1, "gt_pixels": 1, "inter": 1, "source": "A"}
                for _ in range(8)] + [{"label": "benign", "dice": b, "iou": b, "pred_pixels": 1, "gt_pixels": 1,
                                       "inter": 1, "source": "B"} for _ in range(2)]
    first, second = evaluation.summarize(records(0.5, 0.8)), evaluation.summarize(records(0.6, 0.5))
    assert second["all_dice"] > first["all_dice"] and second["score"] < first["score"]
    assert first["score"] == pytest.approx((0.5 + 0.8) / 2) and set(first["per_source"]) == {"A", "B"}


def test_repeat_draws_each_class_and_source_as_often_as_asked():
    labels, sources = ["normal", "benign", "benign", "malignant"], ["A", "A", "B", "B"]
    drawn = training.repeat_index(labels, sources, "normal=3,B=2", seed=0).tolist()
    assert sorted(drawn) == [0, 0, 0, 1, 2, 2, 3, 3]
    assert training.repeat_index(labels, sources, "", seed=0).tolist() == [0, 1, 2, 3]
    half = training.repeat_index(["benign"] * 1000, ["A"] * 1000, "A=0.5", seed=3)
    assert 430 < len(half) < 570 and half.equal(training.repeat_index(["benign"] * 1000, ["A"] * 1000, "A=0.5",
                                                                      seed=3))
    with pytest.raises(ValueError, match="neither a class nor a source"):
        training.repeat_index(labels, sources, "BUSI=2", seed=0)
    with pytest.raises(SystemExit):
        T.parse_args(["--repeat", "normal=-1"])


def test_absurd_repeat_factors_an_empty_epoch_and_a_source_named_like_a_class_are_one_line_each(
        two_sources, tmp_path, capsys):
    """normal=1e9 asked for a 48 GB allocation; A=0.01,B=0.01 drew 0 images and divided by zero; a source named
    'normal' took both the class's factor and its own."""
    busi, bra, split_file = two_sources
    for spec in ("normal=1e9", "normal=101"):
        with pytest.raises(SystemExit):
            T.parse_args(["--repeat", spec])
        assert "above 100" in capsys.readouterr().err
    with pytest.raises(ValueError, match="draws some images 400 times"):  # 20 x 20: each factor allowed, not both
        training.repeat_index(["normal", "benign"], ["A", "A"], "normal=20,A=20", seed=0)
    code, err = _train_sources(tmp_path, capsys, busi, f"BRA={bra}", extra=(
        "--split-file", f"BRA={split_file}", "--repeat", f"{busi.name}=0.01,BRA=0.01", "--run-name", "few"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "training images per epoch" in err, err
    code, err = _train_sources(tmp_path, capsys, busi, f"normal={bra}", extra=("--run-name", "cls"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "named like a class ('normal'" in err, err


# ------------------------------------------------------------------------------------------------ the gate
def test_presence_gate_keeps_the_asked_share_of_lesion_scans_and_picks_the_fewest_false_outlines():
    rng = np.random.default_rng(0)
    lesion = np.r_[np.ones(200, bool), np.zeros(40, bool)]
    outlined = np.r_[rng.random(200) > 0.02, rng.random(40) > 0.5]
    # the class head separates lesion from normal scans; the mask's maximum probability does not
    inputs = np.c_[rng.normal(2, 1, 240), np.where(lesion, rng.normal(3, 1, 240), rng.normal(-1, 1, 240))]
    gate = trust.fit_presence(inputs, lesion, outlined, 0.98, "synthetic")
    assert gate["candidate"] in ("class_head", "combined")
    p = trust.presence_probability(torch.tensor(inputs), gate).numpy()
    assert (p >= gate["cut"])[lesion].mean() >= 0.98  # the asked share of lesion scans keeps its mask
    assert gate["normal_fp_rate"] < gate["no_gate"]["normal_fp_rate"]
    lo, hi = gate["normal_fp_rate_interval"]
    assert lo <= gate["normal_fp_rate"] <= hi
    assert trust.fit_presence(inputs, lesion, outlined, 0.0, "off") is None  # keep 0: no gate
    assert trust.fit_presence(inputs[:200], lesion[:200], outlined[:200], 0.98, "no normals") is None
    # no normal scan outlined without a gate: a gate could only cost lesions, so there is none
    assert trust.fit_presence(inputs, lesion, np.r_[outlined[:200], np.zeros(40, bool)], 0.98, "nothing to gain") is None


def test_the_gates_cut_lies_between_validation_scores_so_float32_gates_what_the_fit_counted():
    """A cut exactly on a lesion scan's float64 score gated that scan or not depending on how its float32 score
    rounded (torch and onnxruntime disagreed, and the fit's 'missed' figure disagreed with the count)."""
    for seed in range(12):
        rng = np.random.default_rng(seed)
        lesion = np.r_[np.ones(60, bool), np.zeros(20, bool)]
        outlined = np.ones(80, bool)
        inputs = np.c_[rng.normal(2, 1, 80), np.where(lesion, rng.normal(2, 1, 80), rng.normal(-1, 1, 80))]
        gate = trust.fit_presence(inputs, lesion, outlined, 0.9, "synthetic")
        scores = gate["candidates"][gate["candidate"]]["curve"]  # (cut, ...) rows: -inf, then every score
        assert gate["cut"] not in {row[0] for row in scores}
        emptied = trust.gated(trust.presence_probability(torch.tensor(inputs, dtype=torch.float32), gate), gate)
        emptied = emptied.numpy()
        assert emptied[lesion].mean() == pytest.approx(gate["missed_rate"]), seed  # every lesion scan is outlined
        assert (~emptied[~lesion]).mean() == pytest.approx(gate["normal_fp_rate"]), seed


@pytest.fixture(scope="module")
def gated_checkpoints(tmp_path_factory):
    """The tiny model with a gate that empties every mask, and one that empties none (both fitted on the scans'
    own site, so that they apply by default)."""
    folder = tmp_path_factory.mktemp("gate")
    base = checkpoints.load_checkpoint(save_tiny_checkpoint(folder / "base.pt"))
    paths = {}
    for name, cut in (("all", 2.0), ("none", -1.0)):  # a probability is never >= 2, always >= -1
        gate = {"weights": torch.tensor([1.0, 0.0]), "bias": 0.0, "cut": cut, "candidate": "max_probability"}
        paths[name] = folder / f"{name}.pt"
        checkpoints.save_checkpoint({**base, "trust": {**base["trust"], "presence": gate,
                                                       "gate_scope": trust.SITE_GATE}}, paths[name])
    return paths


def test_the_gate_empties_the_mask_in_the_api_and_leaves_a_kept_scan_alone(gated_checkpoints):
    image = scan(40, 36, seed=5)
    emptied = inference.Predictor(gated_checkpoints["all"])(image)
    kept = inference.Predictor(gated_checkpoints["none"])(image)
    assert kept.mask.any() and not kept.gated and 0 < kept.presence_probability < 1
    assert emptied.gated and not emptied.mask.any() and emptied.presence_probability == kept.presence_probability
    np.testing.assert_array_equal(kept.mask, kept.probability > 0.5)  # a kept scan's mask is untouched
    np.testing.assert_array_equal(emptied.probability, kept.probability)  # the map is shown as the model gave it


def test_predict_writes_the_presence_probability_and_the_emptied_masks(gated_checkpoints, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(2):
        Image.fromarray(scan(40, 36, seed=i)).save(scans / f"s{i}.png")
    rows = {}
    for name, path in gated_checkpoints.items():
        assert predict_busi.main(["--checkpoint", str(path), "--input", str(scans), "--output",
                                  str(tmp_path / name), "--quiet"]) == 0
        with open(tmp_path / name / "predictions.csv") as f:
            rows[name] = list(csv.DictReader(f))
        masks = [np.asarray(Image.open(tmp_path / name / f"s{i}_pred.png")) for i in range(2)]
        assert all(m.any() for m in masks) == (name == "none") and not any(m.any() for m in masks) == (name == "all")
    assert "2 of 2 judged lesion-free" in capsys.readouterr().out
    assert [r["no_lesion"] for r in rows["all"]] == [predict_busi.NO_LESION] * 2
    assert all(r["lesion_pixels"] == "0" for r in rows["all"]) and all(r["no_lesion"] == "" for r in rows["none"])
    assert [r["presence_probability"] for r in rows["all"]] == [r["presence_probability"] for r in rows["none"]]
    assert all(0 < float(r["presence_probability"]) < 1 for r in rows["all"])


def test_evaluation_scores_the_gated_masks(gated_checkpoints, busi_dir):
    root, _ = busi_dir
    samples = image_io.discover_samples(root)
    data = tensor_cache.build_cache(root, samples, 32, None, progress=False)
    for name, path in gated_checkpoints.items():
        loaded_ = checkpoints.load_model(path)
        model, state = loaded_.model, loaded_.state
        summary, records = evaluation.evaluate(model, data, torch.device("cpu"), fitted_trust=state["trust"])
        assert all(r["gated"] == (name == "all") for r in records)
        if name == "all":  # every mask emptied: no normal scan outlined, every lesion missed
            assert summary["normal_fp_rate"] == 0 and summary["missed_lesions"] == summary["n_lesion"]
        else:
            assert summary["missed_lesions"] < summary["n_lesion"]


def test_a_damaged_gate_is_named_and_the_entry_ignored(gated_checkpoints, tmp_path):
    state = checkpoints.load_checkpoint(gated_checkpoints["all"])
    state["trust"]["presence"]["weights"] = torch.tensor([float("nan"), 0.0])
    fitted, why = checkpoints.fitted_trust(state)
    assert fitted is None and "presence gate's weights" in why


def test_the_committed_busbra_split_has_no_test_part_and_no_patient_on_both_sides():
    busbra = json.loads((ROOT / "splits" / "busbra_split.json").read_text())
    assert "test" not in busbra and patients_on_both_sides(busbra) == set()


def test_the_model_cards_command_rebuilds_the_shipped_models_recipe_and_architecture():
    """The training command in the model card, parsed as the script parses it: every hyperparameter the shipped
    model records, and the architecture it describes, are what the command gives today."""
    import shlex

    card = (ROOT / "checkpoints" / "README.md").read_text(encoding="utf-8")
    line = next(ln for ln in card.splitlines() if ln.startswith("python train_unet_busi.py --data-dir"))
    argv = shlex.split(line.split("#")[0])[2:]
    args = T.parse_args(argv)
    state = checkpoints.load_checkpoint(checkpoints.DEFAULT_CHECKPOINT)
    recorded = state["config"]
    differ = {k: (getattr(args, k), recorded[k]) for k in T.HYPERPARAMETERS if k in recorded
              and getattr(args, k) != recorded[k]}
    assert differ == {}
    built = checkpoints.model_for_run(args, None).config
    assert {k: v for k, v in built.items() if k != "pretrained"} == \
        {k: v for k, v in state["model_config"].items() if k != "pretrained"}
    assert len(dataset.resolve_sources(args.data_dir, announce=False)) == 2  # both hospitals
