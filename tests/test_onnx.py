"""The ONNX export and the onnxruntime backend: parity with PyTorch on real scans, the cached export keyed by the
checkpoint, the command, the example that runs without PyTorch, and onnxruntime staying optional. One export of
the shipped model serves the whole module (the full test split's parity is bench_busi.py --backends')."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REAL_DATA, ROOT, requires_real_data
from PIL import Image

import checkpoints
import export_onnx
import image_io
import inference
import onnx_backend
import predict_busi

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (optional: pip install -r requirements.txt)")
pytest.importorskip("onnx", reason="onnx is not installed (optional: pip install -r requirements.txt)")

SAMPLE = ROOT / "data" / "busi_sample"
SCANS = [SAMPLE / "benign" / "benign (100).png", SAMPLE / "malignant" / "malignant (1).png",
         SAMPLE / "normal" / "normal (1).png"]  # one of each class; the normal one gets a (wrong) outline


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A copy of the shipped checkpoint with its cached export beside it (made once here), and both models."""
    folder = tmp_path_factory.mktemp("shipped")
    copy = folder / "model.pt"
    shutil.copy(checkpoints.DEFAULT_CHECKPOINT, copy)
    loaded_ = onnx_backend.load(copy, "cpu", "onnx", threads=1)
    engine, state = loaded_.model, loaded_.state
    model = checkpoints.load_model(copy).model
    return {"checkpoint": copy, "onnx": engine, "torch": model, "state": state,
            "cached": onnx_backend.cache_path(copy, onnx_backend.file_sha256(copy))}


def test_export_matches_pytorch_on_sample_scans(shipped):
    """At each scan's own size, through predict's pipeline (trust score and calibration included)."""
    figures = inference.parity(checkpoints.loaded(shipped["torch"], shipped["state"]), shipped["onnx"],
                                [image_io.load_image(p) for p in SCANS])
    assert inference.parity_failures(figures) == [], figures
    assert figures["max_probability_difference"] < 1e-4 and figures["max_trust_difference"] < 1e-4, figures
    assert figures["differing_pixels"] <= 10, figures


def test_the_graph_takes_only_the_training_size(shipped):
    """The exporter records the TF-style 'same' padding for the traced size: another size must be refused, never
    padded wrongly."""
    session = shipped["onnx"].session
    assert session.get_inputs()[0].shape[1:] == [1, 192, 192]
    assert session.run(None, {"image": np.zeros((2, 1, 192, 192), np.float32)})[0].shape == (2, 1, 192, 192)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, {"image": np.zeros((1, 1, 224, 224), np.float32)})


def test_metadata_carries_the_checkpoint_entries_as_json(shipped):
    meta = shipped["onnx"].metadata
    assert int(meta["image_size"]) == 192 and float(meta["threshold"]) == shipped["state"]["config"]["threshold"]
    assert json.loads(meta["config"])["image_size"] == 192
    assert json.loads(meta["trust"])["temperatures"] == shipped["state"]["trust"]["temperatures"]
    assert "preprocessing" in meta and "postprocessing" in meta
    restored = shipped["onnx"].state()  # what predict reads from an .onnx given as --checkpoint
    assert restored["model_config"] == shipped["state"]["model_config"]
    assert torch.equal(restored["trust"]["weights"], shipped["state"]["trust"]["weights"])
    assert checkpoints.fitted_trust(restored)[1] is None


def test_cached_export_is_reused_and_keyed_by_the_checkpoint(shipped, tmp_path, monkeypatch):
    assert shipped["cached"].is_file()
    before = shipped["cached"].stat().st_mtime_ns

    def no_export(*_):
        raise AssertionError("exported again although an up-to-date export is cached")

    with monkeypatch.context() as patch:
        patch.setattr(onnx_backend, "export", no_export)
        onnx_backend.load(shipped["checkpoint"], "cpu", "onnx", threads=1)
    assert shipped["cached"].stat().st_mtime_ns == before
    # a changed checkpoint (another threshold) gets its own export, never the old one
    changed = tmp_path / "model.pt"
    state = checkpoints.load_checkpoint(shipped["checkpoint"])
    checkpoints.save_checkpoint({**state, "config": {**state["config"], "threshold": 0.25}}, changed)
    shutil.copy(shipped["cached"], tmp_path / shipped["cached"].name)  # the old export beside it: not used
    engine = onnx_backend.load(changed, "cpu", "onnx", threads=1).model
    assert float(engine.metadata["threshold"]) == 0.25
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == sorted(
        {shipped["cached"].name, onnx_backend.cache_path(changed, onnx_backend.file_sha256(changed)).name})


