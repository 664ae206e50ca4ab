"""Overload of the service at 4x its capacity (a script, not a test): fast refusals, no lost work, recovery.

It starts ``medserve serve`` (a real process on 127.0.0.1) with a small U-Net, measures its capacity (closed
loop at concurrency 32 for ``--capacity-seconds``), then offers ``--factor`` (default 4) times that rate as
open-loop arrivals (each request sent on schedule, whatever the service does) for ``--seconds``. It checks:

* refusals are fast: 503 answers come with ``Retry-After``, and the service's own time for a refusal (from its
  access log) has a p99 under a tenth of an accepted request's median; client-side times are reported too (the
  load generator, a minimal asyncio HTTP client, shares the machine);
* nothing accepted is lost: every request gets an answer (no connection errors), every answer is 200 or 503
  (504 only if a request outwaited MEDSERVE_REQUEST_TIMEOUT_S), and no 5xx other than those;
* recovery: once the burst ends, the queue drains and sequential requests are all served (200).

    python benchmarks/overload.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_process import RESULTS, RawHttp, Service, build_models, percentile, phantom, png

RAW_PNG = {"content-type": "image/png"}


async def capacity(http: RawHttp, bodies: list[bytes], seconds: float, concurrency: int) -> float:
    """Closed-loop throughput (requests/s) at ``concurrency``."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal done
        i = offset
        while time.perf_counter() < deadline:
            status, _, _ = await http.send(bodies[i % len(bodies)])
            if status != 200:
                raise RuntimeError(f"capacity run got {status}")
            done += 1
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return done / (time.perf_counter() - started)


async def overload(
    http: RawHttp, bodies: list[bytes], rate: float, seconds: float
) -> tuple[list[dict[str, Any]], float]:
    """Open-loop arrivals at ``rate`` per second for ``seconds``; one record per request, and the real send rate."""
    results: list[dict[str, Any]] = []

    async def one(i: int) -> None:
        started = time.perf_counter()
        try:
            status, headers, _ = await http.send(bodies[i % len(bodies)])
        except (OSError, asyncio.IncompleteReadError) as exc:
            results.append(
                {"status": None, "error": type(exc).__name__, "ms": 1000 * (time.perf_counter() - started)}
            )
            return
        results.append(
            {
                "status": status,
                "ms": 1000 * (time.perf_counter() - started),
                "retry_after": headers.get("retry-after"),
            }
        )

    tasks = []
    start = time.perf_counter()
    count = int(rate * seconds)
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    sent_rate = count / (time.perf_counter() - start)
    await asyncio.gather(*tasks)
    return results, sent_rate


def server_side(log: Path, skip_bytes: int) -> dict[str, list[float]]:
    """Durations (ms) the service itself logged for /segment, by status, from the access lines after ``skip_bytes``."""
    durations: dict[str, list[float]] = {}
    with log.open("rb") as handle:
        handle.seek(skip_bytes)
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("logger") == "medserve.access" and record.get("endpoint") == "/segment":
                durations.setdefault(str(record["status"]), []).append(float(record["duration_ms"]))
    return durations


