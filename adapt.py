"""Adapt a trained model to a new site's scanner from its unlabelled scans, and write it as a NEW checkpoint.

    python adapt.py --scans site_scans/ --output checkpoints/site_adapted.pt           # the shipped model
    python adapt.py --checkpoint RUN/best.pt --scans "export/*.dcm" --output site.pt --site clinicA

Every BatchNorm layer's running mean and variance is re-estimated on the site's scans (no labels, no training) and
mixed with the training hospitals' as  ALPHA * site + (1 - ALPHA) * source  (ALPHA below, chosen on the
two-hospital simulation: docs/results.md, "Your own scans"). The familiarity range (the `out_of_range` column) is
re-fitted on the same scans. The "no lesion" gate and the trust score stay as fitted at the training hospitals, and
the file says so: predict then marks likely lesion-free scans without emptying their masks. Labelled scans of the
site do more (fit_trust.py --data-dir SITE; train_unet_busi.py --init-from CKPT --data-dir SITE).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import storage
import utils  # (torch-free: --help is answered before torch loads, below)

ALPHA = 1.0  # weight of the site's statistics: the best mean lesion Dice of the two directions of the simulation
             # (0.25, 0.5 and 1.0 tried; docs/new_site.md)
MIN_SCANS = 16  # the fewest measured: 16 scans came within 0.01 lesion Dice of all of them in both directions of
                # the simulation (docs/new_site.md); fewer were not measured, so they are refused
FRAMES_PER_LOOP = 8  # frames taken from one cine loop, evenly spaced: its frames are near-copies of each other


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Adapt a trained model to a new site's scanner from unlabelled scans: re-estimate its "
                    "normalisation statistics (BatchNorm) and its familiarity range on them, and write a NEW "
                    "checkpoint (the source is never changed). Research use only.",
        epilog="Deterministic: the same scans give the same file. Inputs as predict_busi.py takes them: files, "
               "folders (not recursive) and quoted globs; PNG, JPEG, ... and DICOM (a cine loop gives "
               f"{FRAMES_PER_LOOP} evenly spaced frames).")
    p.add_argument("--checkpoint", default=str(utils.shown_path(utils.DEFAULT_CHECKPOINT)),
                   help="the model to adapt; default: %(default)s")
    p.add_argument("--scans", nargs="+", action="extend", required=True, metavar="PATH",
                   help=f"the site's scans (at least {MIN_SCANS}; more are better): files, folders or quoted globs")
    p.add_argument("--output", required=True, help="the new checkpoint (an existing file is never replaced)")
    p.add_argument("--alpha", type=utils.unit_fraction, default=ALPHA,
                   help="weight of the site's statistics against the training hospitals' (1: the site's alone); "
                        "default: %(default)s, chosen on the simulation")
    p.add_argument("--min-scans", type=utils.positive_int, default=MIN_SCANS,
                   help="refuse fewer readable scans than this; default: %(default)s (the fewest measured in the "
                        "simulation; lower it only to study that)")
    p.add_argument("--site", default=None, help="the site's name, recorded in the file (default: the first "
                                                "--scans folder's name)")
    p.add_argument("--batch-size", type=utils.positive_int, default=32, help="scans per forward pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps; default: %(default)s")
    return p


if __name__ == "__main__":
    utils.answer_help_early(build_parser)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoints  # noqa: E402
import image_io
import dicom_io  # noqa: E402
import inference  # noqa: E402
import trust  # noqa: E402
from augment import to_unit_float  # noqa: E402


def read_scans(specs: list[str]) -> tuple[list[np.ndarray], list[str]]:
    """The site's scans as model inputs (a DICOM file's ultrasound region; FRAMES_PER_LOOP frames of a loop), in
    the order given, and one line per file that cannot be read."""
    images, problems = [], []
    for path in dicom_io.gather_inputs(specs):
        try:
            count = dicom_io.frame_count(path) if dicom_io.is_dicom(path) else 1
            frames = [None] if count == 1 else sorted({int(round(f)) for f in np.linspace(1, count, FRAMES_PER_LOOP)})
            images += [dicom_io.load_scan(path, frame).model_input() for frame in frames]
        except utils.DataError as exc:
            problems.append(utils.printable(exc))
    return images, problems


@torch.no_grad()
def renormalise(model: torch.nn.Module, images: torch.Tensor, alpha: float, batch_size: int = 32) -> int:
    """Re-estimate every BatchNorm layer's running statistics on `images` (uint8 [N,1,S,S]: a cumulative average
    over all of them, the rest of the model in eval mode) and mix them with the present ones: alpha * new + (1 -
    alpha) * old. Returns the number of layers changed."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    old = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every scan counts the same, whatever the batch order
        m.train()
    try:
        for start in range(0, len(images), batch_size):
            x = to_unit_float(images[start:start + batch_size].to(next(model.parameters()).device))
            model(x.contiguous(memory_format=torch.channels_last))
    finally:
        model.eval()
    for m, (mean, var) in zip(layers, old):
        m.running_mean.copy_(alpha * m.running_mean + (1 - alpha) * mean.to(m.running_mean))
        m.running_var.copy_(alpha * m.running_var + (1 - alpha) * var.to(m.running_var))
        m.momentum = 0.1
    return len(layers)


