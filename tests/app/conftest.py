from pathlib import Path

import pytest

from tests.app.helpers import save_pixel_model


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def pixel_dir(tmp_path: Path) -> Path:
    """A model directory holding one threshold model, ``pixel`` (``save_pixel_model``'s defaults)."""
    save_pixel_model(tmp_path / "pixel.pt")
    return tmp_path
