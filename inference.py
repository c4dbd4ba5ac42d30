"""Batched inference, shared by evaluation, predict_busi.py and the GUI: uint8 images in, probability maps at
each image's own size and class probabilities out (`predict_scans`: the same for scans whose ultrasound region
alone is predicted); and `Predictor`, the same for one scan from Python."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import checkpoints
import dicom_io
import image_io
import metrics
import onnx_backend
import trust
import utils
from augment import to_unit_float
from unet import deepest_layer, texture_layer
from utils import autocast


NO_SPACING_ARRAY = "none: an array records no pixel spacing (pixel_spacing=MM gives it)"


class Batch(NamedTuple):
    """One batch from `predict_batches` (on the device)."""
    seg: torch.Tensor  # float32 [b,1,S,S] lesion probabilities
    cls: torch.Tensor | None  # [b,C] class probabilities; None without a class head
    logits: tuple | None = None  # with_logits: the model's raw outputs for the unflipped input
    extras: dict | None = None  # with_trust: what trust.image_features reads (predict_batches)


@torch.inference_mode()
def predict_batches(model: torch.nn.Module, images: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None,
                    batch_size: int = 32, tta: bool = False, with_logits: bool = False,
                    with_aux: bool = False, with_trust: bool = False, flipped_twin: bool = True):
    """Yield a `Batch` per batch: probabilities float32 [b,1,S,S] on `device`, class probabilities [b,C] or None.

    `images` are uint8 [N,1,S,S] on any device. `tta` averages with the left-right flipped prediction.
    `with_logits` fills `logits`, the model's raw outputs for the unflipped input (mask logits, class logits
    or None[, deep-supervision logits when `with_aux`]), so a caller can compute a loss from the same forward
    pass. `with_trust` runs the flipped twin too and fills `extras`, what `trust.image_features` reads:
    {"seg", "cls": the unflipped pass's probabilities, "flipped": the twin's, flipped back, "deep": the pooled
    deepest features [b,C], "texture": the unflipped pass's texture statistics [b,2C] (familiarity)};
    `flipped_twin=False` leaves the twin out (no "flipped"; for what needs the features alone, at half the cost).
    """
    model.eval()
    deep: list[torch.Tensor] = []
    texture: list[torch.Tensor] = []
    hooks = [deepest_layer(model).register_forward_pre_hook(lambda _, args: deep.append(args[0].float().mean((2, 3)))),
             texture_layer(model).register_forward_hook(
                 lambda _, args, out: texture.append(trust.texture_statistics(out)))] if with_trust else []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = to_unit_float(images[start:start + batch_size].to(device, non_blocking=True))
            x = x.contiguous(memory_format=torch.channels_last)
            deep.clear()
            texture.clear()
            extras = None
            with autocast(device, dtype):
                outputs = model(x, with_aux=True) if with_aux else model(x)
                seg_logits, cls_logits = outputs[:2]
                seg = torch.sigmoid(seg_logits.float())
                cls = None if cls_logits is None else torch.softmax(cls_logits.float(), 1)
                if with_trust:
                    extras = {"seg": seg, "cls": cls, "deep": deep[0], "texture": texture[0]}
                if tta or (with_trust and flipped_twin):
                    seg_f, cls_f = model(torch.flip(x, dims=[3]))
                    flipped = torch.sigmoid(torch.flip(seg_f, dims=[3]).float())
                    if with_trust:
                        extras["flipped"] = flipped
                    if tta:
                        seg = (seg + flipped) / 2
                        cls = None if cls is None else (cls + torch.softmax(cls_f.float(), 1)) / 2
            yield Batch(seg, cls, outputs if with_logits else None, extras)
    finally:
        for hook in hooks:
            hook.remove()


class Judged(NamedTuple):
    """What the fitted trust entry says of each scan of a batch ([b] tensors)."""
    trust: torch.Tensor  # the fitted probability that the outline is right
    presence: torch.Tensor | None  # the fitted probability that a lesion is present; None: no gate
    gated: torch.Tensor  # bool: the "no lesion" gate empties the mask (where it applies: trust.gate_applies)
    lesion_free: torch.Tensor  # bool: the gate judges the scan lesion-free (whether or not it empties the mask)
    familiarity: torch.Tensor | None  # distance from the fitted scans relative to their range; None: not fitted
    out_of_range: torch.Tensor  # bool: familiarity above 1, unlike the scans the model was fitted on
    review: torch.Tensor  # bool: trust below the review cut, or out of range: look at this one first


def texture_of(model: torch.nn.Module, images: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None,
               batch_size: int = 32) -> torch.Tensor:
    """[N,2C] on the CPU: the texture statistics (familiarity) of uint8 images [N,1,S,S], one pass, no twin."""
    return torch.cat([b.extras["texture"].cpu() for b in
                      predict_batches(model, images, device, dtype, batch_size, with_trust=True, flipped_twin=False)])


def trust_of(extras: dict, fitted: dict, gate_mode: str = "apply") -> Judged:
    """`Judged` of one batch from `predict_batches(..., with_trust=True)`'s `extras`: the trust score at the mask
    threshold it was fitted at (of the outline as shown: emptied where the gate applies), the probability that a
    lesion is present, which scans the "no lesion" gate judges lesion-free and whether it empties their masks
    (`gate_mode`, trust.gate_applies), and how familiar each scan is. A scan out of range is always reviewed."""
    presence = fitted.get("presence")
    present = None if presence is None else trust.presence_probability(
        trust.presence_inputs(extras["seg"], extras["cls"]), presence)
    lesion_free = trust.gated(extras["seg"].new_zeros(extras["seg"].shape[0]) if present is None else present,
                              presence)
    gate = lesion_free & trust.gate_applies(fitted, gate_mode)
    scores = trust.score(trust.image_features(extras["seg"], extras["flipped"], extras["cls"], extras["deep"],
                                              fitted["threshold"], fitted["statistics"], gate), fitted)
    familiar = fitted.get("familiarity")
    near = None if familiar is None else trust.familiarity(extras["texture"], familiar)
    out = torch.zeros_like(lesion_free) if near is None else near > 1
    return Judged(scores, present, gate, lesion_free, near, out, (scores < fitted["review_below"]) | out)


DISAGREE = "class head says normal, mask is not empty"  # a `check`: outputs that contradict each other


def contradiction(predicted_class: str | None, outlined: bool) -> str:
    """A prediction's `check` (predict's CSV column, the GUI's warning): '' or how its outputs disagree."""
    return DISAGREE if predicted_class == "normal" and outlined else ""


def probs_to_original(prob: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[1,S,S] probability map -> [H,W] at the image's own size (bilinear)."""
    return F.interpolate(prob[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]


@dataclass(frozen=True)
class Prediction:
    """One scan's prediction at the scan's own size as displayed: what `predict_images` / `predict_scans` make,
    predict writes, the GUI shows, `Predictor` returns and `compare` compares (the trust fields are
    None without a fitted trust entry)."""

    probability: np.ndarray  # float32 HxW: lesion probability of each pixel (0 outside a DICOM's region)
    class_probabilities: dict[str, float] | None  # benign / malignant / normal (class head, calibrated where
                                                  # fitted), None without one
    threshold: float = 0.5  # the probability above which a pixel is in `mask`
    trust: float | None = None  # fitted probability that the outline is right (trust.py); None: not available
    review: bool | None = None  # trust below the checkpoint's review cut, or out of range: look at this one first
    presence_probability: float | None = None  # fitted probability that a lesion is present; None: no gate
    gated: bool = False  # the "no lesion" gate judged the scan lesion-free and emptied its mask
    lesion_free: bool = False  # the gate judges it lesion-free (whether or not it empties the mask: gated)
    familiarity: float | None = None  # <= 1: like the scans the model was fitted on; None: not fitted
    out_of_range: bool | None = None  # unlike them: outlines, gate and trust were fitted on other scans
    spacing_mm: tuple[float, float] | None = None  # (x, y) size of a pixel in mm; None: unknown
    spacing_source: str = ""  # where the spacing comes from, or "none: why"
    region: tuple[int, int, int, int] | None = None  # (x0, y0, x1, y1) of a DICOM's ultrasound region, predicted
    frame: int | None = None  # the frame of a multi-frame DICOM file

    def mask_at(self, threshold: float) -> np.ndarray:
        """bool HxW: probability above `threshold`, empty where the "no lesion" gate emptied the mask."""
        return (self.probability > threshold) & (not self.gated)

    @functools.cached_property  # (predict reads it for the PNG, the pixel count and the size: made once)
    def mask(self) -> np.ndarray:
        """The mask at the prediction's threshold."""
        return self.mask_at(self.threshold)

    @property
    def marked_only(self) -> bool:
        """The gate judged the scan lesion-free but does not apply here: marked, its mask kept."""
        return self.lesion_free and not self.gated

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
                                                                  for c in utils.CLASSES])))

    @property
    def predicted_class(self) -> str | None:
        """The class head's most probable class."""
        if self.class_probabilities is None:
            return None
        return utils.CLASSES[int(np.argmax([self.class_probabilities[c] for c in utils.CLASSES]))]


