"""Out-of-distribution (OOD) scoring: how unlike the training data an input is.

The score of an input is its Mahalanobis distance to the training features, after Lee et al. (2018, "A simple
unified framework for detecting out-of-distribution samples"): Gaussian statistics are fitted to one feature
vector per training image, one mean per group and one covariance shared by all groups (estimated on the
group-centred features and shrunk towards a scaled identity by Ledoit-Wolf, ``sklearn.covariance``, so it is
well conditioned even with fewer images than features), and

    score(x) = min over groups g of sqrt((f(x) - mu_g)^T Sigma^-1 (f(x) - mu_g)).

The features ``f(x)`` are taken from the same forward pass as the prediction by a forward hook
(``FeatureTap``) on the model's feature layer (``feature_layer``), globally average-pooled:

* classifiers (``models.classifier.Classifier``): the backbone's output, pooled (the penultimate features of
  the ``gap`` and ``svm`` heads, the input of the ``fc`` head); one group per class;
* the U-Net: its bottleneck (the deepest encoder block), pooled; one group (all training images). A tiled
  image's feature is the mean of its windows' features;
* any other network: the module its ``ood_feature_layer()`` method returns, if it has one; otherwise no score.

An input is flagged when its score exceeds ``threshold``: the ``percentile``-th percentile (default 95) of
the scores of held-out (validation) images, so about 5 % of in-distribution images are flagged by design.

``OODStatistics`` is what a checkpoint stores (``models.checkpoint``): the means and the precision matrix as
tensors, everything else as plain JSON in the metadata.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from models.inference import Precision, forward, split_tiles, tile_starts
from models.unet import UNet

DEFAULT_PERCENTILE = 95.0
# Tensors of the statistics, by the payload key the checkpoint stores them under.
TENSOR_FIELDS = ("means", "precision")
# Relative ridge added to the shrunk covariance: keeps it invertible when all features are (nearly) constant.
RIDGE = 1e-6


class OODStatistics(BaseModel):
    """Gaussian statistics of the training features and the flag threshold.

    Attributes:
        method / covariance: how the score is computed (``mahalanobis``, ``ledoit-wolf``).
        features: which features (a short description, e.g. ``pooled backbone features``).
        groups: the group of each row of ``means``: the class names, or ``["all"]``.
        dim: feature width F.
        threshold: scores above it are flagged.
        percentile: the percentile of the calibration scores ``threshold`` is.
        n_fit: images the statistics were fitted on; n_calibration: images the threshold was set on.
        calibrated_on: ``validation images`` (or ``training images`` when there were none).
        calibration_scores: quantiles (min, 50, 90, 95, 99, max) of the calibration scores, for reference.
        means: (G, F) float64 group means (a tensor; not part of the JSON metadata).
        precision: (F, F) float64 inverse of the shared shrunk covariance (likewise).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    method: Literal["mahalanobis"] = "mahalanobis"
    covariance: Literal["ledoit-wolf"] = "ledoit-wolf"
    features: str
    groups: list[str] = Field(min_length=1)
    dim: int = Field(ge=1)
    threshold: float
    percentile: float = Field(gt=0.0, le=100.0)
    n_fit: int = Field(ge=1)
    n_calibration: int = Field(ge=1)
    calibrated_on: str = "validation images"
    calibration_scores: dict[str, float] = Field(default_factory=dict)
    means: torch.Tensor = Field(exclude=True, repr=False)
    precision: torch.Tensor = Field(exclude=True, repr=False)

    @field_validator("means", "precision")
    @classmethod
    def _finite_float_matrix(cls, value: torch.Tensor) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.ndim != 2:
            raise ValueError("must be a 2-D tensor")
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise ValueError("must hold finite floating-point values")
        return value.detach().cpu().to(torch.float64).contiguous()

    @field_validator("threshold")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    @model_validator(mode="after")
    def _shapes(self) -> OODStatistics:
        groups, dim = len(self.groups), self.dim
        if tuple(self.means.shape) != (groups, dim):
            raise ValueError(f"means has shape {tuple(self.means.shape)}, expected ({groups}, {dim})")
        if tuple(self.precision.shape) != (dim, dim):
            raise ValueError(f"precision has shape {tuple(self.precision.shape)}, expected ({dim}, {dim})")
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores beside the metadata."""
        return {"means": self.means, "precision": self.precision}

    def scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,) scores of (N, F) features: the smallest Mahalanobis distance to a group mean."""
        return mahalanobis_scores(features, self.means.numpy(), self.precision.numpy())

    def assess(self, score: float) -> OODAssessment:
        return OODAssessment(
            score=float(score), threshold=self.threshold, flagged=bool(score > self.threshold)
        )

    def summary(self) -> dict[str, Any]:
        """What ``GET /models`` shows (the JSON part)."""
        return self.model_dump(mode="json")


