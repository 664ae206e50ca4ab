"""Segmentation data: layout discovery and checks, mask conventions, splits, statistics and fingerprints.

Layout::

    DIR/images/<stem>.<png|jpg|jpeg|tif|tiff|bmp|dcm>
    DIR/masks/<stem>.png
    DIR/val/images/..., DIR/val/masks/...      (optional: a fixed validation set)

Masks whose values are all in {0, 255} are binary (0 -> class 0 ``background``, 255 -> class 1 ``foreground``);
any other mask holds class indices 0..K-1. Every problem with the layout (unmatched stems, unreadable files,
image/mask size mismatches, bad mask values) is collected and reported in one ``DataLayoutError`` before any
training starts.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from models.imageio import DEFAULT_INTENSITY, IMAGE_SUFFIXES, ImageError, read_image_file, read_mask_file
from models.preprocessing import Preprocessing, fit_image, fit_mask, normalize, to_channels
from training.segmentation.transforms import SegmentationAugment

MaskMode = Literal["binary", "index"]
MAX_LISTED = 5  # problems listed per kind in a DataLayoutError
BINARY_CLASSES = ("background", "foreground")
# Most crops per image and epoch at native scale: ISBI's 512 x 512 slices need 4 crops of 256 x 256 to be
# covered once, and larger images are capped there.
MAX_CROPS_PER_IMAGE = 4


class DataLayoutError(ValueError):
    """The data folder does not have the expected layout; the message lists the problems found."""


@dataclass
class SegmentationSet:
    """Images and masks loaded into memory.

    Attributes:
        stems: file stems, sorted.
        images: float32 (H, W, C) pixels in [0, 1] per image (C in {1, 3}).
        masks: raw int64 (H, W) mask values as stored in the files.
        image_paths / mask_paths: the source files.
    """

    stems: list[str]
    images: list[np.ndarray]
    masks: list[np.ndarray]
    image_paths: list[Path] = field(default_factory=list)
    mask_paths: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.stems)

    def subset(self, indices: Sequence[int]) -> SegmentationSet:
        return SegmentationSet(
            [self.stems[i] for i in indices],
            [self.images[i] for i in indices],
            [self.masks[i] for i in indices],
            [self.image_paths[i] for i in indices] if self.image_paths else [],
            [self.mask_paths[i] for i in indices] if self.mask_paths else [],
        )


def first_few(items: Sequence[str]) -> str:
    """Up to ``MAX_LISTED`` of ``items``, comma-separated, and how many more there are (for error messages)."""
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def find_pairs(root: str | Path) -> list[tuple[str, Path, Path]]:
    """(stem, image path, mask path) for every matched stem of ``root``, sorted by stem.

    Raises:
        DataLayoutError: missing folders, unmatched stems or duplicate stems, all listed in one message.
    """
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    missing = [str(d) for d in (images_dir, masks_dir) if not d.is_dir()]
    if missing:
        raise DataLayoutError(
            f"{root}: expected {root}/images/<stem>.<{'|'.join(s[1:] for s in IMAGE_SUFFIXES)}> and "
            f"{root}/masks/<stem>.png; missing folder(s): {', '.join(missing)}"
        )
    images: dict[str, list[Path]] = {}
    for p in sorted(images_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            images.setdefault(p.stem, []).append(p)
    masks = {p.stem: p for p in sorted(masks_dir.iterdir()) if p.is_file() and p.suffix.lower() == ".png"}
    problems = []
    duplicates = sorted(s for s, ps in images.items() if len(ps) > 1)
    if duplicates:
        problems.append(f"several images share a stem: {first_few(duplicates)}")
    no_mask = sorted(set(images) - set(masks))
    if no_mask:
        problems.append(f"{len(no_mask)} image(s) without a mask in {masks_dir}: {first_few(no_mask)}")
    no_image = sorted(set(masks) - set(images))
    if no_image:
        problems.append(f"{len(no_image)} mask(s) without an image in {images_dir}: {first_few(no_image)}")
    if problems:
        raise DataLayoutError(f"{root}: " + "; ".join(problems))
    if not images:
        raise DataLayoutError(f"{root}: no images found in {images_dir}")
    return [(stem, images[stem][0], masks[stem]) for stem in sorted(images)]


def load_set(root: str | Path, intensity: str = DEFAULT_INTENSITY) -> SegmentationSet:
    """Reads every image/mask pair of ``root`` after checking them all.

    Args:
        root: the data folder (layout: module docstring).
        intensity: intensity policy the images are read with (``models.imageio.INTENSITY_POLICIES``); the
            one recorded in the checkpoint's ``Preprocessing.intensity``, so evaluation and serving read alike.

    Raises:
        DataLayoutError: listing unmatched stems, unreadable files and size mismatches (up to a few each).
    """
    pairs = find_pairs(root)
    unreadable: list[str] = []
    mismatched: list[str] = []
    out = SegmentationSet([], [], [], [], [])
    for stem, image_path, mask_path in pairs:
        image = mask = None
        try:
            image = read_image_file(image_path, intensity=intensity).pixels
        except (ImageError, OSError) as exc:
            unreadable.append(f"{image_path.name} ({exc})")
        try:
            mask = read_mask_file(mask_path)
        except (ImageError, OSError, ValueError) as exc:
            unreadable.append(f"masks/{mask_path.name} ({type(exc).__name__})")
        if image is None or mask is None:
            continue
        if image.shape[:2] != mask.shape:
            mismatched.append(
                f"{stem} (image {image.shape[1]}x{image.shape[0]}, mask {mask.shape[1]}x{mask.shape[0]})"
            )
            continue
        out.stems.append(stem)
        out.images.append(image)
        out.masks.append(mask)
        out.image_paths.append(image_path)
        out.mask_paths.append(mask_path)
    problems = []
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable file(s): {first_few(unreadable)}")
    if mismatched:
        problems.append(f"{len(mismatched)} image/mask size mismatch(es): {first_few(mismatched)}")
    if problems:
        raise DataLayoutError(f"{root}: " + "; ".join(problems))
    return out


def mask_mode(masks: Sequence[np.ndarray]) -> MaskMode:
    """``binary`` when every mask holds only 0 and 255, else ``index``."""
    values: set[int] = set()
    for m in masks:
        values.update(int(v) for v in np.unique(m))
        if not values <= {0, 255}:
            return "index"
    return "binary"


def resolve_classes(masks: Sequence[np.ndarray], names: Sequence[str] | None) -> tuple[MaskMode, list[str]]:
    """Decides the mask convention and the class names.

    Args:
        masks: raw masks of the training (and validation) data.
        names: ``--classes`` names, or None for defaults.

    Returns:
        (mode, class names): binary masks give two classes; index masks give max(value) + 1 classes (or the
        number of names given).

    Raises:
        DataLayoutError: negative values, or more classes in the masks than names given.
    """
    mode = mask_mode(masks)
    if mode == "binary":
        if names is not None and len(names) != 2:
            raise DataLayoutError(
                f"masks are binary (0/255) but --classes names {len(names)} classes: {names}"
            )
        return mode, list(names) if names is not None else list(BINARY_CLASSES)
    low = min(int(m.min()) for m in masks)
    high = max(int(m.max()) for m in masks)
    if low < 0:
        raise DataLayoutError(f"mask values must be class indices >= 0, found {low}")
    if names is None:
        if high > 63:
            raise DataLayoutError(
                f"masks hold values up to {high} and are not binary 0/255; class-index masks must hold 0..K-1"
            )
        return mode, ["background"] + [f"class_{i}" for i in range(1, high + 1)]
    if high >= len(names):
        raise DataLayoutError(f"masks hold class index {high} but --classes names only {len(names)} classes")
    return mode, list(names)


def encode_mask(mask: np.ndarray, mode: MaskMode) -> np.ndarray:
    """Raw mask values -> class indices int64 (H, W)."""
    if mode == "binary":
        return (mask > 127).astype(np.int64)
    return mask.astype(np.int64)


def split_indices(n: int, val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Random train/validation split of ``n`` items; at least one item in each when 0 < val_split < 1."""
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"--val-split must be in [0, 1), got {val_split}")
    if val_split == 0.0 or n < 2:
        return list(range(n)), []
    n_val = min(n - 1, max(1, round(n * val_split)))
    order = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])


