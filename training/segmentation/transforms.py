"""One joint image + mask augmentation for segmentation training.

All geometric steps (random crop position, flips, rotation, scaling and the elastic deformation of the U-Net
paper) are composed into a single mapping from output pixels to source coordinates, and image and mask are
sampled through that same mapping, so they can never drift apart. The image is sampled with a cubic spline and
the mask by linear interpolation of each class's indicator followed by the most likely class (as nnU-Net does),
so a warped mask edge lands where the warped image edge does, to a fraction of a pixel; nearest-neighbour
sampling would move it by up to half a pixel, and bilinear image sampling would blur thin structures. Coordinates
that fall outside the image are mirrored, as in the U-Net paper's overlap-tile strategy. Intensity steps
(brightness, contrast, gamma, noise) touch the image only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.inference import FLIPS


@dataclass
class SegmentationAugment:
    """Random crop of ``size`` plus augmentation, applied jointly to an image and its mask.

    The probabilities are moderate on purpose: every geometric warp resamples the image, which slightly
    smooths thin structures even with a cubic spline; about half of the crops stay exact pixel copies, like
    the test images.

    Args:
        size: output (height, width).
        hflip / vflip: probability of a horizontal / vertical flip. Vertical flips are off by default: X-ray
            anatomy has an up and a down, and a flip mirrors any consistent sub-pixel offset of the masks
            (the ISBI labels sit 0.6 px above the membranes), which the model then cannot learn.
        p_affine: probability of a rotation + scaling.
        max_rotation: rotation angle range in degrees (+-).
        scale: (min, max) zoom factor.
        p_elastic: probability of an elastic deformation.
        elastic_sigma: standard deviation, in pixels, of the random displacements on the coarse grid
            (the U-Net paper: 10 pixels on a 3x3 grid, interpolated bicubically).
        elastic_grid: points per side of the coarse displacement grid.
        p_intensity: probability of each of brightness, contrast and gamma changes.
        brightness: additive shift range (+-), on [0, 1] intensities.
        contrast: (min, max) contrast factor around the crop mean.
        gamma: (min, max) gamma exponent.
        p_noise: probability of additive Gaussian noise.
        noise_std: maximum noise standard deviation.
        image_order: spline order of image resampling (1 bilinear, 3 cubic; 0-5).
        mask_order: 0 samples the nearest mask pixel; 1 interpolates each class's indicator linearly and keeps
            the most likely class, which places warped edges to sub-pixel accuracy.
    """

    size: tuple[int, int]
    hflip: float = 0.5
    vflip: float = 0.0
    p_affine: float = 0.3
    max_rotation: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    p_elastic: float = 0.3
    elastic_sigma: float = 10.0
    elastic_grid: int = 3
    p_intensity: float = 0.3
    brightness: float = 0.1
    contrast: tuple[float, float] = (0.8, 1.2)
    gamma: tuple[float, float] = (0.8, 1.25)
    p_noise: float = 0.2
    noise_std: float = 0.03
    image_order: int = 3
    mask_order: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.image_order <= 5 or self.mask_order not in (0, 1):
            raise ValueError(
                f"image_order must be 0-5 and mask_order 0 or 1, got {self.image_order} and {self.mask_order}"
            )
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) >= 1, got {self.size}")
        if self.elastic_grid < 2:
            raise ValueError(f"elastic_grid must be >= 2, got {self.elastic_grid}")
        if self.elastic_sigma < 0 or self.max_rotation < 0 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(
                "elastic_sigma and max_rotation must be >= 0 and scale a (min, max) with 0 < min <= max"
            )

    @classmethod
    def preset(
        cls,
        name: str,
        size: tuple[int, int],
        elastic_sigma: float = 10.0,
        *,
        hflip: bool = True,
        vflip: bool = False,
    ) -> SegmentationAugment:
        """``full`` (everything), ``flips`` (random crops and flips only) or ``none`` (random crops only).

        ``hflip`` / ``vflip`` choose which flips ``full`` and ``flips`` use (each with probability 0.5).
        """
        h, v = (0.5 if hflip else 0.0), (0.5 if vflip else 0.0)
        if name == "full":
            p_elastic = 0.3 if elastic_sigma > 0 else 0.0
            return cls(size, hflip=h, vflip=v, elastic_sigma=elastic_sigma, p_elastic=p_elastic)
        if name == "flips":
            return cls(size, hflip=h, vflip=v, p_affine=0.0, p_elastic=0.0, p_intensity=0.0, p_noise=0.0)
        if name == "none":
            return cls(size, hflip=0.0, vflip=0.0, p_affine=0.0, p_elastic=0.0, p_intensity=0.0, p_noise=0.0)
        raise ValueError(f"unknown augmentation preset {name!r}; use full, flips or none")

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augments one pair.

        Args:
            image: float32 (C, H, W) in [0, 1].
            mask: int64 (H, W) class indices.
            rng: source of all randomness (seed it for reproducible results).

        Returns:
            image float32 (C, h, w) in [0, 1] and mask int64 (h, w), (h, w) = ``size``.
        """
        if image.ndim != 3 or image.shape[1:] != mask.shape:
            raise ValueError(
                f"image (C, H, W) and mask (H, W) must match, got {image.shape} and {mask.shape}"
            )
        coords, (y0, x0) = self._source_coordinates(mask.shape, rng)
        if coords is None:  # pure integer crop: no interpolation needed
            h, w = self.size
            out_img = image[:, y0 : y0 + h, x0 : x0 + w].astype(np.float32, copy=True)
            out_mask = mask[y0 : y0 + h, x0 : x0 + w].copy()
        else:
            out_img = np.stack(
                [ndimage.map_coordinates(ch, coords, order=self.image_order, mode="mirror") for ch in image]
            ).astype(np.float32)
            out_mask = self._warp_mask(mask, coords)
        return self._intensity(out_img, rng), out_mask

    def _warp_mask(self, mask: np.ndarray, coords: np.ndarray) -> np.ndarray:
        """Samples the class-index ``mask`` (H, W) at ``coords`` (2, h, w)."""
        if self.mask_order == 0:
            return ndimage.map_coordinates(mask, coords, order=0, mode="mirror").astype(np.int64)
        # Class indices are >= 0: counting them is linear, np.unique would sort the whole mask per crop.
        labels = np.flatnonzero(np.bincount(mask.ravel()))
        if len(labels) == 1:
            return np.full(coords.shape[1:], labels[0], dtype=np.int64)
        # Linear interpolation of each class's indicator, then the class with the largest share at each pixel.
        shares = np.stack(
            [
                ndimage.map_coordinates((mask == label).astype(np.float32), coords, order=1, mode="mirror")
                for label in labels
            ]
        )
        return labels[np.argmax(shares, axis=0)].astype(np.int64)

    def _source_coordinates(
        self, shape: tuple[int, ...], rng: np.random.Generator
    ) -> tuple[np.ndarray | None, tuple[int, int]]:
        """(2, h, w) source (y, x) coordinates, or None for a plain crop, and the crop's top-left corner."""
        h, w = self.size
        height, width = int(shape[0]), int(shape[1])
        # Integer top-left corner; a crop larger than the image is centred and mirrored beyond its edges.
        y0 = int(rng.integers(0, height - h + 1)) if height >= h else -((h - height) // 2)
        x0 = int(rng.integers(0, width - w + 1)) if width >= w else -((w - width) // 2)
        flip_y = rng.random() < self.vflip
        flip_x = rng.random() < self.hflip
        affine = rng.random() < self.p_affine
        angle = np.deg2rad(rng.uniform(-self.max_rotation, self.max_rotation)) if affine else 0.0
        zoom = rng.uniform(*self.scale) if affine else 1.0
        elastic = rng.random() < self.p_elastic and self.elastic_sigma > 0
        inside = y0 >= 0 and x0 >= 0 and y0 + h <= height and x0 + w <= width
        if not (flip_y or flip_x or affine or elastic) and inside:
            return None, (y0, x0)
        # Output pixel positions relative to the crop centre.
        cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
        yy, xx = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
        if flip_y:
            yy = -yy
        if flip_x:
            xx = -xx
        cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
        sy = cos * yy - sin * xx
        sx = sin * yy + cos * xx
        if elastic:
            g = self.elastic_grid
            for target in (sy, sx):
                coarse = rng.normal(0.0, self.elastic_sigma, size=(g, g))
                target += ndimage.zoom(coarse, (h / g, w / g), order=3, mode="nearest")[:h, :w]
        return np.stack([sy + y0 + cy, sx + x0 + cx]), (y0, x0)

    @property
    def flips(self) -> list[str]:
        """The flips this augmentation applies (``horizontal``, ``vertical``): those test-time augmentation of
        the trained model may average over, recorded in the checkpoint as ``extra["tta_flips"]``."""
        return [name for name, p in zip(FLIPS, (self.hflip, self.vflip), strict=True) if p > 0]

    def _intensity(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < self.p_intensity:
            image = image + rng.uniform(-self.brightness, self.brightness)
        if rng.random() < self.p_intensity:
            mean = image.mean()
            image = (image - mean) * rng.uniform(*self.contrast) + mean
        if rng.random() < self.p_intensity:
            image = np.clip(image, 0.0, 1.0) ** rng.uniform(*self.gamma)
        if rng.random() < self.p_noise:
            image = image + rng.normal(0.0, rng.uniform(0.0, self.noise_std), size=image.shape)
        return np.clip(image, 0.0, 1.0).astype(np.float32)
