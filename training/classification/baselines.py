"""Classical classifiers fitted on a trained network's frozen backbone features, the baselines of
``medserve eval classify``: k-nearest neighbours, linear discriminant analysis, Gaussian naive Bayes and a linear
SVM (scikit-learn), and the training images they are fitted on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from models.checkpoint import CheckpointMetadata
from training.classification.data import Sample, class_folders, discover, list_samples


def baseline_models(n_train: int) -> dict[str, Any]:
    """The classical classifiers compared against the network (features are standardised first)."""
    return {
        "knn": make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=min(5, n_train))),
        # Shrinkage keeps LDA well-posed when features outnumber images or are collinear.
        "lda": make_pipeline(StandardScaler(), LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")),
        "naive_bayes": make_pipeline(StandardScaler(), GaussianNB()),
        "linear_svm": make_pipeline(StandardScaler(), LinearSVC(class_weight="balanced", max_iter=5000)),
    }


def fit_baselines(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> dict[str, dict[str, float]]:
    """Fits each baseline on (train_x (N, F), train_y) and scores it on the test features."""
    if len(np.unique(train_y)) < 2:
        raise ValueError("the baselines need training images of at least two classes")
    results = {}
    for name, clf in baseline_models(len(train_y)).items():
        clf.fit(train_x, train_y)
        predicted = clf.predict(test_x)
        results[name] = {
            "accuracy": float(accuracy_score(test_y, predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(test_y, predicted)),
        }
    return results


def training_samples(meta: CheckpointMetadata, train_data: str | Path | None) -> tuple[list[Sample], str]:
    """The training images for the baselines and a description of where they came from.

    Raises:
        ValueError: no ``--train-data`` and the checkpoint records no usable training data path.
    """
    if train_data is not None:
        root = Path(train_data)
        base = root / "train" if (root / "train").is_dir() and class_folders(root / "train") else root
        _, samples = list_samples(base, meta.classes)
        return samples, f"--train-data {train_data} (all images)"
    recorded = meta.extra.get("train_data") or {}
    path = recorded.get("path")
    if not path or not Path(path).is_dir():
        raise ValueError(
            f"the checkpoint's training data ({path or 'not recorded'}) is not available here; "
            "pass --train-data DIR for the baselines, or --no-baselines"
        )
    data = discover(path, val_split=float(recorded.get("val_split", 0.0)), seed=int(recorded.get("seed", 0)))
    if data.classes != meta.classes:
        raise ValueError(
            f"the training data at {path} now has classes {data.classes}, the checkpoint {meta.classes}; "
            "pass --train-data DIR"
        )
    return data.train, f"the checkpoint's training split of {path}"
