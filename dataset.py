"""The data every tool trains and scores on: which folders (the data sources, several joined, recorded ones
found again), which split of each (the committed one that lists the folder's images, else one made now), and the
parts loaded as tensors (train, val, test per source). The jobs below it: `images` (discovery and decoding),
`splits` (near-duplicates, patients, split files), `tensor_cache` (the decoded cache and bundles).

Layout (Kaggle "breast-ultrasound-images-dataset"):

    <data-dir>/{benign,malignant,normal}/X.png
    <data-dir>/{benign,malignant,normal}/X_mask.png, X_mask_1.png, X_mask_2.png, ...

Every problem with the files raises `DataError` with a one-line message naming the file; the scripts turn it
into `error: ...` and a non-zero exit. Run `python dataset.py --help` to (re)generate a split file, or to pack
the decoded data into one compressed bundle file (to train on a machine that does not hold the PNGs).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import storage
import utils
from utils import BUNDLE_SIZE_MULTIPLE, CLASSES, DEFAULT_SPLIT_FILE, SPLIT_FRACTIONS, SPLIT_SEED, DataError

def build_parser() -> argparse.ArgumentParser:
    """The command line of `python dataset.py` (here, before numpy, torch and PIL load: --help needs none)."""
    parser = argparse.ArgumentParser(
        description="Discover a BUSI-layout data dir, group near-duplicate images by perceptual hash and write a "
                    "leakage-safe, class-stratified train/val/test split (JSON).")
    parser.add_argument("--data-dir", default=None,
                        help="folder with benign/, malignant/, normal/ (default: ./Dataset_BUSI_with_GT, as for "
                             "train_unet_busi.py; never the bundled sample, whose split would replace BUSI's)")
    parser.add_argument("--out", default=None,
                        help="where to write the split (default: the split in the repo's splits/ that lists "
                             "exactly these images, such as busi_split.json, regenerated; for other images a new "
                             "splits/<folder name>_split.json: a split of other data is never replaced)")
    parser.add_argument("--seed", type=int, default=SPLIT_SEED, help="shuffle seed (default: %(default)s)")
    parser.add_argument("--fractions", type=float, nargs=3, default=SPLIT_FRACTIONS, metavar=("TRAIN", "VAL", "TEST"),
                        help="shares of each class for train, val and test; a test share of 0 writes no test part "
                             "(a source whose test sets are held elsewhere) (default: %(default)s)")
    parser.add_argument("--patient-pattern", default=None, metavar="REGEX",
                        help="keep the images of one patient together: a regular expression whose first (group) "
                             "captures the patient from the file name, e.g. '^(bus_[0-9]+)-' for BUS-BRA")
    parser.add_argument("--groups-csv", default=None, metavar="CSV",
                        help="keep together the images that share a 'group' in this CSV (columns image, group)")
    parser.add_argument("--bundle", default=None, metavar="FILE",
                        help="instead of a split, write the data decoded at --image-size into one compressed file "
                             "that train_unet_busi.py --data-dir FILE trains from (for a machine without the PNGs)")
    parser.add_argument("--image-size", type=utils.positive_int, default=256,
                        help=f"image size of --bundle, a multiple of {BUNDLE_SIZE_MULTIPLE} as training at the "
                             f"default depth needs (default: %(default)s)")
    return parser


if __name__ == "__main__":
    utils.answer_help_early(build_parser)

import torch  # noqa: E402
from image_io import Sample, discover_samples  # noqa: E402
import splitting  # noqa: E402
from splitting import compute_split, read_split, split_matches, write_split  # noqa: E402
from tensor_cache import build_cache, bundle_samples, is_bundle, read_bundle, subset, write_bundle  # noqa: E402


# ------------------------------------------------------------------------------------------------------------------
# Which data and which split: one rule for every tool
# ------------------------------------------------------------------------------------------------------------------
SAMPLE_DIR = Path(__file__).resolve().parent / "data" / "busi_sample"
LOCAL_DATA_DIR = Path("Dataset_BUSI_with_GT")  # where the Kaggle download unpacks, beside the scripts


def resolve_data_dir(data_dir: str | os.PathLike | None, announce: bool = True) -> Path:
    """The folder (or bundle) given, else ./Dataset_BUSI_with_GT if present, else the bundled sample; the sample
    is announced in a banner, since its numbers mean nothing."""
    if data_dir:
        return Path(data_dir)
    if LOCAL_DATA_DIR.is_dir():
        return LOCAL_DATA_DIR
    if announce:
        banner = "=" * 100
        print(f"{banner}\n  NO --data-dir GIVEN AND ./Dataset_BUSI_with_GT NOT FOUND: using the bundled sample "
              f"(data/busi_sample, a handful of images).\n  Its numbers mean nothing. For real results download BUSI "
              f"from Kaggle ('breast-ultrasound-images-dataset') and\n  pass --data-dir PATH/Dataset_BUSI_with_GT "
              f"(or unpack it into this folder).\n{banner}", flush=True)
    return SAMPLE_DIR


SOURCE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")


def _resolved(path: Path) -> Path:
    """`path` with its symbolic links followed; a loop of links is a DataError naming it (Path.resolve raises a
    RuntimeError for one)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "a loop of symbolic links"
        raise DataError(f"cannot follow {utils.printable(path)}: {why}") from None


