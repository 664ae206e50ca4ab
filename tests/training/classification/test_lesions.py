"""The lesion phantom: layout, determinism, and the shape difference between the classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from training.classification.lesions import (
    CLASSES,
    generate_lesion_dataset,
    generate_lesions,
    render_lesion,
    render_lesion_with_mask,
)


def test_dataset_layout_is_what_training_reads(tmp_path: Path) -> None:
    out = generate_lesion_dataset(tmp_path / "lesions", 3, size=40, seed=0)
    assert sorted(p.name for p in out.iterdir()) == ["benign", "malignant"]
    for name in CLASSES:
        files = sorted((out / name).glob("*.png"))
        assert len(files) == 3
        with Image.open(files[0]) as img:
            assert img.mode == "L" and img.size == (40, 40)


def test_same_seed_same_images_other_seed_other_images(tmp_path: Path) -> None:
    a = generate_lesion_dataset(tmp_path / "a", 2, size=32, seed=5)
    b = generate_lesion_dataset(tmp_path / "b", 2, size=32, seed=5)
    c = generate_lesion_dataset(tmp_path / "c", 2, size=32, seed=6)
    name = "malignant/malignant_0001.png"
    assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / name).read_bytes() != (c / name).read_bytes()


def test_synthetic_generator_signature(tmp_path: Path) -> None:
    paths = generate_lesions(tmp_path, 2, 32, 0)
    assert len(paths) == 4 and all(p.exists() for p in paths)


def _compactness(image: np.ndarray) -> float:
    """perimeter^2 / (4 pi area) of the brightest blob: 1 for a disc, larger for irregular outlines."""
    smooth = ndimage.gaussian_filter(image.astype(float), 1.0)
    mask = smooth > (np.median(smooth) + smooth.max()) / 2
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    blob = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    perimeter = (blob & ~ndimage.binary_erosion(blob)).sum()
    return float(perimeter**2 / (4 * np.pi * blob.sum()))


def test_malignant_outlines_are_irregular_benign_ones_round() -> None:
    benign = [_compactness(render_lesion(np.random.default_rng([1, 0, i]), 64, False)) for i in range(30)]
    malignant = [_compactness(render_lesion(np.random.default_rng([1, 1, i]), 64, True)) for i in range(30)]
    assert np.median(malignant) > 1.2 * np.median(benign)
    assert roc_auc_score([0] * 30 + [1] * 30, benign + malignant) > 0.85


@pytest.mark.parametrize("malignant", [False, True])
def test_the_mask_is_where_the_lesion_is_drawn(malignant: bool) -> None:
    """The same image as render_lesion, and a mask that is brighter than the rest of the image by the lesion's
    contrast (0.18 to 0.35 of the range)."""
    for index in range(5):
        image, mask = render_lesion_with_mask(
            np.random.default_rng([2, int(malignant), index]), 64, malignant
        )
        assert np.array_equal(
            image, render_lesion(np.random.default_rng([2, int(malignant), index]), 64, malignant)
        )
        assert mask.dtype == bool and mask.shape == (64, 64)
        assert 0.02 < mask.mean() < 0.3
        labels, count = ndimage.label(mask)
        assert count >= 1 and np.bincount(labels.ravel())[1:].max() > 0.8 * mask.sum()  # one main blob
        assert image[mask].mean() - image[~mask].mean() > 0.12 * 255


def test_too_small_or_empty_requests_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        render_lesion(np.random.default_rng(0), 16, True)
    with pytest.raises(ValueError, match="n_per_class"):
        generate_lesion_dataset(tmp_path, 0)
