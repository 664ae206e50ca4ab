"""MedServe against LitServe and the plain FastAPI recipe on the same model, machine and client (a script).

The issue quotes LitServe (``max_batch_size=16``, ``batch_timeout=10 ms``) and a plain FastAPI app (one forward
per request) measured on another machine. This script runs all three here, one after the other, with the same
random-weight ResNet-18 checkpoint (224x224 RGB JPEG, multipart uploads), the same decoding and normalisation
(``models.preprocessing``) and the same keep-alive load generator, and prints req/s at concurrency 32 and p50 at
concurrency 1 for each, with the raw model's speed measured in between.

LitServe is not a MedServe dependency: install it first (``pip install litserve``). Run it alone on the
machine::

    python benchmarks/compare_litserve.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the service does (app/__init__)

import bench_service as bench
import httpx
from service_process import KeepAliveConnection

ROOT = Path(__file__).resolve().parent.parent

# The server programs: each loads the checkpoint with models.checkpoint, runs it like MedServe does
# (models.inference: channels_last, inference mode) and decodes with models.preprocessing, so only the serving
# machinery differs. {checkpoint} is filled in.
LITSERVE_APP = """
import io, sys, numpy as np, torch, litserve as ls
sys.path.insert(0, {root!r})
from models.checkpoint import load_model
from models.imageio import read_image
from models.inference import forward, prepare_for_device
from models.preprocessing import prepare

class API(ls.LitAPI):
    def setup(self, device):
        model, self.meta = load_model({checkpoint!r}, "cpu")
        self.model = prepare_for_device(model, torch.device("cpu"))
    def decode_request(self, request):
        data = request["file"].file.read()
        return prepare(read_image(data).pixels, self.meta.preprocessing)
    def batch(self, inputs):
        return torch.stack(inputs)
    def predict(self, x):
        return torch.softmax(forward(self.model, x, torch.device("cpu")), dim=1)
    def unbatch(self, output):
        return list(output)
    def encode_response(self, probs):
        return {{"probabilities": probs.tolist()}}

if __name__ == "__main__":
    api = API(max_batch_size=16, batch_timeout=0.01)
    ls.LitServer(api, accelerator="cpu", timeout=600).run(port={port}, generate_client_file=False)
"""

FASTAPI_APP = """
import sys, torch, uvicorn
from fastapi import FastAPI, UploadFile
sys.path.insert(0, {root!r})
from models.checkpoint import load_model
from models.imageio import read_image
from models.inference import forward, prepare_for_device
from models.preprocessing import prepare

model, meta = load_model({checkpoint!r}, "cpu")
model = prepare_for_device(model, torch.device("cpu"))
app = FastAPI()

@app.post("/predict")
def predict(file: UploadFile):
    x = prepare(read_image(file.file.read()).pixels, meta.preprocessing)
    probs = torch.softmax(forward(model, x[None], torch.device("cpu")), dim=1)
    return {{"probabilities": probs[0].tolist()}}

