"""Out-of-distribution (OOD) scoring: how unlike the training data an input is.

The score of an input is a Mahalanobis distance to the training features, after Lee et al. (2018, "A simple
unified framework for detecting out-of-distribution samples"), over features from two depths of the network:

* the output of its **first** stage (edges, texture, contrast: what tells a phantom from an X-ray or an
  electron micrograph) and of its **last** stage (the features the prediction is made from);
* each pooled over positions by its **mean** and its **standard deviation** per channel (the second-order
  statistics style transfer and feature-statistics OOD detectors use). A tiled image's features are the mean
  of its windows' features.

These form blocks (first-stage mean, first-stage std, last-stage mean, last-stage std). Gaussian statistics
are fitted per block on one feature vector per training image: one mean per group and one covariance shared by
all groups (estimated on the group-centred features and shrunk towards a scaled identity by Ledoit-Wolf,
``sklearn.covariance``, so it is well conditioned even with fewer images than features). The blocks are taken as
independent (a block-diagonal covariance), so

    score(x) = min over groups g of sqrt(sum over blocks b of (f_b(x) - mu_gb)^T Sigma_b^-1 (f_b(x) - mu_gb)).

``benchmarks/ood_features.py`` compares this with the single pooled penultimate layer of earlier versions (which
let 7 % of chest X-rays pass as lesion phantoms) and with all stages (docs/experiments/ood.md).

The features are taken from the same forward pass as the prediction by forward hooks (``FeatureTap``) on the
layers ``feature_layers`` names: the first and last of a classifier's five backbone stages (``features.0``,
``features.4``), the first and last encoder block of the U-Net (``down.0``, ``down.N``); one group per class
for classifiers, one group (all training images) for the U-Net. Any other network: the module its
``ood_feature_layer()`` method returns, if it has one (mean pooling, one block); otherwise no score.
Statistics written before the blocks existed (``layers`` empty) score the pooled mean of ``feature_layer`` (the
last stage) as one block, as they always did.

An input is flagged when its score exceeds ``threshold``, set on held-out (validation) images' scores so that
at most 100 - ``percentile`` % (default 5 %) of images like them are flagged, with probability ``confidence``
(default 0.9) over the draw of those images: the nonparametric tolerance limit (Wilks, 1941), the smallest
order statistic X_(k) of the n scores whose uncovered fraction, Beta(n + 1 - k, k)-distributed, exceeds
1 - percentile / 100 with probability at most 1 - confidence. At the defaults that is the 99th of 100 scores,
the 503rd of 522, the largest of 45 to 59; with fewer than 45 no order statistic gives that confidence, the
largest score is used and ``threshold_rule`` says ``maximum``. With ``confidence`` None the rule is the
split-conformal rank ceil((n + 1) p / 100) (``conformal``), which bounds the flag rate only on average over
draws of the validation images: measured on 180 new dental phantoms, a threshold from 60 such images flagged
7.8 % of them (docs/experiments/ood.md).

``OODStatistics`` is what a checkpoint stores (``models.checkpoint``): the means and the block precisions as
tensors, everything else as plain JSON in the metadata.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from models.inference import Precision, forward, split_tiles, tile_starts
from models.unet import UNet

DEFAULT_PERCENTILE = 95.0
# The confidence with which at most (100 - percentile) % of in-distribution images are flagged (``threshold``).
DEFAULT_CONFIDENCE = 0.9
Pooling = Literal["mean", "mean+std"]
ThresholdRule = Literal["tolerance", "conformal", "maximum", "interpolated"]
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
        layers: the modules (``model.get_submodule`` names) whose outputs are the features, in order; empty:
            statistics from before the blocks existed (``feature_layer``'s module, mean pooling).
        pooling: ``mean`` (C features per layer) or ``mean+std`` (2C: the means, then the standard deviations).
        blocks: the width of each independent Gaussian block, in feature order (sum: dim); empty: one block.
        threshold_rule: ``tolerance``, ``conformal``, ``maximum`` (too few calibration images for the rule) or
            ``interpolated`` (numpy's linear percentile: statistics from before these rules).
        confidence: the tolerance rule's confidence; None for the other rules.
        means: (G, F) float64 group means (a tensor; not part of the JSON metadata).
        precision: (F, max block width) float64: the inverse of each block's shared shrunk covariance, the
            blocks' rows stacked in feature order and zero-padded on the right (likewise a tensor). With one
            block it is the (F, F) precision matrix.
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
    layers: list[str] = Field(default_factory=list)
    pooling: Pooling = "mean"
    blocks: list[int] = Field(default_factory=list)
    threshold_rule: ThresholdRule = "interpolated"
    confidence: float | None = Field(default=None, gt=0.0, lt=1.0)
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
        widths = self.block_widths()
        if any(w < 1 for w in widths) or sum(widths) != dim:
            raise ValueError(f"blocks {widths} do not add up to the {dim} features")
        if tuple(self.precision.shape) != (dim, max(widths)):
            raise ValueError(
                f"precision has shape {tuple(self.precision.shape)}, expected ({dim}, {max(widths)})"
            )
        return self

    def block_widths(self) -> list[int]:
        """The width of each Gaussian block (one block of ``dim`` when ``blocks`` is empty)."""
        return list(self.blocks) if self.blocks else [self.dim]

    def block_precisions(self) -> list[np.ndarray]:
        """Each block's (w, w) precision matrix, unpacked from ``precision``."""
        matrix = self.precision.numpy()
        out, start = [], 0
        for width in self.block_widths():
            out.append(matrix[start : start + width, :width])
            start += width
        return out

    def threshold_basis(self) -> str:
        """How the threshold was set, in words (for logs and command output)."""
        n, on, outside = self.n_calibration, self.calibrated_on, 100.0 - self.percentile
        if self.threshold_rule == "tolerance":
            return f"at most {outside:g}% of images like the {n} {on} flagged, with confidence {self.confidence:g}"
        if self.threshold_rule == "maximum":
            return f"the largest of the {n} {on}' scores: too few to bound the flag rate at {outside:g}%"
        if self.threshold_rule == "conformal":
            return f"the split-conformal {self.percentile:g}th percentile of the {n} {on}' scores"
        return f"the {self.percentile:g}th percentile of the {n} {on}' scores"

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores beside the metadata."""
        return {"means": self.means, "precision": self.precision}

    def scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,) scores of (N, F) features: over groups, the smallest block-diagonal Mahalanobis distance."""
        return block_scores(features, self.means.numpy(), self.block_precisions())

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


