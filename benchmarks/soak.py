"""Mixed soak of the service (a script, not a test): correctness, error statuses and memory under sustained load.

It starts ``medserve serve`` (a real process on 127.0.0.1, API keys on) with a small U-Net and a ResNet-18
classifier, first sends every distinct valid request *alone* to record its reference answer, then sends
``--requests`` requests at ``--concurrency`` (default 3000 at 32) in a seeded random mix: 90% valid
(PNG/JPEG/DICOM segmentation as PNG mask or JSON, multipart and raw; classification of 1 to 3 files) and 10%
malformed (truncated, wrong magic, random bytes, a bomb in the header, zero-size, wrong content type, empty body,
bad parameter, unknown model, too many files, wrong key). It checks:

* every valid request gets exactly the answer it got alone (masks pixel for pixel, labels equal, probabilities
  within 1e-4);
* every malformed request gets its expected 4xx as problem+json;
* no 5xx at all except 503/504 (backpressure, by design; none are expected at this load with MAX_QUEUE 256);
* memory flat after warm-up: the server's RSS is sampled every 0.5 s; growth after the first 20% of requests
  must stay under ``--rss-growth-mib``.

Results are printed and written as JSON under ``benchmarks/results/``; the exit code is 1 if a check fails.

    python benchmarks/soak.py                  # 3000 requests, c=32
    python benchmarks/soak.py --requests 600 --concurrency 16                  # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_process import RESULTS, Service, build_models, jpeg, memory_kib, percentile, phantom, png

from tests.reliability.corpus import dicom_bytes, lying_files, zero_size_files

KEY = "soak-Zq8Wm3Xn5Bv7Lk2J"
PROBLEM = "application/problem+json"


@dataclass
class Planned:
    """One request of the mix."""

    kind: str
    method: str
    path: str
    content: bytes | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    expect: int = 200  # expected status (malformed ones)
    reference: int | None = None  # index of the valid request whose answer it must equal


def valid_requests(count: int) -> list[Planned]:
    """``count`` distinct valid requests of every kind."""
    rng = np.random.default_rng(1)
    out: list[Planned] = []
    for i in range(count):
        h, w = (int(v) for v in rng.integers(40, 140, size=2))
        image = phantom(h, w, seed=i)
        kind = ["seg-png-raw", "seg-json-multipart", "seg-jpeg-raw", "seg-dicom-raw", "classify"][i % 5]
        if kind == "seg-png-raw":
            out.append(
                Planned(kind, "POST", "/segment", content=png(image), headers={"content-type": "image/png"})
            )
        elif kind == "seg-json-multipart":
            out.append(
                Planned(
                    kind,
                    "POST",
                    "/segment?format=json",
                    files=[("file", (f"s{i}.png", png(image), "image/png"))],
                )
            )
        elif kind == "seg-jpeg-raw":
            rgb = np.stack([image] * 3, axis=2)
            out.append(
                Planned(kind, "POST", "/segment", content=jpeg(rgb), headers={"content-type": "image/jpeg"})
            )
        elif kind == "seg-dicom-raw":
            data = dicom_bytes(h, w, pixel_bytes=image.tobytes())
            out.append(
                Planned(kind, "POST", "/segment", content=data, headers={"content-type": "application/dicom"})
            )
        else:
            files = [
                ("file", (f"c{i}-{j}.png", png(phantom(h, w, seed=1000 * i + j)), "image/png"))
                for j in range(1 + i % 3)
            ]
            out.append(Planned(kind, "POST", "/classify?top_k=2", files=files))
    return out


def malformed_requests() -> list[Planned]:
    """Every kind of bad request with the status it must get."""
    good = png(phantom(64, 64, seed=7))
    raw_png = {"content-type": "image/png"}
    out = [
        Planned(
            "truncated-png", "POST", "/segment", content=good[: len(good) // 2], headers=raw_png, expect=400
        ),
        Planned(
            "wrong-magic", "POST", "/segment", content=b"\x89PNX" + good[4:], headers=raw_png, expect=400
        ),
        Planned(
            "random-bytes",
            "POST",
            "/classify",
            content=random.Random(3).randbytes(700),
            headers=raw_png,
            expect=400,
        ),
        Planned(
            "wrong-type",
            "POST",
            "/segment",
            content=b"{}",
            headers={"content-type": "application/json"},
            expect=415,
        ),
        Planned("empty-body", "POST", "/segment", content=b"", headers=raw_png, expect=422),
        Planned("bad-parameter", "POST", "/segment?format=gif", content=good, headers=raw_png, expect=422),
        Planned("unknown-model", "POST", "/segment?model=nope", content=good, headers=raw_png, expect=404),
        Planned(
            "too-many-files",
            "POST",
            "/classify",
            files=[("file", (f"{j}.png", good, "image/png")) for j in range(17)],
            expect=413,
        ),
        Planned(
            "wrong-key",
            "POST",
            "/segment",
            content=good,
            headers={**raw_png, "X-API-Key": KEY + "x"},
            expect=401,
        ),
    ]
    for name, data in lying_files().items():
        out.append(Planned(f"bomb-{name}", "POST", "/segment", content=data, headers=raw_png, expect=413))
    for name, data in zero_size_files().items():
        out.append(Planned(f"zero-{name}", "POST", "/segment", content=data, headers=raw_png, expect=400))
    return out


async def send(client: httpx.AsyncClient, request: Planned) -> httpx.Response:
    headers = {"X-API-Key": KEY, **request.headers}
    if request.files is not None:
        return await client.request(request.method, request.path, files=request.files, headers=headers)
    return await client.request(request.method, request.path, content=request.content, headers=headers)


def answer_of(response: httpx.Response) -> Any:
    """What must match: the mask array for PNG answers, the parsed JSON otherwise."""
    if response.headers["content-type"] == "image/png":
        with Image.open(io.BytesIO(response.content)) as image:
            return np.asarray(image)
    return response.json()


def same_answer(reference: Any, answer: Any) -> tuple[bool, int]:
    """(equal, differing mask pixels). Classification probabilities may differ by 1e-4 (batch composition)."""
    if isinstance(reference, np.ndarray):
        if not isinstance(answer, np.ndarray) or answer.shape != reference.shape:
            return False, -1
        differing = int((answer != reference).sum())
        return differing == 0, differing
    if "predictions" in reference:
        if [p["label"] for p in reference["predictions"]] != [p["label"] for p in answer["predictions"]]:
            return False, 0
        for ref, got in zip(reference["predictions"], answer["predictions"], strict=True):
            if ref["probabilities"].keys() != got["probabilities"].keys():
                return False, 0
            if any(
                abs(ref["probabilities"][k] - got["probabilities"][k]) > 1e-4 for k in ref["probabilities"]
            ):
                return False, 0
        return True, 0
    return reference == answer, 0


async def sample_memory(
    service: Service, progress: list[int], samples: list[dict[str, float]], stop: asyncio.Event
) -> None:
    started = time.monotonic()
    while not stop.is_set():
        total = sum(memory_kib(pid)["rss"] for pid in service.worker_pids())
        samples.append({"t": time.monotonic() - started, "done": progress[0], "rss_mib": total / 1024})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)


async def run(args: argparse.Namespace, model_dir: Path, log: Path) -> dict[str, Any]:
    env = {
        "MEDSERVE_API_KEYS": KEY,
        "MEDSERVE_MAX_QUEUE": "256",
        "MEDSERVE_REQUEST_TIMEOUT_S": "60",
        "MEDSERVE_LOG_FORMAT": "json",
        "MEDSERVE_ACCESS_LOG": "false",
        "MEDSERVE_MAX_FILES": "16",
    }
    service = Service(model_dir, log, env)
    try:
        ready_s = await service.wait_ready()
        valid = valid_requests(args.distinct)
        bad = malformed_requests()
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        async with httpx.AsyncClient(base_url=service.base, timeout=120.0, limits=limits) as client:
            references = []
            for request in valid:  # alone: one at a time
                response = await send(client, request)
                if response.status_code != 200:
                    raise RuntimeError(
                        f"reference request {request.kind} failed: {response.status_code} {response.text}"
                    )
                references.append(answer_of(response))
            rng = random.Random(args.seed)
            plan: list[Planned] = []
            for _ in range(args.requests):
                if rng.random() < args.malformed:
                    plan.append(rng.choice(bad))
                else:
                    index = rng.randrange(len(valid))
                    plan.append(Planned(**{**valid[index].__dict__, "reference": index}))
            progress = [0]
            samples: list[dict[str, float]] = []
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_memory(service, progress, samples, stop))
            outcomes: list[dict[str, Any]] = []
            queue = iter(plan)

            async def worker() -> None:
                for request in queue:
                    started = time.perf_counter()
                    try:
                        response = await send(client, request)
                    except httpx.HTTPError as exc:
                        outcomes.append({"kind": request.kind, "status": None, "error": type(exc).__name__})
                        progress[0] += 1
                        continue
                    seconds = time.perf_counter() - started
                    outcome: dict[str, Any] = {
                        "kind": request.kind,
                        "status": response.status_code,
                        "s": seconds,
                    }
                    if request.reference is not None:
                        if response.status_code == 200:
                            equal, differing = same_answer(references[request.reference], answer_of(response))
                            outcome.update(valid=True, equal=equal, differing_pixels=differing)
                        else:
                            outcome.update(valid=True, equal=False)
                    else:
                        outcome.update(
                            valid=False,
                            expected=request.expect,
                            problem=response.headers.get("content-type") == PROBLEM,
                        )
                    outcomes.append(outcome)
                    progress[0] += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            wall = time.perf_counter() - started
            stop.set()
            await sampler
            models = (await client.get("/models", headers={"X-API-Key": KEY})).json()["models"]
    finally:
        exit_code = service.stop()
    return summarize(args, outcomes, samples, wall, ready_s, exit_code, models)


def summarize(
    args: argparse.Namespace,
    outcomes: list[dict[str, Any]],
    samples: list[dict[str, float]],
    wall: float,
    ready_s: float,
    exit_code: int,
    models: list[dict[str, Any]],
) -> dict[str, Any]:
    valid = [o for o in outcomes if o.get("valid")]
    malformed = [o for o in outcomes if o.get("valid") is False]
    statuses = Counter(str(o["status"]) for o in outcomes)
    server_errors = {s: n for s, n in statuses.items() if s.startswith("5") and s not in ("503", "504")}
    warm = args.requests * 0.2
    after = [s for s in samples if s["done"] >= warm]
    baseline = after[0]["rss_mib"] if after else float("nan")
    growth = (max(s["rss_mib"] for s in after) - baseline) if after else float("nan")
    if len(after) >= 3:
        slope = float(np.polyfit([s["done"] for s in after], [s["rss_mib"] for s in after], 1)[0]) * 1000
    else:
        slope = float("nan")
    latencies = [1000 * o["s"] for o in valid if o.get("s") is not None]
    checks = {
        "valid_all_200": all(o["status"] == 200 for o in valid),
        "valid_same_as_alone": all(o.get("equal") for o in valid),
        "malformed_expected_4xx": all(o["status"] == o["expected"] for o in malformed),
        "malformed_all_problem_json": all(o["problem"] for o in malformed),
        "no_unexpected_5xx": not server_errors and statuses.get("None", 0) == 0,
        "rss_flat_after_warmup": growth <= args.rss_growth_mib,
        "clean_exit": exit_code == 0,
    }
    wrong = Counter(
        f"{o['kind']}: {o['status']} (expected {o['expected']})"
        for o in malformed
        if o["status"] != o["expected"]
    )
    report = {
        "created_at": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
        "machine": {
            "cpus": __import__("os").cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "note": "shared 2-core machine: other jobs may run at the same time",
        },
        "requests": len(outcomes),
        "concurrency": args.concurrency,
        "malformed_fraction": len(malformed) / max(1, len(outcomes)),
        "seconds": wall,
        "throughput_rps": len(outcomes) / wall,
        "valid_p50_ms": percentile(latencies, 50),
        "valid_p99_ms": percentile(latencies, 99),
        "statuses": dict(sorted(statuses.items())),
        "valid": {"count": len(valid), "identical": sum(bool(o.get("equal")) for o in valid)},
        "differing_mask_pixels": sum(
            o.get("differing_pixels", 0) for o in valid if o.get("differing_pixels", 0) > 0
        ),
        "malformed": {
            "count": len(malformed),
            "as_expected": sum(o["status"] == o["expected"] for o in malformed),
        },
        "malformed_mismatches": dict(wrong),
        "rss_mib": {
            "at_start_of_load": samples[0]["rss_mib"] if samples else None,
            "after_warmup": baseline,
            "max_after_warmup": max((s["rss_mib"] for s in after), default=None),
            "final": samples[-1]["rss_mib"] if samples else None,
            "growth_after_warmup": growth,
            "slope_mib_per_1000_requests": slope,
        },
        "ready_seconds": ready_s,
        "exit_code": exit_code,
        "mean_batch_size": {m["name"]: m["stats"]["mean_batch_size"] for m in models if m.get("stats")},
        "checks": checks,
        "passed": all(checks.values()),
        "rss_samples": samples,
    }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--malformed", type=float, default=0.10, help="fraction of malformed requests")
    parser.add_argument("--distinct", type=int, default=40, help="distinct valid requests (default 40)")
    parser.add_argument("--rss-growth-mib", type=float, default=32.0, help="allowed RSS growth after warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.requests < 10 or args.concurrency < 1 or not 0 <= args.malformed < 1:
        parser.error("--requests >= 10, --concurrency >= 1, 0 <= --malformed < 1")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medserve-soak-") as tmp:
        build_models(Path(tmp))
        report = asyncio.run(run(args, Path(tmp), RESULTS / "soak-server.log"))
    out = args.out or RESULTS / f"soak-{report['created_at']}.json"
    out.write_text(json.dumps(report, indent=2))
    shown = {k: v for k, v in report.items() if k != "rss_samples"}
    print(json.dumps(shown, indent=2))
    print(f"\n{'PASS' if report['passed'] else 'FAIL'}: {out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
