"""Checkpoint I/O, written once for every tool: atomic save, a load that never runs code and names what is
wrong with a bad file, the model a checkpoint describes, and the export of slim (and ensemble) models."""
from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import storage
import trust
import unet
import utils
from utils import DEFAULT_CHECKPOINT  # noqa: F401 (the shipped model: every tool's default)
from storage import torch_save

CHECKPOINT_FORMAT = "busi-unet-v1"
LEGACY_IMAGE_SIZE = 256  # the input size of checkpoints whose config does not record one (the earliest runs)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Atomic: a run killed at any moment leaves the old checkpoint or the new one, never a torn one."""
    torch_save(state, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """torch.load with weights_only=True (a checkpoint never runs code); clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint (no zip archive inside)")
    damaged = damaged_member(path)
    if damaged:  # torch.load reads the tensors' bytes without checking them: a flipped bit would train on
        raise CheckpointError(f"checkpoint damaged: {path} ({damaged}); nothing was loaded")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln or "GLOBAL" in ln]
        reason = lines[0] if lines else "objects beyond tensors and plain data"
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors and plain data, "
                              f"which could run code ({reason[:160]})") from None
    except Exception as exc:  # noqa: BLE001 - zip/EOF/runtime errors of a torn or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint or damaged "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (expected format {CHECKPOINT_FORMAT!r})")
    problem = checkpoint_problem(state)
    if problem:
        raise CheckpointError(f"{path} is damaged or was not written by this project: {problem}")
    return state


def damaged_member(path: Path) -> str | None:
    """Which part of a checkpoint's zip archive fails its CRC-32 (torch.save records one per member), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:  # noqa: BLE001 - zip, zlib and read errors of a damaged archive alike
        return f"unreadable archive: {type(exc).__name__}: {exc}"
    return f"{bad} fails its CRC check: its bytes changed after it was written" if bad else None


def checkpoint_problem(state: dict) -> str | None:
    """What is structurally wrong with a loaded checkpoint dict, or None: every tool loads through
    `load_checkpoint`, so a crafted file ends in one clear message, not a traceback deep inside a tool."""
    model_config, config = state.get("model_config", {}), state.get("config", {})
    for key in ("model", "train_model"):  # (train_model: an SWA run's trained weights beside their average)
        entry = state.get(key, {})
        if not isinstance(entry, dict):
            return f"'{key}' should be a dict of tensors, got {type(entry).__name__}"
        bad = [k for k, v in entry.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            return f"'{key}' entry {bad[0]!r} is a {type(entry[bad[0]]).__name__}, not a tensor"
    if "train_model" in state and "swa_averaged" in state and (
            not isinstance(state["swa_averaged"], int) or isinstance(state["swa_averaged"], bool)
            or state["swa_averaged"] < 1):
        return f"'swa_averaged' should be a positive integer, got {state['swa_averaged']!r}"
    if "train_model" in state and {k: tuple(v.shape) for k, v in state["train_model"].items()} != {
            k: tuple(v.shape) for k, v in state["model"].items()}:
        return "'train_model' (an SWA run's trained weights) does not match 'model' (their average)"
    if not isinstance(model_config, dict):
        return f"'model_config' should be a dict, got {type(model_config).__name__}"
    if not isinstance(config, dict):
        return f"'config' should be a dict, got {type(config).__name__}"
    depth = model_config.get("depth", 4)  # (a missing model_config is named by build_model)
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= 8:
        return f"model_config depth should be an integer from 1 to 8, got {depth!r}"
    size = config.get("image_size")
    if size is not None:
        multiple = unet.size_multiple(model_config)
        if not isinstance(size, int) or isinstance(size, bool) or size < multiple or size % multiple:
            return f"config image_size should be a positive multiple of {multiple}, got {size!r}"
    threshold = config.get("threshold")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
        return f"config threshold should be a number in (0, 1), got {threshold!r}"
    return None


def fitted_trust(state: dict) -> tuple[dict | None, str | None]:
    """The checkpoint's fitted trust score and calibration (its "trust" entry), or (None, why there is none)."""
    entry = state.get("trust")
    if entry is None:
        return None, ("it holds no trust statistics: trust scores unavailable (add them with `python fit_trust.py "
                      "--checkpoint PATH --data-dir DATA --output NEW.pt`)")
    problem = trust.trust_problem(entry)
    if problem is None:  # the statistics must be of this model's deepest features (the decoder's first input)
        width = [w.shape[0] for k, w in state["model"].items() if k.endswith("ups.0.up.weight")]
        if width and width[0] != entry["statistics"]["mean"].shape[0]:
            problem = (f"its feature statistics are {entry['statistics']['mean'].shape[0]} wide, the model's deepest "
                       f"features {width[0]}")
    return (None, f"its trust entry is unusable ({problem}): trust scores unavailable") if problem else (entry, None)


def build_model(state: dict, path: str | os.PathLike = "checkpoint") -> torch.nn.Module:
    """Rebuild the model (UNet, LiteUNet, or an ensemble) a checkpoint describes and load its weights, naming any
    mismatch."""
    config = state.get("model_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has no model_config")
    try:
        model = unet.model_from_config(config, pretrained=False)  # the weights come from the checkpoint
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: model_config {config} does not describe a model of this project ({exc})") \
            from None
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {shapes[0]} is {tuple(weights[shapes[0]].shape)}, "
                       f"expected {tuple(expected[shapes[0]].shape)}")
        raise CheckpointError(f"{path}: weights do not fit {type(model).__name__}{config}: {detail}")
    model.load_state_dict(weights)
    return model


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to predict, with what every tool needs of its checkpoint, read from it here and nowhere else."""
    model: Any                # a torch.nn.Module in eval mode, or an onnx_backend.OnnxModel
    state: dict               # the checkpoint dict (an ONNX export's: its metadata)
    image_size: int           # the square input size the model was trained at
    threshold: float          # the lesion probability threshold: the checkpoint's, or one a tool was given
    trust: dict | None        # the fitted trust score, calibration and "no lesion" gate (fitted_trust)
    why_no_trust: str | None  # why `trust` is None

    def at_threshold(self, threshold: float | None) -> LoadedModel:
        """The same model at another threshold (None: the checkpoint's)."""
        return self if threshold is None else dataclasses.replace(self, threshold=float(threshold))


def input_size(state: dict) -> int:
    """The square input size a checkpoint's model was trained at."""
    return int((state.get("config") or {}).get("image_size", LEGACY_IMAGE_SIZE))


def loaded(model, state: dict) -> LoadedModel:
    """The LoadedModel of a built model and its checkpoint dict."""
    fitted, why_not = fitted_trust(state)
    return LoadedModel(model, state, input_size(state), float((state.get("config") or {}).get("threshold", 0.5)),
                       fitted, why_not)


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a checkpoint into a ready-to-use torch model in eval mode on `device` (onnx_backend.load also offers
    onnxruntime)."""
    state = load_checkpoint(path)
    return loaded(build_model(state, path).to(device).eval(), state)


def export_checkpoint(src, dst: str | os.PathLike, half: bool = True) -> dict:
    """Strip a training checkpoint to what inference needs (weights, model config, run config, validation
    figures), with fp16 weights by default: the shipped model. Returns the exported dict.

    `src` may also be a list of checkpoints: they become ONE ensemble checkpoint (see unet.UNetEnsemble),
    which every tool loads like a single model. Its members must share the architecture, the input size and
    the threshold; the first member's run config is kept, and each member's source, best epoch and
    validation figures are listed under `members`.
    """
    sources = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    states = [load_checkpoint(s) for s in sources]
    first = states[0]
    if len(states) > 1:
        for s, state in zip(sources, states):
            if "members" in (state.get("model_config") or {}):
                raise CheckpointError(f"cannot ensemble {s}: it is an ensemble already (list its members instead)")
    for s, state in zip(sources[1:], states[1:]):
        for what, a, b in (("model_config", first.get("model_config"), state.get("model_config")),
                           ("image_size", first.get("config", {}).get("image_size"),
                            state.get("config", {}).get("image_size")),
                           ("threshold", first.get("config", {}).get("threshold"),
                            state.get("config", {}).get("threshold"))):
            if a != b:
                raise CheckpointError(f"cannot ensemble {sources[0]} and {s}: their {what} differ ({a} vs {b})")

    def slim_weights(state):
        return {k: v.half() if (half and v.is_floating_point()) else v for k, v in state["model"].items()}

    if len(states) == 1:
        weights, model_config = slim_weights(first), first["model_config"]
        best_epoch, best_val, members = first.get("best_epoch"), first.get("best_val"), first.get("members")
    else:
        weights = {f"members.{i}.{k}": v for i, state in enumerate(states) for k, v in slim_weights(state).items()}
        model_config = dict(first["model_config"], members=len(states))
        best_epoch, best_val = None, None  # an ensemble has no epoch; its members' figures are listed
        members = [{"source": str(s), "best_epoch": state.get("best_epoch"), "best_val": state.get("best_val"),
                    "seed": state.get("config", {}).get("seed")} for s, state in zip(sources, states)]
    slim = {"format": CHECKPOINT_FORMAT, "model": weights, "model_config": model_config,
            "config": first.get("config", {}), "best_epoch": best_epoch, "best_val": best_val}
    if members:
        slim["members"] = members
    if len(states) == 1 and "trust" in first:  # fitted on this very model's outputs (an ensemble's differ)
        slim["trust"] = first["trust"]
    save_checkpoint(slim, dst)
    return slim


def run_to_resume(resume: str, run_name: str | None, output_dir: Path) -> tuple[dict, Path]:
    """(the checkpoint dict, its path) that --resume names: the run folder's latest.pt (--resume with --run-name,
    or --resume FOLDER), or the file given."""
    if not resume and not run_name:
        raise ValueError("--resume needs --run-name NAME (or --resume PATH to a run folder or latest.pt)")
    path = Path(resume) if resume else output_dir / run_name
    path = path / "latest.pt" if path.is_dir() or not resume else path
    if not path.exists() and path.parent.is_dir() and \
            storage.made_before_training({p.name for p in path.parent.iterdir()}):
        raise ValueError(f"nothing to resume: {path.parent} has no checkpoint (its run stopped before its first "
                         f"epoch ended); start the run again without --resume (the folder is taken over)")
    return load_checkpoint(path), path


def check_resumable(state: dict, path: Path) -> None:
    """A ValueError where `state` is not a training run that can go on."""
    if "optimizer" not in state:  # an exported model (or ensemble): weights only
        raise ValueError(f"{path} holds weights only (an exported model), not a training run to resume: "
                         f"evaluate it with --eval-only --checkpoint {path}")
    if "train_model" in state and "swa_averaged" not in state:  # (an SWA run keeps both and goes on)
        raise ValueError(f"{path} was trained with --ema, an option since removed (it measured no gain): "
                         f"evaluate its best.pt with --eval-only, or start a new run")


def recorded_config(state: dict) -> dict:
    """The hyperparameters a checkpoint records, with the values that runs from before an option had: they pooled
    the Dice, were plain UNets, and had a full-resolution decoder stage with BatchNorm."""
    return {"dice_per_image": False, "encoder": "none", "full_res_decoder": True, "decoder_norm": "batch",
            **(state.get("config") or {})}


def refuse_changes(values: dict, explicit: set, saved: dict, keys: tuple[str, ...], message: str) -> None:
    """A ValueError (`message` with {flag}, {given} and {saved} filled in) for the first of `keys` whose flag was
    given with a value other than the one `saved` records."""
    for key in keys:
        flag = "--" + key.replace("_", "-")
        if flag in explicit and key in saved and values[key] != saved[key]:
            raise ValueError(message.format(flag=flag, given=values[key], saved=saved[key]))


def adopt_architecture(values: dict, explicit: set, start: dict, fixed: tuple[str, ...], path) -> dict:
    """What a run that starts from the checkpoint `start` (at `path`) takes from it: its architecture and input
    size (the `fixed` hyperparameters; a flag that asks for others is refused) and its heads (unless given)."""
    saved = recorded_config(start)
    refuse_changes(values, explicit, saved, fixed, f"{{flag}} {{given}} differs from {path}'s {{saved}}: a run that "
                   "starts from a checkpoint keeps its architecture and input size; drop {flag}")
    heads = [k for k in ("cls_weight", "deep_supervision") if "--" + k.replace("_", "-") not in explicit]
    return {k: saved[k] for k in [*fixed, *heads] if k in saved}  # (a head it lacks cannot be trained)


def model_for_run(hp, state: dict | None) -> torch.nn.Module:
    """The model a run trains or scores: `state`'s, or a new one as the run configuration `hp` describes it
    (with `hp.init_from`: that checkpoint's weights). The one place a model is built from hyperparameters."""
    if state is None and hp.init_from is not None:
        return build_model(load_checkpoint(hp.init_from), hp.init_from)
    if state is not None:
        return build_model(state, hp.checkpoint or "latest.pt")
    heads = {"num_classes": 3 if hp.cls_weight > 0 else 0, "deep_supervision": hp.deep_supervision > 0,
             "input_norm": hp.input_norm}
    if hp.encoder == "none":
        if hp.decoder_norm != "batch":
            raise ValueError("--decoder-norm applies to a LiteUNet's decoder; the plain UNet (--encoder none) keeps "
                             "BatchNorm")
        return unet.UNet(1, 1, hp.base_channels, hp.depth, **heads)
    return unet.LiteUNet(hp.encoder, pretrained=hp.pretrained, **heads, decoder_norm=hp.decoder_norm,
                         decoder_channels=unet.LITE_DECODER[:5 if hp.full_res_decoder else 4])


def site_record(init_from: str | None, sources: list, parts: dict, state: dict | None) -> dict:
    """What a site run records of itself in its config (kept by a resume): the checkpoint it started from, its
    SHA-256, the site's sources and how many images each part holds."""
    if init_from is None:
        return state["config"]["init_from"]
    record = {"checkpoint": str(Path(init_from).resolve()), "sha256": storage.file_sha256(init_from),
              "site": [n for n, _ in sources], "images": {k: len(v["names"]) for k, v in parts.items()}}
    print(f"site run: from {init_from} on {', '.join(record['site'])} ({record['images']})", flush=True)
    return record


def site_start(init_from: str | None, config: dict) -> dict | None:
    """The checkpoint a site run started from (None for other runs): `--init-from`'s, or on a resume the one its
    config records, which must still be the same file (its SHA-256)."""
    if init_from is not None:
        return load_checkpoint(init_from)
    record = config.get("init_from")
    if not record:
        return None
    path = Path(record["checkpoint"])
    if not path.is_file() or storage.file_sha256(path) != record["sha256"]:
        raise CheckpointError(f"this site run started from {path}, which is gone or has changed since (SHA-256): "
                              f"its site threshold, gate and familiarity range need it; put it back")
    return load_checkpoint(path)


def trained_on(state: dict, sources: list) -> bool:
    """Whether every source (name, folder) is one the checkpoint records it was trained and fitted on: a source
    it only scored as held out (outside its `select_on`) is not."""
    config = state.get("config") or {}
    chosen = set(utils.source_names(config.get("select_on", "")))
    recorded = {Path(spec.split("=", 1)[-1]).resolve() for spec in config.get("data_dir") or []
                if isinstance(spec, str) and (not chosen or spec.split("=", 1)[0] in chosen)}
    return all(Path(p).resolve() in recorded for _, p in sources)
