"""A checkpoint replaced under load, on a real process: no request fails, every answer names the version that made it.

The server is ``medserve serve`` (through ``tests.reliability.gated_server``, which registers the test
architectures) on a loopback port. Its model is a ``PixelNet`` with zero weights: version 1 (biases 1, 0) answers
an all-background mask (0), version 2 (biases 0, 1) an all-foreground one (255). While 32 clients send
``/segment`` requests in a loop, the file is replaced (written to a temporary name and renamed, as
``save_checkpoint`` does) and ``POST /admin/models/reload`` is called with an admin key. Checked: every request
answers 200; each answer's ``X-Model-Version`` is the version whose mask it carries; both versions answered; and
every request sent after the reload's answer was answered by version 2.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.app.helpers import decode_png, encode_image, random_image, save_pixel_model
from tests.deploy.helpers import ROOT, Service, free_port, start, wait_for_status

pytestmark = pytest.mark.slow

CLIENTS = 32
CLIENT_KEY = "cli-Rt5Yu7Io9Pa1Sd3Fg5Hj"
ADMIN_KEY = "adm-Vb2Nm4Qw6Er8Ty0Ui2Op"
BEFORE, AFTER = 64, 64  # answers wanted before the replacement and after the reload returned
SAFETY_S = 300.0  # bounds every wait: a broken server fails the test instead of hanging the suite


@dataclass(frozen=True)
class Answer:
    sent: int  # the global sequence number when the request was sent
    status: int
    version: str | None
    value: int | None  # the one value of the mask (0 or 255), None when it is not uniform
    error: str | None = None


def save_version(path: Path, biases: tuple[float, float]) -> str:
    return save_pixel_model(path, weights=(0.0, 0.0), biases=biases).version


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Service, Path]]:
    models = tmp_path / "models"
    models.mkdir()
    save_version(models / "seg.pt", (1.0, 0.0))
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "MEDSERVE_API_KEYS": f"{CLIENT_KEY}:infer,{ADMIN_KEY}:admin",
        "MEDSERVE_MODEL_POLL_S": "0",
        "MEDSERVE_KEEP_VERSIONS": "1",
        "MEDSERVE_MAX_BATCH_SIZE": "8",
        "MEDSERVE_MAX_QUEUE": "256",
        "MEDSERVE_DECODE_WORKERS": "2",
        "MEDSERVE_TORCH_THREADS": "1",
        "MEDSERVE_ACCESS_LOG": "false",
    }
    command = [sys.executable, "-m", "tests.reliability.gated_server", "serve", "--model-dir", str(models)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    server = start(command, env, port, tmp_path / "server.log", cwd=ROOT)
    try:
        wait_for_status(server, "/health/ready", 200)
        yield server, models
    finally:
        server.stop()


def test_replacing_the_checkpoint_under_32_clients_fails_no_request(service: tuple[Service, Path]) -> None:
    server, models = service
    first = httpx.get(server.url + "/models", headers={"X-API-Key": CLIENT_KEY}).json()["models"][0][
        "version"
    ]
    body = encode_image(random_image(24, 20, seed=5))
    answers: list[Answer] = []
    lock = threading.Lock()
    sequence = iter(range(10**9))
    stop = threading.Event()
    reloaded_at: list[int] = []  # the sequence number when the reload answered

    def after_reload() -> int:
        with lock:
            return sum(1 for a in answers if reloaded_at and a.sent > reloaded_at[0])

    def client() -> None:
        headers = {"X-API-Key": CLIENT_KEY, "Content-Type": "image/png"}
        with httpx.Client(base_url=server.url, timeout=SAFETY_S, headers=headers) as http:
            while not stop.is_set():
                with lock:
                    sent = next(sequence)
                try:
                    response = http.post("/segment", content=body)
                except httpx.HTTPError as exc:
                    answer = Answer(sent, 0, None, None, f"{type(exc).__name__}: {exc}")
                else:
                    value = None
                    if response.status_code == 200:
                        values = np.unique(decode_png(response.content))
                        value = int(values[0]) if len(values) == 1 else None
                    text = None if response.status_code == 200 else response.text
                    answer = Answer(
                        sent, response.status_code, response.headers.get("x-model-version"), value, text
                    )
                with lock:
                    answers.append(answer)

    deadline = time.monotonic() + SAFETY_S
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        workers = [pool.submit(client) for _ in range(CLIENTS)]
        try:
            while len(answers) < BEFORE and time.monotonic() < deadline:
                time.sleep(0.02)
            second = save_version(models / "seg.pt", (0.0, 1.0))
            reload = httpx.post(
                server.url + "/admin/models/reload", headers={"X-API-Key": ADMIN_KEY}, timeout=SAFETY_S
            )
            with lock:
                reloaded_at.append(next(sequence))
            while after_reload() < AFTER and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            stop.set()
        for worker in workers:
            worker.result()
    listing = httpx.get(server.url + "/models", headers={"X-API-Key": CLIENT_KEY}).json()

    assert reload.status_code == 200, reload.text
    assert reload.json()["replaced"] == ["seg"] and reload.json()["versions"] == {"seg": second}
    failures = [a for a in answers if a.status != 200]
    assert not failures, failures[:5]
    by_version = {first: 0, second: 255}
    mismatched = [a for a in answers if a.version not in by_version or by_version[a.version] != a.value]
    assert not mismatched, mismatched[:5]
    late = [a for a in answers if a.sent > reloaded_at[0]]
    assert len(late) >= AFTER and all(a.version == second for a in late)
    counts = {v: sum(1 for a in answers if a.version == v) for v in by_version}
    assert counts[first] >= BEFORE and counts[second] >= AFTER, counts
    (model,) = listing["models"]
    assert [(v["version"], v["state"]) for v in model["versions"]] == [
        (second, "serving"),
        (first, "previous"),
    ]
    print(f"{len(answers)} answers, {counts[first]} by {first}, {counts[second]} by {second}, 0 failed")