def default_source_name(path: Path) -> str:
    """A source's name when none is given: its folder's (or bundle's) name, with what a name may not hold (`=`,
    spaces, ...) made `_`, so that the NAME=PATH a run records reads back as that source."""
    raw = path.stem if path.is_file() else (_resolved(path).name or "data")
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", raw)
    return name if SOURCE_NAME_RE.match(name) else f"data_{name}"


def resolve_sources(specs, announce: bool = True) -> list[tuple[str, Path]]:
    """The data sources of --data-dir values: [(name, folder or bundle)]. A value is PATH or NAME=PATH; the name
    (the folder's own name by default, see `default_source_name`) labels the source's images in every report. No
    value: one source, `resolve_data_dir`'s default. One folder given twice (under two names, or through a link)
    is a DataError: it would be trained on twice."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    if not specs:
        path = resolve_data_dir(None, announce)
        return [(path.name, path)]
    sources: list[tuple[str, Path]] = []
    for spec in map(str, specs):
        name, _, rest = spec.partition("=")
        if rest and SOURCE_NAME_RE.match(name) and not Path(spec).exists():
            path = Path(rest)
        else:
            path = Path(spec)
            name = default_source_name(path)
        if name in CLASSES:  # --repeat normal=4 would weigh the class and the source at once
            raise DataError(f"a data source may not be named like a class ({name!r}: {path}): name it, e.g. "
                            f"--data-dir {name}_data={path} (NAME=PATH)")
        if any(name == n for n, _ in sources):
            raise DataError(f"two data sources named {name!r}: name them, e.g. --data-dir {name}_2={path} "
                            f"(NAME=PATH)")
        twin = next((n for n, p in sources if same_folder(p, path)), None)
        if twin is not None:
            raise DataError(f"the data sources {twin} and {name} are one folder ({_resolved(path)}): give it once")
        _resolved(path)  # a loop of links: named now, not as a traceback later
        sources.append((name, path))
    return sources


def source_spec(name: str, path: Path) -> str:
    """NAME=ABSOLUTE_PATH: how a run records a source, so that a resume from any folder finds it."""
    return f"{name}={_resolved(Path(path))}"


def concat(parts: list[dict]) -> dict:
    """One split dict from several sources' (`subset` dicts with 'sources'), in order."""
    if len(parts) == 1:
        return parts[0]
    return {"images": torch.cat([p["images"] for p in parts]), "masks": torch.cat([p["masks"] for p in parts]),
            "labels": torch.cat([p["labels"] for p in parts]), "names": [n for p in parts for n in p["names"]],
            "full_masks": [m for p in parts for m in p["full_masks"]],
            "full_sizes": torch.cat([p["full_sizes"] for p in parts]),
            "sources": [s for p in parts for s in p["sources"]]}


