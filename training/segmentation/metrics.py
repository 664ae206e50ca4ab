"""Segmentation metrics on label maps: Dice, IoU, HD95 (pixels), per class.

Conventions: a class absent from both prediction and truth scores Dice = IoU = 1 and HD95 = 0 (nothing to find,
nothing found). A class present in only one of them scores HD95 = the image diagonal, the largest possible
distance, so that a miss is penalised with a finite number and means stay defined.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np
from scipy import ndimage


class ImageScores(TypedDict):
    """Metrics of one image; ``dice``, ``iou`` and ``hd95`` are means over the foreground classes."""

    dice: float
    iou: float
    hd95: float
    per_class_dice: list[float]


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of each class 0..K-1 between two (H, W) label maps; returns (K,) float."""
    out = np.ones(num_classes)
    for c in range(num_classes):
        p, t = pred == c, target == c
        denominator = p.sum() + t.sum()
        if denominator:
            out[c] = 2.0 * np.logical_and(p, t).sum() / denominator
    return out


def iou_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Intersection over union of each class between two (H, W) label maps; returns (K,) float."""
    out = np.ones(num_classes)
    for c in range(num_classes):
        p, t = pred == c, target == c
        union = np.logical_or(p, t).sum()
        if union:
            out[c] = np.logical_and(p, t).sum() / union
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (pixels with a 4-neighbour outside it; image edges count as outside)."""
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
    return mask & ~eroded


def hd95(pred: np.ndarray, target: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance in pixels between two boolean (H, W) masks.

    The larger of the two directed 95th percentiles of boundary-to-boundary distances (the MONAI definition).
    Both empty: 0. Exactly one empty: the image diagonal.
    """
    pred, target = pred.astype(bool), target.astype(bool)
    if not pred.any() and not target.any():
        return 0.0
    if not pred.any() or not target.any():
        return float(np.hypot(*pred.shape))
    sp, st = _surface(pred), _surface(target)
    # Distance from every pixel to the nearest boundary pixel of the other mask.
    dist_to_t = ndimage.distance_transform_edt(~st)
    dist_to_p = ndimage.distance_transform_edt(~sp)
    return float(max(np.percentile(dist_to_t[sp], 95), np.percentile(dist_to_p[st], 95)))


def score_image(pred: np.ndarray, target: np.ndarray, num_classes: int) -> ImageScores:
    """All metrics of one image.

    Returns:
        ``dice``, ``iou``, ``hd95``: means over the foreground classes 1..K-1 (class 0 when K == 1);
        ``per_class_dice``: list of K Dice values, background included.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in size")
    dice = dice_per_class(pred, target, num_classes)
    iou = iou_per_class(pred, target, num_classes)
    fg = list(range(1, num_classes)) or [0]
    hd = [hd95(pred == c, target == c) for c in fg]
    return {
        "dice": float(dice[fg].mean()),
        "iou": float(iou[fg].mean()),
        "hd95": float(np.mean(hd)),
        "per_class_dice": [float(d) for d in dice],
    }


def aggregate(scores: Sequence[ImageScores], classes: Sequence[str]) -> dict[str, object]:
    """Means over images: ``dice``, ``iou``, ``hd95`` and ``per_class_dice`` as {class name: Dice}."""
    if not scores:
        raise ValueError("no scores to aggregate")
    per_class = np.mean([np.asarray(s["per_class_dice"], dtype=float) for s in scores], axis=0)
    return {
        "dice": float(np.mean([s["dice"] for s in scores])),
        "iou": float(np.mean([s["iou"] for s in scores])),
        "hd95": float(np.mean([s["hd95"] for s in scores])),
        "per_class_dice": {name: float(d) for name, d in zip(classes, per_class, strict=True)},
    }