class OODAssessment(BaseModel):
    """One input's OOD score, the model's threshold and whether the score exceeds it (what answers carry)."""

    model_config = ConfigDict(frozen=True)

    score: float
    threshold: float
    flagged: bool


def as_matrix(features: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, F) float64 numpy features."""
    array = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else features
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be (N, F), got shape {array.shape}")
    return array


def mahalanobis_scores(
    features: np.ndarray | torch.Tensor, means: np.ndarray, precision: np.ndarray
) -> np.ndarray:
    """(N,) min over the G rows of ``means`` (G, F) of the Mahalanobis distance under ``precision`` (F, F)."""
    x = as_matrix(features)
    if x.shape[1] != means.shape[1]:
        raise ValueError(f"features have width {x.shape[1]}, the statistics {means.shape[1]}")
    # (x - mu)^T P (x - mu) = x^T P x - 2 x^T P mu + mu^T P mu, for all groups at once.
    xp = x @ precision
    squared = (
        np.einsum("nf,nf->n", xp, x)[:, None]
        - 2.0 * xp @ means.T
        + np.einsum("gf,fh,gh->g", means, precision, means)[None, :]
    )
    return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


def fit_gaussian(
    features: np.ndarray | torch.Tensor, groups: Sequence[int] | np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Group means (G, F) and the precision (F, F) of the shared Ledoit-Wolf-shrunk covariance.

    Args:
        features: (N, F) one row per image.
        groups: (N,) the group (class index) of each row, in [0, n_groups).
        n_groups: G. A group without images gets the mean of all images (it never is the nearest by accident
            of being empty).

    Raises:
        ValueError: no features, or group labels out of range.
    """
    from sklearn.covariance import LedoitWolf  # only fitting needs it, not serving

    x = as_matrix(features)
    labels = np.asarray(groups, dtype=np.int64)
    if x.shape[0] == 0:
        raise ValueError("no features to fit OOD statistics on")
    if labels.shape != (x.shape[0],) or labels.min() < 0 or labels.max() >= n_groups:
        raise ValueError("one group index in [0, n_groups) is needed per feature row")
    overall = x.mean(axis=0)
    means = np.stack(
        [x[labels == g].mean(axis=0) if np.any(labels == g) else overall for g in range(n_groups)]
    )
    centred = x - means[labels]
    if x.shape[0] > 1:
        covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    else:  # one image: nothing to estimate a spread from but the ridge
        covariance = np.zeros((x.shape[1], x.shape[1]))
    scale = float(np.trace(covariance)) / x.shape[1]
    covariance = covariance + np.eye(x.shape[1]) * RIDGE * (scale if scale > 0 else 1.0)
    precision = np.linalg.inv(covariance)
    return means, (precision + precision.T) / 2.0