def test_a_foreign_file_at_the_cache_name_is_left_alone(shipped, tmp_path, capsys):
    copy = tmp_path / "model.pt"
    shutil.copy(shipped["checkpoint"], copy)
    foreign = onnx_backend.cache_path(copy, onnx_backend.file_sha256(copy))
    foreign.write_bytes(b"not an onnx model")
    engine = onnx_backend.load(copy, "cpu", "onnx", threads=1).model
    assert foreign.read_bytes() == b"not an onnx model" and "left alone" in capsys.readouterr().err
    assert engine.outputs[:2] == ["mask_logits", "class_logits"]


def test_a_damaged_cached_export_is_exported_again_with_a_note(shipped, tmp_path, capsys):
    """Bits flipped in the cached export's weights leave its metadata (the checkpoint's SHA-256) intact: its own
    SHA-256, recorded beside it, finds them, and the export is made again instead of giving other masks."""
    copy = tmp_path / "model.pt"
    shutil.copy(shipped["checkpoint"], copy)
    cached = onnx_backend.cache_path(copy, onnx_backend.file_sha256(copy))
    shutil.copy(shipped["cached"], cached)
    shutil.copy(onnx_backend.sidecar_path(shipped["cached"]), onnx_backend.sidecar_path(cached))
    data = bytearray(cached.read_bytes())
    middle = len(data) // 2  # inside the weights (the graph and metadata are a few kB of 19 MB)
    data[middle:middle + 65536] = b"\x7f" * 65536
    cached.write_bytes(bytes(data))
    damaged = onnx_backend.OnnxModel(str(cached), 1)  # still names the checkpoint: metadata alone cannot tell
    assert damaged.metadata["busi.checkpoint_sha256"] == onnx_backend.file_sha256(copy)
    scan = torch.from_numpy(np.asarray(Image.open(SCANS[0]).convert("L").resize((192, 192)), np.float32) / 255)
    scan = scan[None, None]
    with torch.no_grad():
        expected = shipped["torch"](scan)[0]
    assert not torch.allclose(damaged(scan)[0], expected, atol=1e-3)
    capsys.readouterr()
    engine = onnx_backend.load(copy, "cpu", "onnx", threads=1).model
    err = capsys.readouterr().err
    assert "cannot be trusted" in err and "differ" in err and len(err.strip().splitlines()) == 1
    assert torch.allclose(engine(scan)[0], expected, atol=1e-3)
    assert cached.read_bytes() == shipped["cached"].read_bytes()  # replaced by a fresh export
    assert onnx_backend.sidecar_path(cached).read_text().strip() == onnx_backend.file_sha256(cached)
    # a cache written without a sidecar (or whose sidecar is lost) is exported again too, then trusted
    onnx_backend.sidecar_path(cached).unlink()
    onnx_backend.load(copy, "cpu", "onnx", threads=1)
    assert "no SHA-256 of it is recorded" in capsys.readouterr().err
    onnx_backend.load(copy, "cpu", "onnx", threads=1)
    assert capsys.readouterr().err == ""


