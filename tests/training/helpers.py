"""Command lines of the training CLI (``training.cli.main``) for the tests."""

from __future__ import annotations

from pathlib import Path


def train_argv(task: str, data: Path, out: Path, *options: str) -> list[str]:
    """``train TASK --data DATA --out OUT OPTIONS...``"""
    return ["train", task, "--data", str(data), "--out", str(out), *options]


def eval_argv(task: str, model: Path, data: Path, out: Path, *options: str) -> list[str]:
    """``eval TASK --model MODEL --data DATA --out OUT OPTIONS...``"""
    return ["eval", task, "--model", str(model), "--data", str(data), "--out", str(out), *options]