def quantiles(scores: np.ndarray) -> dict[str, float]:
    """min, p50, p90, p95, p99, max of ``scores`` (rounded), for the record."""
    points = {"min": 0.0, "p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
    return {name: round(float(np.percentile(scores, q)), 4) for name, q in points.items()}


def fit_statistics(
    fit_features: np.ndarray | torch.Tensor,
    fit_groups: Sequence[int] | np.ndarray,
    group_names: Sequence[str],
    calibration_features: np.ndarray | torch.Tensor | None,
    *,
    features: str,
    percentile: float = DEFAULT_PERCENTILE,
) -> OODStatistics:
    """Statistics on ``fit_features`` and the threshold at ``percentile`` of the calibration images' scores.

    Args:
        fit_features / fit_groups: (N, F) training features and their group indices into ``group_names``.
        calibration_features: (M, F) held-out features the threshold is set on; None or empty: the training
            features themselves (recorded in ``calibrated_on``; such a threshold flags more than it should).
        features: the description of the features stored with the statistics.
        percentile: in (0, 100].
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"the OOD percentile must be in (0, 100], got {percentile}")
    means, precision = fit_gaussian(fit_features, fit_groups, len(group_names))
    fit_matrix = as_matrix(fit_features)
    calibration = None if calibration_features is None else as_matrix(calibration_features)
    on = "validation images"
    if calibration is None or calibration.shape[0] == 0:
        calibration, on = fit_matrix, "training images (no validation set)"
    scores = mahalanobis_scores(calibration, means, precision)
    return OODStatistics(
        features=features,
        groups=list(group_names),
        dim=fit_matrix.shape[1],
        threshold=float(np.percentile(scores, percentile)),
        percentile=float(percentile),
        n_fit=fit_matrix.shape[0],
        n_calibration=calibration.shape[0],
        calibrated_on=on,
        calibration_scores=quantiles(scores),
        means=torch.from_numpy(means),
        precision=torch.from_numpy(precision),
    )


# -- features from the forward pass ---------------------------------------------------------------------


def feature_layer(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The module whose (pooled) output is the model's OOD feature, and its description; None if unknown."""
    custom = getattr(model, "ood_feature_layer", None)
    if callable(custom):
        layer = custom()
        return (layer, "pooled features of a custom layer") if isinstance(layer, nn.Module) else None
    if isinstance(model, UNet):
        return model.down[-1], "globally average-pooled U-Net bottleneck"
    if type(model).__module__ == "models.classifier":
        from models.classifier import Classifier  # torchvision only when a classifier is served

        if isinstance(model, Classifier):
            return model.features, "globally average-pooled backbone features (penultimate layer)"
    return None


def pooled(output: Any) -> torch.Tensor:
    """A layer output (B, C, H, W) or (B, F) as (B, F) float32 on the CPU (spatial mean)."""
    if isinstance(output, tuple | list):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the OOD feature layer returned {type(output).__name__}, not a tensor")
    features = output.float()
    if features.ndim > 2:
        features = features.mean(dim=tuple(range(2, features.ndim)))
    return features.reshape(features.shape[0], -1).cpu()


class FeatureTap:
    """Collects the pooled output of ``layer`` for every forward pass run by the thread that opened it.

    A context manager: the hook is registered on entry and removed on exit, so a model runs without it at any
    other time. Passes run by other threads on the same model (e.g. explanations) are ignored.
    ``features()`` is the (N, F) concatenation, in call order, of everything collected.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.batches: list[torch.Tensor] = []
        self._thread = threading.get_ident()
        self._handle: Any = None

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if threading.get_ident() == self._thread:
            self.batches.append(pooled(output))

    def __enter__(self) -> FeatureTap:
        self._thread = threading.get_ident()
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def features(self) -> torch.Tensor:
        if not self.batches:
            return torch.zeros((0, 0))
        return torch.cat(self.batches)


def per_image(window_features: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """(sum(counts), F) window features -> (len(counts), F): the mean over each image's windows.

    Raises:
        ValueError: the rows do not add up to ``counts``.
    """
    if window_features.shape[0] != sum(counts):
        raise ValueError(f"{window_features.shape[0]} feature rows for {sum(counts)} windows")
    return torch.stack([part.mean(dim=0) for part in window_features.split(list(counts))])


def window_count(image: torch.Tensor, tile: Sequence[int], overlap: float) -> int:
    """How many windows ``models.inference.split_tiles`` cuts a (C, H, W) image into."""
    h, w = image.shape[-2:]
    th, tw = int(tile[0]), int(tile[1])
    return len(tile_starts(max(h, th), th, overlap)) * len(tile_starts(max(w, tw), tw, overlap))


def extract_features(
    model: nn.Module,
    images: Sequence[torch.Tensor] | Iterator[torch.Tensor],
    *,
    tile: Sequence[int] | None = None,
    overlap: float = 0.25,
    batch_size: int = 32,
    device: torch.device | None = None,
    precision: Precision = "fp32",
) -> torch.Tensor:
    """(N, F) OOD features of normalised (C, H, W) model inputs, as the service computes them.

    Args:
        model: the network (eval mode); its ``feature_layer`` must be known.
        images: model inputs: same-sized images for a classifier (``tile`` None); any sizes with ``tile``.
        tile: the window size of tiled segmentation (``spec.img_size`` under ``tile``/``fit``); each image's
            feature is then the mean over its windows, as in ``app.runners.SegmentationRunner``.
        batch_size: images (or windows) per forward pass.

    Raises:
        ValueError: the model has no known feature layer.
    """
    found = feature_layer(model)
    if found is None:
        raise ValueError(f"no OOD feature layer is known for {type(model).__name__}")
    if device is None:
        device = next(model.parameters()).device
    rows: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    counts: list[int] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.cat(pending) if tile is not None else torch.stack(pending)
        with FeatureTap(found[0]) as tap:
            for chunk in batch.split(batch_size):
                forward(model, chunk, device, precision)
        window_rows = tap.features()
        rows.append(per_image(window_rows, counts) if tile is not None else window_rows)
        pending.clear()
        counts.clear()

    for image in images:
        if tile is not None:
            tiles, tiling = split_tiles(image, tile, overlap)
            pending.append(tiles)
            counts.append(len(tiling.positions))
            if sum(counts) >= batch_size:
                flush()
        else:
            pending.append(image)
            if len(pending) >= batch_size:
                flush()
    flush()
    return torch.cat(rows) if rows else torch.zeros((0, 0))
