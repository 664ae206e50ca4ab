"""Finding the checkpoints of a task in a model folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import pytest

from tests.training.helpers import save_tiny_unet
from training.common.checkpoints import find_checkpoints


def save(path: Path, task: Literal["segmentation", "classification"]) -> Path:
    save_tiny_unet(path, task)
    return path


def test_finds_the_tasks_checkpoints_sorted_and_skips_unreadable_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    b = save(tmp_path / "b.pt", "segmentation")
    a = save(tmp_path / "a.pt", "segmentation")
    c = save(tmp_path / "c.pt", "classification")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    (tmp_path / "notes.txt").write_text("not a .pt file")
    with caplog.at_level(logging.WARNING):
        assert find_checkpoints(tmp_path, "segmentation") == [a, b]
    assert "junk.pt" in caplog.text
    assert find_checkpoints(tmp_path, "classification") == [c]
    assert find_checkpoints(tmp_path / "missing", "segmentation") == []
