"""Segmentation and classification metrics: Dice/IoU with the empty-mask convention, ROC, and the summary of a
split's per-image records (lesion means, normal false-positive rate, per class, malignancy AUC)."""
from __future__ import annotations

import numpy as np
import torch

from dataset import CLASSES


def dice_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Dice and IoU of two bool masks. Convention: both empty -> (1, 1); one empty -> (0, 0)."""
    inter = torch.logical_and(pred, target).sum().item()
    return dice_iou_from_counts(inter, pred.sum().item(), target.sum().item())


def dice_iou_from_counts(inter: int, pred: int, target: int) -> tuple[float, float]:
    """Dice and IoU from pixel counts (intersection, predicted, ground truth), with `dice_iou`'s conventions."""
    if pred + target == 0:
        return 1.0, 1.0
    return 2.0 * inter / (pred + target), inter / (pred + target - inter)


def roc_auc(scores, positives) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half); nan when a class is absent."""
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    pos, neg = scores[positives], scores[~positives]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def roc_curve(scores, positives) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) from (0, 0) to (1, 1), one point per distinct score;
    the trapezoid area under it equals `roc_auc` (ties give a diagonal step)."""
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    scores, positives = scores[order], positives[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1] if len(scores) else np.zeros(0, int)
    tps, fps = np.cumsum(positives)[last_of_tie], np.cumsum(~positives)[last_of_tie]
    n_pos, n_neg = max(1, positives.sum()), max(1, (~positives).sum())
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def summarize(records: list[dict], class_names=CLASSES) -> dict:
    """Aggregate per-image records (keys: label, dice, iou, pred_pixels, inter, gt_pixels[, class_probs]).

    lesion_* are means over images with a lesion (benign + malignant); normal_fp_rate is the fraction of
    normal images with any predicted lesion pixel; pooled_dice sums pixels over all lesion images.
    """
    out: dict = {"n_images": len(records)}
    lesion = [r for r in records if r["label"] != "normal"]
    normal = [r for r in records if r["label"] == "normal"]
    mean = lambda rs, k: float(np.mean([r[k] for r in rs])) if rs else float("nan")  # noqa: E731
    out["lesion_dice"] = mean(lesion, "dice")
    out["lesion_iou"] = mean(lesion, "iou")
    pooled = sum(r["pred_pixels"] + r["gt_pixels"] for r in lesion)
    out["lesion_pooled_dice"] = 2 * sum(r["inter"] for r in lesion) / pooled if pooled else float("nan")
    out["normal_fp_rate"] = float(np.mean([r["pred_pixels"] > 0 for r in normal])) if normal else float("nan")
    out["n_lesion"] = len(lesion)
    out["missed_lesions"] = sum(r["pred_pixels"] == 0 for r in lesion)  # lesion images with an empty prediction
    out["all_dice"] = mean(records, "dice")
    per_class = {}
    for name in class_names:
        rs = [r for r in records if r["label"] == name]
        if not rs:
            continue
        entry = {"n": len(rs), "dice": mean(rs, "dice"), "iou": mean(rs, "iou")}
        if name == "normal":
            entry["fp_rate"] = out["normal_fp_rate"]
        per_class[name] = entry
    out["per_class"] = per_class
    if records and "class_probs" in records[0]:
        out.update(classification_summary(records, class_names))
    return out


def classification_summary(records: list[dict], class_names) -> dict:
    """3-way accuracy and confusion matrix, and malignant-vs-benign ROC AUC on the lesion images."""
    k = len(class_names)
    truth = np.array([class_names.index(r["label"]) for r in records])
    probs = np.array([r["class_probs"] for r in records])
    confusion = np.zeros((k, k), dtype=int)
    for t, p in zip(truth, probs.argmax(1)):
        confusion[t, p] += 1
    lesion = [r for r in records if r["label"] != "normal"]
    return {
        "class_accuracy": float((probs.argmax(1) == truth).mean()),
        "confusion_matrix": {"rows_true_cols_pred": list(class_names), "counts": confusion.tolist()},
        "malignancy_auc": roc_auc([r["malignancy"] for r in lesion], [r["label"] == "malignant" for r in lesion]),
    }


def malignancy_probability(class_probs: torch.Tensor, class_names=CLASSES) -> torch.Tensor:
    """P(malignant | lesion) = p_malignant / (p_benign + p_malignant), from 3-way class probabilities."""
    b, m = class_probs[..., class_names.index("benign")], class_probs[..., class_names.index("malignant")]
    return m / (b + m).clamp_min(1e-8)
