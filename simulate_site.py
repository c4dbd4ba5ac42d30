"""The new-site simulation that chose adapt.py's and the site recipe's defaults: one hospital plays the new site.

    python simulate_site.py --checkpoint SRC.pt --site-data PATH/BUS-BRA --out sim_busbra.json
    python simulate_site.py --checkpoint SRC.pt --site-data PATH/Dataset_BUSI_with_GT --out sim_busi.json \
        --labelled 5 10 20 40 --seeds 42 43

A model trained on the other hospital alone (SRC.pt) meets the site. The site's committed split decides everything:
its TRAIN part stands for the site's own scans (unlabelled for adapt.py, or N labelled patients for a fine-tune,
drawn by seed), its VALIDATION part is where every configuration is scored (never seen by any of them; no test part
is read). Scored: lesion Dice, missed lesions and normal scans outlined, with the masks as the model gives them (no
"no lesion" gate) and with the default gate rule; each configuration's scores are kept for the curves of normal
scans outlined against missed lesions. Writes --out (JSON, a new file) and prints the table. Research use only.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import storage
import utils  # (torch-free: --help is answered before torch loads, below)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="One hospital plays a new site for a model trained on the other: "
                                "unadapted, adapt.py at several mixing weights and scan counts, and fine-tunes "
                                "with N labelled patients; scored on the site's validation split.")
    p.add_argument("--checkpoint", help="a model trained without the site's scans (required unless --table)")
    p.add_argument("--site-data", help="the site's data folder (BUSI layout; required unless --table)")
    p.add_argument("--site-split", default=None, help="its split (default: the committed split that lists its "
                                                      "images)")
    p.add_argument("--patient-pattern", default=None, help="how file names name patients (dataset.py's option; "
                                                           "default: BUS-BRA's bus_NNNN where it matches, else each "
                                                           "near-duplicate group is a patient)")
    p.add_argument("--unadapted", action=argparse.BooleanOptionalAction, default=True,
                   help="score the model as it is too (default: yes)")
    p.add_argument("--alphas", nargs="*", type=float, default=[0.5, 1.0], help="adapt.py's mixing weights to try")
    p.add_argument("--scan-counts", nargs="*", type=int, default=[16, 64],
                   help="numbers of the site's scans to adapt on (adapt.py's default alpha)")
    p.add_argument("--labelled", nargs="*", type=int, default=[], help="labelled patients per fine-tune")
    p.add_argument("--seeds", nargs="*", type=int, default=[42], help="seeds of the patient draw and fine-tune")
    p.add_argument("--recipe-flags", default="", help="extra train_unet_busi.py flags of every fine-tune")
    p.add_argument("--work-dir", default="checkpoints/simulation", help="where the adapted and fine-tuned models go")
    p.add_argument("--out", required=True, help="the results (JSON; an existing file is never replaced); with "
                                                "--table: the figure (PNG)")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="instead of running: print the Markdown table of these results and draw, into --out, normal "
                        "scans outlined against missed lesions over every cut of the mask's maximum probability")
    return p


if __name__ == "__main__":
    utils.answer_help_early(build_parser)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoints  # noqa: E402
import dataset  # noqa: E402
import image_io
import splitting
import evaluation  # noqa: E402
import metrics  # noqa: E402
import trust  # noqa: E402

BUSBRA_PATIENT = r"^(bus_[0-9]+)-"
HERE = Path(__file__).resolve().parent


def score(loaded: checkpoints.LoadedModel, val: dict) -> dict:
    """The validation figures of one configuration, without a gate and with the default gate rule."""
    out = {}
    for rule in ("mark", "auto") if trust.gate_applies(loaded.trust, "auto") else ("mark",):
        summary, records = evaluation.evaluate(loaded.model, val, torch.device("cpu"), None, loaded.threshold, 32,
                                               fitted_trust=loaded.trust, gate_mode=rule)
        key = "no_gate" if rule == "mark" else "default_gate"
        out[key] = {k: summary[k] for k in ("lesion_dice", "missed_lesions", "n_lesion", "normal_fp_rate",
                                           "all_dice")}
        out[key]["n_normal"] = sum(r["label"] == "normal" for r in records)
        out[key]["malignancy_auc"] = summary.get("malignancy_auc")
        if rule == "mark":
            out["curve_inputs"] = [[r["label"], r["pred_pixels"] > 0, r.get("max_probability"), r.get("presence"),
                                    r["dice"]] for r in records]
            out["out_of_range"] = (float(np.mean([r["out_of_range"] for r in records]))
                                   if "out_of_range" in records[0] else None)
    out.setdefault("default_gate", out["no_gate"])  # a gate fitted elsewhere only marks scans: the same masks
    return out


def run_adapt(checkpoint: str, files: list[str], alpha: float | None, out: Path):
    """adapt.py on `files` (its default alpha for None; its minimum scan count lowered to what is asked): (the
    adapted model, minutes)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)  # the simulation's own file of an earlier, interrupted run
    command = [sys.executable, str(HERE / "adapt.py"), "--checkpoint", checkpoint, "--output", str(out),
               "--site", "SITE", "--min-scans", "1", *(["--alpha", str(alpha)] if alpha is not None else []),
               "--scans", *files]
    t0 = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return checkpoints.load_model(out), (time.perf_counter() - t0) / 60


