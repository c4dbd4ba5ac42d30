"""Run plumbing: command-line values and the flags made from a config dataclass, seeding, device and precision,
atomic files and run folders."""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import inspect
import io
import json
import math
import os
import random
import tempfile
import tokenize
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

if TYPE_CHECKING:  # for the annotations only: this module stays torch-free at import (--help is answered first)
    import torch

# No numpy or torch at import: the commands build their --help from this module before they load torch, which
# takes seconds on a busy machine. Functions that need them import them (a no-op once loaded).

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


REPO_DIR = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = REPO_DIR / "checkpoints" / "busi_busbra_lite0_192.pt"  # the shipped model
DEFAULT_SPLIT_FILE = REPO_DIR / "splits" / "busi_split.json"  # the committed leakage-safe split of BUSI
CLASSES = ("benign", "malignant", "normal")  # BUSI's folders, the class head's outputs in this order (here, torch-free,
                                             # so that the maths can name them without the data layer)


def answer_help_early(build_parser, argv: list[str] | None = None) -> None:
    """Print `--help` and exit when asked for, before a command imports torch: called by each command between
    its parser and its heavy imports."""
    args = sys.argv[1:] if argv is None else list(argv)
    options = args[:args.index("--")] if "--" in args else args  # after "--" come values, not options
    if "-h" in options or "--help" in options:
        build_parser().parse_args(["--help"])


def interactive() -> bool:
    """Whether progress bars are drawn: on a terminal, not in a redirected log, where their carriage returns
    would leave hundreds of fragments (the log keeps its plain lines: one per epoch, one per run)."""
    return sys.stderr.isatty()


def default_threads() -> int:
    """PyTorch CPU threads for inference: half the cores (at least 1, at most 8). The rest decode and write
    images; and when another job (a training run) keeps the cores busy, PyTorch's full-size thread pool slows
    down several times over (measured: 1.0 s instead of 0.03 s for one 128-px image on 2 busy cores)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


# --------------------------------------------------------------------------------------------------------------
# Command-line value checks (argparse `type=` functions: a bad value is refused with the reason)
# --------------------------------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """'1,2' -> [1, 2]: comma-separated positive integers (thread counts)."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"should be positive integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers, got {text!r}")
    return values


def non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 < value < 1):
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


def not_a_multiple(size: int, multiple: int) -> str | None:
    """Why an input size the model cannot take is refused, with the nearest size it can (None if it can)."""
    if size % multiple == 0:
        return None
    return (f"{size} is not a multiple of {multiple} (the model halves it {multiple.bit_length() - 1} times; try "
            f"{max(multiple, round(size / multiple) * multiple)})")


def unit_fraction(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def repeat_spec(text: str) -> str:
    """'' or 'KEY=FACTOR,...' (KEY a class or source name, FACTOR >= 0): checked, returned as given."""
    parse_repeat(text)
    return text


def source_names(text: str) -> list[str]:
    """['A', 'B'] from 'A, B' (a `select_on` value; '' = none named)."""
    return [n.strip() for n in str(text).split(",") if n.strip()]


def source_list(text: str) -> str:
    """A `select_on` value, normalised: 'A,B' from 'A, B'."""
    return ",".join(source_names(text))


MAX_REPEAT = 100  # an image drawn more often per epoch is a typo (normal=1e9 asked for 48 GB), not a recipe


def parse_repeat(text: str) -> dict[str, float]:
    """{'normal': 4.0, ...} from 'normal=4,...' (argparse.ArgumentTypeError for anything else)."""
    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in str(text).split(","))):
        key, _, value = item.partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = math.nan
        if not key or not (math.isfinite(factor) and factor >= 0):  # 0: a source scored but never trained on
            raise argparse.ArgumentTypeError(f"{item!r} should be NAME=FACTOR with a factor >= 0 (e.g. normal=4)")
        if factor > MAX_REPEAT:
            raise argparse.ArgumentTypeError(f"{item!r}: a factor above {MAX_REPEAT} (each image that often per "
                                             f"epoch) is refused")
        out[key.strip()] = factor
    return out


