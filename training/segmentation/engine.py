"""Segmentation's training and evaluation loops (in the style of the torchvision reference scripts)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from models.inference import FLIPS, Precision, segment_probabilities
from models.preprocessing import Preprocessing, to_original_size
from training.common.engine import to_device, train_step
from training.common.precision import MixedPrecision
from training.segmentation.metrics import ImageScores, score_image


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    precision: MixedPrecision | None = None,
    after_step: Callable[[], None] | None = None,
    progress: Any = None,
) -> dict[str, float]:
    """One pass over ``data_loader``; the scheduler steps once per batch.

    Args:
        model: network returning logits (B, K, H, W); DistributedDataParallel-wrapped when distributed.
        criterion: loss of (logits, target (B, H, W)).
        optimizer / scheduler: updated every batch.
        data_loader: yields (images (B, C, H, W), masks (B, H, W)).
        device: where the model lives.
        precision: autocast precision and gradient scaler (default fp32).
        after_step: called after every optimizer step (e.g. to update a moving average of the weights).
        progress: an optional tqdm bar, advanced per batch, showing the running loss.

    Returns:
        ``{"train_loss": mean loss over the epoch}`` (averaged over all processes when distributed).
    """
    precision = precision or MixedPrecision()
    model.train()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, sample count)
    for images, masks in data_loader:
        images = to_device(images, device)
        masks = masks.to(device, non_blocking=True)
        _, loss = train_step(model, criterion, optimizer, scheduler, images, masks, precision)
        if after_step is not None:
            after_step()
        total[0] += loss.detach().double() * images.shape[0]
        total[1] += images.shape[0]
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{(total[0] / total[1]).item():.4f}")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return {"train_loss": float(total[0] / total[1].clamp(min=1))}


def predict_probabilities(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    tile: Sequence[int],
    *,
    overlap: float,
    tta: bool,
    device: torch.device,
    flips: Sequence[str] = FLIPS,
    batch_size: int = 8,
    precision: Precision = "fp32",
    spec: Preprocessing | None = None,
    original_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[torch.Tensor]:
    """Class probabilities (K, H, W) for normalised (C, H, W) images by tiled prediction (windows of all images
    pooled).

    With ``spec`` and ``original_sizes`` the probabilities are mapped back to each image's original (H, W) by
    ``models.preprocessing.to_original_size`` (the padding of ``resize="fit"`` cut off, then resized), as the
    service does; otherwise they have the size of ``images``.
    """
    if not images:
        return []
    model.eval()
    probs = segment_probabilities(
        model,
        images,
        tile,
        overlap=overlap,
        batch_size=batch_size,
        tta=tta,
        flips=flips,
        device=device,
        precision=precision,
    )
    if spec is not None and original_sizes is not None:
        probs = [to_original_size(p, h, w, spec) for p, (h, w) in zip(probs, original_sizes, strict=True)]
    return probs


def predict_labels(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    tile: Sequence[int],
    *,
    overlap: float,
    tta: bool,
    device: torch.device,
    flips: Sequence[str] = FLIPS,
    batch_size: int = 8,
    precision: Precision = "fp32",
    spec: Preprocessing | None = None,
    original_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[np.ndarray]:
    """Label maps (the arg-max of ``predict_probabilities``, same arguments)."""
    probs = predict_probabilities(
        model,
        images,
        tile,
        overlap=overlap,
        tta=tta,
        device=device,
        flips=flips,
        batch_size=batch_size,
        precision=precision,
        spec=spec,
        original_sizes=original_sizes,
    )
    return [p.argmax(dim=0).numpy() for p in probs]


def evaluate(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    targets: Sequence[np.ndarray],
    num_classes: int,
    tile: Sequence[int],
    *,
    overlap: float = 0.25,
    tta: bool = False,
    flips: Sequence[str] = FLIPS,
    device: torch.device,
    batch_size: int = 8,
    precision: Precision = "fp32",
) -> list[ImageScores]:
    """Per-image scores of ``model`` (unwrapped, not DDP) on full images predicted tile by tile.

    Args:
        images: normalised (C, H, W) tensors of any size.
        targets: (H, W) class-index masks of the same sizes.
        num_classes: K.
        tile: the window (height, width), normally the training crop size.
    """
    preds = predict_labels(
        model,
        images,
        tile,
        overlap=overlap,
        tta=tta,
        flips=flips,
        device=device,
        batch_size=batch_size,
        precision=precision,
    )
    return [score_image(p, t, num_classes) for p, t in zip(preds, targets, strict=True)]
