"""dataset.py against hostile data and command lines: odd file names, ambiguous files, 0/1 and float masks,
EXIF-rotated images, bad CLI values and unwritable outputs. Real files, real subprocesses, no mocks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from conftest import ROOT

BAD_NAME = b"bad\xff name"  # not valid UTF-8: Python sees it as 'bad\udcff name' (surrogate escape)


def _lesion_pair(h=40, w=50):
    """A dark image with a bright square, and the bool mask of that square."""
    image = np.full((h, w), 30, np.uint8)
    mask = np.zeros((h, w), bool)
    mask[10:25, 12:30] = True
    image[mask] = 220
    return image, mask


def _cli(*args, cwd=ROOT):
    """Run `python dataset.py ARGS` as a real subprocess."""
    return subprocess.run([sys.executable, str(ROOT / "dataset.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _assert_one_line_error(result, *needles):
    """Exit 2, no traceback, exactly one `error:` line on stderr, which contains every needle."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _temp_litter(folder):
    """Names of temp files left in `folder` (the atomic writes' `.NAME.*.tmp` and the old `NAME.tmp`)."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# ------------------------------------------------------------------------------------------------------------------
# 5. File names that are not valid UTF-8
# ------------------------------------------------------------------------------------------------------------------
def _plant_bad_name(root):
    """Add benign/<BAD_NAME>.png and its mask, written through byte paths; skip if the file system refuses."""
    folder = os.fsencode(root / "benign")
    image, mask = _lesion_pair()
    try:
        Image.fromarray(image).save(os.path.join(folder, BAD_NAME + b".png"), format="PNG")
    except OSError as exc:  # e.g. macOS APFS only takes UTF-8 names
        pytest.skip(f"the file system refuses a non-UTF-8 name: {exc}")
    Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(folder, BAD_NAME + b"_mask.png"), format="PNG")
    return "benign/" + os.fsdecode(BAD_NAME) + ".png", mask


def test_non_utf8_file_name_is_discovered_cached_split_and_bundled(fresh_busi_dir, tmp_path):
    root, _ = fresh_busi_dir
    rel, mask = _plant_bad_name(root)
    samples = dataset.discover_samples(root)
    assert rel in [s.image for s in samples]
    # cache: written, then read back from disk with the same names and mask
    first = dataset.build_cache(root, samples, 32, tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").glob("busi_32_*.pt"))) == 1
    second = dataset.build_cache(root, samples, 32, tmp_path / "cache", progress=False)
    assert second["names"] == first["names"] and rel in second["names"]
    i = second["names"].index(rel)
    np.testing.assert_array_equal(dataset.unpack_mask(second["full_masks"][i], second["full_sizes"][i]), mask)
    # split: the JSON is plain ASCII with an escape sequence, and reads back to the same names
    split = dataset.compute_split(root, samples, progress=False)
    dataset.write_split(split, tmp_path / "s.json")
    text = (tmp_path / "s.json").read_bytes().decode("ascii")
    assert "bad\\udcff name.png" in text
    back = dataset.read_split(tmp_path / "s.json", samples)
    assert {k: back[k] for k in ("train", "val", "test")} == {k: split[k] for k in ("train", "val", "test")}
    assert dataset.split_matches(back, samples)
    # bundle
    dataset.write_bundle(first, 32, tmp_path / "b.pt")
    assert dataset.read_bundle(tmp_path / "b.pt", 32)["names"] == first["names"]


def test_non_utf8_file_name_through_the_split_command(fresh_busi_dir, tmp_path):
    root, _ = fresh_busi_dir
    rel, _ = _plant_bad_name(root)
    result = _cli("--data-dir", root, "--out", tmp_path / "s.json")
    assert result.returncode == 0, result.stderr
    split = dataset.read_split(tmp_path / "s.json", dataset.discover_samples(root))
    assert rel in split["train"] + split["val"] + split["test"]


# ------------------------------------------------------------------------------------------------------------------
# 6. Two images with one stem
# ------------------------------------------------------------------------------------------------------------------
def test_same_stem_with_two_extensions_is_refused_naming_both(fresh_busi_dir):
    root, _ = fresh_busi_dir
    Image.open(root / "benign" / "benign (1).png").convert("RGB").save(root / "benign" / "benign (1).jpg")
    with pytest.raises(dataset.DataError) as info:
        dataset.discover_samples(root)
    message = str(info.value)
    assert "benign (1).png" in message and "benign (1).jpg" in message and "\n" not in message
    _assert_one_line_error(_cli("--data-dir", root, "--out", root.parent / "s.json"), "benign (1).jpg")
    assert not (root.parent / "s.json").exists()


# ------------------------------------------------------------------------------------------------------------------
# 14. The command line
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,needle", [("0", "positive"), ("-8", "positive"), ("two", "two"), ("50", "16")])
def test_bad_bundle_image_size_is_a_one_line_error(busi_dir, tmp_path, size, needle):
    root, _ = busi_dir
    bundle = tmp_path / "b.pt"
    line = _assert_one_line_error(_cli("--data-dir", root, "--bundle", bundle, "--image-size", size), needle)
    assert "--image-size" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--out", "--bundle"])
def test_output_that_is_a_directory_is_a_one_line_error_and_leaves_no_temp_file(busi_dir, tmp_path, flag):
    root, _ = busi_dir
    target = tmp_path / "somedir"
    target.mkdir()
    extra = ["--image-size", "32"] if flag == "--bundle" else []
    _assert_one_line_error(_cli("--data-dir", root, flag, target, *extra), str(target), "directory")
    assert _temp_litter(tmp_path) == [] and list(target.iterdir()) == []


@pytest.mark.parametrize("flag", ["--out", "--bundle"])
def test_output_under_a_file_is_a_one_line_error(busi_dir, tmp_path, flag):
    """The parent 'folder' is a plain file: the write fails for root too."""
    root, _ = busi_dir
    (tmp_path / "plain").write_text("x")
    extra = ["--image-size", "32"] if flag == "--bundle" else []
    _assert_one_line_error(_cli("--data-dir", root, flag, tmp_path / "plain" / "out.x", *extra), "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


@pytest.fixture
def read_only_dir(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").write_text("x")
    except PermissionError:
        yield folder
    else:  # root (or a file system without permissions) writes anyway: there is nothing to test
        pytest.skip("chmod 555 does not stop this user from writing (running as root?)")
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("flag", ["--out", "--bundle"])
def test_output_in_a_read_only_folder_is_a_one_line_error(busi_dir, read_only_dir, flag):
    root, _ = busi_dir
    extra = ["--image-size", "32"] if flag == "--bundle" else []
    _assert_one_line_error(_cli("--data-dir", root, flag, read_only_dir / "out.x", *extra), "cannot write")
    assert list(read_only_dir.iterdir()) == []


def test_default_data_dir_is_dataset_busi_with_gt_in_the_working_folder(busi_dir, tmp_path):
    root, _ = busi_dir
    work = tmp_path / "work"
    work.mkdir()
    _assert_one_line_error(_cli("--out", tmp_path / "s.json", cwd=work), "Dataset_BUSI_with_GT")
    (work / "Dataset_BUSI_with_GT").symlink_to(root, target_is_directory=True)
    result = _cli("--out", tmp_path / "s.json", cwd=work)
    assert result.returncode == 0, result.stderr
    assert dataset.split_matches(json.loads((tmp_path / "s.json").read_text()), dataset.discover_samples(root))


def test_good_bundle_command_still_works(busi_dir, tmp_path):
    root, _ = busi_dir
    result = _cli("--data-dir", root, "--bundle", tmp_path / "b.pt", "--image-size", "32")
    assert result.returncode == 0, result.stderr
    assert len(dataset.read_bundle(tmp_path / "b.pt", 32)["names"]) == len(dataset.discover_samples(root))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pt"]


# ------------------------------------------------------------------------------------------------------------------
# The one atomic-write helper
# ------------------------------------------------------------------------------------------------------------------
def test_atomic_write_keeps_the_old_file_and_no_temp_when_the_writer_fails(tmp_path):
    target = tmp_path / "f.bin"
    dataset.atomic_write(target, lambda f: f.write(b"old"))
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_bytes() == b"old" and target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    def half_then_fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        dataset.atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old" and _temp_litter(tmp_path) == []
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        dataset.atomic_write(tmp_path / "d", lambda f: f.write(b"x"))
    assert _temp_litter(tmp_path) == [] and list((tmp_path / "d").iterdir()) == []


def test_write_split_over_a_directory_leaves_no_stray_tmp(tmp_path, busi_dir):
    root, _ = busi_dir
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        dataset.write_split({"train": [], "val": [], "test": []}, tmp_path / "d")
    assert _temp_litter(tmp_path) == []


def test_cache_and_bundle_files_are_complete_torch_files(tmp_path, busi_dir):
    root, _ = busi_dir
    cache = dataset.build_cache(root, dataset.discover_samples(root), 32, tmp_path, progress=False)
    dataset.write_bundle(cache, 32, tmp_path / "b.pt")
    for path in tmp_path.glob("*.pt"):
        assert isinstance(torch.load(path, weights_only=True), dict)
    assert _temp_litter(tmp_path) == []
