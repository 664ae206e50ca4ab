"""MedServe against LitServe and the plain FastAPI recipe on the same models, machine, images and clients (a script).

For each model (``--models``: a random-weight ResNet-18 classifier on 224x224 RGB JPEG uploads, ``/classify``,
and the U-Net 32-512 on 256x256 gray PNG uploads, ``/segment``, answered with the mask as PNG), the servers run
one after the other with the same checkpoint, the same decoding and normalisation (``models.preprocessing``)
and the same two load generators:

* the project's own keep-alive client (``service_process.KeepAliveConnection``, one persistent connection per
  concurrent client);
* ApacheBench (``ab -k``, Debian package ``apache2-utils``), when installed.

LitServe runs ``max_batch_size=16``, ``batch_timeout=10 ms``; the FastAPI app one forward per request; both run
the model as PyTorch eager in channels_last. MedServe runs with its defaults (``MEDSERVE_RUNTIME=auto``: the
fastest verified runtime per batch size; ``--runtime torch`` for PyTorch eager only). The raw PyTorch eager
forward pass (no HTTP, no decoding) is timed at batch 1 and 16 before and after the servers, in this process.

The goal (issue 20): MedServe's throughput at c=32 at least 1.5x LitServe's, and its p50 at c=1 below the raw
eager forward time of one image, with both clients; the script prints both and writes everything, with the
runtime MedServe chose per batch size and its candidates' timings, to
``benchmarks/results/compare-litserve-<time>.json``. ``--table FILE`` prints the Markdown tables of a result
file (as in docs/experiments/serving.md).

LitServe is not a MedServe dependency (``pip install litserve``). Run it alone on the machine::

    python benchmarks/compare_litserve.py                  # both models, all three servers, both clients
    python benchmarks/compare_litserve.py --quick          # fewer requests, LitServe and MedServe only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
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
import torch
from service_process import KeepAliveConnection

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("resnet18", "unet")
ENDPOINT = {"resnet18": "/classify", "unet": "/segment"}

# The server programs: each loads the checkpoint with models.checkpoint, runs it like MedServe's PyTorch path
# does (models.inference: channels_last, inference mode) and decodes with models.preprocessing, so only the
# serving machinery (and MedServe's runtime) differs. Classification answers the probabilities as JSON;
# segmentation the mask as PNG (base64 in JSON for LitServe, whose answers are JSON).
COMMON = """
import base64, io, sys, numpy as np, torch
from PIL import Image
sys.path.insert(0, {root!r})
from models.checkpoint import load_model
from models.imageio import read_image
from models.inference import forward, prepare_for_device
from models.preprocessing import prepare

TASK = {task!r}

def answer(scores):
    if TASK == "classification":
        return {{"probabilities": torch.softmax(scores, dim=0).tolist()}}
    mask = scores.argmax(dim=0).to(torch.uint8).numpy() * 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
"""

LITSERVE_APP = (
    COMMON
    + """
import litserve as ls

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
        return forward(self.model, x, torch.device("cpu"))
    def unbatch(self, output):
        return list(output)
    def encode_response(self, scores):
        out = answer(scores)
        return out if isinstance(out, dict) else {{"mask_png": base64.b64encode(out).decode()}}

if __name__ == "__main__":
    api = API(max_batch_size=16, batch_timeout=0.01)
    ls.LitServer(api, accelerator="cpu", timeout=600).run(port={port}, generate_client_file=False)
"""
)

FASTAPI_APP = (
    COMMON
    + """
import uvicorn
from fastapi import FastAPI, UploadFile
from fastapi.responses import Response

model, meta = load_model({checkpoint!r}, "cpu")
model = prepare_for_device(model, torch.device("cpu"))
app = FastAPI()

@app.post("/predict")
def predict(file: UploadFile):
    x = prepare(read_image(file.file.read()).pixels, meta.preprocessing)
    out = answer(forward(model, x[None], torch.device("cpu"))[0])
    return out if isinstance(out, dict) else Response(out, media_type="image/png")