PositiveInt = Annotated[int, positive_int]
NonNegativeInt = Annotated[int, non_negative_int]
UnitFraction = Annotated[float, unit_fraction]
RepeatSpec = Annotated[str, repeat_spec]
SourceList = Annotated[str, source_list]
NonNegativeFloat = Annotated[float, non_negative_float]
PositiveFloat = Annotated[float, positive_float]
Probability = Annotated[float, probability]


def field_comments(cls) -> tuple[dict[str, str], dict[str, str]]:
    """The trailing `# comment` of each field of a dataclass (with the comment-only lines below it that are
    indented past the fields), and the section a field sits in (the last comment-only line at field indentation
    above it)."""
    lines = inspect.getsource(cls).splitlines(keepends=True)
    comments, sections, field, indent, section = {}, {}, None, 0, None
    tokens = tokenize.generate_tokens(iter(lines).__next__)
    line_first: dict[int, tokenize.TokenInfo] = {}
    for tok in tokens:
        if tok.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE, tokenize.NL):
            continue
        row = tok.start[0]
        first = line_first.setdefault(row, tok)
        if tok.type == tokenize.NAME and first is tok and tok.start[1] > 0 and lines[row - 1].split("#")[0].count(":"):
            name = tok.string
            if name in {f.name for f in dataclasses.fields(cls)}:
                field, indent, sections[name] = name, tok.start[1], section
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if first is not tok and field:  # trailing comment of the field on this line
                comments[field] = text
            elif field and field in comments and tok.start[1] > indent:  # continuation: indented past the fields
                comments[field] += " " + text
            else:  # a section title
                section, field = text, None
    return comments, sections


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One --flag per field of `cls`: type and check from its annotation, default from its value, help from its
    comment, grouped by its section. Booleans get --x / --no-x."""
    comments, sections = field_comments(cls)
    hints = typing.get_type_hints(cls, include_extras=True)
    groups: dict = {}
    for f in dataclasses.fields(cls):
        hint, check = hints[f.name], None
        if typing.get_origin(hint) is Annotated:
            hint, check = typing.get_args(hint)[0], typing.get_args(hint)[1]
        kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]  # X | None -> X
        kind, choices = kinds[0], None
        if typing.get_origin(hint) is typing.Literal:  # a fixed set of names
            kind, choices = str, typing.get_args(hint)
        title = sections.get(f.name) or "options"
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        flag = "--" + f.name.replace("_", "-")
        helptext = comments.get(f.name, "").replace("%", "%%")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                               help=f"{helptext} (default: %(default)s)")
        elif typing.get_origin(kind) is list:  # several values after one flag; the flag twice adds, never replaces
            group.add_argument(flag, type=check or typing.get_args(kind)[0], nargs="+", action="extend",
                               default=f.default,
                               help=f"{helptext} (default: %(default)s)")
        else:
            group.add_argument(flag, type=check or kind, default=f.default, choices=choices,
                               help=f"{helptext} (default: %(default)s)")


def explicit_dests(build_parser, argv) -> set[str]:
    """The destinations set on the command line, read from a second parse (by a fresh `build_parser()`) with no
    defaults: abbreviations (--epoch for --epochs) and --no-x count like the full spelling."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


