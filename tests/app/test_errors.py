"""Every error status of the service, produced for real, as application/problem+json."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.app.helpers import (
    GATES,
    PNG,
    assert_problem,
    encode_image,
    gated_pixel_model,
    random_image,
    serve,
    settings,
    wait_until,
)

pytestmark = pytest.mark.anyio

SMALL_PNG = encode_image(random_image(8, 8, 0))  # a readable image


@pytest.fixture
def gated_dir(tmp_path: Path) -> Iterator[Path]:
    """A model whose forward waits for GATES['errors'] (open unless a test closes it)."""
    with gated_pixel_model(tmp_path, "errors") as directory:
        yield directory


async def test_unreadable_image_is_400(pixel_dir: Path) -> None:
    async with serve(settings(pixel_dir)) as (_, client):
        response = await client.post("/segment", content=b"\x89PNG\r\n\x1a\n garbage", headers=PNG)
        assert_problem(response, 400, "invalid-image")
        # A text file sent as a multipart upload is no image either.
        response = await client.post("/segment", files={"file": ("notes.txt", b"hello", "text/plain")})
        assert_problem(response, 400, "invalid-image")


async def test_unknown_model_is_404(pixel_dir: Path) -> None:
    async with serve(settings(pixel_dir)) as (_, client):
        response = await client.post("/segment?model=nope", content=SMALL_PNG, headers=PNG)
        body = assert_problem(response, 404, "model-not-found")
        assert "pixel" in body["detail"]  # says what is available
        assert_problem(await client.get("/no-such-endpoint"), 404, "not-found")


async def test_too_many_bytes_is_413_before_the_body_is_read(pixel_dir: Path) -> None:
    data = encode_image(random_image(64, 64, seed=1))
    async with serve(settings(pixel_dir, max_upload_bytes=1024)) as (_, client):
        declared = await client.post("/segment", content=data, headers=PNG)
        assert_problem(declared, 413, "payload-too-large")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: cut off while streaming
            for start in range(0, len(data), 512):
                yield data[start : start + 512]

        streamed = await client.post("/segment", content=chunks(), headers=PNG)
        assert_problem(streamed, 413, "payload-too-large")
        multipart = await client.post("/segment", files={"file": ("big.png", data, "image/png")})
        assert_problem(multipart, 413, "payload-too-large")


async def test_too_many_pixels_is_413(pixel_dir: Path) -> None:
    async with serve(settings(pixel_dir, max_pixels=100)) as (_, client):
        response = await client.post("/segment", content=encode_image(random_image(11, 10, 0)), headers=PNG)
        body = assert_problem(response, 413, "payload-too-large")
        assert "100" in body["detail"]
        ok = await client.post("/segment", content=encode_image(random_image(10, 10, 0)), headers=PNG)
        assert ok.status_code == 200


async def test_unsupported_content_type_is_415(pixel_dir: Path) -> None:
    async with serve(settings(pixel_dir)) as (_, client):
        response = await client.post("/segment", content=b"{}", headers={"content-type": "application/json"})
        assert_problem(response, 415, "unsupported-media-type")
        response = await client.post("/segment", content=b"abc")  # a body without any content type
        assert_problem(response, 415, "unsupported-media-type")


async def test_missing_file_is_422(pixel_dir: Path) -> None:
    async with serve(settings(pixel_dir)) as (_, client):
        wrong_field = await client.post("/segment", files={"image": ("a.png", b"x", "image/png")})
        assert_problem(wrong_field, 422, "missing-file")
        empty = await client.post("/segment", content=b"", headers=PNG)
        assert_problem(empty, 422, "missing-file")
        nothing = await client.post("/segment")
        assert_problem(nothing, 422, "missing-file")
        text_field = await client.post(
            "/segment", data={"file": "not a file"}, files={"other": ("a.png", b"x", "image/png")}
        )
        assert_problem(text_field, 422, "missing-file")


async def test_invalid_parameter_is_422_with_the_parameter_named(pixel_dir: Path) -> None:
    async with serve(settings(pixel_dir)) as (_, client):
        response = await client.post("/segment?format=gif", content=SMALL_PNG, headers=PNG)
        body = assert_problem(response, 422, "invalid-request")
        assert body["errors"][0]["loc"] == ["query", "format"]


async def test_wrong_method_is_405(pixel_dir: Path) -> None:
    async with serve(settings(pixel_dir)) as (_, client):
        assert_problem(await client.get("/segment"), 405, "method-not-allowed")


async def test_full_queue_is_503_with_retry_after_at_once(gated_dir: Path) -> None:
    image = SMALL_PNG
    async with serve(settings(gated_dir, max_queue=1, warmup=False, max_batch_delay_ms=0)) as (app, client):
        batcher = app.state.registry.models["gated"].batcher
        GATES["errors"].clear()
        running = asyncio.create_task(client.post("/segment", content=image, headers=PNG))
        await wait_until(lambda: batcher.stats.batches == 1, "the first request occupies the model")
        queued = asyncio.create_task(client.post("/segment", content=image, headers=PNG))
        await wait_until(lambda: batcher.queue_depth == 1, "the second request is queued")
        refused = await client.post(
            "/segment", content=image, headers=PNG
        )  # answered while the model is busy
        body = assert_problem(refused, 503, "queue-full")
        assert int(refused.headers["retry-after"]) >= 1
        assert "retry" in body["detail"]
        GATES["errors"].set()
        assert (await running).status_code == 200
        assert (await queued).status_code == 200
        # Overload over: the service accepts requests again by itself.
        assert (await client.post("/segment", content=image, headers=PNG)).status_code == 200


async def test_waiting_past_the_timeout_is_504_and_the_request_is_not_run(gated_dir: Path) -> None:
    image = SMALL_PNG
    config = settings(gated_dir, request_timeout_s=0.5, warmup=False, max_batch_delay_ms=0)
    async with serve(config) as (app, client):
        batcher = app.state.registry.models["gated"].batcher
        GATES["errors"].clear()
        running = asyncio.create_task(client.post("/segment", content=image, headers=PNG))
        await wait_until(lambda: batcher.stats.batches == 1, "the first request occupies the model")
        late = await client.post("/segment", content=image, headers=PNG)  # answered while the model is busy
        assert_problem(late, 504, "timeout")
        GATES["errors"].set()
        assert (await running).status_code == 200
        assert batcher.stats.requests == 1 and batcher.stats.timed_out == 1


async def test_a_problem_type_is_resolvable_on_the_service(pixel_dir: Path) -> None:
    async with serve(settings(pixel_dir)) as (_, client):
        response = await client.post("/segment", content=b"junk", headers=PNG)
        described = await client.get(response.json()["type"])
        assert described.status_code == 200
        assert described.json()["status"] == 400
        assert described.json()["title"] == response.json()["title"]
        assert_problem(await client.get("/problems/no-such-problem"), 404, "not-found")