async def run(args: argparse.Namespace, model_dir: Path, log: Path) -> dict[str, Any]:
    env = {
        "MEDSERVE_MAX_QUEUE": str(args.max_queue),
        "MEDSERVE_REQUEST_TIMEOUT_S": str(args.request_timeout_s),
        "MEDSERVE_LOG_FORMAT": "json",
        "MEDSERVE_ACCESS_LOG": "true",
    }
    service = Service(model_dir, log, env)
    http = RawHttp("127.0.0.1", service.port)
    bodies = [
        http.request_bytes("POST", "/segment", png(phantom(96, 96, seed=i)), RAW_PNG) for i in range(16)
    ]
    try:
        await service.wait_ready()
        await capacity(http, bodies, 2.0, 32)  # warm-up
        rate = await capacity(http, bodies, args.capacity_seconds, 32)
        offered = rate * args.factor
        print(f"capacity {rate:.1f} req/s; offering {offered:.1f} req/s for {args.seconds:.0f} s", flush=True)
        log_mark = log.stat().st_size
        burst_started = time.perf_counter()
        results, sent_rate = await overload(http, bodies, offered, args.seconds)
        burst_seconds = time.perf_counter() - burst_started
        # Recovery: sequential requests right after the burst, until the first success, then 50 more.
        recovery_started = time.perf_counter()
        first_ok = None
        for _ in range(10_000):
            status, _, _ = await http.send(bodies[0])
            if status == 200:
                first_ok = time.perf_counter() - recovery_started
                break
            await asyncio.sleep(0.05)
        after = [(await http.send(bodies[i % len(bodies)]))[0] for i in range(50)]
        async with httpx.AsyncClient(base_url=service.base) as client:
            stats = (await client.get("/models")).json()["models"][0]["stats"]
    finally:
        exit_code = service.stop()
    server = server_side(log, log_mark)
    statuses = Counter(str(r["status"]) for r in results)
    refused = [r for r in results if r["status"] == 503]
    served = [r for r in results if r["status"] == 200]
    report = {
        "created_at": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "note": "shared 2-core machine: other jobs may run at the same time; the load generator runs on it too",
        },
        "max_queue": args.max_queue,
        "capacity_rps": rate,
        "offered_rps": offered,
        "sent_rps": sent_rate,
        "factor": args.factor,
        "sent": len(results),
        "burst_seconds": burst_seconds,
        "statuses": dict(sorted(statuses.items())),
        "served_rps_during_burst": len(served) / burst_seconds,
        "client_refused_p50_ms": percentile([r["ms"] for r in refused], 50),
        "client_refused_p99_ms": percentile([r["ms"] for r in refused], 99),
        "client_served_p50_ms": percentile([r["ms"] for r in served], 50),
        "client_served_p99_ms": percentile([r["ms"] for r in served], 99),
        "server_refused_p50_ms": percentile(server.get("503", []), 50),
        "server_refused_p99_ms": percentile(server.get("503", []), 99),
        "server_served_p50_ms": percentile(server.get("200", []), 50),
        "server_served_p99_ms": percentile(server.get("200", []), 99),
        "refused_with_retry_after": sum(r["retry_after"] is not None for r in refused),
        "recovery_first_200_seconds": first_ok,
        "after_burst_statuses": dict(Counter(str(s) for s in after)),
        "server_stats": {
            k: stats[k] for k in ("rejected_queue_full", "timed_out", "mean_batch_size", "max_queue_depth")
        },
        "exit_code": exit_code,
    }
    checks = {
        "every_request_answered": statuses.get("None", 0) == 0,
        "only_200_503_504": set(statuses) <= {"200", "503", "504"},
        "refusals_came": len(refused) > 0,
        # In the service, a refusal takes a small fraction of an accepted request's time.
        "refusals_fast": bool(refused)
        and report["server_refused_p99_ms"] < 0.1 * report["server_served_p50_ms"],
        "refusals_have_retry_after": report["refused_with_retry_after"] == len(refused),
        "recovered": first_ok is not None and after == [200] * len(after),
        "clean_exit": exit_code == 0,
    }
    report["checks"] = checks
    report["passed"] = all(checks.values())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--factor", type=float, default=4.0, help="offered load / measured capacity")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the overload")
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--max-queue", type=int, default=32, help="MEDSERVE_MAX_QUEUE of the service")
    parser.add_argument("--request-timeout-s", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.factor <= 0 or args.seconds <= 0:
        parser.error("--factor and --seconds must be positive")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medserve-overload-") as tmp:
        build_models(Path(tmp))
        (Path(tmp) / "resnet.pt").unlink()  # one model: the capacity is that of the U-Net
        report = asyncio.run(run(args, Path(tmp), RESULTS / "overload-server.log"))
    out = args.out or RESULTS / f"overload-{report['created_at']}.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"\n{'PASS' if report['passed'] else 'FAIL'}: {out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