def predict_images(loaded: checkpoints.LoadedModel, images: list[np.ndarray], device: torch.device,
                   dtype: torch.dtype | None = None, batch_size: int = 16, tta: bool = False, gate_mode: str = "auto"):
    """Yield a `Prediction` per image (its mask at the loaded model's threshold).

    `images` are grey uint8 HxW arrays of any size; they are squashed to the model's square input as in training.
    A fitted trust entry (`loaded.trust`) adds the trust score (one more, flipped, pass), the "no lesion" gate
    (`gate_mode`: where it empties masks, trust.gate_applies) and familiarity, and calibrates the class
    probabilities.
    """
    if not images:
        return
    model, fitted_trust, threshold = loaded.model, loaded.trust, loaded.threshold
    batch = torch.from_numpy(np.stack([image_io.resize_image(img, loaded.image_size) for img in images]))[:, None]
    i = 0
    for out in predict_batches(model, batch, device, dtype, batch_size, tta, with_trust=fitted_trust is not None):
        judged = None if out.extras is None else trust_of(out.extras, fitted_trust, gate_mode)
        cls = None if out.cls is None else trust.calibrated(out.cls, fitted_trust)
        for j in range(out.seg.shape[0]):
            h, w = images[i].shape
            prob = probs_to_original(out.seg[j], h, w).cpu().numpy()
            classes = None if cls is None else dict(zip(utils.CLASSES, map(float, cls[j].float().cpu().tolist())))
            if judged is None:
                yield Prediction(prob, classes, threshold)
            else:
                yield Prediction(prob, classes, threshold, float(judged.trust[j]), bool(judged.review[j]),
                                 None if judged.presence is None else float(judged.presence[j]),
                                 bool(judged.gated[j]), bool(judged.lesion_free[j]),
                                 None if judged.familiarity is None else float(judged.familiarity[j]),
                                 None if judged.familiarity is None else bool(judged.out_of_range[j]))
            i += 1


