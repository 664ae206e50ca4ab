"""The mixed-precision policy: fp32 on the CPU; on CUDA bf16 where allowed and supported, else fp16 + scaler."""

from __future__ import annotations

import warnings

import pytest
import torch

from training.common.precision import MixedPrecision, mixed_precision

CUDA = torch.device("cuda")


def test_cpu_and_disabled_runs_are_fp32() -> None:
    for allow_bf16 in (True, False):
        assert mixed_precision(torch.device("cpu"), True, allow_bf16=allow_bf16) == MixedPrecision()
        assert mixed_precision(CUDA, False, allow_bf16=allow_bf16) == MixedPrecision()
    assert MixedPrecision().precision == "fp32" and MixedPrecision().scaler is None


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_cuda_policy(monkeypatch: pytest.MonkeyPatch, bf16_supported: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # machines without CUDA warn that the scaler disables itself
        segmentation = mixed_precision(CUDA, True, allow_bf16=True)
        classification = mixed_precision(CUDA, True, allow_bf16=False)
    if bf16_supported:
        assert segmentation.precision == "bf16" and segmentation.scaler is None
    else:
        assert segmentation.precision == "fp16" and isinstance(segmentation.scaler, torch.amp.GradScaler)
    assert classification.precision == "fp16" and isinstance(classification.scaler, torch.amp.GradScaler)
