"""Seconds an interactive correction's graph cut takes (``models.interactive.graph_cut``), by image size.

The work ``POST /segment/interactive`` does between decoding and encoding: on a phantom (two bright objects
on a noisy background) with four clicks (two foreground, two background, disks of 5 pixels), the graph cut
from the clicks alone and refining a probability map (the truth blurred and noisy, standing in for a U-Net's).
The table shows the median seconds of ``--repeats`` runs and the Dice of the answer; the goal is under 1 s
for 512x512, so that a person clicking does not wait.

    python benchmarks/bench_interactive.py
    python benchmarks/bench_interactive.py --sizes 512 1024 2048 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# benchmarks/, the script's own folder
from bench_layout import RESULTS, environment, write_report  # noqa: E402

from models.interactive import BACKGROUND, FOREGROUND, draw_points, graph_cut  # noqa: E402


def phantom(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image, truth, hints, probability) of a ``size`` x ``size`` scene; positions scale with the size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:size, :size]
    disc = (yy - 0.4 * size) ** 2 + (xx - 0.35 * size) ** 2 <= (0.2 * size) ** 2
    ellipse = ((yy - 0.72 * size) / (0.12 * size)) ** 2 + ((xx - 0.7 * size) / (0.2 * size)) ** 2 <= 1
    truth = disc | ellipse
    image = np.clip(np.where(truth, 0.65, 0.3) + rng.normal(0, 0.08, truth.shape), 0, 1).astype(np.float32)
    clicks = [
        (0.35 * size, 0.4 * size, FOREGROUND),
        (0.7 * size, 0.72 * size, FOREGROUND),
        (0.1 * size, 0.9 * size, BACKGROUND),
        (0.9 * size, 0.1 * size, BACKGROUND),
    ]
    hints = draw_points(clicks, 5, size, size)
    blurred = ndimage.gaussian_filter(truth.astype(np.float32), 0.01 * size)
    probability = np.clip(0.1 + 0.8 * blurred + rng.normal(0, 0.1, truth.shape), 0, 1)
    return image, truth, hints, probability


def dice(mask: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (mask & truth).sum() / (mask.sum() + truth.sum()))


def measure(size: int, repeats: int) -> list[dict[str, Any]]:
    """Median seconds and Dice of the cut from the hints alone and refining the probability map."""
    image, truth, hints, probability = phantom(size)
    rows = []
    for name, prob in (("hints alone", None), ("with probabilities", probability)):
        graph_cut(image, hints, prob)  # warm-up: first-touch of the memory
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            mask = graph_cut(image, hints, prob)
            seconds.append(time.perf_counter() - started)
        rows.append(
            {
                "size": size,
                "mode": name,
                "repeats": repeats,
                "median_s": statistics.median(seconds),
                "min_s": min(seconds),
                "dice": dice(mask, truth),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048], help="image sides (pixels)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per size and mode (default 5)")
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "bench_interactive.json",
        help="JSON report (default: benchmarks/results/bench_interactive.json)",
    )
    args = parser.parse_args(argv)
    rows = [row for size in args.sizes for row in measure(size, args.repeats)]
    print(
        f"graph cut of an interactive correction, median of {args.repeats} runs, one CPU thread (PyMaxflow)"
    )
    print(f"{'size':>11} {'mode':<20} {'median s':>9} {'min s':>7} {'Dice':>6}")
    for r in rows:
        print(
            f"{r['size']:>5}x{r['size']:<5} {r['mode']:<20} {r['median_s']:>9.3f} {r['min_s']:>7.3f} "
            f"{r['dice']:>6.3f}"
        )
    write_report({**environment(torch.device("cpu")), "graph_cut": rows}, "bench_interactive", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