# --------------------------------------------------------------------------------------------------------------
# Reproducibility, device, mixed precision
# --------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool = False, device=None) -> None:
    """Seed python, numpy and torch (all devices); `deterministic` also pins cuDNN to deterministic kernels; on
    a CUDA `device`, otherwise cuDNN's autotuner and TF32 matmuls (fast, not bit-reproducible)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device is not None and device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def unknown_device(name: str) -> str | None:
    """Why `name` names no device of PyTorch's (None: it does; whether it is present is `pick_device`'s check)."""
    import torch

    try:
        torch.device(name)
        return None
    except (RuntimeError, ValueError, TypeError):
        return f"unknown device {name!r} (auto, cpu, cuda, cuda:N or mps)"


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside, SIGTERM (a scheduler's time limit) interrupts like Ctrl-C, so that it ends in the same one-line
    message and exit code 130 instead of a silent kill."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def interrupted(run_dir: Path | None) -> str:
    """The line printed when a run is interrupted outside its training loop: what is kept, and how to go on."""
    latest = run_dir is not None and (Path(run_dir) / "latest.pt").is_file()
    if not latest:
        return "\ninterrupted before the first checkpoint: nothing was saved, nothing was lost"
    return (f"\ninterrupted: the checkpoints in {run_dir} are intact; `python train_unet_busi.py --resume {run_dir}` "
            f"finishes the run (the trust fit and the test evaluation, or the epochs left)")


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda > mps > cpu; otherwise the named device, checked to exist."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if unknown_device(name):  # one rule for every tool: a bad name is one clear line
        raise ValueError(unknown_device(name))
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here (use --device cpu)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r} asked for, but MPS is not available here (use --device cpu)")
    return device


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast is a real speed-up."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def duration(seconds: float) -> str:
    """'45 s', '12 min' or '2.5 h'."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def describe_cpu(dtype=None) -> str:
    """What sets a CPU run's pace: the vector units the kernels use, whether the CPU has bf16 instructions, and
    the training precision `dtype` (None: fp32)."""
    import torch

    bf16 = "with bf16 instructions" if cpu_has_native_bf16() else "no bf16 instructions"
    mode = "fp32 training" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"
    return f"cpu: {torch.backends.cpu.get_cpu_capability()}, {bf16} ({mode})"


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype, or None for fp32.

    CUDA: bf16 where supported, else fp16 (with a GradScaler). CPU: bf16 only where the CPU has bf16
    instructions (measured 1.75x faster training than fp32 on a 2-core AVX512-BF16 machine); fp32 elsewhere,
    since emulated bf16 is slower. MPS: fp32.
    """
    import torch

    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def inference_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """Autocast dtype for evaluation and prediction: as `amp_dtype` on CUDA, fp32 on CPU and MPS.

    On a CPU an image takes milliseconds anyway, and fp32 keeps written masks and reported metrics identical
    on every CPU, with or without bf16 instructions (`--eval-only` prints the same figures everywhere).
    """
    return amp_dtype(device, enabled) if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for `dtype`, or a no-op when it is None."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------
def _write_temp(final: Path, data) -> Path:
    """`data` (bytes, or a callable that writes to a binary file) into a new hidden temp file beside `final` (same
    file system, so the rename is atomic), fsynced, with the mode of any new file (mkstemp makes 0600). An OSError
    that names no file (ENOSPC from write()) is raised again with `final` as its filename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # the name cut short so that a long final name still fits NAME_MAX; unique, so writers never share one
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name[:100]}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            # write() and fsync() name no file (a full disk ends in "... ()"): say which one it was
            raise OSError(exc.errno, exc.strerror, str(final)) from exc
        raise
    return Path(tmp)


def _commit(tmp: Path, final: Path, replace: bool) -> None:
    """Rename a finished temp file to its final name. Without `replace`, a file that exists under that name (one
    another program or run wrote meanwhile) stays: link() refuses to clobber, where rename() would not."""
    if replace:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network shares): check, then rename
        if os.path.lexists(final):
            raise FileExistsError(17, "File exists", str(final)) from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


