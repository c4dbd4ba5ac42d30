"""inspect_busi_predictions_gui.py driven under a real X server (Xvfb, started here; skipped where it is missing).

Every number the window shows is checked against values computed here independently: the model run directly
(no predict_busi / inference.predict_batches) for the probability map, metrics.dice_iou for the metrics.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REAL_DATA, ROOT, window_of
from PIL import Image
from test_predict import IMAGE_SIZE, save_tiny_checkpoint, scan, write_bad_checkpoint

import checkpoints
import image_io
import inspection
import metrics
import splitting
import tensor_cache
import utils

tk = pytest.importorskip("tkinter")
SAMPLE = ROOT / "data" / "busi_sample"


# ------------------------------------------------------------------------------------------------------------------
# Fixtures: an X server for the module, a Tk root and a tiny model per test
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def root(display):
    window = tk.Tk()
    yield window
    try:
        window.destroy()
    except tk.TclError:
        pass  # the test closed it


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("gui_ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def gui():
    """The module, with PyTorch's CPU threads set as its main() sets them (restored afterwards)."""
    import inspect_busi_predictions_gui

    threads = torch.get_num_threads()
    torch.set_num_threads(inspect_busi_predictions_gui.default_threads())
    yield inspect_busi_predictions_gui
    torch.set_num_threads(threads)


@pytest.fixture
def errors(monkeypatch, gui):
    """Collect error dialogs instead of blocking on them (also those raised while the window is built)."""
    seen: list[str] = []
    monkeypatch.setattr(gui.InspectorApp, "show_error", lambda self, message: seen.append(message))
    return seen


def listed(app) -> list[str]:
    """The file names the list shows, without the Dice / trust figures before them."""
    return [entry.rsplit("  ", 1)[-1] for entry in app.listbox_entries()]


def pump(root, seconds: float = 0.0) -> None:
    """Let Tk process pending events (and idle redraws) for a while."""
    end = time.monotonic() + seconds
    while True:
        root.update()
        if time.monotonic() >= end:
            break
        time.sleep(0.01)


