"""Segmentation losses: soft Dice + cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, *, include_background: bool = True, smooth: float = 1.0
) -> torch.Tensor:
    """1 - mean soft Dice over classes, computed over the whole batch (stable when a crop lacks a class).

    Args:
        logits: (B, K, H, W) raw scores.
        target: (B, H, W) class indices in [0, K).
        include_background: also score class 0. Keep it on when the background is a structure of interest
            (e.g. EM membranes are class 0 of the ISBI masks).
        smooth: additive smoothing of numerator and denominator.
    """
    k = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    one_hot = F.one_hot(target, k).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    intersection = (probs * one_hot).sum(dims)
    denominator = probs.sum(dims) + one_hot.sum(dims)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    if not include_background and k > 1:
        dice = dice[1:]
    return 1.0 - dice.mean()


class DiceCELoss(nn.Module):
    """``dice_weight * soft Dice loss + ce_weight * cross-entropy``.

    Cross-entropy gives well-behaved gradients per pixel; Dice counters class imbalance (thin structures such
    as membranes are a minority of pixels).

    Args:
        dice_weight: weight of the Dice term (>= 0).
        ce_weight: weight of the cross-entropy term (>= 0).
        include_background: score class 0 in the Dice term.
        class_weights: optional (K,) cross-entropy class weights.

    Shapes:
        logits (B, K, H, W), target (B, H, W) int64 -> scalar.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        include_background: bool = True,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if dice_weight < 0 or ce_weight < 0 or dice_weight + ce_weight == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not both 0, got dice={dice_weight} ce={ce_weight}"
            )
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.include_background = include_background
        self.class_weights: torch.Tensor | None
        self.register_buffer("class_weights", class_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits.float(), target, weight=self.class_weights)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(
                logits, target, include_background=self.include_background
            )
        return loss
