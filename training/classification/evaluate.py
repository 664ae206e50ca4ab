"""`medserve eval classify --model PATH --data DIR --out OUTDIR`: evaluate a classifier against classical baselines.

``DIR`` holds one sub-folder per class (names as in the checkpoint). Writes to ``OUTDIR``:

* ``report.json``: ``n_images``, ``accuracy``, ``balanced_accuracy``, ``auc`` (one-vs-rest, macro over the
  classes present), ``per_class`` (precision, recall, sensitivity (= recall), specificity, support),
  ``confusion_matrix`` (rows: true class, columns: predicted class, in ``classes`` order), ``ece`` (expected
  calibration error of the top-class probability, 15 equal-width bins) and ``baselines``: k-nearest neighbours,
  linear discriminant analysis, Gaussian naive Bayes, a linear SVM, a decision tree and a small neural network
  (scikit-learn) fitted on features of the TRAINING images, each with ``accuracy``, ``balanced_accuracy``,
  ``auc`` and ``seconds`` on ``DIR``: ``knn``, ``lda``, ``naive_bayes``, ``linear_svm``, ``decision_tree``,
  ``mlp`` on the model's frozen backbone features (global average pooled), the same names prefixed
  ``handcrafted_`` on hand-crafted features (``training.classification.handcrafted``; ``--baseline-features``
  chooses the kinds). ``baseline_features`` gives each kind's feature count and extraction seconds. The
  training images are ``--train-data DIR`` when given (all images of ``DIR/train/<class>`` or ``DIR/<class>``),
  else the training split recorded in the checkpoint (``extra.train_data``: the same folder, validation
  fraction and seed, so the validation images are excluded).
* ``report.md``, ``confusion_matrix.png``, ``roc.png`` and ``predictions.csv`` (one row per image).

Probabilities are ``softmax(logits / temperature)`` with the checkpoint's ``extra.temperature``, as served.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from models.checkpoint import CheckpointError, load_model
from models.classifier import probabilities
from models.inference import resolve_device
from training.classification.baselines import (
    BASELINE_NAMES,
    FEATURE_KINDS,
    baseline_key,
    parse_feature_kinds,
    run_baselines,
    training_samples,
)
from training.classification.data import ClassificationDataset, Sample, list_samples, split_samples
from training.classification.engine import predict_logits
from training.classification.metrics import classification_metrics
from training.common.options import add_device_argument
from training.common.runtime import cpu_threads, show_progress

log = logging.getLogger(__name__)


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
    lines += ["", "## Baselines: classical classifiers on the CNN's and on hand-crafted features", ""]
    if report["baselines"]:
        lines += baseline_table(report)
    else:
        lines.append(f"Not computed: {report.get('baselines_skipped', 'skipped')}.")
    lines += ["", "![confusion matrix](confusion_matrix.png)", "", "![ROC](roc.png)", ""]
    return "\n".join(lines)


BASELINE_SCORES = ("accuracy", "balanced_accuracy", "auc")


def baseline_table(report: dict[str, Any]) -> list[str]:
    """``report.md``'s baselines section: each classifier on the CNN's features beside the same classifier on
    hand-crafted features, under the network's own scores."""
    features = report["baseline_features"]
    kinds = [k for k in FEATURE_KINDS if k in features]
    titles = {"cnn": "CNN features", "handcrafted": "hand-crafted features"}
    lines = [
        f"Fitted on {report['baselines_train']['source']} ({report['baselines_train']['n_images']} images). "
        + "; ".join(
            f"{titles[k]}: {features[k]['n_features']} per image, extracted in {features[k]['seconds']:.1f} s"
            for k in kinds
        )
        + ".",
        "",
        "| method | " + " | ".join(f"{titles[k]}: {s}" for k in kinds for s in BASELINE_SCORES) + " |",
        "| --- " * (1 + len(kinds) * len(BASELINE_SCORES)) + "|",
        "| this model | " + " | ".join(_fmt(report[s]) for _ in kinds for s in BASELINE_SCORES) + " |",
    ]
    for name in BASELINE_NAMES:
        cells = []
        for kind in kinds:
            scores = report["baselines"].get(baseline_key(kind, name), {})
            cells += [_fmt(scores.get(s)) for s in BASELINE_SCORES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


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
        "--baseline-features",
        type=parse_feature_kinds,
        default=FEATURE_KINDS,
        metavar="KINDS",
        help="features the baselines are fitted on, comma-separated: cnn (the model's frozen backbone), "
        "handcrafted (intensity histogram, GLCM, LBP, HOG) (default: cnn,handcrafted)",
    )
    parser.add_argument(
        "--max-train-images",
        type=int,
        default=None,
        help="subsample the baselines' training images (stratified)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="data loading processes")
    add_device_argument(parser)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for --max-train-images subsampling and the baselines' decision tree and MLP",
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)


def _subsample(samples: list[Sample], n: int | None, seed: int) -> list[Sample]:
    if n is None or n >= len(samples):
        return samples
    _, kept = split_samples(samples, n / len(samples), seed)
    return kept


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the evaluation and writes the report files; returns the report."""
    device = resolve_device(args.device)
    progress = show_progress(args.progress)
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
        report["baselines"], report["baseline_features"] = run_baselines(
            model,
            meta,
            train,
            samples,
            args.baseline_features,
            device=device,
            batch_size=args.batch_size,
            workers=args.workers,
            seed=args.seed,
            progress=progress,
        )
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
    try:
        with cpu_threads(args.threads):
            report = run(args)
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
            "baseline %-26s accuracy %.4f, balanced accuracy %.4f, AUC %s",
            name,
            m["accuracy"],
            m["balanced_accuracy"],
            _fmt(m["auc"]),
        )
    return 0
