"""Classification metrics: accuracy, balanced accuracy, one-vs-rest ROC AUC, per-class rates, confusion matrix
and expected calibration error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

ECE_BINS = 15


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Weighted mean |accuracy - confidence| over equal-width bins of the top-class probability.

    Args:
        probs: (N, K) probabilities.
        labels: (N,) true classes.
    """
    if len(labels) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # Bin i holds confidences in (i/n, (i+1)/n]; confidences are >= 1/K > 0, so bin 0 is never special.
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def one_vs_rest_auc(probs: np.ndarray, labels: np.ndarray) -> tuple[float | None, list[float | None]]:
    """Macro one-vs-rest ROC AUC over the classes that have both positives and negatives in ``labels``.

    Returns:
        (macro AUC or None when undefined, per-class AUC or None).
    """
    per_class: list[float | None] = []
    for k in range(probs.shape[1]):
        positive = labels == k
        if positive.all() or not positive.any():
            per_class.append(None)
        else:
            per_class.append(float(roc_auc_score(positive, probs[:, k])))
    defined = [a for a in per_class if a is not None]
    return (float(np.mean(defined)) if defined else None), per_class


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """The report's model metrics for (N, K) probabilities against (N,) labels."""
    k = len(classes)
    predicted = probs.argmax(axis=1)
    cm = confusion_matrix(labels, predicted, labels=list(range(k)))
    precision, recall, _, support = precision_recall_fscore_support(
        labels, predicted, labels=list(range(k)), zero_division=0
    )
    auc, auc_per_class = one_vs_rest_auc(probs, labels)
    total = cm.sum()
    per_class: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(classes):
        tp = cm[i, i]
        fp = cm[:, i].sum() - tp
        fn = cm[i, :].sum() - tp
        tn = total - tp - fp - fn
        per_class[name] = {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "sensitivity": float(recall[i]),
            "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
            "support": int(support[i]),
            "auc": auc_per_class[i],
        }
    present = np.unique(labels)
    return {
        "n_images": len(labels),
        "accuracy": float(accuracy_score(labels, predicted)) if len(labels) else 0.0,
        # Balanced accuracy = mean recall over the classes present in the labels.
        "balanced_accuracy": float(np.mean([recall[c] for c in present])) if len(labels) else 0.0,
        "auc": auc,
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "ece": expected_calibration_error(probs, labels),
    }
