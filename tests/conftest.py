"""Shared fixtures: a synthetic dataset in the BUSI layout, and the path of the real one when present."""
from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the real BUSI folder: $BUSI_DATA_DIR, else ../shared/data/Dataset_BUSI_with_GT beside the repository
REAL_DATA = Path(os.environ.get("BUSI_DATA_DIR") or ROOT.parent / "shared" / "data" / "Dataset_BUSI_with_GT")
requires_real_data = pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real BUSI data not found at {REAL_DATA}")
# BUS-BRA (the second training source): $BUSBRA_DATA_DIR, else BUS-BRA beside the BUSI folder
REAL_BUSBRA = Path(os.environ.get("BUSBRA_DATA_DIR") or REAL_DATA.parent / "BUS-BRA")
requires_busbra = pytest.mark.skipif(not REAL_BUSBRA.is_dir(), reason=f"real BUS-BRA data not found at {REAL_BUSBRA}")

def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the checks marked slow (each over ~15 s on 2 CPU cores; CI leaves them out)")


def pytest_configure(config):
    """Every skip is listed with its reason at the end of the run (the real-data tests, the GUI's without Xvfb):
    a quiet run never hides what it did not test."""
    if "s" not in config.option.reportchars and "a" not in config.option.reportchars.lower():
        config.option.reportchars += "s"
    config.addinivalue_line("markers", "slow: a long check, run with --run-slow (or RUN_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    """The slow checks are opt-in, so that the default run stays near 10 minutes on 2 busy cores; the skip says
    how to run them."""
    if config.getoption("--run-slow") or os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow check: run with  python -m pytest tests --run-slow  (or RUN_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# (class, number of images) and the sizes cycled through; several classes share a near-duplicate scan.
SYNTHETIC_COUNTS = {"benign": 12, "malignant": 8, "normal": 6}
SIZES = [(96, 80), (120, 100), (80, 112), (144, 96)]


def synthetic_scan(rng: np.random.Generator, width: int, height: int):
    """A speckled grey 'scan' with one dark elliptical lesion; returns (uint8 image, bool lesion mask)."""
    # smooth random texture at a coarse scale, so that each scan has its own perceptual hash
    coarse = rng.uniform(40, 200, size=(6, 6)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    base += rng.normal(0, 8, size=base.shape)
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    ry, rx = rng.uniform(0.1, 0.2) * height, rng.uniform(0.1, 0.2) * width
    lesion = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    base[lesion] *= 0.3
    return np.clip(base, 0, 255).astype(np.uint8), lesion


def save_mask(mask: np.ndarray, path: Path, kind: str) -> None:
    """Write a bool mask as a 1-bit, L, RGB or RGBA PNG (the formats BUSI mixes)."""
    m = mask.astype(np.uint8) * 255
    if kind == "1":
        Image.fromarray(mask).convert("1").save(path)
    elif kind == "L":
        Image.fromarray(m).save(path)
    elif kind == "RGB":
        Image.fromarray(np.stack([m] * 3, -1)).save(path)
    elif kind == "RGBA":  # colour white everywhere, lesion given by the alpha channel
        Image.fromarray(np.dstack([np.full_like(m, 255)] * 3 + [m])).save(path)
    else:
        raise ValueError(kind)


def make_busi_dir(root: Path, seed: int = 0) -> dict:
    """Build a BUSI-layout folder; returns facts about it for the tests."""
    rng = np.random.default_rng(seed)
    facts = {"multi_mask": [], "duplicate_pair": None, "masks": {}}
    kinds = ["1", "RGB", "RGBA", "L"]
    for label, count in SYNTHETIC_COUNTS.items():
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(1, count + 1):
            w, h = SIZES[i % len(SIZES)]
            image, lesion = synthetic_scan(rng, w, h)
            name = f"{label} ({i})"
            Image.fromarray(np.stack([image] * 3, -1)).save(folder / f"{name}.png")  # RGB, as BUSI ships
            rel = f"{label}/{name}.png"
            if label == "normal":
                save_mask(np.zeros_like(lesion), folder / f"{name}_mask.png", "RGB")
                facts["masks"][rel] = np.zeros_like(lesion)
                continue
            save_mask(lesion, folder / f"{name}_mask.png", kinds[i % len(kinds)])
            merged = lesion
            if i in (2, 5):  # a second lesion in a second (and for 5, a third) mask
                second = np.zeros_like(lesion)
                second[: h // 8, : w // 8] = True
                save_mask(second, folder / f"{name}_mask_1.png", "RGBA")
                merged = merged | second
                if i == 5:
                    third = np.zeros_like(lesion)
                    third[-h // 8:, -w // 8:] = True
                    save_mask(third, folder / f"{name}_mask_2.png", "1")
                    merged = merged | third
                facts["multi_mask"].append(rel)
            facts["masks"][rel] = merged
    # a near-duplicate across classes, as in BUSI: benign (1) re-saved, slightly brighter, as malignant (9)
    src = np.asarray(Image.open(root / "benign" / "benign (1).png").convert("L"), dtype=np.int16)
    Image.fromarray(np.clip(src + 3, 0, 255).astype(np.uint8)).save(root / "malignant" / "malignant (9).png")
    dup_mask = facts["masks"]["benign/benign (1).png"]
    save_mask(dup_mask, root / "malignant" / "malignant (9)_mask.png", "1")
    facts["masks"]["malignant/malignant (9).png"] = dup_mask
    facts["duplicate_pair"] = ["benign/benign (1).png", "malignant/malignant (9).png"]
    # litter that discovery must ignore
    (root / "benign" / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "normal" / "Thumbs.db").write_bytes(b"junk")
    (root / "malignant" / "notes.txt").write_text("not an image")
    return facts


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The commands' main() set PyTorch's thread count for the whole process (predict, export, the GUI): every
    test gets back the count it started with."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def busi_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("busi") / "Dataset_BUSI_with_GT"
    facts = make_busi_dir(root)
    return root, facts


@pytest.fixture
def fresh_busi_dir(tmp_path):
    """A private copy for tests that damage the data."""
    root = tmp_path / "Dataset_BUSI_with_GT"
    facts = make_busi_dir(root)
    return root, facts


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 4 MB tmpfs; skipped (with the reason) where this process may not mount one."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill_file_system(mount, leave: int = 0):
    """Fill the file system until only `leave` bytes are free (0: until the kernel says ENOSPC)."""
    stat = os.statvfs(mount)
    with open(mount / "filler", "wb", buffering=0) as f:
        if leave:
            f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
            return
        for chunk in (65536, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


@pytest.fixture(scope="session")
def display():
    """Start Xvfb on a display number it picks itself (-displayfd: no races with other servers), stop it after.

    One server for the whole session: Tk keeps its display connection for the life of the process, and exits
    the process when that server goes away."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("Xvfb not found: install the Debian package 'xvfb' to run the GUI tests")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(write_fd), "-screen", "0", "1400x900x24", "-nolisten", "tcp"],
                            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    number = b""
    deadline = time.monotonic() + 20
    while not number.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([read_fd], [], [], 0.5)
        if ready:
            chunk = os.read(read_fd, 16)
            if not chunk:
                break
            number += chunk
    os.close(read_fd)
    if not number.strip():
        proc.kill()
        proc.wait()
        pytest.skip("Xvfb did not start")
    name = f":{number.decode().strip()}"
    old = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = name
    yield name
    if old is None:
        os.environ.pop("DISPLAY", None)
    else:
        os.environ["DISPLAY"] = old
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def window_of(command: list[str], cwd, timeout: float = 60) -> str:
    """Run a GUI command on the current display until its Tk window appears and has stayed up for a second;
    returns its stderr. Needs the `display` fixture."""
    import tkinter as tk

    probe = tk.Tk()  # to see which Tk applications are registered on the display
    probe.withdraw()
    before = len(probe.tk.call("winfo", "interps"))
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while len(probe.tk.call("winfo", "interps")) <= before and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(probe.tk.call("winfo", "interps")) > before, "the window never appeared"
        time.sleep(1.0)
        assert proc.poll() is None, proc.communicate()
    finally:
        probe.destroy()
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    return err
