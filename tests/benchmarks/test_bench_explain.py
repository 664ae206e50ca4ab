"""``benchmarks/bench_explain.py``: its options and the summary it writes (the service run is the script's)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_explain


def test_quick_runs_few_requests_in_one_round() -> None:
    args = bench_explain.parse_args(["--quick"])
    assert (args.latency_requests, args.requests, args.rounds, args.concurrency) == (8, 96, 1, 32)
    assert bench_explain.parse_args([]).rounds == 2
    with pytest.raises(SystemExit):
        bench_explain.parse_args(["--requests", "0"])


def test_the_summary_compares_beside_with_alone_over_the_rounds() -> None:
    def run(beside: bool, throughput: float, explained: int) -> dict[str, object]:
        return {
            "explanations_beside": beside,
            "throughput": throughput,
            "explanation_answers": {"200": explained, "503": 1} if beside else {},
        }

    result = {
        "latency_c1": [{"p50_ms": 50.0}, {"p50_ms": 200.0}],
        "throughput_runs": [run(False, 10.0, 0), run(True, 9.0, 3), run(False, 12.0, 0), run(True, 10.0, 4)],
    }
    summary = bench_explain.summarize(result)
    assert summary["explain_over_plain_p50_c1"] == 4.0
    assert summary["explain_minus_plain_p50_c1_ms"] == 150.0
    assert summary["plain_throughput_alone"] == 11.0
    assert summary["beside_over_alone"] == pytest.approx(9.5 / 11.0)
    assert summary["explanations_answered_beside"] == 7
    assert summary["goal_within_10_percent"] is False  # 0.86 < 0.9


def test_the_uploads_are_jpeg_phantoms_of_the_size() -> None:
    images = bench_explain.uploads(64, count=2)
    assert len(images) == 2 and all(data[:2] == b"\xff\xd8" for data in images)


def test_the_heat_inside_the_dilated_lesion_is_measured_against_the_region_it_covers() -> None:
    mask = np.zeros((64, 64), dtype=bool)
    mask[30:34, 30:34] = True
    # 4x4 grown to every pixel within 10 steps (4-connected dilation): 16 + 4 sides x 40 + 4 corners x 45.
    region = (16 + 160 + 180) / 64**2
    heat = np.zeros((64, 64))
    heat[32, 32] = 3.0
    heat[0, 0] = 1.0
    row = bench_explain.lesion_heat_row(heat, mask)
    assert row["inside"] == 0.75
    assert row["region_share"] == region
    assert np.isnan(bench_explain.lesion_heat_row(np.zeros((64, 64)), mask)["inside"])
