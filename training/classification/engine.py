"""Classification's training and evaluation loops (in the style of the torchvision reference scripts), and
inference over a dataset: logits, and backbone features for the baselines."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.inference import Precision, autocast_context
from training.classification.metrics import classification_metrics
from training.common.engine import to_device, train_step
from training.common.precision import MixedPrecision

VALIDATION_METRICS = ("accuracy", "balanced_accuracy", "auc", "ece")


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    precision: MixedPrecision | None = None,
    progress: Any = None,
) -> dict[str, float]:
    """One pass over ``data_loader``; the scheduler steps once per batch.

    Args:
        model: network returning logits (B, K).
        criterion: loss of (logits, labels (B,)).
        optimizer / scheduler: updated every batch.
        data_loader: yields (images (B, C, H, W), labels (B,)).
        device: where the model lives.
        precision: autocast precision and gradient scaler (default fp32).
        progress: an optional tqdm bar, advanced per batch, showing the running loss.

    Returns:
        ``train_loss`` (mean over the images) and ``train_accuracy``.
    """
    precision = precision or MixedPrecision()
    model.train()
    running_loss, correct, seen = 0.0, 0, 0
    for x, y in data_loader:
        x = to_device(x, device)
        y = y.to(device, non_blocking=True)
        logits, loss = train_step(model, criterion, optimizer, scheduler, x, y, precision)
        running_loss += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{running_loss / seen:.4f}")
    return {"train_loss": running_loss / max(1, seen), "train_accuracy": correct / max(1, seen)}


@dataclass
class Validation:
    """``evaluate``'s result: ``metrics`` (``loss`` and ``VALIDATION_METRICS``) and the outputs they came from,
    logits (N, K) on the CPU and labels (N,)."""

    metrics: dict[str, Any]
    logits: torch.Tensor
    labels: torch.Tensor


def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    dataset: Dataset[Any],
    classes: Sequence[str],
    device: torch.device,
    *,
    batch_size: int,
    workers: int = 0,
    precision: Precision = "fp32",
    progress: bool = False,
) -> Validation:
    """Loss and metrics of ``model`` on a dataset of (normalised image, label) (probabilities: plain softmax)."""
    logits, labels = predict_logits(
        model, dataset, device, batch_size, workers, precision=precision, progress=progress, desc="validation"
    )
    metrics: dict[str, Any] = {"loss": float(criterion(logits.to(device), labels.to(device)))}
    scores = classification_metrics(torch.softmax(logits, 1).numpy(), labels.numpy(), classes)
    metrics.update({key: scores[key] for key in VALIDATION_METRICS})
    return Validation(metrics, logits, labels)


def _loader(dataset: Dataset[Any], batch_size: int, workers: int) -> DataLoader[Any]:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def predict_logits(
    model: nn.Module,
    dataset: Dataset[Any],
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    precision: Precision = "fp32",
    progress: bool = False,
    desc: str = "predicting",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model outputs for a whole dataset of (normalised image, label), in order (autocast per ``precision``).

    Returns:
        logits (N, K) float32 on the CPU and labels (N,).
    """
    model.eval()
    outputs, labels = [], []
    with torch.inference_mode(), autocast_context(device, precision):
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
