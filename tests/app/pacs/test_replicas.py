"""Two real service processes share one PostgreSQL job queue: every job runs and is delivered exactly once."""

from __future__ import annotations

import concurrent.futures
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app.pacs.results import read_delivery_log
from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.preprocessing import Preprocessing
from models.unet import UNet
from tests.app.pacs.helpers import instance, stow_body
from tests.app.pacs.postgres import postgres_server
from tests.deploy.helpers import (
    Service,
    image_command_env,
    image_replicas,
)
from tests.models.test_dicom import to_bytes

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning:pydicom"),
]
JOBS = 40


def tiny_unet(folder: Path) -> None:
    args: dict[str, Any] = {"in_channels": 1, "out_channels": 2, "channels": [4, 8], "norm": "batch"}
    torch.manual_seed(0)
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="unet", args=args),
        classes=["background", "lesion"],
        preprocessing=Preprocessing(in_channels=1, img_size=(32, 32)),
    )
    save_checkpoint(folder / "tiny.pt", UNet(**args).eval(), meta)


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[list[Service], Path]]:
    models = tmp_path / "models"
    models.mkdir()
    tiny_unet(models)
    results = tmp_path / "results"
    with postgres_server() as url:
        env = image_command_env(
            models,
            extra={
                "MEDSERVE_TORCH_THREADS": "1",
                "MEDSERVE_JOBS_DB": url,
                "MEDSERVE_SPOOL_DIR": str(tmp_path / "spool"),  # shared: either process runs any job
                "MEDSERVE_RESULTS_DIR": str(results),
                "MEDSERVE_JOBS_CONCURRENCY": "4",
                "MEDSERVE_WARMUP": "false",
            },
        )
        with image_replicas(env, tmp_path) as services:
            yield services, results


def _all_done(service: Service) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        jobs = httpx.get(f"{service.url}/jobs", params={"limit": 1000}, timeout=10).json()["jobs"]
        if len(jobs) == JOBS and all(job["state"] == "done" for job in jobs):
            return list(jobs)
        time.sleep(0.2)
    raise AssertionError(f"not all done: {[job['state'] for job in jobs]}\n{service.output()}")


def test_two_processes_drain_one_postgresql_queue_running_each_job_once(
    replicas: tuple[list[Service], Path],
) -> None:
    services, results = replicas
    datasets = [instance(i, size=(32, 32)) for i in range(JOBS)]

    def send(index: int) -> httpx.Response:
        body, content_type = stow_body([to_bytes(datasets[index])])
        target = services[index % 2]  # both receive; either may run what the other received
        return httpx.post(
            f"{target.url}/dicomweb/studies", content=body, headers={"content-type": content_type}, timeout=60
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = [response.status_code for response in pool.map(send, range(JOBS))]
    assert statuses == [200] * JOBS
    jobs = _all_done(services[0])
    assert _all_done(services[1]) == jobs  # one queue, seen alike from both
    deliveries = read_delivery_log(results)
    per_job = Counter(entry.job_id for entry in deliveries)
    assert sorted(per_job) == sorted(job["id"] for job in jobs) and set(per_job.values()) == {1}
    assert {entry.sop_instance_uid for entry in deliveries} == {
        job["result_sop_instance_uid"] for job in jobs
    }
    assert len({entry.pid for entry in deliveries}) == 2  # both processes ran jobs