@app.get("/health")
def health():
    return "ok"

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port={port}, log_level="warning")
"""
)


async def drive(port: int, path: str, raw: bytes, concurrency: int, requests: int) -> dict[str, float]:
    """The project's client: a warm-up round, then ``requests`` requests from ``concurrency`` keep-alive
    connections."""
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
        "requests": requests,
        "throughput": requests / seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
    }


def apache_bench(
    url: str, body: Path, content_type: str, concurrency: int, requests: int
) -> dict[str, float]:
    """ApacheBench with keep-alive: one warm-up run of ``concurrency`` requests, then ``requests``."""
    base = ["ab", "-k", "-q", "-s", "600", "-p", str(body), "-T", content_type, "-c", str(concurrency)]
    subprocess.run([*base, "-n", str(concurrency), url], check=True, capture_output=True)
    out = subprocess.run([*base, "-n", str(requests), url], check=True, capture_output=True, text=True).stdout
    return {"requests": requests, **parse_ab(out)}


def parse_ab(out: str) -> dict[str, float]:
    """Throughput, p50 / p95 (whole ms) and keep-alive count from ab's report.

    Raises:
        RuntimeError: requests failed (connection errors, exceptions, non-2xx statuses), or a figure is missing.
    """
    # ab counts an answer whose length differs from the first one's as failed ("Length"): probabilities of
    # other digits are no failure. Connection errors, exceptions and non-2xx statuses are.
    broken = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: \d+, Exceptions: (\d+)\)", out)
    non_2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    if non_2xx or (broken and any(int(n) for n in broken.groups())):
        raise RuntimeError(f"ab: requests failed\n{out}")
    return {
        "throughput": float(_field(out, r"Requests per second:\s+([\d.]+)")),
        "p50_ms": float(_field(out, r"^\s+50%\s+(\d+)")),
        "p95_ms": float(_field(out, r"^\s+95%\s+(\d+)")),
        "keep_alive_requests": int(_field(out, r"Keep-Alive requests:\s+(\d+)")),
    }


def _field(text: str, pattern: str) -> str:
    match = re.search(pattern, text, flags=re.MULTILINE)
    if match is None:
        raise RuntimeError(f"ab output without {pattern!r}:\n{text}")
    return match.group(1)


def wait_ready(url: str, process: subprocess.Popen[bytes], deadline_s: float = 900.0) -> None:
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
    image: tuple[str, bytes, str],
    options: argparse.Namespace,
    requests: int,
    log_path: Path,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One server: every client at every concurrency; returns the levels and (MedServe) its model's /models."""
    image_name, data, ctype = image
    request = httpx.Request(
        "POST", f"http://127.0.0.1:{port}{path}", files={"file": (image_name, data, ctype)}
    )
    body = request.read()
    content_type = request.headers["content-type"]
    raw = KeepAliveConnection("127.0.0.1", port).request_bytes(
        "POST", path, body, {"content-type": content_type}
    )
    log = log_path.open("wb")
    # A session of its own: LitServe runs inference in child processes, which must stop with the server (a
    # leftover one polls its queue and would take CPU from the next server measured).
    process = subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
    )
    described = None
    try:
        wait_ready(f"http://127.0.0.1:{port}{health}", process)
        results: dict[str, Any] = {}
        with tempfile.NamedTemporaryFile(prefix="medserve-ab-", suffix=".body") as body_file:
            body_file.write(body)
            body_file.flush()
            for client in options.clients:
                results[client] = {}
                for concurrency in options.concurrency:
                    count = max(requests, concurrency)
                    if client == "keepalive":
                        level = asyncio.run(drive(port, path, raw, concurrency, count))
                    else:
                        url = f"http://127.0.0.1:{port}{path}"
                        level = apache_bench(url, Path(body_file.name), content_type, concurrency, count)
                    print(
                        f"  {name:<9} {client:<9} c={concurrency:<3d} {level['throughput']:7.2f} req/s  "
                        f"p50 {level['p50_ms']:8.1f} ms  p95 {level['p95_ms']:8.1f} ms",
                        flush=True,
                    )
                    results[client][str(concurrency)] = level
        if name == "medserve":
            models = httpx.get(f"http://127.0.0.1:{port}/models", timeout=30).json()["models"]
            described = {k: models[0].get(k) for k in ("runtime", "batch_autotune", "stats", "load_seconds")}
        return results, described
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left
        process.wait()
        log.close()


