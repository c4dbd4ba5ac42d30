"""The model as ONNX, run by onnxruntime: the CPU inference engine of predict_busi.py, the GUI and `Predictor`
where it is installed, and the way to take a model out of this project.

`export` writes the model at its training size (mask logits, class logits, and the pooled deepest features the
trust score reads) with everything a user needs to run it without this repository in the file's metadata: the
preprocessing, and every entry of the checkpoint but its weights and training state, as JSON. `load` gives the
model a tool runs (torch or onnxruntime) and the checkpoint dict; from a checkpoint, the ONNX model is exported on
first use and cached beside it, under a name keyed by the checkpoint's SHA-256, so a changed checkpoint never
reuses an old export. `OnnxModel` is called by `inference.predict_batches` like the torch model, so everything
around the model (resizing, the flipped pass, the trust score, calibration) is the same code on both paths.

onnxruntime and onnx (the export) are optional: without them the torch path runs; asked for, their absence is
one line naming the package.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

import checkpoints
import storage
import utils
from trust import texture_statistics
from unet import deepest_layer, texture_layer

EXPORT_FORMAT = 2  # 2: texture_features (familiarity) added; part of the cached file's name: a change to the graph's inputs, outputs or metadata re-exports
OPSET = 17
INPUT = "image"
OUTPUTS = ("mask_logits", "class_logits", "deep_features", "texture_features")
BACKENDS = ("auto", "torch", "onnx")
# The metadata that describes the file, not a checkpoint entry
NOT_ENTRIES = ("busi.format", "busi.checkpoint_sha256", "image_size", "threshold", "preprocessing", "postprocessing",
               "classes")
PINS = {"onnxruntime": "onnxruntime==1.32.0", "onnx": "onnx==1.23.2"}  # as requirements.txt pins them
# Checkpoint entries that are training state, not a description of the model: left out of the metadata.
TRAINING_STATE = ("model", "format", "optimizer", "scheduler", "scaler", "rng", "epoch_perm", "history",
                  "train_model", "swa_averaged", "swa_from")  # (an SWA run's trained weights: not metadata)
PREPROCESSING = ("grey uint8 HxW as displayed (EXIF orientation applied), squashed to image_size x image_size by "
                 "PIL's bilinear resize, divided by 255: float32 [N,1,S,S] in [0,1] (the graph normalises it "
                 "further itself)")
POSTPROCESSING = ("mask: sigmoid(mask_logits), resized bilinearly (align_corners=False) to the scan's size, > "
                  "threshold; classes: softmax(class_logits) over (benign, malignant, normal), then the trust entry's "
                  "temperatures: P(lesion) = sigmoid(log((pb+pm)/pn) / T[0]), P(malignant | lesion) = "
                  "sigmoid(log(pm/pb) / T[1]); deep_features: what the trust score's feature distance reads; "
                  "texture_features: what the familiarity score reads (trust.familiarity)")


class BackendError(checkpoints.CheckpointError):
    """The model cannot be run as asked (a missing package, a device onnxruntime does not serve here, an ONNX file
    that is not an export of this project); a CheckpointError, so every tool reports it as it reports a bad
    checkpoint: one line."""


def installed(package: str) -> bool:
    """Can `package` be imported (a broken install counts as absent)?"""
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


def require(package: str, why: str):
    """The module, or a BackendError naming the package to install."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise BackendError(f"{why} needs the package {package}, which is not installed: pip install "
                           f"{PINS[package]}") from None


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------
class _Graph(torch.nn.Module):
    """What is exported: the model's mask and class logits, the input of its decoder's first stage pooled over
    space (the trust score's feature distance) and the texture statistics of its stride-4 features (familiarity),
    read by the same hooks as inference.predict_batches."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        deep: list[torch.Tensor] = []
        texture: list[torch.Tensor] = []
        hooks = [deepest_layer(self.model).register_forward_pre_hook(lambda _, a: deep.append(a[0].mean((2, 3)))),
                 texture_layer(self.model).register_forward_hook(
                     lambda _, a, out: texture.append(texture_statistics(out)))]
        try:
            seg, cls = self.model(x)[:2]  # (as predict_batches reads them)
        finally:
            for hook in hooks:
                hook.remove()
        return (seg, deep[0], texture[0]) if cls is None else (seg, cls, deep[0], texture[0])


def to_json(value):
    """A checkpoint entry as JSON: tensors as {"tensor": nested lists, "dtype": ...} (exact for float32), non-finite
    floats as null."""
    def plain(v):
        if isinstance(v, torch.Tensor):
            return {"tensor": v.detach().cpu().tolist(), "dtype": str(v.dtype).removeprefix("torch.")}
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
    return json.dumps(storage.json_safe(plain(value)), allow_nan=False, separators=(",", ":"))


def from_json(text: str):
    """`to_json`'s inverse: tensors come back as tensors."""
    def restore(v):
        if isinstance(v, dict):
            if set(v) == {"tensor", "dtype"}:
                dtype = getattr(torch, str(v["dtype"]), None)
                if not isinstance(dtype, torch.dtype):  # a file's text names a dtype, never anything else of torch
                    raise ValueError(f"unknown tensor dtype {v['dtype']!r} in the metadata")
                return torch.tensor(v["tensor"], dtype=dtype)
            return {k: restore(x) for k, x in v.items()}
        return [restore(x) for x in v] if isinstance(v, list) else v
    return restore(json.loads(text))


