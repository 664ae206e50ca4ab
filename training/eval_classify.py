"""`medserve eval classify --model PATH --data DIR --out OUTDIR`: evaluate a classifier against classical baselines.

``DIR`` holds one sub-folder per class (names as in the checkpoint). Writes to ``OUTDIR``:

* ``report.json``: ``n_images``, ``accuracy``, ``balanced_accuracy``, ``auc`` (one-vs-rest, macro over the
  classes present), ``per_class`` (precision, recall, sensitivity (= recall), specificity, support),
  ``confusion_matrix`` (rows: true class, columns: predicted class, in ``classes`` order), ``ece`` (expected
  calibration error of the top-class probability, 15 equal-width bins) and ``baselines``: k-nearest neighbours,
  linear discriminant analysis, Gaussian naive Bayes and a linear SVM (scikit-learn) fitted on the model's frozen
  backbone features (global average pooled) of the TRAINING images, each with ``accuracy`` and
  ``balanced_accuracy`` on ``DIR``. The training images are ``--train-data DIR`` when given (all images of
  ``DIR/train/<class>`` or ``DIR/<class>``), else the training split recorded in the checkpoint
  (``extra.train_data``: the same folder, validation fraction and seed, so the validation images are excluded).
* ``report.md``, ``confusion_matrix.png``, ``roc.png`` and ``predictions.csv`` (one row per image).

Probabilities are ``softmax(logits / temperature)`` with the checkpoint's ``extra.temperature``, as served.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    RocCurveDisplay,
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.checkpoint import CheckpointError, CheckpointMetadata, load_model
from models.classifier import probabilities
from models.inference import autocast_context, resolve_device
from training.data_classify import (
    ClassificationDataset,
    Sample,
    class_folders,
    discover,
    list_samples,
    split_samples,
)

log = logging.getLogger(__name__)

ECE_BINS = 15


# ----------------------------------------------------------------------------------------------- metrics


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


# -------------------------------------------------------------------------------------------- inference


def _loader(dataset: Dataset[Any], batch_size: int, workers: int) -> DataLoader[Any]:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def predict_logits(
    model: nn.Module,
    dataset: Dataset[Any],
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    amp: bool = False,
    progress: bool = False,
    desc: str = "predicting",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model outputs for a whole dataset of (normalised image, label).

    Returns:
        logits (N, K) float32 on the CPU and labels (N,).
    """
    model.eval()
    outputs, labels = [], []
    with torch.inference_mode(), autocast_context(device, "fp16" if amp else "fp32"):
        for x, y in tqdm(_loader(dataset, batch_size, workers), desc=desc, disable=not progress, leave=False):
            outputs.append(model(x.to(device, non_blocking=True)).float().cpu())
            labels.append(y)
    if not outputs:
        return torch.zeros((0, 0)), torch.zeros(0, dtype=torch.long)
    return torch.cat(outputs), torch.cat(labels)


def extract_features(
    model: nn.Module,
    dataset: Dataset[Any],
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = False,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """Frozen backbone features (N, F) (``Classifier.embed``) and labels (N,) of a dataset."""
    embed = getattr(model, "embed", None)
    if embed is None:
        raise ValueError("the model has no embed() method; baselines need a MedServe classifier")
    model.eval()
    feats, labels = [], []
    with torch.inference_mode():
        for x, y in tqdm(_loader(dataset, batch_size, workers), desc=desc, disable=not progress, leave=False):
            feats.append(embed(x.to(device)).float().cpu().numpy())
            labels.append(y.numpy())
    return np.concatenate(feats), np.concatenate(labels)


# ------------------------------------------------------------------------------------------- baselines


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


# ---------------------------------------------------------------------------------------------- output


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: Path) -> None:
    fig = Figure(figsize=(1.2 * len(classes) + 3, 1.2 * len(classes) + 2.5), layout="constrained")
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(cm, display_labels=list(classes)).plot(ax=ax, cmap="Blues", colorbar=True)
    ax.set_title("confusion matrix (rows: true class)")
    fig.savefig(path, dpi=120)


