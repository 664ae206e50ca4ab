"""Triton's own HTTP client (``tritonclient[http]``) against a real ``medserve serve`` process: readiness,
metadata, and infer outputs equal to the PyTorch model's logits for the same tensor, with JSON and binary
tensors, and with an API key."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from models.checkpoint import Architecture, CheckpointMetadata, load_model, save_checkpoint
from models.preprocessing import Preprocessing
from tests.app.helpers import save_unet
from tests.deploy.helpers import Service, free_port, start, wait_for_status

KEY = "kserve-test-key-0123456789"


def _save_resnet(path: Path) -> None:
    from models.classifier import Classifier

    torch.manual_seed(0)
    net = Classifier(backbone="resnet18", num_classes=3, in_channels=3, head="gap", pretrained="none")
    meta = CheckpointMetadata(
        task="classification",
        architecture=Architecture(name="classifier", args=net.architecture_args()),
        classes=["normal", "benign", "malignant"],
        preprocessing=Preprocessing(
            in_channels=3, img_size=(64, 64), resize="resize", mean=[0.5] * 3, std=[0.25] * 3
        ),
    )
    save_checkpoint(path, net.eval(), meta)


@dataclass
class Served:
    process: Service
    model_dir: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model_dir = tmp_path_factory.mktemp("kserve-models")
    save_unet(model_dir / "unet.pt", tile=(32, 32))
    _save_resnet(model_dir / "resnet.pt")
    port = free_port()
    env = dict(
        os.environ, MEDSERVE_API_KEYS=KEY, MEDSERVE_BATCH_AUTOTUNE="false", MEDSERVE_MAX_BATCH_SIZE="4"
    )
    command = [
        sys.executable,
        "-m",
        "training.cli",
        "serve",
        "--model-dir",
        str(model_dir),
        "--host",
        "127.0.0.1",
    ]
    process = start([*command, "--port", str(port)], env, port, model_dir / "service.log", Path.cwd())
    try:
        wait_for_status(process, "/health/ready", 200)
        yield Served(process, model_dir)
    finally:
        process.stop()


def _client(served: Served) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{served.process.port}")


def _logits(path: Path, tensor: np.ndarray) -> np.ndarray:
    model, _ = load_model(path, torch.device("cpu"))
    with torch.inference_mode():
        return model.eval()(torch.from_numpy(tensor)).numpy()


def auth() -> dict[str, str]:
    # A new dict per call: tritonclient adds its own headers (Inference-Header-Content-Length) to the one given.
    return {"X-API-Key": KEY}


def test_readiness_and_metadata(served: Served) -> None:
    client = _client(served)
    assert client.is_server_live()  # open, like /health/live
    assert client.is_server_ready()
    assert client.is_model_ready("resnet", headers=auth())
    metadata = client.get_model_metadata("resnet", headers=auth())
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 64, 64]}]
    assert {o["name"] for o in metadata["outputs"]} == {"logits", "probabilities"}
    version = metadata["versions"][0]
    assert client.is_model_ready("resnet", model_version=version, headers=auth())
    assert not client.is_model_ready("resnet", model_version="0" * 12, headers=auth())
    assert client.get_server_metadata(headers=auth())["name"] == "medserve"


@pytest.mark.parametrize("binary", [True, False])
def test_classifier_infer_equals_the_pytorch_logits(served: Served, binary: bool) -> None:
    tensor = np.random.default_rng(3).normal(size=(5, 3, 64, 64)).astype(np.float32)
    request = httpclient.InferInput("input", list(tensor.shape), "FP32")
    request.set_data_from_numpy(tensor, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "probabilities")
    ]
    result = _client(served).infer("resnet", [request], outputs=outputs, headers=auth())
    logits = result.as_numpy("logits")
    np.testing.assert_allclose(logits, _logits(served.model_dir / "resnet.pt", tensor), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(axis=1), 1.0, rtol=1e-5)
    assert result.get_response()["model_name"] == "resnet"


def test_unet_infer_on_a_version_equals_the_pytorch_logits(served: Served) -> None:
    client = _client(served)
    version = client.get_model_metadata("unet", headers=auth())["versions"][0]
    tensor = np.random.default_rng(4).normal(size=(2, 1, 32, 32)).astype(np.float32)
    request = httpclient.InferInput("input", list(tensor.shape), "FP32")
    request.set_data_from_numpy(tensor)
    result = client.infer("unet", [request], model_version=version, headers=auth())
    assert result.as_numpy("logits").shape == (2, 2, 32, 32)
    np.testing.assert_allclose(
        result.as_numpy("logits"),
        _logits(served.model_dir / "unet.pt", tensor),
        rtol=1e-4,
        atol=1e-4,
    )


def test_errors_reach_the_client_as_messages(served: Served) -> None:
    client = _client(served)
    wrong = httpclient.InferInput("input", [1, 3, 32, 32], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 32, 32), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="input shape must be"):
        client.infer("resnet", [wrong], headers=auth())
    with pytest.raises(InferenceServerException, match="API key is required"):
        client.get_model_metadata("resnet")  # no key