def infer_channels(images: Sequence[np.ndarray]) -> int:
    """1 when every image is grayscale, else 3."""
    return 1 if all(im.shape[2] == 1 for im in images) else 3


def intensity_stats(images: Sequence[np.ndarray], in_channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over all pixels of ``images`` (after the channel conversion)."""
    total = np.zeros(in_channels)
    total_sq = np.zeros(in_channels)
    count = 0
    for im in images:
        arr = to_channels(im, in_channels).astype(np.float64)
        total += arr.sum(axis=(0, 1))
        total_sq += (arr**2).sum(axis=(0, 1))
        count += arr.shape[0] * arr.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return [round(float(m), 6) for m in mean], [round(float(max(s, 1e-3)), 6) for s in std]


def fingerprint(paths: Sequence[Path]) -> str:
    """SHA-256 (16 hex digits) over the names and bytes of the given files, independent of their order."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: (p.parent.name, p.name)):
        digest.update(f"{path.parent.name}/{path.name}".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def fit_pairs(
    images: Sequence[np.ndarray], targets: Sequence[np.ndarray], working_size: Sequence[int]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images (H, W, C) and class-index masks (H, W) fitted to ``working_size`` (``resize="fit"``: aspect kept,
    centred zero padding, masks by per-class resampling), as serving fits its inputs."""
    fitted = [
        fit_image(torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))), working_size)
        .permute(1, 2, 0)
        .numpy()
        for im in images
    ]
    return fitted, [fit_mask(t, working_size) for t in targets]


class SegmentationDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Random augmented crops for training.

    Each epoch draws ``samples_per_epoch`` crops, cycling over the images. The augmentation of sample ``i`` in
    epoch ``e`` is drawn from a generator seeded with ``(seed, e, i)``, so results do not depend on the number of
    loader workers or on resuming.

    Returns (image (C, h, w) float32 normalised, mask (h, w) int64) with (h, w) = ``spec.img_size``.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        spec: Preprocessing,
        augment: SegmentationAugment,
        samples_per_epoch: int,
        seed: int = 0,
    ) -> None:
        if len(images) != len(masks) or not images:
            raise ValueError("need the same, non-zero number of images and masks")
        self.images = [
            np.ascontiguousarray(to_channels(im, spec.in_channels).transpose(2, 0, 1)) for im in images
        ]
        self.masks = list(masks)
        self.spec = spec
        self.augment = augment
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        k = index % len(self.images)
        image, mask = self.augment(self.images[k], self.masks[k], rng)
        tensor = normalize(torch.from_numpy(image), self.spec.mean, self.spec.std)
        return tensor, torch.from_numpy(mask)


def default_samples_per_epoch(
    sizes: Sequence[tuple[int, int]], crop: Sequence[int], max_per_image: int = MAX_CROPS_PER_IMAGE
) -> int:
    """Crops per epoch so that every training pixel is seen about once per epoch, but at most ``max_per_image``
    crops per image: a 3,000-pixel X-ray would otherwise need over a hundred 256-pixel crops per epoch, and
    ``--epochs`` would mean something else on large images than on small ones.

    Args:
        sizes: (height, width) of each training image.
        crop: the crop (height, width).
    """
    total = 0
    for height, width in sizes:
        total += min(max_per_image, max(1, math.ceil(height * width / (crop[0] * crop[1]))))
    return total
