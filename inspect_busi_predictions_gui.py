"""Inspect BUSI U-Net predictions image by image: scan, ground truth vs predicted outline, probability map.

    python inspect_busi_predictions_gui.py                      # shipped model on the BUSI test split (or the sample)
    python inspect_busi_predictions_gui.py --data-dir PATH/Dataset_BUSI_with_GT --split val
    python inspect_busi_predictions_gui.py --checkpoint checkpoints/run/best.pt scan1.png scan2.jpg   # no truth

Without --data-dir the BUSI data is taken from ./Dataset_BUSI_with_GT when it exists, else the bundled sample
data/busi_sample. Per image the window shows Dice and IoU at the image's original resolution, its class and,
for models with a class head, P(malignant | lesion), and, for checkpoints with fitted trust statistics, the trust
score (the fitted probability that the outline is right; a flag below the review threshold). The list shows each
predicted image's Dice and trust; sort it by either. Inference runs once per image and is cached; the threshold
slider only re-thresholds the cached probability map. Keys: Left/Right = previous/next image. DICOM files open
too (every frame of a cine loop is a list entry; the ultrasound region alone is predicted), and the prediction's
longest diameter and the longest one perpendicular to it are drawn with their lengths (mm where the file records
its pixel spacing, else pixels).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import utils  # (torch-free: --help is answered from it before torch, Tk and Matplotlib load, below)
from utils import DEFAULT_CHECKPOINT, default_threads



# --------------------------------------------------------------------------------------------------------------
# Command line (first, so that --help needs nothing heavier than argparse)
# --------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Tk window to inspect a BUSI U-Net's predictions: image, ground truth vs predicted outline, "
                    "probability map, per-image Dice/IoU at the original resolution, trust score (the scans to check "
                    "first), live threshold slider. Research use only: not for clinical decisions.",
        epilog="Without --data-dir: ./Dataset_BUSI_with_GT if present, else the bundled sample data/busi_sample. "
               "Keys: Left/Right = previous/next image.")
    p.add_argument("images", nargs="*", help="image files to open without ground truth (instead of a data set)")
    p.add_argument("--checkpoint", default=str(utils.shown_path(DEFAULT_CHECKPOINT)), help="model or ensemble (.pt); default: %(default)s")
    p.add_argument("--data-dir", default=None, help="BUSI-layout folder with benign/, malignant/, normal/")
    p.add_argument("--split", default="test", choices=utils.SPLITS, help="which images to list; default: %(default)s")
    p.add_argument("--split-file", default=str(utils.DEFAULT_SPLIT_FILE),
                   help="split JSON, used when it lists exactly the data dir's images (else one is computed)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=utils.positive_int, default=default_threads(), help="CPU threads for inference; "
                   "default: %(default)s")
    p.add_argument("--gate", choices=("auto", "apply", "mark"), default="auto",
                   help="the 'no lesion' gate: auto = empty a mask only with a gate fitted on the scans' own site, "
                        "else mark the scan 'likely lesion-free'; apply = always; mark = never; default: %(default)s")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                   help="what runs the model: onnx = onnxruntime on the CPU (exported on first use, cached beside the "
                        "checkpoint), torch = PyTorch, auto = onnx where onnxruntime and onnx are installed and the "
                        "device is the CPU; default: %(default)s")
    return p


if __name__ == "__main__":
    utils.answer_help_early(build_parser)

import tkinter as tk  # noqa: E402
from tkinter import filedialog, messagebox, ttk  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_tkagg import FigureCanvasTkAgg, NavigationToolbar2Tk  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

import checkpoints  # noqa: E402
import dataset  # noqa: E402
import dicom_io  # noqa: E402
import inspection  # noqa: E402
import metrics  # noqa: E402
import onnx_backend  # noqa: E402
import unet  # noqa: E402
from inference import Prediction, contradiction, predict_scans  # noqa: E402

# Cyan and orange stay distinguishable on grey ultrasound and for red-green colour-blind viewers; the prediction
# colour matches the outlines that predict_busi.py draws.
TRUTH_COLOUR = "#00d5ff"
PRED_COLOUR = "#ff4000"
CALIPER_COLOUR = "#ffe000"  # the two diameters: yellow, apart from both outlines
REGION_COLOUR = "#b0b0b0"  # the DICOM ultrasound region (what the model sees): a grey dashed box
INFO_FONT = 11  # points, the two lines of facts above the panels
CHAR_WIDTH = 0.62  # a DejaVu Sans character's mean width in ems, rounded up: how many fit a line


def wrap_facts(facts: list[str], width: int, separator: str = "   |   ") -> list[str]:
    """`facts` joined by `separator` into lines of at most `width` characters, never splitting a fact (a fact
    longer than a line gets a line of its own)."""
    lines: list[str] = []
    for fact in facts:
        if lines and len(lines[-1]) + len(separator) + len(fact) <= width:
            lines[-1] += separator + fact
        else:
            lines.append(fact)
    return lines
SORT_CHUNK = 4  # images per inference step of a sort: few, so that the window keeps reacting between steps
WINDOW_SIZE = "1400x800"
TITLE = "BUSI prediction inspector"


# --------------------------------------------------------------------------------------------------------------
# The window
# --------------------------------------------------------------------------------------------------------------
class Panels:
    """The three Matplotlib panels and the facts above them, without Tk: the comparison (ground truth and prediction
    outlined or filled, the two diameters, the ultrasound region) large on the left, image and probability map
    stacked on the right. Readable: `dice`/`iou` of the shown image, `size` (its lesion's diameters),
    `info_text` (the lines of facts).

    Axes sit at fixed figure fractions (no layout engine): a constrained layout would be recomputed on every
    redraw, which costs about a third of the drawing time, and these positions do not depend on the image.
    Artists are created once and then only updated, which is far cheaper than re-plotting.
    """

    def __init__(self):
        self.dice: float | None = None
        self.iou: float | None = None
        self.info_text = ""
        self._contours: dict[str, object] = {}
        self._calipers: list = []      # the drawn diameters and their labels
        self.size: metrics.LesionSize | None = None  # of the shown prediction (mm with a spacing, else pixels)
        self.filled = False            # masks drawn filled (translucent) instead of as outlines

        self.figure = Figure(figsize=(10.5, 7.2), dpi=100)
        self.ax_overlay = self.figure.add_axes((0.01, 0.07, 0.60, 0.80))
        self.ax_image = self.figure.add_axes((0.635, 0.50, 0.28, 0.36))
        self.ax_prob = self.figure.add_axes((0.635, 0.07, 0.28, 0.36))
        for ax in (self.ax_overlay, self.ax_image, self.ax_prob):
            ax.set_anchor("N")  # images of any aspect hang from the top, right under their titles
        blank = np.zeros((2, 2), dtype=np.uint8)
        self.im_image = self.ax_image.imshow(blank, cmap="gray", vmin=0, vmax=255)
        self.im_overlay = self.ax_overlay.imshow(blank, cmap="gray", vmin=0, vmax=255)
        self.im_prob = self.ax_prob.imshow(blank.astype(np.float32), cmap="viridis", vmin=0, vmax=1)
        # An inset in axes coordinates follows the probability panel whatever aspect the image gives it.
        colourbar = self.figure.colorbar(self.im_prob, cax=self.ax_prob.inset_axes((1.03, 0.0, 0.045, 1.0)))
        colourbar.set_label("P(lesion)")
        for ax, title in ((self.ax_image, "Image"), (self.ax_overlay, "Ground truth vs prediction"),
                          (self.ax_prob, "Lesion probability")):
            ax.set_title(title, fontsize=11)
            ax.set_xticks([])
            ax.set_yticks([])
        self._legend_handles = [Line2D([], [], color=TRUTH_COLOUR, lw=2.5, label="ground truth"),
                                Line2D([], [], color=PRED_COLOUR, lw=2.5, label="prediction")]
        self.legend = self.ax_overlay.legend(handles=self._legend_handles, loc="upper center", ncol=2,
                                             bbox_to_anchor=(0.5, -0.005), frameon=False, fontsize=11)
        self.region_box = self.ax_overlay.add_patch(Rectangle((0, 0), 1, 1, fill=False, ls="--", lw=1.0,
                                                              ec=REGION_COLOUR, visible=False))
        self.suptitle = self.figure.suptitle("", fontsize=INFO_FONT, y=0.99, linespacing=1.4)
        self._facts: list[str] = []  # the shown image's name line and facts, wrapped to the figure's width

    def show(self, item: inspection.Item, image: np.ndarray, truth: np.ndarray | None,
             prediction: Prediction | None, settings: dict) -> None:
        """A new image: its panels, then its prediction at `settings["threshold"]` (`update`)."""
        h, w = image.shape
        for im, ax in ((self.im_image, self.ax_image), (self.im_overlay, self.ax_overlay)):
            im.set_data(image)
            im.set_visible(True)
            self._fit(im, ax, w, h)
        self.ax_image.set_title(f"Image ({w}\u00d7{h})", fontsize=11)
        prob = prediction.probability.astype(np.float32) if prediction is not None else np.zeros((h, w), np.float32)
        self.im_prob.set_data(prob)
        self.im_prob.set_visible(prediction is not None)  # an empty panel, not a map of zeros, without a model
        self._fit(self.im_prob, self.ax_prob, w, h)
        self.ax_prob.set_title("Lesion probability" if prediction is not None else "Lesion probability (no model)",
                               fontsize=11)
        self.set_contour("truth", truth, TRUTH_COLOUR)
        self.ax_overlay.set_title("Ground truth vs prediction" if truth is not None else "Prediction", fontsize=11)
        self._legend_handles[0].set_label("ground truth" if truth is not None else "")
        if item.region is not None:  # (x0, y0, x1, y1), ends exclusive: the pixels the model sees
            x0, y0, x1, y1 = item.region
            self.region_box.set_bounds(x0 - 0.5, y0 - 0.5, x1 - x0, y1 - y0)
        self.region_box.set_visible(item.region is not None)
        self.update(item, truth, prediction, settings)

    def update(self, item: inspection.Item, truth: np.ndarray | None, prediction: Prediction | None,
               settings: dict) -> None:
        """Outline, metrics and texts for the shown image at `settings["threshold"]` (with
        `settings["review_below"]`, the trust entry's review cut, and `settings["model"]`, whether a model is
        loaded)."""
        threshold = settings["threshold"]
        mask = prediction.mask_at(threshold) if prediction is not None else None
        self.set_contour("pred", mask, PRED_COLOUR)
        self._draw_calipers(item, mask)
        if prediction is not None and truth is not None:
            self.dice, self.iou = metrics.dice_iou(torch.from_numpy(mask), torch.from_numpy(truth))
        else:
            self.dice = self.iou = None
        texts = self.legend.get_texts()
        texts[0].set_text(self._legend_handles[0].get_label())
        for artist in (texts[0], self.legend.legend_handles[0]):  # no ground-truth entry without ground truth
            artist.set_visible(truth is not None)
        texts[1].set_text(f"prediction (p > {threshold:.2f})" if mask is not None else "prediction (no model)")
        # Two lines: what the image is, then what the model made of it.
        facts = []
        if self.dice is not None:
            facts.append(f"Dice {self.dice:.3f}   IoU {self.iou:.3f}")
        elif prediction is not None:
            facts.append("no ground truth: prediction only")
        if prediction is not None and prediction.class_probabilities is not None:
            facts.append(f"P(malignant | lesion) {prediction.malignancy_probability:.2f}   predicted class: "
                         f"{prediction.predicted_class}")
        check = contradiction(prediction.predicted_class, bool(mask.any())) if prediction is not None else ""
        if check:
            facts.append(f"{inspection.OUT_OF_RANGE_BADGE} CHECK: {check}")
        if prediction is not None and prediction.out_of_range:
            facts.append(f"{inspection.OUT_OF_RANGE_BADGE} OUT OF RANGE (familiarity {prediction.familiarity:.1f}): "
                         f"unlike the scans the model was fitted on")
        if prediction is not None and prediction.trust is not None:
            facts.append(f"trust {prediction.trust:.2f}" + (f" {inspection.REVIEW_MARK} REVIEW" + (
                "" if prediction.out_of_range else f" (below {settings['review_below']:.2f})")
                if prediction.review else ""))
        if prediction is not None and prediction.presence_probability is not None:
            facts.append(f"lesion present {prediction.presence_probability:.2f}"
                         + (" — judged lesion-free: mask emptied" if prediction.gated else
                            " — likely lesion-free (gate fitted elsewhere: mask kept)" if prediction.marked_only
                            else ""))
        if self.size is not None:
            unit = "mm" if item.spacing is not None else "px (no pixel spacing)"
            facts.append(f"diameters {self.size.longest:.1f} x {self.size.perpendicular:.1f} {unit}")
        if item.region is not None:
            facts.append("dashed box: the ultrasound region (predicted alone)")
        if not settings["model"]:
            facts.append("no model loaded: use Load checkpoint...")
        self._facts = [f"{item.name}   \u2014   class: {item.label or 'unknown (no ground truth)'}", *facts]
        self.wrap()

    def wrap(self) -> None:
        """The name line, then the facts wrapped to the figure's present width (never cut off at its edges)."""
        if not self._facts:
            return
        width_px = self.figure.get_figwidth() * self.figure.dpi
        chars = max(40, int(width_px * 0.96 / (CHAR_WIDTH * INFO_FONT * self.figure.dpi / 72)))
        lines = [self._facts[0], *wrap_facts(self._facts[1:], chars)]
        self.info_text = "\n".join(lines)
        self.suptitle.set_text(self.info_text)
        # the panels start below the facts and the panel titles: more lines, lower panels
        height_px = self.figure.get_figheight() * self.figure.dpi
        above = (len(lines) * 1.4 * INFO_FONT + 1.7 * 11) * self.figure.dpi / 72 + 10
        top = min(0.87, 1 - above / height_px)
        half = (top - 0.14) / 2  # the right column: image above, probability below, a title's gap between
        self.ax_overlay.set_position((0.01, 0.07, 0.60, top - 0.07))
        self.ax_image.set_position((0.635, 0.14 + half, 0.28, half))
        self.ax_prob.set_position((0.635, 0.07, 0.28, half))

    def _draw_calipers(self, item: inspection.Item, mask: np.ndarray | None) -> None:
        """The longest diameter of the predicted lesion and the longest one perpendicular to it, with their
        lengths: in mm where the file records its pixel spacing, else in pixels."""
        for artist in self._calipers:
            artist.remove()
        self._calipers = []
        self.size = None if mask is None else metrics.lesion_size(mask, item.spacing or (1.0, 1.0))
        if self.size is None:
            return
        unit = "mm" if item.spacing is not None else "px"
        for (a, b), length in ((self.size.longest_line, self.size.longest),
                               (self.size.perpendicular_line, self.size.perpendicular)):
            line, = self.ax_overlay.plot([a[0], b[0]], [a[1], b[1]], color=CALIPER_COLOUR, lw=1.2, marker="+",
                                         markersize=9)
            label = self.ax_overlay.annotate(f"{length:.1f} {unit}", b, xytext=(4, 4), textcoords="offset points",
                                             color=CALIPER_COLOUR, fontsize=9,
                                             bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
            self._calipers += [line, label]

    def set_contour(self, key: str, mask: np.ndarray | None, colour: str) -> None:
        """Replace one outline. The mask is padded with background so a lesion touching the border (or a
        mask that is all lesion) still gets a closed outline instead of a 'no contour levels' warning."""
        old = self._contours.pop(key, None)
        if old is not None:
            old.remove()
        if mask is None or not mask.any():
            return
        h, w = mask.shape
        padded = np.pad(mask, 1).astype(np.uint8)
        grid = (np.arange(-1, w + 1), np.arange(-1, h + 1), padded)
        if self.filled:
            self._contours[key] = self.ax_overlay.contourf(*grid, levels=[0.5, 1.5], colors=[colour], alpha=0.35)
        else:
            self._contours[key] = self.ax_overlay.contour(*grid, levels=[0.5], colors=colour, linewidths=1.6)

    @staticmethod
    def _fit(im, ax, w: int, h: int) -> None:
        im.set_extent((-0.5, w - 0.5, h - 0.5, -0.5))
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)

    def empty(self, message: str) -> None:
        blank = np.zeros((2, 2), dtype=np.uint8)
        for im, ax in ((self.im_image, self.ax_image), (self.im_overlay, self.ax_overlay),
                       (self.im_prob, self.ax_prob)):
            im.set_data(blank)
            im.set_visible(False)
            self._fit(im, ax, 2, 2)
        for key in list(self._contours):
            self.set_contour(key, None, "")
        for artist in self._calipers:
            artist.remove()
        self._calipers, self.size, self._facts = [], None, []
        self.region_box.set_visible(False)
        self.dice = self.iou = None
        self.info_text = message
        self.suptitle.set_text(message)


class InspectorApp:
    """Tk window: image list on the left, three Matplotlib panels on the right, controls above, status below.

    State the tests (and the user) can read: `index` (position in the shown list), `current` (the Item),
    `listbox_entries()`, `status`, `browser` (inspection.Browser: the items, the list's order, the predictions
    per Item.key, the threshold) and `panels` (Panels: the figure, and `dice`/`iou` of the shown image at the
    threshold, None without ground truth). Errors go through `show_error` (a dialog), never a traceback.
    """

    def __init__(self, root: tk.Tk, checkpoint: str | os.PathLike | None = None, items: list[inspection.Item] = (),
                 device: torch.device | str = "cpu", source: str = "", backend: str = "auto", gate: str = "auto"):
        self.root = root
        self.device = torch.device(device)
        self.backend = backend  # onnx_backend.load's: what runs the model
        self.gate = gate  # trust.gate_applies's mode: where the "no lesion" gate empties a mask
        self.source = source
        self.loaded: checkpoints.LoadedModel | None = None  # the model with its input size, threshold and trust
        self.checkpoint: Path | None = None
        self.browser = inspection.Browser(items)  # the list, its order and the cached predictions (no Tk)
        self.index = -1                # position in browser.visible of the shown image
        self.busy = False              # a background sort is running
        self._after: str | None = None  # its next scheduled step
        self.last_show_seconds = 0.0   # load + inference (if not cached) + panel update of the last shown image
        self._shown: tuple[inspection.Item, np.ndarray, np.ndarray | None] | None = None  # what the panels show now
        self._generation = 0           # bumped per loaded model, so a running sort notices a model change

        root.title(TITLE)
        root.geometry(WINDOW_SIZE)
        root.minsize(900, 560)
        self._build_controls()
        self.panels = Panels()
        self.canvas = FigureCanvasTkAgg(self.panels.figure, master=self.figure_frame)
        # a resized window wraps the facts again (after the canvas has resized the figure)
        self.canvas.get_tk_widget().bind("<Configure>", lambda _e: self.panels.wrap(), add="+")
        # Matplotlib's own toolbar: zoom and pan (a new image resets the view), home, save
        self.toolbar = NavigationToolbar2Tk(self.canvas, self.figure_frame, pack_toolbar=False)
        self.toolbar.update()
        self.toolbar.pack(side=tk.BOTTOM, fill=tk.X)
        self.canvas.get_tk_widget().pack(fill=tk.BOTH, expand=True)
        root.protocol("WM_DELETE_WINDOW", self.close)
        self.set_status(source or "no images: use Open image...")
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
        self._refresh_list()
        if self.browser.visible:
            self.select(0)
        else:
            self._show_current()

    # ---------------------------------------------------------------------------------------------- widgets
    def _build_controls(self) -> None:
        bar = ttk.Frame(self.root, padding=(6, 4))
        bar.pack(side=tk.TOP, fill=tk.X)
        ttk.Button(bar, text="Load checkpoint...", command=self._ask_checkpoint).pack(side=tk.LEFT)
        ttk.Button(bar, text="Open image...", command=self._ask_images).pack(side=tk.LEFT, padx=(4, 0))
        ttk.Button(bar, text="Save figure...", command=self._ask_save).pack(side=tk.LEFT, padx=(4, 12))
        ttk.Label(bar, text="Class:").pack(side=tk.LEFT)
        self.filter_var = tk.StringVar(value="all")
        combo = ttk.Combobox(bar, textvariable=self.filter_var, values=inspection.CLASS_FILTERS, state="readonly",
                             width=10)
        combo.bind("<<ComboboxSelected>>", lambda _e: self.filter_class(self.filter_var.get()))
        combo.pack(side=tk.LEFT, padx=(2, 6))
        ttk.Button(bar, text="Sort by Dice", command=self.sort_by_dice).pack(side=tk.LEFT)
        ttk.Button(bar, text="Sort by trust", command=self.sort_by_trust).pack(side=tk.LEFT,
                                                                                              padx=(4, 0))
        ttk.Button(bar, text="Sort by name", command=self.sort_by_name).pack(side=tk.LEFT, padx=(4, 12))
        ttk.Button(bar, text="\u25c0 Prev", command=self.prev).pack(side=tk.LEFT)
        ttk.Button(bar, text="Next \u25b6", command=self.next).pack(side=tk.LEFT, padx=(4, 12))
        self.filled_var = tk.BooleanVar(value=False)
        ttk.Checkbutton(bar, text="Filled", variable=self.filled_var,
                        command=lambda: self.set_filled(self.filled_var.get())).pack(side=tk.LEFT, padx=(0, 12))
        ttk.Label(bar, text="Threshold:").pack(side=tk.LEFT)
        self.threshold_var = tk.DoubleVar(value=self.browser.threshold)
        self.scale = tk.Scale(bar, from_=0.01, to=0.99, resolution=0.01, orient=tk.HORIZONTAL, length=200,
                              variable=self.threshold_var, command=self._on_scale, showvalue=True)
        self.scale.pack(side=tk.LEFT)

        status = ttk.Frame(self.root, padding=(6, 2))
        status.pack(side=tk.BOTTOM, fill=tk.X)
        self.status_var = tk.StringVar()
        ttk.Label(status, textvariable=self.status_var, anchor=tk.W).pack(side=tk.LEFT, fill=tk.X, expand=True)
        self.progress = ttk.Progressbar(status, length=180, mode="determinate")
        self.progress.pack(side=tk.RIGHT)

        body = ttk.Frame(self.root)
        body.pack(side=tk.TOP, fill=tk.BOTH, expand=True)
        left = ttk.Frame(body, padding=(6, 0, 0, 6), width=330)  # Dice, trust, flag, name
        left.pack(side=tk.LEFT, fill=tk.Y)
        left.pack_propagate(False)  # a fixed width: a long title or file name must not squeeze the figure
        self.list_title = tk.StringVar(value="Images")
        ttk.Label(left, textvariable=self.list_title, wraplength=320, justify=tk.LEFT).pack(side=tk.TOP,
                                                                                          anchor=tk.W)
        scroll = ttk.Scrollbar(left, orient=tk.VERTICAL)
        self.listbox = tk.Listbox(left, width=26, exportselection=False, activestyle="none",
                                  yscrollcommand=scroll.set, font=("TkFixedFont", 10))
        scroll.config(command=self.listbox.yview)
        scroll.pack(side=tk.RIGHT, fill=tk.Y)
        self.listbox.pack(side=tk.LEFT, fill=tk.BOTH, expand=True)
        self.listbox.bind("<<ListboxSelect>>", self._on_list_select)
        self.path_var = tk.StringVar()  # the shown image's full path, under the list
        ttk.Label(left, textvariable=self.path_var, wraplength=320, justify=tk.LEFT,
                  font=("TkSmallCaptionFont",)).pack(side=tk.BOTTOM, anchor=tk.W, before=scroll)
        self.figure_frame = ttk.Frame(body)
        self.figure_frame.pack(side=tk.LEFT, fill=tk.BOTH, expand=True)

        # Left/Right on the whole window, except where they already mean something (see _on_arrow).
        self.root.bind("<Left>", lambda e: self._on_arrow(e, self.prev))
        self.root.bind("<Right>", lambda e: self._on_arrow(e, self.next))

    # ------------------------------------------------------------------------------------------- readable state
    @property
    def current(self) -> inspection.Item | None:
        return self.browser.items[self.browser.visible[self.index]] if 0 <= self.index < len(self.browser.visible) else None

    @property
    def status(self) -> str:
        return self.status_var.get()

    def listbox_entries(self) -> list[str]:
        return list(self.listbox.get(0, tk.END))

    @property
    def model(self):
        """The loaded model (None before one is loaded)."""
        return None if self.loaded is None else self.loaded.model

    @property
    def trust_entry(self) -> dict | None:
        """The checkpoint's trust entry (None: no model, or scores unavailable)."""
        return None if self.loaded is None else self.loaded.trust

    def set_status(self, text: str) -> None:
        self.status_var.set(text)

    def show_error(self, message: str) -> None:
        """The one place errors reach the user (tests replace it to collect messages instead of a dialog)."""
        self.set_status(f"error: {message.splitlines()[0]}")
        messagebox.showerror(TITLE, message, parent=self.root)

    # ------------------------------------------------------------------------------------------------ actions
    def load_checkpoint(self, path: str | os.PathLike) -> bool:
        """Use another model; a bad file leaves the current one (or none) in place and shows why."""
        try:
            loaded = onnx_backend.load(path, self.device, self.backend)
        except checkpoints.CheckpointError as exc:
            self.show_error(utils.printable(exc))
            return False
        except (RuntimeError, ValueError, OSError) as exc:  # e.g. out of memory on the device
            self.show_error(f"cannot load checkpoint {path}: {exc}")
            return False
        self.loaded, self.checkpoint = loaded, Path(path)
        self.browser.forget()
        self._generation += 1
        self.set_threshold(loaded.threshold, redraw=False)
        self.set_status(f"model {self.checkpoint.name}: {unet.describe(loaded.model.config)}, {loaded.image_size}px"
                        + (f" | {self.source}" if self.source else "") + (" | no trust scores" if loaded.why_no_trust else ""))
        if self.browser.sort_mode != "name":  # the old order was this model's, not the new one's
            self.sort_by_name()
        elif self.current is not None:
            self._show_current()
        return True

    def open_images(self, paths) -> int:
        """Add image files (no ground truth: prediction only) to the list and show the first; returns how many.

        Unreadable files are reported in one dialog and left out; the others still open.
        """
        errors, added = [], []
        for path in paths:
            try:
                items = inspection.file_items(Path(path), check=True)
                item = items[0]
                image, _ = item.load()
            except utils.DataError as exc:
                errors.append(utils.printable(exc))
                continue
            self.browser.items += items
            added.append(len(self.browser.items) - len(items))
            if len(added) == 1:
                self._shown = (item, image, None)  # it is shown next: spare the display a second decode
        if added:
            self.filter_class("all", show=False)  # opened images have no class: only "all" lists them
            self.select(self.browser.visible.index(added[0]))
            self.set_status(f"opened {len(added)} image(s) without ground truth: prediction only")
        if errors:
            self.show_error("\n".join(errors))
        return len(added)

    def select(self, position: int) -> None:
        """Show the image at `position` of the list (clamped)."""
        if not self.browser.visible:
            return
        self.index = max(0, min(int(position), len(self.browser.visible) - 1))
        self.listbox.selection_clear(0, tk.END)
        self.listbox.selection_set(self.index)
        self.listbox.activate(self.index)
        self.listbox.see(self.index)
        self._show_current()

    def next(self) -> None:
        if self.index < len(self.browser.visible) - 1:
            self.select(self.index + 1)
        elif self.browser.visible:
            self.set_status("last image of the list")

    def prev(self) -> None:
        if self.index > 0:
            self.select(self.index - 1)
        elif self.browser.visible:
            self.set_status("first image of the list")

    def set_threshold(self, value: float, redraw: bool = True) -> None:
        """Re-threshold the cached probability map: new outline, Dice and IoU, no new inference."""
        value = round(min(max(float(value), 0.01), 0.99), 2)
        self.browser.threshold = value
        if abs(self.threshold_var.get() - value) > 1e-9:
            self.threshold_var.set(value)
        if redraw and self._shown is not None:
            self._update_prediction()
            for i in self.browser.visible:  # every listed Dice is at the new threshold (the order stays until a new sort)
                self._relabel(self.browser.items[i])
            if self.status.startswith(("sorted ", "threshold ")):  # its figures were at the old threshold
                self.set_status(f"threshold {value:.2f}{self.browser.summary()} (list order: the last sort's)")
            self.canvas.draw_idle()

    def set_filled(self, filled: bool) -> None:
        """Draw ground truth and prediction as translucent filled areas (True) or as outlines (False)."""
        self.panels.filled = bool(filled)
        self.filled_var.set(self.panels.filled)
        if self._shown is not None:
            self.panels.set_contour("truth", self._shown[2], TRUTH_COLOUR)
            self._update_prediction()
            self.canvas.draw_idle()

    def filter_class(self, name: str, show: bool = True) -> None:
        """List only one class (benign/malignant/normal) or all images; keeps the current image when listed."""
        if name not in inspection.CLASS_FILTERS:
            raise ValueError(f"unknown class filter {name!r} (choose from {', '.join(inspection.CLASS_FILTERS)})")
        self.browser.class_filter = name
        self.filter_var.set(name)
        keep = self.current
        self._refresh_list()
        if not show:
            return
        if keep is not None and self.browser.items.index(keep) in self.browser.visible:
            self.select(self.browser.visible.index(self.browser.items.index(keep)))
        elif self.browser.visible:
            self.select(0)
        else:
            self.index = -1
            self._show_current()

    def sort_by_name(self) -> None:
        self.browser.sort_mode = "name"
        self.filter_class(self.browser.class_filter)

    def sort_by_dice(self, background: bool = True) -> None:
        """Order the list by Dice at the current threshold, worst first (images without truth last).

        Missing predictions are computed in chunks; in the background (the button) the window keeps reacting
        between chunks and the status bar counts up; `background=False` finishes before returning.
        """
        self._sort("dice", background)

    def sort_by_trust(self, background: bool = True) -> None:
        """Order the list by trust, lowest first: the scans to look at first (without trust scores: an error)."""
        if self.model is not None and self.trust_entry is None:
            self.show_error(f"{self.checkpoint.name} has no trust statistics: add them with fit_trust.py (see "
                            f"docs/prediction.md)")
            return
        self._sort("trust", background)

    def _sort(self, mode: str, background: bool) -> None:
        if self.model is None:
            self.show_error("no model loaded: use Load checkpoint... first")
            return
        if self.busy:
            return
        todo = self.browser.unpredicted(mode)
        generation = self._generation
        steps = self._predict_chunks(todo)
        if not background:
            for _ in steps:
                pass
            self._finish_sort(mode)
            return
        self.busy = True

        def step():
            if not self.busy:
                return  # the window was closed
            try:
                next(steps)
            except StopIteration:
                self.busy = False
                if generation != self._generation:
                    self.set_status("sorting stopped: another model was loaded")
                else:
                    self._finish_sort(mode)
                return
            self._after = self.root.after(1, step)

        self._after = self.root.after(1, step)

    def save_figure(self, path: str | os.PathLike) -> bool:
        try:
            self.panels.figure.savefig(path, dpi=self.panels.figure.dpi)
        except (OSError, ValueError) as exc:  # unwritable folder, unknown extension
            self.show_error(f"cannot save the figure to {path}: {exc}")
            return False
        self.set_status(f"saved {path}")
        return True

    def close(self) -> None:
        """Stop a background sort and close the window."""
        self.busy = False
        if self._after is not None:
            self.root.after_cancel(self._after)
        self.root.destroy()

    # ------------------------------------------------------------------------------------------ event handlers
    def _on_list_select(self, _event) -> None:
        selection = self.listbox.curselection()
        if selection and selection[0] != self.index:
            self.select(selection[0])

    def _on_arrow(self, event, action) -> None:
        if isinstance(event.widget, (tk.Scale, ttk.Combobox)):
            return  # the slider and the class menu use the arrow keys themselves
        action()

    def _on_scale(self, value: str) -> None:
        if abs(float(value) - self.browser.threshold) > 1e-9:
            self.set_threshold(float(value))

    def _ask_checkpoint(self) -> None:
        path = filedialog.askopenfilename(parent=self.root, title="Load checkpoint",
                                          filetypes=[("PyTorch checkpoint", "*.pt *.pth"), ("ONNX export", "*.onnx"),
                                                     ("All files", "*")])
        if path:
            self.load_checkpoint(path)

    def _ask_images(self) -> None:
        patterns = " ".join(f"*{e} *{e.upper()}" for e in utils.IMAGE_EXTENSIONS + dicom_io.DICOM_EXTENSIONS)
        paths = filedialog.askopenfilenames(parent=self.root, title="Open images",  # DICOM files often have no
                                            filetypes=[("Scans: images and DICOM (all files)", "*"),  # extension
                                                       ("Images and DICOM by extension", patterns)])
        if paths:
            self.open_images(paths)

    def _ask_save(self) -> None:
        stem = Path(self.current.name).stem if self.current else "busi"
        path = filedialog.asksaveasfilename(parent=self.root, title="Save figure", defaultextension=".png",
                                            initialfile=f"{stem}_inspect.png",
                                            filetypes=[("PNG", "*.png"), ("PDF", "*.pdf"), ("SVG", "*.svg")])
        if path:
            self.save_figure(path)

    # ------------------------------------------------------------------------------------------------ workers
    def _predict(self, items: list[inspection.Item], loaded: list[tuple[np.ndarray, np.ndarray | None]]) -> None:
        """Run the model once over `items` (already decoded) and cache the results."""
        scans = [dicom_io.Scan(image, item.region) for item, (image, _) in zip(items, loaded)]
        outputs = predict_scans(self.loaded.at_threshold(self.browser.threshold), scans, self.device,
                                utils.inference_dtype(self.device), SORT_CHUNK, gate_mode=self.gate)
        for item, (_, truth), out in zip(items, loaded, outputs):
            self.browser.store(item, dataclasses.replace(out, probability=out.probability.astype(np.float16)), truth)
            self._relabel(item)

    def _predict_chunks(self, todo: list[int]):
        """Generator: predict `todo` (item indices) SORT_CHUNK at a time, reporting progress after each chunk."""
        generation, failed = self._generation, []
        self.progress.configure(maximum=max(1, len(todo)), value=0)
        for start in range(0, len(todo), SORT_CHUNK):
            if generation != self._generation:
                return  # another model was loaded meanwhile: its predictions will be made on demand
            items, loaded = [], []
            for i in todo[start:start + SORT_CHUNK]:
                try:
                    loaded.append(self.browser.items[i].load())
                    items.append(self.browser.items[i])
                except utils.DataError as exc:
                    failed.append(utils.printable(exc))
            if items:
                self._predict(items, loaded)
            done = min(start + SORT_CHUNK, len(todo))
            self.progress.configure(value=done)
            self.set_status(f"predicting {done}/{len(todo)} images to sort them...")
            self.root.update_idletasks()
            yield
        self.progress.configure(value=0)
        if failed:
            self.show_error(f"{len(failed)} image(s) could not be read and are listed last:\n" + "\n".join(failed))

    def _finish_sort(self, mode: str) -> None:
        self.browser.sort_mode = mode
        self.filter_class(self.browser.class_filter, show=False)
        self.select(0)  # the top of the new order: the worst Dice, or the lowest trust
        order = f"Dice at threshold {self.browser.threshold:.2f}, worst" if mode == "dice" else "trust, lowest"
        flagged = self.browser.flagged()
        self.set_status(f"sorted {len(self.browser.visible)} images by {order} first{self.browser.summary()}"
                        + (f" | {flagged} flagged for review" if self.trust_entry is not None else ""))

    def _refresh_list(self) -> None:
        """Rebuild `visible` and the Listbox from the filter and the sort order."""
        visible = self.browser.arrange()
        self.listbox.delete(0, tk.END)
        for i in visible:
            self.listbox.insert(tk.END, self.browser.entry(i))
        self.list_title.set(self.browser.title())
        if self.index >= len(visible):
            self.index = len(visible) - 1

    def _relabel(self, item: inspection.Item) -> None:
        """Refresh the list line of `item` (newly predicted, or a new threshold)."""
        index = self.browser.items.index(item)
        if index in self.browser.visible:
            row = self.browser.visible.index(index)
            selected = row in self.listbox.curselection()
            self.listbox.delete(row)
            self.listbox.insert(row, self.browser.entry(index))
            if selected:
                self.listbox.selection_set(row)

    # ------------------------------------------------------------------------------------------------ drawing

    def _show_current(self) -> None:
        """Load (or reuse) the current image, predict it unless cached, and update every panel."""
        start = time.perf_counter()
        item = self.current
        if item is None:
            self._shown = None
            self._draw_empty("No image: pick one from the list or use Open image...")
            return
        if self._shown is not None and self._shown[0] is item:
            image, truth = self._shown[1], self._shown[2]
        else:
            try:
                image, truth = item.load()
            except utils.DataError as exc:
                self._shown = None
                self._draw_empty(f"cannot read {item.name}")
                self.show_error(utils.printable(exc))
                return
        self._shown = (item, image, truth)
        self.path_var.set(utils.printable(item.path))
        if self.model is not None and item.key not in self.browser.cache:
            self._predict([item], [(image, truth)])
        self.panels.show(item, image, truth, self.browser.cache.get(item.key), self._panel_settings())
        self.toolbar.update()  # a new image: zoom and pan start from its full view
        self.canvas.draw_idle()
        self.last_show_seconds = time.perf_counter() - start

    def _panel_settings(self) -> dict:
        """What the panels need beside the image: the threshold, the review cut, whether a model is loaded."""
        return {"threshold": self.browser.threshold, "model": self.model is not None,
                "review_below": (self.trust_entry or {}).get("review_below")}

    def _update_prediction(self) -> None:
        item, _, truth = self._shown
        self.panels.update(item, truth, self.browser.cache.get(item.key), self._panel_settings())

    def _draw_empty(self, message: str) -> None:
        self.panels.empty(message)
        self.path_var.set("")
        self.canvas.draw_idle()

# --------------------------------------------------------------------------------------------------------------
# The command (its parser is at the top)
# --------------------------------------------------------------------------------------------------------------
def resolve_items(args) -> tuple[list[inspection.Item], str, str | None]:
    """(items, a note on their source, an error message or None) from the command line."""
    if args.images:
        items = [item for p in args.images for item in inspection.file_items(Path(p))]
        return items, f"{len(args.images)} image(s) from the command line", None
    data_dir = dataset.resolve_data_dir(args.data_dir, announce=False)
    try:
        items, note = inspection.dataset_items(data_dir, args.split, args.split_file)
    except (utils.DataError, ValueError) as exc:  # the window still opens: images can be opened from it
        return [], "no data", (f"{utils.printable(exc)}\n\nScans without ground truth are opened as images: "
                               f"'Open images...', or list them after the command")
    if data_dir == dataset.SAMPLE_DIR:
        note += " (bundled sample: a handful of images, pass --data-dir for BUSI)"
    return items, note, None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = utils.pick_device(args.device)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    items, note, error = resolve_items(args)
    try:
        root = tk.Tk()
    except tk.TclError as exc:
        print(f"error: cannot open a window ({exc}); a display (X server) is needed", file=sys.stderr)
        return 2
    app = InspectorApp(root, args.checkpoint, items, device, source=note, backend=args.backend, gate=args.gate)
    if error:
        app.show_error(error)
    root.mainloop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
