"""GET /metrics, the request id, and the structured (JSON) logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.logs import ServiceLogHandler, configure_logging
from tests.app.helpers import (
    PNG,
    assert_problem,
    encode_image,
    random_image,
    save_mean_classifier,
    save_pixel_model,
    serve,
    settings,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    save_pixel_model(tmp_path / "pixel.pt")
    save_mean_classifier(tmp_path / "mean.pt")
    return tmp_path


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_requests_batches_queue_and_models(model_dir: Path) -> None:
    images = [encode_image(random_image(10, 10, seed=i)) for i in range(12)]
    async with serve(settings(model_dir, max_batch_delay_ms=50)) as (_, client):
        ok = await asyncio.gather(*(client.post("/segment", content=i, headers=PNG) for i in images))
        assert {r.status_code for r in ok} == {200}
        bad = await client.post("/segment", content=b"not an image", headers=PNG)
        assert_problem(bad, 400, "invalid-image")
        assert (await client.post("/classify", content=images[0], headers=PNG)).status_code == 200
        assert_problem(await client.get("/nowhere"), 404, "not-found")
        response = await client.get("/metrics")
        models = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    requests = "medserve_requests_total"
    assert value(found, requests, endpoint="/segment", model="pixel", status="200") == 12
    assert value(found, requests, endpoint="/segment", model="pixel", status="400") == 1  # model resolved
    assert value(found, requests, endpoint="/classify", model="mean", status="200") == 1
    assert (
        value(found, requests, endpoint="unmatched", model="", status="404") == 1
    )  # no client path as label
    assert value(found, "medserve_request_duration_seconds_count", endpoint="/segment", model="pixel") == 13
    # Batch sizes and queue waits agree with the batcher's own counters.
    stats = models["pixel"]["stats"]
    assert value(found, "medserve_batch_size_count", model="pixel") == stats["batches"]
    assert value(found, "medserve_batch_size_sum", model="pixel") == stats["requests"] == 12
    assert stats["batches"] < 12  # concurrent requests were batched, and the histogram shows it
    assert value(found, "medserve_queue_wait_seconds_count", model="pixel") == 12
    assert value(found, "medserve_batch_duration_seconds_count", model="pixel") == stats["batches"]
    assert value(found, "medserve_queue_depth", model="pixel") == 0
    assert value(found, "medserve_queue_limit", model="pixel") == 256
    assert value(found, "medserve_model_ready", model="mean") == 1
    assert value(found, "medserve_model_load_seconds", model="pixel") == models["pixel"]["load_seconds"]
    assert value(found, "medserve_rejected_total", model="pixel", reason="queue_full") == 0
    assert value(found, "process_resident_memory_bytes") > 0
    assert not any(name.startswith("medserve_gpu_memory") for name, _ in found)  # CPU: no GPU gauges


async def test_two_apps_in_one_process_keep_separate_metrics(model_dir: Path) -> None:
    image = encode_image(random_image(8, 8, seed=0))
    async with serve(settings(model_dir)) as (_, first), serve(settings(model_dir)) as (_, second):
        await first.post("/segment", content=image, headers=PNG)
        first_text = (await first.get("/metrics")).text
        second_text = (await second.get("/metrics")).text
    segment = {"endpoint": "/segment", "model": "pixel", "status": "200"}
    assert value(samples(first_text), "medserve_requests_total", **segment) == 1
    assert value(samples(second_text), "medserve_requests_total", **segment) == 0


async def test_request_id_is_echoed_when_safe_and_generated_otherwise(model_dir: Path) -> None:
    image = encode_image(random_image(8, 8, seed=1))
    async with serve(settings(model_dir)) as (_, client):
        given = await client.post("/segment", content=image, headers={**PNG, "X-Request-ID": "his-42.a:b_c"})
        generated = await client.post("/segment", content=image, headers=PNG)
        forged = await client.get("/models", headers={"X-Request-ID": 'x" level=ERROR msg="forged'})
        too_long = await client.get("/models", headers={"X-Request-ID": "a" * 129})
        error = await client.post("/segment", content=b"junk", headers={**PNG, "X-Request-ID": "err-1"})
        other = await client.post("/segment", content=image, headers=PNG)
    assert given.headers["x-request-id"] == "his-42.a:b_c"
    hex_id = re.compile(r"^[0-9a-f]{32}$")
    for response in (generated, forged, too_long, other):
        assert hex_id.match(response.headers["x-request-id"])
    assert generated.headers["x-request-id"] != other.headers["x-request-id"]
    assert error.headers["x-request-id"] == "err-1" and error.status_code == 400


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The service's JSON handler on the root logger, writing here; removed afterwards."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    assert configure_logging("json", "info", stream=stream)
    yield stream
    for handler in [h for h in root.handlers if isinstance(h, ServiceLogHandler)]:
        root.removeHandler(handler)
    root.setLevel(level)


async def test_logs_are_json_with_the_request_id_and_no_file_names(
    model_dir: Path, log_stream: io.StringIO
) -> None:
    image = encode_image(random_image(8, 8, seed=2))
    secret_name = "Doe_Jane_1961-04-02.png"
    async with serve(settings(model_dir)) as (_, client):
        ok = await client.post("/segment", files={"file": (secret_name, image, "image/png")})
        bad = await client.post(
            "/classify",
            files=[("file", ("a.png", image, "image/png")), ("file", (secret_name, b"garbage", "image/png"))],
            headers={"X-Request-ID": "trace-7"},
        )
    assert secret_name in bad.json()["detail"]  # the client is told which file ...
    text = log_stream.getvalue()
    assert secret_name not in text and "Doe_Jane" not in text  # ... the log never names it
    records = [json.loads(line) for line in text.splitlines()]
    for record in records:
        assert {"time", "level", "logger", "message", "request_id"} <= record.keys()
    access = {r["request_id"]: r for r in records if r["logger"] == "medserve.access"}
    first = access[ok.headers["x-request-id"]]
    assert first["endpoint"] == "/segment" and first["status"] == 200 and first["model"] == "pixel"
    assert first["duration_ms"] >= 0
    assert access["trace-7"]["status"] == 400
    # The problem line of the failed request carries its id too, so an operator can find it.
    assert any(r["logger"] == "medserve.errors" and r["request_id"] == "trace-7" for r in records)


def test_log_configuration_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("json", "loud")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml", "info")  # type: ignore[arg-type]
