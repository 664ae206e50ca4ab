"""Calibrating the out-of-distribution flag of a checkpoint (``models.ood``) on image data.

Training calls ``add_ood_statistics`` at the end of a run (on the best checkpoint, with the un-augmented
training images for the statistics and the validation images for the threshold); ``medserve calibrate-ood``
(``training.calibrate_ood``) does the same for an existing checkpoint. The features are computed exactly as the
service computes them: the same preprocessing (``models.preprocessing.prepare``, resized to the input size for a
classifier), the same windows for a tiled U-Net, the same feature layer (``models.ood.extract_features``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import CheckpointMetadata, build_model, load_checkpoint, save_checkpoint
from models.imageio import read_image_file
from models.inference import resolve_device
from models.ood import (
    DEFAULT_CONFIDENCE,
    DEFAULT_PERCENTILE,
    Features,
    OODStatistics,
    default_feature_source,
    extract_blocks,
    fit_statistics,
)
from models.preprocessing import Preprocessing, prepare
from training.common.options import ArgumentContainer

log = logging.getLogger(__name__)

# The one group of a segmentation model's statistics.
ALL_IMAGES = "all"


def add_percentile_argument(group: ArgumentContainer, flag: str = "--ood-percentile") -> None:
    """The percentile of the validation images' scores that becomes the flag threshold (``--ood-percentile``
    of training also takes 0: no statistics)."""
    group.add_argument(
        flag,
        type=float,
        default=DEFAULT_PERCENTILE,
        help=f"out-of-distribution threshold: at most (100 - this) %% of images like the validation images "
        f"are flagged (default {DEFAULT_PERCENTILE:g}: 5%%)"
        + ("; 0 stores no statistics" if flag == "--ood-percentile" else ""),
    )
    group.add_argument(
        "--ood-confidence" if flag == "--ood-percentile" else "--confidence",
        type=float,
        default=DEFAULT_CONFIDENCE,
        help=f"with this probability (default {DEFAULT_CONFIDENCE:g}) over the draw of the validation images "
        "(a tolerance limit, models.ood); 0: the split-conformal rank, which holds only on average",
    )


def confidence_of(args: argparse.Namespace) -> float | None:
    """``--ood-confidence`` / ``--confidence`` (the default for namespaces without it); None when 0."""
    value = float(getattr(args, "ood_confidence", getattr(args, "confidence", DEFAULT_CONFIDENCE)))
    if value == 0:
        return None
    if not 0.0 < value < 1.0:
        raise ValueError(f"the OOD confidence must be in (0, 1) (or 0 for the conformal rank), got {value}")
    return value


def percentile_of(args: argparse.Namespace) -> float | None:
    """``--ood-percentile`` (default for callers' namespaces without it); None when 0 (no statistics)."""
    value = float(getattr(args, "ood_percentile", DEFAULT_PERCENTILE))
    if value == 0:
        return None
    if not 0.0 < value <= 100.0:
        raise ValueError(f"--ood-percentile must be in (0, 100] (or 0 for none), got {value}")
    return value


def model_input(pixels: np.ndarray, metadata: CheckpointMetadata) -> torch.Tensor:
    """Decoded (H, W, C) pixels in [0, 1] -> the normalised input the service's runner builds for them."""
    spec: Preprocessing = metadata.preprocessing
    image = prepare(pixels, spec)
    if metadata.task == "classification" and tuple(image.shape[-2:]) != tuple(spec.img_size):
        image = F.interpolate(
            image[None], size=spec.img_size, mode="bilinear", align_corners=False, antialias=True
        )[0]
    return image


def read_pixels(paths: Iterable[Path], intensity: str) -> Iterator[np.ndarray]:
    """The decoded pixels of each file, read one at a time (whole data sets need not fit in memory)."""
    for path in paths:
        yield read_image_file(path, intensity=intensity).pixels


def compute_statistics(
    model: torch.nn.Module,
    metadata: CheckpointMetadata,
    fit_pixels: Iterable[np.ndarray],
    fit_groups: Sequence[int],
    calibration_pixels: Iterable[np.ndarray],
    *,
    percentile: float = DEFAULT_PERCENTILE,
    confidence: float | None = DEFAULT_CONFIDENCE,
    device: torch.device | None = None,
    batch_size: int = 32,
) -> OODStatistics:
    """The OOD statistics of ``model`` fitted on ``fit_pixels`` (group indices ``fit_groups``: class indices
    for a classifier, all 0 for a segmentation model) with the threshold from ``calibration_pixels``.

    Raises:
        ValueError: the model has no known feature layer, or there are no fit images.
    """
    source = default_feature_source(model)
    if source is None:
        raise ValueError(f"no OOD feature layer is known for architecture {metadata.architecture.name!r}")
    spec = metadata.preprocessing
    tiled = metadata.task == "segmentation" and spec.resize in ("tile", "fit")
    tile = spec.img_size if tiled else None
    model = model.eval()

    def features(pixels: Iterable[np.ndarray]) -> Features:
        inputs = (model_input(p, metadata) for p in pixels)
        return extract_blocks(
            model,
            inputs,
            source=source,
            tile=tile,
            overlap=spec.tile_overlap,
            batch_size=batch_size,
            device=device,
        )

    with torch.inference_mode():
        fit = features(fit_pixels)
        calibration = features(calibration_pixels)
    if fit.values.shape[0] == 0:
        raise ValueError("no images to fit out-of-distribution statistics on")
    groups = metadata.classes if metadata.task == "classification" else [ALL_IMAGES]
    return fit_statistics(
        fit.values,
        fit_groups,
        groups,
        calibration.values if calibration.values.shape[0] else None,
        features=source.description,
        percentile=percentile,
        confidence=confidence,
        blocks=fit.widths,
        layers=source.names,
        pooling=source.pooling,
    )


def add_ood_statistics(
    checkpoint: Path,
    fit_pixels: Iterable[np.ndarray],
    fit_groups: Sequence[int],
    calibration_pixels: Iterable[np.ndarray],
    *,
    percentile: float = DEFAULT_PERCENTILE,
    confidence: float | None = DEFAULT_CONFIDENCE,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    out: Path | None = None,
) -> CheckpointMetadata:
    """Computes the OOD statistics of the model in ``checkpoint`` and writes the checkpoint with them to ``out``
    (default: in place, atomically). The weights are unchanged; the version (a content hash) is new.

    Returns:
        The metadata as written.
    """
    metadata, state = load_checkpoint(checkpoint)
    torch_device = resolve_device(device) if isinstance(device, str) else device
    model = build_model(metadata)
    model.load_state_dict(state)
    model = model.to(torch_device)
    stats = compute_statistics(
        model,
        metadata,
        fit_pixels,
        fit_groups,
        calibration_pixels,
        percentile=percentile,
        confidence=confidence,
        device=torch_device,
        batch_size=batch_size,
    )
    if stats.threshold_rule == "maximum":
        log.warning(
            "OOD threshold: %d validation images are too few to bound the flag rate at %g%% (confidence %s); "
            "the largest validation score is used, which flags about 1 in %d images like them",
            stats.n_calibration,
            100.0 - stats.percentile,
            stats.confidence,
            stats.n_calibration + 1,
        )
    written = save_checkpoint(out or checkpoint, state, metadata.model_copy(update={"ood": stats}))
    log.info(
        "OOD statistics: %d group(s), %d features, fitted on %d images; threshold %.4g (%s); version %s -> %s",
        len(stats.groups),
        stats.dim,
        stats.n_fit,
        stats.threshold,
        stats.threshold_basis(),
        metadata.version,
        written.version,
    )
    return written
