"""Evaluation: score a model on a split at each image's original resolution; fit what is fitted on validation
after training (trust score, "no lesion" gate, calibration, familiarity, a site's threshold) and run the one test
evaluation that --eval-only and the end of training share. What it writes and prints: reports.py."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

import augment
import checkpoints
import inference
import metrics
import reports
import storage
import tensor_cache
import trust
import utils
from inference import predict_batches, probs_to_original


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
        data[key] = [tensor_cache.unpack_mask(m, s).to(device)
                     for m, s in zip(data["full_masks"], data["full_sizes"].tolist())]
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
        summary["trust"] = metrics.trust_report(records)
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
    reports.write_calibration_figure(out_dir / f"{prefix}calibration.png", val_records, fitted)
    if fitted.get("presence"):
        reports.write_presence_figure(out_dir / f"{prefix}presence.png", fitted["presence"])
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
    reports.print_summary("validation with the fitted gate (in-sample for the gate and trust)", val_summary)
    extra = {**extra, "val_fitted": val_summary, "checkpoint": str(run_dir / "best.pt")}
    if not len(parts.get("test", {}).get("names", [])):
        storage.write_json(run_dir / "metrics.json", {"test": None, "why_no_test": NO_TEST_PART, **extra})
        print(f"no test evaluation: {NO_TEST_PART}; wrote {run_dir}/metrics.json", flush=True)
        return
    report(best, parts["test"], run_dir, "test", hp, device, extra, fitted)


def shifted_copy(data: dict, copy: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images (uint8) and masks (bool) at the model's size under the training augmentation plus the
    scanner transforms at strength 1 + copy / 2, drawn from a fixed seed per copy (the same every time)."""
    cfg = augment.AugmentConfig().with_scanner(1.0 + copy / 2)
    x, y = augment.augment_batch(data["images"].cpu(), data["masks"].cpu(), cfg,
                                 torch.Generator().manual_seed(1000 + copy), torch.Generator().manual_seed(2000 + copy))
    return (x * 255).round().to(torch.uint8), y[:, 0] > 0.5


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
    reports.write_report(run_dir, summary, records, extra, split)
    reports.print_summary(f"{split} ({extra['checkpoint']}{', flip TTA' if hp.tta else ''}, threshold {hp.threshold})",
                  summary)
    print(f"wrote {run_dir}/: metrics.json {split}_predictions.csv {split}_report.png")
    return summary
