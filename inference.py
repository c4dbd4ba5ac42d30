"""Batched inference, shared by evaluation, predict_busi.py and the GUI: uint8 images in, probability maps at
each image's own size and class probabilities out (`predict_scans`: the same for scans whose ultrasound region
alone is predicted); and `Predictor`, the same for one scan from Python."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import checkpoints
import dataset
import dicom_io
import metrics
import onnx_backend
import trust
import utils
from augment import to_unit_float
from unet import deepest_layer
from utils import autocast


NO_SPACING_ARRAY = "none: an array records no pixel spacing (pixel_spacing=MM gives it)"


@torch.inference_mode()
def predict_batches(model: torch.nn.Module, images: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None,
                    batch_size: int = 32, tta: bool = False, with_logits: bool = False,
                    with_aux: bool = False, with_trust: bool = False):
    """Yield (probabilities float32 [b,1,S,S] on `device`, class probabilities [b,C] or None) per batch.

    `images` are uint8 [N,1,S,S] on any device. `tta` averages with the left-right flipped prediction.
    `with_logits` adds an item, the model's raw outputs for the unflipped input (mask logits, class logits
    or None[, deep-supervision logits when `with_aux`]), so a caller can compute a loss from the same forward
    pass. `with_trust` runs the flipped twin too and adds a last item, what `trust.image_features` reads:
    {"seg", "cls": the unflipped pass's probabilities, "flipped": the twin's, flipped back, "deep": the pooled
    deepest features [b,C]}.
    """
    model.eval()
    deep: list[torch.Tensor] = []
    hook = deepest_layer(model).register_forward_pre_hook(lambda _, args: deep.append(args[0].float().mean((2, 3)))) \
        if with_trust else None
    try:
        for start in range(0, images.shape[0], batch_size):
            x = to_unit_float(images[start:start + batch_size].to(device, non_blocking=True))
            x = x.contiguous(memory_format=torch.channels_last)
            deep.clear()
            extras = None
            with autocast(device, dtype):
                outputs = model(x, with_aux=True) if with_aux else model(x)
                seg_logits, cls_logits = outputs[:2]
                seg = torch.sigmoid(seg_logits.float())
                cls = None if cls_logits is None else torch.softmax(cls_logits.float(), 1)
                if tta or with_trust:
                    seg_f, cls_f = model(torch.flip(x, dims=[3]))
                    flipped = torch.sigmoid(torch.flip(seg_f, dims=[3]).float())
                    if with_trust:
                        extras = {"seg": seg, "cls": cls, "flipped": flipped, "deep": deep[0]}
                    if tta:
                        seg = (seg + flipped) / 2
                        cls = None if cls is None else (cls + torch.softmax(cls_f.float(), 1)) / 2
            yield (seg, cls) + ((outputs,) if with_logits else ()) + ((extras,) if with_trust else ())
    finally:
        if hook is not None:
            hook.remove()


def trust_of(extras: dict, fitted: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(trust [b], presence probability [b] or None, gate [b] bool) of one batch from `predict_batches(...,
    with_trust=True)`'s last item: the trust score at the mask threshold it was fitted at (the outline it
    describes, emptied where the "no lesion" gate says so), the probability that a lesion is present and which
    masks the gate empties (none without a fitted gate)."""
    presence = fitted.get("presence")
    present = None if presence is None else trust.presence_probability(
        trust.presence_inputs(extras["seg"], extras["cls"]), presence)
    gate = trust.gated(extras["seg"].new_zeros(extras["seg"].shape[0]) if present is None else present, presence)
    scores = trust.score(trust.image_features(extras["seg"], extras["flipped"], extras["cls"], extras["deep"],
                                              fitted["threshold"], fitted["statistics"], gate), fitted)
    return scores, present, gate


