"""Shared by the reliability scripts: small models, the service as a real process, its memory, and uploads.

The service runs as ``python -m training serve`` (the ``medserve serve`` command: uvicorn, graceful shutdown,
JSON logs) on 127.0.0.1 and a free port only. Memory is read from ``/proc`` (Linux): resident set (RSS) and
proportional set (PSS: shared library pages divided among the processes sharing them, so PSS of all workers
adds up to what they really cost together).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint  # noqa: E402
from models.preprocessing import Preprocessing  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
READY_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_models(directory: Path, *, unet_channels: tuple[int, ...] = (8, 16, 32), tile: int = 64) -> None:
    """Random-weight models for load tests: ``unet.pt`` (segmentation, tiles of ``tile``) and ``resnet.pt``."""
    from models.classifier import Classifier
    from models.unet import UNet

    torch.manual_seed(0)
    args: dict[str, Any] = {"in_channels": 1, "out_channels": 2, "channels": list(unet_channels)}
    save_checkpoint(
        directory / "unet.pt",
        UNet(**args).eval(),
        CheckpointMetadata(
            task="segmentation",
            architecture=Architecture(name="unet", args=args),
            classes=["background", "lesion"],
            preprocessing=Preprocessing(in_channels=1, img_size=(tile, tile)),
        ),
    )
    net = Classifier(backbone="resnet18", num_classes=2, in_channels=1, head="gap", pretrained="none")
    save_checkpoint(
        directory / "resnet.pt",
        net.eval(),
        CheckpointMetadata(
            task="classification",
            architecture=Architecture(name="classifier", args=net.architecture_args()),
            classes=["benign", "malignant"],
            preprocessing=Preprocessing(in_channels=1, img_size=(64, 64), resize="resize"),
        ),
    )


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def phantom(height: int, width: int, seed: int) -> np.ndarray:
    """A gray image with a bright disc on noise (uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.integers(height // 4, 3 * height // 4), rng.integers(width // 4, 3 * width // 4)
    r = rng.integers(min(height, width) // 8, min(height, width) // 3)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) * 110.0
    return np.clip(rng.normal(70, 25, (height, width)) + disc, 0, 255).astype(np.uint8)


def memory_kib(pid: int) -> dict[str, int]:
    """``rss`` and ``pss`` of a process in KiB (0 when it is gone)."""
    values = {"rss": 0, "pss": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                values["rss"] = int(line.split()[1])
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                values["pss"] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return values


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        # Fields after the command (which may hold spaces) start after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry.name))
    return sorted(found)


class Service:
    """``python -m training serve`` as a child process on a loopback port.

    Args:
        model_dir: the checkpoints to serve.
        log: file for the process's output (JSON log lines).
        env: extra ``MEDSERVE_*`` settings.
        workers: ``--workers`` (uvicorn worker processes).
    """

    def __init__(self, model_dir: Path, log: Path, env: dict[str, str], workers: int = 1) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "MEDSERVE_MODEL_DIR": str(model_dir), **env}
        command = [sys.executable, "-m", "training", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--workers", str(workers)]
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def worker_pids(self) -> list[int]:
        """The processes that serve: the uvicorn workers (spawned by multiprocessing; its resource tracker is
        not one), or the process itself with one worker."""
        workers = []
        for pid in children(self.pid):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if b"spawn_main" in command:
                workers.append(pid)
        return workers or [self.pid]

    async def wait_ready(self, headers: dict[str, str] | None = None) -> float:
        """Polls /health/ready; returns the seconds it took."""
        started = time.monotonic()
        async with httpx.AsyncClient(headers=headers) as client:
            while time.monotonic() - started < READY_TIMEOUT_S:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"the service exited with {self.process.returncode}; see {self.log_path}"
                    )
                try:
                    if (await client.get(f"{self.base}/health/ready")).status_code == 200:
                        return time.monotonic() - started
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError(f"the service was not ready after {READY_TIMEOUT_S:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM, then waits (graceful shutdown); kills only if it does not exit in ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return int(self.process.returncode)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def encode_request(
    host: str, port: int, method: str, path: str, body: bytes, headers: dict[str, str], *, keep_alive: bool
) -> bytes:
    """An HTTP/1.1 request as bytes, encoded once so a load generator can replay it."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [] if keep_alive else ["Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Reads one response (it must carry Content-Length, as the service's do): (status, lower-case headers, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return int(status_line.split()[1]), headers, body


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class RawHttp:
    """A minimal HTTP/1.1 client on asyncio streams, for load generation: far less CPU per request than httpx,
    which matters when the load generator shares a 2-core machine with the service.

    Each request opens its own loopback connection (``Connection: close``), so an open-loop generator never
    waits for a free connection.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def request_bytes(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        return encode_request(self.host, self.port, method, path, body, headers, keep_alive=False)

    async def send(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """Sends a request made by ``request_bytes``; returns (status, lower-case headers, body)."""
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(raw)
            await writer.drain()
            return await read_response(reader)
        finally:
            await close_writer(writer)


class KeepAliveConnection:
    """One persistent HTTP/1.1 connection (keep-alive), sending requests one after another, like
    ``ab -k`` or ``wrk``: the lightest closed-loop load generator, so that on a 2-core machine the client takes
    as little CPU from the service as possible."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def request_bytes(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        return encode_request(self.host, self.port, method, path, body, headers, keep_alive=True)

    async def send(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """Sends a request made by ``request_bytes``; returns (status, lower-case headers, body). Reconnects
        on the next request when the server closed the connection, by saying so or by closing an idle one
        (uvicorn's keep-alive timeout is 5 s: a connection that waited longer, e.g. while slow warm-up
        requests finished, is gone), as pooling HTTP clients do."""
        if self._streams is not None and self._streams[0].at_eof():
            await self.close()
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        writer.write(raw)
        await writer.drain()
        status, headers, body = await read_response(reader)
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, body

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            await close_writer(writer)
