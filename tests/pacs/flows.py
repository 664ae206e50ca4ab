"""Whole flows with real processes: MedServe (``python -m training serve``) wired to a real Orthanc.

``MedServeProcess`` starts the service on a free loopback port with a job store, spool and model directory
that survive a restart (so a test can SIGKILL it and start it again on the same state), delivering results
to an Orthanc's DICOMweb root. ``stow_body`` builds a STOW-RS request (``multipart/related;
type="application/dicom"``). ``wait_for`` polls a condition, failing with a description and the service's
log when it never holds (a safety net against hanging, not a timing assertion).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.preprocessing import Preprocessing
from models.unet import UNet
from tests.deploy.helpers import ROOT, Service, free_port, start, wait_for_status

API_KEY = "pacs-flow-test-key-0123456789"
SAFETY_S = 600.0


def stow_body(parts: Sequence[bytes]) -> tuple[bytes, str]:
    """A STOW-RS body of Part 10 ``parts`` and its content type."""
    boundary = uuid.uuid4().hex
    chunks = []
    for part in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def wait_for(
    condition: Callable[[], bool],
    what: str,
    *,
    deadline_s: float = SAFETY_S,
    log: Callable[[], str] | None = None,
    every_s: float = 0.2,
) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(every_s)
    raise AssertionError(f"never happened within {deadline_s:.0f} s: {what}\n{log() if log else ''}")


def save_tiny_unet(folder: Path, name: str = "tiny") -> Path:
    """A tiny U-Net checkpoint whose masks have both classes on the test images (CT_small: about 21 % lesion,
    the DX of ``dx_dataset(96, seed=3)``: about 32 %): seed 2, the head's weights scaled up and its bias zeroed,
    so the class follows the image content instead of a constant. Returns ``folder``."""
    args: dict[str, Any] = {"in_channels": 1, "out_channels": 2, "channels": [4, 8]}
    torch.manual_seed(2)
    net = UNet(**args).eval()
    head = net.head
    assert head.bias is not None
    with torch.no_grad():
        head.weight.mul_(100.0)
        head.bias.zero_()
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="unet", args=args),
        classes=["background", "lesion"],
        preprocessing=Preprocessing(in_channels=1, img_size=(32, 32)),
    )
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / f"{name}.pt", net, meta)
    return folder


@dataclass
class MedServeProcess:
    """The service as a process; ``start()`` again after ``kill()`` / ``stop()`` reuses its state."""

    workdir: Path
    model_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    service: Service | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": API_KEY}

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                "MEDSERVE_MODEL_DIR": str(self.model_dir),
                "MEDSERVE_API_KEYS": API_KEY,
                "MEDSERVE_JOBS_DB": f"sqlite:///{self.workdir / 'jobs.sqlite'}",
                "MEDSERVE_SPOOL_DIR": str(self.workdir / "spool"),
                "MEDSERVE_LOG_FORMAT": "text",
                "MEDSERVE_WARMUP": "false",
                "MEDSERVE_BATCH_AUTOTUNE": "false",
                "MEDSERVE_TORCH_THREADS": "1",
                "MEDSERVE_DECODE_WORKERS": "2",
            }
        )
        env.update(self.env)
        return env

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        command = [sys.executable, "-m", "training", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        log = self.workdir / f"medserve-{self.starts}.log"
        self.service = start(command, self.environment(), self.port, log, cwd=ROOT)
        wait_for_status(self.service, "/health/ready", 200)

    def kill(self) -> None:
        """SIGKILL: no shutdown work at all, as when a machine loses power."""
        if self.service is not None:
            self.service.stop(signal.SIGKILL)

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop(signal.SIGTERM)

    def output(self) -> str:
        logs = sorted(self.workdir.glob("medserve-*.log"))
        return "\n".join(path.read_text(errors="replace")[-3000:] for path in logs)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120.0)

    def stow(self, parts: Sequence[bytes], study: str | None = None) -> httpx.Response:
        body, content_type = stow_body(parts)
        path = "/dicomweb/studies" + (f"/{study}" if study else "")
        with self.client() as client:
            return client.post(
                path, content=body, headers={"content-type": content_type, "accept": "application/dicom+json"}
            )

    def jobs(self, **query: Any) -> list[dict[str, Any]]:
        """Every job (all pages) matching ``query`` (state=, study=, model=)."""
        found: list[dict[str, Any]] = []
        cursor: Any = None
        with self.client() as client:
            while True:
                params = {**query, **({"cursor": cursor} if cursor else {}), "limit": 500}
                response = client.get("/jobs", params=params)
                response.raise_for_status()
                page = response.json()
                found += page["jobs"] if isinstance(page, dict) else page
                cursor = page.get("next_cursor") if isinstance(page, dict) else None
                if not cursor:
                    return found
