"""Fit the trust score, the "no lesion" gate and the calibration of a trained checkpoint on its own splits, and
write the checkpoint with them as a NEW file (training does this itself at its end; trust.py is the maths).

    python fit_trust.py --checkpoint OLD.pt --output NEW.pt       # the data and splits the checkpoint records
    python fit_trust.py --checkpoint OLD.pt --data-dir PATH/Dataset_BUSI_with_GT PATH/BUS-BRA --output NEW.pt
    python fit_trust.py --checkpoint OLD.pt --data-dir SITE --split-file SITE_split.json --output SITE.pt

With a site's own labelled scans (data the checkpoint was not trained on), the mask threshold (where a clear gain
says so; evaluation.fit_threshold), the gate, trust score and calibration are fitted on them (the familiarity range
stays the checkpoint's), and the "no lesion" gate then empties masks by default (its scope: the site).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import utils  # (torch-free: --help is answered before torch loads, below)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Fit the per-image trust score, the 'no lesion' gate and the "
                                     "calibration of the class probabilities of a trained checkpoint on its own "
                                     "splits (feature statistics on train, the rest on validation; the test split is "
                                     "not read) and write the checkpoint with them as a NEW file. Training does this "
                                     "itself at its end.")
    parser.add_argument("--checkpoint", required=True, help="a run's best.pt or an exported model")
    parser.add_argument("--data-dir", nargs="+", action="extend", default=None,  # given twice: both
                        help="the sources the checkpoint was trained on (folders or bundles, PATH or NAME=PATH; "
                             "default: those it records)")
    parser.add_argument("--split-file", nargs="+", action="extend", default=None,
                        help="their splits (PATH or NAME=PATH; default: those the checkpoint records, else the "
                             "committed split that lists a source's images)")
    parser.add_argument("--presence-keep", type=utils.unit_fraction, default=None,
                        help="the 'no lesion' gate keeps this share of validation lesion scans (0: no gate; "
                             "default: the checkpoint's presence_keep, else 0.98)")
    parser.add_argument("--threshold", type=utils.probability, default=None,
                        help="the mask threshold to fit at (default: the checkpoint's; with a site's scans the "
                             "checkpoint was not trained on, the one with the best lesion Dice on their validation)")
    parser.add_argument("--output", required=True, help="the new checkpoint (an existing file is never replaced); "
                        "the figures of the validation split (<stem>_calibration.png, <stem>_presence.png) are "
                        "written beside it, never over existing ones")
    parser.add_argument("--familiarity-only", action="store_true",
                        help="fit only the familiarity range (out-of-range scans) and keep the rest of the "
                             "checkpoint's trust entry as it is (about a third of the forward passes)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    return parser


if __name__ == "__main__":
    utils.answer_help_early(build_parser)

import checkpoints  # noqa: E402
import dataset  # noqa: E402
import evaluation  # noqa: E402
import reports  # noqa: E402
import trust  # noqa: E402


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        out = Path(args.output)
        if out.exists():
            raise ValueError(f"{out} exists: give a new file name (nothing is overwritten)")
        if args.familiarity_only and args.threshold is not None:
            raise ValueError("--familiarity-only keeps the trust entry fitted at the checkpoint's threshold: drop "
                             "--threshold, or refit it all without --familiarity-only")
        figure = out.with_name(out.stem + "_")
        if any(Path(f"{figure}{n}.png").exists() for n in ("calibration", "presence")):
            raise ValueError(f"{figure}calibration.png or {figure}presence.png exists: give a new --output name "
                             f"(nothing is overwritten)")
        device = utils.pick_device(args.device)
        loaded = checkpoints.load_model(args.checkpoint, device)
        model, state, size, threshold = loaded.model, loaded.state, loaded.image_size, loaded.threshold
        config = state.get("config") or {}
        recorded, splits = dataset.recorded_sources(config, check_data=not args.data_dir)
        sources = dataset.resolve_sources(args.data_dir or recorded, announce=False) if args.data_dir or recorded \
            else None
        if not sources:
            raise ValueError(f"{args.checkpoint} records no data folder: pass --data-dir")
        names = {n for n, _ in sources}
        splits = args.split_file or [s for s in splits or [] if "=" not in s or s.split("=", 1)[0] in names]
        parts, _ = dataset.load_parts(sources, splits, size, ".cache", None)
        chosen = [n for n in utils.source_names(config.get("select_on", "")) if n in names] or sorted(names)
        parts = {k: dataset.of_sources(v, chosen) for k, v in parts.items()}  # the sources that chose best.pt
        # another site's labelled scans: its own threshold and gate
        site = not checkpoints.trained_on(state, [(n, p) for n, p in sources if n in chosen])
        if args.threshold is not None:
            threshold = args.threshold
            state = {**state, "config": {**{k: v for k, v in config.items() if k != "threshold_fit"},
                                         "threshold": threshold}}
            loaded = dataclasses.replace(loaded.at_threshold(threshold), state=state)
        elif site and not args.familiarity_only:
            loaded = evaluation.site_threshold(loaded, parts["val"], device, utils.inference_dtype(device), 32)
            state, threshold = loaded.state, loaded.threshold
        keep = args.presence_keep if args.presence_keep is not None else float(config.get("presence_keep", 0.98))
        if args.familiarity_only:
            fitted, why_not = loaded.trust, loaded.why_no_trust
            if why_not:
                raise ValueError(f"{args.checkpoint}: {why_not}")
            familiar = evaluation.fit_familiarity(model, parts["train"], parts["val"], device,
                                                  utils.inference_dtype(device), 32)
            checkpoints.save_checkpoint({**state, "trust": {**fitted, "familiarity": familiar}}, out)
            print(f"wrote {out}: familiarity range {familiar['cut']:.3f} (in range: "
                  + ", ".join(f"{k or 'validation'} {v:.1%}" for k, v in familiar["in_range"].items()) + ")")
            return 0
        fitted, summary = evaluation.fit_and_describe(model, parts, device, utils.inference_dtype(device), threshold,
                                                      bool(config.get("tta")), 32, keep, out.parent,
                                                      dataset.scanners(sources), prefix=out.stem + "_")
        if site:
            fitted = trust.site_entry(fitted, state.get("trust"))
        checkpoints.save_checkpoint({**state, "trust": fitted}, out)
        reports.print_summary("validation with the fitted entry (in-sample for the gate and trust)", summary)
        figure = f"{figure}calibration.png" + (f" and {figure}presence.png" if fitted.get("presence") else "")
    except (utils.DataError, checkpoints.CheckpointError, ValueError, OSError) as exc:
        print(f"error: {utils.printable(exc)}", file=sys.stderr)
        return 2
    gate = fitted.get("presence")
    gate = (f"'no lesion' gate: {gate['candidate']}, cut {gate['cut']:.3f}, validation normal FP "
            f"{gate['normal_fp_rate']:.0%} (95 % interval {gate['normal_fp_rate_interval'][0]:.0%}-"
            f"{gate['normal_fp_rate_interval'][1]:.0%}), lesion scans missed {gate['missed_rate']:.1%}; ") if gate else ""
    print(f"wrote {out} (trust fitted on {fitted['n_fit']} images, {fitted['n_failures']} failures; review below "
          f"{fitted['review_below']:.3f}; {gate}temperatures {fitted.get('temperatures')}) and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
