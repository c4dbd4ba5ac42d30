"""Segmentation and classification metrics: Dice/IoU with the empty-mask convention, ROC, and the summary of a
split's per-image records (lesion means, normal false-positive rate, per class, malignancy AUC), and a lesion's size
(area and the two diameters of a report) from a mask and its pixel spacing; how good a trust score is (which
outlines failed, failure AUROC, risk-coverage, calibration error)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from utils import CLASSES


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


def missed_and_outlined(scans) -> np.ndarray:
    """[[share of lesion scans missed, share of normal scans outlined], ...] over every cut of a score below which
    a mask is emptied (the mask's maximum probability, say), from `scans` as (has a lesion, outlined, score or
    None); the first row is no cut at all. The trade-off that any "is anything there" decision offers."""
    lesion = np.array([bool(s[0]) for s in scans])
    outlined = np.array([bool(s[1]) for s in scans])
    score = np.array([1.0 if s[2] is None else float(s[2]) for s in scans])
    points = []
    for cut in np.r_[-np.inf, np.unique(score)]:
        kept = outlined & (score >= cut)
        points.append([(~kept[lesion]).mean() if lesion.any() else np.nan,
                       kept[~lesion].mean() if (~lesion).any() else np.nan])
    return np.array(points)


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


# --------------------------------------------------------------------------------------------------------------
# Lesion size: area and the two diameters of a breast-ultrasound report, with any pixel spacing
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LesionSize:
    """A mask's size in the units of the spacing it was measured with (mm, or pixels for a spacing of 1).

    `longest` is the largest distance across the mask's largest connected piece; `perpendicular` the longest
    chord of that piece at right angles to it (the two calipers of a report). Both run from pixel edge to pixel
    edge; the `*_line` pairs are their ends in pixel coordinates (x, y), pixel centres, for drawing."""

    area: float
    longest: float
    perpendicular: float
    longest_line: tuple[tuple[float, float], tuple[float, float]]
    perpendicular_line: tuple[tuple[float, float], tuple[float, float]]


def largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected piece of a bool mask (the first in row order of equal ones), as a bool mask.

    Runs of lesion pixels along the rows are joined with the runs they touch in the row above (a union-find over
    runs, not pixels: a few thousand steps for a full-size scan), so that no image library is needed."""
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    steps = np.diff(padded, axis=1)
    rows, starts = np.nonzero(steps == 1)
    ends = np.nonzero(steps == -1)[1] - 1  # inclusive; row-major order pairs each start with its end
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))  # runs of row r: first[r]:first[r + 1]
    for r in range(1, mask.shape[0]):
        j, i = first[r - 1], first[r]
        while j < first[r] and i < first[r + 1]:  # both rows' runs in column order: one merge-like sweep
            # a diagonal neighbour counts (8-connectivity): one column of slack each side
            if starts[j] <= ends[i] + 1 and ends[j] >= starts[i] - 1:
                parent[root(i)] = root(j)
            if ends[j] < ends[i]:
                j += 1
            else:
                i += 1
    roots = np.array([root(i) for i in range(len(rows))], dtype=np.int64)
    sizes = np.bincount(roots, weights=ends - starts + 1, minlength=len(rows)) if len(rows) else np.zeros(0)
    piece = np.zeros_like(mask, dtype=bool)
    if len(rows):
        for i in np.flatnonzero(roots == int(np.argmax(sizes))):
            piece[rows[i], starts[i]:ends[i] + 1] = True
    return piece


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull of 2-D points (Andrew's monotone chain), its corners in order; the input for a few points."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return np.array(pts, dtype=np.float64)

    def half(seq):
        chain = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    return np.array(half(pts)[:-1] + half(pts[::-1])[:-1], dtype=np.float64)


def lesion_size(mask: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> LesionSize | None:
    """Area of the whole mask and the two diameters of its largest piece, with `spacing` = (x, y) size of a pixel
    (mm per pixel, possibly different across and down); None for an empty mask.

    The diameters are measured in physical space, so that with non-square pixels the longest line is the
    physically longest one. Each is the distance between two pixel centres plus one pixel's extent along the line
    (edge to edge: a lesion w pixels wide measures w pixels). The perpendicular one is the widest set of pixels
    whose squares a line at right angles to the longest diameter crosses."""
    if not mask.any():
        return None
    sx, sy = (float(s) for s in spacing)
    area = float(np.count_nonzero(mask)) * sx * sy
    ys, xs = np.nonzero(largest_piece(mask))
    mm = np.stack([xs * sx, ys * sy], axis=1)
    # the hull's corners lie among each row's leftmost and rightmost pixels: far fewer points to pair up
    first = np.r_[True, ys[1:] != ys[:-1]]
    last = np.r_[ys[1:] != ys[:-1], True]
    corners = _hull(np.concatenate([mm[first], mm[last]]))
    gaps = np.linalg.norm(corners[:, None, :] - corners[None, :, :], axis=2)
    a, b = np.unravel_index(int(np.argmax(gaps)), gaps.shape)
    span = corners[b] - corners[a]
    length = float(np.hypot(*span))
    u = span / length if length > 0 else np.array([1.0, 0.0])
    n = np.array([-u[1], u[0]])
    extent = lambda d: sx * abs(d[0]) + sy * abs(d[1])  # noqa: E731 - a pixel's width along direction d
    along, across = mm @ u, mm @ n
    bins = np.floor((along - along.min()) / extent(u)).astype(np.int64)  # one bin: one perpendicular line
    order = np.argsort(bins, kind="stable")
    cuts = np.r_[0, np.flatnonzero(np.diff(bins[order])) + 1]
    high, low = np.maximum.reduceat(across[order], cuts), np.minimum.reduceat(across[order], cuts)
    k = int(np.argmax(high - low))
    at = float(np.mean(along[order][cuts[k]:(cuts[k + 1] if k + 1 < len(cuts) else None)]))
    to_pixels = lambda p: (float(p[0] / sx), float(p[1] / sy))  # noqa: E731
    return LesionSize(area, float(length + extent(u)), float(high[k] - low[k] + extent(n)),
                      (to_pixels(corners[a]), to_pixels(corners[b])),
                      (to_pixels(at * u + low[k] * n), to_pixels(at * u + high[k] * n)))


# --------------------------------------------------------------------------------------------------------------
# How good a trust score is: which outlines failed, risk-coverage, calibration error (for reports)
# --------------------------------------------------------------------------------------------------------------
FAILURE_DICE = 0.5  # a lesion outline below this Dice counts as a failure (as does any outline on a normal scan)


def failures(records: list[dict]) -> np.ndarray:
    """Per image: was the outline wrong? Lesion scans: Dice below FAILURE_DICE (a missed lesion included);
    normal scans: any outline."""
    return np.array([(r["pred_pixels"] > 0) if r["label"] == "normal" else (r["dice"] < FAILURE_DICE)
                     for r in records], dtype=bool)


def caught_in_flagged(risk, failed, fraction: float = 0.2) -> float:
    """Share of all failures among the `fraction` of images with the highest risk (nan without failures)."""
    risk, failed = np.asarray(risk, float), np.asarray(failed, bool)
    if not failed.any():
        return float("nan")
    k = int(math.ceil(fraction * len(risk)))
    order = np.argsort(-risk, kind="stable")[:k]
    return float(failed[order].sum() / failed.sum())


def risk_coverage(trust, dice, coverages=tuple(np.round(np.arange(1.0, 0.49, -0.05), 2))) -> list[list[float]]:
    """[[coverage, mean Dice of the most-trusted `coverage` of images], ...] (lesion images: the caller's)."""
    trust, dice = np.asarray(trust, float), np.asarray(dice, float)
    order = np.argsort(-trust, kind="stable")
    out = []
    for c in coverages:
        k = max(1, int(round(c * len(trust))))
        out.append([float(c), float(dice[order[:k]].mean()) if len(trust) else float("nan")])
    return out


def expected_calibration_error(probs, labels, bins: int = 10) -> float:
    """ECE: the mean |accuracy - confidence| over equal-width probability bins, weighted by their counts (the
    positive class's probability against its frequency)."""
    probs, labels = np.asarray(probs, float), np.asarray(labels, float)
    if len(probs) == 0:
        return float("nan")
    edges = np.minimum((probs * bins).astype(int), bins - 1)
    return float(sum(abs(labels[edges == b].mean() - probs[edges == b].mean()) * (edges == b).sum()
                     for b in range(bins) if (edges == b).any()) / len(probs))


def reliability(probs, labels, bins: int = 10) -> list[list[float]]:
    """[[mean probability, observed frequency, count], ...] per non-empty bin: a reliability diagram's points."""
    probs, labels = np.asarray(probs, float), np.asarray(labels, float)
    edges = np.minimum((probs * bins).astype(int), bins - 1)
    return [[float(probs[edges == b].mean()), float(labels[edges == b].mean()), int((edges == b).sum())]
            for b in range(bins) if (edges == b).any()]


def trust_report(records: list[dict]) -> dict:
    """The trust figures of a scored split (records with dice, label, pred_pixels, trust, max_probability[,
    malignancy, lesion_probability]): for metrics.json."""
    failed = failures(records)
    trust = np.array([r["trust"] for r in records])
    max_prob = np.array([r["max_probability"] for r in records])
    lesion = np.array([r["label"] != "normal" for r in records])
    dice = np.array([r["dice"] for r in records])
    review = np.array([r["review"] for r in records])
    top80 = risk_coverage(trust[lesion], dice[lesion], (1.0, 0.8)) if lesion.any() else [[1.0, math.nan]] * 2
    out = {"failure_definition": f"lesion Dice < {FAILURE_DICE} (a missed lesion included), or any outline on a "
                                 f"normal scan",
           "n_images": int(len(records)), "n_failures": int(failed.sum()),
           "auroc_trust": roc_auc(-trust, failed),
           "auroc_max_probability": roc_auc(-max_prob, failed),
           "failures_in_lowest_20pct_trust": caught_in_flagged(-trust, failed),
           "failures_in_lowest_20pct_max_probability": caught_in_flagged(-max_prob, failed),
           "lesion_dice_all": top80[0][1], "lesion_dice_most_trusted_80pct": top80[1][1],
           "risk_coverage_lesion_dice": risk_coverage(trust[lesion], dice[lesion]) if lesion.any() else [],
           "risk_coverage_lesion_dice_max_probability": (risk_coverage(max_prob[lesion], dice[lesion])
                                                         if lesion.any() else []),
           "review_flagged": int(review.sum()), "review_failures_caught": int((review & failed).sum())}
    if "out_of_range" in records[0]:  # familiarity: the share unlike the scans the model was fitted on
        out["out_of_range"] = int(sum(r["out_of_range"] for r in records))
    if "malignancy" in records[0]:
        mal = [(r["malignancy"], r["label"] == "malignant") for r in records if r["label"] != "normal"]
        if mal:
            out["malignancy_ece"] = expected_calibration_error(*zip(*mal))
            out["malignancy_reliability"] = reliability(*zip(*mal))
            out["malignancy_ece_uncalibrated"] = expected_calibration_error(
                [r["malignancy_uncalibrated"] for r in records if r["label"] != "normal"], [m for _, m in mal])
        out["lesion_probability_ece"] = expected_calibration_error([r["lesion_probability"] for r in records],
                                                                   lesion)
    return out
