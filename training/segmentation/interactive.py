"""Simulated clicks for ``medserve eval segment --interactive K``: Dice after each click of a correction.

The protocol of the interactive-segmentation literature (Xu et al. 2016; RITM, Sofiiuk et al. 2022): each click
goes at the interior point (farthest from the region's boundary, the image border counting as boundary) of the
largest error region of the current mask; a missed region (false negative) gets a foreground click, a region
wrongly included (false positive) a background click. Clicks are disks of ``radius`` pixels, as the service's
JSON points. The foreground is the first class after the background (index 1), as in the service.

Two runs per image, each of K clicks:
    * ``graph_cut``: the graph cut from the clicks alone (``models.interactive.graph_cut``). It starts from no
      mask, so the first click lands in the centre of the largest object.
    * ``unet_graph_cut``: the graph cut refining the U-Net's foreground probabilities with the clicks. It
      starts from the U-Net's own mask, so the first click corrects the U-Net's largest error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from models.interactive import (
    BACKGROUND,
    DEFAULT_RADIUS,
    FOREGROUND,
    GraphCutParameters,
    draw_points,
    graph_cut,
)
from training.segmentation.metrics import dice_per_class

FOREGROUND_CLASS = 1


@dataclass(frozen=True)
class Click:
    """A simulated click at column ``x``, row ``y``; ``value`` is ``FOREGROUND`` or ``BACKGROUND``."""

    x: int
    y: int
    value: int


def next_click(prediction: np.ndarray, target: np.ndarray) -> Click | None:
    """The click that corrects the largest error region of ``prediction`` (bool (H, W)) against ``target``;
    None when the prediction is right everywhere."""
    best: tuple[int, np.ndarray, int] | None = None  # (size, region, click value)
    for errors, value in ((target & ~prediction, FOREGROUND), (prediction & ~target, BACKGROUND)):
        regions, count = ndimage.label(errors)
        if count == 0:
            continue
        sizes = np.bincount(regions.ravel())[1:]
        largest = int(np.argmax(sizes))
        if best is None or sizes[largest] > best[0]:
            best = (int(sizes[largest]), regions == largest + 1, value)
    if best is None:
        return None
    _, region, value = best
    # Padding makes the image border count as the region's boundary.
    depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    # The deepest pixels can form a ridge (a rectangle's midline): take the one nearest the ridge's centre.
    rows, columns = np.nonzero(depth == depth.max())
    nearest = int(np.argmin(np.square(rows - rows.mean()) + np.square(columns - columns.mean())))
    return Click(int(columns[nearest]), int(rows[nearest]), value)


def foreground_dice(prediction: np.ndarray, target: np.ndarray) -> float:
    """Dice of the foreground between two bool masks (1 when both are empty)."""
    return float(dice_per_class(prediction.astype(np.int64), target.astype(np.int64), 2)[1])


def simulate_clicks(
    pixels: np.ndarray,
    target: np.ndarray,
    clicks: int,
    *,
    probability: np.ndarray | None = None,
    radius: int = DEFAULT_RADIUS,
    parameters: GraphCutParameters | None = None,
) -> list[float]:
    """Dice after each of ``clicks`` simulated clicks on one image.

    Args:
        pixels: the image (H, W) or (H, W, C) in [0, 1].
        target: the true foreground (H, W) bool.
        probability: the U-Net's foreground probability (H, W): the run refines it and starts from its mask
            (p > 0.5); None: the graph cut from the clicks alone, starting from no mask.
        radius: the clicks' disk radius in pixels.
    """
    height, width = target.shape
    prediction = probability > 0.5 if probability is not None else np.zeros_like(target)
    points: list[tuple[float, float, int]] = []
    dice = []
    for _ in range(clicks):
        click = next_click(prediction, target)
        if click is not None:  # else nothing is left to correct: the mask stays
            points.append((click.x, click.y, click.value))
            hints = draw_points(points, radius, height, width)
            prediction = graph_cut(pixels, hints, probability, parameters)
        dice.append(foreground_dice(prediction, target))
    return dice


def evaluate_clicks(
    images: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    probabilities: Sequence[np.ndarray],
    classes: Sequence[str],
    *,
    clicks: int,
    radius: int = DEFAULT_RADIUS,
) -> dict[str, Any]:
    """The ``interactive`` entry of report.json: mean Dice over images after click 1..K, per run.

    ``targets`` are class-index masks, ``probabilities`` the U-Net's of ``FOREGROUND_CLASS`` per image at its
    original size (``medserve eval segment`` keeps them from its prediction pass). ``unet`` is the U-Net's own
    Dice on that class (no click), the starting point of ``unet_graph_cut``.
    """
    alone, refined, unet = [], [], []
    for image, target_map, probability in zip(images, targets, probabilities, strict=True):
        target = target_map == FOREGROUND_CLASS
        alone.append(simulate_clicks(image, target, clicks, radius=radius))
        refined.append(simulate_clicks(image, target, clicks, probability=probability, radius=radius))
        unet.append(foreground_dice(probability > 0.5, target))
    return {
        "clicks": clicks,
        "radius": radius,
        "foreground_class": classes[FOREGROUND_CLASS],
        "unet": float(np.mean(unet)),
        "graph_cut": np.mean(alone, axis=0).tolist(),
        "unet_graph_cut": np.mean(refined, axis=0).tolist(),
    }


def markdown_section(interactive: dict[str, Any]) -> list[str]:
    """The report.md section: mean Dice after each click, graph cut alone and refining the U-Net."""
    rows = [
        "| clicks | graph cut | U-Net + graph cut |",
        "|---|---|---|",
        f"| 0 | - | {interactive['unet']:.4f} |",
    ]
    for click, (alone, refined) in enumerate(
        zip(interactive["graph_cut"], interactive["unet_graph_cut"], strict=True), 1
    ):
        rows.append(f"| {click} | {alone:.4f} | {refined:.4f} |")
    return [
        "## Interactive correction (simulated clicks)",
        "",
        f"Mean Dice of `{interactive['foreground_class']}` after each click, placed in the centre of the largest "
        f"error region (disks of {interactive['radius']} px). The graph cut alone starts from no mask; with the "
        "U-Net it refines the U-Net's probabilities and starts from its mask (row 0).",
        "",
        *rows,
        "",
    ]


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Writes ``report`` (with its ``interactive`` entry) to report.json and appends the section to report.md."""
    (out / "report.json").write_text(json.dumps(report, indent=2))
    with open(out / "report.md", "a") as markdown:
        markdown.write("\n".join(markdown_section(report["interactive"])))
