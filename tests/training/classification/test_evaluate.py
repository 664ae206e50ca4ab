"""`medserve eval classify`: metric definitions and a complete report with baselines."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.classifier import Classifier
from models.preprocessing import Preprocessing
from tests.training.helpers import eval_argv
from training.classification.data import discover
from training.classification.handcrafted import N_FEATURES
from training.classification.lesions import generate_lesion_dataset
from training.classification.metrics import (
    classification_metrics,
    expected_calibration_error,
    one_vs_rest_auc,
)
from training.cli import main


def test_metrics_match_hand_computed_values() -> None:
    classes = ["a", "b", "c"]
    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array(
        [
            [0.8, 0.1, 0.1],  # a -> a
            [0.6, 0.3, 0.1],  # a -> a
            [0.2, 0.7, 0.1],  # a -> b
            [0.1, 0.8, 0.1],  # b -> b
            [0.1, 0.2, 0.7],  # b -> c
            [0.1, 0.1, 0.8],  # c -> c
        ]
    )
    m = classification_metrics(probs, labels, classes)
    assert m["n_images"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    b = m["per_class"]["b"]
    assert (b["precision"], b["recall"], b["sensitivity"], b["support"]) == (0.5, 0.5, 0.5, 2)
    assert b["specificity"] == pytest.approx(3 / 4)  # of the 4 non-b images, 3 are not called b
    assert m["per_class"]["a"]["specificity"] == 1.0
    assert 0.0 <= m["ece"] <= 1.0
    assert m["auc"] == pytest.approx(np.mean([a for a in one_vs_rest_auc(probs, labels)[1] if a is not None]))


def test_auc_is_macro_one_vs_rest_and_skips_absent_classes() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.3, 0.7, 0.0], [0.2, 0.8, 0.0]])
    macro, per_class = one_vs_rest_auc(probs, labels)
    assert per_class == [1.0, 1.0, None]  # class 2 never occurs: its AUC is undefined
    assert macro == 1.0
    assert one_vs_rest_auc(probs[:2], labels[:2])[0] is None


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    # 10 predictions at confidence 0.8, 8 of them right: perfectly calibrated.
    probs = np.tile([0.8, 0.2], (10, 1))
    labels = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0)
    # Always right at confidence 0.6: off by 0.4.
    assert expected_calibration_error(np.tile([0.6, 0.4], (5, 1)), np.zeros(5, int)) == pytest.approx(0.4)


@pytest.fixture(scope="module")
def lesion_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An (untrained) checkpoint whose metadata points at a small lesion training set, plus a test set."""
    root = tmp_path_factory.mktemp("lesions")
    train = generate_lesion_dataset(root / "train", 12, size=48, seed=0)
    test = generate_lesion_dataset(root / "test", 6, size=48, seed=1)
    data = discover(train, val_split=0.25, seed=0)
    torch.manual_seed(0)
    model = Classifier("resnet18", num_classes=2, in_channels=1, head="gap").eval()
    meta = CheckpointMetadata(
        task="classification",
        architecture=Architecture(name="classifier", args=model.architecture_args()),
        classes=data.classes,
        preprocessing=Preprocessing(in_channels=1, img_size=(32, 32), resize="resize"),
        extra={"temperature": 1.5, "train_data": {"path": str(train), "val_split": 0.25, "seed": 0}},
    )
    path = root / "lesions.pt"
    save_checkpoint(path, model, meta)
    return path, test


