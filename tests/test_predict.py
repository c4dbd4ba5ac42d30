"""predict_busi.py and the Python API (Predictor): odd inputs and arrays of every kind, partial failures, exit
codes, bad thresholds and devices, and masks checked against an independent prediction."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REAL_DATA, ROOT
from PIL import Image

import checkpoints
import image_io
import inference
import predict_busi
import prediction_table
import trust
import utils
from unet import UNet

IMAGE_SIZE = 32
SHARPEN = 1000.0


def save_tiny_checkpoint(path, num_classes: int = 3, seed: int = 0, threshold: float = 0.5, with_trust: bool = True):
    torch.manual_seed(seed)
    model = UNet(1, 1, base_channels=4, depth=2, num_classes=num_classes)
    # An untrained net's probabilities all sit within ~0.003 of 0.5; sharpening its output layer spreads them
    # over (0, 1), so that masks are partial and thresholds matter, as with a trained model.
    model.eval()
    with torch.no_grad():
        model.head.weight.mul_(SHARPEN)
        model.head.bias.mul_(SHARPEN)
        reference = torch.from_numpy(scan(IMAGE_SIZE, IMAGE_SIZE, seed=99)).float().div(255)[None, None]
        model.head.bias.sub_(model(reference)[0].median())  # about half of a typical image is then "lesion"
    state = {"format": checkpoints.CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": model.config,
             "config": {"image_size": IMAGE_SIZE, "threshold": threshold}}
    if with_trust:  # as training leaves every checkpoint: the real fit, on this model's outputs for 12 scans
        state["trust"] = tiny_trust(model, threshold)
    checkpoints.save_checkpoint(state, path)
    return path


def tiny_trust(model, threshold: float) -> dict:
    """A trust entry fitted by trust.fit on the model's own outputs for synthetic scans, with made-up outcomes
    (Dice 0, 0.25, ... per scan): a real entry of the right shape, not a meaningful score."""
    images = torch.from_numpy(np.stack([scan(IMAGE_SIZE, IMAGE_SIZE, seed=s) for s in range(12)]))[:, None]
    batches = [b.extras for b in inference.predict_batches(model, images, torch.device("cpu"), with_trust=True)]
    inputs = {k: None if batches[0][k] is None else torch.cat([b[k] for b in batches]) for k in batches[0]}
    records = [{"label": ("benign", "malignant", "normal")[i % 3], "dice": (i % 4) / 4,
                "pred_pixels": int((inputs["seg"][i] > threshold).sum())} for i in range(12)]
    return trust.fit(inputs["deep"], inputs, records, records, threshold, "synthetic scans (tests)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def scan(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth grey test pattern (compresses well, so even big files are quick to write)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(5, 5)).astype(np.uint8)
    return np.array(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.uint8)


def make_odd_inputs(folder):
    """Every mode and format the tool promises to read, plus litter it must skip; returns {name: (w, h)}."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}

    def save(name, image, **kw):
        image.save(folder / name, **kw)
        sizes[name] = image.size

    save("tiny.png", Image.fromarray(scan(5, 7)))                                       # 5 x 7, L
    save("large.png", Image.fromarray(np.dstack([scan(1500, 1200, 1)] * 3)))            # 1500 x 1200, RGB
    rgba = np.dstack([scan(64, 48, 2)] * 3 + [np.full((48, 64), 200, np.uint8)])
    save("alpha.png", Image.fromarray(rgba))                                            # RGBA
    save("deep.png", Image.fromarray(scan(40, 30, 3).astype(np.uint16) * 257))          # 16-bit
    assert Image.open(folder / "deep.png").mode.startswith("I")
    save("palette.png", Image.fromarray(scan(33, 21, 4)).convert("P"))                  # palette
    save("photo.jpg", Image.fromarray(np.dstack([scan(80, 60, 5)] * 3)), quality=90)    # JPEG
    save("bitmap.bmp", Image.fromarray(scan(50, 40, 6)))                                # BMP
    save("scan.tiff", Image.fromarray(scan(45, 35, 7)))                                 # TIFF
    # litter: ground truth, hidden file, a non-image
    Image.fromarray(scan(5, 7)).save(folder / "tiny_mask.png")
    Image.fromarray(scan(5, 7)).save(folder / ".hidden.png")
    (folder / "notes.txt").write_text("not an image")
    return sizes


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def independent_mask(model, image: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The expected prediction, computed without predict_busi: (probability map, mask) at the image's size."""
    x = torch.from_numpy(np.array(image_io.resize_image(image, IMAGE_SIZE))).float().div(255)[None, None]
    with torch.no_grad():
        prob = torch.sigmoid(model(x)[0])
    prob = F.interpolate(prob, size=image.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    return prob, prob > threshold


# ------------------------------------------------------------------------------------------------------------------
def test_odd_inputs_with_a_corrupt_file_via_the_command_line(tmp_path, checkpoint):
    inputs, out = tmp_path / "in", tmp_path / "out"
    sizes = make_odd_inputs(inputs)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    proc = subprocess.run([sys.executable, "predict_busi.py", "--checkpoint", str(checkpoint), "--input",
                           str(inputs), "--output", str(out), "--batch-size", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "broken.png" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr

    rows = read_csv(out / "predictions.csv")
    assert list(rows[0]) == list(predict_busi.CSV_FIELDS)
    assert sorted(r["file"] for r in rows) == sorted(sizes)  # good files only: no broken, mask, hidden or txt
    for row in rows:
        stem = row["file"].rsplit(".", 1)[0]
        mask = Image.open(out / f"{stem}_pred.png")
        assert mask.mode == "L" and mask.size == sizes[row["file"]]
        values = np.unique(np.asarray(mask))
        assert set(values.tolist()) <= {0, 255}
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == sizes[row["file"]]
        w, h = sizes[row["file"]]
        lesion = int((np.asarray(mask) == 255).sum())
        assert (int(row["width"]), int(row["height"]), int(row["lesion_pixels"])) == (w, h, lesion)
        assert float(row["lesion_fraction"]) == pytest.approx(lesion / (w * h), abs=1e-6)
        assert 0 <= float(row["max_probability"]) <= 1
        assert 0 <= float(row["malignancy_probability"]) <= 1 and row["predicted_class"] in utils.CLASSES
    assert not (out / "broken_pred.png").exists() and not (out / "tiny_mask_pred.png").exists()
    assert not (out / ".hidden_pred.png").exists()


def test_masks_equal_an_independent_prediction_and_threshold_applies(tmp_path, checkpoint, capsys):
    inputs = tmp_path / "in"
    make_odd_inputs(inputs)
    model = checkpoints.load_model(checkpoint).model
    for threshold in (0.5, 0.52):
        out = tmp_path / f"out{threshold}"
        assert predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(out),
                                  "--threshold", str(threshold), "--quiet"]) == 0
        rows = {r["file"]: r for r in read_csv(out / "predictions.csv")}
        last = capsys.readouterr().out.strip().splitlines()[-1]  # another model than the shipped one: not its card
        assert last.startswith("research use only") and "README.md" not in last and "metrics.json" in last
        for name in ("alpha.png", "photo.jpg", "deep.png", "large.png"):
            image = image_io.load_image(inputs / name)
            prob, expected = independent_mask(model, image, threshold)
            written = np.asarray(Image.open(out / f"{name.rsplit('.', 1)[0]}_pred.png")) == 255
            # Equal up to float rounding: any disagreement must sit right at the threshold.
            differ = written != expected
            assert np.all(np.abs(prob[differ] - threshold) < 1e-4), name
            assert float(rows[name]["max_probability"]) == pytest.approx(prob.max(), abs=2e-4)
    lesion = {t: sum(int(r["lesion_pixels"]) for r in read_csv(tmp_path / f"out{t}" / "predictions.csv"))
              for t in (0.5, 0.52)}
    assert lesion[0.52] <= lesion[0.5]


def test_overlay_draws_the_outline_around_the_mask():
    image = np.full((40, 50), 100, np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[10:20, 15:30] = True
    rgb = predict_busi.overlay_image(image, mask)
    coloured = np.all(rgb == predict_busi.OUTLINE_RGB, axis=2)
    assert coloured[9, 20] and coloured[20, 20] and coloured[15, 14] and coloured[15, 30]  # the ring outside
    assert not coloured[mask].any()                                                       # inside untouched
    assert np.all(rgb[~coloured] == 100)
    assert np.all(predict_busi.overlay_image(image, np.zeros_like(mask)) == 100)  # no lesion, no outline


def test_clean_run_exits_0_and_single_file_and_glob_inputs(tmp_path, checkpoint, capsys):
    inputs = tmp_path / "in"
    make_odd_inputs(inputs)
    out = tmp_path / "one"
    assert predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(inputs / "photo.jpg"),
                              "--output", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["photo_overlay.png", "photo_pred.png", "predictions.csv"]
    out = tmp_path / "glob"
    assert predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(inputs / "*.png"),
                              "--output", str(out), "--quiet"]) == 0
    files = {r["file"] for r in read_csv(out / "predictions.csv")}
    assert files == {"tiny.png", "large.png", "alpha.png", "deep.png", "palette.png"}  # no *_mask*, no hidden
    assert capsys.readouterr().err.count("error") == 0


def test_model_without_class_head_leaves_the_class_columns_empty(tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "nohead.pt", num_classes=0)
    Image.fromarray(scan(30, 20)).save(tmp_path / "a.png")
    assert predict_busi.main(["--checkpoint", str(ckpt), "--input", str(tmp_path / "a.png"), "--output",
                              str(tmp_path / "out"), "--quiet"]) == 0
    (row,) = read_csv(tmp_path / "out" / "predictions.csv")
    assert row["malignancy_probability"] == "" and row["predicted_class"] == ""


class RunsCode:
    """Unpickling this would create a file: a stand-in for a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_bad_checkpoint(problem: str, path: Path, good: Path) -> Path:
    """A checkpoint that must be refused: missing, not a checkpoint, another architecture, or code-running."""
    if problem == "foreign":
        path.write_text("not a checkpoint")
    elif problem == "architecture":
        state = torch.load(good, weights_only=True)
        state["model_config"] = dict(state["model_config"], base_channels=8)
        torch.save(state, path)
    elif problem == "hostile":
        torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "model": RunsCode(path.with_suffix(".pwned"))}, path)
    return path


@pytest.mark.parametrize("problem", ["missing", "foreign", "architecture", "hostile"])
def test_bad_checkpoint_exits_2_with_one_line(tmp_path, checkpoint, capsys, problem):
    Image.fromarray(scan(30, 20)).save(tmp_path / "a.png")
    bad = write_bad_checkpoint(problem, tmp_path / "bad.pt", checkpoint)
    code = predict_busi.main(["--checkpoint", str(bad), "--input", str(tmp_path / "a.png"), "--output",
                              str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "bad.pt" in err[0]
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "bad.pwned").exists()  # the hostile pickle ran nothing


@pytest.mark.parametrize("spec", ["nothing_here/*.png", "missing.png", "empty_dir"])
def test_input_matching_nothing_exits_2(tmp_path, checkpoint, capsys, spec):
    (tmp_path / "empty_dir").mkdir()
    code = predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / spec), "--output",
                              str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:")


def test_help_describes_the_tool():
    proc = subprocess.run([sys.executable, "predict_busi.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    for word in ("--checkpoint", "--input", "--output", "--threshold", "--tta", "predictions.csv", "Exit codes"):
        assert word in proc.stdout


def test_bundled_sample_folder_skips_ground_truth(tmp_path, checkpoint, capsys):
    folder = ROOT / "data" / "busi_sample" / "benign"
    images = [p for p in folder.iterdir() if "_mask" not in p.name]
    assert predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(folder), "--output",
                              str(tmp_path), "--quiet"]) == 0
    assert len(list(tmp_path.glob("*_pred.png"))) == len(images) == len(read_csv(tmp_path / "predictions.csv"))


SHIPPED = checkpoints.DEFAULT_CHECKPOINT


def test_shipped_model_fits_its_budget_and_loads():
    assert SHIPPED.stat().st_size < 15e6  # the shipped model's budget: 15 MB
    loaded_ = checkpoints.load_model(SHIPPED)
    model, state = loaded_.model, loaded_.state
    assert state["config"]["image_size"] % model.size_multiple == 0


@pytest.mark.skipif(not (REAL_DATA.is_dir() and SHIPPED.is_file()), reason="real BUSI data or shipped model absent")
def test_shipped_model_on_real_scans(tmp_path, capsys):
    pattern = str(REAL_DATA / "malignant" / "malignant (1?).png")  # ten real scans, quick on a CPU
    assert predict_busi.main(["--checkpoint", str(SHIPPED), "--input", pattern, "--output", str(tmp_path),
                              "--device", "cpu", "--quiet"]) == 0
    rows = read_csv(tmp_path / "predictions.csv")
    assert len(rows) == 10
    for row in rows:
        w, h = Image.open(REAL_DATA / "malignant" / row["file"]).size
        assert Image.open(tmp_path / row["file"].replace(".png", "_pred.png")).size == (w, h)


def test_predict_says_research_use_only_and_points_to_the_model_card(tmp_path, capsys):
    import predict_busi

    help_text = predict_busi.build_parser().format_help()
    assert "Research use only" in " ".join(help_text.split())
    assert (ROOT / "checkpoints" / "README.md").is_file()
    card = " ".join((ROOT / "checkpoints" / "README.md").read_text().split())
    assert "not for clinical decisions" in card and "Known limits" in card
    image = np.full((40, 50), 90, np.uint8)
    Image.fromarray(image).save(tmp_path / "scan.png")
    assert predict_busi.main(["--input", str(tmp_path / "scan.png"), "--output", str(tmp_path / "out"),
                              "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("research use only") and out[-1].endswith("README.md")


def test_the_readme_python_api_runs_as_written(tmp_path, monkeypatch):
    """The README's 'From Python' block, executed as it stands on a real scan: the mask and probabilities come
    back at the scan's size and agree with predict_busi.py's CSV for the same file."""
    import re

    block = re.search(r"\*\*From Python\*\*.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    image = np.full((70, 90), 60, np.uint8)
    image[20:45, 30:60] = 200
    Image.fromarray(image).save(tmp_path / "scan.png")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(block, scope)  # noqa: S102 - the documented snippet itself
    result = scope["result"]
    assert result.mask.shape == result.probability.shape == (70, 90) and result.mask.dtype == bool
    assert set(result.class_probabilities) == {"benign", "malignant", "normal"}
    assert predict_busi.main(["--input", "scan.png", "--output", "out", "--quiet", "--device", "cpu"]) == 0
    (row,) = read_csv(tmp_path / "out" / "predictions.csv")
    assert int(row["lesion_pixels"]) == int(result.mask.sum())
    assert float(row["malignancy_probability"]) == pytest.approx(result.malignancy_probability, abs=1e-4)


@pytest.mark.parametrize("normal, lesion, flagged", [(True, True, True), (True, False, False), (False, True, False)])
def test_a_row_whose_class_says_normal_beside_a_lesion_mask_is_flagged(tmp_path, normal, lesion, flagged):
    """The class head and the mask come from one model and can contradict each other; the CSV says so."""
    state = checkpoints.load_checkpoint(save_tiny_checkpoint(tmp_path / "t.pt"))
    weights = state["model"]
    bias = next(k for k in weights if k.startswith("classifier") and k.endswith("bias"))
    weights[bias] = torch.tensor([0.0, 0.0, 50.0 if normal else -50.0])  # benign, malignant, normal
    weights["head.bias"] = torch.tensor([50.0 if lesion else -50.0])  # every pixel lesion, or none
    checkpoints.save_checkpoint(state, tmp_path / "edited.pt")
    Image.fromarray(scan(40, 30)).save(tmp_path / "s.png")
    assert predict_busi.main(["--checkpoint", str(tmp_path / "edited.pt"), "--input", str(tmp_path / "s.png"),
                              "--output", str(tmp_path / "out"), "--quiet", "--device", "cpu"]) == 0
    (row,) = read_csv(tmp_path / "out" / "predictions.csv")
    assert (row["predicted_class"] == "normal") == normal and (int(row["lesion_pixels"]) > 0) == lesion
    assert row["check"] == (inference.DISAGREE if flagged else "")


def test_one_reading_of_predictions_csv_for_predict_and_the_data_loader(tmp_path):
    """predict's refusal rule and the loaders' "an earlier prediction, not a scan" rule read predictions.csv the
    same way (prediction_table.predictions_listed): a table of ours lists its mask and overlay columns, an older one
    (no such columns) its <stem>_mask.png and <stem>_overlay.png; a CSV of that name that is not ours lists
    nothing to the loader and is refused by predict."""
    new, old, foreign = (tmp_path / n for n in ("new", "old", "foreign"))
    for folder in (new, old, foreign):
        folder.mkdir()
    with open(new / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(predict_busi.CSV_FIELDS)
        w.writerow(["scan.png", 4, 4, 0, 0, 0.1, "", "", "renamed_mask.png", "renamed_view.png"]
                   + [""] * (len(predict_busi.CSV_FIELDS) - 10))
    with open(old / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(prediction_table.OLDEST_PREDICTIONS_FIELDS)
        w.writerow(["scan.png", 4, 4, 0, 0, 0.1, "", ""])
    (foreign / "predictions.csv").write_text("mask,overlay\nx.png,y.png\n")
    expected = {new: {"renamed_mask.png", "renamed_view.png"}, old: {"scan_mask.png", "scan_overlay.png"}}
    for folder, names in expected.items():
        assert predict_busi.earlier_outputs(folder / "predictions.csv") == names
        for name in names:
            assert prediction_table.earlier_prediction(folder / name) is not None, (folder, name)
        assert prediction_table.earlier_prediction(folder / "other.png") is None
    with pytest.raises(predict_busi.RefusedOutput, match="not a table written by predict_busi.py"):
        predict_busi.earlier_outputs(foreign / "predictions.csv")
    assert prediction_table.earlier_prediction(foreign / "x.png") is None


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
