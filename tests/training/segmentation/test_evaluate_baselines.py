"""`medserve eval segment --baselines LIST`: which baselines run, and how the report ranks them."""

import json

import pytest

from tests.training.helpers import eval_argv, save_tiny_unet
from training.cli import main as cli_main
from training.segmentation.synthetic import generate_dental

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def phantoms(tmp_path):
    generate_dental(tmp_path / "data", 3, 64, seed=2)
    save_tiny_unet(tmp_path / "m.pt")
    return tmp_path


def _evaluate(root, out, *options):
    return cli_main(
        eval_argv("segment", root / "m.pt", root / "data", root / out, "--device", "cpu", *options)
    )


def test_only_the_chosen_baselines_run_and_are_ranked(phantoms):
    assert _evaluate(phantoms, "r", "--baselines", "graph_cut,otsu") == 0
    report = json.loads((phantoms / "r" / "report.json").read_text())
    methods = report["methods"]
    assert list(methods) == ["unet", "otsu", "graph_cut"]
    assert sorted(s["rank"] for s in methods.values()) == [1, 2, 3]
    by_dice = sorted(methods, key=lambda m: -methods[m]["dice"])
    assert [methods[m]["rank"] for m in by_dice] == [1, 2, 3]
    for name in ("otsu", "graph_cut"):
        assert methods[name]["beaten_by_unet"] == (methods["unet"]["dice"] > methods[name]["dice"])
        assert methods[name]["seconds_per_image"] > 0
    assert methods["unet"]["seconds_per_image"] > 0
    markdown = (phantoms / "r" / "report.md").read_text()
    assert "| rank | method | Dice | IoU | HD95 (px) |" in markdown and "s/image |" in markdown
    assert "## Which beat which" in markdown and "| images won (of 3) |" in markdown
    assert "U-Net does not beat graph cut" in markdown or "U-Net beats graph cut" in markdown
    assert "k-means" not in markdown
    rows = (phantoms / "r" / "per_image.csv").read_text().splitlines()[1:]
    assert {row.split(",")[1] for row in rows} == {"unet", "otsu", "graph_cut"}


def test_none_evaluates_the_unet_alone(phantoms):
    assert _evaluate(phantoms, "n", "--baselines", "none") == 0
    report = json.loads((phantoms / "n" / "report.json").read_text())
    assert list(report["methods"]) == ["unet"] and report["methods"]["unet"]["rank"] == 1


def test_an_unknown_baseline_is_an_error_listing_the_valid_ones(phantoms, capsys):
    with pytest.raises(SystemExit) as exc:
        _evaluate(phantoms, "u", "--baselines", "otsu,watershed")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown baseline(s) watershed" in err and "graph_cut" in err and "region_merging" in err
    assert not (phantoms / "u").exists()
