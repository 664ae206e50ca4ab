import itertools
import json

import numpy as np
import pytest

from models.interactive import BACKGROUND, FOREGROUND
from tests.training.helpers import eval_argv, save_tiny_unet
from training.cli import main as cli_main
from training.segmentation.interactive import Click, next_click, simulate_clicks
from training.segmentation.synthetic import generate_dental

pytestmark = pytest.mark.usefixtures("single_thread")


def shapes(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image of three bright objects of different sizes and gray levels, and their mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:size, :size]
    large = (yy - 22) ** 2 + (xx - 40) ** 2 <= 14**2
    medium = (yy - 50) ** 2 + (xx - 14) ** 2 <= 8**2
    small = (yy - 10) ** 2 + (xx - 10) ** 2 <= 4**2
    image = 0.2 + 0.65 * large + 0.3 * medium + 0.45 * small + rng.normal(0, 0.04, (size, size))
    return np.clip(image, 0, 1).astype(np.float32), large | medium | small


def test_the_first_click_goes_in_the_centre_of_the_largest_object():
    _, target = shapes()
    click = next_click(np.zeros_like(target), target)
    assert click == Click(40, 22, FOREGROUND)


def test_a_false_positive_larger_than_any_miss_gets_a_background_click():
    target = np.zeros((20, 30), dtype=bool)
    target[2:5, 2:5] = True
    prediction = target.copy()
    prediction[10:18, 12:28] = True  # 8x16 wrongly included
    prediction[2, 2] = False  # one pixel missed
    click = next_click(prediction, target)
    assert click is not None and click.value == BACKGROUND
    assert prediction[click.y, click.x] and not target[click.y, click.x]
    assert 13 <= click.y <= 14 and 18 <= click.x <= 21  # the interior, away from the region's edges
    assert next_click(target, target) is None


def test_the_image_border_counts_as_a_regions_boundary():
    target = np.zeros((10, 40), dtype=bool)
    target[:, :20] = True  # touches the top, bottom and left borders
    click = next_click(np.zeros_like(target), target)
    assert click is not None and click.y in (4, 5) and 8 <= click.x <= 11


def test_clicks_improve_the_graph_cut_and_the_model():
    image, target = shapes()
    alone = simulate_clicks(image, target, 4, radius=2)
    assert len(alone) == 4
    assert alone[0] < 0.9 < alone[-1]  # the first click finds the largest object, the next the others
    assert all(later >= earlier - 0.02 for earlier, later in itertools.pairwise(alone))
    # A model that misses the small object: the clicks start from its mask and fix what it got wrong.
    probability = np.where(target, 0.9, 0.1)
    probability[:16, :16] = 0.1
    start = 2 * (target & (probability > 0.5)).sum() / (target.sum() + (probability > 0.5).sum())
    refined = simulate_clicks(image, target, 2, probability=probability, radius=2)
    assert refined[0] > start + 0.02 and refined[-1] > 0.95


def test_an_image_without_foreground_keeps_a_perfect_empty_mask():
    image = np.full((16, 16), 0.3, dtype=np.float32)
    assert simulate_clicks(image, np.zeros((16, 16), dtype=bool), 3) == [1.0, 1.0, 1.0]


def test_eval_interactive_writes_the_report_fields(tmp_path):
    generate_dental(tmp_path / "data", 2, 64, seed=3)
    model = tmp_path / "m.pt"
    save_tiny_unet(model)
    out = tmp_path / "report"
    argv = eval_argv(
        "segment", model, tmp_path / "data", out, "--device", "cpu", "--no-tta", "--interactive", "2"
    )
    assert cli_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"n_images", "methods", "interactive"}
    interactive = report["interactive"]
    assert interactive["clicks"] == 2 and interactive["foreground_class"] == "tooth"
    for run in ("graph_cut", "unet_graph_cut"):
        assert len(interactive[run]) == 2 and all(0 <= d <= 1 for d in interactive[run])
    # The phantom's teeth are bright on a dark jaw: the graph cut finds them from the clicks alone.
    assert interactive["graph_cut"][-1] > 0.5
    markdown = (out / "report.md").read_text()
    assert "## Interactive correction (simulated clicks)" in markdown
    assert "| 2 | " in markdown and "## U-Net against the classical baselines" in markdown
