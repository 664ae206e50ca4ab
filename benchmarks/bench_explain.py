"""What explanations cost, and that they do not slow plain classification (a script, not a test).

It starts the service as a real process (``medserve serve`` on 127.0.0.1, ``benchmarks/service_process.py``)
with one classifier, a ResNet-18 at 224x224 RGB (random weights whose ``malignant`` weights are made positive,
so that its Grad-CAM maps are not empty), or ``--checkpoint PATH`` (e.g. the demo lesion classifier of
``medserve demo``), and measures:

* latency at concurrency 1: ``POST /classify`` against ``POST /classify?explain=gradcam`` (p50, p95), one
  request after the other on one keep-alive connection;
* throughput of plain ``POST /classify`` at concurrency 32 (``--concurrency``), alone and with
  ``--explain-clients`` clients sending ``explain=gradcam`` requests beside it, one after the other, for as long
  as the plain requests run. Alone and beside are measured alternately ``--rounds`` times (the machine may be
  shared) and averaged. The goal: plain throughput beside explanations within 10% of it alone.

With ``--lesion-phantoms N`` it also explains N held-out lesion phantoms per class and size
(``training/classification/lesions.py``, seed 1; the demo classifier trains on seed 0; ``--lesion-sizes``)
through the service and reports how much of each map's heat lies inside the lesion's mask dilated by 10 px,
beside the share of the image that region covers (what heat spread evenly would score), and how often the label
was right. ``--compare-layers`` does the same in this process at every stage of the classifier's backbone, to
compare the layer the service chooses with the others.

Prints a table and writes ``benchmarks/results/bench_explain.json``. ``--quick`` runs few requests (a first
number on a busy machine); measure on a quiet machine for the numbers to quote.

    python benchmarks/bench_explain.py
    python benchmarks/bench_explain.py --quick
    python benchmarks/bench_explain.py --checkpoint checkpoints/lesions.pt --device cuda
    python benchmarks/bench_explain.py --checkpoint checkpoints/lesions.pt --lesion-phantoms 25 \
        --lesion-sizes 64 128 --compare-layers --skip-timing
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# benchmarks/, the script's own folder
from bench_layout import RESULTS, environment  # noqa: E402
from service_process import KeepAliveConnection, Service, jpeg, percentile, phantom  # noqa: E402

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint  # noqa: E402
from models.classifier import Classifier  # noqa: E402
from models.preprocessing import Preprocessing  # noqa: E402
from training.classification.lesions import CLASSES, render_lesion_with_mask  # noqa: E402

DEFAULT_OUT = RESULTS / "bench_explain.json"
DILATION_PX = 10
LESION_SEED = 1  # the demo classifier's phantoms are seed 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="a classification checkpoint to serve")
    parser.add_argument("--size", type=int, default=224, help="image side of the uploads (default 224)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument(
        "--latency-requests", type=int, default=40, help="requests per kind at c=1 (default 40)"
    )
    parser.add_argument("--requests", type=int, default=320, help="plain requests per throughput run")
    parser.add_argument("--concurrency", type=int, default=32, help="plain clients of the throughput runs")
    parser.add_argument(
        "--explain-clients", type=int, default=1, help="explanation clients beside (default 1)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alone/beside pairs of throughput runs")
    parser.add_argument("--quick", action="store_true", help="few requests: 8 at c=1, 96 per run, one round")
    parser.add_argument(
        "--lesion-phantoms", type=int, default=0, help="also explain N held-out lesion phantoms per class"
    )
    parser.add_argument(
        "--lesion-sizes", type=int, nargs="+", default=[128], help="sides of those phantoms (default 128)"
    )
    parser.add_argument(
        "--compare-layers",
        action="store_true",
        help="the lesion phantoms at every backbone stage, in-process",
    )
    parser.add_argument("--skip-timing", action="store_true", help="only the lesion phantoms, no timing")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.quick:
        args.latency_requests, args.requests, args.rounds = 8, 96, 1
    if (
        min(args.latency_requests, args.requests, args.concurrency, args.rounds) < 1
        or args.explain_clients < 0
    ):
        parser.error("counts must be positive")
    return args


def build_checkpoint(directory: Path) -> Path:
    """ResNet-18, 224x224 RGB, two classes; random weights, ``malignant``'s made positive."""
    torch.manual_seed(0)
    net = Classifier(backbone="resnet18", num_classes=2, in_channels=3, head="gap", pretrained="none").eval()
    linear = net.head[-1]
    assert isinstance(linear, nn.Linear)
    with torch.no_grad():
        linear.weight[1].abs_()
    path = directory / "resnet18.pt"
    save_checkpoint(
        path,
        net,
        CheckpointMetadata(
            task="classification",
            architecture=Architecture(name="classifier", args=net.architecture_args()),
            classes=["benign", "malignant"],
            preprocessing=Preprocessing(
                in_channels=3,
                img_size=(224, 224),
                resize="resize",
                mean=[0.485, 0.456, 0.406],
                std=[0.229, 0.224, 0.225],
            ),
        ),
    )
    return path


