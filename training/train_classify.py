"""`medserve train classify --data DIR --out PATH`: fine-tune a torchvision CNN on labelled image folders.

Data layouts and augmentation: ``training.data_classify``. Model, strategies and heads: ``models.classifier``.

Each epoch trains on the (augmented) training images and scores the validation images; the checkpoint at
``--out`` is rewritten whenever the validation ``--select-metric`` improves (ties: lower validation loss), with
the full metadata (classes, preprocessing, architecture, training arguments, validation metrics, data
fingerprint, and in ``extra``: the softmax temperature fitted on the validation outputs, strategy, head,
pretrained weights and where the training data is). Beside it, in ``--run-dir`` (default ``<out stem>-run/``
next to ``--out``): ``history.json`` (per-epoch losses and metrics), ``learning_curves.png`` and ``last.pth``
(the full training state; ``--resume`` continues from it).

Class imbalance is handled by default with inverse-frequency class weights in the loss (``--balance loss``);
``--balance sampler`` draws balanced batches instead. On CUDA, mixed precision (fp16 autocast + gradient
scaling) and channels-last are used unless ``--no-amp``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.checkpoint import Architecture, CheckpointMetadata, load_checkpoint, save_checkpoint
from models.classifier import (
    BACKBONES,
    HEADS,
    NUM_STAGES,
    STRATEGIES,
    Classifier,
    PretrainedWeightsError,
    fit_temperature,
    normalization_stats,
    probabilities,
)
from models.imageio import resolve_intensity
from models.inference import resolve_device
from models.preprocessing import Preprocessing
from training.data_classify import (
    AugmentConfig,
    ClassificationData,
    ClassificationDataset,
    balanced_sampler,
    cache_fits,
    class_weights,
    data_fingerprint,
    detect_channels,
    discover,
)
from training.eval_classify import classification_metrics, predict_logits
from training.options import add_intensity_argument, json_args
from training.plots import plot_history

log = logging.getLogger(__name__)

SELECT_METRICS = ("balanced_accuracy", "accuracy", "auc", "loss")
STATE_FILE = "last.pth"


def parse_img_size(text: str) -> tuple[int, int]:
    """``"224"`` -> (224, 224); ``"256x192"`` -> (256, 192) (height x width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 16:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW with sides >= 16, got {text!r}")
    return parts[0], parts[1]


def _int_list(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", required=True, type=Path, help="DIR/<class>/* or DIR/train/<class>/ [+ DIR/val/]"
    )
    data.add_argument("--out", required=True, type=Path, help="checkpoint to write (.pt)")
    data.add_argument(
        "--run-dir", type=Path, default=None, help="history, curves, resume state (default: <out>-run)"
    )
    data.add_argument(
        "--val-split", type=float, default=0.15, help="validation fraction when there is no val/"
    )
    data.add_argument(
        "--img-size", type=parse_img_size, default=(224, 224), help="N or HxW; images are resized"
    )
    data.add_argument(
        "--in-channels", default="auto", choices=("auto", "1", "3"), help="auto: 1 if images are gray"
    )
    add_intensity_argument(data)
    data.add_argument(
        "--cache-mb", type=float, default=4096, help="keep decoded images in memory up to this size"
    )
    data.add_argument(
        "--workers", type=int, default=None, help="loader processes (default: 0 if cached, else 4)"
    )
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="resnet18", choices=list(BACKBONES))
    model.add_argument("--strategy", default="full", choices=STRATEGIES, help="which layers train")
    model.add_argument(
        "--freeze-stages", type=int, default=2, help=f"partial: frozen early stages (1-{NUM_STAGES - 1})"
    )
    model.add_argument("--head", default="fc", choices=HEADS)
    model.add_argument(
        "--fc-hidden", type=_int_list, default=[256], help="fc head hidden widths, e.g. 512,256"
    )
    model.add_argument("--dropout", type=float, default=0.5, help="fc head dropout")
    model.add_argument("--fc-pool", type=int, default=1, help="fc head: flatten an NxN pooled feature map")
    model.add_argument(
        "--pretrained",
        default="imagenet",
        help="imagenet (torchvision weights) | none | PATH to a state dict",
    )
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=20)
    opt.add_argument("--batch-size", type=int, default=32)
    opt.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (cosine decay)")
    opt.add_argument("--weight-decay", type=float, default=1e-4)
    opt.add_argument("--warmup-epochs", type=float, default=1.0, help="linear learning-rate warm-up")
    opt.add_argument("--label-smoothing", type=float, default=0.0, help="fc/gap heads only")
    opt.add_argument("--balance", default="loss", choices=("loss", "sampler", "none"), help="class imbalance")
    opt.add_argument("--select-metric", default="balanced_accuracy", choices=SELECT_METRICS)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--device", default="auto", help="auto | cpu | cuda")
    opt.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch (0: torch's default, one per core)"
    )
    opt.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA"
    )
    opt.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue from RUN_DIR/last.pth (or the given file)",
    )
    opt.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars")
    aug = parser.add_argument_group("augmentation (defaults suit radiographs)")
    aug.add_argument("--no-augment", dest="augment", action="store_false")
    aug.add_argument("--rotation", type=float, default=10.0, help="max rotation, degrees")
    aug.add_argument("--scale", type=float, default=0.1, help="max relative zoom in/out")
    aug.add_argument("--translate", type=float, default=0.05, help="max shift, fraction of the size")
    aug.add_argument("--brightness", type=float, default=0.1)
    aug.add_argument("--contrast", type=float, default=0.1)
    aug.add_argument(
        "--hflip", action="store_true", help="random horizontal flips (off: anatomy is not symmetric)"
    )
    aug.add_argument("--vflip", action="store_true", help="random vertical flips")


def make_loss(head: str, weight: torch.Tensor | None, label_smoothing: float = 0.0) -> nn.Module:
    """Cross-entropy for the softmax heads, multi-class hinge loss for the SVM head."""
    if head == "svm":
        return nn.MultiMarginLoss(weight=weight)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Any:
    """LR factor per step: linear warm-up, then cosine decay to 0 (computed from the step, so resumable)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    """What a training run produced."""

    checkpoint: Path
    metadata: CheckpointMetadata
    history: list[dict[str, Any]]
    seconds: float


def _score(metrics: dict[str, Any], select: str) -> tuple[float, float]:
    """Sort key for model selection: the chosen metric (higher is better), then lower validation loss."""
    loss = float(metrics["val_loss"])
    if select == "loss":
        return -loss, 0.0
    value = metrics.get(f"val_{select}")
    return (float("-inf") if value is None else float(value)), -loss


def _resolve_run_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    return Path(args.run_dir) if args.run_dir is not None else out.with_name(f"{out.stem}-run")


def _validate_args(args: argparse.Namespace) -> None:
    if args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if Path(args.out).suffix != ".pt":
        raise ValueError(f"--out must end in .pt (the service loads *.pt), got {args.out}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")


def _build_model(args: argparse.Namespace, n_classes: int, in_channels: int, pretrained: str) -> Classifier:
    model = Classifier(
        backbone=args.backbone,
        num_classes=n_classes,
        in_channels=in_channels,
        head=args.head,
        fc_hidden=args.fc_hidden,
        dropout=args.dropout,
        fc_pool=args.fc_pool,
        pretrained=pretrained,
    )
    model.set_strategy(args.strategy, args.freeze_stages)
    return model


def train(args: argparse.Namespace) -> TrainResult:
    """Runs a whole training (or resumes one) and returns the best checkpoint.

    Raises:
        ValueError: bad configuration or data layout.
        PretrainedWeightsError: the requested pretrained weights are not available.
    """
    _validate_args(args)
    started = time.perf_counter()
    seed_everything(args.seed)
    device = resolve_device(args.device)
    progress = sys.stderr.isatty() if args.progress is None else bool(args.progress)
    run_dir = _resolve_run_dir(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)

    data: ClassificationData = discover(args.data, args.val_split, args.seed)
    k = len(data.classes)
    # Namespaces built by callers without --intensity (library use) get the default policy.
    intensity = resolve_intensity(getattr(args, "intensity", None))
    in_channels = (
        detect_channels(data.train, intensity=intensity)
        if args.in_channels == "auto"
        else int(args.in_channels)
    )
    mean, std = normalization_stats(in_channels)
    spec = Preprocessing(
        in_channels=in_channels,
        img_size=tuple(args.img_size),
        resize="resize",
        mean=mean,
        std=std,
        intensity=intensity,
    )
    log.info(
        "%d classes %s; %d training / %d validation images (%s); %d channel(s) at %dx%d",
        k,
        data.classes,
        len(data.train),
        len(data.val),
        data.val_source,
        in_channels,
        *spec.img_size,
    )

    state: dict[str, Any] | None = None
    if args.resume is not None:
        state_path = run_dir / STATE_FILE if args.resume == "auto" else Path(args.resume)
        if not state_path.is_file():
            raise ValueError(f"--resume: no training state at {state_path}")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    if args.strategy != "full" and str(args.pretrained) == "none":
        log.warning("--strategy %s with --pretrained none freezes randomly initialised layers", args.strategy)
    # When resuming, the saved weights replace everything, so nothing is downloaded.
    model = _build_model(args, k, in_channels, "none" if state is not None else str(args.pretrained))
    if state is not None and state["architecture"] != model.architecture_args():
        raise ValueError(
            f"--resume: the saved run used {state['architecture']}, these arguments give "
            f"{model.architecture_args()}; pass the same model options"
        )
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    amp = bool(args.amp) and device.type == "cuda"

    cache = cache_fits(len(data.train) + len(data.val), spec, args.cache_mb)
    workers = args.workers if args.workers is not None else (0 if cache else min(4, os.cpu_count() or 1))
    augment = (
        AugmentConfig(
            rotation=args.rotation,
            scale=args.scale,
            translate=args.translate,
            brightness=args.brightness,
            contrast=args.contrast,
            hflip=args.hflip,
            vflip=args.vflip,
        ).build()
        if args.augment
        else None
    )
    train_ds = ClassificationDataset(data.train, spec, transform=augment, cache=cache, progress=progress)
    val_ds = ClassificationDataset(data.val, spec, cache=cache, progress=progress)
    train_labels = [s.label for s in data.train]
    loader_gen = torch.Generator().manual_seed(args.seed)
    sampler = balanced_sampler(train_labels, k, args.seed) if args.balance == "sampler" else None
    loader = DataLoader(
        train_ds,
        batch_size=args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=loader_gen,
        num_workers=workers,
        drop_last=len(train_ds) > args.batch_size,  # a batch of one breaks batch norm
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    weight = class_weights(train_labels, k).to(device) if args.balance == "loss" else None
    criterion = make_loss(args.head, weight, args.label_smoothing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    total_steps = args.epochs * len(loader)
    warmup_steps = max(1, int(args.warmup_epochs * len(loader)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    history: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None
    best_meta: CheckpointMetadata | None = None
    start_epoch = 1
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        loader_gen.set_state(state["loader_rng"])
        history = list(state["history"])
        best = (float(state["best"][0]), float(state["best"][1])) if state["best"] is not None else None
        start_epoch = int(state["epoch"]) + 1
        log.info("resumed after epoch %d of %d", start_epoch - 1, args.epochs)

    fingerprint = data_fingerprint(data.train + data.val)
    train_seconds = float(state["train_seconds"]) if state is not None else 0.0
    extra_base = {
        "head": args.head,
        "strategy": args.strategy,
        "freeze_stages": args.freeze_stages if args.strategy == "partial" else None,
        "pretrained": str(args.pretrained),
        "balance": args.balance,
        "train_data": {
            "path": str(Path(args.data).resolve()),
            "layout": data.layout,
            "val_source": data.val_source,
            "val_split": args.val_split if data.val_source == "split" else 0.0,
            "seed": args.seed,
            "n_train": len(data.train),
            "n_val": len(data.val),
            "class_counts": np.bincount(train_labels, minlength=k).tolist(),
        },
    }

    def save(
        epoch: int, metrics: dict[str, Any], logits: torch.Tensor, labels: torch.Tensor, on: str
    ) -> None:
        nonlocal best_meta
        temperature = fit_temperature(logits, labels)
        nll_before = float(nn.functional.cross_entropy(logits, labels)) if len(labels) else None
        probs = probabilities(logits, temperature)
        nll_after = (
            float(nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels)) if len(labels) else None
        )
        meta = CheckpointMetadata(
            task="classification",
            architecture=Architecture(name="classifier", args=model.architecture_args()),
            classes=data.classes,
            preprocessing=spec,
            training=json_args(args),
            metrics={"epoch": epoch, **metrics},
            data_fingerprint=fingerprint,
            extra={
                **extra_base,
                "temperature": temperature,
                "calibration": {
                    "method": "temperature scaling: T minimises the NLL of softmax(logits / T)",
                    "fitted_on": on,
                    "n_images": len(labels),
                    "nll_before": nll_before,
                    "nll_after": nll_after,
                },
                "train_seconds": round(train_seconds, 1),
            },
        )
        best_meta = save_checkpoint(out, model, meta)
        log.info("saved %s (epoch %d, temperature %.3f)", out, epoch, temperature)

    for epoch in range(start_epoch, args.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        running_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(
            loader, desc=f"epoch {epoch}/{args.epochs}", disable=not progress, leave=False, unit="batch"
        )
        for x, y in bar:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                logits = model(x)
                loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            running_loss += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{running_loss / seen:.4f}")
        record: dict[str, Any] = {
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": running_loss / max(1, seen),
            "train_accuracy": correct / max(1, seen),
        }
        val_logits = torch.zeros((0, k))
        val_labels = torch.zeros(0, dtype=torch.long)
        if len(val_ds):
            val_logits, val_labels = predict_logits(
                model,
                val_ds,
                device,
                args.batch_size * 2,
                workers,
                amp=amp,
                progress=progress,
                desc="validation",
            )
            record["val_loss"] = float(criterion(val_logits.to(device), val_labels.to(device)))
            m = classification_metrics(torch.softmax(val_logits, 1).numpy(), val_labels.numpy(), data.classes)
            record.update({f"val_{key}": m[key] for key in ("accuracy", "balanced_accuracy", "auc", "ece")})
        record["epoch_s"] = round(time.perf_counter() - epoch_start, 1)
        train_seconds += record["epoch_s"]
        history.append(record)
        log.info(
            "epoch %d/%d: %s",
            epoch,
            args.epochs,
            ", ".join(
                f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                for key, value in record.items()
                if key != "epoch"
            ),
        )
        metrics = {key: value for key, value in record.items() if key.startswith(("val_", "train_"))}
        if len(val_ds):
            score = _score(record, args.select_metric)
            if best is None or score > best:
                best = score
                save(epoch, metrics, val_logits, val_labels, "validation images")
        elif epoch == args.epochs:
            # Without validation images the last model is kept, calibrated on the un-augmented training images.
            plain = ClassificationDataset(data.train, spec, cache=False)
            logits_tr, labels_tr = predict_logits(model, plain, device, args.batch_size * 2, workers, amp=amp)
            save(epoch, metrics, logits_tr, labels_tr, "training images (no validation set)")
        torch.save(
            {
                "epoch": epoch,
                "architecture": model.architecture_args(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "loader_rng": loader_gen.get_state(),
                "history": history,
                "best": list(best) if best is not None else None,
                "train_seconds": train_seconds,
            },
            run_dir / STATE_FILE,
        )
        (run_dir / "history.json").write_text(
            json.dumps({"select_metric": args.select_metric, "epochs": history}, indent=2)
        )
        plot_history(
            history,
            run_dir / "learning_curves.png",
            loss_keys=["train_loss", "val_loss"],
            metric_keys=["train_accuracy", "val_accuracy", "val_balanced_accuracy", "val_auc"],
            title=f"{args.backbone} / {args.head} head / {args.strategy}",
        )

    if best_meta is None:
        best_meta, _ = load_checkpoint(out)  # resumed after the last improvement: the file is current
    seconds = time.perf_counter() - started
    log.info("done in %.0f s; best checkpoint %s (epoch %s)", seconds, out, best_meta.metrics.get("epoch"))
    return TrainResult(out, best_meta, history, seconds)


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Runs the block with ``n`` torch CPU threads (0: unchanged), restoring the previous count after."""
    previous = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(args: argparse.Namespace) -> int:
    try:
        with cpu_threads(args.threads):
            train(args)
    except (ValueError, PretrainedWeightsError) as exc:
        log.error("%s", exc)
        return 2
    return 0
