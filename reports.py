"""What an evaluation writes and prints: metrics.json and the per-image CSV, the report figure (Dice by class,
the malignancy ROC, the confusion matrix, the trust score's risk-coverage), the "no lesion" gate's and the
calibration's figures, and the console summary. Numbers come from evaluation; nothing here scores a model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe beside the Tk app

import metrics
import storage
import trust
import utils


def write_presence_figure(path: Path, presence: dict) -> None:
    """Normal scans left outlined against lesion scans missed, on validation, for each candidate "no lesion"
    score over all its cuts; the chosen cut of each marked, and the outcome without any gate."""
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.subplots()
    for name, c in presence["candidates"].items():
        curve = np.array(c["curve"])
        line, = ax.plot(curve[:, 1] * 100, curve[:, 2] * 100, "-", lw=1.2,
                        label=f"{name}{' (chosen)' if name == presence['candidate'] else ''}: at the cut "
                              f"{c['missed_rate']:.1%} missed, {c['normal_fp_rate']:.0%} FP")
        ax.plot(c["missed_rate"] * 100, c["normal_fp_rate"] * 100, "o", color=line.get_color())
    none = presence["no_gate"]
    ax.plot(none["missed_rate"] * 100, none["normal_fp_rate"] * 100, "k*", ms=10,
            label=f"no gate: {none['missed_rate']:.1%} missed, {none['normal_fp_rate']:.0%} FP")
    ax.axvline((1 - presence["keep"]) * 100, color="grey", ls="--", lw=0.8)
    lo, hi = presence["normal_fp_rate_interval"]
    ax.set(xlabel="lesion scans missed (%)", ylabel="normal scans outlined (%)", xlim=(0, 20), ylim=(-2, 102),
           title=f"'No lesion' gate on validation ({presence['n_lesion']} lesion, {presence['n_normal']} normal scans)"
                 f"\nchosen FP {presence['normal_fp_rate']:.0%}, bootstrap 95 % interval {lo:.0%}-{hi:.0%}")
    ax.title.set_fontsize(9)
    ax.legend(loc="upper right", fontsize=7)
    storage.save_figure(fig, path)


def write_calibration_figure(path: Path, records: list[dict], fitted: dict) -> bool:
    """Reliability diagrams of the malignancy and lesion probabilities on `records` (validation), before and
    after the fitted temperatures; False (nothing written) for a model without a class head."""
    if not records or "class_probs" not in records[0]:
        return False
    fig = Figure(figsize=(11, 4.8))
    raw = torch.tensor([r["class_probs"] for r in records])
    lesion = np.array([r["label"] != "normal" for r in records])
    for ax, name in zip(fig.subplots(1, 2), ("malignancy", "lesion")):
        for label, probs in (("as trained", raw), ("calibrated", trust.calibrated(raw, fitted))):
            if name == "malignancy":
                p = metrics.malignancy_probability(probs)[torch.from_numpy(lesion)].numpy()
                y = np.array([r["label"] == "malignant" for r in records])[lesion]
            else:
                p, y = 1 - probs[:, utils.CLASSES.index("normal")].numpy(), lesion
            points = np.array(metrics.reliability(p, y)).reshape(-1, 3)  # (no lesion scans: no points)
            ece = metrics.expected_calibration_error(p, y)
            line, = ax.plot(points[:, 0], points[:, 1], "-", label=f"{label}: ECE {ece:.3f}")
            ax.scatter(points[:, 0], points[:, 1], s=8 + 4 * points[:, 2], color=line.get_color())  # area: images
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        what = "malignant, lesion scans" if name == "malignancy" else "a lesion, all scans"
        ax.set(xlabel=f"predicted probability ({name})", ylabel=f"observed frequency ({what})", xlim=(0, 1),
               ylim=(0, 1), title=f"{name} probability, validation split")
        ax.legend(loc="upper left", title="10 bins; dot area: images", fontsize=8, title_fontsize=8)
    storage.save_figure(fig, path)
    return True


def write_report(run_dir, summary: dict, records: list[dict], extra: dict, split: str = "test") -> None:
    """metrics.json, <split>_predictions.csv and <split>_report.png."""
    write_test_report(run_dir, summary, records, extra, split)
    write_report_figure(run_dir, summary, records, split)


def write_test_report(run_dir: Path, summary: dict, records: list[dict], extra: dict, split: str = "test") -> None:
    """metrics.json ({split: summary, ...}) and <split>_predictions.csv."""

    storage.write_json(run_dir / "metrics.json", {split: summary, **extra})  # NaN (e.g. no normal images) -> null
    fields = ["file", "class", "dice", "iou", "pred_pixels", "gt_pixels"]
    if records and "malignancy" in records[0]:
        fields += ["malignancy_probability", "predicted_class"]
    if records and "trust" in records[0]:
        fields += ["max_probability", "trust", "review"]
    rows = []
    for r in records:
        row = [r["file"], r["label"], f"{r['dice']:.4f}", f"{r['iou']:.4f}", r["pred_pixels"], r["gt_pixels"]]
        if "malignancy" in r:
            row += [f"{r['malignancy']:.4f}", utils.CLASSES[max(range(3), key=lambda k: r["class_probs"][k])]]
        if "trust" in r:
            row += [f"{r['max_probability']:.4f}", f"{r['trust']:.4f}", "REVIEW" if r["review"] else ""]
        rows.append(row)
    storage.write_csv(run_dir / f"{split}_predictions.csv", fields, rows)


def write_report_figure(run_dir: Path, summary: dict, records: list[dict], split: str = "test") -> None:
    """<split>_report.png: per-image Dice by class, the malignancy ROC curve and the confusion matrix."""
    has_cls, has_trust = "malignancy_auc" in summary, bool(summary.get("trust", {}).get("risk_coverage_lesion_dice"))
    panels = 1 + 2 * has_cls + has_trust
    fig = Figure(figsize=(5 * panels + 0.5, 4.5))
    axes = fig.subplots(1, panels, squeeze=False)
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
        ax.set_xticks(range(len(utils.CLASSES)), utils.CLASSES)
        ax.set_yticks(range(len(utils.CLASSES)), utils.CLASSES)
        ax.set(xlabel="predicted", ylabel="true", title=f"Class head: accuracy {summary['class_accuracy']:.3f}")
    if has_trust:
        plot_risk_coverage(axes[0, -1], summary["trust"])
    storage.save_figure(fig, run_dir / f"{split}_report.png")


def plot_risk_coverage(ax, t: dict) -> None:
    """Mean lesion Dice of the most-trusted fraction of lesion scans, by trust and by max probability alone."""
    for key, label, auroc in (("risk_coverage_lesion_dice", "trust score", t["auroc_trust"]),
                              ("risk_coverage_lesion_dice_max_probability", "max probability alone",
                               t["auroc_max_probability"])):
        points = np.array(t[key])
        ax.plot(points[:, 0] * 100, points[:, 1], "o-", ms=3, label=f"{label} (failure AUROC {auroc:.2f})")
    ax.invert_xaxis()
    ax.set(xlabel="% of lesion scans kept (most trusted first)", ylabel="mean lesion Dice of those kept",
           title=f"Which outlines to trust: {t['n_failures']} failures of {t['n_images']}")
    ax.legend(loc="lower right", fontsize=8)


MIN_PER_CLASS = 5  # fewer benign or malignant scans than this: an AUC says nothing, and is not printed


def figure(value: float, fmt: str, why: str) -> str:
    """`value` formatted, or "n/a (`why`)" where it is not a number (too few images of a kind)."""
    return format(value, fmt) if value == value else f"n/a ({why})"


def print_summary(title: str, s: dict) -> None:
    """The printed summary of a split: lesion and normal figures, per source and scanner, per class, the class
    head and the trust score; a figure that too few images cannot give says so instead of printing nan."""
    fp = figure(s["normal_fp_rate"], ".3f", "no normal scans")
    print(f"{title}: lesion Dice {figure(s['lesion_dice'], '.4f', 'no lesion scans')} | lesion IoU "
          f"{figure(s['lesion_iou'], '.4f', 'no lesion scans')} | normal FP rate {fp} "
          f"| missed lesions {s['missed_lesions']} of {s['n_lesion']} | n={s['n_images']}")
    for group in ("per_source", "per_scanner"):
        for name, p in s.get(group, {}).items():
            fp = "" if p["normal_fp_rate"] != p["normal_fp_rate"] else f" | normal FP rate {p['normal_fp_rate']:.3f}"
            auc = f" | malignancy AUC {auc_text(p)}" if "malignancy_auc" in p else ""
            why = no_auroc_reason(p["trust"]) if "trust" in p else ""
            trust_auc = (f" | failure AUROC trust {figure(p['trust']['auroc_trust'], '.3f', why)} / max "
                         f"probability {figure(p['trust']['auroc_max_probability'], '.3f', why)}"
                         if "trust" in p else "")
            print(f"  {group[4:]} {name}: lesion Dice {figure(p['lesion_dice'], '.4f', 'none')}{fp} | missed "
                  f"{p['missed_lesions']} of {p['n_lesion']}{auc}{trust_auc} | n={p['n_images']}")
    for name, c in s["per_class"].items():
        extra = f" | FP rate {c['fp_rate']:.3f}" if "fp_rate" in c else ""
        print(f"  {name:<9} n={c['n']:<4} Dice {c['dice']:.4f} | IoU {c['iou']:.4f}{extra}")
    if "malignancy_auc" in s:
        print(f"  classification: accuracy {s['class_accuracy']:.4f} | malignant-vs-benign ROC AUC {auc_text(s)} "
              f"| confusion (rows true, cols pred: benign, malignant, normal) {s['confusion_matrix']['counts']}")
    if "trust" in s:
        t = s["trust"]
        why = no_auroc_reason(t)
        print(f"  trust: failures {t['n_failures']} of {t['n_images']} | AUROC at catching them "
              f"{figure(t['auroc_trust'], '.3f', why)} (max probability alone "
              f"{figure(t['auroc_max_probability'], '.3f', why)}) | lowest 20 % hold "
              f"{figure(t['failures_in_lowest_20pct_trust'], '.0%', why)} of them | flagged for review "
              f"{t['review_flagged']} ({t['review_failures_caught']} failures) | lesion Dice of the 80 % most "
              f"trusted {figure(t['lesion_dice_most_trusted_80pct'], '.4f', 'no lesion scans')} (all "
              f"{figure(t['lesion_dice_all'], '.4f', 'no lesion scans')})"
              + (f" | out of range {t['out_of_range']} of {t['n_images']}" if "out_of_range" in t else ""))


def no_auroc_reason(t: dict) -> str:
    """Why a trust report (metrics.trust_report) has no failure AUROC, in its own words."""
    return "no failures" if not t["n_failures"] else "every scan failed" if t["n_failures"] == t["n_images"] \
        else "too few scans"


def auc_text(s: dict) -> str:
    """The malignancy AUC of a summary, or why it is not given: fewer than MIN_PER_CLASS scans of a class."""
    counts = {c: s["per_class"].get(c, {}).get("n", 0) for c in ("benign", "malignant")}
    if min(counts.values()) < MIN_PER_CLASS:
        return (f"n/a (not enough images for an AUC: {counts['benign']} benign, {counts['malignant']} malignant; "
                f"{MIN_PER_CLASS} of each needed)")
    return figure(s["malignancy_auc"], ".4f", "not enough images")


def write_history(run_dir, history: list[dict], best_epoch: int | None = None) -> None:
    """history.csv and curves.png (loss and validation figures per epoch, the best epoch marked), rewritten
    every epoch."""
    if not history:
        return
    fields = list(dict.fromkeys(k for h in history for k in h))  # (a resumed run's rows share the first's columns)
    storage.write_csv(run_dir / "history.csv", fields, [[h.get(k, "") for k in fields] for h in history])
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(11, 4.6))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [h["train_loss"] for h in history], label="training split (augmented)")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="validation split")
    ax1.set(xlabel="epoch", ylabel="training objective (seg + deep supervision + class)", title="Loss")
    ax2.plot(epochs, [h["val_lesion_dice"] for h in history], label="lesion Dice")
    ax2.plot(epochs, [h["val_lesion_iou"] for h in history], label="lesion IoU")
    sources = [k.split(":")[0] for k in history[0] if k.endswith(":val_score")]
    ax2.plot(epochs, [h["val_score"] for h in history], label="all-image Dice" + (", mean of the sources" if sources
                                                                               else "") + " (selects best.pt)")
    for source in sources:
        ax2.plot(epochs, [h[f"{source}:val_score"] for h in history], ls=":", label=f"{source}: all-image Dice")
    for source in [k.split(":")[0] for k in history[0] if k.endswith(":held_out_lesion_dice")]:
        ax2.plot(epochs, [h[f"{source}:held_out_lesion_dice"] for h in history], ls="--",
                 label=f"held out {source}: lesion Dice (chooses nothing)")
    if best_epoch is not None:
        ax2.axvline(best_epoch, color="grey", linestyle="--", linewidth=0.8, label=f"best.pt (epoch {best_epoch})")
    ax2.set(xlabel="epoch", ylabel="validation split, original resolution", title="Validation", ylim=(0, 1))
    for ax in (ax1, ax2):  # legends below the axes: they never cover a curve
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize="small", frameon=False)
    storage.save_figure(fig, run_dir / "curves.png")