def test_predict_backends_write_the_same_masks_and_rows(shipped, tmp_path, capsys):
    rows = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        code = predict_busi.main(["--checkpoint", str(shipped["checkpoint"]), "--input", *map(str, SCANS[:2]),
                                  "--output", str(out), "--backend", backend, "--quiet", "--threads", "1"])
        assert code == 0, capsys.readouterr().err
        with open(out / "predictions.csv", newline="") as f:
            rows[backend] = list(csv.DictReader(f))
    for a, b in zip(rows["torch"], rows["onnx"]):
        assert (a["predicted_class"], a["mask"]) == (b["predicted_class"], b["mask"])
        assert abs(float(a["malignancy_probability"]) - float(b["malignancy_probability"])) <= 1e-3
        assert abs(int(a["lesion_pixels"]) - int(b["lesion_pixels"])) <= 5
        masks = [np.asarray(Image.open(tmp_path / k / a["mask"])) for k in ("torch", "onnx")]
        assert (masks[0] != masks[1]).mean() <= 1e-3
    # the exported file itself runs as --checkpoint
    code = predict_busi.main(["--checkpoint", str(shipped["cached"]), "--input", str(SCANS[0]), "--output",
                              str(tmp_path / "from_onnx"), "--quiet", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    with open(tmp_path / "from_onnx" / "predictions.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["trust"] != "" and row["lesion_pixels"] == rows["onnx"][0]["lesion_pixels"]


def test_without_onnxruntime_the_torch_path_runs_silently_and_asking_names_the_package(
        shipped, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails, find_spec finds nothing
    model = onnx_backend.load(shipped["checkpoint"], "cpu", "auto").model
    assert isinstance(model, torch.nn.Module) and capsys.readouterr() == ("", "")
    with pytest.raises(onnx_backend.BackendError, match=r"onnxruntime.*pip install onnxruntime==") as caught:
        inference.Predictor(shipped["checkpoint"], backend="onnx")
    assert "\n" not in str(caught.value)
    code = predict_busi.main(["--checkpoint", str(shipped["checkpoint"]), "--input", str(SCANS[0]), "--output",
                              str(tmp_path / "out"), "--backend", "onnx", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "onnxruntime" in err and not (tmp_path / "out").exists()


def test_backend_choices_that_cannot_run_are_one_line_errors(shipped, tmp_path):
    with pytest.raises(onnx_backend.BackendError, match="runs on the CPU"):
        onnx_backend.load(shipped["checkpoint"], "cuda", "onnx")
    with pytest.raises(onnx_backend.BackendError, match="ONNX model"):
        onnx_backend.load(shipped["cached"], "cpu", "torch")
    model = onnx_backend.load(shipped["checkpoint"], "meta", "auto").model  # not the CPU: torch, as on a GPU
    assert isinstance(model, torch.nn.Module)
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(shipped["cached"].read_bytes()[:100_000])
    for path in (damaged, tmp_path / "missing.onnx"):
        with pytest.raises(checkpoints.CheckpointError) as caught:
            onnx_backend.load(path, "cpu", "auto")
        assert "\n" not in str(caught.value) and str(path.name) in str(caught.value)


def test_export_command_checks_parity_and_never_overwrites(shipped, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    for p in SCANS[:2]:
        shutil.copy(p, scans / p.name)
    shutil.copy(SAMPLE / "benign" / "benign (100)_mask.png", scans)  # ground truth: skipped
    out = tmp_path / "model.onnx"
    args = ["--checkpoint", str(shipped["checkpoint"]), "--output", str(out), "--check-images", str(scans),
            "--threads", "1"]
    assert export_onnx.main(args) == 0
    printed = capsys.readouterr().out
    assert "on 2 scans" in printed and "min Dice of the two masks 1.0" in printed and out.is_file()
    size = out.stat().st_size
    out.write_bytes(b"mine")
    assert export_onnx.main(args) == 2 and out.read_bytes() == b"mine"
    assert "exists" in capsys.readouterr().err
    assert size < 25e6  # with the .pt (9.5 MB) it would pass the 25 MB a committed export may take: not committed


def test_export_command_refuses_an_unwritable_output_before_exporting(shipped, tmp_path, capsys, monkeypatch):
    """A path under a file, or in a read-only folder, was refused only after the whole export and its check."""
    def no_export(*_):
        raise AssertionError("exported although the output cannot be written")

    monkeypatch.setattr(onnx_backend, "export", no_export)  # (to see that nothing slow ran first)
    (tmp_path / "plain").write_text("a file")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for out, said in ((tmp_path / "plain" / "m.onnx", "is not a folder"), (locked / "m.onnx", "cannot write")):
            capsys.readouterr()
            assert export_onnx.main(["--checkpoint", str(shipped["checkpoint"]), "--output", str(out)]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and said in err, err
            if os.geteuid() == 0:  # root writes anywhere: the read-only case cannot be made here
                break
    finally:
        locked.chmod(0o700)


def example_code() -> str:
    """The example in docs/prediction.md that runs the export with onnxruntime, numpy and Pillow alone."""
    text = (ROOT / "docs" / "prediction.md").read_text(encoding="utf-8")
    section = text[text.index("### Without PyTorch"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_example_without_pytorch_gives_predicts_mask(shipped, tmp_path):
    """Run as written, in a Python where torch cannot be imported: the same mask and malignancy as predict."""
    code = example_code()
    assert len(code.strip().splitlines()) <= 24  # about 20 lines, the "no lesion" gate included
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(shipped["cached"], work / "model.onnx")
    (work / "example.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    done = subprocess.run([sys.executable, "example.py", str(SCANS[1])], cwd=work, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    expected = inference.Predictor(shipped["checkpoint"], backend="torch")(SCANS[1])
    mask = np.asarray(Image.open(work / "mask.png")) > 0
    assert mask.shape == expected.mask.shape and (mask != expected.mask).sum() <= 5
    pixels, malignancy = re.search(r"(\d+) lesion pixels, malignancy probability ([\d.]+)", done.stdout).groups()
    assert abs(float(malignancy) - expected.malignancy_probability) < 1e-3


@requires_real_data
def test_export_matches_pytorch_on_busi_test_scans(shipped):
    """Eight scans of the BUSI test split (bench_busi.py --backends covers all 116)."""
    split = json.loads((ROOT / "splits" / "busi_split.json").read_text())["test"]
    images = [image_io.load_image(REAL_DATA / name) for name in split[::15]]
    figures = inference.parity(checkpoints.loaded(shipped["torch"], shipped["state"]), shipped["onnx"], images)
    assert figures["images"] == 8 and inference.parity_failures(figures) == [], figures


def test_the_install_hint_names_the_pinned_versions():
    pins = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.startswith(("onnx==", "onnxruntime=="))]
    assert sorted(pins) == sorted(onnx_backend.PINS.values())
