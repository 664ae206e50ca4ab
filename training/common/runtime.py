"""Process-wide settings of a run: random seeds, torch CPU threads, progress bars."""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Runs the block with ``n`` torch CPU threads (0: unchanged), restoring the previous count after."""
    previous = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def show_progress(flag: bool | None) -> bool:
    """``--progress`` / ``--no-progress``; unset: progress bars only when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else bool(flag)
