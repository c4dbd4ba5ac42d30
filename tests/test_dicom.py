"""DICOM in, lesion size in mm out: scanners' files (pydicom's bundled ultrasound examples and files built here
around a BUSI sample scan), cine loops, the ultrasound region, sizes in mm, privacy and bad files."""
from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from dicom_files import PATIENT, framed, sample_grey, save, us_dataset, wrapped_scan
from PIL import Image
from pydicom import examples
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from test_predict import checkpoint  # noqa: F401 - fixture

import dicom_io
import metrics
import predict_busi
import utils
from inference import Predictor

# what a file's patient and study fields hold; none may appear in any output, log line or message
SECRETS = [v for k, v in PATIENT.items() if k not in ("PatientSex",)] + ["Testpatient", "Marianne"]


def leaked(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [s for s in SECRETS if s.encode() in data or s.lower().encode() in data.lower()]


# ------------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------------
def test_the_bundled_ultrasound_examples_read_as_grey():
    """RGB, a 30-frame YBR_FULL_422 JPEG cine loop, PALETTE COLOR and JPEG 2000 (decoded by Pillow): one grey
    frame at the file's size, the colour images by luma (the Y of YBR within rounding, but where RGB clips)."""
    rgb = dicom_io.load_scan(examples.get_path("rgb_color"))
    assert rgb.image.shape == (240, 320) and rgb.image.dtype == np.uint8 and rgb.frame is None
    expected = np.asarray(Image.fromarray(pixel_array(examples.get_path("rgb_color"))).convert("L"))
    np.testing.assert_array_equal(rgb.image, expected)

    cine = examples.get_path("ybr_color")
    assert dicom_io.frame_count(cine) == 30
    with pytest.raises(utils.DataError, match="choose a frame"):
        dicom_io.load_scan(cine)
    frame = dicom_io.load_scan(cine, frame=30)
    luma = pixel_array(cine, index=29, raw=True)[..., 0]
    assert frame.frame == 30 and frame.frames == 30
    assert (np.abs(frame.image.astype(int) - luma) <= 2).mean() > 0.999
    # its region (x 84-595) lies outside the 320-wide frame (the loop was scaled down): not used, no mm
    assert frame.region is None and frame.spacing is None and "outside" in frame.spacing_source
    assert "outside" in dicom_io.read_header(cine).note

    palette = dicom_io.load_scan(examples.get_path("palette_color"))
    assert palette.image.shape == (350, 800) and palette.image.std() > 10
    j2k = dicom_io.load_scan(examples.get_path("jpeg2k"))
    assert j2k.image.shape == (480, 640) and j2k.image.std() > 10


def test_monochrome1_is_inverted_and_spacing_comes_from_the_file(tmp_path):
    grey = sample_grey()[:50, :60]
    mono1 = save(us_dataset(255 - grey, "MONOCHROME1"), tmp_path / "m1.dcm")
    np.testing.assert_array_equal(dicom_io.load_scan(mono1).image, grey)
    ds = us_dataset(grey)
    ds.PixelSpacing = [0.2, 0.1]  # (row, column) = (y, x)
    scan = dicom_io.load_scan(save(ds, tmp_path / "ps.dcm"))
    assert scan.spacing == (0.1, 0.2) and scan.spacing_source == "Pixel Spacing" and scan.region is None
    ds = us_dataset(grey)
    ds.ImagerPixelSpacing = [0.3, 0.3]
    assert dicom_io.load_scan(save(ds, tmp_path / "ips.dcm")).spacing_source == "Imager Pixel Spacing"
    plain = dicom_io.load_scan(save(us_dataset(grey, patient=False), tmp_path / "none"), pixel_spacing=0.25)
    assert plain.spacing == (0.25, 0.25) and plain.spacing_source == "--pixel-spacing"
    assert dicom_io.load_scan(tmp_path / "none").spacing_source == dicom_io.NO_SPACING_DICOM


def test_bad_files_are_one_line_each_naming_the_file_and_nothing_of_the_patient(tmp_path):
    grey = sample_grey()[:40, :50]
    report = Dataset()  # a structured report: patient fields, no pixels
    report.file_meta = FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    report.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    report.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    for keyword, value in PATIENT.items():
        setattr(report, keyword, value)
    wide = us_dataset(grey)
    wide.BitsAllocated, wide.BitsStored, wide.HighBit = 16, 12, 11
    wide.PixelData = grey.astype(np.uint16).tobytes()
    signed = us_dataset(grey)
    signed.PixelRepresentation = 1
    hsv = us_dataset(np.dstack([grey] * 3), "HSV")
    video = us_dataset(grey)
    video.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # H.264
    video.PixelData = encapsulate([b"\x00\x00\x00\x01" * 8])
    whole = wrapped_scan(tmp_path / "whole.dcm").read_bytes()
    cases = {"report.dcm": (report, "no image"), "wide.dcm": (wide, "16-bit"), "signed.dcm": (signed, "signed"),
             "video.dcm": (video, "H.264"), "hsv.dcm": (hsv, "photometric interpretation HSV")}
    for name, (ds, words) in cases.items():
        save(ds, tmp_path / name)
    (tmp_path / "cut_pixels").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "cut_header.dcm").write_bytes(whole[:400])
    (tmp_path / "not.dcm").write_bytes(b"just text, named .dcm")
    cases.update({"cut_pixels": (None, "truncated"), "cut_header.dcm": (None, "DICOM"),
                  "not.dcm": (None, "no 'DICM'")})
    for name, (_, words) in cases.items():
        with pytest.raises(utils.DataError) as caught:
            dicom_io.load_scan(tmp_path / name)
        message = str(caught.value)
        assert "\n" not in message and name in message and words in message, message
        assert leaked(message) == [], message


