"""Augmentation for classification: mild geometry and exposure changes suited to radiographs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision.transforms import v2


def _clamp_unit(image: torch.Tensor) -> torch.Tensor:
    # A module-level function (not a lambda) so loader worker processes can pickle the transform.
    return image.clamp_(0.0, 1.0)


@dataclass
class AugmentConfig:
    """Augmentation for radiographs: mild geometry and exposure changes; flips off by default (anatomy is not
    mirror-symmetric: a flipped chest X-ray shows the heart on the wrong side)."""

    rotation: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    hflip: bool = False
    vflip: bool = False

    def build(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A torchvision transform for one un-normalised (C, H, W) tensor in [0, 1]."""
        steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
        if self.rotation or self.scale or self.translate:
            steps.append(
                v2.RandomAffine(
                    degrees=self.rotation,
                    translate=(self.translate, self.translate) if self.translate else None,
                    scale=(1.0 - self.scale, 1.0 + self.scale) if self.scale else None,
                    interpolation=v2.InterpolationMode.BILINEAR,
                )
            )
        if self.brightness or self.contrast:
            steps.append(v2.ColorJitter(brightness=self.brightness, contrast=self.contrast))
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if self.vflip:
            steps.append(v2.RandomVerticalFlip())
        steps.append(_clamp_unit)
        return v2.Compose(steps)