def export(loaded: checkpoints.LoadedModel, checkpoint_sha256: str = "") -> bytes:
    """The serialised ONNX model of a loaded checkpoint: input `image` float32 [N,1,S,S] at the training size S
    (a fixed size: another one is refused by onnxruntime, not silently mis-padded, see below), outputs OUTPUTS
    (no class_logits without a class head), metadata as described in the module docstring."""
    onnx = require("onnx", "exporting to ONNX")
    model, state, size = loaded.model, loaded.state, loaded.image_size
    graph = _Graph(model.float().eval())
    outputs = [name for name in OUTPUTS if name != "class_logits" or model.config.get("num_classes")]
    buffer = io.BytesIO()
    # The TorchScript-based exporter: it needs onnx alone (the newer one also needs onnxscript) and takes 1.5 s
    # instead of 10 s for LiteUNet; both match PyTorch here (max probability difference 1e-5 on the sample).
    # It records EfficientNet-Lite's TF-style "same" padding as constants for the traced size, so the graph's
    # height and width are fixed: onnxruntime refuses any other size instead of padding it wrongly.
    with warnings.catch_warnings():  # its deprecation and tracer warnings: the fixed size is by design (above)
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (torch.zeros(1, 1, size, size),), buffer, input_names=[INPUT], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in [INPUT, *outputs]}, opset_version=OPSET,
                          dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    meta = {"busi.format": str(EXPORT_FORMAT), "busi.checkpoint_sha256": checkpoint_sha256,
            "image_size": str(size), "threshold": str(loaded.threshold),
            "preprocessing": PREPROCESSING, "postprocessing": POSTPROCESSING,
            "classes": json.dumps(["benign", "malignant", "normal"])}
    meta.update({key: to_json(value) for key, value in state.items() if key not in TRAINING_STATE})
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = ("BUSI breast-ultrasound lesion U-Net (research use only, not a medical device). Metadata: "
                        "preprocessing, postprocessing, and the checkpoint's entries as JSON.")
    return proto.SerializeToString()


file_sha256 = storage.file_sha256


def cache_path(checkpoint: Path, sha256: str) -> Path:
    """Where a checkpoint's export is cached: beside it, named by its content (a changed checkpoint gets a new
    name; an old export is never reused) and by EXPORT_FORMAT."""
    return checkpoint.with_name(f"{checkpoint.stem}.{sha256[:16]}.onnx{EXPORT_FORMAT}.onnx")


def sidecar_path(cached: Path) -> Path:
    """The file that records a cached export's own SHA-256: the export's metadata names the checkpoint, but only
    this shows that its weights are the bytes that were written."""
    return cached.with_name(cached.name + ".sha256")


def _verified(path: Path) -> bool:
    """Whether the cached export's bytes are those its sidecar records."""
    try:
        recorded = sidecar_path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return False
    return recorded == file_sha256(path)


