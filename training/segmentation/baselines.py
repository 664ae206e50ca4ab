"""Classical segmentation baselines the U-Net is compared with.

Every method works on the grayscale intensity (RGB is converted by luma) of one image at a time and produces K
intensity groups, darkest first. Which class each group means is decided on the data: ``class_intensity_order``
ranks the classes by their mean intensity under the ground-truth masks (for two classes, this is the polarity:
is the foreground brighter or darker than the background?), and group r becomes the class of rank r
(``groups_to_classes``). One ranking is used for the whole data set, never one per image. Because it is chosen
on the evaluated data, it favours the baselines slightly, which makes the comparison with the U-Net
conservative. Every method is deterministic (fixed seeds).

Pixel clustering (fitted on at most ``MAX_SAMPLES`` random pixels, then every pixel goes to its nearest centre):

* ``otsu``: Otsu's threshold (K - 1 thresholds for K classes, found exactly by dynamic programming over a
  256-bin histogram, maximising the between-class variance).
* ``kmeans``: k-means with k = K on the pixel intensities (scikit-learn).
* ``fcm``: fuzzy c-means with c = K, fuzzifier m = 2 (scikit-fuzzy ``cmeans``); the largest membership is the
  nearest centre.
* ``mean_shift``: mean shift on the intensities (scikit-learn ``MeanShift`` with bin seeding, bandwidth from
  ``estimate_bandwidth``); the K modes holding the most pixels are kept. With fewer than K modes the bandwidth
  is halved (at most 6 times).

Spatial methods (run at most at ``MAX_WORK_PIXELS`` pixels: larger images are downsampled, and the labels
brought back to full resolution by nearest neighbour):

* ``agglomerative``: SLIC superpixels (scikit-image, about one per ``SUPERPIXEL_AREA`` pixels), then Ward
  hierarchical clustering (scikit-learn ``AgglomerativeClustering``) of their mean intensities into K groups.
* ``region_growing``: seeded region growing. Seeds of the darkest class are the darkest 5% of the (Gaussian
  smoothed, sigma 1 px) pixels, seeds of the brightest class the brightest 5%, and seeds of any class in
  between the 5% of pixels around its rank's quantile. Regions then grow from all seeds at once into
  neighbouring pixels in order of increasing gradient magnitude (marker-based flooding with
  ``scipy.ndimage.watershed_ift``), so they stop and meet at edges. (Full resolution.)
* ``region_merging``: the same superpixels as a region adjacency graph (the graph
  ``skimage.graph.rag_mean_color`` builds, see ``rag_mean_intensity``); neighbours whose mean intensities
  differ by less than ``REGION_MERGING_GAP`` (a quarter) of the smallest gap between the Otsu class means are
  merged (``skimage.graph.cut_threshold``; ``merge_hierarchical`` scored about the same on an ISBI slice in 50x the time), and
  each merged region takes the group of its mean intensity under the Otsu thresholds.
* ``active_contour``: Chan-Vese, the morphological variant (``skimage.segmentation.morphological_chan_vese``,
  ``CHAN_VESE_ITERATIONS`` iterations, much faster than the level-set ``chan_vese``), started from the Otsu
  split.
* ``graph_cut``: a minimum cut (PyMaxflow, 4-connected grid). Unary terms: the negative log-likelihood under
  two Gaussians, one fitted on each Otsu group (the automatic seeds). Pairwise terms: contrast sensitive,
  ``GRAPH_CUT_SMOOTHNESS * exp(-beta dI^2)`` with ``beta = 1 / (2 mean dI^2)`` (Boykov and Jolly). Fitting only
  the "confident" half of each group (the pixels farther from the threshold) underestimates the spreads and
  scored 0.58 instead of 0.80 tooth Dice on development phantoms; eroded group cores scored as the whole groups.

``active_contour`` and ``graph_cut`` are two-phase. For K classes each of the K - 1 boundaries between
neighbouring Otsu groups r and r + 1 gets its own two-phase split of the image clipped to the two groups' mean
intensities (so darker and brighter groups do not pull the fit), and a pixel's group is the number of
boundaries it lies above (``nested_two_phase``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import maxflow
import numpy as np
import skfuzzy
from scipy import ndimage
from skimage import graph as skgraph
from skimage.segmentation import morphological_chan_vese, slic
from skimage.transform import resize
from sklearn.cluster import AgglomerativeClustering, KMeans, MeanShift, estimate_bandwidth
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from models.interactive import DOWN, RIGHT, contrast_weights
from models.preprocessing import to_channels

# Report order: pixel clustering first, then the spatial methods.
METHODS = (
    "otsu",
    "kmeans",
    "fcm",
    "mean_shift",
    "agglomerative",
    "region_growing",
    "region_merging",
    "active_contour",
    "graph_cut",
)
LABELS = {
    "otsu": "Otsu",
    "kmeans": "k-means",
    "fcm": "fuzzy c-means",
    "mean_shift": "mean shift",
    "agglomerative": "agglomerative",
    "region_growing": "region growing",
    "region_merging": "region merging",
    "active_contour": "active contour",
    "graph_cut": "graph cut",
}
SEED_FRACTION = 0.05
MAX_SAMPLES = 20000  # pixels a clustering is fitted on
MAX_WORK_PIXELS = 512 * 512  # spatial methods run at most at this size (ISBI slices: full resolution)
SUPERPIXEL_AREA = 50  # pixels per SLIC superpixel
SUPERPIXEL_COMPACTNESS = 0.3  # SLIC's spatial weight, for intensities in [0, 1]
CHAN_VESE_ITERATIONS = 20
# Chosen on ISBI training slices 0, 5, 10, 15 and 6 dental phantoms of seed 5 (1 -> 10 -> 30: 0.557 -> 0.578
# -> 0.591 membrane Dice, 0.778 -> 0.797 -> 0.807 tooth Dice).
GRAPH_CUT_SMOOTHNESS = 30.0
REGION_MERGING_GAP = 0.25  # neighbours merge below this fraction of the gap between class means


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


def groups_to_classes(groups: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """Intensity groups (0 = darkest) -> class indices, group r being class ``order[r]``; int64 labels."""
    return np.asarray(order)[groups].astype(np.int64)


def nearest_centre(gray: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Group of every pixel: the index of its nearest intensity centre, centres sorted darkest first."""
    centres = np.sort(np.asarray(centres, dtype=np.float64))
    return np.digitize(gray, (centres[:-1] + centres[1:]) / 2)


