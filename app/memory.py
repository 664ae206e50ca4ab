"""Giving the memory of an unloaded model version back to the operating system.

Freeing a version's tensors returns their memory to the allocators, not necessarily to the system: glibc keeps
freed chunks in its per-thread arenas (each model version has its own worker thread, and loading runs in yet
others), so the resident set size would stay at the high-water mark of all versions ever loaded, and PyTorch's
CUDA caching allocator keeps freed blocks reserved. ``release_freed_memory`` trims both, once a retired version is
gone: over 30 replace cycles of the default U-Net on a CPU, RSS grew by 27% with ``gc.collect()`` alone and fell
by 11% with the trim (``benchmarks/reload_memory.py``, ``benchmarks/results/reload_memory.json``).

``freeze_heap`` moves everything alive after a load (the models, and the modules torch, pydicom, highdicom and
the rest brought in: some 500,000 objects) out of the garbage collector's reach. Without it every full
collection walks all of them while holding the interpreter lock: 0.25 s on an idle 2-core CPU and up to 0.45 s
under load, about a dozen times in a minute of PACS traffic (the automatic ones, and pynetdicom's DICOM server
calls ``gc.collect()`` itself every 60 polls), stalling every request and job meanwhile. Frozen objects are never
collected, so ``collect_all`` thaws them first: a retired version's reference cycles are still freed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
from collections.abc import Callable

import torch

logger = logging.getLogger("medserve.memory")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; None with another C library (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def freeze_heap() -> None:
    """Collects garbage, then freezes what is left (``gc.freeze``): later collections skip it."""
    gc.collect()
    gc.freeze()


def collect_all() -> None:
    """A full collection that also reaches frozen objects; they are frozen again after it."""
    gc.unfreeze()
    freeze_heap()


def release_freed_memory(device: torch.device) -> None:
    """Collects garbage, returns the C heap's free memory to the system and, on CUDA, empties PyTorch's cache."""
    collect_all()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    if device.type == "cuda" and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # a broken CUDA context must not break serving
            torch.cuda.empty_cache()
