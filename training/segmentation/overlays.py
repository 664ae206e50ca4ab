"""Contour overlays of predicted and true segmentations, written by ``medserve eval segment``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

TRUE_COLOUR = (0, 220, 0)  # ground truth contour: green
PRED_COLOUR = (255, 40, 200)  # predicted contour: magenta (distinguishable from green for most colour vision)


def _contour(labels: np.ndarray, background: int = 0) -> np.ndarray:
    """Boolean (H, W): pixels on the boundary between different non-background labels or with background."""
    fg = labels != background
    edge = np.zeros_like(fg)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge & fg


def overlay_contours(
    pixels: np.ndarray, pred: np.ndarray, target: np.ndarray, thickness: int = 1
) -> np.ndarray:
    """RGB uint8 (H, W, 3): the image with the true (green) and predicted (magenta) contours drawn on it.

    Args:
        pixels: float (H, W, C) or (H, W) in [0, 1].
        pred, target: (H, W) class-index label maps (class 0 = background, not outlined).
        thickness: contour dilation in pixels (0 = one-pixel lines).
    """
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    rgb = pixels[:, :, :3] if pixels.shape[2] >= 3 else np.repeat(pixels[:, :, :1], 3, axis=2)
    out = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    for labels, colour in ((target, TRUE_COLOUR), (pred, PRED_COLOUR)):
        edge = _contour(labels)
        if thickness > 0:
            edge = ndimage.binary_dilation(edge, iterations=thickness)
        out[edge] = colour
    return out


def save_overlay(
    path: str | Path, pixels: np.ndarray, pred: np.ndarray, target: np.ndarray, caption: str = ""
) -> Path:
    """Writes ``overlay_contours`` as PNG, with a caption strip naming the two colours."""
    path = Path(path)
    body = overlay_contours(pixels, pred, target, thickness=1 if max(pred.shape) >= 256 else 0)
    strip_h = 28
    canvas = Image.new("RGB", (body.shape[1], body.shape[0] + strip_h), (0, 0, 0))
    canvas.paste(Image.fromarray(body), (0, strip_h))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), "true", fill=TRUE_COLOUR)
    draw.text((40, 2), "predicted", fill=PRED_COLOUR)
    if caption:
        draw.text((4, 15), caption, fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