def probs_to_original(prob: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[1,S,S] probability map -> [H,W] at the image's own size (bilinear)."""
    return F.interpolate(prob[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def predict_images(model, images: list[np.ndarray], image_size: int, device: torch.device,
                   dtype: torch.dtype | None = None, batch_size: int = 16, tta: bool = False,
                   fitted_trust: dict | None = None):
    """Yield (probability map [H,W] float32 on the CPU at each image's own size, class probabilities [3] or None,
    trust score or None, presence probability or None, gated) per image; `gated`: the "no lesion" gate empties
    this scan's mask (its probability map is left as the model gave it).

    `images` are grey uint8 HxW arrays of any size; they are squashed to the model's square input as in training.
    `fitted_trust` (a checkpoint's "trust" entry) adds the trust score (one more, flipped, pass) and calibrates
    the class probabilities.
    """
    if not images:
        return
    batch = torch.from_numpy(np.stack([dataset.resize_image(img, image_size) for img in images]))[:, None]
    i = 0
    for probs, cls, *extras in predict_batches(model, batch, device, dtype, batch_size, tta,
                                               with_trust=fitted_trust is not None):
        scores, present, gate = trust_of(extras[0], fitted_trust) if extras else (None, None, None)
        cls = None if cls is None else trust.calibrated(cls, fitted_trust)
        for j in range(probs.shape[0]):
            h, w = images[i].shape
            prob = probs_to_original(probs[j], h, w).cpu()
            yield (prob, (None if cls is None else cls[j].float().cpu()), (None if scores is None else float(scores[j])),
                   None if present is None else float(present[j]), bool(gate is not None and gate[j]))
            i += 1


def predict_scans(model, scans: list[dicom_io.Scan], image_size: int, device: torch.device,
                  dtype: torch.dtype | None = None, batch_size: int = 16, tta: bool = False,
                  fitted_trust: dict | None = None):
    """`predict_images` for scans: each one's ultrasound region alone is predicted (the scanner's text and colour
    bar never reach the model), and its probability map is placed back in the whole frame (0 outside it)."""
    outputs = predict_images(model, [s.model_input() for s in scans], image_size, device, dtype, batch_size, tta,
                             fitted_trust)
    for scan, (prob, *rest) in zip(scans, outputs):
        yield (prob if scan.region is None else torch.from_numpy(scan.full_frame(prob.numpy())), *rest)


# --------------------------------------------------------------------------------------------------------------
# The Python API: a loaded model that predicts scans
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """One scan's prediction, at the scan's own size as displayed."""

    probability: np.ndarray  # float32 HxW: lesion probability of each pixel
    mask: np.ndarray  # bool HxW: probability above the threshold
    class_probabilities: dict[str, float] | None  # benign / malignant / normal (class head), None without one
    trust: float | None = None  # fitted probability that the outline is right (trust.py); None: not available
    review: bool | None = None  # trust below the checkpoint's review threshold: look at this one first
    presence_probability: float | None = None  # fitted probability that a lesion is present; None: no gate
    gated: bool = False  # the "no lesion" gate judged the scan lesion-free and emptied its mask
    spacing_mm: tuple[float, float] | None = None  # (x, y) size of a pixel in mm; None: unknown
    spacing_source: str = ""  # where the spacing comes from, or "none: why"
    region: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) of a DICOM's ultrasound region, predicted
    frame: int | None = None  # the frame of a multi-frame DICOM file

    @property
    def size_mm(self) -> metrics.LesionSize | None:
        """Area (mm^2), longest diameter and the longest one perpendicular to it (mm) of the mask; None without a
        spacing or for an empty mask."""
        return None if self.spacing_mm is None else metrics.lesion_size(self.mask, self.spacing_mm)

    @property
    def malignancy_probability(self) -> float | None:
        """P(malignant) / (P(benign) + P(malignant)): the class head's malignant-vs-benign score."""
        if self.class_probabilities is None:
            return None
        return float(metrics.malignancy_probability(torch.tensor([self.class_probabilities[c]
                                                                  for c in dataset.CLASSES])))


class Predictor:
    """A trained model ready to predict, for notebooks and scripts (research use only):

        from inference import Predictor
        predictor = Predictor()                     # the shipped model on the CPU (or Predictor("run/best.pt"))
        result = predictor("scan.png")              # a file, or an image array (grey or RGB; as a file reads)
        result.mask, result.probability, result.malignancy_probability, result.trust, result.review,
        result.presence_probability, result.gated   # the "no lesion" gate: the mask emptied
        result = predictor("cine.dcm", frame=3)     # a DICOM file (a frame of a cine loop); sizes in mm:
        result.size_mm.longest, result.size_mm.perpendicular, result.size_mm.area, result.spacing_source

    `backend`: "auto" (onnxruntime on the CPU where it is installed, else torch), "torch" or "onnx"
    (onnx_backend.load); `checkpoint` may also be an ONNX export (.onnx).
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, device: str = "cpu",
                 threshold: float | None = None, tta: bool = False, backend: str = "auto"):
        if threshold is not None and not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
            raise ValueError(f"threshold must be strictly between 0 and 1, got {threshold!r}")
        self.device = utils.pick_device(device)  # the tools' check: an unknown or missing device is one line
        self.model, state = onnx_backend.load(checkpoint or checkpoints.DEFAULT_CHECKPOINT, self.device, backend)
        config = state.get("config") or {}
        self.image_size = int(config.get("image_size", 256))
        self.threshold = float(threshold if threshold is not None else config.get("threshold", 0.5))
        self.tta = tta
        self.fitted_trust, self.why_no_trust = checkpoints.fitted_trust(state)

    def __call__(self, image: str | os.PathLike | np.ndarray, frame: int | None = None,
                 pixel_spacing: float | None = None) -> Prediction:
        """`image`: an image or DICOM file (`frame`, 1-based, picks a frame of a multi-frame one; needed there) or
        an array; `pixel_spacing` (mm per pixel) where the file records none. dataset.DataError for a file that
        cannot be read, ValueError for a bad array or value."""
        if pixel_spacing is not None and (isinstance(pixel_spacing, bool) or not isinstance(pixel_spacing, (int, float))
                                          or not 0 < pixel_spacing < math.inf):
            raise ValueError(f"pixel_spacing must be a positive number of mm, got {pixel_spacing!r}")
        if isinstance(image, (str, os.PathLike)):
            scan = dicom_io.load_scan(Path(image), frame, pixel_spacing)
        else:  # converted as the file loader converts the same pixels, or refused (ValueError)
            scan = dicom_io.with_spacing(dicom_io.Scan(dataset.grey_from_array(image), spacing_source=NO_SPACING_ARRAY),
                                         pixel_spacing)
        prob, cls, score, present, gate = next(predict_scans(self.model, [scan], self.image_size, self.device,
                                                             tta=self.tta, fitted_trust=self.fitted_trust))
        prob = prob.numpy()
        classes = None if cls is None else dict(zip(dataset.CLASSES, map(float, cls.tolist())))
        review = None if score is None else score < self.fitted_trust["review_below"]
        return Prediction(prob, (prob > self.threshold) & (not gate), classes, score, review, present, gate,
                          scan.spacing, scan.spacing_source, scan.region, scan.frame)
