"""Load benchmark of the inference service against the raw model (a script, not a test).

It starts the service as a real process (``uvicorn app.main:app`` on 127.0.0.1) with a random-weight model,
sends ``--requests`` requests at each concurrency (multipart uploads; ``--client keepalive``, the default: one
persistent asyncio HTTP/1.1 connection per concurrent client, like ``ab -k``; ``--client httpx``: an httpx
AsyncClient, which costs the shared CPU more per request), and reports
throughput, latency percentiles and the mean batch size the server formed (read from ``GET /models``). In the
same run it measures:

* the raw model: the forward pass alone (no HTTP, no decoding), at batch 1 and at the batch size the server
  formed at the highest concurrency, in this process with the same thread count;
* the service with batching off (``MEDSERVE_MAX_BATCH_SIZE=1``) at the highest concurrency;

and prints the ratios the service is judged by: served throughput / raw throughput at the highest concurrency,
p50 latency at concurrency 1 minus the raw single-image time, and batching on / off. Results are written as JSON
under ``benchmarks/results/`` (server logs beside it are git-ignored).

Usage::

    python benchmarks/bench_service.py                       # U-Net, 256x256 gray PNG
    python benchmarks/bench_service.py --model resnet18      # ResNet-18 classifier, 224x224 RGB JPEG
    python benchmarks/bench_service.py --concurrency 1 8 32 64 --device cuda

Run it alone on the machine (``python benchmarks/bench_service.py``): other load skews the timings.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same OpenMP behaviour as the service (app/__init__)

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service_process import KeepAliveConnection  # noqa: E402  (benchmarks/, the script's own folder)

from models.checkpoint import Architecture, CheckpointMetadata, load_model, save_checkpoint  # noqa: E402
from models.preprocessing import Preprocessing  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
READY_POLLS = 1200  # x 0.25 s: the longest wait for the server to load and warm up


@dataclass
class Level:
    """One load level against one server configuration."""

    label: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch_size: float | None
    server_mean_queue_ms: float | None
    server_mean_batch_ms: float | None
    model_busy: float | None  # fraction of the level's wall time the model thread was running a batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["unet", "resnet18"], default="unet")
    parser.add_argument("--size", type=int, default=None, help="image side (default 256 U-Net, 224 ResNet)")
    parser.add_argument(
        "--unet-channels", default="32,64,128,256,512", help="U-Net widths per level (default: the paper's)"
    )
    parser.add_argument("--requests", type=int, default=64, help="measured requests per level (default 64)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-batch-delay-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads, server and raw (0: default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--skip-unbatched", action="store_true", help="do not run MAX_BATCH_SIZE=1")
    parser.add_argument(
        "--no-autotune",
        action="store_true",
        help="MEDSERVE_BATCH_AUTOTUNE=false: batches up to --max-batch-size",
    )
    parser.add_argument("--raw-repeats", type=int, default=5, help="timed forward passes per raw batch size")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/...)")
    parser.add_argument(
        "--client",
        choices=["keepalive", "httpx"],
        default="keepalive",
        help="load generator: persistent asyncio connections (lightest, default) or httpx.AsyncClient",
    )
    args = parser.parse_args(argv)
    if args.requests < 1 or any(c < 1 for c in args.concurrency) or args.max_batch_size < 1:
        parser.error("--requests, --concurrency and --max-batch-size must be positive")
    if args.size is None:
        args.size = 256 if args.model == "unet" else 224
    return args


def build_checkpoint(args: argparse.Namespace, directory: Path) -> Path:
    """A random-weight model of the benchmarked architecture, saved as a MedServe checkpoint."""
    torch.manual_seed(0)
    size = (args.size, args.size)
    path = directory / f"{args.model}.pt"
    if args.model == "unet":
        from models.unet import UNet

        arch: dict[str, Any] = {
            "in_channels": 1,
            "out_channels": 2,
            "channels": [int(c) for c in args.unet_channels.split(",")],
        }
        net: torch.nn.Module = UNet(**arch)
        meta = CheckpointMetadata(
            task="segmentation",
            architecture=Architecture(name="unet", args=arch),
            classes=["background", "lesion"],
            preprocessing=Preprocessing(in_channels=1, img_size=size, resize="tile"),
        )
    else:
        from models.classifier import Classifier

        classifier = Classifier(
            backbone="resnet18", num_classes=2, in_channels=3, head="gap", pretrained="none"
        )
        net = classifier
        meta = CheckpointMetadata(
            task="classification",
            architecture=Architecture(name="classifier", args=classifier.architecture_args()),
            classes=["benign", "malignant"],
            preprocessing=Preprocessing(
                in_channels=3,
                img_size=size,
                resize="resize",
                mean=[0.485, 0.456, 0.406],
                std=[0.229, 0.224, 0.225],
            ),
        )
    save_checkpoint(path, net.eval(), meta)
    return path


def make_images(args: argparse.Namespace, count: int = 16) -> list[tuple[str, bytes, str]]:
    """Synthetic uploads: gray PNG for the U-Net, RGB JPEG for the classifier (as clinical systems send)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: args.size, : args.size]
    images = []
    for i in range(count):
        cy, cx, r = rng.integers(args.size // 4, 3 * args.size // 4, size=3)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < (r // 2) ** 2) * 120
        noise = rng.normal(60, 20, size=(args.size, args.size))
        gray = np.clip(noise + blob, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        if args.model == "unet":
            Image.fromarray(gray).save(buffer, format="PNG")
            images.append((f"scan{i}.png", buffer.getvalue(), "image/png"))
        else:
            Image.fromarray(np.stack([gray] * 3, axis=2)).save(buffer, format="JPEG", quality=90)
            images.append((f"scan{i}.jpg", buffer.getvalue(), "image/jpeg"))
    return images


def uvicorn_command(port: int) -> list[str]:
    """The service as the benchmarks start it: ``uvicorn app.main:app`` on a loopback port."""
    return [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``uvicorn app.main:app`` in a child process on a loopback port."""

    def __init__(self, model_dir: Path, args: argparse.Namespace, max_batch_size: int, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(
            {
                "MEDSERVE_MODEL_DIR": str(model_dir),
                "MEDSERVE_DEVICE": args.device,
                "MEDSERVE_MAX_BATCH_SIZE": str(max_batch_size),
                "MEDSERVE_MAX_BATCH_DELAY_MS": str(args.max_batch_delay_ms),
                "MEDSERVE_MAX_QUEUE": str(max(256, 4 * max(args.concurrency))),
                "MEDSERVE_REQUEST_TIMEOUT_S": "3600",
                "MEDSERVE_TORCH_THREADS": str(args.threads),
                "MEDSERVE_BATCH_AUTOTUNE": "false" if args.no_autotune else "true",
            }
        )
        command = uvicorn_command(self.port)
        command += ["--log-level", "warning", "--no-access-log"]
        self.log = log.open("w")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    async def wait_ready(self, client: httpx.AsyncClient) -> None:
        for _ in range(READY_POLLS):
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if (await client.get(f"{self.base}/health/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.25)
        raise RuntimeError("the server did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


async def stats(client: httpx.AsyncClient, base: str) -> dict[str, Any]:
    models = (await client.get(f"{base}/models")).json()["models"]
    return dict(models[0]["stats"])


async def run_level(
    client: httpx.AsyncClient,
    base: str,
    endpoint: str,
    images: list[tuple[str, bytes, str]],
    concurrency: int,
    requests: int,
    label: str,
    client_kind: str = "keepalive",
) -> Level:
    """Warms up with one round of ``concurrency`` requests, then times ``requests`` requests."""

    # Multipart bodies encoded once (as a load generator replays them): the client's own CPU time shares the
    # machine with the server, so it is kept out of the loop.
    bodies = []
    for name, data, ctype in images:
        request = httpx.Request("POST", f"{base}{endpoint}", files={"file": (name, data, ctype)})
        bodies.append((request.read(), {"content-type": request.headers["content-type"]}))

    connections: list[KeepAliveConnection] = []
    raw_requests: list[bytes] = []
    if client_kind == "keepalive":
        host, port = base.removeprefix("http://").split(":")
        connections = [KeepAliveConnection(host, int(port)) for _ in range(concurrency)]
        raw_requests = [
            connections[0].request_bytes("POST", endpoint, body, headers) for body, headers in bodies
        ]

    async def one(worker_index: int, index: int, latencies: list[float] | None) -> bool:
        started = time.perf_counter()
        if client_kind == "keepalive":
            status, _, _ = await connections[worker_index].send(raw_requests[index % len(raw_requests)])
        else:
            body, headers = bodies[index % len(bodies)]
            status = (await client.post(f"{base}{endpoint}", content=body, headers=headers)).status_code
        if latencies is not None:
            latencies.append(time.perf_counter() - started)
        return status == 200

    async def drive(count: int, latencies: list[float] | None) -> int:
        counter = iter(range(count))
        failures = 0

        async def worker(worker_index: int) -> None:
            nonlocal failures
            for index in counter:
                if not await one(worker_index, index, latencies):
                    failures += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return failures

    try:
        await drive(concurrency, None)
        before = await stats(client, base)
        latencies: list[float] = []
        started = time.perf_counter()
        errors = await drive(requests, latencies)
        seconds = time.perf_counter() - started
        after = await stats(client, base)
    finally:
        for connection in connections:
            await connection.close()
    batches = after["batches"] - before["batches"]
    served = after["requests"] - before["requests"]
    queue_ms = (after["mean_queue_ms"] or 0) * after["requests"] - (before["mean_queue_ms"] or 0) * before[
        "requests"
    ]
    batch_ms = (after["mean_batch_ms"] or 0) * after["batches"] - (before["mean_batch_ms"] or 0) * before[
        "batches"
    ]
    ms = sorted(1000 * x for x in latencies)
    return Level(
        label=label,
        concurrency=concurrency,
        requests=requests,
        errors=errors,
        seconds=seconds,
        throughput=requests / seconds,
        p50_ms=percentile(ms, 50),
        p95_ms=percentile(ms, 95),
        p99_ms=percentile(ms, 99),
        mean_batch_size=served / batches if batches else None,
        server_mean_queue_ms=queue_ms / served if served else None,
        server_mean_batch_ms=batch_ms / batches if batches else None,
        model_busy=batch_ms / 1000 / seconds if batches else None,
    )


def percentile(sorted_values: list[float], q: float) -> float:
    return float(np.percentile(sorted_values, q)) if sorted_values else float("nan")


async def serve_and_measure(
    model_dir: Path,
    args: argparse.Namespace,
    images: list[tuple[str, bytes, str]],
    max_batch_size: int,
    concurrencies: list[int],
    label: str,
    log: Path,
) -> list[Level]:
    endpoint = "/segment" if args.model == "unet" else "/classify"
    server = Server(model_dir, args, max_batch_size, log)
    limits = httpx.Limits(max_connections=max(concurrencies), max_keepalive_connections=max(concurrencies))
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
            await server.wait_ready(client)
            levels = []
            for concurrency in concurrencies:
                level = await run_level(
                    client,
                    server.base,
                    endpoint,
                    images,
                    concurrency,
                    max(args.requests, concurrency),
                    label,
                    args.client,
                )
                print_level(level)
                levels.append(level)
            return levels
    finally:
        server.stop()


def raw_forward(path: Path, args: argparse.Namespace, batch_sizes: list[int]) -> dict[int, dict[str, float]]:
    """Forward pass alone at each batch size: median of ``--raw-repeats`` timed runs after one warm-up."""
    from models.inference import prepare_for_device, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, meta = load_model(path, device)
    # The layout the service runs the model in (channels_last), so that served / raw compares like with like.
    model = prepare_for_device(model, device)
    channels, (h, w) = meta.preprocessing.in_channels, meta.preprocessing.img_size
    results = {}
    with torch.inference_mode():
        for batch in batch_sizes:
            x = torch.randn(batch, channels, h, w, device=device).contiguous(
                memory_format=torch.channels_last
            )
            model(x)
            times = []
            for _ in range(args.raw_repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            median = statistics.median(times)
            results[batch] = {
                "seconds_per_batch": median,
                "throughput": batch / median,
                "ms_per_image": 1000 * median / batch,
            }
            print(
                f"raw forward  batch {batch:3d}: {1000 * median:9.1f} ms/batch  {batch / median:8.2f} img/s"
            )
    return results


def print_level(level: Level) -> None:
    batch = f"{level.mean_batch_size:6.2f}" if level.mean_batch_size else "     -"
    busy = f"{100 * level.model_busy:5.1f}%" if level.model_busy is not None else "    -"
    print(
        f"{level.label:<12} c={level.concurrency:<3d} {level.throughput:8.2f} req/s  p50 {level.p50_ms:8.1f}  "
        f"p95 {level.p95_ms:8.1f}  p99 {level.p99_ms:8.1f} ms  batch {batch}  model busy {busy}  "
        f"errors {level.errors}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    concurrencies = sorted(set(args.concurrency))
    top = concurrencies[-1]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"bench-{args.model}-{stamp}.json"
    print(
        f"MedServe service benchmark: {args.model} {args.size}x{args.size}, device {args.device}, "
        f"torch threads {args.threads or torch.get_num_threads()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    with tempfile.TemporaryDirectory(prefix="medserve-bench-") as tmp:
        model_dir = Path(tmp)
        checkpoint = build_checkpoint(args, model_dir)
        images = make_images(args)
        batched = asyncio.run(
            serve_and_measure(
                model_dir,
                args,
                images,
                args.max_batch_size,
                concurrencies,
                "batching",
                RESULTS / "server-batching.log",
            )
        )
        formed = next(level for level in batched if level.concurrency == top).mean_batch_size or 1.0
        batch_size = max(1, round(formed))
        # The machine is shared: the raw model is timed right after each server run, and the two averaged.
        raw_runs = [raw_forward(checkpoint, args, sorted({1, batch_size}))]
        unbatched: list[Level] = []
        if not args.skip_unbatched:
            unbatched = asyncio.run(
                serve_and_measure(
                    model_dir, args, images, 1, [top], "no batching", RESULTS / "server-unbatched.log"
                )
            )
            raw_runs.append(raw_forward(checkpoint, args, sorted({1, batch_size})))
        raw = {
            size: {
                "seconds_per_batch": statistics.mean(run[size]["seconds_per_batch"] for run in raw_runs),
                "throughput": statistics.mean(run[size]["throughput"] for run in raw_runs),
            }
            for size in raw_runs[0]
        }

    top_level = next(level for level in batched if level.concurrency == top)
    single = next((level for level in batched if level.concurrency == 1), None)
    ratios: dict[str, float | None] = {
        f"served_c{top}_over_raw_batch{batch_size}": top_level.throughput / raw[batch_size]["throughput"],
        f"served_c{top}_over_raw_best": top_level.throughput / max(r["throughput"] for r in raw.values()),
        "p50_c1_minus_raw_single_ms": (single.p50_ms - 1000 * raw[1]["seconds_per_batch"])
        if single
        else None,
        # The same question without the machine's drift between the server run and the raw timing: time a
        # lone request spent outside the model, from the model's own time inside the server in the same run.
        "mean_c1_minus_model_in_server_ms": (
            1000 * single.seconds / single.requests - single.server_mean_batch_ms
        )
        if single and single.server_mean_batch_ms is not None
        else None,
        f"batching_on_over_off_c{top}": (top_level.throughput / unbatched[0].throughput)
        if unbatched
        else None,
    }
    print("\nratios")
    for name, value in ratios.items():
        print(f"  {name:<36} {'-' if value is None else f'{value:.3f}'}")
    report = {
        "created_at": stamp,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_threads": args.threads or torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "batching": [asdict(level) for level in batched],
        "no_batching": [asdict(level) for level in unbatched],
        "raw_forward": {str(k): v for k, v in raw.items()},
        "raw_forward_runs": [{str(k): v for k, v in run.items()} for run in raw_runs],
        "ratios": ratios,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
