"""Evaluation: score a model on a split at each image's original resolution, and write the report that
--eval-only and the end of training share (metrics.json, the per-image CSV, the report figure, the summary)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe beside the Tk app

import augment
import checkpoints
import inference
import metrics
import storage
import tensor_cache
import trust
import utils
from inference import predict_batches, predict_images, probs_to_original


def evaluate(model: torch.nn.Module, data: dict, device: torch.device, dtype: torch.dtype | None = None,
             threshold: float = 0.5, batch_size: int = 32, tta: bool = False,
             class_names=utils.CLASSES, on_logits=None, with_aux: bool = False, fitted_trust: dict | None = None,
             trust_inputs: list | None = None, gate_mode: str = "apply") -> tuple[dict, list[dict]]:
    """Per-image Dice/IoU at each image's ORIGINAL resolution (prediction resized back), and their summary.

    `data` is a tensor_cache.subset(...) dict: images [N,1,S,S] uint8, labels, names, full_masks, full_sizes.
    `on_logits(start, outputs)` gets the model's raw outputs for every batch (validation computes its
    validation loss there, from the same forward pass). `fitted_trust` (a checkpoint's "trust" entry) adds
    trust, review, max_probability and lesion_probability to each record and calibrates the class
    probabilities; `trust_inputs`, a list, receives each batch's `trust.image_features` inputs (on the CPU).
    `gate_mode` (trust.gate_applies): "apply" scores the masks the "no lesion" gate empties as empty (the split of
    a source it was fitted on), "mark" scores the outlines as the model gives them.
    """
    return evaluate_thresholds(model, data, device, dtype, [threshold], batch_size, tta, class_names,
                               on_logits, with_aux, fitted_trust, trust_inputs, gate_mode)[threshold]


def ground_truth_on(data: dict, device: torch.device) -> list[torch.Tensor]:
    """The full-resolution bool masks of `data` on `device`, unpacked once and kept in `data` for later calls
    (validation runs every epoch; about 0.3 MB per BUSI image)."""
    key = f"ground_truth[{device}]"
    if key not in data:
        data[key] = [tensor_cache.unpack_mask(m, s).to(device) for m, s in zip(data["full_masks"], data["full_sizes"].tolist())]
    return data[key]


def evaluate_thresholds(model: torch.nn.Module, data: dict, device: torch.device, dtype: torch.dtype | None,
                        thresholds, batch_size: int = 32, tta: bool = False,
                        class_names=utils.CLASSES, on_logits=None, with_aux: bool = False,
                        fitted_trust: dict | None = None, trust_inputs: list | None = None,
                        gate_mode: str = "apply") -> dict:
    """`evaluate` for several thresholds from one inference pass: {threshold: (summary, records)}.

    The pixel counts stay on the device until one copy at the end: no host sync per image, so a GPU is not
    left idle while Python walks the split.
    """
    truths = ground_truth_on(data, device)
    cuts = torch.tensor(list(thresholds), dtype=torch.float32, device=device).view(-1, 1, 1)
    counts, class_probs, trust_rows, raw_malignancy, i = [], [], [], [], 0
    with_trust = fitted_trust is not None or trust_inputs is not None
    for batch in predict_batches(model, data["images"], device, dtype, batch_size, tta, with_logits=True,
                                 with_aux=with_aux, with_trust=with_trust):
        probs, cls = batch.seg, batch.cls
        if on_logits is not None:
            on_logits(i, batch.logits)
        if trust_inputs is not None:
            trust_inputs.append({k: None if v is None else v.cpu() for k, v in batch.extras.items()})
        gate = None
        if fitted_trust is not None:
            judged = inference.trust_of(batch.extras, fitted_trust, gate_mode)
            gate = judged.gated
            if cls is not None:
                raw_malignancy += metrics.malignancy_probability(cls).cpu().tolist()
                cls = trust.calibrated(cls, fitted_trust)
            nan = torch.full_like(judged.trust, float("nan"))
            trust_rows.append(torch.stack([judged.trust, probs.flatten(1).amax(1),
                                           nan if judged.presence is None else judged.presence, gate.float(),
                                           nan if judged.familiarity is None else judged.familiarity,
                                           judged.review.float(), judged.lesion_free.float()], 1))
        if cls is not None:
            class_probs.append(cls.float())
        for j in range(probs.shape[0]):
            gt = truths[i]
            preds = probs_to_original(probs[j], *gt.shape) > cuts  # [T,H,W], one per threshold
            if gate is not None:
                preds &= ~gate[j]  # the "no lesion" gate empties the mask
            counts.append(torch.stack([torch.logical_and(preds, gt).sum((1, 2)), preds.sum((1, 2)),
                                       gt.sum().expand(len(thresholds))], 1))  # [T,3]
            i += 1
    counts = torch.stack(counts).cpu().tolist() if counts else []  # [N,T,3]
    cls_all = torch.cat(class_probs).cpu() if class_probs else None
    scores = torch.cat(trust_rows).cpu().tolist() if trust_rows else None
    per_t: dict = {t: [] for t in thresholds}
    for i, per_image in enumerate(counts):
        extra = {}
        if cls_all is not None:
            extra = {"class_probs": cls_all[i].tolist(), "malignancy": float(metrics.malignancy_probability(cls_all[i],
                                                                                                   class_names))}
        if scores is not None:
            extra.update(trust=scores[i][0], review=bool(scores[i][5]),
                         max_probability=scores[i][1], gated=bool(scores[i][3]), lesion_free=bool(scores[i][6]),
                         **({"presence": scores[i][2]} if scores[i][2] == scores[i][2] else {}),
                         **({"familiarity": scores[i][4], "out_of_range": scores[i][4] > 1}
                            if scores[i][4] == scores[i][4] else {}),
                         malignancy_uncalibrated=raw_malignancy[i] if raw_malignancy else None)
            if cls_all is not None:
                extra["lesion_probability"] = 1 - extra["class_probs"][class_names.index("normal")]
        for t, (inter, pred, gt) in zip(thresholds, per_image):
            d, iou = metrics.dice_iou_from_counts(inter, pred, gt)
            per_t[t].append({"file": data["names"][i], "label": class_names[int(data["labels"][i])], "dice": d,
                             "iou": iou, "pred_pixels": pred, "gt_pixels": gt, "inter": inter, **extra,
                             **({"source": data["sources"][i]} if "sources" in data else {})})
    return {t: (summarize(records, class_names, scores is not None), records) for t, records in per_t.items()}


def summarize(records: list[dict], class_names=utils.CLASSES, with_trust: bool = False) -> dict:
    """`metrics.summarize` (+ the trust report), and with several sources the same per source under
    "per_source". "score" ranks checkpoints: the all-image Dice, with several sources the mean of theirs, so
    that a change that helps one hospital and hurts the other does not win."""
    summary = metrics.summarize(records, class_names)
    if with_trust:
        summary["trust"] = trust.report(records)
    sources = sorted({r["source"] for r in records if "source" in r})
    summary["score"] = summary["all_dice"]
    if len(sources) > 1:
        summary["per_source"] = {s: summarize([r for r in records if r["source"] == s], class_names, with_trust)
                                 for s in sources}
        summary["score"] = float(np.mean([v["all_dice"] for v in summary["per_source"].values()]))
    return summary


def fit_trust_entry(model: torch.nn.Module, train: dict, val: dict, device: torch.device,
                    dtype: torch.dtype | None, threshold: float, tta: bool, batch_size: int, source: str,
                    presence_keep: float = 0.0) -> tuple[dict, list[dict]]:
    """Fit the trust score and the class calibration (`trust.fit`): feature statistics on the TRAINING split;
    the regression and the review threshold on the VALIDATION split and on `trust.SHIFTED_COPIES` copies of it
    under the scanner transforms (so that the score sees outlines fail for the reasons scans from elsewhere make
    them fail); the temperatures on the validation split as it is. Returns the checkpoint's "trust" entry and
    the validation records as the model gives them (uncalibrated). With `presence_keep` > 0, first the "no lesion"
    gate (`trust.fit_presence`) on the validation split as it is, keeping that share of its lesion scans."""
    if len(val["names"]) == 0 or len(train["names"]) == 0:
        raise ValueError("the trust score needs training and validation images to be fitted on")
    train_extras = [{k: b.extras[k].cpu() for k in ("deep", "texture")} for b in
                    predict_batches(model, train["images"], device, dtype, batch_size, with_trust=True)]
    train_deep = torch.cat([e["deep"] for e in train_extras])
    inputs: list[dict] = []
    _, records = evaluate(model, val, device, dtype, threshold, batch_size, tta, trust_inputs=inputs)
    fit_records = [dict(r) for r in records]
    labels = val["labels"].tolist()
    for copy in range(trust.SHIFTED_COPIES):
        images, masks = shifted_copy(val, copy)
        i = 0
        for batch in predict_batches(model, images, device, dtype, batch_size, tta, with_trust=True):
            inputs.append({k: None if v is None else v.cpu() for k, v in batch.extras.items()})
            for pred in (batch.seg[:, 0] > threshold).cpu():
                truth = masks[i]
                inter, n_pred, n_gt = int((pred & truth).sum()), int(pred.sum()), int(truth.sum())
                fit_records.append({"label": utils.CLASSES[labels[i]] if n_gt else "normal", "pred_pixels": n_pred,
                                    "dice": metrics.dice_iou_from_counts(inter, n_pred, n_gt)[0]})
                i += 1
    joined = {k: None if inputs[0][k] is None else torch.cat([b[k] for b in inputs]) for k in inputs[0]}
    # the "no lesion" gate, on the validation split as it is; the trust score then describes the gated outlines
    x = trust.presence_inputs(joined["seg"], joined["cls"])
    n = len(records)
    presence = trust.fit_presence(x[:n].double().numpy(), np.array([r["label"] != "normal" for r in records]),
                                  np.array([r["pred_pixels"] > 0 for r in records]), presence_keep,
                                  f"the validation split ({n} images)")
    gate = trust.gated(trust.presence_probability(x, presence), presence) if presence else None
    if gate is not None:
        for r, g in zip(fit_records, gate.tolist()):
            if g:
                r["pred_pixels"], r["dice"] = 0, 1.0 if r["label"] == "normal" else 0.0
    fitted = trust.fit(train_deep, joined, fit_records, records, threshold, source, gate, presence)
    fitted["familiarity"] = trust.fit_familiarity(torch.cat([e["texture"] for e in train_extras]),
                                                  joined["texture"][:n], [r.get("source", "") for r in records],
                                                  familiarity_source(train))
    return fitted, records


def familiarity_source(train: dict) -> str:
    return (f"the training split ({len(train['names'])} images); range: {trust.FAMILIARITY_QUANTILE:.0%} of each "
            f"source's validation scans")


def fit_familiarity(model: torch.nn.Module, train: dict, val: dict, device: torch.device, dtype: torch.dtype | None,
                    batch_size: int) -> dict:
    """The familiarity entry alone (`trust.fit_familiarity`): texture statistics of the TRAINING split, the range
    from every source's VALIDATION scans."""
    texture = [inference.texture_of(model, part["images"], device, dtype, batch_size) for part in (train, val)]
    return trust.fit_familiarity(*texture, val.get("sources") or [""] * len(val["names"]), familiarity_source(train))


def fit_and_describe(model: torch.nn.Module, parts: dict, device: torch.device, dtype: torch.dtype | None,
                     threshold: float, tta: bool, batch_size: int, presence_keep: float, out_dir: Path,
                     scanner_of: dict[str, str] | None = None, prefix: str = "") -> tuple[dict, dict]:
    """`fit_trust_entry` on the parts' train and val, its figures (<prefix>calibration.png, <prefix>presence.png) and
    the validation split scored with the fitted entry (the gate applied; per source; per scanner where
    `scanner_of` names them): (the "trust" entry, that validation summary). The validation figures of the gate
    and the trust score are fitted on these very images: in-sample, so optimistic."""
    fitted, val_records = fit_trust_entry(model, parts["train"], parts["val"], device, dtype, threshold, tta,
                                          batch_size, "the validation split and shifted copies of it", presence_keep)
    if fitted.get("no_right_outline"):
        print(f"warning: {trust.NO_RIGHT_OUTLINE}", file=sys.stderr, flush=True)
    write_calibration_figure(out_dir / f"{prefix}calibration.png", val_records, fitted)
    if fitted.get("presence"):
        write_presence_figure(out_dir / f"{prefix}presence.png", fitted["presence"])
    summary, records = evaluate(model, parts["val"], device, dtype, threshold, batch_size, tta, fitted_trust=fitted)
    before, after = (summary["trust"].get(k, float("nan")) for k in ("malignancy_ece_uncalibrated", "malignancy_ece"))
    if after > before:  # a temperature fitted on a handful of scans can make it worse: say so, keep the record
        print(f"note: the malignancy calibration did not help on validation (calibration error {before:.3f} -> "
              f"{after:.3f}): too few lesion scans of each class to fit it on ({summary['n_lesion']} here)",
              file=sys.stderr, flush=True)
    by_scanner = sorted({scanner_of[r["file"]] for r in records if r["file"] in (scanner_of or {})})
    if by_scanner:
        summary["per_scanner"] = {d: summarize([r for r in records if scanner_of.get(r["file"]) == d])
                                  for d in by_scanner}
    return fitted, summary


SITE_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # coarse: a site's validation part holds few lesions
MIN_LESIONS_FOR_THRESHOLD = 5  # fewer validation lesion scans keep the threshold the model came with
THRESHOLD_MIN_GAIN = 0.01  # validation lesion Dice a new threshold must add: smaller gains of 8 lesion scans did not
                           # carry to the site's other scans in the simulation (docs/new_site.md)


def fit_threshold(model, val: dict, device, dtype, tta: bool, batch_size: int, current: float) -> tuple[float, dict]:
    """The mask threshold of SITE_THRESHOLDS with the best validation lesion Dice (a missed lesion counts 0;
    normal scans are the gate's to judge), where it beats `current` by THRESHOLD_MIN_GAIN at least: (threshold,
    the record of the fit). `current` stays below that gain, or with fewer than MIN_LESIONS_FOR_THRESHOLD
    validation lesion scans."""
    grid = sorted({*SITE_THRESHOLDS, current})
    runs = evaluate_thresholds(model, val, device, dtype, grid, batch_size, tta)
    dice = {t: round(runs[t][0]["lesion_dice"], 4) for t in grid}
    n = runs[current][0]["n_lesion"]
    best = max(SITE_THRESHOLDS, key=lambda t: (dice[t], -abs(t - current)))
    why = (f"fewer than {MIN_LESIONS_FOR_THRESHOLD} validation lesion scans" if n < MIN_LESIONS_FOR_THRESHOLD else
           f"no threshold adds {THRESHOLD_MIN_GAIN} lesion Dice" if round(dice[best] - dice[current], 4) <
           THRESHOLD_MIN_GAIN
           else None)
    record = {"on": "validation", "n_lesion": n, "before": current, "lesion_dice": {str(t): d for t, d in dice.items()}}
    return (current, {**record, "kept": why}) if why else (best, record)


def site_threshold(loaded: checkpoints.LoadedModel, val: dict, device, dtype, batch_size: int
                   ) -> checkpoints.LoadedModel:
    """The model at the mask threshold refitted on a site's validation part (`fit_threshold`, from its threshold,
    with the config's TTA), its config holding the threshold and the record of that fit, said in one line."""
    config = loaded.state.get("config") or {}
    threshold, fit = fit_threshold(loaded.model, val, device, dtype, bool(config.get("tta")), batch_size,
                                   loaded.threshold)
    print(f"mask threshold on the site's validation ({fit['n_lesion']} lesion scans): {threshold:g} (lesion Dice "
          f"{fit['lesion_dice']}{'; kept: ' + fit['kept'] if 'kept' in fit else ''})", flush=True)
    config = {**config, "threshold": threshold, "threshold_fit": fit}
    return dataclasses.replace(loaded.at_threshold(threshold), state={**loaded.state, "config": config})


NO_TEST_PART = "no source's split has a test part (score best.pt with --eval-only on data it never saw)"


def fit_then_test(run_dir: Path, parts: dict, scanner_of: dict, device: torch.device, hp, start: dict | None,
                  extra: dict) -> None:
    """The end of a training run: fit best.pt's trust score, "no lesion" gate, calibration and familiarity range
    on train and validation, store them in it, then test it ONCE on the sources that have a test part
    (metrics.json either way). A site run (`start`: the checkpoint it started from) fits its gate for the site
    (trust.gate_applies) and keeps `start`'s familiarity range (trust.site_entry)."""
    loaded = checkpoints.load_model(run_dir / "best.pt", device)
    best, best_state = loaded.model.to(memory_format=torch.channels_last), loaded.state  # (in place)
    if start is not None and "--threshold" not in hp.explicit:  # a site run: the site's threshold
        loaded = site_threshold(loaded, parts["val"], device, utils.inference_dtype(device, hp.amp),
                                hp.eval_batch_size)
        best_state["config"] = loaded.state["config"]
        hp = dataclasses.replace(hp, threshold=loaded.threshold)
        extra = {**extra, "config": best_state["config"]}
    fitted, val_summary = fit_and_describe(best, parts, device, utils.inference_dtype(device, hp.amp), hp.threshold,
                                           hp.tta, hp.eval_batch_size, hp.presence_keep, run_dir, scanner_of)
    if start is not None:
        fitted = trust.site_entry(fitted, start.get("trust"))
    checkpoints.save_checkpoint({**best_state, "trust": fitted}, run_dir / "best.pt")
    print_summary("validation with the fitted gate (in-sample for the gate and trust)", val_summary)
    extra = {**extra, "val_fitted": val_summary, "checkpoint": str(run_dir / "best.pt")}
    if not len(parts.get("test", {}).get("names", [])):
        storage.write_json(run_dir / "metrics.json", {"test": None, "why_no_test": NO_TEST_PART, **extra})
        print(f"no test evaluation: {NO_TEST_PART}; wrote {run_dir}/metrics.json", flush=True)
        return
    report(best, parts["test"], run_dir, "test", hp, device, extra, fitted)


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


def shifted_copy(data: dict, copy: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images (uint8) and masks (bool) at the model's size under the training augmentation plus the
    scanner transforms at strength 1 + copy / 2, drawn from a fixed seed per copy (the same every time)."""
    cfg = augment.AugmentConfig().with_scanner(1.0 + copy / 2)
    x, y = augment.augment_batch(data["images"].cpu(), data["masks"].cpu(), cfg,
                                 torch.Generator().manual_seed(1000 + copy), torch.Generator().manual_seed(2000 + copy))
    return (x * 255).round().to(torch.uint8), y[:, 0] > 0.5


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
            points = np.array(trust.reliability(p, y)).reshape(-1, 3)  # (no lesion scans: no points)
            ece = trust.expected_calibration_error(p, y)
            line, = ax.plot(points[:, 0], points[:, 1], "-", label=f"{label}: ECE {ece:.3f}")
            ax.scatter(points[:, 0], points[:, 1], s=8 + 4 * points[:, 2], color=line.get_color())  # area: images
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        what = "malignant, lesion scans" if name == "malignancy" else "a lesion, all scans"
        ax.set(xlabel=f"predicted probability ({name})", ylabel=f"observed frequency ({what})", xlim=(0, 1),
               ylim=(0, 1), title=f"{name} probability, validation split")
        ax.legend(loc="upper left", title="10 bins; dot area: images", fontsize=8, title_fontsize=8)
    storage.save_figure(fig, path)
    return True


def evaluate_checkpoint(hp, loaded: checkpoints.LoadedModel, part: dict, sources: list, run_dir: Path, device,
                        config: dict) -> int:
    """--eval-only: one evaluation. The "no lesion" gate empties masks at the hospitals it was fitted at (the
    checkpoint's sources) and where trust.gate_applies says so; elsewhere it only marks."""
    model, state, fitted, why_not = loaded.model, loaded.state, loaded.trust, loaded.why_no_trust
    if why_not:
        print(f"warning: {hp.checkpoint}: {why_not}", file=sys.stderr)
    own = checkpoints.trained_on(state, sources)
    report(model, part, run_dir, hp.eval_split, hp, device,
           {"checkpoint": str(hp.checkpoint), "best_epoch": state.get("best_epoch"), "config": config,
            "val_at_best": state.get("best_val"), "gate": "applied" if own or trust.gate_applies(
                fitted, "auto") else "marked only (fitted at other hospitals)"},
           fitted, "apply" if own else "auto")
    return 0


def report(model, data, run_dir, split, hp, device, extra, fitted_trust=None, gate_mode: str = "apply") -> dict:
    """One evaluation of `model` on a split at the run's threshold and TTA (`hp`), with trust scores and the "no
    lesion" gate where the checkpoint has them (`gate_mode`: trust.gate_applies): written (`write_report`), printed,
    returned."""
    summary, records = evaluate(model, data, device, utils.inference_dtype(device, hp.amp), hp.threshold,
                                hp.eval_batch_size, hp.tta, fitted_trust=fitted_trust, gate_mode=gate_mode)
    write_report(run_dir, summary, records, extra, split)
    print_summary(f"{split} ({extra['checkpoint']}{', flip TTA' if hp.tta else ''}, threshold {hp.threshold})",
                  summary)
    print(f"wrote {run_dir}/: metrics.json {split}_predictions.csv {split}_report.png")
    return summary


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
    """Why a trust report (trust.report) has no failure AUROC, in its own words."""
    return "no failures" if not t["n_failures"] else "every scan failed" if t["n_failures"] == t["n_images"] \
        else "too few scans"


def auc_text(s: dict) -> str:
    """The malignancy AUC of a summary, or why it is not given: fewer than MIN_PER_CLASS scans of a class."""
    counts = {c: s["per_class"].get(c, {}).get("n", 0) for c in ("benign", "malignant")}
    if min(counts.values()) < MIN_PER_CLASS:
        return (f"n/a (not enough images for an AUC: {counts['benign']} benign, {counts['malignant']} malignant; "
                f"{MIN_PER_CLASS} of each needed)")
    return figure(s["malignancy_auc"], ".4f", "not enough images")


# --------------------------------------------------------------------------------------------------------------
# Parity: the torch and onnxruntime paths on the same scans (export_onnx.py, bench_busi.py)
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