def uploads(size: int, count: int = 8) -> list[bytes]:
    """Multipart bodies of gray phantoms saved as RGB JPEG (as clinical systems send them), encoded once."""
    bodies = []
    for seed in range(count):
        gray = phantom(size, size, seed)
        bodies.append(jpeg(np.stack([gray] * 3, axis=2)))
    return bodies


def multipart(data: bytes, name: str) -> tuple[bytes, dict[str, str]]:
    request = httpx.Request("POST", "http://x/classify", files={"file": (name, data, "image/jpeg")})
    return request.read(), {"content-type": request.headers["content-type"]}


class Client:
    """Replays prepared requests on keep-alive connections and records (status, seconds) per request."""

    def __init__(self, base: str, images: list[bytes]) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        encoder = KeepAliveConnection(self.host, self.port)
        self.plain, self.explain = [], []
        for index, data in enumerate(images):
            body, headers = multipart(data, f"scan{index}.jpg")
            self.plain.append(encoder.request_bytes("POST", "/classify", body, headers))
            self.explain.append(encoder.request_bytes("POST", "/classify?explain=gradcam", body, headers))

    def connection(self) -> KeepAliveConnection:
        return KeepAliveConnection(self.host, self.port)

    async def closed_loop(
        self, raws: list[bytes], concurrency: int, count: int
    ) -> tuple[list[float], int, float]:
        """``count`` requests from ``concurrency`` clients; (latencies of the 200s, failures, wall seconds)."""
        connections = [self.connection() for _ in range(concurrency)]
        counter = iter(range(count))
        latencies: list[float] = []
        failures = 0

        async def worker(connection: KeepAliveConnection) -> None:
            nonlocal failures
            for index in counter:
                started = time.perf_counter()
                status, _, _ = await connection.send(raws[index % len(raws)])
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures += 1

        started = time.perf_counter()
        try:
            await asyncio.gather(*(worker(c) for c in connections))
        finally:
            for connection in connections:
                await connection.close()
        return latencies, failures, time.perf_counter() - started

    async def until_stopped(self, stop: asyncio.Event) -> dict[str, int]:
        """Explanation requests one after the other until ``stop``; counts by status."""
        connection = self.connection()
        counts: dict[str, int] = {}
        index = 0
        try:
            while not stop.is_set():
                status, _, _ = await connection.send(self.explain[index % len(self.explain)])
                counts[str(status)] = counts.get(str(status), 0) + 1
                index += 1
        finally:
            await connection.close()
        return counts


def latency_row(kind: str, latencies: list[float], failures: int) -> dict[str, Any]:
    ms = sorted(1000 * x for x in latencies)
    return {
        "kind": kind,
        "requests": len(ms) + failures,
        "failures": failures,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "mean_ms": statistics.mean(ms) if ms else float("nan"),
    }


