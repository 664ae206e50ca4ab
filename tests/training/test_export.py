"""`medserve export`: exported ONNX / TorchScript models give the PyTorch model's outputs, with metadata beside."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import models.export as export_module
from models.checkpoint import Architecture, CheckpointMetadata, load_model, save_checkpoint
from models.export import ExportError, export_model, read_export_metadata
from models.preprocessing import Preprocessing
from models.registry import register_architecture
from training.cli import main as cli_main

UNET_ARGS: dict[str, Any] = {"in_channels": 1, "out_channels": 3, "channels": [4, 8, 16], "norm": "batch"}


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.unet import UNet

    torch.manual_seed(0)
    model = UNet(**UNET_ARGS)
    with torch.no_grad():  # non-trivial parameters, so a wrong export cannot match by accident
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.train()(torch.randn(4, 1, 32, 32) * 2 + 1)  # batch-norm running statistics off their defaults
    model.eval()
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="unet", args=UNET_ARGS),
        classes=["background", "lesion", "vessel"],
        preprocessing=Preprocessing(in_channels=1, img_size=(32, 32), mean=[0.4], std=[0.2]),
    )
    path = tmp_path_factory.mktemp("ckpt") / "lesions.pt"
    save_checkpoint(path, model, meta)
    return path


@pytest.fixture(scope="module")
def onnx_export(unet_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "lesions.onnx"
    code = cli_main(["export", "--model", str(unet_checkpoint), "--format", "onnx", "--out", str(out)])
    assert code == 0
    return out


def _reference(checkpoint: Path, x: np.ndarray) -> np.ndarray:
    model, _ = load_model(checkpoint)
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_onnx_export_matches_pytorch_at_other_batch_and_sizes(
    unet_checkpoint: Path, onnx_export: Path
) -> None:
    session = ort.InferenceSession(str(onnx_export), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "image"
    assert inp.shape == ["batch", 1, "height", "width"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    rng = np.random.default_rng(1)
    # Sizes the export never saw, including ones that are not multiples of the U-Net's 2**depth = 4.
    for shape in [(3, 1, 37, 50), (1, 1, 9, 6), (2, 1, 64, 23)]:
        x = rng.standard_normal(shape).astype(np.float32)
        (got,) = session.run(None, {"image": x})
        expected = _reference(unet_checkpoint, x)
        assert got.shape == (shape[0], 3, shape[2], shape[3])
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_onnx_export_writes_checkpoint_metadata_beside_and_inside(
    unet_checkpoint: Path, onnx_export: Path
) -> None:
    _, ckpt_meta = load_model(unet_checkpoint)
    sidecar = onnx_export.with_name("lesions.onnx.json")
    assert sidecar.is_file()
    meta, info = read_export_metadata(onnx_export)
    assert meta.version == ckpt_meta.version
    assert meta.classes == ["background", "lesion", "vessel"]
    assert meta.preprocessing == ckpt_meta.preprocessing
    assert info["format"] == "onnx"
    assert info["inputs"][0]["shape"] == ["batch", 1, "height", "width"]
    assert info["outputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert info["verification"]["checked"] is True
    assert info["verification"]["max_abs_diff"] < 1e-4
    # The JSON is plain checkpoint metadata plus an "export" block: the service's own parser accepts it.
    assert CheckpointMetadata.model_validate_json(sidecar.read_text()).version == ckpt_meta.version
    props = {p.key: p.value for p in onnx.load(str(onnx_export)).metadata_props}
    assert json.loads(props["medserve"])["version"] == ckpt_meta.version


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_matches_pytorch(unet_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    code = cli_main(["export", "--model", str(unet_checkpoint), "--format", "torchscript", "--out", str(out)])
    assert code == 0
    extra = {"medserve.json": ""}
    loaded = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["medserve.json"])["classes"] == ["background", "lesion", "vessel"]
    x = np.random.default_rng(2).standard_normal((2, 1, 45, 30)).astype(np.float32)
    with torch.inference_mode():
        got = loaded(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _reference(unet_checkpoint, x), atol=1e-5, rtol=1e-4)
    meta, info = read_export_metadata(out)
    assert info["format"] == "torchscript" and meta.task == "segmentation"


class _TinyClassifier(nn.Module):
    """Conv + batch norm + linear head: the layer types of the torchvision backbones, at test size."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        )
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


register_architecture("test_tiny_classifier", lambda **kw: _TinyClassifier(**kw))


def _classifier() -> tuple[nn.Module, CheckpointMetadata]:
    torch.manual_seed(3)
    model = _TinyClassifier(3, 4)
    model.train()
    model(torch.randn(8, 3, 24, 24) * 2 + 1)  # batch-norm running statistics far from the defaults
    meta = CheckpointMetadata(
        task="classification",
        architecture=Architecture(name="test_tiny_classifier", args={"in_channels": 3, "num_classes": 4}),
        classes=["normal", "benign", "malignant", "other"],
        preprocessing=Preprocessing(in_channels=3, img_size=(24, 24), resize="resize"),
    )
    return model.eval(), meta


def test_classifier_onnx_export_has_dynamic_batch_and_fixed_size(tmp_path: Path) -> None:
    model, meta = _classifier()
    result = export_model(model, meta, tmp_path / "cls.onnx", "onnx")
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 24, 24]
    x = np.random.default_rng(4).standard_normal((5, 3, 24, 24)).astype(np.float32)
    (got,) = session.run(None, {"image": x})
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    assert got.shape == (5, 4)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    assert result.sidecar["export"]["outputs"][0]["shape"] == ["batch", 4]


def test_export_that_does_not_match_pytorch_fails_and_leaves_no_file(
    unet_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_runner = export_module._torchscript_runner

    def off_by_a_little(path: Path) -> Callable[[np.ndarray], np.ndarray]:
        run = real_runner(path)
        return lambda x: run(x) + 1e-2

    monkeypatch.setattr(export_module, "_torchscript_runner", off_by_a_little)
    model, meta = load_model(unet_checkpoint)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_model(model, meta, tmp_path / "bad.pt", "torchscript")
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_a_bad_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    code = cli_main(["export", "--model", str(bogus), "--format", "onnx", "--out", str(tmp_path / "x.onnx")])
    assert code == 2
    assert "bogus.pt" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_cli_rejects_an_unknown_format(unet_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(
            ["export", "--model", str(unet_checkpoint), "--format", "tflite", "--out", str(tmp_path / "x")]
        )
    assert exc.value.code == 2


def test_an_onnx_export_is_always_checked_and_fails_without_onnxruntime(
    unet_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime is a dependency: an installation without it cannot check, so it cannot export (no file is
    left), instead of writing an unchecked file with a warning."""
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    model, meta = load_model(unet_checkpoint)
    with pytest.raises(ExportError, match="needs onnxruntime, a MedServe dependency"):
        export_model(model, meta, tmp_path / "unchecked.onnx", "onnx")
    assert list(tmp_path.iterdir()) == []
    code = cli_main(
        ["export", "--model", str(unet_checkpoint), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]
    )
    assert code == 1
    assert not (tmp_path / "x.onnx").exists()
