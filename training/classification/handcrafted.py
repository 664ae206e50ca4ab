"""Hand-crafted low- and mid-level image features for the "traditional" baselines of ``medserve eval classify``
(scikit-image): intensity histogram, GLCM texture, local binary patterns and HOG.

Every image is read the way the network reads it (``data.load_image``: the checkpoint's intensity policy and
channel conversion), as gray (luma) and resized to ``TEXTURE_SIZE`` x ``TEXTURE_SIZE``, so the features do not
depend on the network's input size. HOG runs on a 2x2-averaged copy (``HOG_SIZE``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from skimage.feature import graycomatrix, graycoprops, hog, local_binary_pattern
from skimage.transform import downscale_local_mean
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.preprocessing import Preprocessing
from training.classification.data import Sample, load_image

TEXTURE_SIZE = 128
HOG_SIZE = TEXTURE_SIZE // 2
HISTOGRAM_BINS = 32
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 2, 4)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPERTIES = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
# (points, radius) pairs; "uniform" LBP codes take points + 2 values.
LBP_SCALES = ((8, 1), (16, 2))
HOG_ORIENTATIONS = 9
HOG_CELL = 16
HOG_BLOCK = 2

# Lengths of the feature groups, in the order ``image_features`` concatenates them.
FEATURE_GROUPS = {
    "histogram": HISTOGRAM_BINS,
    # Mean and range over the angles of each property at each distance (Haralick's rotation-invariant pair).
    "glcm": 2 * len(GLCM_PROPERTIES) * len(GLCM_DISTANCES),
    "lbp": sum(points + 2 for points, _ in LBP_SCALES),
    "hog": (HOG_SIZE // HOG_CELL - HOG_BLOCK + 1) ** 2 * HOG_BLOCK**2 * HOG_ORIENTATIONS,
}
N_FEATURES = sum(FEATURE_GROUPS.values())


def image_features(gray: np.ndarray) -> np.ndarray:
    """The (``N_FEATURES``,) float32 feature vector of a (``TEXTURE_SIZE``, ``TEXTURE_SIZE``) gray image in [0, 1]."""
    if gray.shape != (TEXTURE_SIZE, TEXTURE_SIZE):
        raise ValueError(f"expected a {TEXTURE_SIZE}x{TEXTURE_SIZE} gray image, got {gray.shape}")
    gray = np.clip(gray, 0.0, 1.0)
    histogram = np.histogram(gray, bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0] / gray.size

    quantised = np.minimum(gray * GLCM_LEVELS, GLCM_LEVELS - 1).astype(np.uint8)
    glcm = graycomatrix(
        quantised, GLCM_DISTANCES, GLCM_ANGLES, levels=GLCM_LEVELS, symmetric=True, normed=True
    )
    props = np.stack([graycoprops(glcm, p) for p in GLCM_PROPERTIES])  # (properties, distances, angles)
    texture = np.concatenate([props.mean(axis=2).ravel(), np.ptp(props, axis=2).ravel()])

    # LBP compares neighbours for equality, so it gets integer gray levels (floats would make noise codes).
    gray8 = np.round(gray * 255).astype(np.uint8)
    lbp = []
    for points, radius in LBP_SCALES:
        codes = local_binary_pattern(gray8, points, radius, method="uniform")
        lbp.append(np.bincount(codes.astype(np.int64).ravel(), minlength=points + 2) / codes.size)

    shape = hog(
        downscale_local_mean(gray, (2, 2)),
        orientations=HOG_ORIENTATIONS,
        pixels_per_cell=(HOG_CELL, HOG_CELL),
        cells_per_block=(HOG_BLOCK, HOG_BLOCK),
        feature_vector=True,
    )
    # GLCM correlation is NaN on a constant image; 0 says "no linear dependence" there.
    features = np.concatenate([histogram, texture, *lbp, shape]).astype(np.float32)
    return np.nan_to_num(features, nan=0.0)


def gray_spec(spec: Preprocessing) -> Preprocessing:
    """The checkpoint's reading path (intensity policy) with gray output at the texture size."""
    return Preprocessing(
        in_channels=1, img_size=(TEXTURE_SIZE, TEXTURE_SIZE), resize="resize", intensity=spec.intensity
    )


class HandcraftedFeatures(Dataset[tuple[torch.Tensor, int]]):
    """Yields (``image_features`` of one image as a tensor, label)."""

    def __init__(self, samples: Sequence[Sample], spec: Preprocessing) -> None:
        self.samples = list(samples)
        self.spec = gray_spec(spec)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        gray = load_image(sample.path, self.spec)[0].numpy()
        return torch.from_numpy(image_features(gray)), sample.label


def extract_handcrafted(
    samples: Sequence[Sample],
    spec: Preprocessing,
    workers: int = 0,
    progress: bool = False,
    desc: str = "hand-crafted features",
) -> tuple[np.ndarray, np.ndarray]:
    """Hand-crafted features (N, ``N_FEATURES``) and labels (N,) of the samples, read with the checkpoint's
    ``spec``; ``workers`` processes compute them in parallel (0: in this process)."""
    loader: DataLoader[Any] = DataLoader(
        HandcraftedFeatures(samples, spec), batch_size=32, shuffle=False, num_workers=workers
    )
    feats, labels = [], []
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        feats.append(x.numpy())
        labels.append(y.numpy())
    if not feats:
        return np.zeros((0, N_FEATURES), np.float32), np.zeros(0, np.int64)
    return np.concatenate(feats), np.concatenate(labels)
