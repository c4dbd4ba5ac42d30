"""Evaluation: score a model on a split at each image's original resolution, and write the report that
--eval-only and the end of training share (metrics.json, the per-image CSV, the report figure, the summary)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe beside the Tk app

import dataset
import metrics
import utils
from inference import predict_batches, probs_to_original


def evaluate(model: torch.nn.Module, data: dict, device: torch.device, dtype: torch.dtype | None = None,
             threshold: float = 0.5, batch_size: int = 32, tta: bool = False,
             class_names=dataset.CLASSES, on_logits=None, with_aux: bool = False) -> tuple[dict, list[dict]]:
    """Per-image Dice/IoU at each image's ORIGINAL resolution (prediction resized back), and their summary.

    `data` is a dataset.subset(...) dict: images [N,1,S,S] uint8, labels, names, full_masks, full_sizes.
    `on_logits(start, outputs)` gets the model's raw outputs for every batch (validation computes its
    validation loss there, from the same forward pass).
    """
    return evaluate_thresholds(model, data, device, dtype, [threshold], batch_size, tta, class_names,
                               on_logits, with_aux)[threshold]


def ground_truth_on(data: dict, device: torch.device) -> list[torch.Tensor]:
    """The full-resolution bool masks of `data` on `device`, unpacked once and kept in `data` for later calls
    (validation runs every epoch; about 0.3 MB per BUSI image)."""
    key = f"ground_truth[{device}]"
    if key not in data:
        data[key] = [dataset.unpack_mask(m, s).to(device) for m, s in zip(data["full_masks"], data["full_sizes"].tolist())]
    return data[key]


def evaluate_thresholds(model: torch.nn.Module, data: dict, device: torch.device, dtype: torch.dtype | None,
                        thresholds, batch_size: int = 32, tta: bool = False,
                        class_names=dataset.CLASSES, on_logits=None, with_aux: bool = False) -> dict:
    """`evaluate` for several thresholds from one inference pass: {threshold: (summary, records)}.

    The pixel counts stay on the device until one copy at the end: no host sync per image, so a GPU is not
    left idle while Python walks the split.
    """
    truths = ground_truth_on(data, device)
    cuts = torch.tensor(list(thresholds), dtype=torch.float32, device=device).view(-1, 1, 1)
    counts, class_probs, i = [], [], 0
    for probs, cls, outputs in predict_batches(model, data["images"], device, dtype, batch_size, tta,
                                               with_logits=True, with_aux=with_aux):
        if on_logits is not None:
            on_logits(i, outputs)
        if cls is not None:
            class_probs.append(cls.float())
        for j in range(probs.shape[0]):
            gt = truths[i]
            preds = probs_to_original(probs[j], *gt.shape) > cuts  # [T,H,W], one per threshold
            counts.append(torch.stack([torch.logical_and(preds, gt).sum((1, 2)), preds.sum((1, 2)),
                                       gt.sum().expand(len(thresholds))], 1))  # [T,3]
            i += 1
    counts = torch.stack(counts).cpu().tolist() if counts else []  # [N,T,3]
    cls_all = torch.cat(class_probs).cpu() if class_probs else None
    per_t: dict = {t: [] for t in thresholds}
    for i, per_image in enumerate(counts):
        extra = {}
        if cls_all is not None:
            extra = {"class_probs": cls_all[i].tolist(), "malignancy": float(metrics.malignancy_probability(cls_all[i],
                                                                                                   class_names))}
        for t, (inter, pred, gt) in zip(thresholds, per_image):
            d, iou = metrics.dice_iou_from_counts(inter, pred, gt)
            per_t[t].append({"file": data["names"][i], "label": class_names[int(data["labels"][i])], "dice": d,
                             "iou": iou, "pred_pixels": pred, "gt_pixels": gt, "inter": inter, **extra})
    return {t: (metrics.summarize(records, class_names), records) for t, records in per_t.items()}


def write_report(run_dir, summary: dict, records: list[dict], extra: dict, split: str = "test") -> None:
    """metrics.json, <split>_predictions.csv and <split>_report.png."""
    write_test_report(run_dir, summary, records, extra, split)
    write_report_figure(run_dir, summary, records, split)


def write_test_report(run_dir: Path, summary: dict, records: list[dict], extra: dict, split: str = "test") -> None:
    """metrics.json ({split: summary, ...}) and <split>_predictions.csv."""

    utils.write_json(run_dir / "metrics.json", {split: summary, **extra})  # NaN (e.g. no normal images) -> null
    fields = ["file", "class", "dice", "iou", "pred_pixels", "gt_pixels"]
    if records and "malignancy" in records[0]:
        fields += ["malignancy_probability", "predicted_class"]
    rows = []
    for r in records:
        row = [r["file"], r["label"], f"{r['dice']:.4f}", f"{r['iou']:.4f}", r["pred_pixels"], r["gt_pixels"]]
        if "malignancy" in r:
            row += [f"{r['malignancy']:.4f}", dataset.CLASSES[max(range(3), key=lambda k: r["class_probs"][k])]]
        rows.append(row)
    utils.write_csv(run_dir / f"{split}_predictions.csv", fields, rows)


def write_report_figure(run_dir: Path, summary: dict, records: list[dict], split: str = "test") -> None:
    """<split>_report.png: per-image Dice by class, the malignancy ROC curve and the confusion matrix."""
    has_cls = "malignancy_auc" in summary
    fig = Figure(figsize=(15 if has_cls else 5.5, 4.5))
    axes = fig.subplots(1, 3 if has_cls else 1, squeeze=False)
    ax = axes[0, 0]
    lesion_classes = [c for c in ("benign", "malignant") if c in summary["per_class"]]
    dice = [[r["dice"] for r in records if r["label"] == c] for c in lesion_classes]
    if dice:
        ax.boxplot(dice, showmeans=True)
        ax.set_xticks(range(1, len(dice) + 1), lesion_classes)
        for k, values in enumerate(dice, start=1):  # every image as a dot beside its box
            ax.scatter(np.full(len(values), k + 0.25), values, s=6, alpha=0.5)
    fp = summary["normal_fp_rate"]
    ax.set(ylim=(-0.02, 1.02), ylabel="Dice per image (original resolution)",
           xlabel="box: median and quartiles; triangle: mean; dots: images",
           title=f"{split}: lesion Dice {summary['lesion_dice']:.3f}"
                 + (f", normal FP rate {fp:.2f}" if fp == fp else ""))
    if has_cls:
        lesion = [r for r in records if r["label"] != "normal"]
        fpr, tpr = metrics.roc_curve([r["malignancy"] for r in lesion], [r["label"] == "malignant" for r in lesion])
        ax = axes[0, 1]
        ax.plot(fpr, tpr, drawstyle="default", label=f"AUC {summary['malignancy_auc']:.3f} (n={len(lesion)})")
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        ax.set(xlabel="benign called malignant (FPR)", ylabel="malignant found (TPR)",
               title="Malignant vs benign, lesion images", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right")
        ax = axes[0, 2]
        counts = np.array(summary["confusion_matrix"]["counts"])
        ax.imshow(counts, cmap="Blues")
        for (i, j), v in np.ndenumerate(counts):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > counts.max() / 2 else "black")
        ax.set_xticks(range(len(dataset.CLASSES)), dataset.CLASSES)
        ax.set_yticks(range(len(dataset.CLASSES)), dataset.CLASSES)
        ax.set(xlabel="predicted", ylabel="true", title=f"Class head: accuracy {summary['class_accuracy']:.3f}")
    utils.save_figure(fig, run_dir / f"{split}_report.png")


def print_summary(title: str, s: dict) -> None:
    print(f"{title}: lesion Dice {s['lesion_dice']:.4f} | lesion IoU {s['lesion_iou']:.4f} | "
          f"pooled Dice {s['lesion_pooled_dice']:.4f} | normal FP rate {s['normal_fp_rate']:.3f} "
          f"| missed lesions {s['missed_lesions']} of {s['n_lesion']} | n={s['n_images']}")
    for name, c in s["per_class"].items():
        extra = f" | FP rate {c['fp_rate']:.3f}" if "fp_rate" in c else ""
        print(f"  {name:<9} n={c['n']:<4} Dice {c['dice']:.4f} | IoU {c['iou']:.4f}{extra}")
    if "malignancy_auc" in s:
        print(f"  classification: accuracy {s['class_accuracy']:.4f} | malignant-vs-benign ROC AUC "
              f"{s['malignancy_auc']:.4f} | confusion (rows true, cols pred: benign, malignant, normal) "
              f"{s['confusion_matrix']['counts']}")
