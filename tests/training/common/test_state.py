"""Training state for --resume: saved atomically, loaded with checks, restored into a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from training.common.state import (
    cpu_state_dict,
    load_training_state,
    restore_training_state,
    save_training_state,
    training_state,
)


def optimised(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def test_round_trip_restores_model_optimizer_and_scheduler(tmp_path: Path) -> None:
    model, optimizer, scheduler = optimised(0)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    state = training_state(model, optimizer, scheduler, None)
    assert set(state) == {"model", "optimizer", "scheduler", "scaler"} and state["scaler"] == {}
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state["model"].values())
    path = save_training_state(tmp_path / "run.state", {"format": "test", "epoch": 3, **state})
    assert path == tmp_path / "run.state" and sorted(p.name for p in tmp_path.iterdir()) == ["run.state"]

    loaded = load_training_state(path, expected_format="test")
    fresh, fresh_optimizer, fresh_scheduler = optimised(1)
    restore_training_state(loaded, fresh, fresh_optimizer, fresh_scheduler, None)
    assert loaded["epoch"] == 3
    for key, value in cpu_state_dict(model).items():
        assert torch.equal(fresh.state_dict()[key], value)
    assert fresh_scheduler.last_epoch == scheduler.last_epoch
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def test_missing_or_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no training state at .*nothing\.state \(saved by run\)"):
        load_training_state(tmp_path / "nothing.state", hint="saved by run")
    save_training_state(tmp_path / "other.state", {"format": "other"})
    assert load_training_state(tmp_path / "other.state")["format"] == "other"  # no format asked for
    with pytest.raises(ValueError, match="not a MedServe training state"):
        load_training_state(tmp_path / "other.state", expected_format="test")
    torch.save([1, 2], tmp_path / "list.state")
    with pytest.raises(ValueError, match="not a MedServe training state"):
        load_training_state(tmp_path / "list.state")
