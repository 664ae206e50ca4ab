"""The heap freeze after loading (``app.memory``): collections skip what loading left, yet still free garbage."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from app.memory import collect_all, freeze_heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def thawed() -> None:
    gc.unfreeze()  # whatever an earlier test left frozen (tests/conftest.py thaws after each test)


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_frozen_objects_are_skipped_by_collections_and_reached_by_collect_all() -> None:
    alive = cycle()  # garbage before the freeze: collected by it
    freeze_heap()
    assert alive() is None and gc.get_freeze_count() > 0
    kept = Node()
    kept.other = kept
    ref = weakref.ref(kept)
    freeze_heap()
    del kept  # now garbage, but frozen: a plain collection leaves it
    gc.collect()
    assert ref() is not None
    collect_all()
    assert ref() is None and gc.get_freeze_count() > 0  # freed, and the rest frozen again


@pytest.mark.anyio
async def test_the_service_freezes_the_heap_once_models_are_loaded(tmp_path: Path) -> None:
    from tests.app.helpers import save_pixel_model, serve, settings

    save_pixel_model(tmp_path / "pixel.pt")
    assert gc.get_freeze_count() == 0
    async with serve(settings(tmp_path)) as (_app, client):
        assert (await client.get("/health/ready")).status_code == 200
        assert gc.get_freeze_count() > 0
