import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import reload_memory


@pytest.mark.slow
def test_the_script_writes_both_releases(tmp_path: Path) -> None:
    out = tmp_path / "reload.json"
    code = reload_memory.main(
        ["--cycles", "2", "--channels", "4", "8", "--size", "32", "--batch", "2", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert code == 0
    assert result["config"]["cycles"] == 2 and result["config"]["unet_channels"] == [4, 8]
    for mode in ("gc_only", "service"):
        run = result["runs"][mode]
        assert len(run["rss_mib"]) == 2 and all(value > 0 for value in run["rss_mib"])
        assert run["reload_seconds_max"] >= run["reload_seconds_median"] > 0