def of_sources(part: dict, names) -> dict:
    """The images of a joined part (`concat`) that come from the sources `names`, in their order."""
    keep = [i for i, s in enumerate(part["sources"]) if s in names]
    if len(keep) == len(part["names"]):
        return part
    idx = torch.tensor(keep, dtype=torch.long)
    return {**{k: part[k][idx.to(part[k].device)] for k in ("images", "masks", "labels", "full_sizes")},
            **{k: [part[k][i] for i in keep] for k in ("names", "full_masks", "sources")}}


def recorded_sources(config: dict, check_data: bool = True, given=None, run_dir: Path | None = None
                     ) -> tuple[list[str] | None, list[str] | None]:
    """The sources and splits a run or checkpoint records (absolute paths; runs from before that, as they were
    given), as --data-dir and --split-file values, or None where it records none. One that cannot be found is a
    DataError naming it and the flag that replaces it: never another folder or split, silently. With `run_dir` (a
    resume), --data-dir values `given` must name the recorded sources (`same_sources`)."""
    data = config.get("data_dir")
    data = data if isinstance(data, list) else [data] if data else None
    for name, path in resolve_sources(data, announce=False) if data and check_data else []:
        if not path.exists():
            raise DataError(f"the recorded data source {name} ({path}) is not found from {Path.cwd()}: pass "
                            f"--data-dir with its folder")
    splits = config.get("split_file")
    if not splits:
        return data, same_sources(given, data, None, run_dir) if run_dir else None
    found = []
    for name, path in (splits if isinstance(splits, dict) else {None: splits}).items():
        if not str(path).endswith(".json"):  # "every image", or a split computed and not written
            continue
        committed = DEFAULT_SPLIT_FILE.parent / Path(path).name
        if not Path(path).is_file() and Path(path).parent.name == "splits" and committed.is_file():
            path = str(committed)  # a committed split, recorded in another clone of this repository
        if not Path(path).is_file():
            raise DataError(f"the recorded split {path} is not found from {Path.cwd()}: pass --split-file with it")
        found.append(str(path) if name is None else f"{name}={path}")
    return data, same_sources(given, data, found, run_dir) if run_dir else found


