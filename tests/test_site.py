"""A new site: familiarity (scans unlike the training hospitals'), the "no lesion" gate that empties masks only where
it was fitted, adapt.py (normalisation statistics from a site's unlabelled scans) and site runs (--init-from)."""
from __future__ import annotations

import csv
import gzip
import json
import io
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from test_predict import IMAGE_SIZE, save_tiny_checkpoint, scan

import checkpoints
import dataset
import evaluation
import image_io
import inference
import storage
import trust
from inference import Predictor

SAMPLE = ROOT / "data" / "busi_sample"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------------------------
# Familiarity
# --------------------------------------------------------------------------------------------------------------
def test_the_range_keeps_the_asked_share_of_every_sources_validation_scans_and_far_scans_lie_outside():
    rng = np.random.default_rng(0)
    mix = torch.tensor(rng.normal(size=(10, 10)), dtype=torch.float32)
    train = torch.tensor(rng.normal(size=(800, 10)), dtype=torch.float32) @ mix
    val = torch.tensor(rng.normal(size=(400, 10)), dtype=torch.float32) @ mix
    sources = ["A"] * 100 + ["B"] * 300
    familiar = trust.fit_familiarity(train, val, sources, "test")
    assert trust.familiarity_problem(familiar) is None
    near = trust.familiarity(val, familiar)
    for s in ("A", "B"):  # every source keeps at least the quantile (the cut is the larger of theirs)
        share = float((near[np.array(sources) == s] <= 1).float().mean())
        assert share >= trust.FAMILIARITY_QUANTILE - 1e-9 and familiar["in_range"][s] == pytest.approx(share)
    far = torch.tensor(rng.normal(size=(50, 10)) * 4 + 3, dtype=torch.float32) @ mix
    assert bool((trust.familiarity(far, familiar) > 1).all())
    broken = {**familiar, "cut": float("nan")}
    assert "range" in trust.familiarity_problem(broken)


def non_breast_images() -> dict[str, np.ndarray]:
    """Images that are not breast ultrasound, all from packages the project installs: pydicom's ultrasound examples
    (an obstetric scan, a cardiac echo loop, ...), its CT and MR slices as 8-bit PNGs, matplotlib's photographs,
    terrain maps and MRI slice, noise and blank frames."""
    import pydicom.examples as ex

    import dicom_io
    out = {}
    for name in ("palette_color", "rgb_color", "jpeg2k"):
        out[name] = dicom_io.load_scan(getattr(ex, name).filename).model_input()
    for frame in (1, 10, 20, 30):
        out[f"echo_f{frame}"] = dicom_io.load_scan(ex.ybr_color.filename, frame).model_input()
    for name in ("ct", "mr", "overlay"):
        a = getattr(ex, name).pixel_array.astype(float)
        buffer = io.BytesIO()
        Image.fromarray((255 * (a - a.min()) / (a.max() - a.min())).astype(np.uint8)).save(buffer, "PNG")
        out[f"{name}_png"] = np.asarray(Image.open(buffer))
    data = Path(matplotlib.get_data_path()) / "sample_data"
    out["photo"] = np.asarray(Image.open(data / "grace_hopper.jpg").convert("L"))
    out["logo"] = np.asarray(Image.open(data / "logo2.png").convert("L"))
    for name, key in (("topobathy.npz", "topo"), ("jacksboro_fault_dem.npz", "elevation")):
        z = np.load(data / name)[key].astype(float)
        out[name] = (255 * (z - z.min()) / (z.max() - z.min())).astype(np.uint8)
    with gzip.open(data / "s1045.ima.gz") as f:
        a = np.frombuffer(f.read(), np.uint16).reshape(256, 256).astype(float)
    out["mri"] = (255 * a / a.max()).astype(np.uint8)
    rng = np.random.default_rng(0)
    out["noise"] = rng.integers(0, 256, (480, 640), dtype=np.uint8)
    out["gaussian_noise"] = np.clip(rng.normal(128, 40, (480, 640)), 0, 255).astype(np.uint8)
    for level in (0, 60, 128, 255):
        out[f"blank_{level}"] = np.full((480, 640), level, np.uint8)
    return out


