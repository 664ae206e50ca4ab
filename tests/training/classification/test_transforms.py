"""Classification augmentation: radiograph-friendly defaults."""

from __future__ import annotations

import torch

from training.classification.transforms import AugmentConfig


def test_default_augmentation_never_flips_and_stays_in_range() -> None:
    torch.manual_seed(0)
    # Left half bright, right half dark: a mirror image would swap the halves.
    image = torch.zeros(1, 32, 32)
    image[:, :, :16] = 0.9
    augment = AugmentConfig().build()
    for _ in range(30):
        out = augment(image.clone())
        assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1
        assert out[:, 8:24, 4:12].mean() > out[:, 8:24, 20:28].mean()
    flipping = AugmentConfig(rotation=0, scale=0, translate=0, brightness=0, contrast=0, hflip=True).build()
    flipped = [bool(flipping(image.clone())[0, 16, 0] < 0.5) for _ in range(40)]
    assert any(flipped) and not all(flipped)