async def throughput_run(client: Client, args: argparse.Namespace, beside: bool) -> dict[str, Any]:
    """One plain run at ``--concurrency``, with ``--explain-clients`` explanation clients beside when ``beside``."""
    stop = asyncio.Event()
    explainers = [
        asyncio.create_task(client.until_stopped(stop)) for _ in range(args.explain_clients if beside else 0)
    ]
    if explainers:
        await asyncio.sleep(0.5)  # the explanation traffic is under way before the plain requests start
    latencies, failures, seconds = await client.closed_loop(client.plain, args.concurrency, args.requests)
    stop.set()
    counts: dict[str, int] = {}
    for result in await asyncio.gather(*explainers):
        for status, n in result.items():
            counts[status] = counts.get(status, 0) + n
    ms = sorted(1000 * x for x in latencies)
    return {
        "explanations_beside": beside,
        "requests": args.requests,
        "failures": failures,
        "seconds": seconds,
        "throughput": len(latencies) / seconds,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "explanation_answers": counts,
    }


def lesion_heat_row(heat: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The share of a map's heat inside the lesion's mask dilated by ``DILATION_PX``, and of the image."""
    region = ndimage.binary_dilation(mask, iterations=DILATION_PX)
    total = float(heat.sum())
    return {
        "inside": float(heat[region].sum()) / total if total > 0 else float("nan"),
        "region_share": float(region.mean()),
    }


def held_out_phantoms(count: int, size: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``count`` phantoms per class of ``size``: (class, image, lesion mask), from seed ``LESION_SEED``."""
    return [
        (
            name,
            *render_lesion_with_mask(np.random.default_rng([LESION_SEED, label, index]), size, bool(label)),
        )
        for label, name in enumerate(CLASSES)
        for index in range(count)
    ]


def lesion_summary(rows: list[dict[str, Any]], size: int, layer: str) -> dict[str, Any]:
    explained = [r for r in rows if not np.isnan(r["inside"])]
    inside = [r["inside"] for r in explained]
    return {
        "size": size,
        "layer": layer,
        "phantoms": len(rows),
        "seed": LESION_SEED,
        "dilation_px": DILATION_PX,
        "accuracy": sum(r["truth"] == r["label"] for r in rows) / len(rows),
        "empty_maps": len(rows) - len(explained),
        "median_inside": statistics.median(inside) if inside else float("nan"),
        "mean_inside": statistics.mean(inside) if inside else float("nan"),
        "share_over_half": sum(x > 0.5 for x in inside) / len(inside) if inside else float("nan"),
        "mean_region_share": statistics.mean(r["region_share"] for r in rows),
    }


async def lesion_heat(base: str, args: argparse.Namespace, layer: str) -> list[dict[str, Any]]:
    """Explains the held-out phantoms (label as target) through the service, for each size."""
    found = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0)) as http:
        for size in args.lesion_sizes:
            rows = []
            for index, (truth, image, mask) in enumerate(held_out_phantoms(args.lesion_phantoms, size)):
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                response = await http.post(
                    f"{base}/classify?explain=gradcam",
                    files={"file": (f"phantom-{index}.png", buffer.getvalue(), "image/png")},
                )
                response.raise_for_status()
                (prediction,) = response.json()["predictions"]
                png = base64.b64decode(prediction["explanation"]["heatmap_png"])
                heat = np.asarray(Image.open(io.BytesIO(png))).astype(np.float64)
                rows.append({"truth": truth, "label": prediction["label"], **lesion_heat_row(heat, mask)})
            found.append(lesion_summary(rows, size, layer))
            print_lesion_heat(found[-1])
    return found


