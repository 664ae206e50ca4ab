"""``benchmarks/bench_pacs.py``: a small run against a real Orthanc and a real service process."""

import json
import sys
from pathlib import Path

import pytest

from tests.components import require_program
from tests.pacs.orthanc import find_orthanc

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_pacs

pytestmark = pytest.mark.slow


def test_a_small_run_reports_every_path_and_the_goals(tmp_path, capsys):
    find_orthanc()
    require_program("storescu", "dcmtk")
    out = tmp_path / "bench_pacs.json"
    argv = ["--instances", "6", "--size", "64", "--per-request", "3", "--big-size", "64", "--repeats", "1"]
    assert bench_pacs.main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["endpoint"] for row in report["http"]] == ["/segment", "/segment?format=dicom-seg"]
    assert [row["path"] for row in report["jobs"]] == ["STOW-RS", "storescu (C-STORE)"]
    for row in report["jobs"]:
        assert row["instances"] == 6
        assert row["accepted_per_s"] > 0 and row["jobs_per_s"] > 0
        assert 0 < row["latency_p50_s"] <= row["latency_max_s"]  # stored after it was accepted
    big = report["stow_50"]
    assert big["instances_per_request"] == 50 and len(big["repeats"]) == 1
    assert big["median_s_per_10mb"] == pytest.approx(big["repeats"][0]["s_per_10mb"])
    goals = report["goals"]
    assert goals["drain_ratio"] == pytest.approx(
        min(row["jobs_per_s"] for row in report["jobs"]) / report["http"][1]["images_per_s"]
    )
    assert goals["accept_met"] == (goals["accept_s_per_10mb"] < 1.0)
    assert report["runtime"]["serves"] and report["max_batch"] >= 1  # what the service chose at load
    printed = capsys.readouterr().out
    assert "50-instance STOW-RS request" in printed and "runtime chosen at load" in printed
