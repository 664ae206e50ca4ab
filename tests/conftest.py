"""Fixtures of the whole test session."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _thaw_the_heap() -> Iterator[None]:
    """A service started in-process freezes the heap once its models load (``app.memory.freeze_heap``); what a
    test froze is thawed after it, so that later tests' garbage among it is still collected."""
    yield
    gc.unfreeze()
