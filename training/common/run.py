"""What a training run leaves behind: the result record, ``history.json`` and ``learning_curves.png``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from models.checkpoint import CheckpointMetadata
from training.common.plots import plot_history

HISTORY_FILE = "history.json"
CURVES_FILE = "learning_curves.png"


@dataclass
class TrainResult:
    """What a training run produced (in a distributed run: on every rank; files exist only on rank 0).

    Attributes:
        checkpoint: the checkpoint file (the best epoch's model).
        metadata: the checkpoint's metadata as written (None on ranks that write nothing).
        history: one record per epoch, as in ``history.json``.
        best: the selected epoch (``epoch``) and the score it was selected by.
        model: the model as after the last epoch, unwrapped.
        seconds: wall-clock duration of the run.
    """

    checkpoint: Path
    metadata: CheckpointMetadata | None
    history: list[dict[str, Any]]
    best: dict[str, Any]
    model: nn.Module
    seconds: float


def write_history(
    folder: Path,
    history: list[dict[str, Any]],
    *,
    document: Any = None,
    title: str = "",
    loss_keys: Sequence[str] | None = None,
    metric_keys: Sequence[str] | None = None,
) -> None:
    """Writes ``folder/history.json`` (``document``, default the ``history`` list itself) and the learning
    curves of ``history`` as ``folder/learning_curves.png`` (series chosen as ``plot_history`` does)."""
    (folder / HISTORY_FILE).write_text(json.dumps(history if document is None else document, indent=2))
    plot_history(history, folder / CURVES_FILE, loss_keys=loss_keys, metric_keys=metric_keys, title=title)
