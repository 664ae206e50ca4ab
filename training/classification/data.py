"""Image-folder data for classification: discovery, splits, loading, class balance.

Layouts accepted by ``discover``:

* ``DIR/<class>/*.<image>``: a stratified ``val_split`` fraction is held out for validation (seeded).
* ``DIR/train/<class>/`` with an optional ``DIR/val/<class>/``: without ``val/`` the validation set is split
  off ``train/`` as above.

Class names are the folder names, sorted; images are found recursively under each class folder by suffix
(``models.imageio.IMAGE_SUFFIXES``). Images are read with ``models.imageio.read_image_file`` and turned into
tensors with ``models.preprocessing.to_tensor`` + ``normalize`` using the same ``Preprocessing`` spec that is
stored in the checkpoint, so the service sees exactly what training saw. Augmentation
(``training.classification.transforms``) runs between the two (on the resized, un-normalised [0, 1] image).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import Dataset, WeightedRandomSampler
from tqdm import tqdm

from models.imageio import DEFAULT_INTENSITY, IMAGE_SUFFIXES, read_image_file
from models.preprocessing import Preprocessing, normalize, to_tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One labelled image file."""

    path: Path
    label: int


@dataclass
class ClassificationData:
    """Training and validation samples found under a data directory.

    Attributes:
        root: the data directory as given.
        classes: class names (folder names), index = label.
        train: training samples.
        val: validation samples (empty when ``val_split`` is 0 and there is no ``val/`` folder).
        layout: ``"class-folders"`` (DIR/<class>) or ``"train-folder"`` (DIR/train/<class>).
        val_source: ``"folder"`` (DIR/val) , ``"split"`` (held out of the training images) or ``"none"``.
    """

    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample] = field(default_factory=list)
    layout: str = "class-folders"
    val_source: str = "split"


