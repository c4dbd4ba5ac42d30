"""The decoded-tensor cache (every image and mask decoded once, at the model's size, kept on disk by the files'
sizes and times) and the bundle (that cache in one compressed file, to train where the PNGs are not)."""
from __future__ import annotations

import hashlib
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

import storage
import utils
from image_io import Sample, load_sample, map_threads, resize_image, resize_mask
from utils import CLASSES, DataError

CACHE_VERSION = 2  # 2: EXIF orientation applied, 0/1 masks read as lesion (older caches hold other pixels)
BUNDLE_FORMAT = "busi-bundle-v1"


# --------------------------------------------------------------------------------------------------------------
# Decoded tensor cache
# --------------------------------------------------------------------------------------------------------------


def _cache_key(data_dir: Path, samples: list[Sample], image_size: int) -> str:
    digest = hashlib.sha1(f"v{CACHE_VERSION} size={image_size}".encode())
    for sample in samples:
        for rel in [sample.image, *sample.masks]:
            st = (data_dir / rel).stat()
            # fsencode: a name that is not valid UTF-8 hashes as its own bytes (surrogate escape)
            digest.update(os.fsencode(rel) + f":{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def build_cache(data_dir: str | os.PathLike, samples: list[Sample], image_size: int,
                cache_dir: str | os.PathLike | None = ".cache", progress: bool = True) -> dict:
    """Decode every sample once; return (and keep on disk) uint8 tensors at `image_size`.

    Keys: images/masks uint8 [N,1,S,S] (masks 0/1), labels int64 [N], names (list of paths), and the
    original-resolution masks as bit-packed uint8 tensors (`full_masks`, `full_sizes` as [N,2] of H, W) so that
    metrics at each image's own resolution need no more PNG decoding.
    """
    root = Path(data_dir)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"busi_{image_size}_{_cache_key(root, samples, image_size)}.pt"
        if cache_file.is_file():
            try:
                cache = torch.load(cache_file, map_location="cpu", weights_only=True)
                problem = cache_problem(cache, image_size, [s.image for s in samples])
            except Exception as exc:  # noqa: BLE001 - a torn file
                problem = f"unreadable ({type(exc).__name__})"
            if problem is None:
                warn_empty_masks(cache)
                return cache
            print(f"warning: the data cache {cache_file} is damaged ({utils.printable(problem)}): rebuilding it",
                  file=sys.stderr)

    def decode(sample: Sample):
        image, mask = load_sample(root, sample)
        return (resize_image(image, image_size), resize_mask(mask, image_size),
                torch.from_numpy(np.packbits(mask)), mask.shape)

    decoded = map_threads(decode, samples, progress, f"decoding {len(samples)} images at {image_size}px")
    cache = {
        "images": torch.from_numpy(np.stack([d[0] for d in decoded]))[:, None].contiguous(),
        "masks": torch.from_numpy(np.stack([d[1] for d in decoded]).astype(np.uint8))[:, None].contiguous(),
        "labels": torch.tensor([s.label_index for s in samples], dtype=torch.int64),
        "names": [s.image for s in samples],
        "full_masks": [d[2] for d in decoded],
        "full_sizes": torch.tensor([d[3] for d in decoded], dtype=torch.int64),
    }
    if cache_file is not None:
        try:
            storage.torch_save(cache, cache_file)
        except OSError as exc:  # a read-only or full disk only costs the next run its head start
            print(f"warning: could not write the data cache {cache_file}: {exc}", file=sys.stderr)
    warn_empty_masks(cache)
    return cache


