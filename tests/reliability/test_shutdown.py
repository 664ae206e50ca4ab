"""SIGTERM under load, on a real process: the 32 requests in flight complete, new ones are refused, exit code 0.

The server is ``medserve serve`` (uvicorn, its signal handling and graceful shutdown, the lifespan draining the
batcher) on a loopback port, serving a model whose forward waits for a gate file. The test fills the service
with 32 requests while the gate is closed, sends SIGTERM, checks that new connections are refused while the 32
are still pending, then opens the gate.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.preprocessing import Preprocessing
from tests.app.helpers import decode_png, encode_image, expected_binary_mask, random_image
from tests.reliability.gated_server import FileGatedNet

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
KEY = "sd-4Rt6Yu8Io0Pa2Sd4Fg6H"
IN_FLIGHT = 32
SAFETY_S = 120.0  # bounds every wait: a broken server fails the test instead of hanging the suite


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path, Path]]:
    gate = tmp_path / "gate"
    models = tmp_path / "models"
    models.mkdir()
    args: dict[str, Any] = {"gate_file": str(gate)}
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="test-file-gated", args=args),
        classes=["background", "lesion"],
        preprocessing=Preprocessing(in_channels=1, img_size=(16, 16), mean=[0.5], std=[0.25]),
    )
    save_checkpoint(models / "gated.pt", FileGatedNet(**args), meta)
    port = free_port()
    env = {
        **os.environ,
        "MEDSERVE_WARMUP": "false",
        "MEDSERVE_MAX_BATCH_SIZE": "4",
        "MEDSERVE_MAX_BATCH_DELAY_MS": "0",
        "MEDSERVE_MAX_QUEUE": "64",
        "MEDSERVE_API_KEYS": KEY,
        "MEDSERVE_SHUTDOWN_TIMEOUT_S": "60",
        "MEDSERVE_LOG_FORMAT": "json",
        "MEDSERVE_DECODE_WORKERS": "2",
    }
    command = [sys.executable, "-m", "tests.reliability.gated_server", "serve", "--model-dir", str(models)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process, f"http://127.0.0.1:{port}", gate, log
    finally:
        gate.touch()
        if process.poll() is None:
            process.kill()
            process.wait()


async def wait_ready(process: subprocess.Popen[bytes], base: str, log: Path) -> None:
    deadline = time.monotonic() + SAFETY_S
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            try:
                if (await client.get(f"{base}/health/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("the server never became ready:\n" + log.read_text())


async def test_sigterm_finishes_every_request_in_flight_refuses_new_ones_and_exits_0(
    server: tuple[subprocess.Popen[bytes], str, Path, Path],
) -> None:
    process, base, gate, log = server
    await wait_ready(process, base, log)
    images = [random_image(20, 24, seed=i) for i in range(IN_FLIGHT)]
    auth = {"X-API-Key": KEY}
    limits = httpx.Limits(max_connections=IN_FLIGHT + 4)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=SAFETY_S, headers=auth) as client:
        in_flight = [
            asyncio.create_task(
                client.post("/segment", content=encode_image(a), headers={"content-type": "image/png"})
            )
            for a in images
        ]
        # All 32 accepted: one batch held in the model, the rest queued.
        deadline = time.monotonic() + SAFETY_S
        while True:
            async with httpx.AsyncClient(base_url=base, headers=auth) as probe:
                stats = (await probe.get("/models")).json()["models"][0]["stats"]
            if stats["requests"] + stats["queue_depth"] == IN_FLIGHT:
                break
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.02)
        assert not any(task.done() for task in in_flight)

        process.send_signal(signal.SIGTERM)
        # New connections are refused while the accepted requests are still waiting for the model.
        refused = False
        while not refused and time.monotonic() < deadline:
            try:
                async with httpx.AsyncClient(base_url=base, headers=auth) as late:
                    await late.get("/health/live")
                await asyncio.sleep(0.02)
            except httpx.ConnectError:
                refused = True
        assert refused, "the server kept accepting connections after SIGTERM"
        assert not any(task.done() for task in in_flight)
        assert process.poll() is None  # still draining

        gate.touch()
        responses = await asyncio.gather(*in_flight)
    for image, response in zip(images, responses, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(decode_png(response.content), expected_binary_mask(image))
        assert response.headers["x-request-id"]
    assert process.wait(timeout=SAFETY_S) == 0

    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line of the process is a JSON object
    assert KEY not in log.read_text()
    access = [r for r in records if r.get("logger") == "medserve.access" and r.get("endpoint") == "/segment"]
    assert len(access) == IN_FLIGHT and all(r["status"] == 200 and r["request_id"] for r in access)
    assert len({r["request_id"] for r in access}) == IN_FLIGHT
