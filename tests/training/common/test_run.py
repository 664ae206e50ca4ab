"""The run files: history.json and learning_curves.png."""

from __future__ import annotations

import json
from pathlib import Path

from training.common.run import CURVES_FILE, HISTORY_FILE, write_history

HISTORY = [{"epoch": 1, "train_loss": 1.0, "val_dice": 0.5}, {"epoch": 2, "train_loss": 0.5, "val_dice": 0.7}]


def test_history_and_curves_are_written(tmp_path: Path) -> None:
    write_history(tmp_path, HISTORY, title="curves")
    assert json.loads((tmp_path / HISTORY_FILE).read_text()) == HISTORY
    assert (tmp_path / CURVES_FILE).read_bytes().startswith(b"\x89PNG")


def test_history_document_can_wrap_the_records(tmp_path: Path) -> None:
    document = {"select_metric": "loss", "epochs": HISTORY}
    write_history(tmp_path, HISTORY, document=document, loss_keys=["train_loss"], metric_keys=["val_dice"])
    assert json.loads((tmp_path / HISTORY_FILE).read_text()) == document
    assert (tmp_path / CURVES_FILE).is_file()
