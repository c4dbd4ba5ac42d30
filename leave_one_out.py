"""Leave one hospital out: with two hospitals, each plays the one a model has never seen.

    python leave_one_out.py --busi PATH/Dataset_BUSI_with_GT --busbra PATH/BUS-BRA --seeds 42 43
    python leave_one_out.py --busi ... --busbra ... --lever noscan --recipe-flags "--scanner-augment 0"
    python leave_one_out.py --table checkpoints/loho/loho_* --out leave_one_out.png

A lever's runs: train_unet_busi.py on BUSI alone with BUS-BRA's validation split held out, and on BUS-BRA alone with
BUSI's held out (`--select-on`, `--repeat OTHER=0`, the committed splits), per seed, into <work-dir>/loho_<direction>
[_<lever>]_s<seed>. A run's history.csv logs the held-out hospital's figures at every epoch; they never choose its
checkpoint. A run that exists is kept (a killed one is resumed). --table prints, per run and per lever, the held-out
figures at the epoch the run's own validation chose, their mean over the two directions (what a recipe choice is
made on) beside the in-hospital validation (the floor), and the ensemble of a lever's seeds (threshold 0.5, no
TTA); it draws the held-out lesion Dice per epoch and, on BUSI's validation scans, normal scans outlined against
lesions missed. The table reads no test part (a run trained on BUSI still ends, as every run does, with one
evaluation of BUSI test in its own folder; it chooses nothing here). Research use only.
"""
from __future__ import annotations

import argparse
import csv
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import storage
import utils  # (torch-free: --help is answered before torch loads, below)

DIRECTIONS = ("busi", "busbra")  # trained on BUSI (BUS-BRA held out), trained on BUS-BRA (BUSI held out)
RUN_NAME = re.compile(r"loho_(busi|busbra)(?:_(.+?))?_s(\d+)$")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Leave one hospital out: train on BUSI alone and on BUS-BRA alone, the "
                                "other hospital's validation split scored every epoch as held out; or print the "
                                "table of such runs (--table).")
    p.add_argument("--busi", help="BUSI's folder (Dataset_BUSI_with_GT)")
    p.add_argument("--busbra", help="BUS-BRA's folder")
    p.add_argument("--lever", default="", help="the name of what --recipe-flags change (run folder names; '' = "
                                               "the default recipe)")
    p.add_argument("--recipe-flags", default="", help="train_unet_busi.py flags of every run of this lever")
    p.add_argument("--seeds", nargs="+", type=int, default=[42], help="seeds (default: %(default)s)")
    p.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=list(DIRECTIONS),
                   help="busi: trained on BUSI, BUS-BRA held out; busbra: the other way (default: both)")
    p.add_argument("--work-dir", default="checkpoints/loho", help="parent of the run folders (default: %(default)s)")
    p.add_argument("--table", nargs="+", metavar="RUN", help="instead of training: the table of these run folders")
    p.add_argument("--out", default=None, help="with --table: the figure (PNG; an existing file is never replaced)")
    return p


if __name__ == "__main__":
    utils.answer_help_early(build_parser)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoints  # noqa: E402
import dataset  # noqa: E402
import evaluation  # noqa: E402
import metrics  # noqa: E402
import unet  # noqa: E402

HERE = Path(__file__).resolve().parent


