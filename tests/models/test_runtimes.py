"""models.runtimes: each engine gives PyTorch's logits; the ONNX cache reuses valid entries and rebuilds others."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import models.runtimes as runtimes
from models.checkpoint import Architecture, CheckpointMetadata, load_model, save_checkpoint
from models.preprocessing import Preprocessing
from models.runtimes import (
    RuntimeUnavailable,
    cache_path,
    cached_entry_problem,
    onnx_artefact,
    onnxruntime_engine,
    openvino_engine,
    torch_engine,
)
from models.unet import UNet
from tests.components import require_module

ARGS: dict[str, Any] = {"in_channels": 1, "out_channels": 3, "channels": [4, 8]}


@pytest.fixture(scope="module")
def unet(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, CheckpointMetadata]:
    torch.manual_seed(0)
    net = UNet(**ARGS)
    with torch.no_grad():
        net.train()(torch.randn(4, 1, 32, 32))  # batch-norm statistics off their defaults
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="unet", args=ARGS),
        classes=["background", "a", "b"],
        preprocessing=Preprocessing(in_channels=1, img_size=(32, 32)),
    )
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, net.eval(), meta)
    return load_model(path)


@pytest.fixture(scope="module")
def exported(
    unet: tuple[torch.nn.Module, CheckpointMetadata], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    model, meta = unet
    return onnx_artefact(model, meta, tmp_path_factory.mktemp("cache"), "tiny").path


def batch(size: int) -> torch.Tensor:
    return torch.randn((size, 1, 32, 32), generator=torch.Generator().manual_seed(size))


def reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(x)
        return out


@pytest.mark.parametrize("kind", ["torch-channels-last", "torch-contiguous", "onnxruntime", "openvino"])
def test_every_engine_gives_the_pytorch_logits_at_any_batch_size(
    unet: tuple[torch.nn.Module, CheckpointMetadata], exported: Path, kind: str
) -> None:
    model, _ = unet
    if kind == "torch-channels-last":
        engine = torch_engine(model, torch.device("cpu"))
    elif kind == "torch-contiguous":
        engine = torch_engine(model, torch.device("cpu"), channels_last=False)
    elif kind == "onnxruntime":
        engine = onnxruntime_engine(exported, threads=1)
    else:
        require_module("openvino", "pip install 'medserve[openvino]'")
        engine = openvino_engine(exported, threads=1, input_shape=(1, 32, 32))
    for size in (1, 3, 5):
        x = batch(size)
        got = engine(x)
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        torch.testing.assert_close(got, reference(model, x), atol=1e-4, rtol=1e-3)


def test_openvino_output_is_not_overwritten_by_the_next_call(exported: Path) -> None:
    require_module("openvino", "pip install 'medserve[openvino]'")
    engine = openvino_engine(exported, threads=1, input_shape=(1, 32, 32))
    first = engine(batch(2))
    kept = first.clone()
    engine(batch(3))
    torch.testing.assert_close(first, kept)


def test_a_missing_provider_or_package_is_a_clear_unavailable_runtime(
    exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeUnavailable, match=r"no NoSuchExecutionProvider .* onnxruntime-gpu"):
        onnxruntime_engine(exported, threads=1, provider="NoSuchExecutionProvider")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(RuntimeUnavailable, match=r"pip install 'medserve\[openvino\]'"):
        openvino_engine(exported, threads=1, input_shape=(1, 32, 32))
    assert runtimes.openvino_available() is None


def test_the_cache_reuses_a_valid_entry_and_rebuilds_a_stale_one(
    unet: tuple[torch.nn.Module, CheckpointMetadata], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, meta = unet
    first = onnx_artefact(model, meta, tmp_path, "tiny")
    assert first.path == cache_path(tmp_path, "tiny", meta.version) and not first.cached
    assert cached_entry_problem(first.path, meta.version) is None
    assert "not other" in (cached_entry_problem(first.path, "other") or "not other")
    calls: list[Path] = []
    real_export = runtimes.export_model

    def counting_export(*args: Any, **kwargs: Any) -> Any:
        calls.append(Path(args[2]))
        return real_export(*args, **kwargs)

    monkeypatch.setattr(runtimes, "export_model", counting_export)
    again = onnx_artefact(model, meta, tmp_path, "tiny")
    assert again.cached and calls == []
    sidecar = first.path.with_name(first.path.name + ".json")
    data = json.loads(sidecar.read_text())
    data["version"] = "0" * 16  # an entry left by another version under this name
    sidecar.write_text(json.dumps(data))
    rebuilt = onnx_artefact(model, meta, tmp_path, "tiny")
    assert not rebuilt.cached and calls == [first.path]
    assert rebuilt.rebuilt is not None and "holds version 0000000000000000" in rebuilt.rebuilt


def test_the_export_leaves_the_served_model_as_it_was(
    unet: tuple[torch.nn.Module, CheckpointMetadata], tmp_path: Path
) -> None:
    model, meta = unet
    served = model.to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in served.state_dict().items()}
    onnx_artefact(served, meta, tmp_path, "tiny")
    assert not served.training
    conv_weight = next(p for p in served.parameters() if p.ndim == 4)
    assert conv_weight.is_contiguous(memory_format=torch.channels_last)  # still in the layout it serves in
    for key, value in served.state_dict().items():
        torch.testing.assert_close(value, before[key])
