"""Interactive correction: a graph cut from foreground and background hints, alone or refining a U-Net.

The segmentation minimises the energy of Boykov and Jolly (2001), solved exactly by a max-flow/min-cut on the
pixel grid (PyMaxflow):

    E(L) = sum_p D_p(L_p) + smoothness * sum_{p,q neighbours} w_pq [L_p != L_q],
    w_pq = exp(-(I_p - I_q)^2 / (2 sigma^2)),  sigma^2 = mean of (I_p - I_q)^2 over the image (4-connected),

so the boundary prefers to run where the intensity changes. The unary term ``D_p`` is

    * from the hints alone: the negative log-likelihood of the pixel's intensity under histograms fitted on the
      foreground and the background hint pixels (with no background hint, on every pixel not marked
      foreground);
    * with a model: ``-log p`` and ``-log (1 - p)`` of the U-Net's foreground probability ``p``, first pulled
      towards each hint's label near the hint (``GraphCutParameters.influence``) where the pixel looks like
      the hint's pixels, so that a click corrects the region around it, not only the pixels under it.

Hint pixels are hard constraints (capacities no cut can pay), so they always keep their label. Images are cut
in gray (luma), at their original size.

Hints come as a hint map (H, W) uint8: ``NO_HINT`` 0, ``FOREGROUND`` 1, ``BACKGROUND`` 2, either drawn from
JSON points (``parse_point_hints``: disks of ``radius`` pixels, later points drawn over earlier ones) or read
from a scribble PNG of the image's size (``read_scribble``). Client mistakes raise ``HintError``.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import maxflow
import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy import ndimage
from skimage.draw import disk

from models.preprocessing import to_channels

# What the answer of a graph cut without a model names as its model (X-Model-Name / X-Model-Version); the
# version changes whenever the algorithm or its defaults change what it answers.
GRAPH_CUT_NAME = "graph-cut"
GRAPH_CUT_VERSION = "1"
GRAPH_CUT_CLASSES = ("background", "foreground")

NO_HINT, FOREGROUND, BACKGROUND = 0, 1, 2
HintLabel = Literal["foreground", "background"]
HINT_VALUES: dict[str, int] = {"foreground": FOREGROUND, "background": BACKGROUND}
DEFAULT_RADIUS = 5
# Bounds on the work one request's hints can ask for (1000 disks of radius 256: about a second).
MAX_RADIUS = 256
MAX_POINTS = 1000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A capacity larger than any cut through one pixel can cost (unaries <= -log(EPSILON), 4 edges <= smoothness).
HARD = 1e9
EPSILON = 1e-6
UNSEEN_SHARE = 0.01  # of an intensity model's likelihood spread over all bins
BACKGROUND_HINT_SHARE = 0.8  # of the background model fitted on the background hints (the rest: all unmarked)
MIN_HINT_SPREAD = 0.05  # intensity spread assumed at least for the hint pixels of one label
PULL_REACH = 4.0  # a hint pulls probabilities up to this many ``influence`` away (beyond: < exp(-8))
RIGHT = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0]])
DOWN = np.array([[0, 0, 0], [0, 0, 0], [0, 1, 0]])


class HintError(ValueError):
    """The hints are unusable: bad JSON, a point outside the image, no foreground, a wrong scribble."""


class PointHint(BaseModel):
    """One click: pixel column ``x`` (0 = left) and row ``y`` (0 = top), and what is there."""

    model_config = ConfigDict(extra="forbid")

    x: float = Field(allow_inf_nan=False)
    y: float = Field(allow_inf_nan=False)
    label: HintLabel


class PointHints(BaseModel):
    """The JSON form of the hints: ``{"points": [{"x": 10, "y": 20, "label": "foreground"}], "radius": 5}``."""

    model_config = ConfigDict(extra="forbid")

    points: list[PointHint] = Field(max_length=MAX_POINTS)
    radius: int = Field(default=DEFAULT_RADIUS, ge=0, le=MAX_RADIUS, description="disk radius in pixels")


@dataclass(frozen=True)
class GraphCutParameters:
    """The graph cut's weights.

    Attributes:
        smoothness: weight of the boundary term against the unary term.
        bins: histogram bins of the intensity models (hints alone).
        influence: with a model, how far (pixels, Gaussian sigma) a hint pulls the U-Net's probability
            towards its label; 0 keeps the probabilities as they are.
    """

    smoothness: float = 4.0
    bins: int = 32
    influence: float = 10.0


def draw_points(
    points: Iterable[tuple[float, float, int]], radius: int, height: int, width: int
) -> np.ndarray:
    """A hint map (H, W) uint8 with a disk of ``radius`` per (x, y, value) point (the pixels at most ``radius``
    from it), later points on top.

    Raises:
        HintError: a point outside the image.
    """
    hints = np.zeros((height, width), dtype=np.uint8)
    for index, (x, y, value) in enumerate(points):
        column, row = round(x), round(y)
        if not (0 <= column < width and 0 <= row < height):
            raise HintError(
                f"point {index} (x={x:g}, y={y:g}) is outside the {width}x{height} image "
                f"(x in 0..{width - 1}, y in 0..{height - 1})"
            )
        # The pixels at most ``radius`` from the centre (skimage's disk is open: "< radius").
        rows, columns = disk((row, column), radius + 1e-3, shape=(height, width))
        hints[rows, columns] = value
    return hints


def parse_point_hints(text: str | bytes, height: int, width: int) -> np.ndarray:
    """The hint map of JSON points (``PointHints``) on an image of ``height`` x ``width``.

    Raises:
        HintError: not JSON, not of the documented shape, or a point outside the image.
    """
    try:
        parsed = PointHints.model_validate(json.loads(text))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HintError(f"the hints are not valid JSON: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'hints'}: {error['msg']}" for error in exc.errors()
        )
        raise HintError(f"the hints do not have the documented form: {problems}") from exc
    points = ((p.x, p.y, HINT_VALUES[p.label]) for p in parsed.points)
    return draw_points(points, parsed.radius, height, width)


def read_scribble(data: bytes, height: int, width: int) -> np.ndarray:
    """The hint map of a scribble PNG: one channel, the image's size, values 0 (none), 1 (fg), 2 (bg).

    Raises:
        HintError: not a PNG, several channels, another size or other values.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise HintError(f"the scribble must be a PNG, not {image.format}")
            if image.size != (width, height):
                raise HintError(
                    f"the scribble is {image.width}x{image.height}, the image {width}x{height}: they must match"
                )
            values = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise HintError("the scribble is not a readable PNG") from exc
    if values.ndim != 2:
        raise HintError("the scribble must have one channel (values 0, 1, 2), not colour")
    unexpected = sorted(set(np.unique(values).tolist()) - {NO_HINT, FOREGROUND, BACKGROUND})
    if unexpected:
        raise HintError(
            f"the scribble holds values {unexpected[:5]}; only 0 (none), 1 (foreground), 2 (background)"
        )
    return values.astype(np.uint8)