def _ours(path: Path, sha: str) -> bool:
    """Whether a file at the cache name was written by this cache (an export of this checkpoint, or one with a
    sidecar), so that it may be replaced; anything else there is left alone."""
    if sidecar_path(path).exists():
        return True
    try:
        return OnnxModel(str(path), 1).metadata.get("busi.checkpoint_sha256") == sha
    except Exception:  # noqa: BLE001 - a damaged or foreign file: onnxruntime's own error types
        return False


def cached_model(checkpoint: Path, state: dict, sha: str, threads: int | None = None) -> OnnxModel:
    """The checkpoint (loaded as `state`) run by onnxruntime: its cached export, or one made now and cached (written
    atomically, then its SHA-256 in a sidecar). A cached export is used only when its bytes match the sidecar and
    its metadata names this checkpoint; a damaged one (or one without a sidecar) is exported again, with a note.
    Where it cannot be cached (a folder that cannot be written, or a file of that name that is not this export,
    which is never replaced) the export is used from memory. `sha`: the checkpoint file's SHA-256."""
    path = cache_path(checkpoint, sha)
    replace = False
    if path.exists():
        if _verified(path):
            try:
                cached = OnnxModel(str(path), threads)
                if cached.metadata.get("busi.checkpoint_sha256") == sha:
                    return cached
            except Exception:  # noqa: BLE001 - a damaged or foreign file: onnxruntime's own error types
                pass
        if not _ours(path, sha):
            print(f"note: {utils.printable(path)} is not the ONNX export of {utils.printable(checkpoint.name)}; it "
                  f"is left alone, and the model is exported in memory", file=sys.stderr)
            return OnnxModel(export(checkpoints.loaded(checkpoints.build_model(state, checkpoint), state), sha), threads)
        why = "its bytes differ from the SHA-256 recorded beside it" if sidecar_path(path).exists() else \
            "no SHA-256 of it is recorded beside it"
        print(f"note: the cached ONNX export {utils.printable(path)} cannot be trusted ({why}); exporting it again",
              file=sys.stderr)
        replace = True
    data = export(checkpoints.loaded(checkpoints.build_model(state, checkpoint), state), sha)
    try:
        storage.atomic_write(path, data, replace=replace)
    except FileExistsError:  # another process exported it meanwhile; this one's bytes are the same export
        pass
    except OSError as exc:
        print(f"note: cannot cache the ONNX export beside {utils.printable(checkpoint)} ({exc.strerror or exc}); "
              f"exported in memory", file=sys.stderr)
        return OnnxModel(data, threads)
    try:  # after the export: a kill between the two leaves an export without a sidecar, exported again next time
        storage.atomic_write(sidecar_path(path), (hashlib.sha256(data).hexdigest() + "\n").encode())
    except OSError as exc:
        print(f"note: cannot record the SHA-256 of the ONNX export {utils.printable(path)} "
              f"({exc.strerror or exc}); it will be exported again next time", file=sys.stderr)
    return OnnxModel(data, threads)


# --------------------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------------------
def _session(source: str | bytes, threads: int):
    ort = require("onnxruntime", "the onnx backend")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are not the user's
    # No busy-waiting between ops: on a CPU shared with other work (a training run) spinning threads slow both.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class _StandIn:
    """Where inference.predict_batches hooks a layer of the torch model: the decoder's first stage
    (deepest_layer(model) is model.ups[0]; each call hands the graph's pooled deepest features to its hooks as
    that stage's input, [b,C,1,1]: their spatial mean is themselves) and the stride-4 stage
    (texture_layer(model) is model.texture; the graph's texture statistics as its output, [b,2C]:
    trust.texture_statistics takes them as pooled)."""

    def __init__(self):
        self.hooks: OrderedDict = OrderedDict()  # torch's RemovableHandle holds a weak reference: not a dict

    def register_forward_pre_hook(self, hook):
        handle = torch.utils.hooks.RemovableHandle(self.hooks)
        self.hooks[handle.id] = hook
        return handle

    register_forward_hook = register_forward_pre_hook


