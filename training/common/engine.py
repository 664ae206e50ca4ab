"""The optimisation step both tasks' ``train_one_epoch`` loops are built on."""

from __future__ import annotations

import torch
from torch import nn

from models.inference import autocast_context
from training.common.precision import MixedPrecision


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of (B, C, H, W) images on ``device``, channels-last on CUDA (faster convolutions there)."""
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    targets: torch.Tensor,
    precision: MixedPrecision,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (autocast per ``precision``), backward (scaled for fp16), optimizer and scheduler step.

    Returns:
        (logits, loss); the loss is computed in float32 whatever the autocast precision.
    """
    with autocast_context(images.device, precision.precision):
        logits = model(images)
        loss = criterion(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    if precision.scaler is not None:
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
    else:
        loss.backward()
        optimizer.step()
    scheduler.step()
    return logits, loss