def plot_roc(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], path: Path) -> None:
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.add_subplot()
    # For two classes one curve says everything; otherwise one one-vs-rest curve per class.
    shown = [1] if len(classes) == 2 else list(range(len(classes)))
    for k in shown:
        positive = labels == k
        if positive.any() and not positive.all():
            RocCurveDisplay.from_predictions(positive, probs[:, k], name=f"{classes[k]} vs rest", ax=ax)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set_title("ROC (one vs rest)")
    fig.savefig(path, dpi=120)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the report as tables."""
    classes = report["classes"]
    lines = [
        f"# Classification report: {report['model']['name']} ({report['model']['version']})",
        "",
        f"Data: `{report['data']}` ({report['n_images']} images). "
        f"Backbone {report['model']['backbone']}, head {report['model']['head']}, "
        f"temperature {report['model']['temperature']:.3f}.",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for key in ("accuracy", "balanced_accuracy", "auc", "ece"):
        lines.append(f"| {key} | {_fmt(report[key])} |")
    lines += ["", "## Per class", "", "| class | precision | recall (sensitivity) | specificity | support |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for name in classes:
        m = report["per_class"][name]
        lines.append(
            f"| {name} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['specificity'])} | {m['support']} |"
        )
    lines += ["", "## Confusion matrix (rows: true, columns: predicted)", ""]
    lines.append("| true \\ predicted | " + " | ".join(classes) + " |")
    lines.append("| --- " * (len(classes) + 1) + "|")
    for name, row in zip(classes, report["confusion_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "## Baselines on the frozen backbone's features", ""]
    if report["baselines"]:
        lines.append(
            f"Fitted on {report['baselines_train']['source']} ({report['baselines_train']['n_images']} images)."
        )
        lines += ["", "| method | accuracy | balanced accuracy |", "| --- | --- | --- |"]
        lines.append(f"| this model | {_fmt(report['accuracy'])} | {_fmt(report['balanced_accuracy'])} |")
        for name, m in report["baselines"].items():
            lines.append(f"| {name} | {_fmt(m['accuracy'])} | {_fmt(m['balanced_accuracy'])} |")
    else:
        lines.append(f"Not computed: {report.get('baselines_skipped', 'skipped')}.")
    lines += ["", "![confusion matrix](confusion_matrix.png)", "", "![ROC](roc.png)", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="classification checkpoint (.pt)")
    parser.add_argument("--data", required=True, type=Path, help="test images: DIR/<class>/*")
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder for report.json, report.md, PNGs"
    )
    parser.add_argument(
        "--train-data",
        type=Path,
        default=None,
        help="training images for the baselines (DIR/<class> or DIR/train/<class>); default: the training "
        "split recorded in the checkpoint",
    )
    parser.add_argument("--no-baselines", action="store_true", help="skip the classical baselines")
    parser.add_argument(
        "--max-train-images",
        type=int,
        default=None,
        help="subsample the baselines' training images (stratified)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="data loading processes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --max-train-images subsampling")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)


def _subsample(samples: list[Sample], n: int | None, seed: int) -> list[Sample]:
    if n is None or n >= len(samples):
        return samples
    _, kept = split_samples(samples, n / len(samples), seed)
    return kept


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the evaluation and writes the report files; returns the report."""
    device = resolve_device(args.device)
    progress = sys.stderr.isatty() if args.progress is None else bool(args.progress)
    model, meta = load_model(args.model, device)
    if meta.task != "classification":
        raise ValueError(f"{args.model} is a {meta.task} model; use `medserve eval segment`")
    classes = meta.classes
    temperature = float(meta.extra.get("temperature", 1.0))
    _, samples = list_samples(args.data, classes)
    dataset = ClassificationDataset(samples, meta.preprocessing)
    logits, labels_t = predict_logits(
        model, dataset, device, args.batch_size, args.workers, progress=progress, desc="test images"
    )
    probs = probabilities(logits, temperature).numpy()
    labels = labels_t.numpy()
    report: dict[str, Any] = classification_metrics(probs, labels, classes)
    report["classes"] = classes
    report["data"] = str(args.data)
    report["model"] = {
        "name": Path(args.model).stem,
        "path": str(args.model),
        "version": meta.version,
        "backbone": meta.architecture.args.get("backbone"),
        "head": meta.architecture.args.get("head"),
        "strategy": meta.extra.get("strategy"),
        "pretrained": meta.extra.get("pretrained"),
        "temperature": temperature,
        "img_size": list(meta.preprocessing.img_size),
    }
    report["baselines"] = {}
    if args.no_baselines:
        report["baselines_skipped"] = "--no-baselines"
    else:
        train, source = training_samples(meta, args.train_data)
        train = _subsample(train, args.max_train_images, args.seed)
        train_x, train_y = extract_features(
            model,
            ClassificationDataset(train, meta.preprocessing),
            device,
            args.batch_size,
            args.workers,
            progress=progress,
            desc="training features",
        )
        test_x, test_y = extract_features(
            model, dataset, device, args.batch_size, args.workers, progress=progress, desc="test features"
        )
        report["baselines"] = fit_baselines(train_x, train_y, test_x, test_y)
        report["baselines_train"] = {"source": source, "n_images": len(train)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render_markdown(report))
    plot_confusion_matrix(np.asarray(report["confusion_matrix"]), classes, out / "confusion_matrix.png")
    plot_roc(probs, labels, classes, out / "roc.png")
    with (out / "predictions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "true", "predicted", *[f"p_{c}" for c in classes]])
        for sample, p in zip(samples, probs, strict=True):
            writer.writerow(
                [str(sample.path), classes[sample.label], classes[int(p.argmax())], *[f"{v:.6f}" for v in p]]
            )
    return report


def main(args: argparse.Namespace) -> int:
    from training.train_classify import cpu_threads

    try:
        with cpu_threads(args.threads):
            report = evaluate(args)
    except (ValueError, CheckpointError) as exc:
        log.error("%s", exc)
        return 2
    auc = report["auc"]
    log.info(
        "%d images: accuracy %.4f, balanced accuracy %.4f, AUC %s, ECE %.4f; report in %s",
        report["n_images"],
        report["accuracy"],
        report["balanced_accuracy"],
        "n/a" if auc is None else f"{auc:.4f}",
        report["ece"],
        args.out,
    )
    for name, m in report["baselines"].items():
        log.info(
            "baseline %-12s accuracy %.4f, balanced accuracy %.4f",
            name,
            m["accuracy"],
            m["balanced_accuracy"],
        )
    return 0
