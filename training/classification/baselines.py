"""The baselines of ``medserve eval classify``: classical classifiers (scikit-learn: k-nearest neighbours, linear
discriminant analysis, Gaussian naive Bayes, a linear SVM, a decision tree and a small neural network) fitted on
two kinds of features of the training images, the trained network's frozen backbone features and hand-crafted
ones (``training.classification.handcrafted``), and the training images they are fitted on."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.tree import DecisionTreeClassifier
from torch import nn

from models.checkpoint import CheckpointMetadata
from training.classification.data import (
    ClassificationDataset,
    Sample,
    class_folders,
    discover,
    list_samples,
)
from training.classification.engine import extract_features
from training.classification.handcrafted import TEXTURE_SIZE, extract_handcrafted
from training.classification.metrics import one_vs_rest_auc

# The two kinds of features the baselines are fitted on; the hand-crafted ones' report keys carry this prefix.
FEATURE_KINDS = ("cnn", "handcrafted")
HANDCRAFTED_PREFIX = "handcrafted_"
# The MLP holds out 10 % of its training images to stop early; below this many it trains on all of them.
MLP_EARLY_STOPPING_MIN_IMAGES = 50


class BaselineScores(TypedDict):
    """One baseline's scores on the test images; ``auc`` is macro one-vs-rest (None when undefined)."""

    accuracy: float
    balanced_accuracy: float
    auc: float | None
    seconds: float


def baseline_models(n_train: int, seed: int = 0) -> dict[str, Any]:
    """The classical classifiers compared against the network (features are standardised first where the
    classifier depends on their scale; ``seed`` fixes the decision tree and the MLP)."""
    return {
        "knn": make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=min(5, n_train))),
        # Shrinkage keeps LDA well-posed when features outnumber images or are collinear.
        "lda": make_pipeline(StandardScaler(), LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")),
        "naive_bayes": make_pipeline(StandardScaler(), GaussianNB()),
        "linear_svm": make_pipeline(StandardScaler(), LinearSVC(class_weight="balanced", max_iter=5000)),
        # Leaves of at least 5 images keep the tree from memorising single training images.
        "decision_tree": DecisionTreeClassifier(
            min_samples_leaf=5, class_weight="balanced", random_state=seed
        ),
        "mlp": make_pipeline(
            StandardScaler(),
            MLPClassifier(
                hidden_layer_sizes=(64,),
                alpha=1e-3,
                max_iter=300,
                early_stopping=n_train >= MLP_EARLY_STOPPING_MIN_IMAGES,
                random_state=seed,
            ),
        ),
    }


BASELINE_NAMES = tuple(baseline_models(n_train=1))


def baseline_key(kind: str, name: str) -> str:
    """The report key of baseline ``name`` fitted on features of ``kind`` (one of ``FEATURE_KINDS``)."""
    return HANDCRAFTED_PREFIX + name if kind == "handcrafted" else name


def class_scores(clf: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, n_classes) scores that rank the images per class (probabilities, or the SVM's decision values);
    a class the classifier never saw gets a constant score."""
    if hasattr(clf, "predict_proba"):
        raw = clf.predict_proba(x)
    else:
        raw = clf.decision_function(x)
        if raw.ndim == 1:  # two classes: one signed distance, positive for classes_[1]
            raw = np.stack([-raw, raw], axis=1)
    scores = np.full((len(x), n_classes), float(raw.min()) - 1.0 if raw.size else 0.0)
    scores[:, np.asarray(clf.classes_, dtype=int)] = raw
    return scores


def fit_baselines(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    n_classes: int | None = None,
    seed: int = 0,
) -> dict[str, BaselineScores]:
    """Fits each baseline on (train_x (N, F), train_y) and scores it on the test features (``seconds``: fit and
    predict).

    ``n_classes`` defaults to one more than the largest label seen.
    """
    if len(np.unique(train_y)) < 2:
        raise ValueError("the baselines need training images of at least two classes")
    k = n_classes or int(max(train_y.max(), test_y.max(initial=0))) + 1
    results: dict[str, BaselineScores] = {}
    for name, clf in baseline_models(len(train_y), seed).items():
        start = time.perf_counter()
        clf.fit(train_x, train_y)
        predicted = clf.predict(test_x)
        scores = class_scores(clf, test_x, k)
        results[name] = BaselineScores(
            accuracy=float(accuracy_score(test_y, predicted)),
            balanced_accuracy=float(balanced_accuracy_score(test_y, predicted)),
            auc=one_vs_rest_auc(scores, test_y)[0],
            seconds=round(time.perf_counter() - start, 3),
        )
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


def parse_feature_kinds(value: str) -> tuple[str, ...]:
    """``--baseline-features``: a comma-separated subset of ``FEATURE_KINDS``, kept in that order."""
    kinds = {part.strip() for part in value.split(",") if part.strip()}
    unknown = sorted(kinds - set(FEATURE_KINDS))
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(FEATURE_KINDS)}, got {value!r}"
        )
    return tuple(k for k in FEATURE_KINDS if k in kinds)


def run_baselines(
    model: nn.Module,
    meta: CheckpointMetadata,
    train: Sequence[Sample],
    test: Sequence[Sample],
    kinds: Sequence[str] = FEATURE_KINDS,
    *,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, BaselineScores], dict[str, dict[str, Any]]]:
    """Extracts each kind of features of the training and test images and fits the baselines on them.

    Returns:
        The baselines' scores (``fit_baselines``) by ``baseline_key``, and per kind ``n_features`` and
        ``seconds`` (feature extraction of both image sets; ``handcrafted`` also ``image_size``).
    """
    spec = meta.preprocessing

    def features_of(kind: str, samples: Sequence[Sample], which: str) -> tuple[np.ndarray, np.ndarray]:
        if kind == "cnn":
            dataset = ClassificationDataset(samples, spec)
            return extract_features(
                model, dataset, device, batch_size, workers, progress=progress, desc=f"{which} features"
            )
        return extract_handcrafted(samples, spec, workers, progress, f"{which} hand-crafted features")

    results: dict[str, BaselineScores] = {}
    features: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        start = time.perf_counter()
        train_x, train_y = features_of(kind, train, "training")
        test_x, test_y = features_of(kind, test, "test")
        features[kind] = {
            "n_features": int(train_x.shape[1]),
            "seconds": round(time.perf_counter() - start, 3),
        }
        if kind == "handcrafted":
            features[kind]["image_size"] = TEXTURE_SIZE
        scores = fit_baselines(train_x, train_y, test_x, test_y, n_classes=len(meta.classes), seed=seed)
        results.update({baseline_key(kind, name): m for name, m in scores.items()})
    return results, features