def expected_probability(checkpoint, image: np.ndarray) -> np.ndarray:
    """The probability map at the image's size, computed here from the model alone."""
    model = checkpoints.load_model(checkpoint).model
    x = torch.from_numpy(np.array(image_io.resize_image(image, IMAGE_SIZE))).float().div(255)[None, None]
    with torch.no_grad():
        prob = torch.sigmoid(model(x)[0])
    return F.interpolate(prob, size=image.shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def expected_metrics(app, threshold: float):
    """Dice/IoU of the shown image from its cached map, with the truth loaded afresh from disk."""
    item = app.current
    _, truth = image_io.load_sample(item.data_dir, item.sample)
    prob = app.browser.cache[item.key].probability
    return metrics.dice_iou(torch.from_numpy(prob > threshold), torch.from_numpy(truth))


def non_blank(image: Image.Image) -> float:
    return float(np.asarray(image.convert("L"), dtype=np.float32).std())


# ------------------------------------------------------------------------------------------------------------------
def test_navigation_threshold_and_metrics(root, gui, checkpoint, errors, monkeypatch):
    items, note = inspection.dataset_items(SAMPLE, "all")
    app = gui.InspectorApp(root, checkpoint, items, "cpu", source=note)
    pump(root)
    assert errors == []
    assert listed(app) == [it.name for it in items] and len(items) == 70
    assert app.index == 0 and app.listbox.curselection() == (0,)
    assert app.browser.threshold == 0.5 and app.threshold_var.get() == 0.5  # the checkpoint's threshold

    app.next()
    root.focus_force()
    pump(root)
    root.event_generate("<Right>")  # the keyboard works as well as the buttons
    pump(root)
    assert app.index == 2 and app.current is items[2] and app.listbox.curselection() == (2,)
    root.event_generate("<Left>")
    pump(root)
    assert app.index == 1

    # The cached map is the model's output at the image's own size ...
    item = app.current
    image, truth = image_io.load_sample(item.data_dir, item.sample)
    cached = app.browser.cache[item.key].probability
    assert cached.shape == image.shape == truth.shape
    np.testing.assert_allclose(cached.astype(np.float32), expected_probability(checkpoint, image), atol=2e-3)
    # ... and the Dice/IoU shown are computed from it at full resolution.
    assert (app.panels.dice, app.panels.iou) == pytest.approx(expected_metrics(app, 0.5))
    assert f"Dice {app.panels.dice:.3f}" in app.panels.info_text and item.name in app.panels.info_text

    # The slider re-thresholds the cached map: new metrics, no new inference.
    calls = []
    monkeypatch.setattr(app, "_predict", lambda *a: calls.append(a))
    shown = {}
    for t in (0.3, 0.62, 0.9):
        app.set_threshold(t)
        pump(root)
        assert app.browser.threshold == t and app.threshold_var.get() == pytest.approx(t)
        assert (app.panels.dice, app.panels.iou) == pytest.approx(expected_metrics(app, t))
        shown[t] = app.panels.dice
    app.threshold_var.set(0.45)  # as if the user dragged the slider
    app._on_scale("0.45")
    assert app.browser.threshold == 0.45 and (app.panels.dice, app.panels.iou) == pytest.approx(expected_metrics(app, 0.45))
    assert calls == [] and len(set(shown.values())) > 1
    app.prev()  # cached: shown without inference
    assert calls == [] and app.index == 0
    app.prev()
    assert app.index == 0 and "first image" in app.status
    assert errors == []


def test_filter_and_sort_by_dice(root, gui, checkpoint, errors):
    items, note = inspection.dataset_items(SAMPLE, "all")
    app = gui.InspectorApp(root, checkpoint, items, "cpu", source=note)
    app.filter_class("malignant")
    assert listed(app) == [it.name for it in items if it.label == "malignant"]
    assert all(app.browser.items[i].label == "malignant" for i in app.browser.visible) and app.current.label == "malignant"

    app.filter_class("all")
    app.set_threshold(0.55)
    app.sort_by_dice()  # as the button does: in the background, the status bar counting
    deadline = time.monotonic() + 60
    while app.busy and time.monotonic() < deadline:
        pump(root, 0.02)
    assert len(items) == 70  # the bundled sample
    assert not app.busy and f"sorted {len(items)} images" in app.status
    assert len(app.browser.cache) == len(items)
    entries = app.listbox_entries()
    shown = [float(e.split()[0]) for e in entries]
    assert shown == sorted(shown)  # worst first
    expected = {}
    for i in app.browser.visible:
        item = app.browser.items[i]
        _, truth = image_io.load_sample(item.data_dir, item.sample)
        expected[item.name] = metrics.dice_iou(torch.from_numpy(app.browser.cache[item.key].probability > 0.55),
                                             torch.from_numpy(truth))[0]
    assert [app.browser.items[i].name for i in app.browser.visible] == sorted(expected, key=lambda n: expected[n])
    for entry, i in zip(entries, app.browser.visible):
        assert entry.endswith(app.browser.items[i].name)
        assert float(entry.split()[0]) == pytest.approx(expected[app.browser.items[i].name], abs=5e-4)
    # the summary as the README reports it: lesion Dice over benign + malignant, normal FP as a count
    lesion = [expected[app.browser.items[i].name] for i in app.browser.visible if app.browser.items[i].label != "normal"]
    normals = [i for i in app.browser.visible if app.browser.items[i].label == "normal"]
    fp = sum(bool((app.browser.cache[app.browser.items[i].key].probability > 0.55).any()) for i in normals)
    assert f"lesion Dice {np.mean(lesion):.3f} (n={len(lesion)})" in app.status
    assert f"normal FP {fp} of {len(normals)}" in app.status

    app.filter_class("normal")  # the sort order survives filtering
    normal = [app.browser.items[i].name for i in app.browser.visible]
    assert normal == [n for n in sorted(expected, key=lambda n: expected[n]) if n.startswith("normal")]
    app.select(len(normal) - 1)
    assert app.index == len(normal) - 1 and (app.panels.dice, app.panels.iou) == pytest.approx(expected_metrics(app, 0.55))
    app.sort_by_name()
    assert listed(app) == [it.name for it in items if it.label == "normal"]
    with pytest.raises(ValueError):
        app.filter_class("cysts")
    assert errors == []


def test_trust_beside_each_image_sort_by_trust_and_flags(root, gui, checkpoint, errors, tmp_path):
    """The shown image's trust in the text, every predicted image's Dice and trust in the list, "Sort by trust"
    lowest first, flagged images marked; a checkpoint without trust statistics says so instead."""
    items, note = inspection.dataset_items(SAMPLE, "all")
    app = gui.InspectorApp(root, checkpoint, items, "cpu", source=note)
    first = app.browser.cache[app.current.key]
    assert first.trust is not None and f"trust {first.trust:.2f}" in app.panels.info_text
    assert app.listbox_entries()[0].startswith(f"{app.panels.dice:.3f}  trust {first.trust:.2f}")  # before any sort
    app.trust_entry["review_below"] = 0.5  # this tiny model's scores fall on both sides of it
    app.browser.cache.clear()
    app.sort_by_trust(background=False)
    scores = [app.browser.cache[app.browser.items[i].key].trust for i in app.browser.visible]
    assert scores == sorted(scores) and len(scores) == len(items)
    assert f"sorted {len(items)} images by trust, lowest first" in app.status
    flagged = [e for e in app.listbox_entries() if inspection.REVIEW_MARK in e]
    assert len(flagged) == sum(s < 0.5 for s in scores) and f"{len(flagged)} flagged for review" in app.status
    app.select(0)
    assert ("REVIEW" in app.panels.info_text) == (scores[0] < 0.5)

    plain = save_tiny_checkpoint(tmp_path / "plain.pt", with_trust=False)
    assert app.load_checkpoint(plain) and "no trust scores" in app.status
    app.sort_by_trust(background=False)
    assert len(errors) == 1 and "no trust statistics" in errors[0]
    assert "trust" not in app.panels.info_text and errors.pop()


def test_open_images_bad_image_and_bad_checkpoints(root, gui, checkpoint, errors, tmp_path):
    items, note = inspection.dataset_items(SAMPLE, "test")  # the sample's committed split
    assert 0 < len(items) < 30
    app = gui.InspectorApp(root, checkpoint, items, "cpu", source=note)
    good = tmp_path / "new scan.jpg"
    Image.fromarray(np.dstack([scan(123, 77, 3)] * 3)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert app.open_images([good, broken]) == 1
    assert len(errors) == 1 and "broken.png" in errors[0]
    pump(root)
    assert app.current.name == "new scan.jpg" and listed(app)[app.index] == "new scan.jpg"
    assert app.panels.dice is None and app.panels.iou is None and "no ground truth" in app.panels.info_text
    assert app.browser.cache[app.current.key].probability.shape == (77, 123)
    np.testing.assert_allclose(app.browser.cache[app.current.key].probability.astype(np.float32),
                               expected_probability(checkpoint, image_io.load_image(good)), atol=2e-3)
    app.set_threshold(0.7)  # works without truth too
    assert app.browser.threshold == 0.7 and app.panels.dice is None

    # Missing, foreign, another architecture, code-running: a dialog each, the model in use is kept.
    model = app.model
    problems = ("missing", "foreign", "architecture", "hostile")
    for problem in problems:
        bad = write_bad_checkpoint(problem, tmp_path / f"{problem}.pt", checkpoint)
        assert app.load_checkpoint(bad) is False
        assert bad.name in errors[-1] and app.model is model
    assert len(errors) == 1 + len(problems)
    assert not (tmp_path / "hostile.pwned").exists()  # the hostile pickle ran nothing
    app.select(0)  # still fully working
    assert (app.panels.dice, app.panels.iou) == pytest.approx(expected_metrics(app, 0.7))
    assert app.load_checkpoint(checkpoint) is True and app.browser.cache and app.panels.dice is not None
    checkpoints.export_checkpoint([checkpoint, checkpoint], tmp_path / "ens.pt")  # an ensemble loads like one model
    assert app.load_checkpoint(tmp_path / "ens.pt") is True and "ensemble of 2 x UNet" in app.status
    item = app.current
    np.testing.assert_allclose(app.browser.cache[item.key].probability.astype(np.float32), expected_probability(
        checkpoint, image_io.load_sample(item.data_dir, item.sample)[0]), atol=5e-3)


def test_bad_checkpoint_at_startup_keeps_the_window_usable(root, gui, checkpoint, errors, tmp_path):
    items, note = inspection.dataset_items(SAMPLE, "all")
    app = gui.InspectorApp(root, tmp_path / "nope.pt", items, "cpu", source=note)
    pump(root)
    assert len(errors) == 1 and "nope.pt" in errors[0]
    assert app.model is None and app.current is items[0] and app.panels.dice is None
    assert "no model loaded" in app.panels.info_text
    app.next()  # images and truth still browse
    app.sort_by_dice(background=False)
    assert len(errors) == 2 and "no model" in errors[1]
    assert app.load_checkpoint(checkpoint)
    assert app.index == 1 and (app.panels.dice, app.panels.iou) == pytest.approx(expected_metrics(app, 0.5))


def test_unreadable_dataset_image_is_reported_and_skipped(root, gui, checkpoint, errors, fresh_busi_dir):
    data_dir, _ = fresh_busi_dir
    (data_dir / "benign" / "benign (2).png").write_bytes(b"")  # empty file
    items, note = inspection.dataset_items(data_dir, "all")
    app = gui.InspectorApp(root, checkpoint, items, "cpu", source=note)
    position = [it.name for it in items].index("benign (2).png")
    app.select(position)
    assert len(errors) == 1 and "benign (2).png" in errors[0] and app.panels.dice is None
    app.next()
    assert len(errors) == 1 and (app.panels.dice, app.panels.iou) == pytest.approx(expected_metrics(app, 0.5))
    app.sort_by_dice(background=False)  # the bad image is reported once more and listed last
    assert len(errors) == 2 and app.listbox_entries()[-1].endswith("benign (2).png")


def test_save_figure_and_screenshot_are_not_blank(root, gui, checkpoint, errors, tmp_path, display):
    from PIL import ImageGrab

    items, note = inspection.dataset_items(SAMPLE, "all")
    app = gui.InspectorApp(root, checkpoint, items, "cpu", source=note)
    pump(root, 0.3)
    assert app.save_figure(tmp_path / "figure.png")
    figure = Image.open(tmp_path / "figure.png")
    assert figure.size[0] > 600 and non_blank(figure) > 20
    assert app.save_figure(tmp_path / "no" / "such" / "dir" / "f.png") is False and len(errors) == 1

    root.update_idletasks()
    x, y, w, h = root.winfo_rootx(), root.winfo_rooty(), root.winfo_width(), root.winfo_height()
    assert (w, h) == tuple(map(int, gui.WINDOW_SIZE.split("x")))
    shot = ImageGrab.grab(bbox=(x, y, x + w, y + h), xdisplay=display)
    shot.save(tmp_path / "window.png")
    assert shot.size == (w, h) and non_blank(shot) > 20
    app.close()


def test_script_starts_and_survives_a_bad_checkpoint(display, tmp_path):
    """The real entry point: no traceback with a missing checkpoint; its window waits on the error dialog."""
    err = window_of([sys.executable, "inspect_busi_predictions_gui.py", "--checkpoint", str(tmp_path / "missing.pt"),
                     "--data-dir", str(SAMPLE), "--split", "all", "--device", "cpu"], cwd=ROOT)
    assert "Traceback" not in err


def test_help_and_no_display(tmp_path):
    proc = subprocess.run([sys.executable, "inspect_busi_predictions_gui.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--split" in proc.stdout and "--data-dir" in proc.stdout
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    proc = subprocess.run([sys.executable, "inspect_busi_predictions_gui.py", "--data-dir", str(SAMPLE),
                           "--split", "all"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


SHIPPED = checkpoints.DEFAULT_CHECKPOINT


@pytest.mark.skipif(not (REAL_DATA.is_dir() and SHIPPED.is_file()), reason="real BUSI data or shipped model absent")
def test_shipped_model_on_the_real_test_split(root, gui, errors):
    items, note = inspection.dataset_items(REAL_DATA, "test")
    split = splitting.read_split(utils.DEFAULT_SPLIT_FILE)
    assert sorted(it.sample.image for it in items) == sorted(split["test"])
    app = gui.InspectorApp(root, SHIPPED, items, "cpu", source=note)
    for _ in range(3):
        app.next()
    assert errors == [] and (app.panels.dice, app.panels.iou) == pytest.approx(expected_metrics(app, app.browser.threshold))


def test_command_line_picks_the_data(gui, busi_dir, monkeypatch, tmp_path):
    """No display needed: which images the window would list for a given command line."""
    monkeypatch.chdir(tmp_path)  # no ./Dataset_BUSI_with_GT here: the bundled sample's test split
    items, note, error = gui.resolve_items(gui.build_parser().parse_args([]))
    assert error is None and "bundled sample" in note and len(items) == 15  # its test part of 70
    assert all(it.has_truth and it.data_dir == SAMPLE for it in items)
    # the sample's images are BUSI images: its "test" images are BUSI test images, never the shipped model's
    # training or validation images
    busi = json.loads(utils.DEFAULT_SPLIT_FILE.read_text())
    assert {it.sample.image for it in items} <= set(busi["test"])

    data_dir, _ = busi_dir
    monkeypatch.chdir(data_dir.parent)  # ./Dataset_BUSI_with_GT is used when present
    items, note, error = gui.resolve_items(gui.build_parser().parse_args(["--split", "all"]))
    assert error is None and len(items) == len(image_io.discover_samples(data_dir))
    assert {it.label for it in items} == set(utils.CLASSES)

    items, note, error = gui.resolve_items(gui.build_parser().parse_args(["x.png", "y.jpg"]))
    assert [it.name for it in items] == ["x.png", "y.jpg"] and not any(it.has_truth for it in items)

    items, note, error = gui.resolve_items(gui.build_parser().parse_args(["--data-dir", str(tmp_path / "nope")]))
    assert items == [] and "nope" in error


def test_a_data_bundle_or_other_file_as_data_dir_asks_for_the_image_folder(gui, busi_dir, tmp_path):
    """No display needed. A bundle (made by the real `python dataset.py --bundle`) trains, but holds no scans."""
    data_dir, _ = busi_dir
    bundle = tmp_path / "busi.bundle"
    proc = subprocess.run([sys.executable, "dataset.py", "--data-dir", str(data_dir), "--bundle", str(bundle),
                           "--image-size", "32"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and tensor_cache.is_bundle(bundle), proc.stderr
    notes = tmp_path / "notes.txt"
    notes.write_text("not data")
    for path, what in ((bundle, "is a data bundle"), (notes, "is a file, not a data folder")):
        with pytest.raises(utils.DataError, match="benign/, malignant/, normal/") as caught:
            inspection.dataset_items(path, "all")
        assert what in str(caught.value) and "not found" not in str(caught.value)
        items, note, error = gui.resolve_items(gui.build_parser().parse_args(["--data-dir", str(path)]))
        assert items == [] and what in error and str(path) in error


def test_zoom_pan_toolbar_filled_masks_and_the_file_path(root, gui, checkpoint, errors):
    items, note = inspection.dataset_items(SAMPLE, "all")
    app = gui.InspectorApp(root, checkpoint, items, "cpu", source=note)
    pump(root)
    assert errors == []
    modes = {b.cget("text") for b in app.toolbar.winfo_children() if isinstance(b, (tk.Button, tk.Checkbutton))}
    assert {"Zoom", "Pan", "Home"} <= modes  # Matplotlib's navigation toolbar
    assert app.path_var.get() == str(app.current.path)
    app.toolbar.zoom()  # zoom mode on, then a zoomed view; the next image starts from its full view
    app.panels.ax_overlay.set_xlim(10, 20)
    app.next()
    pump(root)
    h, w = app._shown[1].shape
    assert app.panels.ax_overlay.get_xlim() == (-0.5, w - 0.5) and app.path_var.get() == str(app.current.path)
    while app.panels._contours.get("truth") is None:  # an image with a lesion
        app.next()
        pump(root)
    assert not app.panels._contours["truth"].filled
    app.set_filled(True)
    pump(root)
    assert app.panels._contours["truth"].filled and app.filled_var.get() is True
    app.set_filled(False)
    assert not app.panels._contours["truth"].filled


def test_presence_probability_and_the_no_lesion_gate_in_the_window(root, gui, checkpoint, errors, tmp_path):
    """The text gives the presence probability; a scan the gate judges lesion-free shows no outline and says so,
    and its Dice is that of an empty mask."""
    state = checkpoints.load_checkpoint(checkpoint)
    gate = {"weights": torch.tensor([1.0, 0.0]), "bias": 0.0, "cut": 2.0, "candidate": "max_probability"}
    checkpoints.save_checkpoint({**state, "trust": {**state["trust"], "presence": gate, "gate_scope": "site"}},
                                tmp_path / "gated.pt")
    items, note = inspection.dataset_items(SAMPLE, "all")
    lesion = [it for it in items if it.label != "normal"][:2]
    app = gui.InspectorApp(root, tmp_path / "gated.pt", lesion, "cpu", source=note)
    shown = app.browser.cache[app.current.key]
    assert shown.gated and "judged lesion-free: mask emptied" in app.panels.info_text
    assert f"lesion present {shown.presence_probability:.2f}" in app.panels.info_text and app.panels.dice == 0.0
    assert "pred" not in app.panels._contours  # no outline drawn
    assert app.load_checkpoint(checkpoint)  # without a gate: the outline is back, no presence line
    assert not app.browser.cache[app.current.key].gated and "lesion present" not in app.panels.info_text and app.panels.dice > 0
    assert errors == []


def test_a_sort_shows_the_top_and_the_slider_refreshes_every_listed_dice_and_the_status(root, gui, checkpoint,
                                                                                        errors):
    items, note = inspection.dataset_items(SAMPLE, "all")
    app = gui.InspectorApp(root, checkpoint, items, "cpu", source=note)
    app.select(5)
    app.sort_by_dice(background=False)
    assert app.index == 0 and app.listbox.curselection() == (0,)  # the worst Dice, shown
    before = app.listbox_entries()
    app.set_threshold(0.8)
    after = app.listbox_entries()
    assert after != before  # each listed Dice is recomputed at the new threshold
    for position, line in enumerate(after):
        dice = app.browser.dice_of(app.browser.visible[position])
        assert dice is None or line.startswith(f"{dice:.3f}")
    assert app.status.startswith("threshold 0.80") and "lesion Dice" in app.status
    assert errors == []


def test_a_folder_without_masks_and_a_mask_of_another_size_in_the_window(root, gui, checkpoint, errors, tmp_path,
                                                                         fresh_busi_dir):
    """Tried under Xvfb as a user would: a --data-dir of scans without masks opens an empty window whose error says
    how to open scans without ground truth; a mask of another size is named when its image is shown, and the app
    goes on."""
    scans = tmp_path / "nomask" / "benign"
    scans.mkdir(parents=True)
    Image.fromarray(scan(30, 30)).save(scans / "x.png")
    args = gui.build_parser().parse_args(["--data-dir", str(tmp_path / "nomask")])
    items, _, error = gui.resolve_items(args)
    assert items == [] and "image without a mask" in error and "Open images" in error
    data_dir, _ = fresh_busi_dir
    Image.new("1", (7, 9)).save(data_dir / "benign" / "benign (3)_mask.png")
    items, note = inspection.dataset_items(data_dir, "all")
    app = gui.InspectorApp(root, checkpoint, items, "cpu", source=note)
    bad = next(k for k, i in enumerate(app.browser.visible) if "benign (3)" in app.browser.items[i].name)
    app.select(bad)
    assert len(errors) == 1 and "mask size 7x9 differs" in errors.pop()
    app.next()
    assert app.index == bad + 1 and errors == []


def test_a_dicom_file_and_a_cine_loop_open_with_the_two_diameters_drawn(root, gui, checkpoint, errors, tmp_path):
    """A scanner's DICOM file opens with its diameters drawn in mm (its region's spacing); a cine loop gives one
    entry per frame; a scan without spacing measures in pixels."""
    import shutil

    from dicom_files import wrapped_scan
    from pydicom import examples

    app = gui.InspectorApp(root, checkpoint, [], "cpu")
    shutil.copy(examples.get_path("ybr_color"), tmp_path / "loop")
    assert app.open_images([wrapped_scan(tmp_path / "scan.dcm"), tmp_path / "loop"]) == 2
    pump(root)
    assert errors == [] and len(app.browser.items) == 31 and app.current.name == "scan.dcm"
    assert app.browser.items[-1].name == "loop [frame 30/30]"
    app.set_threshold(0.3)  # the tiny model outlines something at this threshold
    size = app.panels.size
    assert size is not None and size.perpendicular <= size.longest
    labels = [a.get_text() for a in app.panels._calipers if hasattr(a, "get_text")]
    assert labels == [f"{size.longest:.1f} mm", f"{size.perpendicular:.1f} mm"] and "mm" in app.panels.info_text
    app.select(30)
    pump(root)
    assert app.current.frame == 30 and app.browser.cache[app.current.key].probability.shape == (240, 320)
    assert app.panels.size is None or all(t.endswith(" px") for t in (a.get_text() for a in app.panels._calipers[1::2]))


def test_a_gate_fitted_elsewhere_keeps_the_outline_and_an_unfamiliar_image_gets_the_badge(root, gui, checkpoint,
                                                                                          errors, tmp_path):
    """The gate of a checkpoint fitted at other hospitals marks the scan and keeps its outline (--gate apply
    empties it); a photograph opened with the shipped model is out of range, says so and is flagged."""
    state = checkpoints.load_checkpoint(checkpoint)
    gate = {"weights": torch.tensor([1.0, 0.0]), "bias": 0.0, "cut": 2.0, "candidate": "max_probability"}
    checkpoints.save_checkpoint({**state, "trust": {**state["trust"], "presence": gate}}, tmp_path / "elsewhere.pt")
    items, note = inspection.dataset_items(SAMPLE, "all")
    lesion = [it for it in items if it.label != "normal"][:1]
    app = gui.InspectorApp(root, tmp_path / "elsewhere.pt", lesion, "cpu", source=note)
    shown = app.browser.cache[app.current.key]
    assert shown.marked_only and not shown.gated and "likely lesion-free" in app.panels.info_text and app.panels.dice > 0
    applied = gui.InspectorApp(root, tmp_path / "elsewhere.pt", lesion, "cpu", source=note, gate="apply")
    assert applied.browser.cache[applied.current.key].gated and "mask emptied" in applied.panels.info_text
    import matplotlib
    photo = tmp_path / "photo.png"
    Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("L").save(photo)
    shipped = gui.InspectorApp(root, checkpoints.DEFAULT_CHECKPOINT, inspection.file_items(photo), "cpu", backend="torch")
    prediction = shipped.browser.cache[shipped.current.key]
    assert prediction.out_of_range and prediction.review and "OUT OF RANGE" in shipped.panels.info_text
    assert inspection.OUT_OF_RANGE_BADGE in shipped.browser.entry(0)
    assert errors == []


@pytest.mark.parametrize("geometry", ["1400x800", "1600x1000"])
def test_the_facts_fit_the_window_an_unlabelled_scan_has_no_ground_truth_and_a_dicom_shows_its_region(
        root, gui, checkpoint, errors, tmp_path, monkeypatch, geometry):
    """Every fact (diameters, trust, the `check` warning, the region) stays inside the figure at common window
    sizes; an opened scan gets no "ground truth" title or legend entry; a DICOM's ultrasound region is drawn."""
    from fnmatch import fnmatch

    from dicom_files import BORDER, sample_grey, wrapped_scan
    app = gui.InspectorApp(root, checkpoint, [], "cpu")
    root.geometry(geometry)
    assert app.open_images([wrapped_scan(tmp_path / "scanner file.dcm")]) == 1
    app.browser.cache[app.current.key] = dataclasses.replace(  # the class head says "normal" ...
        app.browser.cache[app.current.key], class_probabilities={"benign": 0.0, "malignant": 0.0, "normal": 1.0})
    app.set_threshold(0.05)  # ... beside an outline: what predict's `check` column flags
    pump(root, 0.3)
    for fact in ("CHECK: " + gui.contradiction("normal", True), "mm", "trust", "dashed box", "no ground truth"):
        assert fact in app.panels.info_text, (fact, app.panels.info_text)
    renderer = app.canvas.get_renderer()
    text, fig = app.panels.suptitle.get_window_extent(renderer), app.panels.figure.bbox
    assert fig.width > 700 and 0 <= text.x0 and text.x1 <= fig.width and text.y1 <= fig.height, (text, fig)
    assert text.y0 >= app.panels.ax_overlay.title.get_window_extent(renderer).y1 - 2  # above the panels' titles
    assert app.panels.ax_overlay.get_title() == "Prediction"
    assert not app.panels.legend.get_texts()[0].get_visible() and not app.panels.legend.legend_handles[0].get_visible()
    left, top = BORDER[0], BORDER[1]
    h, w = sample_grey().shape
    assert app.panels.region_box.get_visible() and (app.panels.region_box.get_x(), app.panels.region_box.get_y(),
                                              app.panels.region_box.get_width(), app.panels.region_box.get_height()) == (
        left - 0.5, top - 0.5, w, h)
    # a labelled scan: the ground truth is named again, and no region box is left over
    app.open_images([])  # (nothing)
    items, note = inspection.dataset_items(SAMPLE, "test")
    labelled = gui.InspectorApp(root, checkpoint, items[:1], "cpu", source=note)
    pump(root, 0.2)
    assert labelled.panels.ax_overlay.get_title() == "Ground truth vs prediction" and labelled.panels.legend.get_texts()[0].get_visible()
    assert not labelled.panels.region_box.get_visible()
    # the open dialog's default filter lists extension-less DICOM files (the native dialog itself cannot be
    # driven under a test, so its call is caught here and its filter applied to such a name)
    asked = {}
    monkeypatch.setattr(gui.filedialog, "askopenfilenames", lambda **kw: asked.update(kw) or "")
    app._ask_images()
    default = asked["filetypes"][0][1].split()
    assert any(fnmatch("IM000001", p) for p in default) and any(fnmatch("scan.dcm", p) for p in default)
    assert errors == []


def test_facts_wrap_between_facts_never_inside_one(gui):
    facts = ["Dice 0.812   IoU 0.700", "trust 0.93", "a fact much longer than the line it is given " * 2, "x"]
    lines = gui.wrap_facts(facts, 40)
    assert lines == ["Dice 0.812   IoU 0.700   |   trust 0.93", facts[2], "x"]
    assert all(len(line) <= 40 for line in lines if line != facts[2])
