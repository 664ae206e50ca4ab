"""Memory cost of ``medserve serve --workers N`` (a script): RSS and PSS of each worker with the given models.

Each uvicorn worker is a separate process with its own copy of the models, its own batcher per model and its
own thread pools. The script starts the service with each requested worker count (127.0.0.1 only), waits until
it is ready, sends ``--requests`` requests per model over fresh connections (so every worker has served, its
kernels and buffers are allocated), waits a moment, then reads from /proc the resident set (RSS) and the
proportional set (PSS: shared pages split among their sharers) of the supervisor and of each worker.

    medserve demo --model-dir runs/demo-models          # the demo models (once; trains for a few minutes)
    python benchmarks/worker_memory.py --model-dir runs/demo-models --workers 1 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_process import RESULTS, Service, memory_kib, phantom, png


async def measure(model_dir: Path, workers: int, requests: int, settle_s: float) -> dict[str, Any]:
    service = Service(
        model_dir, RESULTS / f"workers-{workers}-server.log", {"MEDSERVE_ACCESS_LOG": "false"}, workers
    )
    try:
        ready_s = await service.wait_ready()
        # /health/ready answered from one worker; the others may still be loading. Wait until 3N fresh
        # connections in a row (spread over the workers by the kernel) find every model loaded.
        in_a_row = 0
        while in_a_row < 3 * workers:
            async with httpx.AsyncClient(base_url=service.base, timeout=300.0) as fresh:
                models = (await fresh.get("/models")).json()["models"]
            in_a_row = in_a_row + 1 if all(m["status"] != "loading" for m in models) else 0
            await asyncio.sleep(0.1)
        served = [m for m in models if m["status"] == "ready"]
        for model in served:
            endpoint = "/segment" if model["task"] == "segmentation" else "/classify"
            h, w = model["input_size"]
            image = phantom(int(h), int(w), seed=0)
            if model["in_channels"] == 3:
                image = np.stack([image] * 3, axis=2)
            body = png(image)
            done = 0
            while done < requests:
                # A new connection each time: the kernel spreads them over the workers.
                async with httpx.AsyncClient(base_url=service.base, timeout=300.0) as fresh:
                    response = await fresh.post(
                        f"{endpoint}?model={model['name']}",
                        content=body,
                        headers={"content-type": "image/png"},
                    )
                if response.status_code == 503:  # a worker still starting (should not happen after the wait)
                    await asyncio.sleep(0.5)
                    continue
                response.raise_for_status()
                done += 1
        await asyncio.sleep(settle_s)
        worker_pids = service.worker_pids()
        per_worker = [memory_kib(pid) for pid in worker_pids]
        supervisor = memory_kib(service.pid) if workers > 1 else {"rss": 0, "pss": 0}
    finally:
        exit_code = service.stop()
    mib = 1024.0
    return {
        "workers": workers,
        "models": [m["name"] for m in served],
        "ready_seconds": ready_s,
        "worker_rss_mib": [w["rss"] / mib for w in per_worker],
        "worker_pss_mib": [w["pss"] / mib for w in per_worker],
        "supervisor_rss_mib": supervisor["rss"] / mib,
        "total_pss_mib": (sum(w["pss"] for w in per_worker) + supervisor["pss"]) / mib,
        "exit_code": exit_code,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", type=Path, required=True, help="checkpoints to serve (e.g. the demo models)"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--requests", type=int, default=16, help="requests per model before measuring")
    parser.add_argument("--settle-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.model_dir.is_dir() or not any(args.model_dir.glob("*.pt")):
        parser.error(
            f"{args.model_dir} holds no checkpoints; build them with `medserve demo --model-dir DIR`"
        )
    if any(n < 1 for n in args.workers):
        parser.error("--workers must be positive")
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for workers in args.workers:
        row = asyncio.run(measure(args.model_dir, workers, args.requests, args.settle_seconds))
        rows.append(row)
        rss = ", ".join(f"{v:.0f}" for v in row["worker_rss_mib"])
        print(
            f"workers={workers}: worker RSS [{rss}] MiB, supervisor {row['supervisor_rss_mib']:.0f} MiB, "
            f"total PSS {row['total_pss_mib']:.0f} MiB, models {row['models']}, exit {row['exit_code']}",
            flush=True,
        )
    report = {
        "created_at": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "model_dir_checkpoints": sorted(p.name for p in args.model_dir.glob("*.pt")),
        "model_dir_bytes": sum(p.stat().st_size for p in args.model_dir.glob("*.pt")),
        "runs": rows,
        "measured_at": time.time(),
    }
    out = args.out or RESULTS / f"workers-{report['created_at']}.json"
    out.write_text(json.dumps(report, indent=2))
    print(out)
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
