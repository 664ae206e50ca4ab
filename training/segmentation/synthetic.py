"""Synthetic phantoms for segmentation, with exact ground truth (``medserve synth dental`` and ``chest``).

``generate_dental`` makes dental-X-ray-like images: bright tooth-like shapes (crown and tapering root,
with a darker pulp canal) standing on a darker jaw band, with smooth intensity inhomogeneity, blur (weak
boundaries), low-contrast teeth and noise. The masks are exact (the shapes the image was drawn from), written as
``DIR/images/<stem>.png`` and ``DIR/masks/<stem>.png`` with values 0 / 255, the layout ``medserve train
segment`` reads.

``generate_chest`` (``medserve synth chest``) makes chest-X-ray-like images of mixed sizes (long sides from a
fifth of ``--size`` up to it, varied aspect ratios) with exact lung masks: the large, mixed-resolution case that
``--scale fit`` is for.
"""

from __future__ import annotations

from collections.abc import Callable
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


def write_phantom_set(
    out_dir: Path,
    n: int,
    stem: str,
    draw: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]],
    seed: int,
) -> list[Path]:
    """Writes ``n`` (image, mask) pairs drawn by ``draw`` to ``out_dir/images`` and ``out_dir/masks`` as
    ``<stem>_NNNN.png``; returns the image paths. Pair i uses its own generator seeded with (seed, i), so image i
    is the same whatever ``n`` is."""
    images_dir, masks_dir = out_dir / "images", out_dir / "masks"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n):
        image, mask = draw(np.random.default_rng([seed, i]))
        name = f"{stem}_{i:04d}.png"
        Image.fromarray(image).save(images_dir / name)
        Image.fromarray(mask).save(masks_dir / name)
        written.append(images_dir / name)
    return written


def generate_dental(out_dir: Path, n: int, size: int, seed: int) -> list[Path]:
    """Writes ``n`` dental phantoms to ``out_dir/images`` and ``out_dir/masks``; returns the image paths."""
    return write_phantom_set(out_dir, n, "dental", lambda rng: dental_phantom(rng, size), seed)


# Chest phantoms: long sides drawn log-uniformly from [size / CHEST_SIZE_RANGE, size], aspect (width / height)
# from CHEST_ASPECTS, so one set mixes resolutions as real chest X-ray collections do (255-3,670 px).
CHEST_SIZE_RANGE = 5.0
CHEST_ASPECTS = (0.8, 1.25)


def _coarse_field(rng: np.random.Generator, shape: tuple[int, int], grid: int) -> np.ndarray:
    """A smooth random field in about [-1, 1] of ``shape``: a ``grid`` x ``grid`` field upsampled bicubically."""
    coarse = rng.uniform(-1.0, 1.0, size=(grid, grid))
    zoomed = ndimage.zoom(coarse, (shape[0] / grid, shape[1] / grid), order=3, mode="nearest", grid_mode=True)
    return zoomed[: shape[0], : shape[1]].astype(np.float32)


def chest_phantom(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic chest-X-ray-like image of (height, width) and its exact lung mask.

    Two dark, irregular lung fields lie inside a brighter body, over soft dark air; a bright heart shadow
    overlaps the lower inner part of the left lung (and is not lung in the mask), ribs cross the lungs as
    bright curved bands, and blur, a smooth inhomogeneity and noise finish it. Everything is drawn in
    coordinates relative to the image, so the anatomy has the same proportions at every resolution.

    Returns:
        image: uint8 (height, width) grayscale.
        mask: uint8 (height, width), 255 on lungs, 0 elsewhere.
    """
    if min(height, width) < 32:
        raise ValueError(f"height and width must be >= 32, got {height}x{width}")
    yy = (np.arange(height, dtype=np.float32) / height)[:, None]
    xx = (np.arange(width, dtype=np.float32) / width)[None, :]
    shape = (height, width)

    air = rng.uniform(0.03, 0.12)
    body_level = rng.uniform(0.5, 0.68)
    body_half = rng.uniform(0.4, 0.47)
    body = 1.0 / (1.0 + np.exp(-(body_half - np.abs(xx - 0.5) - 0.1 * yy**2) / 0.02))
    image = air + (body_level - air) * body * np.ones(shape, dtype=np.float32)

    # Lungs: ellipses deformed by a low-frequency radial perturbation, a flatter dome at the bottom.
    lungs = np.zeros(shape, dtype=bool)
    centre_y = rng.uniform(0.42, 0.52)
    for side in (-1.0, 1.0):
        cx = 0.5 + side * rng.uniform(0.17, 0.22)
        cy = centre_y + rng.uniform(-0.03, 0.03)
        ax, ay = rng.uniform(0.11, 0.15), rng.uniform(0.24, 0.32)
        dx, dy = (xx - cx) / ax, (yy - cy) / ay
        angle = np.arctan2(dy, dx)
        radius = 1.0 + sum(
            rng.uniform(-0.08, 0.08) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)
        )
        lungs |= dx**2 + (dy * np.where(dy > 0, 1.15, 1.0)) ** 2 <= radius**2
    heart = ((xx - rng.uniform(0.53, 0.58)) / rng.uniform(0.12, 0.16)) ** 2 + (
        (yy - rng.uniform(0.64, 0.7)) / rng.uniform(0.12, 0.16)
    ) ** 2 <= 1.0
    lungs &= ~heart
    lung_level = rng.uniform(0.15, 0.32)
    # Vessel-like texture inside the lungs, at a scale relative to the image.
    texture = _coarse_field(rng, shape, grid=24)
    image = np.where(lungs, lung_level + 0.05 * texture, image)
    image = np.where(heart, np.maximum(image, body_level + rng.uniform(0.0, 0.1)), image)

    # Ribs: bright bands curving down towards the sides, over lungs and body alike.
    period = rng.uniform(0.06, 0.085)
    phase = yy - 0.25 * (xx - 0.5) ** 2 + rng.uniform(0, period)
    ribs = np.cos(2 * np.pi * phase / period) > 0.55
    image = image + rng.uniform(0.05, 0.14) * (ribs & (body > 0.5))

    image = ndimage.gaussian_filter(image, sigma=rng.uniform(0.8, 2.0) * max(height, width) / 512)
    image = image * (1.0 + rng.uniform(0.1, 0.3) * _coarse_field(rng, shape, grid=4))
    image = image + rng.normal(0.0, rng.uniform(0.015, 0.04), size=shape).astype(np.float32)
    image = np.clip(image, 0.0, 1.0)
    return (image * 255).round().astype(np.uint8), lungs.astype(np.uint8) * 255


def chest_size(rng: np.random.Generator, largest: int) -> tuple[int, int]:
    """(height, width) of one chest phantom: long side log-uniform in [largest / CHEST_SIZE_RANGE, largest]."""
    long_side = float(np.exp(rng.uniform(np.log(largest / CHEST_SIZE_RANGE), np.log(largest))))
    aspect = rng.uniform(*CHEST_ASPECTS)  # width / height
    if aspect >= 1:
        return max(32, round(long_side / aspect)), max(32, round(long_side))
    return max(32, round(long_side)), max(32, round(long_side * aspect))


def generate_chest(out_dir: Path, n: int, size: int, seed: int) -> list[Path]:
    """Writes ``n`` chest phantoms of mixed sizes (long side up to ``size``) to ``out_dir/images`` and
    ``out_dir/masks``; returns the image paths."""
    return write_phantom_set(
        out_dir, n, "chest", lambda rng: chest_phantom(rng, *chest_size(rng, size)), seed
    )