@app.get("/health")
def health():
    return "ok"

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port={port}, log_level="warning")
"""


async def drive(port: int, path: str, raw: bytes, concurrency: int, requests: int) -> dict[str, float]:
    """Warm-up round, then ``requests`` requests from ``concurrency`` keep-alive connections."""
    connections = [KeepAliveConnection("127.0.0.1", port) for _ in range(concurrency)]
    latencies: list[float] = []

    async def worker(connection: KeepAliveConnection, counter: Any, record: bool) -> None:
        for _ in counter:
            started = time.perf_counter()
            status, _, _ = await connection.send(raw)
            if status != 200:
                raise RuntimeError(f"{path}: status {status}")
            if record:
                latencies.append(time.perf_counter() - started)

    try:
        warm = iter(range(concurrency))
        await asyncio.gather(*(worker(c, warm, False) for c in connections))
        counter = iter(range(requests))
        started = time.perf_counter()
        await asyncio.gather(*(worker(c, counter, True) for c in connections))
        seconds = time.perf_counter() - started
    finally:
        for connection in connections:
            await connection.close()
    latencies.sort()
    return {
        "throughput": requests / seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
    }


def wait_ready(url: str, process: subprocess.Popen[bytes], deadline_s: float = 300.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready within {deadline_s} s")


def measure(
    name: str,
    argv: list[str],
    env: dict[str, str],
    port: int,
    path: str,
    health: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    image_name, data, ctype = bench.make_images(args)[0]
    request = httpx.Request(
        "POST", f"http://127.0.0.1:{port}{path}", files={"file": (image_name, data, ctype)}
    )
    body = request.read()
    raw = KeepAliveConnection("127.0.0.1", port).request_bytes(
        "POST", path, body, {"content-type": request.headers["content-type"]}
    )
    log = open(bench.RESULTS / f"compare-{name}.log", "wb")  # noqa: SIM115 (closed below)
    # A session of its own: LitServe runs inference in child processes, which must stop with the server (a
    # leftover one polls its queue and would take CPU from the next server measured).
    process = subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}{health}", process)
        results = {}
        for concurrency in args.concurrency:
            level = asyncio.run(drive(port, path, raw, concurrency, max(args.requests, concurrency)))
            print(
                f"{name:<9} c={concurrency:<3d} {level['throughput']:7.2f} req/s  p50 {level['p50_ms']:8.1f} ms"
                f"  p95 {level['p95_ms']:8.1f} ms",
                flush=True,
            )
            results[str(concurrency)] = level
        return results
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left
        process.wait()
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=256, help="measured requests per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--raw-repeats", type=int, default=20)
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=["litserve", "fastapi", "medserve"],
        default=["litserve", "fastapi", "medserve"],
    )
    options = parser.parse_args(argv)
    args = bench.parse_args(["--model", "resnet18", "--raw-repeats", str(options.raw_repeats)])
    args.requests, args.concurrency = options.requests, options.concurrency
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"created_at": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"), "servers": {}}
    with tempfile.TemporaryDirectory(prefix="medserve-compare-") as tmp:
        model_dir = Path(tmp) / "models"
        model_dir.mkdir()
        checkpoint = bench.build_checkpoint(args, model_dir)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        servers = []
        for name, template in (("litserve", LITSERVE_APP), ("fastapi", FASTAPI_APP)):
            port = bench.free_port()
            program = Path(tmp) / f"{name}_app.py"
            program.write_text(template.format(root=str(ROOT), checkpoint=str(checkpoint), port=port))
            path, health = ("/predict", "/health")
            servers.append((name, [sys.executable, str(program)], port, path, health))
        port = bench.free_port()
        medserve = bench.uvicorn_command(port)
        medserve_env = {**env, "MEDSERVE_MODEL_DIR": str(model_dir), "MEDSERVE_LOG_LEVEL": "warning"}
        servers.append(("medserve", medserve, port, "/classify", "/health/ready"))
        for name, command, port, path, health in servers:
            if name not in options.servers:
                continue
            server_env = medserve_env if name == "medserve" else env
            report["servers"][name] = measure(name, command, server_env, port, path, health, args)
        report["raw_forward"] = bench.raw_forward(checkpoint, args, [1, 16])
    out = bench.RESULTS / f"compare-litserve-{report['created_at']}.json"
    out.write_text(json.dumps(report, indent=2))
    raw1 = 1000 * report["raw_forward"][1]["seconds_per_batch"]
    raw16 = report["raw_forward"][16]["throughput"]
    top = str(max(args.concurrency))
    print(f"\nraw forward: batch 1 {raw1:.1f} ms, batch 16 {raw16:.2f} images/s")
    for name, levels in report["servers"].items():
        line = f"{name:<9}"
        if top in levels:
            line += f"  c={top} / raw batch 16 = {levels[top]['throughput'] / raw16:.3f}"
        if "1" in levels:
            line += f"  p50 c=1 - raw batch 1 = {levels['1']['p50_ms'] - raw1:+.1f} ms"
        print(line)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
