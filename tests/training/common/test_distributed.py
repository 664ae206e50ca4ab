"""The distributed helpers on a single process (two processes: tests/training/segmentation/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.common.distributed import Dist, gather, init_distributed, sync_buffers


def test_a_single_process_is_rank_0_of_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info, device = init_distributed("cpu")
    assert info == Dist() and info.main and not info.enabled and device == torch.device("cpu")
    assert gather([1, 2], info) == [1, 2]
    norm = nn.BatchNorm1d(2)
    before = [b.clone() for b in norm.buffers()]
    sync_buffers(norm, info)  # nothing to synchronise
    assert all(torch.equal(a, b) for a, b in zip(norm.buffers(), before, strict=True))
    assert Dist(rank=1, world=2).enabled and not Dist(rank=1, world=2).main
