"""benchmarks/ood.py: the pair summary and the service-path scoring it reports."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import load_model
from models.imageio import read_image_file
from models.ood import extract_features
from tests.training.helpers import save_tiny_unet
from training.cli import main as cli_main
from training.common.ood import model_input

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import ood as bench


def test_pair_result_counts_flags_and_auroc() -> None:
    inside = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    outside = np.array([5.0, 6.0, 20.0, 30.0])
    result = bench.pair_result(inside, outside, threshold=4.5)
    assert result["flagged_in"] == 0.2 and result["flagged_out"] == 1.0
    assert result["auroc"] == pytest.approx(18 / 20)  # 10.0 outranks two of the four foreign scores
    assert result["goal_met"] is False  # 20 % of the in-distribution images flagged
    assert bench.pair_result(inside[:4], outside, threshold=4.5)["goal_met"] is True


def test_score_files_gives_the_services_score_for_each_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "images").mkdir(parents=True)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(
            tmp_path / "data" / "images" / f"{i}.png"
        )
    save_tiny_unet(tmp_path / "unet.pt")
    assert (
        cli_main(["calibrate-ood", "--model", str(tmp_path / "unet.pt"), "--data", str(tmp_path / "data")])
        == 0
    )
    files = sorted((tmp_path / "data" / "images").glob("*.png"))
    scores = bench.score_files(tmp_path / "unet.pt", files, batch=3)
    assert scores.shape == (8,) and np.all(np.isfinite(scores))
    model, meta = load_model(tmp_path / "unet.pt")
    assert meta.ood is not None
    inputs = [model_input(read_image_file(f).pixels, meta) for f in files]
    with torch.inference_mode():
        expected = meta.ood.scores(extract_features(model, inputs, tile=meta.preprocessing.img_size))
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_feature_study_scores_sum_the_layers_squared_distances() -> None:
    import ood_features as study

    from models.ood import fit_gaussian, mahalanobis_scores

    rng = np.random.default_rng(1)
    fit = {"a/mean": rng.normal(size=(40, 3)), "b/mean": rng.normal(size=(40, 5))}
    groups = np.repeat([0, 1], 20)
    probe = {"test": {"a/mean": rng.normal(size=(6, 3)), "b/mean": rng.normal(size=(6, 5))}}
    one = study.scores_for(["a/mean"], fit, groups, 2, probe)["test"]
    means, precision = fit_gaussian(fit["a/mean"], groups, 2)
    np.testing.assert_allclose(one, mahalanobis_scores(probe["test"]["a/mean"], means, precision))
    both = study.scores_for(["a/mean", "b/mean"], fit, groups, 2, probe)["test"]
    assert np.all(both >= one - 1e-12)  # another block only adds squared distance


def test_results_name_no_machine_paths() -> None:
    root = Path(bench.ROOT)
    command = f"medserve demo --model-dir {root}/runs/ood/demo --data {root.parent}/shared/datasets/x"
    assert bench.shown(command) == "medserve demo --model-dir runs/ood/demo --data ../shared/datasets/x"
