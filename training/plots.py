"""Figures written by training and evaluation: learning curves and contour overlays.

``plot_history`` is task-independent (segmentation and classification training both use it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

TRUE_COLOUR = (0, 220, 0)  # ground truth contour: green
PRED_COLOUR = (255, 40, 200)  # predicted contour: magenta (distinguishable from green for most colour vision)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def plot_history(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    loss_keys: Sequence[str] | None = None,
    metric_keys: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Writes a two-panel PNG of learning curves: losses (left) and metrics (right) against ``epoch``.

    Args:
        history: one mapping per epoch with an ``epoch`` key and numeric values.
        path: output PNG.
        loss_keys: series for the left panel; default every numeric key containing ``loss``.
        metric_keys: series for the right panel; default every other numeric key except ``epoch``, ``lr``
            and keys ending in ``_s`` (durations) or ``hd95`` (a different scale).
        title: figure title.
    """
    path = Path(path)
    keys: list[str] = []
    for row in history:
        keys += [k for k, v in row.items() if _is_number(v) and k not in keys]
    if loss_keys is None:
        loss_keys = [k for k in keys if "loss" in k]
    if metric_keys is None:
        skip = {"epoch", "lr", *loss_keys}
        metric_keys = [k for k in keys if k not in skip and not k.endswith(("_s", "hd95"))]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, series, label in ((ax_loss, loss_keys, "loss"), (ax_metric, metric_keys, "metric")):
        for key in series:
            points = [
                (r.get("epoch", i + 1), r[key]) for i, r in enumerate(history) if _is_number(r.get(key))
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
