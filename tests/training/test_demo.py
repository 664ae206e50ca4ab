"""`medserve demo --device`: both demo models train on the device asked for (no CUDA needed: training is faked)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest
from torch import nn

from training.classification import train as classification_train
from training.classification.demo import build_demo_classifier
from training.cli import main as cli_main
from training.common.run import TrainResult
from training.segmentation import train as segmentation_train


def recording_run(devices: dict[str, str], task: str) -> Callable[[argparse.Namespace], TrainResult]:
    """A stand-in for a task's ``train.run`` that records ``--device`` and writes a placeholder checkpoint."""

    def run(args: argparse.Namespace) -> TrainResult:
        devices[task] = args.device
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"placeholder")
        return TrainResult(out, None, [{"epoch": 1}], {"dice": 0.5, "epoch": 1}, nn.Identity(), 0.0)

    return run


def test_demo_device_reaches_both_trainings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    devices: dict[str, str] = {}
    monkeypatch.setattr(segmentation_train, "run", recording_run(devices, "segmentation"))
    monkeypatch.setattr(classification_train, "run", recording_run(devices, "classification"))
    assert cli_main(["demo", "--model-dir", str(tmp_path), "--device", "cuda"]) == 0
    assert devices == {"segmentation": "cuda", "classification": "cuda"}
    assert (tmp_path / "dental.pt").is_file() and (tmp_path / "lesions.pt").is_file()
    out = capsys.readouterr().out
    assert "trained a U-Net" in out and "trained a lesion classifier" in out


def test_demo_classifier_trains_on_the_cpu_unless_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    devices: dict[str, str] = {}
    monkeypatch.setattr(classification_train, "run", recording_run(devices, "classification"))
    build_demo_classifier(tmp_path / "a", n_per_class=2, size=32)
    assert devices == {"classification": "cpu"}
    build_demo_classifier(tmp_path / "b", n_per_class=2, size=32, device="cuda:1")
    assert devices == {"classification": "cuda:1"}