def cache_problem(cache, image_size: int | None = None, names: list[str] | None = None) -> str | None:
    """What is wrong with a decoded cache (or a bundle's): a key missing, a tensor of the wrong type or length;
    None when every part fits `build_cache`'s layout (and the given image size and names)."""
    if not isinstance(cache, dict):
        return f"a {type(cache).__name__}, not a dict"
    missing = [k for k in ("images", "masks", "labels", "names", "full_masks", "full_sizes") if k not in cache]
    if missing:
        return f"no {missing[0]!r}"
    images, masks, labels, sizes = cache["images"], cache["masks"], cache["labels"], cache["full_sizes"]
    if not all(isinstance(t, torch.Tensor) for t in (images, masks, labels, sizes)):
        return "images, masks, labels and full_sizes should be tensors"
    n = len(cache["names"]) if isinstance(cache["names"], list) else -1
    if n < 0 or not all(isinstance(name, str) for name in cache["names"]):
        return "'names' should be a list of paths"
    if names is not None and cache["names"] != names:
        return "its image names are not this data's"
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[:2] != (n, 1) \
            or images.shape[2] != images.shape[3] or image_size not in (None, images.shape[2]):
        return f"images of shape {tuple(images.shape)} for {n} images at {image_size} px"
    if masks.shape != images.shape or masks.dtype != torch.uint8:
        return f"masks of shape {tuple(masks.shape)}, images {tuple(images.shape)}"
    if labels.shape != (n,) or (n and not 0 <= int(labels.min()) <= int(labels.max()) < len(CLASSES)):
        return f"labels of shape {tuple(labels.shape)} for {n} images (or outside 0-{len(CLASSES) - 1})"
    if sizes.shape != (n, 2) or (n and int(sizes.min()) < 1):
        return f"full_sizes of shape {tuple(sizes.shape)} for {n} images"
    packed = cache["full_masks"]
    if not isinstance(packed, list) or len(packed) != n:
        return f"full_masks should be a list of {n} tensors"
    for name, bits, (h, w) in zip(cache["names"], packed, sizes.tolist()):
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.numel() != -(-h * w // 8):
            return f"the full-size mask of {name} does not fit its {w}x{h} size"
    return None


def warn_empty_masks(cache: dict, shown: int = 3) -> list[str]:
    """Warn on stderr (one line) about benign/malignant images whose merged mask is empty; returns their names.

    Such an image trains as "no lesion"; a mask format read wrongly looks exactly like this, so say it aloud.
    """
    empty = [name for name, label, packed in zip(cache["names"], cache["labels"].tolist(), cache["full_masks"])
             if CLASSES[label] != "normal" and not bool(packed.any())]  # packbits pads with zero bits only
    if empty:
        listed = utils.printable(", ".join(empty[:shown]) + (", ..." if len(empty) > shown else ""))
        verb, pronoun = ("image has", "it trains") if len(empty) == 1 else ("images have", "they train")
        print(f"warning: {len(empty)} benign/malignant {verb} an empty mask ({listed}): {pronoun} as \"no lesion\"",
              file=sys.stderr, flush=True)
    return empty


def unpack_mask(packed: torch.Tensor, size) -> torch.Tensor:
    """Inverse of the bit-packing in `build_cache`: bool tensor of shape `size` (H, W)."""
    h, w = int(size[0]), int(size[1])
    return torch.from_numpy(np.unpackbits(packed.numpy())[: h * w].reshape(h, w).astype(bool))


# --------------------------------------------------------------------------------------------------------------
# Bundle: the decoded cache in one compressed file
# --------------------------------------------------------------------------------------------------------------
def is_bundle(path: str | os.PathLike) -> bool:
    return Path(path).is_file()


def _zip(array: np.ndarray) -> torch.Tensor:
    return torch.frombuffer(bytearray(zlib.compress(np.ascontiguousarray(array).tobytes(), 6)), dtype=torch.uint8)


def _unzip(blob: torch.Tensor, dtype, shape) -> np.ndarray:
    return np.frombuffer(zlib.decompress(blob.numpy().tobytes()), dtype=dtype).reshape(shape)


def write_bundle(cache: dict, image_size: int, path: str | os.PathLike) -> int:
    """Write `build_cache`'s tensors as one file; returns its size in bytes.

    Images are stored as left-neighbour differences (like PNG's "Sub" filter) and zlib-compressed, masks
    bit-packed: all of BUSI at 256 px is about a quarter of its PNGs. Everything needed to train and to score
    at the original resolution is inside; the PNGs are not (no GUI, no duplicate grouping from a bundle).
    """
    images = cache["images"].numpy()
    deltas = np.diff(images, axis=-1, prepend=np.zeros_like(images[..., :1]))  # uint8 wrap-around is lossless
    packed = [m.numpy() for m in cache["full_masks"]]
    bundle = {
        "format": BUNDLE_FORMAT, "image_size": image_size, "names": list(cache["names"]), "labels": cache["labels"],
        "full_sizes": cache["full_sizes"], "images_shape": list(images.shape), "images": _zip(deltas),
        "masks": _zip(np.packbits(cache["masks"].numpy())),
        "full_mask_lengths": torch.tensor([len(m) for m in packed], dtype=torch.int64),
        "full_masks": _zip(np.concatenate(packed) if packed else np.zeros(0, np.uint8)),
    }
    storage.torch_save(bundle, path)
    return Path(path).stat().st_size


def read_bundle(path: str | os.PathLike, image_size: int | None = None) -> dict:
    """The cache dict of `build_cache` from a bundle file (DataError for anything else, or another size)."""
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise DataError(f"{path} is a file but not a data bundle made by `python dataset.py --bundle` "
                        f"({type(exc).__name__})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise DataError(f"{path} is a file but not a data bundle made by `python dataset.py --bundle`")
    if image_size is not None and bundle.get("image_size") != image_size:
        raise DataError(f"{path} holds {bundle.get('image_size')} px images, not {image_size} px: pass "
                        f"--image-size {bundle.get('image_size')} or make a bundle at {image_size} px")
    try:
        shape = bundle["images_shape"]
        images = np.cumsum(_unzip(bundle["images"], np.uint8, shape), axis=-1, dtype=np.uint8)
        n_pixels = int(np.prod(shape))
        masks = np.unpackbits(_unzip(bundle["masks"], np.uint8, (-1,)))[:n_pixels].reshape(shape)
        flat = _unzip(bundle["full_masks"], np.uint8, (-1,))
        ends = np.cumsum(bundle["full_mask_lengths"].numpy())
        full = [torch.from_numpy(flat[e - n:e].copy()) for e, n in zip(ends, bundle["full_mask_lengths"].tolist())]
        cache = {"images": torch.from_numpy(images.copy()), "masks": torch.from_numpy(masks.copy()),
                 "labels": bundle["labels"], "names": list(bundle["names"]), "full_masks": full,
                 "full_sizes": bundle["full_sizes"]}
    except Exception as exc:  # noqa: BLE001 - a key missing, bytes that do not decompress or reshape
        raise DataError(f"{path} is a damaged data bundle ({type(exc).__name__}: {exc})") from None
    problem = cache_problem(cache, image_size)
    if problem:
        raise DataError(f"{path} is a damaged data bundle: {problem}")
    warn_empty_masks(cache)
    return cache


def bundle_samples(cache: dict) -> list[Sample]:
    """Samples (image name and class, no mask paths) for the images of a bundle, for split checks."""
    return [Sample(image=n, label=CLASSES[int(k)]) for n, k in zip(cache["names"], cache["labels"])]


def subset(cache: dict, names: list[str]) -> dict:
    """The cache entries for `names` (in that order)."""
    index = {n: i for i, n in enumerate(cache["names"])}
    idx = [index[n] for n in names]
    t = torch.tensor(idx, dtype=torch.long)
    return {
        "images": cache["images"][t], "masks": cache["masks"][t], "labels": cache["labels"][t],
        "names": list(names), "full_masks": [cache["full_masks"][i] for i in idx],
        "full_sizes": cache["full_sizes"][t],
    }


