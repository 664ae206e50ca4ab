"""benchmarks/compare_litserve.py: ApacheBench's report is read right, and the goal is judged per client."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import compare_litserve

AB_REPORT = """
Concurrency Level:      32
Time taken for tests:   6.898 seconds
Complete requests:      64
Failed requests:        48
   (Connect: 0, Receive: 0, Length: 48, Exceptions: 0)
Keep-Alive requests:    0
Requests per second:    9.28 [#/sec] (mean)

Percentage of the requests served within a certain time (ms)
  50%   3270
  66%   3667
  95%   3957
 100%   3967 (longest request)
"""


def test_ab_length_differences_are_no_failures_but_connection_errors_are() -> None:
    assert compare_litserve.parse_ab(AB_REPORT) == {
        "throughput": 9.28,
        "p50_ms": 3270.0,
        "p95_ms": 3957.0,
        "keep_alive_requests": 0,
    }
    with pytest.raises(RuntimeError, match="requests failed"):
        compare_litserve.parse_ab(AB_REPORT.replace("Receive: 0", "Receive: 2"))
    with pytest.raises(RuntimeError, match="requests failed"):
        compare_litserve.parse_ab(AB_REPORT + "Non-2xx responses:      3\n")


def level(throughput: float, p50: float) -> dict[str, float]:
    return {"throughput": throughput, "p50_ms": p50, "p95_ms": p50}


def test_the_goal_is_judged_per_client_against_litserve_and_the_raw_eager_forward(
    capsys: pytest.CaptureFixture[str],
) -> None:
    options = argparse.Namespace(concurrency=[1, 32], clients=["keepalive", "ab"])
    report = {
        "endpoint": "/classify",
        "requests": 64,
        "raw_forward": {"1": {"ms_per_batch": 30.0}, "16": {"throughput": 40.0}},
        "servers": {
            "litserve": {
                "keepalive": {"1": level(20, 45), "32": level(40, 800)},
                "ab": {"1": level(20, 46), "32": level(40, 810)},
            },
            "medserve": {
                "keepalive": {"1": level(40, 25), "32": level(61, 500)},
                "ab": {"1": level(30, 31), "32": level(59, 520)},
            },
        },
    }
    goal = compare_litserve.goal(report, options)
    assert goal["raw_eager_batch1_ms"] == 30.0
    assert goal["keepalive"]["c32_medserve_over_litserve"] == pytest.approx(61 / 40)
    assert goal["keepalive"]["throughput_goal_met"] and goal["keepalive"]["p50_goal_met"]
    assert not goal["ab"]["throughput_goal_met"]  # 59 / 40 < 1.5
    assert not goal["ab"]["p50_goal_met"]  # 31 ms is not below 30 ms
    report["goal"] = goal
    compare_litserve.print_tables({"models": {"resnet18": report}})
    printed = capsys.readouterr().out
    assert "| **medserve** | keepalive | 61.00 | 25.0 ms | -5.0 ms |" in printed
    assert "ab: MedServe / LitServe at c=32 = 1.48 (goal 1.5: not met)" in printed
