"""Synthetic dental phantoms for segmentation, with exact ground truth (``medserve synth dental``).

``generate_dental`` makes dental-X-ray-like images: bright tooth-like shapes (crown and tapering root,
with a darker pulp canal) standing on a darker jaw band, with smooth intensity inhomogeneity, blur (weak
boundaries), low-contrast teeth and noise. The masks are exact (the shapes the image was drawn from), written as
``DIR/images/<stem>.png`` and ``DIR/masks/<stem>.png`` with values 0 / 255, the layout ``medserve train
segment`` reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage


def _smooth_field(rng: np.random.Generator, size: int, grid: int, amplitude: float) -> np.ndarray:
    """A smooth random field around 1.0 (multiplicative intensity inhomogeneity), shape (size, size)."""
    coarse = rng.uniform(-1.0, 1.0, size=(grid, grid))
    field = ndimage.zoom(coarse, size / grid, order=3, mode="nearest")[:size, :size]
    return 1.0 + amplitude * field


def dental_phantom(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic dental-X-ray-like image and its exact tooth mask.

    Args:
        rng: the random generator (all randomness comes from it).
        size: height and width in pixels (>= 32).

    Returns:
        image: uint8 (size, size) grayscale.
        mask: uint8 (size, size), 255 on teeth, 0 elsewhere.
    """
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # normalised coordinates in [0, 1)

    # Jaw: a bright-ish curved band across the image, darker soft tissue / air elsewhere.
    jaw_centre = rng.uniform(0.45, 0.6) + rng.uniform(-0.08, 0.08) * np.cos(np.pi * (xx - 0.5))
    jaw_half = rng.uniform(0.18, 0.28)
    jaw = 1.0 / (1.0 + np.exp(-(jaw_half - np.abs(yy - jaw_centre)) / 0.03))
    background = rng.uniform(0.08, 0.18)
    jaw_level = rng.uniform(0.32, 0.45)
    image = background + (jaw_level - background) * jaw
    # Trabecular bone texture inside the jaw.
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (size, size)), sigma=size / 64)
    image += 0.05 * texture / (texture.std() + 1e-6) * jaw

    # Teeth: crowns above (or below) the jaw band, roots reaching into it.
    mask = np.zeros((size, size), dtype=bool)
    n_teeth = int(rng.integers(3, 6))
    upper = bool(rng.integers(0, 2))  # roots point down (upper jaw) or up
    gap = 1.0 / n_teeth
    for i in range(n_teeth):
        cx = (i + 0.5) * gap + rng.uniform(-0.12, 0.12) * gap
        crown_w = gap * rng.uniform(0.32, 0.45)
        crown_h = rng.uniform(0.09, 0.14)
        root_len = rng.uniform(0.2, 0.32)
        tilt = np.deg2rad(rng.uniform(-12, 12))
        jaw_y = float(np.interp(cx, xx[0], jaw_centre[0]))
        cy = jaw_y - jaw_half * 0.9 if not upper else jaw_y + jaw_half * 0.9
        direction = 1.0 if not upper else -1.0  # +1: root grows downwards
        # Local coordinates: u along the tooth axis (towards the root), v across it.
        dx, dy = xx - cx, yy - cy
        u = direction * (dy * np.cos(tilt) + dx * np.sin(tilt))
        v = dx * np.cos(tilt) - dy * np.sin(tilt)
        crown = (v / crown_w) ** 2 + (u / crown_h) ** 2 <= 1.0
        taper = np.clip(1.0 - u / root_len, 0.0, 1.0) ** 0.6
        root = (u >= 0) & (u <= root_len) & (np.abs(v) <= crown_w * 0.75 * taper)
        tooth = crown | root
        if not tooth.any():
            continue
        contrast = rng.uniform(0.12, 0.45)  # some teeth barely stand out: weak boundaries
        enamel = crown & ((v / (crown_w * 0.8)) ** 2 + ((u + crown_h * 0.2) / (crown_h * 0.8)) ** 2 > 1.0)
        pulp = (
            tooth
            & (np.abs(v) <= crown_w * 0.18 * np.clip(1.0 - u / root_len, 0.2, 1.0))
            & (u > -crown_h * 0.3)
        )
        tooth_img = (
            np.where(tooth, contrast, 0.0) + np.where(enamel, 0.12, 0.0) - np.where(pulp, contrast * 0.6, 0.0)
        )
        image = np.where(tooth, np.maximum(image, jaw_level) + tooth_img, image)
        mask |= tooth

    # Weak boundaries (blur), inhomogeneity, noise.
    image = ndimage.gaussian_filter(image, sigma=rng.uniform(0.8, 2.0) * size / 256)
    image = image * _smooth_field(rng, size, grid=4, amplitude=rng.uniform(0.15, 0.35))
    image = image + rng.normal(0.0, rng.uniform(0.02, 0.05), size=(size, size))
    image = np.clip(image, 0.0, 1.0)
    return (image * 255).round().astype(np.uint8), (mask * 255).astype(np.uint8)


def generate_dental(out_dir: Path, n: int, size: int, seed: int) -> list[Path]:
    """Writes ``n`` dental phantoms to ``out_dir/images`` and ``out_dir/masks``; returns the image paths."""
    images_dir, masks_dir = out_dir / "images", out_dir / "masks"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n):
        # One generator per image: image i is the same whatever n is.
        rng = np.random.default_rng([seed, i])
        image, mask = dental_phantom(rng, size)
        stem = f"dental_{i:04d}"
        Image.fromarray(image).save(images_dir / f"{stem}.png")
        Image.fromarray(mask).save(masks_dir / f"{stem}.png")
        written.append(images_dir / f"{stem}.png")
    return written