def pixel_sample(gray: np.ndarray, seed: int, max_samples: int = MAX_SAMPLES) -> np.ndarray:
    """At most ``max_samples`` random pixel intensities as an (N, 1) array (clusterings are fitted on these)."""
    values = gray.reshape(-1, 1)
    rng = np.random.default_rng(seed)
    return values[rng.choice(len(values), size=min(max_samples, len(values)), replace=False)]


def otsu(gray: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """Otsu thresholding of a (H, W) image into len(order) classes; returns int64 (H, W) labels."""
    thresholds = otsu_thresholds(gray, len(order))
    groups = np.digitize(gray, thresholds)  # 0 = darkest group
    return groups_to_classes(groups, order)


def kmeans(
    gray: np.ndarray, order: Sequence[int], seed: int = 0, max_samples: int = MAX_SAMPLES
) -> np.ndarray:
    """k-means (k = len(order)) on the intensities of a (H, W) image; returns int64 (H, W) labels."""
    sample = pixel_sample(gray, seed, max_samples)
    # One small 1-D problem per image: worker threads cost more than they save.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # images with fewer than k distinct values
        model = KMeans(n_clusters=len(order), n_init=3, random_state=seed).fit(sample)
    return groups_to_classes(nearest_centre(gray, model.cluster_centers_[:, 0]), order)


def fcm(gray: np.ndarray, order: Sequence[int], seed: int = 0, max_samples: int = MAX_SAMPLES) -> np.ndarray:
    """Fuzzy c-means (c = len(order), m = 2) on the intensities; returns int64 (H, W) labels."""
    sample = pixel_sample(gray, seed, max_samples)
    # Our own initial memberships: cmeans(seed=...) would reseed NumPy's global random state.
    memberships = np.random.default_rng(seed).random((len(order), len(sample)))
    memberships /= memberships.sum(axis=0)
    centres, *_ = skfuzzy.cluster.cmeans(
        sample.T, c=len(order), m=2.0, error=1e-5, maxiter=300, init=memberships
    )
    return groups_to_classes(nearest_centre(gray, centres[:, 0]), order)


def mean_shift(gray: np.ndarray, order: Sequence[int], seed: int = 0, max_samples: int = 2000) -> np.ndarray:
    """Mean shift on the intensities, the K most populated modes kept; returns int64 (H, W) labels."""
    k = len(order)
    sample = pixel_sample(gray, seed, max_samples)
    spread = float(sample.max() - sample.min())
    bandwidth = float(estimate_bandwidth(sample, quantile=0.3, random_state=seed)) or spread / 4 or 1.0
    for _ in range(7):
        with threadpool_limits(1):
            model = MeanShift(bandwidth=bandwidth, bin_seeding=True).fit(sample)
        counts = np.bincount(model.labels_, minlength=len(model.cluster_centers_))
        if len(counts) >= k:
            break
        bandwidth /= 2
    kept = model.cluster_centers_[np.argsort(counts)[::-1][:k], 0]
    if len(kept) < k:  # (nearly) constant image: the extra groups stay empty
        kept = np.concatenate([kept, np.full(k - len(kept), np.inf)])
    return groups_to_classes(nearest_centre(gray, kept), order)


def at_working_size(gray: np.ndarray, segment: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``segment`` (gray -> int groups) run on ``gray`` shrunk to at most ``MAX_WORK_PIXELS``; full-size groups."""
    scale = (MAX_WORK_PIXELS / gray.size) ** 0.5
    if scale >= 1:
        return segment(gray)
    small_shape = tuple(max(1, round(n * scale)) for n in gray.shape)
    groups = segment(resize(gray, small_shape, order=1, anti_aliasing=True))
    return resize(groups, gray.shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.int64)


def superpixels(gray: np.ndarray) -> np.ndarray:
    """SLIC superpixels of a (H, W) image, about one per ``SUPERPIXEL_AREA`` pixels; labels 0..n-1."""
    lo, hi = float(gray.min()), float(gray.max())
    return slic(
        (gray - lo) / (hi - lo) if hi > lo else np.zeros_like(gray),  # the compactness assumes [0, 1]
        n_segments=max(1, gray.size // SUPERPIXEL_AREA),
        compactness=SUPERPIXEL_COMPACTNESS,
        channel_axis=None,
        start_label=0,
    )


def region_means(gray: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean intensity of each region 0..labels.max()."""
    return np.asarray(ndimage.mean(gray, labels, index=np.arange(labels.max() + 1)))


def agglomerative(gray: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """Ward clustering of SLIC superpixel mean intensities into len(order) groups; int64 (H, W) labels."""
    k = len(order)

    def segment(image: np.ndarray) -> np.ndarray:
        labels = superpixels(image)
        means = region_means(image, labels)
        if len(np.unique(means)) < k:  # (nearly) constant image: nothing to cluster
            return nearest_centre(image, np.unique(means))
        clusters = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(means[:, None])
        cluster_means = ndimage.mean(means, clusters, index=np.arange(k))
        rank = np.argsort(np.argsort(cluster_means))  # cluster -> intensity group
        return rank[clusters[labels]]

    return groups_to_classes(at_working_size(gray, segment), order)


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
    return groups_to_classes(grown - 1, order)


def otsu_groups(gray: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Otsu's K-level split: (thresholds, groups, mean intensity of each group); empty groups get NaN."""
    thresholds = otsu_thresholds(gray, k)
    groups = np.digitize(gray, thresholds)
    with np.errstate(invalid="ignore"):
        means = np.asarray(ndimage.mean(gray, groups, index=np.arange(k)), dtype=np.float64)
    return thresholds, groups, means


def rag_mean_intensity(gray: np.ndarray, labels: np.ndarray) -> skgraph.RAG:
    """The region adjacency graph ``skimage.graph.rag_mean_color(gray, labels)`` builds, built with numpy.

    Same nodes (with ``labels``, ``pixel count``, ``total color`` and ``mean color``), the same 8-connected
    edges, weighted by the distance of the mean intensities (rag_mean_color's weights are sqrt(3) times these,
    as it keeps three colour channels). rag_mean_color visits every pixel in Python: seconds per 512x512 image.
    """
    n = int(labels.max()) + 1
    index = np.arange(n)
    counts = np.bincount(labels.ravel(), minlength=n).astype(np.float64)
    totals = np.asarray(ndimage.sum_labels(gray, labels, index=index), dtype=np.float64)
    means = totals / np.maximum(counts, 1)
    pairs = [
        (labels[:, :-1], labels[:, 1:]),
        (labels[:-1, :], labels[1:, :]),
        (labels[:-1, :-1], labels[1:, 1:]),
        (labels[:-1, 1:], labels[1:, :-1]),
    ]
    a = np.concatenate([p.ravel() for p, _ in pairs])
    b = np.concatenate([q.ravel() for _, q in pairs])
    touching = a != b
    edges = np.unique(np.sort(np.stack([a[touching], b[touching]], axis=1), axis=1), axis=0)
    rag = skgraph.RAG()
    rag.add_nodes_from(
        (
            int(i),
            {
                "labels": [int(i)],
                "pixel count": counts[i],
                "total color": totals[i : i + 1].copy(),
                "mean color": means[i : i + 1].copy(),
            },
        )
        for i in index
    )
    rag.add_edges_from((int(u), int(v), {"weight": float(abs(means[u] - means[v]))}) for u, v in edges)
    return rag


def region_merging(gray: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """Merging of a SLIC superpixel adjacency graph, the merged regions then Otsu-thresholded."""
    k = len(order)

    def segment(image: np.ndarray) -> np.ndarray:
        thresholds, _groups, means = otsu_groups(image, k)
        gaps = np.diff(means)
        gap = float(np.nanmin(gaps)) if np.isfinite(gaps).any() else 0.0
        labels = superpixels(image)
        merged = skgraph.cut_threshold(labels, rag_mean_intensity(image, labels), REGION_MERGING_GAP * gap)
        return np.digitize(region_means(image, merged), thresholds)[merged]

    return groups_to_classes(at_working_size(gray, segment), order)


TwoPhaseSplit = Callable[[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray], np.ndarray]


def nested_two_phase(gray: np.ndarray, k: int, split: TwoPhaseSplit) -> np.ndarray:
    """K intensity groups from K - 1 two-phase splits, one per boundary between neighbouring Otsu groups.

    ``split(gray, clipped, threshold, dark, bright)`` gets the image, the image clipped to the mean
    intensities of groups r and r + 1, Otsu's threshold between them and the masks of the two Otsu groups; it
    returns the bright side as a boolean mask.
    """
    thresholds, groups, means = otsu_groups(gray, k)
    above = np.zeros(gray.shape, dtype=np.int64)
    for r, threshold in enumerate(thresholds):
        dark, bright = groups == r, groups == r + 1
        if not dark.any() or not bright.any():  # nothing to split: keep Otsu's answer
            above += groups > r
            continue
        clipped = np.clip(gray, means[r], means[r + 1])
        above += split(gray, clipped, float(threshold), dark, bright)
    return above


def chan_vese_split(
    gray: np.ndarray, clipped: np.ndarray, threshold: float, dark: np.ndarray, bright: np.ndarray
) -> np.ndarray:
    """Morphological Chan-Vese started from the Otsu split; the side with the higher mean is returned."""
    phase = morphological_chan_vese(
        clipped, CHAN_VESE_ITERATIONS, init_level_set=clipped > threshold, smoothing=1
    ).astype(bool)
    if phase.all() or not phase.any():
        return phase
    return phase if clipped[phase].mean() >= clipped[~phase].mean() else ~phase


def active_contour(gray: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """Chan-Vese active contour (morphological) into len(order) groups; int64 (H, W) labels."""
    k = len(order)
    return groups_to_classes(
        at_working_size(gray, lambda im: nested_two_phase(im, k, chan_vese_split)), order
    )


def group_gaussian(gray: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """(mean, std) of the intensities of one Otsu group; the std at least 0.1% of the image's range."""
    values = gray[group]
    spread = float(gray.max() - gray.min())
    return float(values.mean()), max(float(values.std()), 1e-3 * spread, 1e-6)


def graph_cut_split(
    gray: np.ndarray, clipped: np.ndarray, threshold: float, dark: np.ndarray, bright: np.ndarray
) -> np.ndarray:
    """Minimum cut between two Gaussian intensity models with a contrast-sensitive 4-neighbour smoothness."""
    # Models from the unclipped pixels (clipping would shrink their spread); costs on the clipped image, so
    # that the wider Gaussian cannot win far out in the other model's tail.
    costs = []
    for group in (dark, bright):
        mean, std = group_gaussian(gray, group)
        costs.append(0.5 * ((clipped - mean) / std) ** 2 + np.log(std))
    dark_cost, bright_cost = (c - np.minimum(*costs) for c in costs)
    right, down = contrast_weights(clipped)  # the interactive graph cut's pairwise term
    g = maxflow.Graph[float]()
    nodes = g.add_grid_nodes(clipped.shape)
    g.add_grid_edges(nodes, weights=GRAPH_CUT_SMOOTHNESS * right, structure=RIGHT, symmetric=True)
    g.add_grid_edges(nodes, weights=GRAPH_CUT_SMOOTHNESS * down, structure=DOWN, symmetric=True)
    # Source side = bright: a pixel left on the source side cuts its sink edge, so pays the bright cost.
    g.add_grid_tedges(nodes, dark_cost, bright_cost)
    g.maxflow()
    return ~g.get_grid_segments(nodes)


def graph_cut(gray: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """Max-flow segmentation with automatically seeded intensity models; int64 (H, W) labels."""
    k = len(order)
    return groups_to_classes(
        at_working_size(gray, lambda im: nested_two_phase(im, k, graph_cut_split)), order
    )


BASELINES: dict[str, Callable[[np.ndarray, Sequence[int]], np.ndarray]] = {
    "otsu": otsu,
    "kmeans": kmeans,
    "fcm": fcm,
    "mean_shift": mean_shift,
    "agglomerative": agglomerative,
    "region_growing": region_growing,
    "region_merging": region_merging,
    "active_contour": active_contour,
    "graph_cut": graph_cut,
}


def parse_methods(text: str) -> tuple[str, ...]:
    """Comma-separated baseline names (``all`` = every one, ``none`` = no baseline), in ``METHODS`` order."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    if names == {"all"}:
        return METHODS
    if names == {"none"}:
        return ()
    unknown = sorted(names - set(METHODS))
    if unknown or not names:
        raise ValueError(
            f"unknown baseline(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(METHODS)}, all or none"
        )
    return tuple(m for m in METHODS if m in names)


def predict(method: str, pixels: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """Runs baseline ``method`` on (H, W, C) pixels with the class ranking ``order``; int64 (H, W) labels."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; known: {METHODS}")
    gray = to_gray(pixels)
    if len(order) < 2:
        return np.full(gray.shape, order[0], dtype=np.int64)
    return BASELINES[method](gray, order)
