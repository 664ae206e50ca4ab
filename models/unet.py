"""U-Net after Ronneberger et al. (2015), with padded convolutions so that output size equals input size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "instance", "none")
UPSAMPLES = ("deconv", "nearest")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by optional normalisation and ReLU.

    Args:
        in_channels: channels of the input (B, in_channels, H, W).
        out_channels: channels of the output (B, out_channels, H, W).
        norm: ``"batch"``, ``"instance"`` or ``"none"``.
        dropout: dropout probability applied between the two convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str, dropout: float) -> None:
        bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        layers += [
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        ]
        super().__init__(*layers)


class Up(nn.Module):
    """The paper's 2x2 "up-convolution" halving the channels, concatenation with the skip, and DoubleConv.

    Args:
        in_channels: channels of the coarser input (B, in_channels, H, W).
        skip_channels: channels of the skip connection (B, skip_channels, 2H, 2W); the up-convolution maps
            ``in_channels`` to this many.
        out_channels: channels of the output (B, out_channels, 2H, 2W).
        norm: normalisation of the DoubleConv.
        dropout: dropout of the DoubleConv.
        upsample: ``"deconv"``: a 2x2 transposed convolution with stride 2 (what the paper's Caffe model
            uses); ``"nearest"``: nearest-neighbour up-sampling then a 2x2 convolution (padded below and on
            the right), the layer of MedServe's first checkpoints, which costs 4x the multiply-adds.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        norm: str,
        dropout: float,
        upsample: str = "deconv",
    ) -> None:
        super().__init__()
        self.upsample = upsample
        self.reduce: nn.Module
        if upsample == "deconv":
            self.reduce = nn.ConvTranspose2d(in_channels, skip_channels, kernel_size=2, stride=2)
        else:
            self.reduce = nn.Conv2d(in_channels, skip_channels, kernel_size=2)
        self.conv = DoubleConv(skip_channels * 2, out_channels, norm, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.upsample == "deconv":
            x = self.reduce(x)
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = self.reduce(F.pad(x, (0, 1, 0, 1), mode="replicate"))
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net for 2D semantic segmentation.

    The contracting path applies two 3x3 convolutions (+ optional norm) + ReLU per level followed by 2x2 max
    pooling; the expansive path applies a 2x2 up-convolution, concatenates the skip connection and applies
    two 3x3 convolutions; a 1x1 convolution maps to class logits. Inputs whose height or width is not
    divisible by ``2 ** (len(channels) - 1)`` are reflect-padded inside the model and the logits cropped back.

    Args:
        in_channels: image channels (1 for grayscale, 3 for RGB).
        out_channels: number of classes (background included); logits are returned, not probabilities.
        channels: feature width per level, from the top level down. Its length sets the depth; at least 2.
        norm: ``"batch"`` (default), ``"instance"`` or ``"none"``.
        dropout: dropout probability inside the two deepest blocks, in [0, 1).
        upsample: the up-convolution: ``"deconv"`` (default; 2x2 transposed convolution, stride 2) or
            ``"nearest"`` (nearest up-sampling + 2x2 convolution; checkpoints written before this argument
            existed use it and load as such).

    Shapes:
        input (B, in_channels, H, W) -> output (B, out_channels, H, W), for any H, W >= 1.

    Raises:
        ValueError: for a non-positive channel count, fewer than two levels, an unknown norm or upsample, or a
            bad dropout.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        norm: str = "batch",
        dropout: float = 0.0,
        upsample: str = "deconv",
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")
        if len(channels) < 2:
            raise ValueError(f"channels needs at least 2 levels, got {channels}")
        if any(c < 1 for c in channels):
            raise ValueError(f"every entry of channels must be >= 1, got {channels}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if upsample not in UPSAMPLES:
            raise ValueError(f"upsample must be one of {UPSAMPLES}, got {upsample!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.depth = len(channels) - 1
        self.upsample = upsample

        deep = max(0, len(channels) - 2)  # dropout only in the two deepest blocks, as in the paper
        self.down = nn.ModuleList(
            DoubleConv(in_channels if i == 0 else channels[i - 1], c, norm, dropout if i >= deep else 0.0)
            for i, c in enumerate(channels)
        )
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            Up(channels[i + 1], channels[i], channels[i], norm, 0.0, upsample)
            for i in reversed(range(self.depth))
        )
        self.head = nn.Conv2d(channels[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        multiple = 2**self.depth
        pad_h, pad_w = (-h) % multiple, (-w) % multiple
        if pad_h or pad_w:
            # Reflect needs pad < size; replicate works for any size (tiny images included).
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, skip in zip(self.up, reversed(skips), strict=True):
            x = up(x, skip)
        return self.head(x)[..., :h, :w]
