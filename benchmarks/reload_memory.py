"""Memory and time of replacing a model while it serves (a script): N replace cycles of a U-Net checkpoint.

Each cycle writes a new version of the checkpoint (new random weights, written to a temporary name and renamed),
reloads it through the registry (``ModelRegistry.rescan``, what ``POST /admin/models/reload`` and the watcher
call: load, warm-up, switch), runs one request through the new version, waits until the displaced version has
drained, stopped and released its memory (``KEEP_VERSIONS=1``: two versions loaded at every measurement), and
reads the process's resident set size after ``gc.collect()``. It runs the cycles twice, each in a fresh process:
as the service does (``app.memory.release_freed_memory``: gc, glibc ``malloc_trim``, CUDA cache), and with the
release reduced to ``gc.collect()`` (what the process would keep without the trim).

    python benchmarks/reload_memory.py                       # default U-Net (32..512), 30 cycles, CPU
    python benchmarks/reload_memory.py --cycles 10 --channels 8 16 32

Prints a table and writes ``benchmarks/results/reload_memory.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app import registry as registry_module  # noqa: E402
from app.registry import ModelRegistry  # noqa: E402
from app.settings import Settings  # noqa: E402
from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint  # noqa: E402
from models.preprocessing import Preprocessing  # noqa: E402
from models.unet import UNet  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def save_version(path: Path, seed: int, channels: list[int], size: int) -> str:
    torch.manual_seed(seed)
    args: dict[str, Any] = {"in_channels": 1, "out_channels": 2, "channels": channels}
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="unet", args=args),
        classes=["background", "lesion"],
        preprocessing=Preprocessing(in_channels=1, img_size=(size, size)),
    )
    return save_checkpoint(path, UNet(**args).eval(), meta).version


async def cycles(args: argparse.Namespace, model_dir: Path, device: torch.device) -> dict[str, Any]:
    path = model_dir / "unet.pt"
    save_version(path, 0, args.channels, args.size)
    config = Settings(
        model_dir=model_dir,
        device=str(device),
        keep_versions=1,
        model_poll_s=0.0,
        max_batch_size=args.batch,
        batch_autotune=False,
        decode_workers=1,
    )
    registry = ModelRegistry(config, device, model_threads=torch.get_num_threads())
    await registry.load_all()
    rss: list[float] = []
    reload_s: list[float] = []
    gpu: list[int] = []
    try:
        for cycle in range(1, args.cycles + 1):
            version = save_version(path, cycle, args.channels, args.size)
            started = time.perf_counter()
            report = await registry.rescan()
            reload_s.append(time.perf_counter() - started)
            if report.versions != {"unet": version}:
                raise RuntimeError(f"cycle {cycle}: the reload did not serve the new version: {report}")
            served = registry.resolve("segmentation", "unet")
            await served.batcher.submit(served.runner.warmup_input())
            del served
            await registry.drained()
            gc.collect()
            rss.append(resident_mib())
            gpu.append(torch.cuda.memory_allocated(device) if device.type == "cuda" else 0)
    finally:
        await registry.close()
    return {
        "rss_mib": [round(v, 1) for v in rss],
        "rss_growth_first_to_last": round((rss[-1] - rss[0]) / rss[0], 4),
        "reload_seconds_median": round(sorted(reload_s)[len(reload_s) // 2], 3),
        "reload_seconds_max": round(max(reload_s), 3),
        "cuda_allocated_bytes": gpu if device.type == "cuda" else None,
    }


def gc_only(device: torch.device) -> None:
    gc.collect()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--size", type=int, default=128, help="the checkpoint's input size (warm-up shape)")
    parser.add_argument("--batch", type=int, default=4, help="MAX_BATCH_SIZE (warm-up batches of 1 and this)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "reload_memory.json")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["service", "gc_only"],
        default=["gc_only", "service"],
        help="the releases to run, in this order",
    )
    parser.add_argument("--one", choices=["service", "gc_only"], help=argparse.SUPPRESS)  # a child's mode
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.one is not None:  # a child process: one run, its result to --out
        if args.one == "gc_only":
            registry_module.release_freed_memory = gc_only  # what the registry calls after a drain
        with tempfile.TemporaryDirectory() as model_dir:
            run = asyncio.run(cycles(args, Path(model_dir), device))
        args.out.write_text(json.dumps(run))
        return 0
    runs: dict[str, Any] = {}
    for mode in args.modes:  # each in a fresh process: the heap one run leaves must not start the next
        with tempfile.TemporaryDirectory() as scratch:
            part = Path(scratch) / "run.json"
            child = [
                sys.executable,
                __file__,
                "--one",
                mode,
                "--out",
                str(part),
                "--cycles",
                str(args.cycles),
            ]
            child += ["--channels", *map(str, args.channels), "--size", str(args.size)]
            child += ["--batch", str(args.batch), "--device", args.device]
            subprocess.run(child, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            runs[mode] = json.loads(part.read_text())
    params = sum(p.numel() for p in UNet(channels=args.channels).parameters())
    result = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "config": {
            "cycles": args.cycles,
            "unet_channels": args.channels,
            "parameters": params,
            "input_size": args.size,
            "max_batch_size": args.batch,
            "keep_versions": 1,
            "device": str(device),
            "load_average_1min": round(os.getloadavg()[0], 2),
        },
        "runs": runs,
    }
    print(
        f"U-Net {args.channels} ({params / 1e6:.1f} M parameters), {args.cycles} replace cycles on {device}"
    )
    print(f"{'release':<10} {'RSS cycle 1':>12} {'RSS last':>10} {'growth':>8} {'reload p50':>11} {'max':>7}")
    for mode, run in runs.items():
        first, last = run["rss_mib"][0], run["rss_mib"][-1]
        print(
            f"{mode:<10} {first:>9.1f} MiB {last:>6.1f} MiB {100 * run['rss_growth_first_to_last']:>7.1f}% "
            f"{run['reload_seconds_median']:>9.2f} s {run['reload_seconds_max']:>5.2f} s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
