"""The image's exact command line, run outside Docker, and two such replicas behind nginx with the project's config.

The replicas are started with the Dockerfile's ENTRYPOINT + CMD and ENV; only the listen address (loopback instead
of 0.0.0.0), the port (a free one) and the model directory (a tiny checkpoint written here) differ. nginx is
Debian's, installed with apt-get when missing (the tests skip, saying why, only when that is impossible), and runs
deploy/nginx/medserve.conf with its upstream servers and listen port rewritten to loopback ports.
"""

from __future__ import annotations

import io
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.preprocessing import Preprocessing
from models.unet import UNet
from tests.components import missing
from tests.deploy.helpers import (
    NGINX_CONF,
    Service,
    free_port,
    image_command_env,
    image_replicas,
    install_nginx,
    nginx_main_conf,
    option_value,
    parse_dockerfile,
    render_nginx_conf,
    start,
    wait_for_status,
)

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args: dict[str, Any] = {"in_channels": 1, "out_channels": 2, "channels": [4, 8], "norm": "batch"}
    torch.manual_seed(0)
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="unet", args=args),
        classes=["background", "lesion"],
        preprocessing=Preprocessing(in_channels=1, img_size=(32, 32)),
    )
    folder = tmp_path_factory.mktemp("models")
    save_checkpoint(folder / "tiny.pt", UNet(**args).eval(), meta)
    return folder


@pytest.fixture(scope="module")
def replicas(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Service]]:
    workdir = tmp_path_factory.mktemp("replicas")
    # One intra-op thread each: two replicas share this machine's cores (a test-only setting).
    env = image_command_env(model_dir, extra={"MEDSERVE_TORCH_THREADS": "1"})
    with image_replicas(env, workdir) as services:
        yield services


@pytest.fixture(scope="module")
def nginx(replicas: list[Service], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    binary, reason = install_nginx()
    if binary is None:
        missing("nginx", reason)
    workdir = tmp_path_factory.mktemp("nginx")
    port = free_port()
    conf = workdir / "medserve.conf"
    conf.write_text(render_nginx_conf(NGINX_CONF.read_text(), port, [s.port for s in replicas]))
    (workdir / "nginx.conf").write_text(nginx_main_conf(workdir, conf))
    service = start(
        [binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        port=port,
        log=workdir / "nginx.out",
        cwd=workdir,
    )
    try:
        wait_for_status(service, "/nginx-health", 200, deadline_s=30)
        yield service
    finally:
        service.stop(signal.SIGQUIT)


def _png(height: int, width: int) -> bytes:
    pixels = (np.random.default_rng(0).random((height, width)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _segment(client: httpx.Client, url: str, body: bytes) -> httpx.Response:
    return client.post(url + "/segment", content=body, headers={"Content-Type": "image/png"})


def test_image_command_answers_ready_and_its_healthcheck_passes(replicas: list[Service]) -> None:
    dockerfile = parse_dockerfile()
    service = replicas[0]
    assert httpx.get(service.url + "/health/ready", timeout=10).status_code == 200
    assert httpx.get(service.url + "/health/live", timeout=10).status_code == 200
    models = httpx.get(service.url + "/models", timeout=10).json()
    assert "tiny" in str(models)  # the model directory came from MEDSERVE_MODEL_DIR, as in the image

    port = option_value(dockerfile.command(), "--port")
    env = image_command_env(Path("/nonexistent"))

    def healthcheck(target_port: int) -> int:
        argv = [part.replace(f":{port}/", f":{target_port}/") for part in dockerfile.healthcheck()]
        return subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False).returncode

    assert healthcheck(service.port) == 0
    assert healthcheck(free_port()) != 0  # nothing listens there: the check reports unhealthy


def test_nginx_passes_the_clients_request_id_or_makes_one(nginx: Service) -> None:
    with httpx.Client(timeout=30) as client:
        kept = client.get(nginx.url + "/models", headers={"X-Request-ID": "ris-order-4711"})
        made = [client.get(nginx.url + "/models") for _ in range(2)]
    assert kept.status_code == 200 and kept.headers["x-request-id"] == "ris-order-4711"
    ids = [r.headers["x-request-id"] for r in made]
    # nginx's $request_id (32 hex digits), a new one per request, reached the service and came back.
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1], ids


def test_nginx_spreads_requests_and_losing_a_replica_loses_no_request(
    replicas: list[Service], nginx: Service
) -> None:
    body = _png(40, 50)
    addresses = {f"127.0.0.1:{s.port}" for s in replicas}
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(max_workers=8) as pool:
        first = list(pool.map(lambda _: _segment(client, nginx.url, body), range(16)))
        assert [r.status_code for r in first] == [200] * 16
        assert all(r.content.startswith(PNG_SIGNATURE) for r in first)
        served_by = {r.headers["x-upstream"].split(", ")[-1] for r in first}
        assert served_by == addresses  # both replicas answered

        # Kill one replica while requests are in flight; every request must still be answered.
        victim, survivor = replicas
        done = threading.Semaphore(0)
        killed = threading.Event()

        def send(_: int) -> httpx.Response:
            response = _segment(client, nginx.url, body)
            done.release()
            return response

        def kill_after(n: int) -> None:
            for _ in range(n):
                if not done.acquire(timeout=60):
                    break
            victim.process.kill()
            killed.set()

        killer = threading.Thread(target=kill_after, args=(6,))
        killer.start()
        second = list(pool.map(send, range(48)))
        killer.join(timeout=60)
        assert killed.is_set()
        victim.process.wait(timeout=10)

    statuses = [r.status_code for r in second]
    assert statuses == [200] * len(second), statuses
    assert all(r.content.startswith(PNG_SIGNATURE) for r in second)
    upstreams = [r.headers["x-upstream"] for r in second]
    victim_address, survivor_address = f"127.0.0.1:{victim.port}", f"127.0.0.1:{survivor.port}"
    # nginx tried the dead replica, failed, and re-sent the request to the survivor.
    assert any(u.startswith(victim_address) and u.endswith(survivor_address) for u in upstreams), upstreams
    assert upstreams[-1].endswith(survivor_address)
