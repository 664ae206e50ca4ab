"""``benchmarks/bench_interactive.py``: the timing table of the interactive graph cut."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_interactive


def test_the_report_times_both_modes_per_size_and_the_cut_is_right(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert bench_interactive.main(["--sizes", "64", "96", "--repeats", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["graph_cut"]
    assert [(r["size"], r["mode"]) for r in rows] == [
        (64, "hints alone"),
        (64, "with probabilities"),
        (96, "hints alone"),
        (96, "with probabilities"),
    ]
    for row in rows:
        assert 0 < row["min_s"] <= row["median_s"] and row["repeats"] == 2
        assert row["dice"] > 0.9
    assert "with probabilities" in capsys.readouterr().out