def predict_scans(loaded: checkpoints.LoadedModel, scans: list[dicom_io.Scan], device: torch.device,
                  dtype: torch.dtype | None = None, batch_size: int = 16, tta: bool = False, gate_mode: str = "auto"):
    """`predict_images` for scans: each one's ultrasound region alone is predicted (the scanner's text and colour
    bar never reach the model), and its probability map is placed back in the whole frame (0 outside it); the
    prediction carries the scan's spacing, region and frame."""
    outputs = predict_images(loaded, [s.model_input() for s in scans], device, dtype, batch_size, tta, gate_mode)
    for scan, out in zip(scans, outputs):
        yield dataclasses.replace(out, probability=scan.full_frame(out.probability), spacing_mm=scan.spacing,
                                  spacing_source=scan.spacing_source, region=scan.region, frame=scan.frame)


# --------------------------------------------------------------------------------------------------------------
# The Python API: a loaded model that predicts scans
# --------------------------------------------------------------------------------------------------------------
class Predictor:
    """A trained model ready to predict, for notebooks and scripts (research use only):

        from inference import Predictor
        predictor = Predictor()                     # the shipped model on the CPU (or Predictor("run/best.pt"))
        result = predictor("scan.png")              # a file, or an image array (grey or RGB; as a file reads)
        result.mask, result.probability, result.malignancy_probability, result.trust, result.review,
        result.presence_probability, result.gated   # the "no lesion" gate: the mask emptied
        result.lesion_free, result.out_of_range     # judged lesion-free (mask kept); unlike the training scans
        result = predictor("cine.dcm", frame=3)     # a DICOM file (a frame of a cine loop); sizes in mm:
        result.size_mm.longest, result.size_mm.perpendicular, result.size_mm.area, result.spacing_source

    `backend`: "auto" (onnxruntime on the CPU where it is installed, else torch), "torch" or "onnx"
    (onnx_backend.load); `checkpoint` may also be an ONNX export (.onnx). `gate`: where the "no lesion" gate empties
    masks (trust.gate_applies): "auto" only with a gate fitted on the scans' own site, "apply", "mark".
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, device: str = "cpu",
                 threshold: float | None = None, tta: bool = False, backend: str = "auto", gate: str = "auto"):
        if gate not in trust.GATE_MODES:
            raise ValueError(f"gate must be one of {', '.join(trust.GATE_MODES)}, got {gate!r}")
        self.gate = gate
        if threshold is not None and not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
            raise ValueError(f"threshold must be strictly between 0 and 1, got {threshold!r}")
        self.device = utils.pick_device(device)  # the tools' check: an unknown or missing device is one line
        self.loaded = onnx_backend.load(checkpoint or checkpoints.DEFAULT_CHECKPOINT, self.device,
                                        backend).at_threshold(threshold)
        self.tta = tta

    model = property(lambda self: self.loaded.model, doc="the model (torch, or onnx_backend.OnnxModel)")
    image_size = property(lambda self: self.loaded.image_size, doc="the square input size it was trained at")
    threshold = property(lambda self: self.loaded.threshold, doc="the probability threshold of the masks")
    fitted_trust = property(lambda self: self.loaded.trust, doc="the fitted trust entry (None: why_no_trust)")
    why_no_trust = property(lambda self: self.loaded.why_no_trust, doc="why there are no trust scores")

    def __call__(self, image: str | os.PathLike | np.ndarray, frame: int | None = None,
                 pixel_spacing: float | None = None) -> Prediction:
        """`image`: an image or DICOM file (`frame`, 1-based, picks a frame of a multi-frame one; needed there) or
        an array; `pixel_spacing` (mm per pixel) where the file records none. utils.DataError for a file that
        cannot be read, ValueError for a bad array or value."""
        if pixel_spacing is not None and (isinstance(pixel_spacing, bool) or not isinstance(pixel_spacing, (int, float))
                                          or not 0 < pixel_spacing < math.inf):
            raise ValueError(f"pixel_spacing must be a positive number of mm, got {pixel_spacing!r}")
        if isinstance(image, (str, os.PathLike)):
            scan = dicom_io.load_scan(Path(image), frame, pixel_spacing)
        else:  # converted as the file loader converts the same pixels, or refused (ValueError)
            scan = dicom_io.with_spacing(dicom_io.Scan(image_io.grey_from_array(image), spacing_source=NO_SPACING_ARRAY),
                                         pixel_spacing)
        return next(predict_scans(self.loaded, [scan], self.device, tta=self.tta, gate_mode=self.gate))


# --------------------------------------------------------------------------------------------------------------
# The two backends compared on the same scans (export_onnx.py's check, bench_busi.py --backends)
# --------------------------------------------------------------------------------------------------------------
def parity(loaded: checkpoints.LoadedModel, onnx_model, images: list[np.ndarray], batch_size: int = 16) -> dict:
    """How far apart the loaded (torch) model's predictions and `onnx_model`'s are on `images` (grey uint8
    arrays), each at the scan's own size through predict_images, as predict writes them (`compare`)."""
    runs = [list(predict_images(one, images, torch.device("cpu"), None, batch_size))
            for one in (loaded, dataclasses.replace(loaded, model=onnx_model))]
    return compare(*runs, loaded.threshold)