def same_folder(a: Path, b: Path) -> bool:
    """Whether two paths name one existing folder or file (through symbolic links, `..`, bind mounts)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def recorded_splits_for(config: dict, data_dir) -> list[str] | None:
    """--split-file values (NAME=PATH) that give each of `sources` that a checkpoint was trained on (the same
    folder; or the same name, where the recorded folder is gone) the split it was trained with, so that its test
    part is never another split's training scans. A source the run never saw gets none (its committed split, or
    one computed now). A recorded split that cannot be found, or that was never written, is a DataError naming
    the source and the flag that replaces it. `data_dir`: the --data-dir values; None where nothing is recorded."""
    sources = resolve_sources(data_dir, announce=False)
    data = config.get("data_dir")
    data = data if isinstance(data, list) else [data] if data else []
    splits = config.get("split_file")
    if not data or not splits:
        return None
    try:
        recorded = resolve_sources(data, announce=False)
    except DataError:
        return None
    if not isinstance(splits, dict):  # runs of one source recorded its split as a path
        splits = {recorded[0][0]: splits} if len(recorded) == 1 else {}
    given = []
    for name, path in sources:
        match = next((r for r, rpath in recorded if same_folder(path, rpath)), None) or \
            next((r for r, rpath in recorded if r == name and not rpath.exists()), None)
        if match is None or match not in splits:
            continue
        split = str(splits[match])
        if not split.endswith(".json"):
            raise DataError(f"the checkpoint was trained on {name} with a split it did not write ({split}): pass "
                            f"--split-file {name}=FILE with that split, or --eval-split all")
        committed = DEFAULT_SPLIT_FILE.parent / Path(split).name
        if not Path(split).is_file() and Path(split).parent.name == "splits" and committed.is_file():
            split = str(committed)  # a committed split, recorded in another clone of this repository
        if not Path(split).is_file():
            raise DataError(f"the split the checkpoint was trained with on {name} ({split}) is not found from "
                            f"{Path.cwd()}: pass --split-file {name}=FILE with it (another split's test part may "
                            f"hold its training scans)")
        given.append(f"{name}={split}")
    return given or None


def same_sources(given: list[str] | None, recorded: list[str] | None, splits: list[str] | None,
                 run_dir: Path) -> list[str] | None:
    """Check, before anything is trained, that --data-dir given to --resume names the run's sources (each source's
    history columns, validation score and split are kept by its name); a DataError naming the recorded ones if
    not. A run of one source may find it under another name (the folder moved): its recorded split follows it.
    Returns the recorded splits, as --split-file values for the sources given (as they are, without both)."""
    if not given or not recorded:
        return splits
    names = [n for n, _ in resolve_sources(given, announce=False)]
    before = [n for n, _ in resolve_sources(recorded, announce=False)]
    if len(names) == len(before) == 1:
        return [f"{names[0]}={s.partition('=')[2]}" if s.partition("=")[0] == before[0] else s
                for s in splits] if splits else splits
    if sorted(names) != sorted(before):
        raise DataError(f"the run in {run_dir} trained on the sources {', '.join(before)} ({', '.join(recorded)}); "
                        f"--data-dir names {', '.join(names)}: a run's sources cannot change mid-run (give the "
                        f"same names, NAME=PATH, or leave --data-dir out to use the recorded ones)")
    return splits


def split_files_by_source(specs, sources: list[tuple[str, Path]]) -> dict:
    """{source name: split file} from --split-file values (NAME=PATH, or a PATH: the only source's)."""
    out = {}
    for spec in [specs] if isinstance(specs, (str, os.PathLike)) else specs or []:
        name, _, path = str(spec).partition("=")
        if path and any(name == n for n, _ in sources):
            out[name] = path
        elif len(sources) == 1:
            out[sources[0][0]] = str(spec)
        else:
            raise DataError(f"--split-file {spec}: with several sources name the source (NAME=PATH; sources: "
                            f"{', '.join(n for n, _ in sources)})")
    return out


def load_parts(sources: list[tuple[str, Path]], split_specs, image_size: int, cache_dir: str | None,
               split_dir: Path | None, every_image: bool = False, only: str | None = None) -> tuple[dict, dict]:
    """Every source's train/val/test parts (or "all" its images with `every_image`), decoded once at `image_size`,
    joined: each image keeps its source (the part's "sources"), and with several sources its name is
    SOURCE/class/file. A source's split is the one `split_specs` names for it, else `choose_split`'s; a split
    computed now is written into `split_dir` (split.json, or split_<source>.json with several; None: not
    written; `only`: decode just that part, e.g. the split an evaluation scores). Returns the parts and {source:
    where its split came from (an absolute path)}."""
    chosen = split_files_by_source(split_specs, sources)
    several, joined, split_sources, loaded = len(sources) > 1, {}, {}, {}
    for name, data_dir in sources:
        if is_bundle(data_dir):  # one file from `python dataset.py --bundle`: already decoded
            cache = read_bundle(data_dir, image_size)
            samples = bundle_samples(cache)
        else:
            samples, cache = discover_samples(data_dir), None
        if every_image:
            split, source = {"all": sorted(s.image for s in samples)}, "every image"
        else:
            written = None if split_dir is None else split_dir / (f"split_{name}.json" if several else "split.json")
            split, source = choose_split(data_dir, samples, chosen.get(name, DEFAULT_SPLIT_FILE), name in chosen,
                                         write_to=written)
            source = str(Path(source).resolve()) if source.endswith(".json") else source
        if not every_image and only is None and not split["val"]:
            # each source's validation score is half of what picks best.pt, the gate and the trust score
            raise DataError(f"the split of source {name} ({source}) has no validation images: best.pt, the 'no "
                            f"lesion' gate and the trust score would be chosen without it; give it a split with a "
                            f"validation part")
        counts = {k: len(split[k]) for k in ("train", "val", "test", "all") if k in split and only in (None, k)}
        if cache is None:
            wanted = {n for k in counts for n in split[k]}
            cache = build_cache(data_dir, [s for s in samples if s.image in wanted], image_size, cache_dir)
        print(f"data: {name}: {data_dir} | {len(samples)} images "
              f"({', '.join(sorted({s.label for s in samples}))}) | split {counts} from {source}", flush=True)
        for k in counts:
            part = subset(cache, split[k])
            loaded.setdefault(name, {})[k] = part
            part["sources"] = [name] * len(part["names"])
            if several:
                part["names"] = [f"{name}/{n}" for n in part["names"]]
            joined.setdefault(k, []).append(part)
        split_sources[name] = source
    if several and not every_image and all("train" in parts for parts in loaded.values()):
        splitting.check_across_sources(loaded)
    return {k: concat(v) for k, v in joined.items()}, split_sources


def load_run_data(cfg, run_dir: Path) -> tuple[dict, list, dict]:
    """What a run (its configuration `cfg`) trains or scores on: the train/val/test parts of every source, decoded
    once at the training size and joined (load_parts), the sources and each one's split."""
    sources = resolve_sources(cfg.data_dir)
    only = cfg.eval_split if cfg.eval_only else None  # an evaluation decodes the split it scores ("all": no split)
    parts, split_sources = load_parts(sources, cfg.split_file, cfg.image_size, cfg.cache_dir or None,
                                      None if cfg.resume is not None else run_dir, only == "all", only)
    counts = {k: len(v["names"]) for k, v in parts.items()}
    # a test part is optional: BUS-BRA's split and a site's labelled scans have none
    empty = [k for k in ((cfg.eval_split,) if cfg.eval_only else ("train", "val")) if not counts.get(k)]
    if empty:
        raise ValueError(f"the split leaves no {', '.join(empty)} images ({counts}); add data or pass a --split-file")
    if not cfg.eval_only and counts["train"] < 2:
        raise ValueError(f"training needs at least 2 images (BatchNorm), the split has {counts['train']}")
    return parts, sources, split_sources


SCANNER_TABLE = "bus_data.csv"  # BUS-BRA's per-image table: ID (the file's stem) and Device (the scanner)


def scanners(sources: list[tuple[str, Path]]) -> dict[str, str]:
    """{image name as the joined parts give it: scanner} for the sources whose folder holds a SCANNER_TABLE
    (columns ID, Device); empty for others."""
    import csv
    several, out = len(sources) > 1, {}
    for name, folder in sources:
        table = Path(folder) / SCANNER_TABLE
        if not table.is_file():
            continue
        try:
            with open(table, newline="") as f:
                device = {row["ID"]: row["Device"] for row in csv.DictReader(f) if row.get("ID") and row.get("Device")}
        except (OSError, KeyError, UnicodeDecodeError, csv.Error):
            continue  # a table it cannot read only costs the per-scanner breakdown
        for label in CLASSES:
            for path in (Path(folder) / label).glob("*"):
                if path.stem in device:
                    out[f"{name}/{label}/{path.name}" if several else f"{label}/{path.name}"] = device[path.stem]
    return out




def choose_split(data_dir: Path, samples: list[Sample], split_file: str | os.PathLike = DEFAULT_SPLIT_FILE,
                 explicit: bool = False, write_to: Path | None = None) -> tuple[dict, str]:
    """(split, where it came from): the split file when it lists exactly these images (an `explicit` one must),
    else the committed split in splits/ that does (BUSI's, BUS-BRA's), else a leakage-safe split computed now
    (and written to `write_to`). A damaged split file is an error."""
    split_path = Path(split_file)
    if not split_path.is_absolute() and not split_path.exists():
        split_path = Path(__file__).resolve().parent / split_path  # the repo's own splits/ from any folder
    if explicit:
        return read_split(split_path, samples), str(split_path.resolve())
    committed = sorted(DEFAULT_SPLIT_FILE.parent.glob("*.json"))
    candidates = [c for c in [split_path] + [c for c in committed if c.resolve() != split_path.resolve()]
                  if c.is_file()]
    for candidate in candidates:
        split = read_split(candidate)
        if split_matches(split, samples):
            return split, str(candidate.resolve())
    if is_bundle(data_dir):
        raise DataError(f"{split_path} does not list the images of the bundle {data_dir}, and a bundle has no "
                        f"full-size images to group duplicates: pass --split-file with a split of its images")
    where = f" into {write_to}" if write_to else ""
    print(f"{split_path.name} does not list this data dir's images: computing a leakage-safe split (near-duplicate "
          f"grouping + stratification){where}", flush=True)
    split = compute_split(data_dir, samples, progress=write_to is not None)
    if write_to is None:
        return split, "computed for this folder"
    write_split(split, write_to)
    return split, str(write_to)


def _check_writable(path: Path) -> None:
    """DataError unless a file can be created at `path` (storage.unwritable), before any slow work."""
    problem = storage.unwritable(path)
    if problem:
        raise DataError(problem)


def default_split_out(data_dir: Path, samples: list[Sample]) -> Path:
    """Where `python dataset.py` writes a split without --out: the split in splits/ that lists exactly these images
    (regenerated: the same data), else a new splits/<source name>_split.json. A file of that name that lists other
    images is a DataError asking for --out: a split of other data is never replaced."""
    folder = DEFAULT_SPLIT_FILE.parent
    for candidate in sorted(folder.glob("*.json")):
        try:
            if split_matches(read_split(candidate), samples):
                return candidate
        except DataError:
            continue
    target = folder / f"{default_source_name(Path(data_dir))}_split.json"
    if target.exists():
        raise DataError(f"{target} is a split of other images: pass --out FILE (a split of other data is never "
                        f"replaced)")
    print(f"note: no split in {folder} lists these images: writing a new one, {target.name} (--out chooses)",
          flush=True)
    return target


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = utils.not_a_multiple(args.image_size, BUNDLE_SIZE_MULTIPLE)
    if problem:
        parser.error(f"argument --image-size: {problem}")
    data_dir = resolve_data_dir(args.data_dir, announce=False)
    try:
        if data_dir == SAMPLE_DIR:  # its split would replace BUSI's committed one
            raise DataError("no --data-dir given and ./Dataset_BUSI_with_GT not found: pass --data-dir "
                            "PATH/Dataset_BUSI_with_GT")
        samples = discover_samples(data_dir)
        out = Path(args.bundle or args.out or default_split_out(data_dir, samples))
        _check_writable(out)  # fail now, not after decoding or hashing every image
        if args.bundle:
            cache = build_cache(data_dir, samples, args.image_size, None)
            try:
                size = write_bundle(cache, args.image_size, out)
            except OSError as exc:  # e.g. the disk filled up: atomic_write left no partial file
                raise DataError(f"cannot write {out}: {exc.strerror or exc}") from None
            print(f"{len(samples)} images at {args.image_size} px -> {out} ({size / 2**20:.1f} MiB)")
            return 0
        if not (all(f >= 0 for f in args.fractions) and abs(sum(args.fractions) - 1) < 1e-6
                and min(args.fractions[:2]) > 0):
            raise DataError(f"--fractions {args.fractions}: train and val shares must be > 0, test >= 0, summing to 1")
        split = compute_split(data_dir, samples, seed=args.seed, fractions=args.fractions,
                              patient_pattern=args.patient_pattern, groups_csv=args.groups_csv)
        empty = [k for k, f in zip(("train", "val", "test"), args.fractions) if f > 0 and not split[k]]
        if empty:  # asked for, but whole groups filled the other parts
            largest = max((len(g) for g in split["duplicate_groups"]), default=1)
            raise DataError(f"the split leaves no {' and no '.join(empty)} images (fractions {args.fractions}, "
                            f"{len(samples)} images, the largest group kept together holds {largest}): the grouping "
                            f"is too coarse for these shares; nothing written")
        if args.fractions[2] == 0:
            del split["test"]
        try:
            write_split(split, out)
        except OSError as exc:
            raise DataError(f"cannot write {out}: {exc.strerror or exc}") from None
    except DataError as exc:
        print(f"error: {utils.printable(exc)}", file=sys.stderr)
        return 2
    counts = {k: len(split[k]) for k in ("train", "val", "test") if k in split}
    print(f"{len(samples)} images, {len(split['duplicate_groups'])} groups kept together "
          f"({sum(len(g) for g in split['duplicate_groups'])} images); split {counts} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