@pytest.fixture(scope="module")
def shipped():
    return Predictor(backend="torch")


def test_the_shipped_model_puts_every_non_breast_image_out_of_range_and_always_reviews_them(shipped):
    assert shipped.fitted_trust.get("familiarity"), "the shipped model carries a familiarity range"
    images = non_breast_images()
    assert len(images) == 21
    for name, image in images.items():
        result = shipped(image)
        assert result.out_of_range and result.familiarity > 1 and result.review, (name, result.familiarity)


def test_the_bundled_busi_scans_are_in_range(shipped):
    """The sample's 70 BUSI scans (training, validation and test scans of the shipped model's hospital)."""
    files = [p for p in sorted(SAMPLE.glob("*/*.png")) if "_mask" not in p.name]
    familiar = [shipped(p).familiarity for p in files]
    assert len(files) == 70 and sum(f <= 1 for f in familiar) >= 69, familiar


def test_onnx_and_torch_agree_on_familiarity(shipped, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    ckpt = tmp_path / "m.pt"
    shutil.copy(checkpoints.DEFAULT_CHECKPOINT, ckpt)
    onnx = Predictor(ckpt, backend="onnx")
    images = [non_breast_images()["photo"],
              image_io.load_image([p for p in sorted(SAMPLE.glob("benign/*.png")) if "_mask" not in p.name][0])]
    for image in images:
        a, b = shipped(image), onnx(image)
        assert a.out_of_range == b.out_of_range and b.familiarity == pytest.approx(a.familiarity, rel=1e-3)


# --------------------------------------------------------------------------------------------------------------
# The "no lesion" gate: empties a mask only where it was fitted
# --------------------------------------------------------------------------------------------------------------
def gated_checkpoint(path, scope: str | None = None):
    """A tiny checkpoint whose gate judges every scan lesion-free (its cut lies above any probability)."""
    save_tiny_checkpoint(path)
    state = checkpoints.load_checkpoint(path)
    state["trust"]["presence"] = {"weights": torch.tensor([1.0, 0.0]), "bias": 0.0, "cut": 2.0}
    model = checkpoints.build_model(state).eval()  # and a familiarity range fitted on 24 synthetic scans
    images = torch.from_numpy(np.stack([scan(IMAGE_SIZE, IMAGE_SIZE, seed=s) for s in range(24)]))[:, None]
    texture = torch.cat([b.extras["texture"] for b in inference.predict_batches(model, images, torch.device("cpu"),
                                                                             with_trust=True)])
    state["trust"]["familiarity"] = trust.fit_familiarity(texture[::2], texture[1::2], ["synthetic"] * 12, "tests")
    if scope:
        state["trust"]["gate_scope"] = scope
    checkpoints.save_checkpoint(state, path)
    return path


def test_a_gate_fitted_elsewhere_marks_the_scan_and_keeps_its_mask_unless_asked(tmp_path):
    image = scan(IMAGE_SIZE, IMAGE_SIZE, seed=5)
    elsewhere = gated_checkpoint(tmp_path / "elsewhere.pt")
    kept = Predictor(elsewhere, backend="torch")(image)
    assert kept.lesion_free and not kept.gated and kept.mask.any()
    emptied = Predictor(elsewhere, backend="torch", gate="apply")(image)
    assert emptied.gated and not emptied.mask.any()
    assert not Predictor(elsewhere, backend="torch", gate="mark")(image).gated
    site = Predictor(gated_checkpoint(tmp_path / "site.pt", trust.SITE_GATE), backend="torch")(image)
    assert site.gated and not site.mask.any()  # fitted on the scans' own site: applied by default
    with pytest.raises(ValueError, match="gate"):
        Predictor(elsewhere, backend="torch", gate="sometimes")


def test_predict_writes_likely_lesion_free_and_keeps_the_mask_by_default(tmp_path, capsys):
    import predict_busi
    ckpt = gated_checkpoint(tmp_path / "elsewhere.pt")
    Image.fromarray(scan(50, 40, seed=3)).save(tmp_path / "a.png")
    for gate, out, column in (("auto", "o1", predict_busi.LIKELY_LESION_FREE), ("apply", "o2", predict_busi.NO_LESION)):
        assert predict_busi.main(["--checkpoint", str(ckpt), "--input", str(tmp_path / "a.png"), "--output",
                                  str(tmp_path / out), "--backend", "torch", "--gate", gate, "--quiet"]) in (0, 1)
        row = read_csv(tmp_path / out / "predictions.csv")[0]
        assert row["no_lesion"] == column
        assert (int(row["lesion_pixels"]) > 0) == (gate == "auto")
        assert row["familiarity"] != "" and row["out_of_range"] in ("", predict_busi.OUT_OF_RANGE)
    printed = capsys.readouterr().out
    assert "masks kept" in printed and "masks emptied" in printed


# --------------------------------------------------------------------------------------------------------------
# adapt.py
# --------------------------------------------------------------------------------------------------------------
def site_scans(folder, n: int, seed: int = 0):
    """`n` PNG scans of a "scanner" unlike the tiny model's: brighter and noisier."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = np.clip(scan(48, 40, seed=100 + i) * 0.5 + 120 + rng.normal(0, 20, (40, 48)), 0, 255)
        Image.fromarray(image.astype(np.uint8)).save(folder / f"s{i:02d}.png")
    return folder


def test_adapt_changes_the_statistics_and_predictions_is_deterministic_and_never_overwrites(tmp_path, capsys):
    import adapt
    source = tmp_path / "source.pt"
    save_tiny_checkpoint(source)
    before = source.read_bytes()
    scans = site_scans(tmp_path / "clinicA", 40)
    args = ["--checkpoint", str(source), "--scans", str(scans), "--output", str(tmp_path / "a.pt")]
    assert adapt.main(args) == 0
    assert adapt.main([*args[:-1], str(tmp_path / "b.pt")]) == 0
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()  # the same scans, the same file
    assert source.read_bytes() == before
    old, new = checkpoints.load_checkpoint(source), checkpoints.load_checkpoint(tmp_path / "a.pt")
    means = [k for k in old["model"] if k.endswith("running_mean")]
    assert means and all(not torch.equal(old["model"][k], new["model"][k]) for k in means)
    record = new["adaptation"]
    assert record["site"] == "clinicA" and record["scans"] == 40 and record["alpha"] == adapt.ALPHA
    assert record["source_sha256"] == storage.file_sha256(source)
    assert new["trust"]["gate_scope"] != trust.SITE_GATE and trust.familiarity_problem(new["trust"]["familiarity"]) is None
    image = np.asarray(Image.open(scans / "s00.png"))
    p_old = Predictor(source, backend="torch")(image).probability
    p_new = Predictor(tmp_path / "a.pt", backend="torch")(image).probability
    assert np.abs(p_old - p_new).max() > 1e-3  # the predictions move with the statistics
    # alpha 0 keeps the source's statistics exactly
    assert adapt.main([*args[:-1], str(tmp_path / "zero.pt"), "--alpha", "0"]) == 0
    zero = checkpoints.load_checkpoint(tmp_path / "zero.pt")
    assert all(torch.allclose(old["model"][k].float(), zero["model"][k].float(), atol=1e-6) for k in means)
    capsys.readouterr()
    assert adapt.main(args) == 2 and "exists" in capsys.readouterr().err  # never over a file
    assert adapt.main(["--checkpoint", str(source), "--scans", str(site_scans(tmp_path / "few", 5)), "--output",
                       str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 5 readable scans") and str(adapt.MIN_SCANS) in err and not (tmp_path / "c.pt").exists()


# --------------------------------------------------------------------------------------------------------------
# Site runs and a gate refitted on a site's scans
# --------------------------------------------------------------------------------------------------------------
def test_a_site_run_starts_from_the_checkpoint_records_the_site_and_its_gate_applies_there(busi_dir, tmp_path,
                                                                                           capsys):
    import fit_trust
    import train_unet_busi
    root, _ = busi_dir
    common = ["--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert train_unet_busi.main(["--data-dir", str(root), "--encoder", "none", "--image-size", "32",
                                 "--base-channels", "4", "--depth", "2", "--batch-size", "8", "--epochs", "1",
                                 "--run-name", "src", *common]) == 0
    source = tmp_path / "src" / "best.pt"
    site = tmp_path / "siteB"
    shutil.copytree(root, site)
    capsys.readouterr()
    assert train_unet_busi.main(["--init-from", str(source), "--data-dir", str(site), "--image-size", "64",
                                 "--run-name", "bad", *common]) == 2
    assert "--image-size 64 differs" in capsys.readouterr().err
    assert train_unet_busi.main(["--init-from", str(source), "--data-dir", str(site), "--epochs", "1",
                                 "--run-name", "site", *common]) == 0
    assert "recipe site" in capsys.readouterr().out
    best = checkpoints.load_checkpoint(tmp_path / "site" / "best.pt")
    record = best["config"]["init_from"]
    assert record["sha256"] == storage.file_sha256(source) and record["site"] == ["siteB"]
    assert record["images"]["train"] > 0 and best["config"]["lr"] == train_unet_busi.RECIPES["site"]["lr"]
    assert best["config"]["image_size"] == 32 and best["trust"]["gate_scope"] == trust.SITE_GATE
    # the mask threshold is the site's: the grid point with the best lesion Dice on its validation part
    fit, chosen = best["config"]["threshold_fit"], best["config"]["threshold"]
    model = checkpoints.load_model(tmp_path / "site" / "best.pt").model
    val = dataset.load_parts([("siteB", site)], [str(tmp_path / "site" / "split.json")], 32, None, None)[0]["val"]
    runs = evaluation.evaluate_thresholds(model, val, torch.device("cpu"), None, evaluation.SITE_THRESHOLDS)
    dice = {t: round(runs[t][0]["lesion_dice"], 4) for t in evaluation.SITE_THRESHOLDS}
    assert {float(t): d for t, d in fit["lesion_dice"].items()} == dice and fit["n_lesion"] == runs[0.5][0]["n_lesion"]
    assert best["trust"]["threshold"] == chosen
    if fit["n_lesion"] >= evaluation.MIN_LESIONS_FOR_THRESHOLD and \
            max(dice.values()) - dice[0.5] >= evaluation.THRESHOLD_MIN_GAIN:
        assert dice[chosen] == max(dice.values()) and "kept" not in fit
    else:
        assert chosen == 0.5 and "kept" in fit
    # a resumed site run still ends as a site run: the site's threshold and gate (the start file is found again)
    assert train_unet_busi.main(["--resume", str(tmp_path / "site"), "--epochs", "2", "--cache-dir",
                                 str(tmp_path / "cache"), "--device", "cpu"]) == 0
    resumed = checkpoints.load_checkpoint(tmp_path / "site" / "best.pt")
    assert resumed["trust"]["gate_scope"] == trust.SITE_GATE and "threshold_fit" in resumed["config"]
    assert train_unet_busi.main(["--init-from", str(source), "--data-dir", str(site), "--epochs", "1",
                                 "--threshold", "0.7", "--run-name", "given", *common]) == 0
    given = checkpoints.load_checkpoint(tmp_path / "given" / "best.pt")["config"]
    assert given["threshold"] == 0.7 and "threshold_fit" not in given  # a threshold given is kept
    start = checkpoints.load_checkpoint(source)["trust"]["familiarity"]  # a few patients do not refit the range
    assert torch.equal(best["trust"]["familiarity"]["precision"], start["precision"])
    # fit_trust.py on another site's labelled scans: its gate applies there too; on its own data it does not
    out = tmp_path / "refit.pt"
    assert fit_trust.main(["--checkpoint", str(source), "--data-dir", str(site), "--output", str(out),
                           "--device", "cpu"]) == 0
    refit = checkpoints.load_checkpoint(out)
    assert refit["config"]["threshold_fit"]["on"] == "validation" and refit["trust"]["threshold"] == refit["config"][
        "threshold"]
    refit = refit["trust"]
    assert refit["gate_scope"] == trust.SITE_GATE and refit["familiarity"]["cut"] == start["cut"]
    assert fit_trust.main(["--checkpoint", str(source), "--output", str(tmp_path / "own.pt"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert fit_trust.main(["--checkpoint", str(source), "--output", str(tmp_path / "x.pt"), "--familiarity-only",
                           "--threshold", "0.6"]) == 2 and "--familiarity-only keeps" in capsys.readouterr().err
    own = checkpoints.load_checkpoint(tmp_path / "own.pt")
    assert own["trust"].get("gate_scope") != trust.SITE_GATE and "threshold_fit" not in own["config"]


def test_the_site_threshold_moves_only_for_a_clear_gain_on_the_sites_validation(shipped, tmp_path):
    """Labelled scans whose outlines are the shipped model's own at 0.8 call for 0.8; outlines at 0.5 keep 0.5."""
    model = checkpoints.load_model(checkpoints.DEFAULT_CHECKPOINT).model
    scans = [p for p in sorted(SAMPLE.glob("malignant/*.png")) if "_mask" not in p.name][:8]
    for cut in (0.8, 0.5):
        site = tmp_path / f"site{cut}"
        (site / "malignant").mkdir(parents=True)
        for path in scans:
            shutil.copy(path, site / "malignant" / path.name)
            outline = shipped(path).probability > cut
            Image.fromarray(outline.astype(np.uint8) * 255).save(site / "malignant" / f"{path.stem}_mask.png")
        part = dataset.load_parts([("site", site)], None, 192, None, None, every_image=True)[0]["all"]
        chosen, fit = evaluation.fit_threshold(model, part, torch.device("cpu"), None, False, 8, 0.5)
        assert chosen == cut and fit["n_lesion"] == 8, fit
        assert fit["lesion_dice"][str(cut)] >= max(fit["lesion_dice"].values()) - 1e-4
    few = {k: v[:3] for k, v in part.items()}  # 3 lesion scans: too few to move it
    chosen, fit = evaluation.fit_threshold(model, few, torch.device("cpu"), None, False, 8, 0.7)
    assert chosen == 0.7 and "fewer than 5" in fit["kept"]


def test_the_simulation_fine_tunes_with_the_training_hospital_watched_and_records_its_choices(busi_dir, tmp_path,
                                                                                           capsys):
    """simulate_site.py: N labelled "patients" of the site, a fine-tune that also scores another source as held
    out, the threshold it chose, the site's figures at 0.5 too, and the table of the results."""
    import simulate_site
    import train_unet_busi
    from test_sources import make_bra_dir
    root, _ = busi_dir
    common = ["--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert train_unet_busi.main(["--data-dir", str(root), "--encoder", "none", "--image-size", "32",
                                 "--base-channels", "4", "--depth", "2", "--batch-size", "8", "--epochs", "1",
                                 "--run-name", "src", *common]) == 0
    other = make_bra_dir(tmp_path / "OTHER")
    out = tmp_path / "sim.json"
    flags = f"--epochs 2 --device cpu --cache-dir {tmp_path / 'cache'} --data-dir OTHER={other} --select-on SITE " \
            f"--repeat normal=4,OTHER=0"
    assert simulate_site.main(["--checkpoint", str(tmp_path / "src" / "best.pt"), "--site-data", str(root),
                               "--no-unadapted", "--alphas", "--scan-counts", "--labelled", "3", "--seeds", "1",
                               "--work-dir", str(tmp_path / "simruns"), "--recipe-flags", flags,
                               "--out", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    best = checkpoints.load_checkpoint(tmp_path / "simruns" / "sim_n3_s1" / "best.pt")
    assert run["kind"] == "fine_tune" and run["threshold"] == best["config"]["threshold"]
    assert run["best_epoch"] == best["best_epoch"] and "OTHER:held_out_lesion_dice" in run["held_out_at_best"]
    assert set(run["at_0.5"]) == {"lesion_dice", "missed_lesions"}
    if run["threshold"] == 0.5:
        assert run["at_0.5"]["lesion_dice"] == run["score"]["no_gate"]["lesion_dice"]
    capsys.readouterr()
    assert simulate_site.main(["--table", str(out), "--out", str(tmp_path / "sim.png")]) == 0
    assert "fine-tune" in capsys.readouterr().out