def parse_hints(data: str | bytes, height: int, width: int) -> np.ndarray:
    """The hint map of a request's ``hints``: a scribble PNG (by its signature) or JSON points.

    Raises:
        HintError: unusable hints (see ``parse_point_hints`` and ``read_scribble``).
    """
    if isinstance(data, bytes) and data.startswith(PNG_SIGNATURE):
        return read_scribble(data, height, width)
    return parse_point_hints(data, height, width)


def check_hints(hints: np.ndarray, *, need_foreground: bool) -> None:
    """Refuses hints that cannot drive a cut: no hint at all, or (``need_foreground``) no foreground hint.

    Raises:
        HintError: as said.
    """
    if need_foreground and not (hints == FOREGROUND).any():
        raise HintError("at least one foreground hint is needed (the graph cut grows the object from it)")
    if not (hints != NO_HINT).any():
        raise HintError("the hints mark no pixel")


def gray(pixels: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) pixels in [0, 1] -> (H, W) float32 gray (luma for colour)."""
    return np.asarray(to_channels(np.asarray(pixels, dtype=np.float32), 1)[:, :, 0], dtype=np.float32)


def contrast_weights(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """exp(-dI^2 / (2 sigma^2)) of each pixel's edge to its right and lower neighbour (0 past the border)."""
    right = np.zeros_like(image)
    down = np.zeros_like(image)
    right[:, :-1] = np.square(image[:, 1:] - image[:, :-1])
    down[:-1] = np.square(image[1:] - image[:-1])
    edges = right[:, :-1].size + down[:-1].size
    mean_square = float(right.sum() + down.sum()) / max(edges, 1)
    scale = -1.0 / (2.0 * mean_square) if mean_square > 0 else 0.0
    right = np.exp(right * scale)
    down = np.exp(down * scale)
    right[:, -1] = 0.0
    down[-1] = 0.0
    return right, down


