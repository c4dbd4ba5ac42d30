"""Run plumbing: the constants every layer shares (classes, default files, `DataError`), command-line values and
the flags made from a config dataclass, seeding, device and precision, printable text. (Files: storage.py.)"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import math
import os
import random
import tokenize
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

if TYPE_CHECKING:  # for the annotations only: this module stays torch-free at import (--help is answered first)
    import torch

# No numpy or torch at import: the commands build their --help from this module before they load torch, which
# takes seconds on a busy machine. Functions that need them import them (a no-op once loaded).


REPO_DIR = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = REPO_DIR / "checkpoints" / "busi_busbra_lite0_192.pt"  # the shipped model
DEFAULT_SPLIT_FILE = REPO_DIR / "splits" / "busi_split.json"  # the committed leakage-safe split of BUSI
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)  # train, val, test: the shares of each class in a split made here
SPLIT_SEED = 0
SPLITS = ("train", "val", "test", "all")  # a split's parts, and every image of a folder
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # the image files read as scans
BUNDLE_SIZE_MULTIPLE = 16  # 2**4: a bundle's size must suit the U-Net's default depth
CLASSES = ("benign", "malignant", "normal")  # BUSI's folders, the class head's outputs in this order (here, torch-free,
                                             # so that the maths can name them without the data layer)


class DataError(Exception):
    """A problem with the data on disk; the message names the file (the commands print it as one line)."""


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
