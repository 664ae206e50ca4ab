"""The one preprocessing path shared by training, evaluation and the service.

A decoded image (``models.imageio.DecodedImage``: float32 (H, W, C) in [0, 1]) becomes a normalised tensor
(C, H, W) according to a ``Preprocessing`` spec stored in every checkpoint, so serving reproduces exactly what
training saw.

Resize policy:
    * ``tile`` (segmentation): images keep their native pixel scale. Training takes random crops of
      ``img_size``; inference slides an ``img_size`` window with overlap over the full image and blends
      (``models.inference``), so masks are predicted at full resolution and returned at the original size.
    * ``resize`` (classification): the whole image is resized (bilinear, aspect ratio not kept) to ``img_size``.
    * ``fit`` (segmentation of large or mixed-resolution images, e.g. whole X-rays): the image is resized with
      its aspect ratio kept so that it fits ``working_size``, and padded (zeros, centred) to exactly that size.
      Windows of ``img_size`` then cover the working image as for ``tile`` (one window when both sizes are
      equal), and the probabilities are mapped back to the original size (``to_original_size``), so masks
      always come back at the input's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Self

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, field_validator, model_validator

# ITU-R BT.601 luma weights, the same conversion PIL uses for mode "L".
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class Preprocessing(BaseModel):
    """How raw pixels become model input. Stored in the checkpoint; read by training and serving."""

    in_channels: int = Field(ge=1, le=4)
    img_size: tuple[int, int] = Field(description="(height, width) the model was trained on")
    resize: Literal["tile", "resize", "fit"] = "tile"
    working_size: tuple[int, int] | None = Field(
        default=None, description="(height, width) every image is fitted into when resize is 'fit'"
    )
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

    @model_validator(mode="after")
    def _working_size_for_fit(self) -> Self:
        if (self.resize == "fit") != (self.working_size is not None):
            raise ValueError("working_size is required with resize 'fit' and only allowed with it")
        if self.working_size is not None and min(self.working_size) < 1:
            raise ValueError("working_size must be positive")
        return self


@dataclass(frozen=True)
class Letterbox:
    """Where an (H, W) image lies in its working canvas under ``resize="fit"``: scaled to (h, w) at (top, left)."""

    original: tuple[int, int]
    scaled: tuple[int, int]
    top: int
    left: int
    canvas: tuple[int, int]


def letterbox(height: int, width: int, working_size: Sequence[int]) -> Letterbox:
    """The largest aspect-preserving scaling of (height, width) into ``working_size``, centred."""
    ch, cw = int(working_size[0]), int(working_size[1])
    factor = min(ch / height, cw / width)
    h = min(ch, max(1, round(height * factor)))
    w = min(cw, max(1, round(width * factor)))
    return Letterbox((height, width), (h, w), (ch - h) // 2, (cw - w) // 2, (ch, cw))


def _resample(tensor: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resampling of a (C, H, W) float tensor, antialiased when it shrinks."""
    return F.interpolate(
        tensor[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True
    )[0]


def fit_image(tensor: torch.Tensor, working_size: Sequence[int]) -> torch.Tensor:
    """(C, H, W) -> (C, *working_size): aspect-preserving resize, zero padding around it."""
    box = letterbox(tensor.shape[-2], tensor.shape[-1], working_size)
    canvas = tensor.new_zeros((tensor.shape[0], *box.canvas))
    h, w = box.scaled
    canvas[:, box.top : box.top + h, box.left : box.left + w] = _resample(tensor, box.scaled)
    return canvas


def fit_mask(mask: np.ndarray, working_size: Sequence[int]) -> np.ndarray:
    """Class-index (H, W) mask -> (*working_size) int64, like ``fit_image``; padding is class 0.

    Each class's indicator is resampled like the image and every pixel takes the class of the highest one
    (nnU-Net's way of resampling labels), so thin structures are not lost to nearest-neighbour sampling.
    """
    box = letterbox(mask.shape[0], mask.shape[1], working_size)
    h, w = box.scaled
    best = torch.full(box.scaled, -1.0)
    labels = torch.zeros(box.scaled, dtype=torch.int64)
    source = torch.from_numpy(np.ascontiguousarray(mask))
    for k in np.unique(mask):
        score = _resample((source == int(k)).float()[None], box.scaled)[0]
        better = score > best
        best[better] = score[better]
        labels[better] = int(k)
    out = np.zeros(box.canvas, dtype=np.int64)
    out[box.top : box.top + h, box.left : box.left + w] = labels.numpy()
    return out


def to_original_size(scores: torch.Tensor, height: int, width: int, spec: Preprocessing) -> torch.Tensor:
    """(K, h, w) class scores at the model's scale -> (K, height, width) at the image's original size.

    For ``fit`` the padding is cut off before resizing back; for ``resize`` the whole output is resized; for
    ``tile`` the scores already have the original size.
    """
    if spec.resize == "fit" and spec.working_size is not None:
        box = letterbox(height, width, spec.working_size)
        h, w = box.scaled
        scores = scores[:, box.top : box.top + h, box.left : box.left + w]
    if tuple(scores.shape[-2:]) != (height, width):
        scores = F.interpolate(scores[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return scores


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
        tensor = _resample(tensor, spec.img_size)
    elif spec.resize == "fit" and spec.working_size is not None:
        tensor = fit_image(tensor, spec.working_size)
    return tensor


def prepare(pixels: np.ndarray, spec: Preprocessing) -> torch.Tensor:
    """The full inference preprocessing: channels, resize policy, normalisation. Returns (C, H', W') float32."""
    return normalize(to_tensor(pixels, spec), spec.mean, spec.std)
