"""Finding the checkpoints a model folder already holds."""

from __future__ import annotations

import logging
from pathlib import Path

from models.checkpoint import SUFFIX, CheckpointError, load_checkpoint

log = logging.getLogger(__name__)


def find_checkpoints(model_dir: Path, task: str) -> list[Path]:
    """Checkpoints in ``model_dir`` whose metadata says ``task``, sorted (unreadable files are skipped)."""
    found = []
    for path in sorted(Path(model_dir).glob(f"*{SUFFIX}")):
        try:
            meta, _ = load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("ignoring %s: %s", path, exc)
            continue
        if meta.task == task:
            found.append(path)
    return found
