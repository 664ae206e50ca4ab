import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import accuracy


def test_segmentation_summary_keeps_every_method_and_its_scores():
    report = {
        "n_images": 2,
        "methods": {
            "unet": {"dice": 0.9, "iou": 0.8, "hd95": 3.0, "per_class_dice": {"teeth": 0.9}, "seconds": 1.0},
            "otsu": {"dice": 0.6, "iou": 0.4, "hd95": 30.0, "per_class_dice": {"teeth": 0.6}, "rank": 2},
        },
    }
    methods = accuracy.summary(report)
    assert methods == {
        "unet": {"dice": 0.9, "iou": 0.8, "hd95": 3.0, "per_class_dice": {"teeth": 0.9}},
        "otsu": {"dice": 0.6, "iou": 0.4, "hd95": 30.0, "per_class_dice": {"teeth": 0.6}, "rank": 2},
    }


def test_classification_summary_puts_the_cnn_beside_its_baselines():
    report = {
        "accuracy": 0.9,
        "balanced_accuracy": 0.85,
        "auc": 0.95,
        "ece": 0.02,
        "baselines": {"knn": {"accuracy": 0.8}},
    }
    assert accuracy.summary(report) == {
        "cnn": {"accuracy": 0.9, "balanced_accuracy": 0.85, "auc": 0.95, "ece": 0.02},
        "knn": {"accuracy": 0.8},
    }


def test_isbi_split_links_slices_0_to_23_for_training_and_24_to_29_for_testing(tmp_path):
    source = tmp_path / "datasets" / "isbi2012-em-membrane"
    for kind in ("images", "masks"):
        (source / kind).mkdir(parents=True)
        for i in range(30):
            (source / kind / f"{i}.png").write_bytes(b"png")
    plan = accuracy.isbi(tmp_path / "run", tmp_path / "datasets")
    plan.prepare()
    train = sorted(int(p.stem) for p in (tmp_path / "run/data/train/images").iterdir())
    test = sorted(int(p.stem) for p in (tmp_path / "run/data/test/masks").iterdir())
    assert train == list(range(24)) and test == list(range(24, 30))
    assert (tmp_path / "run/data/test/masks/29.png").resolve() == (source / "masks/29.png").resolve()
    assert plan.evaluate[:2] == ["eval", "segment"] and "--epochs" in plan.train


def test_the_chest_phantom_experiment_trains_with_nothing_but_data_and_out(tmp_path):
    plan = accuracy.chest_phantoms(tmp_path / "run", tmp_path / "datasets")
    assert plan.train == [
        "train",
        "segment",
        "--data",
        str(tmp_path / "run/train"),
        "--out",
        str(plan.checkpoint),
    ]
    assert plan.evaluate[plan.evaluate.index("--data") + 1] == str(tmp_path / "run/test")
