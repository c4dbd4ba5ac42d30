"""Export a trained BUSI U-Net to ONNX, to run it with onnxruntime, numpy and Pillow alone (no PyTorch, no code of
this repository), and check the export against PyTorch on real scans.

    python export_onnx.py --output model.onnx                                  # the shipped model
    python export_onnx.py --checkpoint checkpoints/RUN/best.pt --output run.onnx

The file holds the model at its training size: input `image` float32 [N,1,S,S] (the grey scan squashed to S x S,
divided by 255), outputs `mask_logits` [N,1,S,S], `class_logits` [N,3] (benign, malignant, normal; without a class
head: none) and `deep_features` (what the trust score reads). Its metadata says how to prepare a scan and read the
outputs, and carries the checkpoint's entries (config with size and threshold, the trust entry with the calibration
temperatures, ...) as JSON. The example in docs/prediction.md uses it.

Before the file is written, the export and PyTorch predict the same scans (the bundled sample, or --check-images)
through predict_busi.py's pipeline: it is written only when the masks agree on >= 99.9 % of pixels, the Dice of
the two masks is >= 0.999 on every scan, the predicted classes agree, and the probabilities and the malignancy
differ by less than 1e-3. An existing --output is never replaced. Exit codes: 0 written; 1 the check failed
(nothing written); 2 a bad checkpoint, option, or missing package.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import storage
import utils  # (torch-free: --help is answered from it before torch loads, below)
from utils import DEFAULT_CHECKPOINT

SAMPLE_DIR = utils.REPO_DIR / "data" / "busi_sample"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Export a trained BUSI U-Net checkpoint to ONNX (model at its training size with its class "
                    "head; preprocessing, threshold, calibration temperatures and trust entry in the metadata as "
                    "JSON), after checking on real scans that onnxruntime and PyTorch give the same masks, classes "
                    "and malignancy probabilities. Research use only: not for clinical decisions.",
        epilog="Exit codes: 0 written; 1 the parity check failed (nothing written); 2 bad checkpoint or option, an "
               "existing --output, or a missing package (onnx, onnxruntime).")
    p.add_argument("--checkpoint", default=str(utils.shown_path(DEFAULT_CHECKPOINT)),
                   help="trained model (.pt); default: %(default)s")
    p.add_argument("--output", required=True, help="the .onnx file to write (an existing file is never replaced)")
    p.add_argument("--check-images", default=str(utils.shown_path(SAMPLE_DIR)),
                   help="a folder of scans (searched recursively; ground-truth X_mask.png files are skipped) to check "
                        "the export on; default: %(default)s")
    p.add_argument("--threads", type=utils.positive_int, default=utils.default_threads(),
                   help="CPU threads for the check; default: %(default)s")
    return p


if __name__ == "__main__":
    utils.answer_help_early(build_parser)

import torch  # noqa: E402

import checkpoints  # noqa: E402
import image_io
import inference  # noqa: E402
import onnx_backend  # noqa: E402


def check_images(folder: Path) -> list[Path]:
    """The scans under `folder` (not ground truth, not hidden), in natural order."""
    found = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in utils.IMAGE_EXTENSIONS
             and not p.name.startswith(".") and image_io.MASK_RE.match(p.stem) is None]
    return sorted(found, key=image_io.natural_key)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    torch.set_num_threads(args.threads)
    try:
        if out.exists():
            raise ValueError(f"{utils.printable(out)} exists: give a new file name (nothing is overwritten)")
        if storage.unwritable(out):  # now, not after the export and its check
            raise ValueError(storage.unwritable(out))
        scans = check_images(Path(args.check_images))
        if not scans:
            raise ValueError(f"no scans to check the export on in {utils.printable(args.check_images)}")
        onnx_backend.require("onnxruntime", "checking the export")
        loaded = checkpoints.load_model(args.checkpoint)
        start = time.perf_counter()
        data = onnx_backend.export(loaded, onnx_backend.file_sha256(args.checkpoint))
        seconds = time.perf_counter() - start
        images = [image_io.load_image(p) for p in scans]
        engine = onnx_backend.OnnxModel(data, args.threads)
        figures = inference.parity(loaded, engine, images)
    except (checkpoints.CheckpointError, utils.DataError, ValueError, OSError, RuntimeError) as exc:
        print(f"error: {utils.printable(exc)}", file=sys.stderr)
        return 2
    print(f"parity with PyTorch on {figures['images']} scans of {utils.printable(args.check_images)}, at their own "
          f"size: masks identical on {figures['pixel_agreement']:.4%} of pixels ({figures['differing_pixels']} of "
          f"{figures['pixels']} differ), min Dice of the two masks {figures['min_dice']:.6f}, predicted classes "
          f"agree on {figures['class_agreement']:.0%}, max difference: probability "
          f"{figures['max_probability_difference']:.1e}, malignancy {figures['max_malignancy_difference']:.1e}, "
          f"trust {figures['max_trust_difference']:.1e}")
    failed = inference.parity_failures(figures)
    if failed:
        print(f"error: the export does not match PyTorch ({'; '.join(failed)}): nothing written", file=sys.stderr)
        return 1
    try:
        storage.atomic_write(out, data, replace=False)
    except OSError as exc:
        print(f"error: cannot write {utils.printable(out)}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {utils.printable(out)} ({len(data) / 1e6:.1f} MB, exported in {seconds:.1f} s): input 'image' "
          f"float32 [N,1,{loaded.image_size},{loaded.image_size}], outputs {', '.join(engine.outputs)}; threshold "
          f"{loaded.threshold:g}; "
          f"metadata: {', '.join(sorted(engine.metadata))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
