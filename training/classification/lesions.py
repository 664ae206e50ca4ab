"""Synthetic phantom lesions for classification: round and smooth (``benign``) vs irregular and spiculated
(``malignant``), on a noisy, textured background.

The two classes follow the classic radiological signs: a benign mass is round or oval with a smooth, well-defined
margin; a malignant one has an irregular, lobulated outline with thin spicules radiating from it. Size, position,
contrast, texture and noise vary within both classes, so only the shape of the margin tells them apart.

``generate_lesion_dataset(out_dir, n_per_class, size, seed)`` writes ``out_dir/<class>/<class>_NNNN.png`` (8-bit
gray), the layout ``medserve train classify`` reads. Every image depends only on (seed, class, index).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

CLASSES = ("benign", "malignant")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Soft-tissue-like texture: smoothed noise at two scales around a mid-gray level, (size, size)."""
    coarse = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=size / 10)
    fine = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=max(1.0, size / 40))
    coarse /= coarse.std() + 1e-8
    fine /= fine.std() + 1e-8
    return rng.uniform(0.25, 0.4) + 0.05 * coarse + 0.03 * fine


def _radius_profile(rng: np.random.Generator, theta: np.ndarray, r0: float, malignant: bool) -> np.ndarray:
    """Outline radius r(theta): a smooth ellipse (benign) or a lobulated, irregular curve (malignant)."""
    ecc = rng.uniform(0.0, 0.2)
    r = 1.0 + ecc * np.cos(2.0 * (theta - rng.uniform(0, np.pi)))
    if malignant:
        for harmonic in range(3, 10):
            r += rng.uniform(0.03, 0.09) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
    else:
        r += rng.uniform(0.0, 0.03) * np.cos(3 * theta + rng.uniform(0, 2 * np.pi))
    return r0 * r


def _segment_distance(yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the segment p0-p1 (points as (y, x))."""
    d = p1 - p0
    t = ((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-8)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def render_lesion(rng: np.random.Generator, size: int, malignant: bool) -> np.ndarray:
    """One phantom image.

    Args:
        rng: the random generator (all randomness comes from it).
        size: height and width in pixels (>= 32).
        malignant: irregular spiculated lesion if True, round smooth lesion if False.

    Returns:
        uint8 (size, size) grayscale image.
    """
    return render_lesion_with_mask(rng, size, malignant)[0]


def render_lesion_with_mask(
    rng: np.random.Generator, size: int, malignant: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom image (as ``render_lesion``, from the same random draws) and where its lesion is: the
    (size, size) bool mask of the pixels at least half covered by the lesion (margin blur included), e.g. to
    check where an explanation map puts the evidence."""
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = size / 2 + rng.uniform(-size / 8, size / 8, size=2)
    r0 = size * rng.uniform(0.12, 0.2)
    theta = np.arctan2(yy - cy, xx - cx)
    rho = np.hypot(yy - cy, xx - cx)
    lesion = (rho <= _radius_profile(rng, theta, r0, malignant)).astype(np.float64)
    if malignant:
        for angle in rng.uniform(0, 2 * np.pi, size=rng.integers(6, 13)):
            start = np.array([cy + 0.7 * r0 * np.sin(angle), cx + 0.7 * r0 * np.cos(angle)])
            length = r0 * rng.uniform(0.6, 1.3)
            bend = angle + rng.uniform(-0.25, 0.25)
            end = start + length * np.array([np.sin(bend), np.cos(bend)])
            width = size / 128 * rng.uniform(0.6, 1.2)
            lesion = np.maximum(lesion, (_segment_distance(yy, xx, start, end) <= width).astype(np.float64))
    # A smooth margin is blurred more; malignant margins stay sharp and ragged.
    lesion = ndimage.gaussian_filter(lesion, sigma=size / 64 * (0.6 if malignant else 1.5))
    contrast = rng.uniform(0.18, 0.35)
    image = _background(rng, size) + contrast * lesion
    image += rng.normal(0.0, rng.uniform(0.02, 0.05), size=image.shape)
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8), lesion >= 0.5


def generate_lesion_dataset(out_dir: str | Path, n_per_class: int, size: int = 64, seed: int = 0) -> Path:
    """Writes ``n_per_class`` images per class as ``out_dir/<class>/<class>_NNNN.png``; returns ``out_dir``."""
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be at least 1, got {n_per_class}")
    out = Path(out_dir)
    for label, name in enumerate(CLASSES):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            rng = np.random.default_rng([seed, label, i])
            Image.fromarray(render_lesion(rng, size, malignant=bool(label))).save(
                folder / f"{name}_{i:04d}.png"
            )
    return out


def generate_lesions(out_dir: Path, n: int, size: int, seed: int) -> list[Path]:
    """The ``medserve synth`` generator signature (``training.synth``): ``n`` images per class; returns the
    written paths."""
    out = generate_lesion_dataset(out_dir, n, size, seed)
    return sorted(p for name in CLASSES for p in (out / name).glob("*.png"))