def run_model(model: str, options: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    args = bench.parse_args(["--model", model, "--raw-repeats", str(options.raw_repeats)])
    requests = options.requests if model == "resnet18" else options.unet_requests
    model_dir = tmp / model
    model_dir.mkdir()
    checkpoint = bench.build_checkpoint(args, model_dir)
    image = bench.make_images(args)[0]
    task = "classification" if model == "resnet18" else "segmentation"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"\n{model}: {image[0]} ({len(image[1])} bytes), {requests} requests per level", flush=True)
    report: dict[str, Any] = {"servers": {}, "requests": requests, "endpoint": ENDPOINT[model]}
    raw_runs = [bench.raw_forward(checkpoint, args, [1, 16])]
    for name in options.servers:
        port = bench.free_port()
        if name == "medserve":
            command = bench.uvicorn_command(port)
            server_env = {
                **env,
                "MEDSERVE_MODEL_DIR": str(model_dir),
                "MEDSERVE_LOG_LEVEL": "warning",
                "MEDSERVE_RUNTIME": options.runtime,
                "MEDSERVE_RUNTIME_CACHE": str(tmp / "runtime-cache"),
                "MEDSERVE_REQUEST_TIMEOUT_S": "600",
            }
            path, health = ENDPOINT[model], "/health/ready"
        else:
            program = tmp / f"{model}_{name}_app.py"
            template = LITSERVE_APP if name == "litserve" else FASTAPI_APP
            program.write_text(
                template.format(root=str(ROOT), checkpoint=str(checkpoint), port=port, task=task)
            )
            command, server_env, path, health = [sys.executable, str(program)], env, "/predict", "/health"
        started = time.perf_counter()
        levels, described = measure(
            name, command, server_env, port, path, health, image, options, requests,
            bench.RESULTS / f"compare-{model}-{name}.log",
        )  # fmt: skip
        report["servers"][name] = levels
        if described is not None:
            report["medserve"] = described
            runtime = described.get("runtime") or {}
            print(f"  medserve runtime by batch size: {runtime.get('chosen')}", flush=True)
        report.setdefault("server_seconds", {})[name] = round(time.perf_counter() - started, 1)
    raw_runs.append(bench.raw_forward(checkpoint, args, [1, 16]))
    report["raw_forward_runs"] = [{str(k): v for k, v in run.items()} for run in raw_runs]
    report["raw_forward"] = {
        str(size): {
            "ms_per_batch": 1000 * statistics.mean(run[size]["seconds_per_batch"] for run in raw_runs),
            "throughput": statistics.mean(run[size]["throughput"] for run in raw_runs),
        }
        for size in (1, 16)
    }
    report["goal"] = goal(report, options)
    return report


def goal(report: dict[str, Any], options: argparse.Namespace) -> dict[str, Any]:
    """Per client: MedServe / LitServe at the top concurrency (goal >= 1.5) and MedServe's p50 at c=1 against
    the raw eager forward of one image (goal: below)."""
    servers = report["servers"]
    top = str(max(options.concurrency))
    raw1 = report["raw_forward"]["1"]["ms_per_batch"]
    out: dict[str, Any] = {"raw_eager_batch1_ms": raw1}
    for client in options.clients:
        entry: dict[str, Any] = {}
        medserve = servers.get("medserve", {}).get(client, {})
        litserve = servers.get("litserve", {}).get(client, {})
        if top in medserve and top in litserve:
            ratio = medserve[top]["throughput"] / litserve[top]["throughput"]
            entry[f"c{top}_medserve_over_litserve"] = ratio
            entry["throughput_goal_met"] = ratio >= 1.5
        if "1" in medserve:
            entry["p50_c1_ms"] = medserve["1"]["p50_ms"]
            entry["p50_goal_met"] = medserve["1"]["p50_ms"] < raw1
        out[client] = entry
    return out