def train(args) -> int:
    """Each seed's runs, one after the other, as train_unet_busi.py commands (their own logs beside them)."""
    folders = {"busi": Path(args.busi), "busbra": Path(args.busbra)}
    names = {d: dataset.default_source_name(p) for d, p in folders.items()}
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for direction in args.directions:
            other = next(d for d in DIRECTIONS if d != direction)
            run = work / f"loho_{direction}{'_' + args.lever if args.lever else ''}_s{seed}"
            if (run / "metrics.json").is_file():
                print(f"{run}: done already (kept)", flush=True)
                continue
            command = [sys.executable, str(HERE / "train_unet_busi.py")]
            if (run / "latest.pt").is_file():  # (the flags again: a resume takes no Settings from the run)
                command += ["--resume", str(run), *shlex.split(args.recipe_flags)]
            else:
                command += ["--data-dir", str(folders[direction]), str(folders[other]), "--select-on",
                            names[direction], "--repeat", f"normal=4,{names[other]}=0", "--seed", str(seed),
                            "--output-dir", str(work), "--run-name", run.name, *shlex.split(args.recipe_flags)]
            print("$ " + " ".join(map(shlex.quote, command)), flush=True)
            t0 = time.perf_counter()
            with open(work / f"{run.name}.log", "a") as log:
                done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                print(f"error: {run.name} exited with {done.returncode}: see {work / run.name}.log", file=sys.stderr)
                return done.returncode
            print(f"{run.name}: {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return 0


def read_run(folder: Path) -> dict:
    """A run's facts: direction, lever, seed, its history, its best epoch and the sources it held out."""
    match = RUN_NAME.match(folder.name)
    if match is None:
        raise ValueError(f"{folder}: not a run of this command (loho_<direction>[_<lever>]_s<seed>)")
    state = checkpoints.load_checkpoint(folder / "best.pt")
    config = state.get("config") or {}
    sources = dict(spec.split("=", 1) for spec in config.get("data_dir", []))
    chosen = [n for n in str(config.get("select_on", "")).split(",") if n]
    held = [n for n in sources if n not in chosen]
    if len(chosen) != 1 or len(held) != 1:
        raise ValueError(f"{folder}: trains on {chosen or 'every source'}: not a leave-one-out run")
    with open(folder / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    splits = {n: f"{n}={p}" for n, p in (config.get("split_file") or {}).items() if str(p).endswith(".json")}
    return {"folder": folder, "direction": match.group(1), "lever": match.group(2) or "default", "splits": splits,
            "seed": int(match.group(3)), "history": history, "best_epoch": state["best_epoch"], "state": state,
            "own": (chosen[0], Path(sources[chosen[0]])), "held": (held[0], Path(sources[held[0]])),
            "image_size": checkpoints.input_size(state)}


def val_part(run: dict, which: str, cache: dict) -> dict:
    """The validation split of a run's own ("own") or held-out ("held") hospital, as the run recorded it, decoded
    once per size."""
    source = run[which]
    split = run["splits"].get(source[0])
    key = (source, split, run["image_size"])
    if key not in cache:
        cache[key] = dataset.load_parts([source], [split] if split else None, run["image_size"], ".cache", None,
                                        only="val")[0]["val"]
    return cache[key]


def scored(model, part: dict) -> tuple[dict, list]:
    """Lesion Dice, missed lesions, normal scans outlined on `part` (threshold 0.5, no gate), and its records with
    each scan's maximum lesion probability."""
    peaks: list = []
    summary, records = evaluation.evaluate(model, part, torch.device("cpu"), None, 0.5, 32, on_logits=lambda _, out:
                                           peaks.append(torch.sigmoid(out[0].float()).flatten(1).amax(1)))
    for record, peak in zip(records, torch.cat(peaks).tolist()):
        record["max_probability"] = peak
    return summary, records


def row_of(run: dict) -> dict:
    """The held-out figures at the epoch the run's own validation chose, at its last, and at their best."""
    held, h = run["held"][0], run["history"]
    best = h[run["best_epoch"] - 1]
    curve = [float(r[f"{held}:held_out_lesion_dice"]) for r in h]
    return {"own_val": float(best["val_lesion_dice"]), "held_dice": float(best[f"{held}:held_out_lesion_dice"]),
            "held_missed": int(best[f"{held}:held_out_missed"]),
            "held_fp": best[f"{held}:held_out_normal_fp_rate"], "held_last": curve[-1],
            "held_peak": (max(curve), int(np.argmax(curve)) + 1), "curve": curve,
            "minutes": sum(float(r["seconds"]) for r in h) / 60}


def table(folders: list[str], out: Path | None) -> int:
    """The Markdown tables of leave-one-out runs, and the figure."""
    runs = [read_run(Path(f)) for f in folders]
    cache: dict = {}
    print("| lever | trained on | held out | seed | best epoch (own val) | own val lesion Dice | held-out lesion Dice | "
          "missed | normals outlined | at the last epoch | best epoch of the held-out curve | minutes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    groups: dict = {}
    for run in sorted(runs, key=lambda r: (r["lever"], r["direction"], r["seed"])):
        r = run["row"] = row_of(run)
        fp = f"{float(r['held_fp']):.0%}" if r["held_fp"] != "" else "-"
        print(f"| {run['lever']} | {run['own'][0]} | {run['held'][0]} | {run['seed']} | {run['best_epoch']} | "
              f"{r['own_val']:.3f} | {r['held_dice']:.3f} | {r['held_missed']} | {fp} | {r['held_last']:.3f} | "
              f"{r['held_peak'][1]} ({r['held_peak'][0]:.3f}) | {r['minutes']:.0f} |")
        groups.setdefault(run["lever"], {}).setdefault(run["direction"], []).append(run)
    print("\n| lever | held-out lesion Dice, mean of the two directions | BUSI -> BUS-BRA | BUS-BRA -> BUSI | "
          "own validation, mean of the directions (floor) | seeds | ensemble of the seeds (BUSI -> BUS-BRA / BUS-BRA -> BUSI) |")
    print("|---|---|---|---|---|---|---|")
    curves = {}
    for lever, by_direction in sorted(groups.items()):
        means = {d: np.mean([r["row"]["held_dice"] for r in by_direction.get(d, [])]) if d in by_direction
                 else float("nan") for d in DIRECTIONS}
        own = np.mean([np.mean([r["row"]["own_val"] for r in rs]) for rs in by_direction.values()])
        ensembles = {}
        for d, rs in by_direction.items():
            models = [checkpoints.load_model(r["folder"] / "best.pt").model for r in rs]
            model = models[0] if len(models) == 1 else unet.UNetEnsemble(models)
            busi = "held" if d == "busbra" else "own"
            _, records = scored(model, val_part(rs[0], busi, cache))  # BUSI's normal scans: the curve
            curves[f"{lever}, trained on {rs[0]['own'][0]}" + (f", {len(rs)} seeds" if len(rs) > 1 else "")] = \
                metrics.missed_and_outlined([(r["label"] != "normal", r["pred_pixels"] > 0,
                                              r.get("max_probability")) for r in records])
            if len(rs) > 1:
                summary, _ = scored(model, val_part(rs[0], "held", cache))
                ensembles[d] = f"{summary['lesion_dice']:.3f} ({summary['missed_lesions']} missed)"
        seeds = sorted({r["seed"] for rs in by_direction.values() for r in rs})
        shown = {d: "-" if np.isnan(v) else f"{v:.3f}" for d, v in means.items()}
        both = f"{np.mean(list(means.values())):.3f}" if "-" not in shown.values() else "- (one direction)"
        print(f"| {lever} | {both} | {shown['busi']} | {shown['busbra']} | "
              f"{own:.3f} | {', '.join(map(str, seeds))} | {ensembles.get('busi', '-')} / "
              f"{ensembles.get('busbra', '-')} |")
    if out is not None:
        draw(runs, curves, out)
        print(f"\nwrote {out}")
    return 0


def draw(runs: list[dict], curves: dict, out: Path) -> None:
    """Held-out lesion Dice per epoch (the chosen epoch marked), and BUSI's normal scans outlined against lesion
    scans missed over every cut of the mask's maximum probability."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 4.8))
    ax1, ax2 = fig.subplots(1, 2)
    for run in runs:
        r = run["row"]
        line, = ax1.plot(range(1, len(r["curve"]) + 1), r["curve"], lw=1.2,
                         label=f"{run['lever']}, {run['own'][0]} -> {run['held'][0]}, seed {run['seed']}")
        ax1.plot(run["best_epoch"], r["held_dice"], "o", color=line.get_color())
    ax1.set(xlabel="epoch", ylabel="held-out hospital's validation lesion Dice", ylim=(0, 1),
            title="The hospital never trained on (o: the epoch the run's own validation chose)")
    for name, c in curves.items():
        ax2.plot(100 * c[:, 0], 100 * c[:, 1], lw=1.2, label=name)
    ax2.set(xlabel="BUSI validation lesion scans missed (%)", ylabel="BUSI validation normal scans outlined (%)",
            xlim=(0, 40), ylim=(0, 100), title="BUSI's normal scans, every cut of the mask's maximum probability")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        ax.title.set_fontsize(9)
    storage.save_figure(fig, out)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.table:
            out = Path(args.out) if args.out else None
            if out is not None and out.exists():
                raise ValueError(f"{out} exists (nothing is overwritten)")
            return table(args.table, out)
        if not args.busi or not args.busbra:
            parser.error("--busi and --busbra are needed (or --table)")
        return train(args)
    except (ValueError, OSError, checkpoints.CheckpointError, utils.DataError) as exc:
        print(f"error: {utils.printable(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