def lesion_heat_by_layer(checkpoint: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The held-out phantoms explained in this process at every backbone stage of a ``Classifier`` checkpoint,
    with the service's own preprocessing and probabilities (``app.runners``)."""
    from app.contract import ModelInput
    from app.runners import ClassificationRunner, load_runner
    from models.classifier import NUM_STAGES
    from models.explain import GradCam, TargetLayer, cam_to_original

    runner = load_runner(
        "bench", checkpoint, device=torch.device("cpu"), precision="fp32", forward_batch_size=1
    )
    assert isinstance(runner, ClassificationRunner)
    found = []
    for size in args.lesion_sizes:
        phantoms = held_out_phantoms(args.lesion_phantoms, size)
        # 8-bit gray, as the decoder reads the PNGs the service gets: value / 255.
        inputs = [
            ModelInput(runner.preprocess(image[:, :, None].astype(np.float32) / 255), size, size)
            for _, image, _ in phantoms
        ]
        labels = [runner.classes[int(np.argmax(p))] for p in runner.run_batch(inputs)]
        for stage in range(NUM_STAGES):
            cam = GradCam(runner.model, TargetLayer(f"features.{stage}", f"stage {stage + 1}"))
            rows = []
            for item, label, (truth, _, mask) in zip(inputs, labels, phantoms, strict=True):
                heat = cam_to_original(
                    cam.explain(item.image, runner.classes.index(label)), size, size, runner.spec
                )
                rows.append({"truth": truth, "label": label, **lesion_heat_row(heat, mask)})
            found.append(lesion_summary(rows, size, f"features.{stage}"))
            print_lesion_heat(found[-1])
    return found


async def measure(base: str, args: argparse.Namespace, images: list[bytes]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    async with httpx.AsyncClient() as http:
        result["model"] = (await http.get(f"{base}/models")).json()["models"][0]
    if args.lesion_phantoms:
        result["lesion_heat"] = await lesion_heat(base, args, result["model"]["explain"]["target_layer"])
    if args.skip_timing:
        return result
    return {**result, **await measure_timing(base, args, images)}


def print_lesion_heat(found: dict[str, Any]) -> None:
    print(
        f"lesion phantoms at {found['layer']}: {found['phantoms']} ({found['size']}x{found['size']}, seed "
        f"{found['seed']}), "
        f"accuracy {found['accuracy']:.3f}; heat inside the lesion dilated by {found['dilation_px']} px: median "
        f"{found['median_inside']:.3f}, mean {found['mean_inside']:.3f}, over half in "
        f"{100 * found['share_over_half']:.1f}% of the maps ({found['empty_maps']} empty); that region is "
        f"{100 * found['mean_region_share']:.1f}% of the image",
        flush=True,
    )


async def measure_timing(base: str, args: argparse.Namespace, images: list[bytes]) -> dict[str, Any]:
    client = Client(base, images)
    # Warm-up: the first explanation builds the explainer's copy of the network.
    await client.closed_loop(client.explain, 1, 2)
    await client.closed_loop(client.plain, args.concurrency, args.concurrency)
    latency = []
    for kind, raws in (("plain", client.plain), ("explain=gradcam", client.explain)):
        latencies, failures, _ = await client.closed_loop(raws, 1, args.latency_requests)
        latency.append(latency_row(kind, latencies, failures))
    runs = []
    for _ in range(args.rounds):
        for beside in (False, True):
            runs.append(await throughput_run(client, args, beside))
            print_run(runs[-1], args.concurrency)
    return {"latency_c1": latency, "throughput_runs": runs}


def print_run(run: dict[str, Any], concurrency: int) -> None:
    label = "with explanations" if run["explanations_beside"] else "alone"
    print(
        f"plain c={concurrency:<3d} {label:<18} {run['throughput']:8.2f} req/s  p50 {run['p50_ms']:8.1f} ms  "
        f"p95 {run['p95_ms']:8.1f} ms  failures {run['failures']}  explanations {run['explanation_answers']}",
        flush=True,
    )


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    plain, explained = result["latency_c1"]
    alone = [r["throughput"] for r in result["throughput_runs"] if not r["explanations_beside"]]
    beside = [r["throughput"] for r in result["throughput_runs"] if r["explanations_beside"]]
    explanations = sum(
        n
        for r in result["throughput_runs"]
        for status, n in r["explanation_answers"].items()
        if status == "200"
    )
    return {
        "explain_over_plain_p50_c1": explained["p50_ms"] / plain["p50_ms"],
        "explain_minus_plain_p50_c1_ms": explained["p50_ms"] - plain["p50_ms"],
        "plain_throughput_alone": statistics.mean(alone),
        "plain_throughput_beside_explanations": statistics.mean(beside),
        "beside_over_alone": statistics.mean(beside) / statistics.mean(alone),
        "explanations_answered_beside": explanations,
        "goal_within_10_percent": statistics.mean(beside) >= 0.9 * statistics.mean(alone),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = uploads(args.size)
    with tempfile.TemporaryDirectory(prefix="medserve-bench-explain-") as tmp:
        model_dir = Path(tmp)
        if args.checkpoint is not None:
            shutil.copy(args.checkpoint, model_dir / args.checkpoint.name)
        else:
            build_checkpoint(model_dir)
        env = {
            "MEDSERVE_DEVICE": args.device,
            "MEDSERVE_MAX_QUEUE": str(max(256, 4 * args.concurrency)),
            "MEDSERVE_REQUEST_TIMEOUT_S": "3600",
            "MEDSERVE_ACCESS_LOG": "false",
            "MEDSERVE_LOG_LEVEL": "warning",
        }
        service = Service(model_dir, RESULTS / "server-bench-explain.log", env)
        try:
            asyncio.run(service.wait_ready())
            result = asyncio.run(measure(service.base, args, images))
        finally:
            service.stop()
    model = result["model"]
    print(
        f"\n{model['architecture']} {model['input_size'][0]}x{model['input_size'][1]} on {model['device']}, "
        f"Grad-CAM at {model['explain']['target_layer']} ({model['explain']['layer']})"
    )
    report: dict[str, Any] = {
        **environment(torch.device(args.device if args.device != "auto" else "cpu")),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "settings": {
            "checkpoint": str(args.checkpoint) if args.checkpoint else "random-weight resnet18 224x224 RGB",
            "upload_size": args.size,
            "latency_requests": args.latency_requests,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "explain_clients": args.explain_clients,
            "rounds": args.rounds,
        },
        "model": {
            k: model.get(k) for k in ("architecture", "input_size", "device", "explain", "batch_autotune")
        },
    }
    if "lesion_heat" in result:
        report["lesion_heat"] = result["lesion_heat"]
    if args.compare_layers and args.checkpoint is not None and args.lesion_phantoms:
        report["lesion_heat_by_layer"] = lesion_heat_by_layer(args.checkpoint, args)
    if "latency_c1" in result:
        summary = summarize(result)
        print(f"uploads {args.size}x{args.size} JPEG")
        print(f"{'c=1':<18} {'p50 ms':>9} {'p95 ms':>9} {'mean ms':>9}")
        for row in result["latency_c1"]:
            print(f"{row['kind']:<18} {row['p50_ms']:>9.1f} {row['p95_ms']:>9.1f} {row['mean_ms']:>9.1f}")
        goal = "met" if summary["goal_within_10_percent"] else "missed"
        print(
            f"explain / plain p50 at c=1: {summary['explain_over_plain_p50_c1']:.2f}x "
            f"(+{summary['explain_minus_plain_p50_c1_ms']:.1f} ms)\n"
            f"plain c={args.concurrency}: alone {summary['plain_throughput_alone']:.2f} req/s, beside "
            f"{args.explain_clients} explanation client(s) {summary['plain_throughput_beside_explanations']:.2f} "
            f"req/s ({summary['beside_over_alone']:.3f}x; goal >= 0.9: {goal}); "
            f"{summary['explanations_answered_beside']} explanations answered meanwhile"
        )
        report.update(
            latency_c1=result["latency_c1"], throughput_runs=result["throughput_runs"], summary=summary
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