def print_tables(report: dict[str, Any]) -> None:
    """The Markdown tables of a result file: per model, each server and client at c=1 and c=32."""
    for model, data in report["models"].items():
        raw = data["raw_forward"]
        runtime = (data.get("medserve") or {}).get("runtime") or {}
        chosen = runtime.get("chosen", {})
        autotune = (data.get("medserve") or {}).get("batch_autotune") or {}
        print(f"\n{model} ({data['endpoint']}, {data['requests']} requests per level); raw PyTorch eager "
              f"{raw['1']['ms_per_batch']:.1f} ms at batch 1, {raw['16']['throughput']:.2f} images/s at batch 16; "
              f"MedServe batch size {autotune.get('chosen')}, runtime by batch size: "
              + ", ".join(f"{k}: {v}" for k, v in chosen.items()))  # fmt: skip
        print("\n| server | client | req/s at c=32 | p50 at c=1 | p50 c=1 - raw eager batch 1 |")
        print("| --- | --- | --- | --- | --- |")
        for name, clients in data["servers"].items():
            for client, levels in clients.items():
                label = f"**{name}**" if name == "medserve" else name
                top = levels.get("32", {}).get("throughput")
                p50 = levels.get("1", {}).get("p50_ms")
                print(
                    f"| {label} | {client} | {top:.2f} | {p50:.1f} ms | {p50 - raw['1']['ms_per_batch']:+.1f} ms |"
                    if top is not None and p50 is not None
                    else f"| {label} | {client} | {top} | {p50} | - |"
                )
        goal_info = data["goal"]
        for client, entry in goal_info.items():
            if isinstance(entry, dict) and entry:
                ratio = entry.get("c32_medserve_over_litserve")
                print(
                    f"\n{client}: MedServe / LitServe at c=32 = {ratio:.2f} (goal 1.5: "
                    f"{'met' if entry.get('throughput_goal_met') else 'not met'}); p50 at c=1 "
                    f"{entry.get('p50_c1_ms', float('nan')):.1f} ms vs raw eager "
                    f"{goal_info['raw_eager_batch1_ms']:.1f} ms ({'met' if entry.get('p50_goal_met') else 'not met'})"
                )
        if runtime.get("timings_ms"):
            sizes = sorted({int(s) for row in runtime["timings_ms"].values() for s in row})
            print("\n| MedServe candidate | " + " | ".join(f"batch {s}" for s in sizes) + " |")
            print("| --- |" + " --- |" * len(sizes))
            for name, row in runtime["timings_ms"].items():
                cells = [f"{row[str(s)]:.1f}" if str(s) in row else "-" for s in sizes]
                print(f"| {name} | " + " | ".join(cells) + " |")
            for entry in runtime.get("candidates", []):
                if entry["status"] != "verified":
                    print(f"\n{entry['name']}: {entry['status']} ({entry.get('reason')})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--requests", type=int, default=256, help="measured requests per level, ResNet-18")
    parser.add_argument("--unet-requests", type=int, default=96, help="measured requests per level, U-Net")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--raw-repeats", type=int, default=20)
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=["litserve", "fastapi", "medserve"],
        default=["litserve", "fastapi", "medserve"],
    )
    parser.add_argument("--clients", nargs="+", choices=["keepalive", "ab"], default=None)
    parser.add_argument("--runtime", default="auto", help="MEDSERVE_RUNTIME of the MedServe server")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="64 / 24 requests per level, 5 raw repeats, LitServe and MedServe",
    )
    parser.add_argument(
        "--table", type=Path, metavar="FILE", help="print the tables of a result file and exit"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/...)")
    options = parser.parse_args(argv)
    if options.table is not None:
        print_tables(json.loads(options.table.read_text()))
        return 0
    if options.quick:
        options.requests, options.unet_requests, options.raw_repeats = 64, 24, 5
        if options.servers == ["litserve", "fastapi", "medserve"]:
            options.servers = ["litserve", "medserve"]
    if options.clients is None:
        options.clients = ["keepalive", "ab"] if shutil.which("ab") else ["keepalive"]
        if "ab" not in options.clients:
            print("ApacheBench (ab) is not installed (apt-get install apache2-utils): own client only")
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report: dict[str, Any] = {
        "created_at": stamp,
        "command": "python benchmarks/compare_litserve.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg(),
        },
        "config": {
            "servers": options.servers,
            "clients": options.clients,
            "concurrency": options.concurrency,
            "runtime": options.runtime,
            "raw_repeats": options.raw_repeats,
        },
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="medserve-compare-") as tmp:
        for model in options.models:
            report["models"][model] = run_model(model, options, Path(tmp))
    report["machine"]["load_average_at_end"] = os.getloadavg()
    out = options.out or bench.RESULTS / f"compare-litserve-{stamp}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
