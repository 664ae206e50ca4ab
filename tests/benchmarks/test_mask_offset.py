import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import mask_offset


def _membranes(seed=0, size=96):
    """Dark, smooth, thin-walled structures on a bright background, and their exact mask."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(size, size)), 4)
    walls = np.abs(field) < 0.25 * field.std()
    gray = np.where(walls, 0.2, 0.8) + rng.normal(0, 0.02, (size, size))
    return gray, walls


@pytest.mark.parametrize(("dy", "dx"), [(0, 0), (1, 0), (0, -1), (-2, 1)])
def test_mask_offset_finds_a_known_shift_of_the_mask(dy, dx):
    gray, walls = _membranes()
    # Mask drawn (dy, dx) away from the structure: moving it by (dy, dx) aligns it again.
    mask = np.roll(walls, (-dy, -dx), axis=(0, 1))
    found = mask_offset.mask_offset(gray, mask)
    assert found == pytest.approx((dy, dx), abs=0.25)


def test_bright_classes_are_aligned_too():
    gray, walls = _membranes(seed=1)
    found = mask_offset.mask_offset(gray, np.roll(~walls, 1, axis=1))
    assert found == pytest.approx((0, -1), abs=0.25)


def test_output_offset_grid_points_at_the_shift_that_undoes_a_displaced_prediction():
    _, walls = _membranes(seed=2)
    probabilities = ndimage.gaussian_filter(np.roll(walls, 1, axis=0).astype(float), 0.7)
    rows = mask_offset.output_offsets([probabilities], [walls], [-1.0, -0.5, 0.0, 0.5, 1.0])
    best = max(rows, key=lambda r: r["dice"])
    assert (best["dy"], best["dx"]) == (-1.0, 0.0)
    unshifted = next(r for r in rows if r["dy"] == 0 and r["dx"] == 0)
    assert best["dice"] > unshifted["dice"] + 0.1
