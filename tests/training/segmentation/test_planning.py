"""The planner: from a data set's fingerprint to the scale, sizes and steps, with reasons."""

import numpy as np
import pytest

from training.segmentation import data as D
from training.segmentation import planning
from training.segmentation.planning import fingerprint, plan, structure_width


def _membranes(size: int, spacing: int = 32, width: int = 5) -> np.ndarray:
    """An ISBI-like label map: class 0 membranes ``width`` px wide on a grid, class 1 cells."""
    mask = np.ones((size, size), dtype=np.int64)
    for start in range(0, size, spacing):
        mask[start : start + width] = 0
        mask[:, start : start + width] = 0
    return mask


def _lungs(height: int, width: int) -> np.ndarray:
    """Two large ellipses (class 1), proportional to the image."""
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    lungs = ((xx - 0.3) / 0.13) ** 2 + ((yy - 0.5) / 0.3) ** 2 <= 1
    lungs |= ((xx - 0.7) / 0.13) ** 2 + ((yy - 0.5) / 0.3) ** 2 <= 1
    return lungs.astype(np.int64)


def _images(masks):
    return [np.zeros((*m.shape, 1), dtype=np.float32) for m in masks]


def _plan(masks, **kw):
    fp = fingerprint(_images(masks), masks, ["background", "foreground"], 1)
    kw.setdefault("device", "cpu")
    return plan(fp, [m.shape for m in masks], **kw)


def test_structure_width_is_a_bands_width_and_half_a_discs_diameter():
    band = np.zeros((100, 100), dtype=np.int64)
    band[:, 40:46] = 1
    assert structure_width(band, 1) == pytest.approx(6.0)
    yy, xx = np.mgrid[0:200, 0:200]
    disc = (((yy - 100) ** 2 + (xx - 100) ** 2) <= 40**2).astype(np.int64)
    assert structure_width(disc, 1) == pytest.approx(40, rel=0.15)
    assert structure_width(np.zeros((5, 5), dtype=np.int64), 1) is None  # absent
    assert structure_width(np.ones((5, 5), dtype=np.int64), 1) is None  # no boundary


def test_isbi_like_slices_stay_native_with_todays_defaults():
    masks = [_membranes(512) for _ in range(27)]
    p = _plan(masks)
    assert p.scale == "native" and p.working_size is None
    assert p.patch_size == (256, 256) and p.batch_size == 4 and p.tiles
    # 512 x 512 slices are covered by 4 crops of 256 x 256: 27 x 4, as before the cap.
    assert p.samples_per_epoch == 108 and p.steps_per_epoch == 27
    assert "native scale keeps every pixel" in p.reasons[0]
    assert p.fingerprint.smallest_structure is not None
    assert p.fingerprint.smallest_structure.name == "background"
    assert p.fingerprint.smallest_structure.width_px == pytest.approx(5, abs=1)


def test_thin_structures_keep_large_mixed_images_native():
    # Large and mixed, but 5-px membranes would be under a pixel at a 256-px working size.
    masks = [_membranes(1024), _membranes(600), _membranes(2048)]
    p = _plan(masks)
    assert p.scale == "native"
    assert "would destroy them" in p.reasons[0] and "class 'background'" in p.reasons[0]
    # At native scale, large images are capped at MAX_CROPS_PER_IMAGE crops each.
    assert p.samples_per_epoch == 3 * D.MAX_CROPS_PER_IMAGE
    # Asking for fit anyway is obeyed, with a warning among the reasons.
    forced = _plan(masks, scale="fit")
    assert forced.scale == "fit" and any(r.startswith("warning:") for r in forced.reasons)


def test_demo_like_phantoms_stay_native():
    masks = [_lungs(192, 192) for _ in range(40)]
    p = _plan(masks, img_size=(128, 128), batch_size=8, samples_per_epoch=96)
    assert p.scale == "native" and p.patch_size == (128, 128) and p.batch_size == 8
    assert p.samples_per_epoch == 96 and p.steps_per_epoch == 12
    assert "spread 1.00x" in p.reasons[0]


def test_large_mixed_x_rays_are_fitted_to_one_window_on_cpu():
    masks = [_lungs(h, w) for h, w in [(640, 600), (1400, 1500), (2800, 2600), (900, 1000)]]
    p = _plan(masks)
    assert p.scale == "fit" and p.working_size == (240, 256)
    assert p.patch_size == p.working_size and not p.tiles and p.batch_size == 4
    assert p.samples_per_epoch == 4 * planning.FIT_SAMPLES_PER_IMAGE and p.steps_per_epoch == 1
    assert "spread by more than 1.5x" in p.reasons[0] and "fitting keeps them" in p.reasons[1]
    stored = p.as_json()
    assert set(stored) == {
        "scale", "requested", "device", "working_size", "patch_size", "batch_size", "tiles",
        "samples_per_epoch", "steps_per_epoch", "reasons", "fingerprint",
    }  # fmt: skip
    assert stored["working_size"] == [240, 256] and stored["fingerprint"]["max_long_side"] == 2800
    assert stored["fingerprint"]["spread"] == pytest.approx(2800 / 640, abs=1e-3)
    assert "working size 240x256" in planning.describe(stored)


def test_cuda_works_larger_and_target_and_patch_sizes_are_honoured():
    masks = [_lungs(h, w) for h, w in [(1400, 1400), (2800, 2800), (700, 700)]]
    assert _plan(masks, device="cuda").working_size == (512, 512)
    exact = _plan(masks, target_size=(320, 384))
    assert exact.working_size == (320, 384) and exact.tiles  # over a CPU patch: crops and tiling
    assert exact.patch_size == planning.DEFAULT_PATCH
    long_side = _plan(masks, target_size=(128,), img_size=(64, 64))
    assert long_side.working_size == (128, 128) and long_side.patch_size == (64, 64) and long_side.tiles
    native = _plan(masks, scale="native")
    assert native.scale == "native" and native.reasons[0].startswith("--scale native was asked for")


def test_native_crops_per_epoch_are_capped_per_image():
    assert D.default_samples_per_epoch([(512, 512)] * 22, (256, 256)) == 88
    assert D.default_samples_per_epoch([(3000, 2500), (100, 100)], (256, 256)) == D.MAX_CROPS_PER_IMAGE + 1
    assert D.default_samples_per_epoch([(3000, 2500)], (256, 256), max_per_image=1000) == 115


def test_the_working_size_grows_to_keep_narrow_structures_and_then_tiles():
    masks = []
    for size in (1000, 2000, 600):
        band = np.zeros((size, size), dtype=np.int64)
        band[:, size // 2 : size // 2 + size // 50] = 1  # 2% of the width
        masks.append(band)
    p = _plan(masks)
    # 8 px at 2% of the long side needs a 400 px working size: over a CPU patch, so 256 crops and tiling.
    assert p.scale == "fit" and p.working_size == (400, 400)
    assert p.patch_size == planning.DEFAULT_PATCH and p.tiles
    assert "training takes 256x256 crops and inference tiles" in p.reasons[2]