def _images_under(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def class_folders(root: Path) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that contain at least one image."""
    if not root.is_dir():
        raise ValueError(f"data directory {root} does not exist")
    return sorted(
        d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _images_under(d)
    )


def list_samples(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list[str], list[Sample]]:
    """Lists ``root/<class>/**/*.<image>``.

    Args:
        root: a folder with one sub-folder per class.
        classes: the class list to label with (e.g. a checkpoint's); folders not in it are an error. Default:
            the folders found, sorted.

    Returns:
        The class names and the samples, sorted by class then path.

    Raises:
        ValueError: no class folders, or a folder that is not one of ``classes``.
    """
    root = Path(root)
    found = class_folders(root)
    if not found:
        raise ValueError(
            f"{root}: no class folders with images; expected {root}/<class>/*.png (or .jpg, .dcm, ...) "
            f"or {root}/train/<class>/"
        )
    names = list(classes) if classes is not None else found
    unknown = [c for c in found if c not in names]
    if unknown:
        raise ValueError(f"{root}: folders {unknown} are not among the model's classes {names}")
    samples = [Sample(p, names.index(c)) for c in found for p in _images_under(root / c)]
    return names, samples


def split_samples(samples: list[Sample], val_split: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified, seeded split into (train, val); ``val_split`` is the validation fraction in [0, 1)."""
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"--val-split must be in [0, 1), got {val_split}")
    if val_split == 0.0:
        return list(samples), []
    labels = [s.label for s in samples]
    counts = np.bincount(labels)
    if counts[counts > 0].min() < 2:
        raise ValueError("every class needs at least 2 images to split off a validation set")
    try:
        train_idx, val_idx = train_test_split(
            np.arange(len(samples)), test_size=val_split, stratify=labels, random_state=seed
        )
    except ValueError as exc:
        raise ValueError(f"cannot split off a validation set of {val_split:.0%}: {exc}") from exc
    return [samples[i] for i in sorted(train_idx)], [samples[i] for i in sorted(val_idx)]


def discover(data_dir: str | Path, val_split: float = 0.15, seed: int = 0) -> ClassificationData:
    """Finds the classes and the train/validation samples under ``data_dir`` (layouts: module docstring).

    Raises:
        ValueError: missing directory, fewer than two classes, or a ``val/`` class unknown to ``train/``.
    """
    root = Path(data_dir)
    train_dir = root / "train"
    layout = "train-folder" if train_dir.is_dir() and class_folders(train_dir) else "class-folders"
    base = train_dir if layout == "train-folder" else root
    classes, samples = list_samples(base)
    if len(classes) < 2:
        raise ValueError(f"{base}: found only {len(classes)} class folder ({classes}); need at least 2")
    val_dir = root / "val"
    if layout == "train-folder" and val_dir.is_dir() and class_folders(val_dir):
        _, val = list_samples(val_dir, classes)
        return ClassificationData(root, classes, samples, val, layout, "folder")
    train, val = split_samples(samples, val_split, seed)
    return ClassificationData(root, classes, train, val, layout, "split" if val else "none")


def data_fingerprint(samples: Sequence[Sample]) -> str:
    """Short hash of the sample list (paths, labels, file sizes): changes when the data changes."""
    digest = hashlib.sha256()
    for s in sorted(samples, key=lambda s: str(s.path)):
        digest.update(f"{s.path.name}|{s.label}|{s.path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def detect_channels(
    samples: Sequence[Sample], max_images: int = 16, intensity: str = DEFAULT_INTENSITY
) -> int:
    """1 when the sampled images are grayscale (one channel, or RGB with equal channels), else 3.

    ``intensity`` is the policy the images are read with (``models.imageio.INTENSITY_POLICIES``).
    """
    if not samples:
        raise ValueError("no images to inspect")
    step = max(1, len(samples) // max_images)
    for s in list(samples)[::step][:max_images]:
        pixels = read_image_file(s.path, intensity=intensity).pixels
        if pixels.shape[2] >= 3 and float(np.abs(pixels[:, :, :3] - pixels[:, :, :1]).max()) > 2.0 / 255.0:
            return 3
    return 1


def load_image(path: Path, spec: Preprocessing) -> torch.Tensor:
    """Reads one file as the un-normalised, resized (C, H, W) tensor the spec describes (its intensity policy,
    channels and size)."""
    return to_tensor(read_image_file(path, intensity=spec.intensity).pixels, spec)


class ClassificationDataset(Dataset[tuple[torch.Tensor, int]]):
    """Yields (normalised (C, H, W) image, label) for a list of samples.

    Args:
        samples: the labelled files.
        spec: the checkpoint's preprocessing (channels, size, mean/std).
        transform: optional augmentation applied before normalisation.
        cache: decode every image once up front and keep the resized tensors in memory (fast epochs when the
            data fits; see ``cache_fits``).
        progress: show a progress bar while caching.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        spec: Preprocessing,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache: bool = False,
        progress: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.spec = spec
        self.transform = transform
        self.labels = torch.tensor([s.label for s in self.samples], dtype=torch.long)
        self.images: torch.Tensor | None = None
        if cache and self.samples:
            it = tqdm(self.samples, desc="loading images", unit="img", disable=not progress, leave=False)
            self.images = torch.stack([load_image(s.path, spec) for s in it])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.images is not None:
            image = self.images[index].clone()
        else:
            image = load_image(self.samples[index].path, self.spec)
        if self.transform is not None:
            image = self.transform(image)
        return normalize(image, self.spec.mean, self.spec.std), int(self.labels[index])


def cache_fits(n_images: int, spec: Preprocessing, budget_mb: float) -> bool:
    """Whether ``n_images`` resized float32 tensors fit in ``budget_mb`` megabytes."""
    h, w = spec.img_size
    return n_images * spec.in_channels * h * w * 4 <= budget_mb * 2**20


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """(K,) inverse-frequency ("balanced") weights n / (K * n_k); classes absent from ``labels`` get 0."""
    labels_arr = np.asarray(labels)
    present = np.unique(labels_arr)
    weights = np.zeros(num_classes, dtype=np.float32)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels_arr)
    return torch.from_numpy(weights)


def balanced_sampler(labels: Sequence[int], num_classes: int, seed: int) -> WeightedRandomSampler:
    """Draws samples with probability proportional to 1 / (size of their class), with replacement."""
    per_class = class_weights(labels, num_classes)
    weights = per_class[torch.as_tensor(list(labels), dtype=torch.long)].double()
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(
        weights.tolist(), num_samples=len(weights), replacement=True, generator=generator
    )
