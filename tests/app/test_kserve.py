"""The Open Inference Protocol (KServe v2) endpoints, driven in process: metadata, readiness, JSON and binary
tensors, and errors with the protocol's ``error`` member."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.contract import ModelInput
from app.runners import load_runner
from models.checkpoint import load_model
from tests.app.helpers import assert_problem, save_mean_classifier, save_unet, serve, settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    save_unet(tmp_path / "unet.pt", tile=(32, 32))
    save_mean_classifier(tmp_path / "bright.pt", size=(16, 16))
    return tmp_path


def _logits(path: Path, tensor: np.ndarray) -> np.ndarray:
    model, _ = load_model(path, torch.device("cpu"))
    with torch.inference_mode():
        return model.eval()(torch.from_numpy(tensor)).numpy()


def _tensor(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


async def test_server_and_model_metadata(model_dir: Path) -> None:
    async with serve(settings(model_dir)) as (_, client):
        server = (await client.get("/v2")).json()
        assert server["name"] == "medserve" and "binary_tensor_data" in server["extensions"]
        assert (await client.get("/v2/health/live")).json() == {"live": True}
        assert (await client.get("/v2/health/ready")).status_code == 200
        unet = (await client.get("/v2/models/unet")).json()
        version = unet["versions"][0]
        assert unet["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 32, 32]}]
        assert unet["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 2, 32, 32]}]
        assert unet["parameters"]["preprocessing"]["mean"] == [0.5]
        assert (await client.get(f"/v2/models/unet/versions/{version}")).json() == unet
        classifier = (await client.get("/v2/models/bright")).json()
        assert [o["name"] for o in classifier["outputs"]] == ["logits", "probabilities"]
        assert classifier["parameters"]["classes"] == ["dark", "bright"]
        assert (await client.get("/v2/models/unet/ready")).status_code == 200
        assert (await client.get(f"/v2/models/unet/versions/{version}/ready")).status_code == 200
        assert (await client.get("/v2/models/unet/versions/nope/ready")).status_code == 400
        assert (await client.get("/v2/models/nope/ready")).status_code == 400


async def test_json_infer_gives_the_networks_logits(model_dir: Path) -> None:
    tensor = _tensor((3, 1, 32, 32), seed=1)
    async with serve(settings(model_dir)) as (_, client):
        body = {
            "id": "req-1",
            "inputs": [
                {
                    "name": "input",
                    "shape": [3, 1, 32, 32],
                    "datatype": "FP32",
                    "data": tensor.ravel().tolist(),
                }
            ],
        }
        response = await client.post("/v2/models/unet/infer", json=body)
        stats = (await client.get("/models")).json()
    assert response.status_code == 200, response.text
    (unet_stats,) = [m["stats"] for m in stats["models"] if m["name"] == "unet"]
    assert unet_stats["requests"] == 3  # each row went through the model's batcher
    answer = response.json()
    assert answer["id"] == "req-1" and answer["model_name"] == "unet"
    assert answer["model_version"] == response.headers["X-Model-Version"]
    (output,) = answer["outputs"]
    assert output["name"] == "logits" and output["shape"] == [3, 2, 32, 32]
    got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_allclose(got, _logits(model_dir / "unet.pt", tensor), rtol=1e-5, atol=1e-5)


async def test_binary_infer_and_probabilities_follow_the_temperature(model_dir: Path) -> None:
    tensor = _tensor((2, 1, 16, 16), seed=2)
    header = {
        "inputs": [
            {
                "name": "input",
                "shape": [2, 1, 16, 16],
                "datatype": "FP32",
                "parameters": {"binary_data_size": tensor.nbytes},
            }
        ],
        "outputs": [
            {"name": "logits", "parameters": {"binary_data": True}},
            {"name": "probabilities", "parameters": {"binary_data": False}},
        ],
    }
    head = json.dumps(header).encode()
    async with serve(settings(model_dir)) as (_, client):
        response = await client.post(
            "/v2/models/bright/infer",
            content=head + tensor.tobytes(),
            headers={
                "Inference-Header-Content-Length": str(len(head)),
                "Content-Type": "application/octet-stream",
            },
        )
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    answer = json.loads(response.content[:length])
    logits_entry, probs_entry = answer["outputs"]
    assert logits_entry["parameters"]["binary_data_size"] == 2 * 2 * 4 and "data" not in logits_entry
    logits = np.frombuffer(response.content[length:], dtype="<f4").reshape(2, 2)
    expected = _logits(model_dir / "bright.pt", tensor)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    probabilities = np.asarray(probs_entry["data"]).reshape(2, 2)
    scaled = expected / 2.0  # the checkpoint's temperature
    np.testing.assert_allclose(
        probabilities, np.exp(scaled) / np.exp(scaled).sum(1, keepdims=True), rtol=1e-5
    )


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (
            {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]},
            422,
            "shape",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1, 1, 16, 16], "datatype": "FP32", "data": [0.0] * 256}]},
            422,
            "named",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "INT8", "data": [0] * 256}]},
            422,
            "datatype",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32", "data": [0.0] * 7}]},
            422,
            "values",
        ),
        ({"inputs": []}, 422, "inputs"),
    ],
)
async def test_bad_requests_are_problems_with_an_error_member(
    model_dir: Path, body: dict[str, object], status: int, words: str
) -> None:
    async with serve(settings(model_dir)) as (_, client):
        response = await client.post("/v2/models/bright/infer", json=body)
    problem = assert_problem(response, status, "invalid-request")
    assert words in problem["error"] and problem["error"] == problem["detail"]


async def test_unknown_model_version_and_broken_json(model_dir: Path) -> None:
    async with serve(settings(model_dir)) as (_, client):
        missing = await client.post("/v2/models/nope/infer", json={"inputs": []})
        wrong_version = await client.get("/v2/models/unet/versions/0000")
        broken = await client.post("/v2/models/unet/infer", content=b"{not json")
        too_long = await client.post(
            "/v2/models/unet/infer", content=b"{}", headers={"Inference-Header-Content-Length": "99"}
        )
    assert "nope" in assert_problem(missing, 404, "model-not-found")["error"]
    assert_problem(wrong_version, 404, "version-not-found")
    assert_problem(broken, 400, "bad-request")
    assert_problem(too_long, 400, "bad-request")


async def test_classify_problems_keep_their_shape(model_dir: Path) -> None:
    async with serve(settings(model_dir)) as (_, client):
        response = await client.post("/classify?model=nope", files={"file": ("a.png", b"x", "image/png")})
    assert "error" not in response.json()  # only the /v2 endpoints speak the protocol's error member


def test_raw_and_task_inputs_share_a_batch_in_order(model_dir: Path) -> None:
    runner = load_runner(
        "bright", model_dir / "bright.pt", device=torch.device("cpu"), precision="fp32", forward_batch_size=4
    )
    images = [torch.from_numpy(_tensor((1, 16, 16), seed=s)) for s in range(4)]
    task_inputs = [ModelInput(image, 16, 16) for image in images[:2]]
    raw_inputs = [ModelInput.network_input(image) for image in images[2:]]
    mixed = runner.run_batch([raw_inputs[0], task_inputs[0], raw_inputs[1], task_inputs[1]])
    alone_task = runner.run_batch(task_inputs)
    np.testing.assert_allclose(mixed[1], alone_task[0])
    np.testing.assert_allclose(mixed[3], alone_task[1])
    expected = _logits(model_dir / "bright.pt", torch.stack(images[2:]).numpy())
    np.testing.assert_allclose(np.stack([mixed[0], mixed[2]]), expected, rtol=1e-5, atol=1e-6)
    assert mixed[0].shape == (2,) and np.isclose(mixed[1].sum(), 1.0)  # logits vs probabilities


async def test_versions_kept_after_a_reload_are_served_by_version(tmp_path: Path) -> None:
    from tests.app.helpers import save_pixel_model

    key = "kserve-admin-key-0123456789"
    headers = {"X-API-Key": key}
    first = save_pixel_model(tmp_path / "seg.pt", weights=(0.0, 0.0), biases=(1.0, 0.0)).version
    config = settings(tmp_path, api_keys=f"{key}:admin+infer", model_poll_s=0.0, keep_versions=1)
    body = {"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32", "data": [0.0] * 256}]}
    async with serve(config) as (_, client):
        second = save_pixel_model(tmp_path / "seg.pt", weights=(0.0, 0.0), biases=(0.0, 1.0)).version
        assert (await client.post("/admin/models/reload", headers=headers)).status_code == 200
        metadata = (await client.get("/v2/models/seg", headers=headers)).json()
        new = await client.post("/v2/models/seg/infer", json=body, headers=headers)
        old = await client.post(f"/v2/models/seg/versions/{first}/infer", json=body, headers=headers)
    assert metadata["versions"] == [second, first]
    assert new.json()["model_version"] == second and old.json()["model_version"] == first
    new_logits = np.asarray(new.json()["outputs"][0]["data"]).reshape(2, 16, 16)
    old_logits = np.asarray(old.json()["outputs"][0]["data"]).reshape(2, 16, 16)
    assert (new_logits[1] > new_logits[0]).all() and (old_logits[0] > old_logits[1]).all()
