"""`medserve calibrate-ood --model PATH --data DIR`: add out-of-distribution statistics to an existing checkpoint.

What training does at its end (``training.common.ood``), for checkpoints written before it did, or to
recalibrate: the Gaussian statistics of the model's features on the training images and the flag threshold at
``--percentile`` of the validation images' scores. DIR has a layout training reads:

* classification: ``DIR/<class>/*`` (or ``DIR/train/<class>/`` with an optional ``DIR/val/<class>/``), the class
  folders named after the model's classes; without ``val/`` the validation images are split off as training did
  (``--val-split`` and ``--seed``, by default those recorded in the checkpoint);
* segmentation: ``DIR/images/*`` (``DIR/masks/`` is not needed and not read), with an optional
  ``DIR/val/images/``; otherwise the validation images are the stems the checkpoint's training held out
  (``extra.split``) when DIR has them all, else a split as training does it (``--val-split``, ``--seed``).

The checkpoint is rewritten in place (atomically) unless ``--out`` names a new file. The weights do not change;
the version does (it is a content hash over the weights and the metadata, statistics included).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from models.checkpoint import CheckpointError, CheckpointMetadata, load_checkpoint
from models.imageio import IMAGE_SUFFIXES
from training.classification.data import discover
from training.common.ood import add_ood_statistics, add_percentile_argument, confidence_of, read_pixels
from training.common.options import add_device_argument
from training.common.runtime import cpu_threads
from training.segmentation.data import split_indices

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="the checkpoint (.pt)")
    parser.add_argument("--data", required=True, type=Path, help="image data in a layout training reads")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the calibrated checkpoint here (default: replace --model)",
    )
    add_percentile_argument(parser, "--percentile")
    parser.add_argument(
        "--val-split", type=float, default=None, help="validation fraction (default: the checkpoint's)"
    )
    parser.add_argument("--seed", type=int, default=None, help="split seed (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=32, help="images (or windows) per forward pass")
    add_device_argument(parser)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")


def training_value(metadata: CheckpointMetadata, key: str, given: Any, default: Any) -> Any:
    """``given`` when set, else the checkpoint's training argument ``key``, else ``default``."""
    if given is not None:
        return given
    return metadata.training.get(key, default)


def classification_files(
    metadata: CheckpointMetadata, data: Path, val_split: float, seed: int
) -> tuple[list[Path], list[int], list[Path]]:
    """(training files, their class indices in the model's classes, validation files)."""
    found = discover(data, val_split, seed)
    unknown = [name for name in found.classes if name not in metadata.classes]
    if unknown:
        raise ValueError(
            f"{data}: class folders {unknown} are not among the model's classes {metadata.classes}"
        )
    labels = [metadata.classes.index(found.classes[s.label]) for s in found.train]
    return [s.path for s in found.train], labels, [s.path for s in found.val]


def image_files(folder: Path) -> dict[str, Path]:
    """stem -> image file in ``folder`` (sorted by stem)."""
    if not folder.is_dir():
        raise ValueError(f"expected the images in {folder}")
    files = {
        p.stem: p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    }
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return dict(sorted(files.items()))


def segmentation_files(
    metadata: CheckpointMetadata, data: Path, val_split: float, seed: int
) -> tuple[list[Path], list[Path], str]:
    """(training files, validation files, how the validation images were chosen)."""
    files = image_files(data / "images")
    if (data / "val" / "images").is_dir():
        return list(files.values()), list(image_files(data / "val" / "images").values()), "DIR/val"
    split = metadata.extra.get("split")
    if (
        isinstance(split, dict)
        and split.get("val")
        and set(split.get("train", [])) | set(split["val"]) <= set(files)
    ):
        return [files[s] for s in split["train"]], [files[s] for s in split["val"]], "the checkpoint's split"
    stems = list(files)
    train_idx, val_idx = split_indices(len(stems), val_split, seed)
    return [files[stems[i]] for i in train_idx], [files[stems[i]] for i in val_idx], "a new split"


def calibrate(args: argparse.Namespace) -> CheckpointMetadata:
    """Runs the command; returns the metadata written.

    Raises:
        CheckpointError: unreadable checkpoint. ValueError: bad data layout or options.
    """
    metadata, _ = load_checkpoint(args.model)
    val_split = float(training_value(metadata, "val_split", args.val_split, 0.1))
    seed = int(training_value(metadata, "seed", args.seed, 0))
    percentile = float(args.percentile)
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"--percentile must be in (0, 100], got {percentile}")
    confidence = confidence_of(args)  # refuses a bad --confidence before any work
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out is not None and Path(args.out).suffix != ".pt":
        raise ValueError(f"--out must end in .pt (the service loads *.pt), got {args.out}")
    intensity = metadata.preprocessing.intensity
    if metadata.task == "classification":
        train_files, labels, val_files = classification_files(metadata, args.data, val_split, seed)
        chosen = f"split {val_split:g}, seed {seed}"
    else:
        train_files, val_files, chosen = segmentation_files(metadata, args.data, val_split, seed)
        labels = [0] * len(train_files)
    log.info(
        "%s: %d training and %d validation images (%s)", args.model, len(train_files), len(val_files), chosen
    )
    before = metadata.version
    written = add_ood_statistics(
        Path(args.model),
        read_pixels(train_files, intensity),
        labels,
        read_pixels(val_files, intensity),
        percentile=percentile,
        confidence=confidence,
        device=args.device,
        batch_size=args.batch_size,
        out=Path(args.out) if args.out is not None else None,
    )
    assert written.ood is not None
    print(
        f"{args.out or args.model}: OOD statistics of {written.ood.n_fit} training images, threshold "
        f"{written.ood.threshold:.4g} ({written.ood.threshold_basis()}); version {before} -> {written.version}"
    )
    return written


def main(args: argparse.Namespace) -> int:
    try:
        with cpu_threads(args.threads):
            calibrate(args)
    except (CheckpointError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return 0
