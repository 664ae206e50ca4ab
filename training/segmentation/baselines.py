"""Classical segmentation baselines the U-Net is compared with: Otsu, k-means and seeded region growing.

All three work on the grayscale intensity (RGB is converted by luma) of one image at a time and produce K
intensity groups, darkest first. Which class each group means is decided on the data: ``class_intensity_order``
ranks the classes by their mean intensity under the ground-truth masks (for two classes, this is the polarity:
is the foreground brighter or darker than the background?). One ranking is used for the whole data set, never
one per image. Because it is chosen on the evaluated data, it favours the baselines slightly, which makes the
comparison with the U-Net conservative.

* ``otsu``: Otsu's threshold (K - 1 thresholds for K classes, found exactly by dynamic programming over a
  256-bin histogram, maximising the between-class variance).
* ``kmeans``: k-means with k = K on the pixel intensities (scikit-learn, fitted on a random subsample of
  pixels, every pixel assigned to its nearest centre).
* ``region_growing``: seeded region growing. Seeds of the darkest class are the darkest 5% of the (Gaussian
  smoothed, sigma 1 px) pixels, seeds of the brightest class the brightest 5%, and seeds of any class in
  between the 5% of pixels around its rank's quantile. Regions then grow from all seeds at once into
  neighbouring pixels in order of increasing gradient magnitude (marker-based flooding with
  ``scipy.ndimage.watershed_ift``), so they stop and meet at edges.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from models.preprocessing import to_channels

METHODS = ("otsu", "kmeans", "region_growing")
SEED_FRACTION = 0.05


def to_gray(pixels: np.ndarray) -> np.ndarray:
    """Float (H, W, C) or (H, W) pixels -> float64 (H, W) intensity."""
    if pixels.ndim == 2:
        return pixels.astype(np.float64)
    return to_channels(pixels, 1)[:, :, 0].astype(np.float64)


def class_intensity_order(
    images: Sequence[np.ndarray], targets: Sequence[np.ndarray], num_classes: int
) -> list[int]:
    """Classes sorted from darkest to brightest mean intensity under the masks of the data.

    Args:
        images: (H, W, C) or (H, W) float pixels.
        targets: (H, W) class-index masks.
        num_classes: K.

    Returns:
        a permutation of 0..K-1; classes that never occur go last.
    """
    sums = np.zeros(num_classes)
    counts = np.zeros(num_classes)
    for image, target in zip(images, targets, strict=True):
        gray = to_gray(image)
        sums += ndimage.sum_labels(gray, target, index=np.arange(num_classes))
        counts += np.bincount(target.ravel(), minlength=num_classes)[:num_classes]
    present = [c for c in range(num_classes) if counts[c] > 0]
    absent = [c for c in range(num_classes) if counts[c] == 0]
    return sorted(present, key=lambda c: sums[c] / counts[c]) + absent


def otsu_thresholds(gray: np.ndarray, k: int, bins: int = 256) -> np.ndarray:
    """The k - 1 thresholds that maximise the between-class variance of ``gray`` (exact, multi-level Otsu).

    Dynamic programming over histogram bins: minimising the summed within-class variance of k contiguous bin
    groups is the same as maximising Otsu's between-class variance.
    """
    if k < 2:
        return np.zeros(0)
    lo, hi = float(gray.min()), float(gray.max())
    if hi <= lo:
        return np.full(k - 1, hi)
    hist, edges = np.histogram(gray, bins=bins, range=(lo, hi))
    p = hist / hist.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w = np.concatenate([[0.0], np.cumsum(p)])
    m = np.concatenate([[0.0], np.cumsum(p * centres)])
    s = np.concatenate([[0.0], np.cumsum(p * centres**2)])
    # cost[i, j]: within-class sum of squares of bins i..j-1 (inf when empty).
    wi = w[None, :] - w[:, None]
    mi = m[None, :] - m[:, None]
    si = s[None, :] - s[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(wi > 0, si - mi**2 / np.where(wi > 0, wi, 1.0), 0.0)
    idx = np.arange(bins + 1)
    cost = np.where(idx[None, :] > idx[:, None], cost, np.inf)
    best = cost[0].copy()  # best[j]: one group over bins 0..j-1
    choices = []
    for _ in range(1, k):
        total = best[:, None] + cost
        choices.append(total.argmin(axis=0))
        best = total.min(axis=0)
    # Backtrack the group boundaries from the last bin.
    cuts = []
    j = bins
    for choice in reversed(choices):
        j = int(choice[j])
        cuts.append(j)
    return np.asarray([edges[c] for c in reversed(cuts)])


def otsu(gray: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """Otsu thresholding of a (H, W) image into len(order) classes; returns int64 (H, W) labels."""
    thresholds = otsu_thresholds(gray, len(order))
    groups = np.digitize(gray, thresholds)  # 0 = darkest group
    return np.asarray(order)[groups].astype(np.int64)


def kmeans(gray: np.ndarray, order: Sequence[int], seed: int = 0, max_samples: int = 20000) -> np.ndarray:
    """k-means (k = len(order)) on the intensities of a (H, W) image; returns int64 (H, W) labels."""
    k = len(order)
    values = gray.reshape(-1, 1)
    rng = np.random.default_rng(seed)
    sample = values[rng.choice(len(values), size=min(max_samples, len(values)), replace=False)]
    # One small 1-D problem per image: worker threads cost more than they save.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # images with fewer than k distinct values
        model = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(sample)
    centres = np.sort(model.cluster_centers_[:, 0])
    groups = np.digitize(gray, (centres[:-1] + centres[1:]) / 2)
    return np.asarray(order)[groups].astype(np.int64)


def region_growing(gray: np.ndarray, order: Sequence[int], smooth: float = 1.0) -> np.ndarray:
    """Seeded region growing from the darkest / brightest pixels; returns int64 (H, W) labels."""
    k = len(order)
    if k < 2:
        return np.full(gray.shape, order[0], dtype=np.int64)
    g = ndimage.gaussian_filter(gray, smooth)
    markers = np.zeros(gray.shape, dtype=np.int32)
    for rank in range(k):
        centre = rank / (k - 1)
        q_lo = min(max(centre - SEED_FRACTION / 2, 0.0), 1.0 - SEED_FRACTION)
        lo, hi = np.quantile(g, [q_lo, q_lo + SEED_FRACTION])
        markers[(g >= lo) & (g <= hi) & (markers == 0)] = rank + 1
    gradient = np.hypot(ndimage.sobel(g, axis=0), ndimage.sobel(g, axis=1))
    scaled = (gradient / max(float(gradient.max()), 1e-12) * 65535).astype(np.uint16)
    grown = ndimage.watershed_ift(scaled, markers)
    grown = np.where(grown > 0, grown, 1)  # unreachable pixels (none in a connected image) -> darkest
    return np.asarray(order)[grown - 1].astype(np.int64)


BASELINES: dict[str, Callable[[np.ndarray, Sequence[int]], np.ndarray]] = {
    "otsu": otsu,
    "kmeans": kmeans,
    "region_growing": region_growing,
}


def predict(method: str, pixels: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """Runs baseline ``method`` on (H, W, C) pixels with the class ranking ``order``; int64 (H, W) labels."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; known: {METHODS}")
    return BASELINES[method](to_gray(pixels), order)