def compare(first: list, second: list, threshold: float) -> dict:
    """Two runs of predict_images (inference.Prediction per scan) on the same scans: pixels whose masks (the
    probability above `threshold`) differ, per-image Dice of the two masks, the largest probability difference,
    the predicted classes, the largest malignancy and trust differences."""
    differing = pixels = classes_agree = compared = 0
    dice, prob_diff, malignancy_diff, trust_diff = [], 0.0, 0.0, 0.0
    for one, other in zip(first, second):
        a, b = one.probability > threshold, other.probability > threshold
        differing += int((a != b).sum())
        pixels += a.size
        both = int(a.sum() + b.sum())
        dice.append(1.0 if both == 0 else 2 * int((a & b).sum()) / both)
        prob_diff = max(prob_diff, float(np.abs(one.probability - other.probability).max()))
        if one.class_probabilities is not None:
            classes_agree += int(one.predicted_class == other.predicted_class)
            compared += 1
            malignancy_diff = max(malignancy_diff, abs(one.malignancy_probability - other.malignancy_probability))
        if one.trust is not None:
            trust_diff = max(trust_diff, abs(one.trust - other.trust))
    return {"images": len(first), "pixels": pixels, "differing_pixels": differing,
            "pixel_agreement": 1 - differing / max(1, pixels), "min_dice": min(dice, default=1.0),
            "max_probability_difference": prob_diff, "class_agreement": classes_agree / compared if compared else 1.0,
            "max_malignancy_difference": malignancy_diff, "max_trust_difference": trust_diff}


PARITY_TARGETS = {"pixel_agreement": 0.999, "min_dice": 0.999, "class_agreement": 1.0}


PARITY_LIMITS = {"max_probability_difference": 1e-3, "max_malignancy_difference": 1e-3}



def parity_failures(figures: dict) -> list[str]:
    """The parity targets `figures` (from `parity`) misses, worded; empty when it meets them all."""
    low = [f"{k} {figures[k]:.6f} < {v}" for k, v in PARITY_TARGETS.items() if figures[k] < v]
    return low + [f"{k} {figures[k]:.2e} >= {v:g}" for k, v in PARITY_LIMITS.items() if figures[k] >= v]