def refit_familiarity(model, images: torch.Tensor, device, batch_size: int, site: str) -> dict:
    """The familiarity entry fitted on the site's scans: statistics on all of them, the range as the larger of two
    halves' out-of-sample quantiles (statistics on one half, range on the other), so that it is not fitted on the
    very scans it measures."""
    texture = inference.texture_of(model, images, device, None, batch_size)
    halves = [np.arange(len(texture))[i::2] for i in (0, 1)]
    cuts = [trust.fit_familiarity(texture[a], texture[b], [site] * len(b), "")["cut"]
            for a, b in (halves, halves[::-1])]
    familiar = trust.fit_familiarity(texture, texture, [site] * len(texture),
                                     f"{len(texture)} unlabelled scans of {site} (adapt.py); range: out of sample, "
                                     f"two halves")
    familiar["cut"] = float(max(cuts))
    return familiar


def adapt(checkpoint: Path, scans: list[np.ndarray], alpha: float, site: str, device, batch_size: int) -> dict:
    """The adapted checkpoint dict (weights in the source file's dtypes)."""
    loaded = checkpoints.load_model(checkpoint, device)
    model, state, size = loaded.model, loaded.state, loaded.image_size
    images = torch.from_numpy(np.stack([image_io.resize_image(s, size) for s in scans]))[:, None]
    if not renormalise(model, images, alpha, batch_size):
        raise ValueError(f"{checkpoint} has no normalisation layers to adapt")
    weights = {k: v.to(state["model"][k].dtype) for k, v in model.state_dict().items()}
    record = {"site": site, "scans": len(scans), "alpha": alpha, "source_checkpoint": checkpoint.name,
              "source_sha256": storage.file_sha256(checkpoint),
              "note": "normalisation statistics and familiarity re-estimated on the site's unlabelled scans; the "
                      "'no lesion' gate and the trust score were fitted on other hospitals"}
    fitted = loaded.trust
    adapted = {**state, "model": weights, "adaptation": record}
    if fitted is not None:
        adapted["trust"] = {**fitted, "gate_scope": "other hospitals",
                            "familiarity": refit_familiarity(model, images, device, batch_size, site)}
    return adapted


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        source, out = Path(args.checkpoint), Path(args.output)
        if out.exists() or (source.exists() and out.resolve() == source.resolve()):
            raise ValueError(f"{out} exists: give a new file name (nothing is overwritten)")
        device = utils.pick_device(args.device)
        scans, problems = read_scans(args.scans)
        for problem in problems:
            print(f"note: skipped: {problem}", file=sys.stderr)
        if len(scans) < args.min_scans:
            raise ValueError(f"{len(scans)} readable scans: at least {args.min_scans} are needed for stable statistics "
                             f"(the fewest measured in the simulation: docs/new_site.md)")
        site = args.site or next((Path(s).name for s in args.scans if Path(s).is_dir()), None) or "site"
        print(f"adapting {source} to {len(scans)} scans of {site} (alpha {args.alpha:g})", flush=True)
        adapted = adapt(source, scans, args.alpha, site, device, args.batch_size)
        checkpoints.save_checkpoint(adapted, out)
    except (utils.DataError, checkpoints.CheckpointError, ValueError) as exc:
        print(f"error: {utils.printable(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {utils.printable(args.output)}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    familiar = (adapted.get("trust") or {}).get("familiarity")
    print(f"wrote {out}: normalisation statistics of {len(scans)} scans of {site} (alpha {args.alpha:g})"
          + (f", familiarity range {familiar['cut']:.2f}" if familiar else "")
          + "; the 'no lesion' gate and the trust score stay as fitted at the training hospitals (predict marks "
            "likely lesion-free scans, it does not empty them)")
    print(f"predict with it:  python predict_busi.py --checkpoint {out} --input SCANS/ --output preds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
