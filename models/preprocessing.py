"""The one preprocessing path shared by training, evaluation and the service.

A decoded image (``models.imageio.DecodedImage``: float32 (H, W, C) in [0, 1]) becomes a normalised tensor
(C, H, W) according to a ``Preprocessing`` spec stored in every checkpoint, so serving reproduces exactly what
training saw.

Resize policy:
    * ``tile`` (segmentation): images keep their native pixel scale. Training takes random crops of
      ``img_size``; inference slides an ``img_size`` window with overlap over the full image and blends
      (``models.inference``), so masks are predicted at full resolution and returned at the original size.
    * ``resize`` (classification): the whole image is resized (bilinear, aspect ratio not kept) to ``img_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, field_validator

# ITU-R BT.601 luma weights, the same conversion PIL uses for mode "L".
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class Preprocessing(BaseModel):
    """How raw pixels become model input. Stored in the checkpoint; read by training and serving."""

    in_channels: int = Field(ge=1, le=4)
    img_size: tuple[int, int] = Field(description="(height, width) the model was trained on")
    resize: Literal["tile", "resize"] = "tile"
    mean: list[float] = Field(default_factory=lambda: [0.5])
    std: list[float] = Field(default_factory=lambda: [0.25])
    tile_overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    intensity: str = Field(
        default="dicom-window",
        description="intensity policy name used to read pixels, see models.imageio.INTENSITY_POLICIES",
    )

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("needs at least one value")
        return value

    @field_validator("std")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(s <= 0 for s in value):
            raise ValueError("std must be positive")
        return value


def to_channels(pixels: np.ndarray, in_channels: int) -> np.ndarray:
    """Converts float (H, W, C) pixels to ``in_channels`` channels: RGB->gray by luma, gray->RGB by repeat."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    c = pixels.shape[2]
    if c == in_channels:
        return pixels
    if in_channels == 1:
        if c >= 3:
            return (pixels[:, :, :3] @ _LUMA)[:, :, None]
        return pixels[:, :, :1]
    if c == 1:
        return np.repeat(pixels, in_channels, axis=2)
    if c > in_channels:
        return pixels[:, :, :in_channels]
    raise ValueError(f"cannot convert a {c}-channel image to {in_channels} channels")


def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel z-score of a (C, H, W) or (B, C, H, W) tensor; a single mean/std applies to all channels."""
    c = tensor.shape[-3]
    m = torch.as_tensor(list(mean) * (c if len(mean) == 1 else 1), dtype=tensor.dtype, device=tensor.device)
    s = torch.as_tensor(list(std) * (c if len(std) == 1 else 1), dtype=tensor.dtype, device=tensor.device)
    return (tensor - m.view(-1, 1, 1)) / s.view(-1, 1, 1)


def to_tensor(pixels: np.ndarray, spec: Preprocessing) -> torch.Tensor:
    """Float (H, W, C) pixels in [0, 1] -> un-normalised (C, H', W') tensor with the spec's channels and size."""
    arr = to_channels(pixels.astype(np.float32, copy=False), spec.in_channels)
    tensor = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    if spec.resize == "resize" and tuple(tensor.shape[-2:]) != tuple(spec.img_size):
        tensor = F.interpolate(
            tensor[None], size=spec.img_size, mode="bilinear", align_corners=False, antialias=True
        )[0]
    return tensor


def prepare(pixels: np.ndarray, spec: Preprocessing) -> torch.Tensor:
    """The full inference preprocessing: channels, resize policy, normalisation. Returns (C, H', W') float32."""
    return normalize(to_tensor(pixels, spec), spec.mean, spec.std)
