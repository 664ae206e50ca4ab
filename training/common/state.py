"""Training state for ``--resume``: what both tasks save after every epoch, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """The ``model``, ``optimizer``, ``scheduler`` and ``scaler`` entries of a training state (tensors on the
    CPU; ``scaler`` is ``{}`` without a gradient scaler)."""
    return {
        "model": cpu_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
    }


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` detached and on the CPU."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def restore_training_state(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Loads what ``training_state`` saved (the scaler only when both this run and the saved one have one)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def save_training_state(path: Path, payload: dict[str, Any]) -> Path:
    """Writes ``payload`` to ``path`` through a temporary file, so an interrupted write never leaves half a state."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_training_state(path: Path, *, expected_format: str | None = None, hint: str = "") -> dict[str, Any]:
    """Reads a training state saved by ``save_training_state`` (plain data + tensors: ``weights_only=True``).

    Args:
        path: the state file.
        expected_format: the value its ``format`` entry must have, if any.
        hint: added to the message when the file is missing.

    Raises:
        ValueError: no file at ``path``, or not a state of the expected format.
    """
    if not path.is_file():
        raise ValueError(f"--resume: no training state at {path}{f' ({hint})' if hint else ''}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or (
        expected_format is not None and state.get("format") != expected_format
    ):
        raise ValueError(f"--resume: {path} is not a MedServe training state")
    return state