def squared_distances(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(N, G) squared Mahalanobis distances of the rows of ``x`` (N, F) to each row of ``means`` (G, F)."""
    # (x - mu)^T P (x - mu) = x^T P x - 2 x^T P mu + mu^T P mu, for all groups at once.
    xp = x @ precision
    squared = (
        np.einsum("nf,nf->n", xp, x)[:, None]
        - 2.0 * xp @ means.T
        + np.einsum("gf,fh,gh->g", means, precision, means)[None, :]
    )
    return np.maximum(squared, 0.0)


def mahalanobis_scores(
    features: np.ndarray | torch.Tensor, means: np.ndarray, precision: np.ndarray
) -> np.ndarray:
    """(N,) min over the G rows of ``means`` (G, F) of the Mahalanobis distance under ``precision`` (F, F)."""
    return block_scores(features, means, [precision])


def block_scores(
    features: np.ndarray | torch.Tensor, means: np.ndarray, precisions: Sequence[np.ndarray]
) -> np.ndarray:
    """(N,) min over groups of sqrt(sum over blocks of the squared Mahalanobis distance in the block).

    Args:
        features: (N, F); the blocks are consecutive column ranges, of the widths of ``precisions``.
        means: (G, F) group means.
        precisions: each block's (w, w) precision matrix (sum of w: F).
    """
    x = as_matrix(features)
    if x.shape[1] != means.shape[1]:
        raise ValueError(f"features have width {x.shape[1]}, the statistics {means.shape[1]}")
    if sum(p.shape[0] for p in precisions) != x.shape[1]:
        raise ValueError("the blocks do not add up to the features' width")
    total = np.zeros((x.shape[0], means.shape[0]))
    start = 0
    for precision in precisions:
        end = start + precision.shape[0]
        total += squared_distances(x[:, start:end], means[:, start:end], precision)
        start = end
    return np.sqrt(total.min(axis=1))


def conformal_threshold(scores: np.ndarray, percentile: float) -> tuple[float, ThresholdRule]:
    """The split-conformal threshold at ``percentile`` of ``scores`` (n calibration scores) and its rule.

    The ceil((n + 1) p)-th smallest score (p = percentile / 100): a new score from the same distribution
    exceeds it with probability at most 1 - p. When that rank exceeds n, the largest score (``maximum``).
    """
    values = np.sort(np.asarray(scores, dtype=np.float64))
    if values.size == 0:
        raise ValueError("no calibration scores")
    rank = math.ceil((values.size + 1) * percentile / 100.0 - 1e-9)
    if rank > values.size:
        return float(values[-1]), "maximum"
    return float(values[max(rank, 1) - 1]), "conformal"


def tolerance_threshold(
    scores: np.ndarray, percentile: float, confidence: float
) -> tuple[float, ThresholdRule]:
    """The smallest order statistic of ``scores`` above which at most 1 - percentile / 100 of the distribution
    lies with probability ``confidence`` (a one-sided nonparametric tolerance limit), and its rule; the largest
    score (``maximum``) when even it does not reach that confidence."""
    from scipy.stats import beta  # only fitting needs it, not serving

    values = np.sort(np.asarray(scores, dtype=np.float64))
    n = values.size
    if n == 0:
        raise ValueError("no calibration scores")
    outside = 1.0 - percentile / 100.0
    ranks = np.arange(1, n + 1)
    # P(the fraction above the k-th smallest exceeds `outside`): Beta(n + 1 - k, k) survival; falls with k.
    risk = beta.sf(outside, n + 1 - ranks, ranks) if outside > 0 else np.ones(n)
    good = np.nonzero(risk <= 1.0 - confidence)[0]
    if good.size == 0:
        return float(values[-1]), "maximum"
    return float(values[good[0]]), "tolerance"


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
    blocks: Sequence[int] | None = None,
    layers: Sequence[str] = (),
    pooling: Pooling = "mean",
    confidence: float | None = DEFAULT_CONFIDENCE,
) -> OODStatistics:
    """Statistics on ``fit_features`` and the threshold at ``percentile`` of the calibration scores (the
    tolerance limit at ``confidence``; None: the conformal rank).

    Args:
        fit_features / fit_groups: (N, F) training features and their group indices into ``group_names``.
        calibration_features: (M, F) held-out features the threshold is set on; None or empty: the training
            features themselves (recorded in ``calibrated_on``; such a threshold flags more than it should).
        features: the description of the features stored with the statistics.
        percentile: in (0, 100].
        blocks: widths of the independent Gaussian blocks, in column order (``FeatureTap.widths``); None: one.
        layers / pooling: where the features come from (``FeatureSource``), stored for serving.
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"the OOD percentile must be in (0, 100], got {percentile}")
    if confidence is not None and not 0.0 < confidence < 1.0:
        raise ValueError(f"the OOD confidence must be in (0, 1), got {confidence}")
    fit_matrix = as_matrix(fit_features)
    widths = list(blocks) if blocks else [fit_matrix.shape[1]]
    if sum(widths) != fit_matrix.shape[1] or min(widths) < 1:
        raise ValueError(f"blocks {widths} do not add up to the {fit_matrix.shape[1]} features")
    means_parts, precisions, start = [], [], 0
    for width in widths:
        block_means, block_precision = fit_gaussian(
            fit_matrix[:, start : start + width], fit_groups, len(group_names)
        )
        means_parts.append(block_means)
        precisions.append(block_precision)
        start += width
    means = np.concatenate(means_parts, axis=1)
    packed = np.zeros((fit_matrix.shape[1], max(widths)))
    start = 0
    for precision in precisions:
        packed[start : start + precision.shape[0], : precision.shape[0]] = precision
        start += precision.shape[0]
    calibration = None if calibration_features is None else as_matrix(calibration_features)
    on = "validation images"
    if calibration is None or calibration.shape[0] == 0:
        calibration, on = fit_matrix, "training images (no validation set)"
    scores = block_scores(calibration, means, precisions)
    if confidence is None:
        threshold, rule = conformal_threshold(scores, percentile)
    else:
        threshold, rule = tolerance_threshold(scores, percentile, confidence)
    return OODStatistics(
        features=features,
        groups=list(group_names),
        dim=fit_matrix.shape[1],
        threshold=threshold,
        percentile=float(percentile),
        n_fit=fit_matrix.shape[0],
        n_calibration=calibration.shape[0],
        calibrated_on=on,
        calibration_scores=quantiles(scores),
        layers=list(layers),
        pooling=pooling,
        blocks=widths if len(widths) > 1 else [],
        threshold_rule=rule,
        confidence=confidence,
        means=torch.from_numpy(means),
        precision=torch.from_numpy(packed),
    )