class OnnxModel:
    """An exported model run by onnxruntime on the CPU, called like the torch model: `model(x)` with x float
    [b,1,S,S] gives (mask logits, class logits or None) as CPU tensors. `config` is the model's config."""

    def __init__(self, source: str | bytes, threads: int | None = None):
        self.session = _session(source, threads or torch.get_num_threads())
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("busi.format") != str(EXPORT_FORMAT) or "model_config" not in meta:
            raise BackendError("not an ONNX export of this project's format "
                               f"{EXPORT_FORMAT} (make one with: python export_onnx.py)")
        self.metadata = meta
        self.config = from_json(meta["model_config"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.ups, self.texture = [_StandIn()], _StandIn()

    def state(self) -> dict:
        """The checkpoint entries the export carries (config, model_config, trust, ...), as the checkpoint held
        them; its weights are in the graph ("model" is empty)."""
        state = {key: from_json(value) for key, value in self.metadata.items() if key not in NOT_ENTRIES}
        return {**state, "model": {}}

    def eval(self) -> OnnxModel:
        return self

    def __call__(self, x: torch.Tensor, with_aux: bool = False):
        if with_aux:
            raise ValueError("an ONNX model has no deep-supervision outputs (training runs on the torch model)")
        found = dict(zip(self.outputs, self.session.run(None, {INPUT: np.ascontiguousarray(x.float().numpy())})))
        deep = torch.from_numpy(found["deep_features"])[:, :, None, None]
        for hook in list(self.ups[0].hooks.values()):
            hook(self.ups[0], (deep,))
        for hook in list(self.texture.hooks.values()):
            hook(self.texture, (x,), torch.from_numpy(found["texture_features"]))
        cls = found.get("class_logits")
        return torch.from_numpy(found["mask_logits"]), None if cls is None else torch.from_numpy(cls)


def load(checkpoint: str | os.PathLike, device: torch.device | str = "cpu", backend: str = "auto",
         threads: int | None = None):
    """The checkpoints.LoadedModel a tool runs: the torch model, or an `OnnxModel`.

    `backend` "auto": onnxruntime on the CPU where it is installed (and onnx, unless the export is cached), else
    torch, silently; "onnx": onnxruntime or a BackendError; "torch": the torch model. `checkpoint` may be an
    ONNX export itself (.onnx). Raises CheckpointError (BackendError included) with a one-line reason.
    """
    device, path = torch.device(device), Path(checkpoint)
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if path.suffix.lower() == ".onnx":
        if backend == "torch" or device.type != "cpu":
            raise BackendError(f"{utils.printable(path)} is an ONNX model: it runs with onnxruntime on the CPU "
                               f"(backend onnx, device cpu)")
        if not path.is_file():
            raise checkpoints.CheckpointError(f"checkpoint not found: {path}")
        try:
            model = OnnxModel(str(path), threads)
            state = model.state()
        except BackendError as exc:
            raise BackendError(f"{utils.printable(path)}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors for a damaged or foreign file
            raise BackendError(f"cannot read {utils.printable(path)} as an ONNX model of this project: "
                               f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
        problem = checkpoints.checkpoint_problem(state)
        if problem:
            raise BackendError(f"{utils.printable(path)}: its metadata is damaged or not this project's: {problem}")
        return checkpoints.loaded(model, state)
    if backend == "onnx" and device.type != "cpu":
        raise BackendError(f"the onnx backend runs on the CPU; on {device} use the torch backend")
    if backend == "torch" or (backend == "auto" and (device.type != "cpu" or not installed("onnxruntime"))):
        return checkpoints.load_model(path, device)
    require("onnxruntime", "the onnx backend")
    state = checkpoints.load_checkpoint(path)  # the torch model is built only to export it
    sha = file_sha256(path)
    cached = cache_path(path, sha)
    if not (cached.exists() and _verified(cached)) and not installed("onnx"):  # onnx is needed only to export
        if backend == "auto":
            return checkpoints.loaded(checkpoints.build_model(state, path).to(device).eval(), state)
        require("onnx", "the onnx backend (to export the checkpoint on first use)")
    return checkpoints.loaded(cached_model(path, state, sha, threads), state)