def atomic_write_all(files: list[tuple[Path, object]], replaceable: set[str] | None = None) -> None:
    """Write each (path, data) to a temp file, then rename them all into place: all of them appear, or none
    (a killed run never leaves a torn file, a failed write such as a full disk leaves no temp file). Only names
    in `replaceable` (None: any) may replace an existing file."""
    temps: list[Path] = []
    done: list[Path] = []
    try:
        for final, data in files:
            temps.append(_write_temp(Path(final), data))
        for tmp, (final, _) in zip(temps, files):
            _commit(tmp, Path(final), replaceable is None or Path(final).name in replaceable)
            done.append(Path(final))
    except BaseException:
        for path in temps + done:
            with contextlib.suppress(OSError):
                os.unlink(path)  # a committed temp is gone already; a half-committed set is undone
        raise


def atomic_write(path: str | os.PathLike, data, replace: bool = True) -> None:
    """One file, atomically (see `atomic_write_all`); `replace=False` never replaces an existing file."""
    atomic_write_all([(Path(path), data)], None if replace else set())


def unwritable(path: str | os.PathLike) -> str | None:
    """Why no file can be created at `path` (a folder there, a file above it, a read-only place), probed with a
    temp file before any slow work; None when it can."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory: give a file name"
    existing = next(p for p in path.parents if p.exists())
    if not existing.is_dir():
        return f"cannot write {path}: {existing} is not a folder"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        return f"cannot write {path}: {exc.strerror or exc}"
    os.close(fd)
    os.unlink(probe)
    return None


def torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically. Serialised in memory first: torch's own file writer fails on a full disk with an
    opaque RuntimeError ('unexpected pos'), while a plain write raises the OSError (ENOSPC) that names the cause."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getbuffer())


def json_safe(value):
    """`value` with every non-finite float turned into None: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike, obj) -> None:
    """Strict JSON (NaN written as null), atomically."""
    atomic_write(path, (json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n").encode())


def printable(text) -> str:
    """`text` as one printable UTF-8 line: bytes that are not UTF-8 appear as \\xff, control characters (a
    newline inside a file name) as \\n, \\x1b, ... (a message never spreads over lines or drives the terminal)."""
    text = os.fsencode(str(text)).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def shown_path(path: Path) -> Path:
    """`path` relative to the working directory where it lies inside it (for help texts and printed commands)."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


MADE_BEFORE_TRAINING = (".claimed", "split.json")  # what a run folder holds until its first checkpoint (and
# split_<source>.json with several sources)


def made_before_training(names) -> bool:
    """Whether a run folder's file names are all of those a run writes before its first checkpoint."""
    return all(n in MADE_BEFORE_TRAINING or (n.startswith("split_") and n.endswith(".json")) for n in names)
_claims: dict[Path, int] = {}  # run folder -> the open, locked file descriptor of its claim marker


def _lock(fd: int) -> bool:
    """An exclusive lock on an open file, held until it is closed or this process ends (however it ends)."""
    if fcntl is None:  # no flock here (Windows): a claim is a marker file only
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _take_marker(run_dir: Path) -> bool:
    """Create run_dir/.claimed already locked (made under a temp name, locked, then linked: no one ever sees it
    unlocked); False when another claim got there first."""
    fd, tmp = tempfile.mkstemp(prefix=".claimed.", dir=run_dir)
    try:
        _lock(fd)
        os.write(fd, str(os.getpid()).encode())  # who holds it, for the message that refuses another
        os.link(tmp, run_dir / ".claimed")
    except FileExistsError:
        os.close(fd)
        return False
    except OSError:  # no hard links here (FAT, some shares): an exclusive create, locked just after
        os.close(fd)
        try:
            fd = os.open(run_dir / ".claimed", os.O_CREAT | os.O_EXCL | os.O_RDWR)
        except FileExistsError:
            return False
        _lock(fd)
    finally:
        os.unlink(tmp)
    _claims[run_dir] = fd
    return True


def _take_abandoned(run_dir: Path) -> bool:
    """Take over a folder whose run died before its first checkpoint: it holds no more than MADE_BEFORE_TRAINING
    and no live process holds its marker's lock (the kernel drops it when its owner dies, even by SIGKILL)."""
    try:
        names = {p.name for p in run_dir.iterdir()}
        if ".claimed" not in names or not made_before_training(names):
            return False
        fd = os.open(run_dir / ".claimed", os.O_RDWR)
    except OSError:
        return False
    if fcntl is None or not _lock(fd):
        os.close(fd)
        return False
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    for split in run_dir.glob("split*.json"):  # the dead run's: this one writes its own
        with contextlib.suppress(OSError):
            split.unlink()
    _claims[run_dir] = fd
    return True


def claim_for_resume(run_dir: Path) -> Path:
    """Take the claim of an existing run folder to continue its run: refused (ValueError, naming its pid) while
    another live process holds it (the run itself, still training, or another resume)."""
    try:
        fd = os.open(run_dir / ".claimed", os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as exc:
        raise ValueError(f"cannot claim {run_dir} to resume its run: {exc.strerror or exc}") from None
    if not _lock(fd):
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ValueError(f"{run_dir} is in use by another live process (pid {holder}): its run is still training "
                         f"or being resumed; wait for it to end, or stop it (its latest.pt is then resumed)")
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _claims[run_dir] = fd
    return run_dir


def claim_run_dir(parent: str | os.PathLike, name: str | None, default_name: str) -> Path:
    """Create and return a run or evaluation folder that no other run owns.

    The claim is atomic (an exclusive mkdir, or an exclusive, locked marker file in an empty folder), so two runs
    started at once never share a folder. A folder whose run was killed before its first checkpoint (nothing in
    it but the marker and the split, and no live owner) is taken over. An explicit `name` whose folder holds
    anything else is refused; a default name that is taken gets a suffix (-2, -3, ...).
    """
    parent = Path(parent)
    candidates = [name] if name else [default_name] + [f"{default_name}-{k}" for k in range(2, 1000)]
    for candidate in candidates:
        run_dir = parent / candidate
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:
            if _take_abandoned(run_dir):
                print(f"note: taking over {run_dir}: its run stopped before its first checkpoint", flush=True)
                return run_dir
            if not run_dir.is_dir() or any(run_dir.iterdir()):
                if not name:
                    continue
                if run_dir.is_dir() and made_before_training({p.name for p in run_dir.iterdir()}):
                    raise ValueError(f"{run_dir} is being used by another run that has not saved a checkpoint "
                                     f"yet: choose another --run-name") from None
                raise ValueError(f"{run_dir} already holds a run (or other files): choose another --run-name, "
                                 f"or continue a training run with --resume {run_dir}") from None
        if _take_marker(run_dir):  # an empty folder (made by hand, or just now by us) becomes ours only once
            return run_dir
        if name:
            raise ValueError(f"{run_dir} is being used by another run: choose another --run-name") from None
    raise ValueError(f"no free folder name for {default_name} in {parent}")


def release_run_dir(run_dir: Path) -> None:
    """End this process's claim on a folder; remove the folder when its run failed before writing anything of
    value (only the claim marker and the split are there), so that the same --run-name can be used again."""
    fd = _claims.pop(Path(run_dir), None)
    try:
        names = {p.name for p in Path(run_dir).iterdir()}
    except OSError:
        names = None
    if names is not None and made_before_training(names):
        with contextlib.suppress(OSError):
            for name in names:
                (Path(run_dir) / name).unlink()
            Path(run_dir).rmdir()
    if fd is not None:
        os.close(fd)


def write_csv(path: Path, header, rows, replace: bool = True) -> None:
    """A CSV file, written atomically (`replace=False`: never over an existing file)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    # undecodable file names: their own bytes
    atomic_write(path, text.getvalue().encode("utf-8", "surrogateescape"), replace)


def save_figure(fig, path: Path) -> None:
    """Write a Matplotlib figure as PNG atomically (a killed run never leaves half a PNG)."""
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))  # keeps outside legends


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex): what names a checkpoint's ONNX export and an adapted model's source."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