# -- features from the forward pass ---------------------------------------------------------------------


def feature_layer(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The single module whose pooled mean was the OOD feature before ``FeatureSource`` (statistics whose
    ``layers`` is empty), and its description; None if unknown."""
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


@dataclass(frozen=True)
class FeatureSource:
    """Where a model's OOD features come from: hooked modules (with their ``get_submodule`` names) and the
    pooling of their outputs."""

    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    pooling: Pooling
    description: str


def module_name(model: nn.Module, module: nn.Module) -> str:
    """``module``'s ``get_submodule`` name in ``model`` ("" for the model itself).

    Raises:
        ValueError: ``module`` is not part of ``model``.
    """
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def default_feature_source(model: nn.Module) -> FeatureSource | None:
    """The features new statistics are fitted on: the first and last stage (classifier backbone, U-Net
    encoder), mean and standard deviation; a custom ``ood_feature_layer()``: its pooled mean. None if unknown."""
    stages: Sequence[nn.Module] | None = None
    kind = ""
    # A network that names its own layer (``ood_feature_layer``) gets that layer from feature_layer below.
    if not callable(getattr(model, "ood_feature_layer", None)):
        if isinstance(model, UNet):
            stages, kind = list(model.down), "U-Net encoder block"
        elif type(model).__module__ == "models.classifier":
            from models.classifier import Classifier  # torchvision only when a classifier is served

            if isinstance(model, Classifier):
                stages, kind = list(model.features), "backbone stage"
    if stages:
        chosen = (stages[0], stages[-1]) if len(stages) > 1 else (stages[0],)
        return FeatureSource(
            names=tuple(module_name(model, m) for m in chosen),
            modules=chosen,
            pooling="mean+std",
            description=f"mean and standard deviation over positions of the first and last {kind}'s output",
        )
    found = feature_layer(model)
    if found is None:
        return None
    return FeatureSource((module_name(model, found[0]),), (found[0],), "mean", found[1])


def feature_source(model: nn.Module, stats: OODStatistics) -> FeatureSource:
    """Where the features ``stats`` was fitted on come from, in ``model``.

    Raises:
        ValueError: a named layer is not in the model, or no feature layer is known (legacy statistics).
    """
    if not stats.layers:
        found = feature_layer(model)
        if found is None:
            raise ValueError(f"no OOD feature layer is known for {type(model).__name__}")
        return FeatureSource((module_name(model, found[0]),), (found[0],), "mean", stats.features)
    modules = []
    for name in stats.layers:
        try:
            modules.append(model.get_submodule(name))
        except AttributeError as exc:
            raise ValueError(f"the OOD feature layer {name!r} is not in {type(model).__name__}") from exc
    return FeatureSource(tuple(stats.layers), tuple(modules), stats.pooling, stats.features)


def pooled(output: Any, pooling: Pooling = "mean") -> torch.Tensor:
    """A layer output (B, C, H, W) or (B, F) as (B, F) float32 on the CPU: the mean over positions, or with
    ``mean+std`` (B, 2C): the means, then the (population) standard deviations."""
    if isinstance(output, tuple | list):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the OOD feature layer returned {type(output).__name__}, not a tensor")
    features = output.float()
    flat = features.reshape(features.shape[0], -1, 1) if features.ndim <= 2 else features.flatten(2)
    parts = [flat.mean(dim=2)]
    if pooling == "mean+std":
        parts.append(flat.std(dim=2, correction=0))
    return torch.cat(parts, dim=1).cpu()


class FeatureTap:
    """Collects the pooled outputs of ``layers`` for every forward pass run by the thread that opened it.

    A context manager: the hooks are registered on entry and removed on exit, so a model runs without them at
    any other time. Passes run by other threads on the same model (e.g. explanations) are ignored.
    ``features()`` is the (N, F) result: for each layer, in order, the concatenation of what it produced in
    call order; ``widths()`` the Gaussian blocks of those columns (per layer: C, or C and C with ``mean+std``).
    """

    def __init__(self, layers: nn.Module | Sequence[nn.Module], pooling: Pooling = "mean") -> None:
        self.layers = (layers,) if isinstance(layers, nn.Module) else tuple(layers)
        self.pooling = pooling
        self.batches: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._thread = threading.get_ident()
        self._handles: list[Any] = []

    def _hook(self, index: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if threading.get_ident() == self._thread:
                self.batches[index].append(pooled(output, self.pooling))

        return hook

    def __enter__(self) -> FeatureTap:
        self._thread = threading.get_ident()
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def features(self) -> torch.Tensor:
        if not any(self.batches):
            return torch.zeros((0, 0))
        per_layer = [torch.cat(parts) for parts in self.batches]
        if len({p.shape[0] for p in per_layer}) != 1:
            raise RuntimeError("the OOD feature layers produced different numbers of rows")
        return torch.cat(per_layer, dim=1)

    def widths(self) -> list[int]:
        """The block widths of ``features()``'s columns."""
        widths: list[int] = []
        for parts in self.batches:
            if parts:
                width = parts[0].shape[1]
                widths += [width // 2, width // 2] if self.pooling == "mean+std" else [width]
        return widths


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


class Features(NamedTuple):
    """``extract_blocks``'s answer: (N, F) features and the widths of their Gaussian blocks."""

    values: torch.Tensor
    widths: list[int]


def extract_features(
    model: nn.Module,
    images: Sequence[torch.Tensor] | Iterator[torch.Tensor],
    *,
    source: FeatureSource | None = None,
    tile: Sequence[int] | None = None,
    overlap: float = 0.25,
    batch_size: int = 32,
    device: torch.device | None = None,
    precision: Precision = "fp32",
) -> torch.Tensor:
    """(N, F) OOD features of normalised (C, H, W) model inputs, as the service computes them
    (``extract_blocks``'s values)."""
    return extract_blocks(
        model,
        images,
        source=source,
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
        device=device,
        precision=precision,
    ).values


def extract_blocks(
    model: nn.Module,
    images: Sequence[torch.Tensor] | Iterator[torch.Tensor],
    *,
    source: FeatureSource | None = None,
    tile: Sequence[int] | None = None,
    overlap: float = 0.25,
    batch_size: int = 32,
    device: torch.device | None = None,
    precision: Precision = "fp32",
) -> Features:
    """(N, F) OOD features of normalised (C, H, W) model inputs, as the service computes them, and their blocks.

    Args:
        model: the network (eval mode).
        images: model inputs: same-sized images for a classifier (``tile`` None); any sizes with ``tile``.
        source: where the features come from; None: ``default_feature_source(model)`` (new statistics).
        tile: the window size of tiled segmentation (``spec.img_size`` under ``tile``/``fit``); each image's
            feature is then the mean over its windows, as in ``app.runners.SegmentationRunner``.
        batch_size: images (or windows) per forward pass.

    Raises:
        ValueError: the model has no known feature layer.
    """
    if source is None:
        source = default_feature_source(model)
        if source is None:
            raise ValueError(f"no OOD feature layer is known for {type(model).__name__}")
    if device is None:
        device = next(model.parameters()).device
    rows: list[torch.Tensor] = []
    widths: list[int] = []
    pending: list[torch.Tensor] = []
    counts: list[int] = []

    def flush() -> None:
        nonlocal widths
        if not pending:
            return
        batch = torch.cat(pending) if tile is not None else torch.stack(pending)
        with FeatureTap(source.modules, source.pooling) as tap:
            for chunk in batch.split(batch_size):
                forward(model, chunk, device, precision)
        window_rows = tap.features()
        widths = tap.widths()
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
    return Features(torch.cat(rows) if rows else torch.zeros((0, 0)), widths)
