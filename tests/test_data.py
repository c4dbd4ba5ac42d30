"""The data layer (image_io, splitting, tensor_cache, dataset.py's command line) against hostile data: every mask
and image mode, odd file names, ambiguous files, 0/1 and float masks, EXIF-rotated and huge images, damaged caches,
bad CLI values and unwritable outputs. Real files, real subprocesses, no mocks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from test_train import train

import dataset
import image_io
import splitting
import storage
import tensor_cache
import utils

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
    samples = image_io.discover_samples(root)
    assert rel in [s.image for s in samples]
    # cache: written, then read back from disk with the same names and mask
    first = tensor_cache.build_cache(root, samples, 32, tmp_path / "cache", progress=False)
    assert len(list((tmp_path / "cache").glob("busi_32_*.pt"))) == 1
    second = tensor_cache.build_cache(root, samples, 32, tmp_path / "cache", progress=False)
    assert second["names"] == first["names"] and rel in second["names"]
    i = second["names"].index(rel)
    np.testing.assert_array_equal(tensor_cache.unpack_mask(second["full_masks"][i], second["full_sizes"][i]), mask)
    # split: the JSON is plain ASCII with an escape sequence, and reads back to the same names
    split = splitting.compute_split(root, samples, progress=False)
    splitting.write_split(split, tmp_path / "s.json")
    text = (tmp_path / "s.json").read_bytes().decode("ascii")
    assert "bad\\udcff name.png" in text
    back = splitting.read_split(tmp_path / "s.json", samples)
    assert {k: back[k] for k in ("train", "val", "test")} == {k: split[k] for k in ("train", "val", "test")}
    assert splitting.split_matches(back, samples)
    # bundle
    tensor_cache.write_bundle(first, 32, tmp_path / "b.pt")
    assert tensor_cache.read_bundle(tmp_path / "b.pt", 32)["names"] == first["names"]


def test_non_utf8_file_name_through_the_split_command(fresh_busi_dir, tmp_path):
    root, _ = fresh_busi_dir
    rel, _ = _plant_bad_name(root)
    result = _cli("--data-dir", root, "--out", tmp_path / "s.json")
    assert result.returncode == 0, result.stderr
    split = splitting.read_split(tmp_path / "s.json", image_io.discover_samples(root))
    assert rel in split["train"] + split["val"] + split["test"]


# ------------------------------------------------------------------------------------------------------------------
# 6. Two images with one stem
# ------------------------------------------------------------------------------------------------------------------
def test_same_stem_with_two_extensions_is_refused_naming_both(fresh_busi_dir):
    root, _ = fresh_busi_dir
    Image.open(root / "benign" / "benign (1).png").convert("RGB").save(root / "benign" / "benign (1).jpg")
    with pytest.raises(utils.DataError) as info:
        image_io.discover_samples(root)
    message = str(info.value)
    assert "benign (1).png" in message and "benign (1).jpg" in message and "\n" not in message
    _assert_one_line_error(_cli("--data-dir", root, "--out", root.parent / "s.json"), "benign (1).jpg")
    assert not (root.parent / "s.json").exists()


# ------------------------------------------------------------------------------------------------------------------
# 7. 0/1 masks, float masks, empty lesion masks
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["8-bit png", "16-bit png", "16-bit tiff", "float tiff", "0/1 LA png"])
def test_zero_one_masks_read_as_lesion(tmp_path, kind):
    image, mask = _lesion_pair()
    Image.fromarray(image).save(tmp_path / "x.png")
    if kind == "8-bit png":
        Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "x_mask.png")
    elif kind == "16-bit png":
        Image.fromarray(mask.astype(np.uint16)).save(tmp_path / "x_mask.png")
    elif kind == "16-bit tiff":
        Image.fromarray(mask.astype(np.uint16)).save(tmp_path / "x_mask.tif")
    elif kind == "float tiff":
        Image.fromarray(mask.astype(np.float32)).save(tmp_path / "x_mask.tif")
    else:  # grey 0/1, fully opaque
        u8 = mask.astype(np.uint8)
        Image.fromarray(np.dstack([u8, np.full_like(u8, 255)]), "LA").save(tmp_path / "x_mask.png")
    mask_file = next(tmp_path.glob("x_mask.*"))
    reopened = Image.open(mask_file)
    grey = reopened.getchannel(0) if reopened.mode == "LA" else reopened
    assert np.asarray(grey).max() == 1, reopened.mode  # the file really holds a 0/1 mask
    _, loaded = image_io.load_sample(tmp_path, image_io.Sample("x.png", [mask_file.name]))
    np.testing.assert_array_equal(loaded, mask)


def test_half_scale_rule_still_holds_for_ordinary_masks(tmp_path):
    """0/255 masks with faint (< half scale) pixels keep them as background: only a maximum of exactly 1 is 0/1."""
    values = np.zeros((10, 10), np.uint8)
    values[2:4, 2:4] = 255
    values[6, 6] = 2  # faint, and the maximum is not 1
    Image.fromarray(values).save(tmp_path / "m.png")
    assert image_io.load_mask([tmp_path / "m.png"]).sum() == 4
    floats = values.astype(np.float32)
    Image.fromarray(floats).save(tmp_path / "m.tif")
    assert image_io.load_mask([tmp_path / "m.tif"]).sum() == 4


def test_soft_float_mask_with_a_maximum_of_1_is_cut_at_half(tmp_path):
    values = np.zeros((10, 10), np.float32)
    values[2:4, 2:4] = 1.0
    values[6, 6:9] = (0.3, 0.5, 0.7)  # an anti-aliased edge
    Image.fromarray(values).save(tmp_path / "m.tif")
    expected = values >= 0.5
    np.testing.assert_array_equal(image_io.load_mask([tmp_path / "m.tif"]), expected)


def test_empty_lesion_mask_is_warned_once_per_load(fresh_busi_dir, tmp_path, capfd):
    root, _ = fresh_busi_dir
    for name in ("benign (3)", "malignant (4)"):
        folder = root / name.split()[0]
        size = Image.open(folder / f"{name}.png").size
        Image.new("L", size, 0).save(folder / f"{name}_mask.png")
    samples = image_io.discover_samples(root)
    capfd.readouterr()
    for _ in range(2):  # decoded, then read from the cache: warned each time, once
        tensor_cache.build_cache(root, samples, 32, tmp_path / "cache", progress=False)
        err = capfd.readouterr().err
        assert err.count("warning:") == 1, err
        line = next(line for line in err.splitlines() if line.startswith("warning:"))
        assert "2 benign/malignant images have an empty mask" in line
        assert "benign/benign (3).png" in line and "malignant/malignant (4).png" in line
        assert "normal/" not in line  # normal images are meant to be empty


def test_no_empty_mask_warning_on_good_data(busi_dir, tmp_path, capfd):
    root, _ = busi_dir
    tensor_cache.build_cache(root, image_io.discover_samples(root), 32, None, progress=False)
    assert "empty mask" not in capfd.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# 8. EXIF orientation
# ------------------------------------------------------------------------------------------------------------------
def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _rotated_jpeg(path):
    """A JPEG stored 471x562 with EXIF orientation 6 that displays as 562x471 with a bright square; returns the
    displayed bool mask of that square."""
    shown = np.full((471, 562), 20, np.uint8)  # rows x cols = displayed height x width
    mask = np.zeros_like(shown, bool)
    mask[40:160, 300:500] = True  # off-centre, so any rotation or flip moves it
    shown[mask] = 235
    # orientation 6 = 'rotate 90 degrees clockwise to display': store the displayed image turned the other way
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (471, 562)
    stored.save(path, quality=95, exif=_exif(6))
    return mask


def _assert_aligned(image, mask, expected_mask):
    assert image.shape == mask.shape == (471, 562)
    np.testing.assert_array_equal(mask, expected_mask)
    assert image[mask].mean() > 200 and image[~mask].mean() < 50


def test_exif_rotated_jpeg_loads_upright_with_its_displayed_mask(tmp_path):
    expected = _rotated_jpeg(tmp_path / "scan.jpg")
    Image.fromarray(expected.astype(np.uint8) * 255).save(tmp_path / "scan_mask.png")  # drawn as displayed
    assert image_io.load_image(tmp_path / "scan.jpg").shape == (471, 562)
    image, mask = image_io.load_sample(tmp_path, image_io.Sample("scan.jpg", ["scan_mask.png"]))
    _assert_aligned(image, mask, expected)


def test_exif_rotated_mask_follows_its_rotated_image(tmp_path):
    """A mask saved by a tool that keeps the EXIF block is stored turned like its image, with the same tag."""
    expected = _rotated_jpeg(tmp_path / "scan.jpg")
    stored = Image.fromarray(expected.astype(np.uint8) * 255).transpose(Image.Transpose.ROTATE_90)
    stored.save(tmp_path / "scan_mask.png", exif=_exif(6))
    image, mask = image_io.load_sample(tmp_path, image_io.Sample("scan.jpg", ["scan_mask.png"]))
    _assert_aligned(image, mask, expected)


def test_size_mismatch_after_exif_rotation_says_so(tmp_path):
    expected = _rotated_jpeg(tmp_path / "scan.jpg")
    # a mask in the stored (not displayed) orientation and without the tag: it cannot match
    Image.fromarray(np.rot90(expected).astype(np.uint8) * 255).save(tmp_path / "scan_mask.png")
    with pytest.raises(utils.DataError) as info:
        image_io.load_sample(tmp_path, image_io.Sample("scan.jpg", ["scan_mask.png"]))
    message = str(info.value)
    assert "EXIF orientation" in message and "scan_mask.png" in message and "471x562" in message


def test_perceptual_hash_sees_the_displayed_image(tmp_path):
    _rotated_jpeg(tmp_path / "scan.jpg")
    upright = np.asarray(Image.open(tmp_path / "scan.jpg").convert("L").transpose(Image.Transpose.ROTATE_270))
    assert splitting.perceptual_hash(image_io.load_image(tmp_path / "scan.jpg")) == splitting.perceptual_hash(upright)


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
    assert splitting.split_matches(json.loads((tmp_path / "s.json").read_text()), image_io.discover_samples(root))


def test_without_out_a_committed_split_of_other_images_is_never_replaced(busi_dir, tmp_path, monkeypatch, capsys):
    """The repo's splits/ stands in a copy (a test never writes into the repo): other data gets a new file named
    for it, the same data regenerates its own file, and a name taken by other images is refused."""
    import shutil

    splits = tmp_path / "splits"
    splits.mkdir()
    shutil.copy(ROOT / "splits" / "busi_split.json", splits)
    committed = (splits / "busi_split.json").read_bytes()
    monkeypatch.setattr(dataset, "DEFAULT_SPLIT_FILE", splits / "busi_split.json")
    root, _ = busi_dir
    other = tmp_path / "Other"
    shutil.copytree(root, other)
    assert dataset.main(["--data-dir", str(other)]) == 0
    assert (splits / "busi_split.json").read_bytes() == committed
    made = splits / "Other_split.json"
    assert "writing a new one, Other_split.json" in capsys.readouterr().out
    assert splitting.split_matches(json.loads(made.read_text()), image_io.discover_samples(other))
    made.write_text(made.read_text().replace('"method"', '"note": "regenerated?", "method"'))
    assert dataset.main(["--data-dir", str(other)]) == 0  # the same images: its own file, regenerated
    assert "regenerated?" not in made.read_text() and sorted(p.name for p in splits.iterdir()) == \
        ["Other_split.json", "busi_split.json"]
    (other / "benign" / "benign (3).png").unlink()  # now other images under the same folder name
    (other / "benign" / "benign (3)_mask.png").unlink()
    before = made.read_bytes()
    capsys.readouterr()
    assert dataset.main(["--data-dir", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Other_split.json is a split of other images" in err and "--out" in err
    assert made.read_bytes() == before and (splits / "busi_split.json").read_bytes() == committed


def test_good_bundle_command_still_works(busi_dir, tmp_path):
    root, _ = busi_dir
    result = _cli("--data-dir", root, "--bundle", tmp_path / "b.pt", "--image-size", "32")
    assert result.returncode == 0, result.stderr
    assert len(tensor_cache.read_bundle(tmp_path / "b.pt", 32)["names"]) == len(image_io.discover_samples(root))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pt"]


# ------------------------------------------------------------------------------------------------------------------
# The one atomic-write helper
# ------------------------------------------------------------------------------------------------------------------
def test_atomic_write_keeps_the_old_file_and_no_temp_when_the_writer_fails(tmp_path):
    target = tmp_path / "f.bin"
    storage.atomic_write(target, lambda f: f.write(b"old"))
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_bytes() == b"old" and target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    def half_then_fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        storage.atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old" and _temp_litter(tmp_path) == []
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        storage.atomic_write(tmp_path / "d", lambda f: f.write(b"x"))
    assert _temp_litter(tmp_path) == [] and list((tmp_path / "d").iterdir()) == []


def test_write_split_over_a_directory_leaves_no_stray_tmp(tmp_path, busi_dir):
    root, _ = busi_dir
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        splitting.write_split({"train": [], "val": [], "test": []}, tmp_path / "d")
    assert _temp_litter(tmp_path) == []


def test_cache_and_bundle_files_are_complete_torch_files(tmp_path, busi_dir):
    root, _ = busi_dir
    cache = tensor_cache.build_cache(root, image_io.discover_samples(root), 32, tmp_path, progress=False)
    tensor_cache.write_bundle(cache, 32, tmp_path / "b.pt")
    for path in tmp_path.glob("*.pt"):
        assert isinstance(torch.load(path, weights_only=True), dict)
    assert _temp_litter(tmp_path) == []


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


def test_split_file_naming_missing_images_is_refused(busi_dir, tmp_path, capsys):
    root, _ = busi_dir
    split = splitting.compute_split(root, progress=False)
    split["val"].append("normal/normal (999).png")
    (tmp_path / "s.json").write_text(json.dumps(split))
    assert train(root, tmp_path, "--split-file", str(tmp_path / "s.json"), "--epochs", "1") == 2
    assert "normal (999).png" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["key missing", "labels too short", "a full-size mask too short", "not a dict"])
def test_a_cache_with_wrong_contents_is_rebuilt(busi_dir, tmp_path, capfd, damage):
    root, _ = busi_dir
    samples = image_io.discover_samples(root)
    good = tensor_cache.build_cache(root, samples, 32, tmp_path, progress=False)
    (cache_file,) = tmp_path.glob("busi_32_*.pt")
    bad = dict(good)
    if damage == "key missing":
        del bad["full_sizes"]
    elif damage == "labels too short":
        bad["labels"] = bad["labels"][:-3]
    elif damage == "a full-size mask too short":
        bad["full_masks"] = [m[:-1] for m in bad["full_masks"]]
    else:
        bad = [1, 2, 3]
    torch.save(bad, cache_file)
    capfd.readouterr()
    again = tensor_cache.build_cache(root, samples, 32, tmp_path, progress=False)
    assert "data cache" in capfd.readouterr().err
    assert torch.equal(again["labels"], good["labels"]) and torch.equal(again["full_sizes"], good["full_sizes"])
    assert all(torch.equal(a, b) for a, b in zip(again["full_masks"], good["full_masks"]))
    assert tensor_cache.cache_problem(torch.load(cache_file, weights_only=True), 32, [s.image for s in samples]) is None


def test_a_training_run_over_a_damaged_cache_rebuilds_it(busi_dir, tmp_path, capsys):
    assert train(busi_dir[0], tmp_path, "--epochs", "1", "--run-name", "a") == 0
    (cache_file,) = (tmp_path / "cache").glob("busi_32_*.pt")
    cache = torch.load(cache_file, weights_only=True)
    cache["images"] = cache["images"][:5]
    torch.save(cache, cache_file)
    assert train(busi_dir[0], tmp_path, "--epochs", "1", "--run-name", "b") == 0
    assert "is damaged" in capsys.readouterr().err


def test_a_float_mask_on_a_0_to_1_scale_is_read_as_lesion(tmp_path):
    values = np.zeros((20, 30), np.float32)
    values[5:12, 4:20] = 0.9
    Image.fromarray(values, mode="F").save(tmp_path / "m.tif")
    np.testing.assert_array_equal(image_io.load_mask([tmp_path / "m.tif"]), values > 0)
    Image.fromarray(values * 255).save(tmp_path / "m255.tif")  # a 0-255 float mask keeps the half-scale rule
    np.testing.assert_array_equal(image_io.load_mask([tmp_path / "m255.tif"]), values > 0)
    grey = np.full((20, 30), 0.5, np.float32)  # a float image on a 0-1 scale is mid-grey, not black
    Image.fromarray(grey, mode="F").save(tmp_path / "i.tif")
    assert set(np.unique(image_io.load_image(tmp_path / "i.tif"))) == {128}


def test_a_broken_symbolic_link_named_like_an_image_is_an_error_naming_it(fresh_busi_dir):
    root, _ = fresh_busi_dir
    os.symlink(root / "gone" / "scan.png", root / "benign" / "benign (99).png")
    with pytest.raises(utils.DataError, match=r"broken symbolic link: .*benign \(99\)\.png"):
        image_io.discover_samples(root)


def test_a_file_name_with_a_newline_is_paired_and_printed_on_one_line(fresh_busi_dir, tmp_path):
    root, _ = fresh_busi_dir
    folder = root / "benign"
    try:
        (folder / "benign (3).png").rename(folder / "benign\n(3).png")
        (folder / "benign (3)_mask.png").rename(folder / "benign\n(3)_mask.png")
    except OSError as exc:
        pytest.skip(f"this file system refuses a newline in a name: {exc}")
    sample = next(s for s in image_io.discover_samples(root) if "\n" in s.image)
    assert sample.masks == ["benign/benign\n(3)_mask.png"]
    (folder / "benign\n(3)_mask.png").unlink()
    result = subprocess.run([sys.executable, "dataset.py", "--data-dir", str(root), "--out", str(tmp_path / "s.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "image without a mask" in result.stderr, result.stderr
    assert "benign\\n(3).png" in result.stderr


def test_an_image_of_an_unsupported_type_beside_its_mask_is_named(fresh_busi_dir):
    root, _ = fresh_busi_dir
    folder = root / "benign"
    Image.open(folder / "benign (1).png").convert("P").save(folder / "benign (1).gif")
    (folder / "benign (1).png").unlink()
    with pytest.raises(utils.DataError) as error:
        image_io.discover_samples(root)
    message = str(error.value)
    assert message.startswith("unsupported image type") and "benign (1).gif" in message and ".png" in message