def intensity_costs(image: np.ndarray, hints: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(cost of foreground, cost of background) per pixel: negative log-likelihoods under intensity
    histograms (smoothed, every bin possible) of the foreground hint pixels and of the background.

    The background model is that of every pixel not marked foreground, mixed with that of the background hint
    pixels when there are any (``BACKGROUND_HINT_SHARE``): a few background clicks do not sample the whole
    background, so on their own they would leave its other intensities to chance.
    """
    index = np.clip((image * bins).astype(np.int64), 0, bins - 1)
    foreground = hints == FOREGROUND
    background = hints == BACKGROUND

    def histogram(samples: np.ndarray) -> np.ndarray:
        counts = np.bincount(index[samples], minlength=bins).astype(np.float64)
        smoothed = ndimage.gaussian_filter1d(counts, 1.0)
        return np.asarray(smoothed / smoothed.sum(), dtype=np.float64)

    def negative_log_likelihood(frequencies: np.ndarray) -> np.ndarray:
        # A small uniform share keeps every intensity possible; unlike a pseudo-count per bin it does not
        # swamp the few samples of a click.
        likelihood = (1.0 - UNSEEN_SHARE) * frequencies + UNSEEN_SHARE / bins
        return np.asarray(-np.log(likelihood), dtype=np.float64)[index]

    background_model = histogram(~foreground)
    if background.any():
        background_model = (
            BACKGROUND_HINT_SHARE * histogram(background) + (1.0 - BACKGROUND_HINT_SHARE) * background_model
        )
    return negative_log_likelihood(histogram(foreground)), negative_log_likelihood(background_model)


def probability_costs(
    image: np.ndarray, probability: np.ndarray, hints: np.ndarray, influence: float
) -> tuple[np.ndarray, np.ndarray]:
    """(cost of foreground, cost of background) per pixel: -log p and -log(1 - p) of the foreground
    probability, after pulling it towards each hint's label.

    The pull is exp(-d^2 / (2 influence^2)) at distance d from the nearest hint of that label, times the
    pixel's likeness to the hint pixels' intensity (a Gaussian of their mean and spread), so that a click
    spreads over its region but not across an edge into differently looking tissue.
    """
    p = np.clip(np.asarray(probability, dtype=np.float64), 0.0, 1.0)
    if influence > 0:
        reach = math.ceil(PULL_REACH * influence)
        for value, target in ((FOREGROUND, 1.0), (BACKGROUND, 0.0)):
            marked = hints == value
            if not marked.any():
                continue
            values = image[marked]
            spread = max(float(values.std()), MIN_HINT_SPREAD)
            # Only the hints' surroundings are pulled noticeably: work in their bounding box plus the reach.
            rows, columns = np.nonzero(marked)
            window = (
                slice(max(0, rows.min() - reach), rows.max() + reach + 1),
                slice(max(0, columns.min() - reach), columns.max() + reach + 1),
            )
            distance = ndimage.distance_transform_edt(~marked[window])
            near = np.exp(-np.square(distance) / (2.0 * influence**2))
            alike = np.exp(-np.square(image[window] - values.mean()) / (2.0 * spread**2))
            p[window] += near * alike * (target - p[window])
    p = np.clip(p, EPSILON, 1.0 - EPSILON)
    return -np.log(p), -np.log1p(-p)


def graph_cut(
    pixels: np.ndarray,
    hints: np.ndarray,
    foreground_probability: np.ndarray | None = None,
    parameters: GraphCutParameters | None = None,
) -> np.ndarray:
    """The foreground (H, W) bool of the minimum cut for ``hints`` on an image.

    Args:
        pixels: the image, (H, W) or (H, W, C) in [0, 1].
        hints: the hint map (H, W): ``NO_HINT``, ``FOREGROUND``, ``BACKGROUND``.
        foreground_probability: (H, W) a model's foreground probability; None: intensity models of the hints.
        parameters: the weights (defaults: ``GraphCutParameters()``).

    Raises:
        ValueError: shapes that differ.
    """
    parameters = parameters or GraphCutParameters()
    image = gray(pixels)
    if hints.shape != image.shape:
        raise ValueError(f"hints of shape {hints.shape} for an image of shape {image.shape}")
    if foreground_probability is None:
        cost_fg, cost_bg = intensity_costs(image, hints, parameters.bins)
    else:
        if foreground_probability.shape != image.shape:
            raise ValueError(
                f"probabilities of shape {foreground_probability.shape} for an image of shape {image.shape}"
            )
        cost_fg, cost_bg = probability_costs(image, foreground_probability, hints, parameters.influence)
    cost_fg[hints == FOREGROUND], cost_bg[hints == FOREGROUND] = 0.0, HARD
    cost_fg[hints == BACKGROUND], cost_bg[hints == BACKGROUND] = HARD, 0.0
    # Only the difference of a pixel's two costs matters; removing the common part saves the solver work.
    common = np.minimum(cost_fg, cost_bg)
    right, down = contrast_weights(image)
    height, width = image.shape
    graph = maxflow.Graph[float](height * width, 2 * height * width)
    nodes = graph.add_grid_nodes(image.shape)
    graph.add_grid_edges(nodes, weights=parameters.smoothness * right, structure=RIGHT, symmetric=True)
    graph.add_grid_edges(nodes, weights=parameters.smoothness * down, structure=DOWN, symmetric=True)
    # The source side is the foreground: a pixel left on the sink side (background) pays its source capacity.
    graph.add_grid_tedges(nodes, cost_bg - common, cost_fg - common)
    graph.maxflow()
    return np.logical_not(graph.get_grid_segments(nodes))
