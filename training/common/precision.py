"""The mixed-precision policy of training: reduced precision on CUDA only (it is slower on the CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.inference import Precision


@dataclass
class MixedPrecision:
    """How a run computes: ``precision`` for autocast (``models.inference.autocast_context``) and, for fp16, the
    gradient scaler that keeps small gradients from underflowing."""

    precision: Precision = "fp32"
    scaler: torch.amp.GradScaler | None = None


def mixed_precision(device: torch.device, enabled: bool, *, allow_bf16: bool) -> MixedPrecision:
    """The policy for ``device``: fp32 unless ``enabled`` on CUDA; then bf16 where the GPU supports it and
    ``allow_bf16``, else fp16 with a gradient scaler."""
    if not enabled or device.type != "cuda":
        return MixedPrecision()
    if allow_bf16 and torch.cuda.is_bf16_supported():
        return MixedPrecision("bf16")
    return MixedPrecision("fp16", torch.amp.GradScaler("cuda"))
