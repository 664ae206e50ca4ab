"""Seeds, torch CPU threads and the progress-bar default."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch

from training.common.runtime import cpu_threads, seed_everything, show_progress


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_everything_seeds_python_numpy_and_torch() -> None:
    seed_everything(3)
    first = draws()
    seed_everything(3)
    assert draws() == first
    seed_everything(4)
    assert all(a != b for a, b in zip(draws(), first, strict=True))


def test_cpu_threads_sets_and_restores_the_count() -> None:
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_threads(0):
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), cpu_threads(1):
        raise RuntimeError("restored even so")
    assert torch.get_num_threads() == before


def test_progress_defaults_to_whether_stderr_is_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    assert show_progress(True) is True and show_progress(False) is False
    for tty in (True, False):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        assert show_progress(None) is tty
