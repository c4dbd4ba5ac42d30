"""Files that are never half written: the one atomic write (a temp file beside the target, fsynced, then renamed),
JSON/CSV/figure/torch writes through it, file hashes, and run folders claimed by one process at a time (a new
run's folder, a resume's lock). Torch-free at import, as the commands' --help needs."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


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