def patients(names: list[str], pattern: str | None, data_dir: Path) -> list[list[str]]:
    """The site's training images grouped by patient (the pattern), else by near-duplicate group (a scan with no
    near-duplicate is a patient of its own)."""
    import re
    if pattern:
        groups: dict[str, list[str]] = {}
        for n in names:
            m = re.match(pattern, Path(n).name)
            groups.setdefault(m.group(1) if m else n, []).append(n)
        return [sorted(g) for _, g in sorted(groups.items())]
    samples = [s for s in image_io.discover_samples(data_dir) if s.image in set(names)]
    hashes = {s.image: splitting.perceptual_hash(image_io.load_sample(data_dir, s)[0]) for s in samples}
    groups = splitting.duplicate_groups(hashes)
    grouped = {n for g in groups for n in g}
    return sorted([sorted(g) for g in groups] + [[n] for n in hashes if n not in grouped])  # a lone scan too


def fine_tune(args, site: Path, split: dict, chosen: list[list[str]], seed: int, tag: str) -> tuple[Path, float]:
    """train_unet_busi.py --init-from on the chosen patients' images (a fifth of the patients, at least one, as
    the site's validation part), in a run folder of its own: (its best.pt, minutes)."""
    rng = random.Random(seed)
    order = chosen[:]
    rng.shuffle(order)
    n_val = max(1, round(len(order) / 5))
    own = {"train": sorted(n for g in order[n_val:] for n in g), "val": sorted(n for g in order[:n_val] for n in g),
           "test": [], "method": f"simulate_site.py: {len(order)} patients of the site's train part, seed {seed}"}
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    split_file = work / f"{tag}_split.json"
    splitting.write_split(own, split_file)
    command = [sys.executable, str(HERE / "train_unet_busi.py"), "--init-from", args.checkpoint, "--data-dir",
               f"SITE={site}", "--split-file", f"SITE={split_file}", "--output-dir", str(work), "--run-name", tag,
               "--seed", str(seed), *shlex.split(args.recipe_flags)]
    print("$ " + " ".join(map(shlex.quote, command)), flush=True)
    t0 = time.perf_counter()
    with open(work / f"{tag}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    return work / tag / "best.pt", (time.perf_counter() - t0) / 60


def fine_tune_facts(loaded: checkpoints.LoadedModel, val: dict, run_dir: Path) -> dict:
    """What a fine-tune chose (its threshold, fitted on its own validation part) and what that choice did: the
    site's validation at 0.5 too, and the figures of any held-out source (the training hospital kept in the mix
    or only watched) at the chosen epoch."""
    import csv
    state = loaded.state
    summary, _ = evaluation.evaluate(loaded.model, val, torch.device("cpu"), None, 0.5, 32)
    with open(run_dir / "history.csv", newline="") as f:
        row = list(csv.DictReader(f))[state["best_epoch"] - 1]
    held = {k: v for k, v in row.items() if ":held_out_" in k}
    return {"threshold": loaded.threshold, "at_0.5": {k: summary[k] for k in ("lesion_dice", "missed_lesions")},
            "held_out_at_best": held, "best_epoch": state["best_epoch"]}


def label(run: dict) -> str:
    """A configuration's name in the table and the figure."""
    if run["kind"] == "unadapted":
        return "unadapted"
    if run["kind"] == "adapt":
        return f"adapt.py, alpha {run['alpha']:g}, all {run['scans']} scans"
    if run["kind"] == "adapt_n":
        return f"adapt.py, {run['scans']} scans (seed {run['seed']})"
    return (f"fine-tune ({run.get('recipe', 'site')}), {run['patients']} patients ({run['images']} scans), "
            f"seed {run['seed']}")


def table(files: list[str], figure: Path) -> int:
    """The Markdown table of simulation results, and the figure of their curves where the site has normal scans."""
    from matplotlib.figure import Figure
    print("| site | configuration | lesion Dice | missed lesions | normal scans outlined | with the default gate | "
          "out of range | minutes |")
    print("|---|---|---|---|---|---|---|---|")
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    drawn = 0
    for file in files:
        results = json.loads(Path(file).read_text())
        site = Path(results["site"]).name
        for run in results["runs"]:
            g, d = run["score"]["no_gate"], run["score"]["default_gate"]
            normals = (f"{g['normal_fp_rate']:.0%} of {g['n_normal']}" if g["n_normal"] else "-")
            gated = (f"{d['lesion_dice']:.3f}, {d['missed_lesions']} missed"
                     + (f", {d['normal_fp_rate']:.0%} outlined" if d["n_normal"] else "")) if d != g else "(not applied)"
            out = run["score"].get("out_of_range")
            minutes = f"{run['minutes']:.1f}" if "minutes" in run else "-"
            print(f"| {site} | {label(run)} | {g['lesion_dice']:.3f} | {g['missed_lesions']} of {g['n_lesion']} | "
                  f"{normals} | {gated} | {'-' if out is None else f'{out:.0%}'} | {minutes} |")
            if g["n_normal"] and (run["kind"] == "unadapted" or (run["kind"] == "adapt" and run["alpha"] == 1.0)
                                  or (run["kind"] == "fine_tune" and run["patients"] >= 40)):  # a readable few
                c = metrics.missed_and_outlined([(i[0] != "normal", i[1], i[2])
                                                 for i in run["score"]["curve_inputs"]])
                ax.plot(100 * c[:, 0], 100 * c[:, 1], lw=1.2, label=f"{site}: {label(run)}")
                drawn += 1
    if drawn:
        ax.set(xlabel="lesion scans missed (%)", ylabel="normal scans outlined (%)", xlim=(0, 60), ylim=(0, 100),
               title="The site's validation scans, every cut of the mask's maximum probability")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(figure, dpi=110)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out_path = Path(args.out)
    if out_path.exists():
        print(f"error: {out_path} exists (nothing is overwritten)", file=sys.stderr)
        return 2
    if args.table:
        return table(args.table, out_path)
    if not args.checkpoint or not args.site_data:
        print("error: --checkpoint and --site-data are needed (or --table)", file=sys.stderr)
        return 2
    site = Path(args.site_data)
    source = checkpoints.load_model(args.checkpoint)
    size = source.image_size
    parts, _ = dataset.load_parts([("SITE", site)], [args.site_split] if args.site_split else None, size, ".cache",
                                  None)
    val, train = parts["val"], parts["train"]
    results = {"checkpoint": args.checkpoint, "site": str(site), "n_val": len(val["names"]),
               "n_train_scans": len(train["names"]), "runs": []}

    def record(kind: str, **fields):
        results["runs"].append({"kind": kind, **fields})
        row = results["runs"][-1]
        g = row["score"]["no_gate"]
        print(f"{kind:10s} {json.dumps({k: v for k, v in fields.items() if k != 'score'})}: lesion Dice "
              f"{g['lesion_dice']:.3f}, missed {g['missed_lesions']}/{g['n_lesion']}, normals outlined "
              f"{g['normal_fp_rate']:.2f} of {g['n_normal']}; out of range {row['score']['out_of_range']}",
              flush=True)
        storage.write_json(out_path, results)

    if args.unadapted:
        record("unadapted", score=score(source, val))
    files = [str(site / n) for n in train["names"]]  # the site's own scans, unlabelled
    work = Path(args.work_dir)
    for alpha in args.alphas:
        adapted, minutes = run_adapt(args.checkpoint, files, alpha, work / f"{out_path.stem}_a{alpha:g}.pt")
        record("adapt", alpha=alpha, scans=len(files), score=score(adapted, val), minutes=minutes)
    for count in args.scan_counts:
        for seed in args.seeds:
            pick = sorted(random.Random(seed).sample(files, min(count, len(files))))
            adapted, _ = run_adapt(args.checkpoint, pick, None, work / f"{out_path.stem}_n{count}_s{seed}.pt")
            record("adapt_n", scans=count, seed=seed, score=score(adapted, val))
    if args.labelled:
        names = [n for n in train["names"]]
        pattern = args.patient_pattern or (BUSBRA_PATIENT if any(
            __import__("re").match(BUSBRA_PATIENT, Path(n).name) for n in names) else None)
        groups = patients(names, pattern, site)
        for n in args.labelled:
            for seed in args.seeds:
                chosen = random.Random(seed).sample(groups, min(n, len(groups)))
                best, minutes = fine_tune(args, site, {}, chosen, seed, f"{out_path.stem}_n{n}_s{seed}")
                tuned = checkpoints.load_model(best)
                record("fine_tune", patients=n, seed=seed, images=sum(map(len, chosen)), minutes=minutes,
                       recipe=args.recipe_flags or "site", score=score(tuned, val),
                       **fine_tune_facts(tuned, val, best.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