def test_report_has_every_field(lesion_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, test = lesion_model
    out = tmp_path / "report"
    argv = eval_argv("classify", model, test, out, "--device", "cpu", "--threads", "1", "--no-progress")
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    required = {"n_images", "accuracy", "balanced_accuracy", "auc", "per_class", "confusion_matrix", "ece"}
    assert required | {"baselines"} <= set(report)
    assert report["n_images"] == 12
    assert np.asarray(report["confusion_matrix"]).sum() == 12
    assert set(report["per_class"]) == {"benign", "malignant"}
    for stats in report["per_class"].values():
        assert {"precision", "recall", "sensitivity", "specificity", "support"} <= set(stats)
        assert stats["support"] == 6
    names = {"knn", "lda", "naive_bayes", "linear_svm", "decision_tree", "mlp"}
    assert set(report["baselines"]) == names | {f"handcrafted_{name}" for name in names}
    for scores in report["baselines"].values():
        assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["balanced_accuracy"] <= 1.0
        assert 0.0 <= scores["auc"] <= 1.0 and scores["seconds"] >= 0.0
    features = report["baseline_features"]
    assert features["cnn"]["n_features"] == 512 and features["handcrafted"]["n_features"] == N_FEATURES
    assert all(f["seconds"] > 0.0 for f in features.values())
    # The baselines were fitted on the checkpoint's training split (validation quarter held out).
    assert report["baselines_train"]["n_images"] == 18
    assert report["model"]["temperature"] == 1.5
    markdown = (out / "report.md").read_text()
    assert "balanced_accuracy" in markdown and "linear_svm" in markdown
    # One row per classifier, its CNN-feature and hand-crafted scores side by side.
    mlp_row = next(line for line in markdown.splitlines() if line.startswith("| mlp |"))
    assert (
        mlp_row.count("|") == 8
        and "CNN features: auc" in markdown
        and "hand-crafted features: auc" in markdown
    )
    for png in ("confusion_matrix.png", "roc.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[0].startswith("file,true,predicted")


def test_train_data_option_and_missing_training_data(
    lesion_model: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, test = lesion_model

    def evaluate(out: Path, *options: str) -> int:
        return main(eval_argv("classify", model, test, out, "--device", "cpu", "--threads", "1", *options))

    assert evaluate(tmp_path / "a", "--train-data", str(test)) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert (
        report["baselines_train"]["n_images"] == 12 and "--train-data" in report["baselines_train"]["source"]
    )

    with caplog.at_level(logging.ERROR):
        assert evaluate(tmp_path / "b", "--train-data", str(tmp_path / "nowhere")) == 2
    assert "does not exist" in caplog.text
    assert evaluate(tmp_path / "c", "--no-baselines") == 0
    assert json.loads((tmp_path / "c" / "report.json").read_text())["baselines"] == {}


def test_test_folder_with_unknown_class_is_refused(
    lesion_model: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, _ = lesion_model
    generate_lesion_dataset(tmp_path / "data", 1, size=32, seed=0)
    (tmp_path / "data" / "benign").rename(tmp_path / "data" / "cyst")
    argv = eval_argv("classify", model, tmp_path / "data", tmp_path / "o")
    with caplog.at_level(logging.ERROR):
        assert main([*argv, "--device", "cpu", "--no-baselines"]) == 2
    assert "cyst" in caplog.text


def test_baseline_features_option_and_max_train_images(
    lesion_model: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, test = lesion_model

    def evaluate(out: Path, *options: str) -> dict[str, Any]:
        argv = eval_argv("classify", model, test, out, "--device", "cpu", "--threads", "1", *options)
        assert main(argv) == 0
        return dict(json.loads((out / "report.json").read_text()))

    report = evaluate(tmp_path / "a", "--baseline-features", "handcrafted", "--max-train-images", "10")
    assert set(report["baselines"]) == {
        "handcrafted_knn",
        "handcrafted_lda",
        "handcrafted_naive_bayes",
        "handcrafted_linear_svm",
        "handcrafted_decision_tree",
        "handcrafted_mlp",
    }
    assert set(report["baseline_features"]) == {"handcrafted"} and report["baselines_train"]["n_images"] == 10
    markdown = (tmp_path / "a" / "report.md").read_text()
    assert "hand-crafted features: accuracy" in markdown and "CNN features" not in markdown
    report = evaluate(tmp_path / "b", "--baseline-features", "cnn", "--max-train-images", "12")
    assert set(report["baselines"]) == {"knn", "lda", "naive_bayes", "linear_svm", "decision_tree", "mlp"}
    assert report["baselines_train"]["n_images"] == 12
    with pytest.raises(SystemExit):
        main(eval_argv("classify", model, test, tmp_path / "c", "--baseline-features", "sift"))
    assert "--baseline-features" in capsys.readouterr().err
