import numpy as np
import pytest
from scipy import ndimage

from training.segmentation.transforms import SegmentationAugment


def _pair(h=80, w=96, seed=0):
    """An image whose intensity encodes its mask: label c has intensity 0.15 + 0.35 * c."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), dtype=np.int64)
    for label in (1, 2):
        for _ in range(3):
            cy, cx, r = rng.integers(5, h - 5), rng.integers(5, w - 5), rng.integers(4, 12)
            yy, xx = np.ogrid[:h, :w]
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = label
    image = (0.15 + 0.35 * mask).astype(np.float32)[None]
    return image, mask


def _labels_from_intensity(image):
    return np.digitize(image[0], [0.325, 0.675])


@pytest.mark.parametrize("seed", range(8))
def test_image_and_mask_move_together(seed):
    image, mask = _pair()
    augment = SegmentationAugment(
        (48, 64),
        hflip=0.5,
        vflip=0.5,
        p_affine=1.0,
        max_rotation=30,
        p_elastic=1.0,
        elastic_sigma=8,
        p_intensity=0,
    )
    out_img, out_mask = augment(image, mask, np.random.default_rng(seed))
    assert out_img.shape == (1, 48, 64) and out_mask.shape == (48, 64)
    assert out_img.dtype == np.float32 and out_mask.dtype == np.int64
    assert set(np.unique(out_mask)) <= {0, 1, 2}
    agree = _labels_from_intensity(out_img) == out_mask
    # Interpolated image and mask may differ only on a thin band along label boundaries.
    boundary = ndimage.binary_dilation(ndimage.morphological_gradient(out_mask, size=3) > 0, iterations=1)
    assert agree[~boundary].all()
    assert agree.mean() > 0.95


def test_geometry_actually_changes_and_is_seedable():
    image, mask = _pair()
    augment = SegmentationAugment((64, 64))
    a = augment(image, mask, np.random.default_rng(3))
    b = augment(image, mask, np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    outputs = {augment(image, mask, np.random.default_rng(s))[1].tobytes() for s in range(10)}
    assert len(outputs) > 5


def _flips_applied(augment, image, seeds=40):
    """Which mirrorings of ``image`` the augmentation produced (its crop size is the whole image)."""
    kinds = {
        "none": image,
        "vertical": image[:, ::-1, :],
        "horizontal": image[:, :, ::-1],
        "both": image[:, ::-1, ::-1],
    }
    mask = np.zeros(image.shape[1:], dtype=np.int64)
    seen = set()
    for seed in range(seeds):
        out, _ = augment(image, mask, np.random.default_rng(seed))
        seen |= {name for name, ref in kinds.items() if np.allclose(out, ref, atol=1e-6)}
    return seen


def test_vertical_flips_are_off_by_default_and_can_be_chosen():
    image = np.random.default_rng(0).random((1, 24, 20)).astype(np.float32)
    assert _flips_applied(SegmentationAugment.preset("flips", (24, 20)), image) == {"none", "horizontal"}
    assert _flips_applied(SegmentationAugment.preset("flips", (24, 20), hflip=False, vflip=True), image) == {
        "none",
        "vertical",
    }
    both = SegmentationAugment.preset("flips", (24, 20), vflip=True)
    assert _flips_applied(both, image) == {"none", "vertical", "horizontal", "both"}
    full = SegmentationAugment.preset("full", (24, 20))
    assert full.hflip == 0.5 and full.vflip == 0.0 and full.p_elastic > 0


def test_plain_crop_is_an_exact_window():
    image, mask = _pair()
    out_img, out_mask = SegmentationAugment.preset("none", (32, 40))(image, mask, np.random.default_rng(0))
    # Find the window: the crop must equal some exact sub-array of the input.
    found = [
        (y, x)
        for y in range(80 - 32 + 1)
        for x in range(96 - 40 + 1)
        if np.array_equal(mask[y : y + 32, x : x + 40], out_mask)
        and np.array_equal(image[:, y : y + 32, x : x + 40], out_img)
    ]
    assert found


def test_crop_larger_than_image_mirrors_and_keeps_pairs():
    image, mask = _pair(h=30, w=24)
    out_img, out_mask = SegmentationAugment((64, 48), p_intensity=0, p_noise=0)(
        image, mask, np.random.default_rng(1)
    )
    assert out_img.shape == (1, 64, 48)
    agree = _labels_from_intensity(out_img) == out_mask
    assert agree.mean() > 0.95


def test_intensity_changes_touch_the_image_only():
    image, mask = _pair()
    augment = SegmentationAugment(
        (40, 40), p_affine=0, p_elastic=0, hflip=0, vflip=0, p_intensity=1.0, p_noise=1.0
    )
    plain = SegmentationAugment.preset("none", (40, 40))
    out_img, out_mask = augment(image, mask, np.random.default_rng(2))
    ref_img, ref_mask = plain(image, mask, np.random.default_rng(2))
    assert np.array_equal(out_mask, ref_mask)
    assert not np.allclose(out_img, ref_img)
    assert out_img.min() >= 0 and out_img.max() <= 1


def test_bad_configuration_raises():
    with pytest.raises(ValueError):
        SegmentationAugment((0, 10))
    with pytest.raises(ValueError):
        SegmentationAugment((10, 10), scale=(1.2, 0.9))
    with pytest.raises(ValueError):
        SegmentationAugment.preset("heavy", (10, 10))
    with pytest.raises(ValueError, match="mask_order"):
        SegmentationAugment((10, 10), mask_order=2)
    with pytest.raises(ValueError, match="image_order"):
        SegmentationAugment((10, 10), image_order=6)
    with pytest.raises(ValueError, match="must match"):
        SegmentationAugment((8, 8))(
            np.zeros((1, 10, 10), np.float32), np.zeros((9, 10), np.int64), np.random.default_rng()
        )


def _warps(augment, shape, seeds=40):
    """Source coordinates of ``seeds`` random warps (rotation + scaling) of an image of ``shape``."""
    for seed in range(seeds):
        coords, _ = augment._source_coordinates(shape, np.random.default_rng(seed))
        assert coords is not None
        yield coords


def test_warped_mask_edges_follow_the_true_shape_more_closely_than_nearest_sampling():
    # A disc at a sub-pixel centre, rasterised at pixel centres; after a rotation + scaling, the exact answer
    # is the disc evaluated at each output pixel's source position.
    cy, cx, r = 60.3, 64.7, 25.4
    yy, xx = np.mgrid[0:128, 0:128]
    mask = (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2).astype(np.int64)
    errors = {}
    for order in (0, 1):
        augment = SegmentationAugment((96, 96), p_affine=1.0, p_elastic=0.0, mask_order=order)
        errors[order] = sum(
            int((augment._warp_mask(mask, c) != (((c[0] - cy) ** 2 + (c[1] - cx) ** 2) < r**2)).sum())
            for c in _warps(augment, mask.shape)
        )
    # Nearest sampling leaves stair steps up to half a pixel off the edge; interpolating the indicator does not.
    assert errors[1] < 0.85 * errors[0]


def test_warped_multi_class_mask_keeps_its_labels():
    _, mask = _pair()
    linear = SegmentationAugment((48, 64), p_affine=1.0, p_elastic=1.0, p_intensity=0)
    nearest = SegmentationAugment((48, 64), p_affine=1.0, p_elastic=1.0, p_intensity=0, mask_order=0)
    for coords in _warps(linear, mask.shape, seeds=5):
        warped = linear._warp_mask(mask, coords)
        reference = nearest._warp_mask(mask, coords)
        assert warped.dtype == np.int64 and set(np.unique(warped)) == set(np.unique(reference))
        # The two samplings disagree only where a pixel straddles a class boundary.
        assert (warped == reference).mean() > 0.95
    uniform = np.full((20, 20), 2, dtype=np.int64)
    assert (linear._warp_mask(uniform, np.zeros((2, 4, 4))) == 2).all()


def test_cubic_image_sampling_keeps_thin_structures_sharper_than_bilinear():
    # One-pixel dark lines, as membranes are: bilinear resampling smears them, which the test images never are.
    image = np.ones((1, 128, 128), dtype=np.float32)
    image[0, :, 8::12] = 0.0
    mask = np.zeros((128, 128), dtype=np.int64)
    depth = {}
    for order in (1, 3):
        augment = SegmentationAugment(
            (96, 96), p_affine=1.0, p_elastic=0.0, p_intensity=0.0, p_noise=0.0, image_order=order
        )
        outputs = [augment(image, mask, np.random.default_rng(seed))[0] for seed in range(20)]
        # How dark the lines stay: the mean of the darkest 5 % of pixels (lower is sharper).
        depth[order] = float(np.mean([np.quantile(out, 0.05) for out in outputs]))
    assert depth[3] < depth[1] - 0.02
