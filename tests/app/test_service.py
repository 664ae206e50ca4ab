"""Startup, readiness, /models, settings, shutdown, client disconnects and the OpenAPI description."""

from __future__ import annotations

import argparse
import asyncio
import threading
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.cli import add_arguments
from app.cli import main as serve_main
from app.main import create_app
from app.settings import SettingsError, check_runtime, load_settings
from tests.app.helpers import (
    BUILD_GATE,
    PNG,
    SEEN,
    assert_problem,
    decode_png,
    encode_image,
    expected_binary_mask,
    open_gate,
    random_image,
    save_pixel_model,
    save_unet,
    serve,
    settings,
    wait_until,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    with open_gate("service") as event:
        yield event


async def test_readiness_is_503_until_the_models_are_loaded(tmp_path: Path) -> None:
    save_pixel_model(tmp_path / "slow.pt", architecture="test-slow-build")
    BUILD_GATE.clear()
    try:
        async with serve(settings(tmp_path), wait_loaded=False) as (app, client):
            assert (await client.get("/health/live")).status_code == 200
            not_ready = await client.get("/health/ready")
            assert_problem(not_ready, 503, "not-ready")
            assert int(not_ready.headers["retry-after"]) >= 1
            early = await client.post("/segment", content=encode_image(random_image(8, 8, 0)), headers=PNG)
            assert_problem(early, 503, "not-ready")
            assert (await client.get("/models")).json()["models"][0]["status"] == "loading"
            BUILD_GATE.set()
            await app.state.registry.loaded.wait()
            ready = await client.get("/health/ready")
            assert ready.status_code == 200
            assert ready.json() == {"status": "ready", "models": {"slow": "ready"}}
    finally:
        BUILD_GATE.set()


async def test_broken_checkpoint_is_listed_with_its_error_while_the_others_serve(tmp_path: Path) -> None:
    good = save_pixel_model(tmp_path / "good.pt")
    (tmp_path / "broken.pt").write_bytes(b"this is not a checkpoint")
    (tmp_path / "notes.txt").write_text("ignored: not a *.pt file")
    image = random_image(12, 12, seed=2)
    async with serve(settings(tmp_path)) as (_, client):
        listing = (await client.get("/models")).json()
        assert (await client.get("/health/ready")).status_code == 200
        response = await client.post("/segment", content=encode_image(image), headers=PNG)
        broken = await client.post("/segment?model=broken", content=encode_image(image), headers=PNG)
    models = {m["name"]: m for m in listing["models"]}
    assert set(models) == {"good", "broken"}
    assert models["broken"]["status"] == "failed"
    assert "broken.pt" in models["broken"]["error"]
    assert str(tmp_path) not in models["broken"]["error"]  # the server's directory stays private
    assert models["good"]["status"] == "ready"
    assert models["good"]["version"] == good.version
    assert models["good"]["task"] == "segmentation"
    assert models["good"]["classes"] == ["background", "lesion"]
    assert models["good"]["input_size"] == [16, 16]
    assert models["good"]["metrics"] == {"dice": 0.9}
    assert response.status_code == 200
    np.testing.assert_array_equal(decode_png(response.content), expected_binary_mask(image))
    assert_problem(broken, 503, "model-unavailable")


async def test_empty_model_directory_is_never_ready(tmp_path: Path) -> None:
    async with serve(settings(tmp_path)) as (_, client):
        body = assert_problem(await client.get("/health/ready"), 503, "not-ready")
        assert "no checkpoint" in body["detail"]
        response = await client.post("/segment", content=encode_image(random_image(8, 8, 0)), headers=PNG)
        assert_problem(response, 404, "model-not-found")


async def test_warmup_runs_the_model_before_ready(tmp_path: Path) -> None:
    save_pixel_model(tmp_path / "watched.pt", record="warmup")
    SEEN.pop("warmup", None)
    async with serve(settings(tmp_path, max_batch_size=4)) as (_, client):
        assert (await client.get("/health/ready")).status_code == 200
        # Batch 1 and the largest batch, before any request.
        assert [len(batch) for batch in SEEN["warmup"]] == [1, 4]


@pytest.mark.parametrize(
    ("cost", "chosen"),
    [
        ({"base": 0.05, "per_item": 0.001}, 8),  # fixed cost per batch: the largest batch is fastest
        ({"quadratic": 0.005}, 1),  # slower per image as batches grow (memory-bound): batches of 1
    ],
)
async def test_batch_size_is_tuned_at_warmup_to_the_fastest(
    tmp_path: Path, cost: dict[str, Any], chosen: int
) -> None:
    save_pixel_model(tmp_path / "sleepy.pt", architecture="test-sleepy", **cost)
    config = settings(tmp_path, max_batch_size=8, batch_autotune=True, max_batch_delay_ms=200)
    images = [random_image(8, 8, seed=i) for i in range(12)]
    async with serve(config) as (app, client):
        info = (await client.get("/models")).json()["models"][0]
        responses = await asyncio.gather(
            *(client.post("/segment", content=encode_image(a), headers=PNG) for a in images)
        )
        sizes = app.state.registry.models["sleepy"].batcher.stats.batch_sizes
    assert info["batch_autotune"]["chosen"] == chosen
    assert info["stats"]["max_batch_size"] == chosen
    assert set(info["batch_autotune"]["images_per_second"]) <= {"1", "2", "4", "8"}
    assert max(sizes) <= chosen
    for image, response in zip(images, responses, strict=True):
        np.testing.assert_array_equal(decode_png(response.content), expected_binary_mask(image))


async def test_client_that_disconnects_while_queued_is_dropped_before_inference(
    tmp_path: Path, gate: threading.Event
) -> None:
    save_pixel_model(tmp_path / "gated.pt", gate="service", record="disconnect")
    SEEN.pop("disconnect", None)
    config = settings(tmp_path, warmup=False, max_batch_delay_ms=0)
    busy_image = encode_image(np.full((8, 8), 10, dtype=np.uint8))
    gone_image = encode_image(np.full((8, 8), 250, dtype=np.uint8))
    async with serve(config) as (app, client):
        batcher = app.state.registry.models["gated"].batcher
        gate.clear()
        busy = asyncio.create_task(client.post("/segment", content=busy_image, headers=PNG))
        await wait_until(lambda: batcher.stats.batches == 1, "the model is busy")

        # Speak ASGI directly to disconnect after sending the body, as a closed socket does under uvicorn.
        disconnect = asyncio.Event()
        messages = [{"type": "http.request", "body": gone_image, "more_body": False}]

        async def receive() -> MutableMapping[str, Any]:
            if messages:
                return messages.pop(0)
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            pass

        headers = [(b"content-type", b"image/png"), (b"content-length", str(len(gone_image)).encode())]
        scope = http_scope(b"/segment", headers)
        gone = asyncio.create_task(app(scope, receive, send))
        await wait_until(lambda: batcher.queue_depth == 1, "the second request is queued")
        disconnect.set()
        await gone
        assert batcher.queue_depth == 0 and batcher.stats.cancelled == 1
        gate.set()
        assert (await busy).status_code == 200
    seen = [value for batch in SEEN["disconnect"] for value in batch]
    assert len(seen) == 1  # only the first request's image ever reached the model
    assert seen[0] == pytest.approx((10 / 255 - 0.5) / 0.25)


async def test_client_that_disconnects_during_upload_costs_nothing(tmp_path: Path) -> None:
    save_pixel_model(tmp_path / "pixel.pt")
    async with serve(settings(tmp_path)) as (app, client):
        batcher = app.state.registry.models["pixel"].batcher
        messages: list[MutableMapping[str, Any]] = [
            {"type": "http.request", "body": b"\x89PNG\r\n", "more_body": True},
            {"type": "http.disconnect"},
        ]
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> MutableMapping[str, Any]:
            return messages.pop(0)

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        await app(http_scope(b"/segment", [(b"content-type", b"image/png")]), receive, send)
        assert sent[0]["status"] == 499  # logged as such; nobody is listening any more
        assert batcher.announced == 0 and batcher.queue_depth == 0 and batcher.stats.requests == 0
        ok = await client.post("/segment", content=encode_image(random_image(8, 8, 0)), headers=PNG)
        assert ok.status_code == 200


def http_scope(path: bytes, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """An ASGI HTTP scope for speaking to the app directly (to disconnect the way a closed socket does)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path.decode(),
        "raw_path": path,
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("medserve.test", 80),
        "state": {},
    }


async def test_shutdown_finishes_accepted_requests(tmp_path: Path, gate: threading.Event) -> None:
    save_pixel_model(tmp_path / "gated.pt", gate="service")
    config = settings(tmp_path, warmup=False, max_batch_size=2, max_batch_delay_ms=0)
    images = [random_image(8, 8, seed=i) for i in range(5)]
    app = create_app(config)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://medserve.test") as client:
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        await app.state.registry.loaded.wait()
        batcher = app.state.registry.models["gated"].batcher
        gate.clear()
        requests = [
            asyncio.create_task(client.post("/segment", content=encode_image(a), headers=PNG)) for a in images
        ]
        await wait_until(lambda: batcher.stats.requests + batcher.queue_depth == 5, "all five accepted")
        stopping = asyncio.create_task(lifespan.__aexit__(None, None, None))
        await wait_until(lambda: batcher._closing, "shutdown has begun")
        gate.set()
        await stopping
        responses = await asyncio.gather(*requests)
    for image, response in zip(images, responses, strict=True):
        assert response.status_code == 200
        np.testing.assert_array_equal(decode_png(response.content), expected_binary_mask(image))


def test_invalid_settings_name_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSERVE_MAX_BATCH_SIZE", "0")
    monkeypatch.setenv("MEDSERVE_PRECISION", "fp8")
    with pytest.raises(SettingsError) as error:
        load_settings()
    message = str(error.value)
    assert "MEDSERVE_MAX_BATCH_SIZE='0'" in message
    assert "MEDSERVE_PRECISION='fp8'" in message


def test_settings_come_from_the_environment_and_arguments_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSERVE_MAX_BATCH_DELAY_MS", "2.5")
    monkeypatch.setenv("MEDSERVE_MAX_QUEUE", "7")
    config = load_settings(max_queue=9)
    assert config.max_batch_delay_s == pytest.approx(0.0025)
    assert config.max_queue == 9


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="MEDSERVE_MODEL_DIR"):
        check_runtime(load_settings(model_dir=tmp_path / "absent"))


def test_serve_command_reports_bad_settings_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert serve_main(parser.parse_args(["--model-dir", str(tmp_path / "absent")])) == 2
    assert "MEDSERVE_MODEL_DIR" in capsys.readouterr().err
    monkeypatch.setenv("MEDSERVE_MAX_QUEUE", "-1")
    assert serve_main(parser.parse_args(["--model-dir", str(tmp_path)])) == 2
    assert "MEDSERVE_MAX_QUEUE='-1'" in capsys.readouterr().err


async def test_startup_fails_clearly_on_invalid_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDSERVE_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("MEDSERVE_DEVICE", "gpu")
    app = create_app()  # what `uvicorn app.main:app` does: settings read at startup
    with pytest.raises(SettingsError, match="MEDSERVE_DEVICE='gpu'"):
        async with app.router.lifespan_context(app):
            pass


async def test_openapi_documents_both_upload_forms_and_the_problem_format(tmp_path: Path) -> None:
    save_unet(tmp_path / "unet.pt")
    async with serve(settings(tmp_path)) as (_, client):
        schema = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
    segment = schema["paths"]["/segment"]["post"]
    body = segment["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/png" in body and "image/jpeg" in body
    assert body["multipart/form-data"]["schema"]["required"] == ["file"]
    assert {"png", "overlay", "json"} <= set(
        next(p for p in segment["parameters"] if p["name"] == "format")["schema"]["enum"]
    )
    assert "example" in segment["responses"]["200"]["content"]["application/json"]
    for status in ("400", "404", "413", "415", "422", "503", "504"):
        assert "application/problem+json" in segment["responses"][status]["content"]
    assert {"/models", "/health/live", "/health/ready"} <= set(schema["paths"])
    assert docs.status_code == 200
