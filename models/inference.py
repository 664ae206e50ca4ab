"""Model execution shared by evaluation and the service: device/precision handling and tiled prediction.

Tiled (sliding-window) segmentation: an image larger than the model's training size is covered by windows of
that size with ``overlap``; window probabilities are blended with weights that fall off towards the window edges
(so seams vanish) and the result has exactly the image's size. Images smaller than a window are padded and
cropped back. Tiles from several images are pooled into the same forward batches, which is how requests of
different sizes share a batch in the service.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Precision = Literal["fp32", "fp16", "bf16"]
Flip = Literal["horizontal", "vertical"]
FLIPS: tuple[Flip, ...] = ("horizontal", "vertical")
# Tensor dimension each flip mirrors in a (B, C, H, W) batch.
_FLIP_DIMS = {"horizontal": 3, "vertical": 2}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available")
    return torch.device(name)


def autocast_context(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[None]:
    """Autocast for fp16/bf16 on CUDA; reduced precision is never used on CPU (it is slower there)."""
    if device.type == "cuda" and precision in ("fp16", "bf16"):
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def prepare_for_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Moves the model to ``device`` in eval mode, in channels_last layout.

    channels_last suits tensor cores on CUDA, and oneDNN on the CPU too: inference is 1.07-1.25x faster per
    image there for the U-Net and every classifier backbone measured (``benchmarks/bench_layout.py``).
    """
    return model.to(device).eval().to(memory_format=torch.channels_last)


def forward(
    model: nn.Module, batch: torch.Tensor, device: torch.device, precision: Precision = "fp32"
) -> torch.Tensor:
    """Runs ``model`` on a (B, C, H, W) batch and returns float32 outputs on the CPU."""
    x = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast_context(device, precision):
        out = model(x)
    return out.float().cpu()


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Window start offsets covering ``length`` with windows of ``tile`` overlapping by ``overlap``."""
    if length <= tile:
        return [0]
    stride = max(1, round(tile * (1.0 - overlap)))
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


@lru_cache(maxsize=16)
def blend_weights(height: int, width: int) -> torch.Tensor:
    """(H, W) weights: a separable tent that is highest in the centre and small but positive at the edges."""

    def ramp(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float32)
        return torch.minimum(pos + 1, n - pos) / ((n + 1) / 2)

    return ramp(height)[:, None] * ramp(width)[None, :]


@dataclass
class Tiling:
    """How one (C, H, W) image was cut into windows."""

    height: int
    width: int
    padded: tuple[int, int]
    positions: list[tuple[int, int]]
    tile: tuple[int, int]


def split_tiles(image: torch.Tensor, tile: Sequence[int], overlap: float) -> tuple[torch.Tensor, Tiling]:
    """Cuts a (C, H, W) image into (N, C, th, tw) windows; pads (replicate) when smaller than a window."""
    h, w = image.shape[-2:]
    th, tw = int(tile[0]), int(tile[1])
    ph, pw = max(h, th), max(w, tw)
    if (ph, pw) != (h, w):
        image = F.pad(image[None], (0, pw - w, 0, ph - h), mode="replicate")[0]
    positions = [(y, x) for y in tile_starts(ph, th, overlap) for x in tile_starts(pw, tw, overlap)]
    tiles = torch.stack([image[:, y : y + th, x : x + tw] for y, x in positions])
    return tiles, Tiling(h, w, (ph, pw), positions, (th, tw))


def merge_tiles(tile_probs: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """Blends (N, K, th, tw) window probabilities into (K, H, W) at the image's original size."""
    k = tile_probs.shape[1]
    th, tw = tiling.tile
    weights = blend_weights(th, tw)
    acc = torch.zeros((k, *tiling.padded))
    norm = torch.zeros(tiling.padded)
    for probs, (y, x) in zip(tile_probs, tiling.positions, strict=True):
        acc[:, y : y + th, x : x + tw] += probs * weights
        norm[y : y + th, x : x + tw] += weights
    return (acc / norm)[:, : tiling.height, : tiling.width]


def _chunks(x: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for i in range(0, x.shape[0], size):
        yield x[i : i + size]


def segment_probabilities(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    tile: Sequence[int],
    *,
    overlap: float = 0.25,
    batch_size: int = 8,
    tta: bool = False,
    flips: Sequence[str] = FLIPS,
    device: torch.device | None = None,
    precision: Precision = "fp32",
) -> list[torch.Tensor]:
    """Per-class probabilities (K, H, W) for each normalised (C, H, W) image, predicted tile by tile.

    Args:
        model: a segmentation network returning logits (B, K, h, w).
        images: normalised images; sizes may differ.
        tile: window (height, width), normally the training size.
        overlap: fraction of a window shared with its neighbour.
        batch_size: windows per forward pass (windows of all images are pooled).
        tta: average over the identity and ``flips`` (test-time augmentation).
        flips: the flips ``tta`` averages over: ``horizontal`` and/or ``vertical``. Use those the model was
            trained with (``CheckpointMetadata.tta_flips``): a flip it never saw in training undoes what it
            learned about the masks' orientation.
        device: where to run; defaults to the model's device.
        precision: ``fp32``, or ``fp16``/``bf16`` autocast on CUDA.
    """
    unknown = sorted(set(flips) - set(FLIPS))
    if unknown:
        raise ValueError(f"unknown flips {unknown}; use {list(FLIPS)}")
    flip_dims = [(_FLIP_DIMS[f],) for f in flips] if tta else []
    if device is None:
        device = next(model.parameters()).device
    tilings: list[Tiling] = []
    all_tiles: list[torch.Tensor] = []
    for image in images:
        tiles, tiling = split_tiles(image, tile, overlap)
        tilings.append(tiling)
        all_tiles.append(tiles)
    stacked = torch.cat(all_tiles)
    outputs = []
    for chunk in _chunks(stacked, max(1, batch_size)):
        probs = torch.softmax(forward(model, chunk, device, precision), dim=1)
        for dims in flip_dims:
            flipped = forward(model, torch.flip(chunk, dims), device, precision)
            probs += torch.flip(torch.softmax(flipped, dim=1), dims)
        probs /= 1 + len(flip_dims)
        outputs.append(probs)
    tile_probs = torch.cat(outputs)
    results = []
    offset = 0
    for tiling in tilings:
        n = len(tiling.positions)
        results.append(merge_tiles(tile_probs[offset : offset + n], tiling))
        offset += n
    return results