def test_a_decoder_that_is_not_installed_is_named(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.pixels import get_decoder

    if get_decoder("1.2.840.10008.1.2.4.80").is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    ds = us_dataset(sample_grey()[:20, :20])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"  # JPEG-LS
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    with pytest.raises(utils.DataError, match="JPEG-LS.*pip install pylibjpeg pylibjpeg-libjpeg"):
        dicom_io.load_scan(save(ds, tmp_path / "jls.dcm"))


def test_a_region_outside_the_image_or_a_spacing_of_zero_is_a_stated_skip(tmp_path):
    frame, (x0, y0, x1, y1) = framed(sample_grey()[:60, :80])
    outside = dicom_io.read_header(save(us_dataset(frame, region=(x0, y0, x1 + 500, y1)), tmp_path / "out.dcm"))
    assert outside.region is None and outside.spacing is None and "outside" in outside.note
    zero = dicom_io.read_header(save(us_dataset(frame, region=(x0, y0, x1, y1), delta_cm=(0.0, 0.01)),
                                     tmp_path / "zero.dcm"))
    assert zero.region == (x0, y0, x1 + 1, y1 + 1) and zero.spacing is None
    assert "0, negative" in zero.note and zero.spacing_source.startswith("none:")
    seconds = dicom_io.read_header(save(us_dataset(frame, region=(x0, y0, x1, y1), units=4), tmp_path / "s.dcm"))
    assert seconds.spacing is None and "centimetres" in seconds.spacing_source


def test_absurd_spacings_tiny_regions_and_partial_bit_depths_are_refused(tmp_path):
    """1e300 cm per pixel gave an infinite area, 1e-300 a 0.00 mm lesion: outside 0.001-10 mm a spacing is
    unknown, with the reason. A 1x1 region is no image. 6 of 8 bits used is another grey scale: refused."""
    frame, region = framed(sample_grey()[:60, :80])
    for delta in ((1e300, 1e300), (1e-300, 1e-300), (0.01, 5.0)):
        scan = dicom_io.load_scan(save(us_dataset(frame, region=region, delta_cm=delta), tmp_path / "a.dcm"))
        assert scan.spacing is None and scan.region is not None, delta
        assert scan.spacing_source.startswith("none:") and "0.001-10 mm" in scan.spacing_source, scan.spacing_source
    ok = dicom_io.load_scan(save(us_dataset(frame, region=region, delta_cm=(0.0005, 0.0005)), tmp_path / "b.dcm"))
    assert ok.spacing == pytest.approx((0.005, 0.005))  # a fine scanner's 5 micrometres is kept
    dot = (region[0], region[1], region[0], region[1])  # one pixel
    header = dicom_io.read_header(save(us_dataset(frame, region=dot), tmp_path / "dot.dcm"))
    assert header.region is None and "1x1 pixels" in header.note and "too small" in header.spacing_source
    narrow = us_dataset(frame)
    narrow.BitsStored, narrow.HighBit = 6, 5
    with pytest.raises(utils.DataError, match="6 bits used"):
        dicom_io.load_scan(save(narrow, tmp_path / "six.dcm"))


def test_a_pixel_spacing_of_one_value_is_unknown_with_its_reason_and_the_folder_is_written(
        tmp_path, checkpoint, capsys):  # noqa: F811
    folder = tmp_path / "in"
    one = us_dataset(sample_grey()[:60, :80])
    one.PixelSpacing = "0.1"  # one value where there should be two: read back as a number, not a list
    save(one, folder / "one.dcm")
    Image.fromarray(sample_grey()[:60, :80]).save(folder / "plain.png")
    scan = dicom_io.load_scan(folder / "one.dcm")
    assert scan.spacing is None and scan.spacing_source == "none: the file's Pixel Spacing has 1 value(s), not 2 " \
        "(row, column)"
    assert Predictor(checkpoint, backend="torch")(folder / "one.dcm").spacing_source == scan.spacing_source
    out = tmp_path / "out"
    assert predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(folder), "--output", str(out),
                              "--quiet", "--backend", "torch"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    rows = {r["file"]: r for r in read_rows(out)}
    assert set(rows) == {"one.dcm", "plain.png"} and rows["one.dcm"]["area_mm2"] == ""


def test_frame_numbers_start_at_one_in_the_api(tmp_path, checkpoint):  # noqa: F811
    shutil.copy(examples.get_path("ybr_color"), tmp_path / "loop.dcm")
    predictor = Predictor(checkpoint, backend="torch")
    for frame in (0, -1, 1.0):
        with pytest.raises(ValueError, match="from 1"):
            predictor(tmp_path / "loop.dcm", frame=frame)
    assert predictor(tmp_path / "loop.dcm", frame=1).frame == 1


def test_a_truncated_header_is_called_truncated_not_a_report(tmp_path):
    whole = wrapped_scan(tmp_path / "whole.dcm").read_bytes()
    for size in (200, 400, 600):
        (tmp_path / "cut.dcm").write_bytes(whole[:size])
        with pytest.raises(utils.DataError, match="truncated") as caught:
            dicom_io.load_scan(tmp_path / "cut.dcm")
        assert "report" not in str(caught.value) and leaked(str(caught.value)) == []


# ------------------------------------------------------------------------------------------------------------------
# Sizes in mm
# ------------------------------------------------------------------------------------------------------------------
def ellipse(shape, centre, axes_mm, angle, spacing):
    """Pixels whose centres lie in an ellipse of the given full axes (mm), turned by `angle`, at `spacing`."""
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    px, py = (x - centre[0]) * spacing[0], (y - centre[1]) * spacing[1]
    u = px * np.cos(angle) + py * np.sin(angle)
    v = -px * np.sin(angle) + py * np.cos(angle)
    return (u / (axes_mm[0] / 2)) ** 2 + (v / (axes_mm[1] / 2)) ** 2 <= 1


@pytest.mark.parametrize("spacing", [(0.1, 0.1), (0.1, 0.15), (0.2, 0.07)])
def test_the_diameters_of_a_drawn_ellipse_come_out_within_one_pixel(spacing):
    pixel = float(np.hypot(*spacing))  # a pixel's size along any line is at most its diagonal
    for angle in (0.0, 0.3, 0.9, np.pi / 2, 2.5):
        mask = ellipse((300, 400), (200, 150), (20.0, 12.0), angle, spacing)
        mask[5:8, 5:8] = True  # a speck elsewhere: the diameters are the lesion's, the area counts it
        size = metrics.lesion_size(mask, spacing)
        assert abs(size.longest - 20.0) <= pixel and abs(size.perpendicular - 12.0) <= pixel, (angle, size)
        assert size.area == pytest.approx(np.pi * 10 * 6 + 9 * spacing[0] * spacing[1], rel=0.01)
        (ax, ay), (bx, by) = size.longest_line  # the drawn line lies along the ellipse's long axis (within 6 degrees)
        direction = np.arctan2((by - ay) * spacing[1], (bx - ax) * spacing[0])
        assert abs(np.sin(direction - angle)) < 0.1
    assert metrics.lesion_size(np.zeros((5, 5), bool), spacing) is None
    one = metrics.lesion_size(np.ones((1, 1), bool), spacing)
    assert one.area == pytest.approx(spacing[0] * spacing[1]) and one.longest > 0


# ------------------------------------------------------------------------------------------------------------------
# Prediction
# ------------------------------------------------------------------------------------------------------------------
def test_the_wrapped_scan_predicts_as_its_png_with_the_shipped_model(tmp_path):
    """The scanner's frame around the scan never reaches the model: the region's mask is the PNG's mask, and
    the frame outside it is empty."""
    predictor = Predictor(backend="torch")
    png = predictor(dicom_files_png(tmp_path))
    wrapped = predictor(wrapped_scan(tmp_path / "scan.dcm"))
    x0, y0, x1, y1 = wrapped.region
    assert wrapped.mask.shape == framed(sample_grey())[0].shape
    np.testing.assert_array_equal(wrapped.mask[y0:y1, x0:x1], png.mask)
    assert png.mask.any() and wrapped.mask.sum() == png.mask.sum()
    assert wrapped.malignancy_probability == pytest.approx(png.malignancy_probability, abs=1e-6)
    assert wrapped.spacing_mm == (0.1, 0.12) and wrapped.spacing_source == "ultrasound region"
    size = wrapped.size_mm
    assert size == metrics.lesion_size(wrapped.mask, (0.1, 0.12)) and 1 < size.perpendicular <= size.longest < 30
    assert png.size_mm is None and predictor(dicom_files_png(tmp_path), pixel_spacing=0.1).size_mm is not None


def dicom_files_png(tmp_path):
    path = tmp_path / "scan.png"
    Image.fromarray(sample_grey()).save(path)
    return path


def read_rows(out):
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def mixed_folder(folder):
    """A PNG, a scanner's DICOM file and the same without an extension, a 30-frame cine loop, and bad files."""
    folder.mkdir()
    Image.fromarray(sample_grey()[::4, ::4]).save(folder / "plain.png")
    small = sample_grey()[::4, ::4]
    frame, region = framed(small)
    save(us_dataset(frame, region=region, delta_cm=(0.04, 0.05)), folder / "wrapped.dcm")
    save(us_dataset(frame, region=region, delta_cm=(0.04, 0.05)), folder / "1.2.840.99.7")
    shutil.copy(examples.get_path("ybr_color"), folder / "cine.dcm")
    truncated = (folder / "wrapped.dcm").read_bytes()
    (folder / "cut").write_bytes(truncated[:len(truncated) - 2000])  # patient fields in it, pixels cut short
    outside = us_dataset(frame, region=(region[0], region[1], region[2] + 900, region[3]))
    save(outside, folder / "outside.dcm")
    (folder / "DICOMDIR").write_bytes((folder / "outside.dcm").read_bytes())  # an archive's index: not a scan
    (folder / "readme.txt").write_text("not a scan")
    return small.shape


def test_a_mixed_folder_through_predict(tmp_path, checkpoint, capsys):  # noqa: F811
    """PNG, DICOM with and without an extension, a cine loop and broken files in one command: masks at the full
    frame's size, 30 rows for the loop, sizes in mm where the spacing is known, the broken file one line, and no
    patient field anywhere in what was written or printed."""
    small_shape = mixed_folder(tmp_path / "in")
    out = tmp_path / "out"
    code = predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "in"), "--output", str(out),
                              "--quiet", "--pixel-spacing", "0.4", "--backend", "torch"])
    printed = capsys.readouterr()
    assert code == 1
    errors = [line for line in printed.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cut" in errors[0] and "truncated" in errors[0]
    assert any(line.startswith("note:") and "outside.dcm" in line for line in printed.err.splitlines())
    rows = {(r["file"], r["frame"]): r for r in read_rows(out)}
    cine = [r for (name, _), r in rows.items() if name == "cine.dcm"]
    assert sorted(int(r["frame"]) for r in cine) == list(range(1, 31))
    assert rows[("cine.dcm", "3")]["mask"] == "cine_f003_pred.png"
    wrapped, bare = rows[("wrapped.dcm", "")], rows[("1.2.840.99.7", "")]
    assert bare["mask"] == "1.2.840.99.7_pred.png" and wrapped["spacing_source"] == "ultrasound region"
    assert wrapped["pixel_spacing_mm"] == "0.4,0.5" and wrapped["region"] == "40,24,179,141"
    mask = np.asarray(Image.open(out / wrapped["mask"])) > 0
    assert mask.shape == (small_shape[0] + 54, small_shape[1] + 100) and not mask[:24].any()
    size = metrics.lesion_size(mask, (0.4, 0.5))
    expected = ["0.00"] * 3 if size is None else [f"{size.area:.2f}", f"{size.longest:.2f}", f"{size.perpendicular:.2f}"]
    assert [wrapped[c] for c in ("area_mm2", "longest_diameter_mm", "perpendicular_diameter_mm")] == expected
    assert rows[("plain.png", "")]["spacing_source"] == "--pixel-spacing"  # the flag fills in where a file has none
    assert rows[("outside.dcm", "")]["region"] == "" and rows[("outside.dcm", "")]["area_mm2"] == ""
    assert "outside" in rows[("outside.dcm", "")]["spacing_source"]  # the file's own (refused) geometry wins
    assert ("DICOMDIR", "") not in rows and ("readme.txt", "") not in rows
    assert list(read_rows(out)[0])[-7:] == list(predict_busi.CSV_FIELDS[-7:])
    for path in out.iterdir():
        assert leaked(path.read_bytes()) == [], path.name
    assert leaked(printed.out + printed.err) == []


def test_one_frame_of_a_loop(tmp_path, checkpoint, capsys):  # noqa: F811
    shutil.copy(examples.get_path("ybr_color"), tmp_path / "loop")
    out = tmp_path / "out"
    assert predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "loop"), "--output",
                              str(out), "--quiet", "--frame", "7"]) == 0
    rows = read_rows(out)
    assert [(r["frame"], r["mask"]) for r in rows] == [("7", "loop_f007_pred.png")]
    assert predict_busi.main(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "loop"), "--output",
                              str(tmp_path / "out2"), "--quiet", "--frame", "31"]) == 1
    assert "no frame 31" in capsys.readouterr().err
