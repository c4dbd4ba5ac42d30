"""Bad inputs, full disks, hostile checkpoints and numeric faults: clear messages, intact files."""
from __future__ import annotations

import errno
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from test_core import _Planted
from test_train import TINY, train

import checkpoints
import image_io
import splitting
import storage
import train_unet_busi as T
import training


# ------------------------------------------------------------------------------------------------------------------
# Valid but unusual formats load right
# ------------------------------------------------------------------------------------------------------------------
def _lesion(h=20, w=30):
    m = np.zeros((h, w), dtype=bool)
    m[5:12, 8:20] = True
    return m


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
def test_mask_modes_all_read_the_same_lesion(tmp_path, mode):
    m = _lesion()
    u8 = m.astype(np.uint8) * 255
    if mode == "1":
        img = Image.fromarray(m)
    elif mode == "LA":
        img = Image.fromarray(np.dstack([u8, np.full_like(u8, 255)]), "LA")
    elif mode == "P":
        img = Image.fromarray(u8).convert("P")
    elif mode == "I;16":
        img = Image.fromarray(m.astype(np.uint16) * 65535)
    else:
        img = Image.fromarray(u8).convert(mode)
    img.save(tmp_path / "m.png")
    np.testing.assert_array_equal(image_io.load_mask([tmp_path / "m.png"], size=(30, 20)), m)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB", "RGBA", "I;16"])
def test_image_modes_all_load_as_the_same_grey(tmp_path, mode):
    grey = (np.arange(600).reshape(20, 30) % 251).astype(np.uint8)
    if mode == "LA":
        img = Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), "LA")
    elif mode == "I;16":
        img = Image.fromarray(grey.astype(np.uint16) * 257)
    elif mode == "P":
        img = Image.fromarray(np.stack([grey] * 3, -1)).convert("P", palette=Image.ADAPTIVE, colors=256)
    else:
        img = Image.fromarray(grey).convert(mode)
    img.save(tmp_path / "i.png")
    out = image_io.load_image(tmp_path / "i.png")
    assert out.shape == (20, 30) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - grey).max() <= (8 if mode == "P" else 1)


@pytest.mark.slow
def test_huge_image_loads_without_a_memory_blow_up(tmp_path):
    """10000 x 10000 RGB image with an RGBA mask: decoded, merged and resized in well under 2 GB."""
    side = 10_000
    Image.new("RGB", (side, side), (90, 90, 90)).save(tmp_path / "huge.png")
    mask = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    mask.paste((255, 255, 255, 255), (4000, 4000, 6000, 6000))
    mask.save(tmp_path / "huge_mask.png")
    del mask
    probe = (
        "import resource, sys, image_io\n"
        "img, m = image_io.load_sample(sys.argv[1], image_io.Sample('huge.png', ['huge_mask.png']))\n"
        "assert m.sum() == 2000 * 2000, m.sum()\n"
        "small = image_io.resize_image(img, 256); sm = image_io.resize_mask(m, 256)\n"
        "assert small.shape == (256, 256) and 0.03 < sm.mean() < 0.05\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stdout.split()[-1])
    assert peak_mb < 2000, f"peak RSS {peak_mb} MB"


# ------------------------------------------------------------------------------------------------------------------
# Disk faults during training
# ------------------------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------------------------
# Hostile and wrong checkpoints at every training entry point
# ------------------------------------------------------------------------------------------------------------------
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


def test_split_file_naming_missing_images_is_refused(busi_dir, tmp_path, capsys):
    root, _ = busi_dir
    split = splitting.compute_split(root, progress=False)
    split["val"].append("normal/normal (999).png")
    (tmp_path / "s.json").write_text(json.dumps(split))
    assert train(root, tmp_path, "--split-file", str(tmp_path / "s.json"), "--epochs", "1") == 2
    assert "normal (999).png" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# Numeric faults
# ------------------------------------------------------------------------------------------------------------------
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
