"""`medserve train classify --data DIR --out PATH`: fine-tune a torchvision CNN on labelled image folders.

Data layouts: ``training.classification.data``; augmentation: ``training.classification.transforms``; the
loops: ``training.classification.engine``. Model, strategies and heads: ``models.classifier``.

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
import logging
import os
import time
from collections.abc import Callable
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
from training.classification.data import (
    ClassificationData,
    ClassificationDataset,
    balanced_sampler,
    cache_fits,
    class_weights,
    data_fingerprint,
    detect_channels,
    discover,
)
from training.classification.engine import evaluate, predict_logits, train_one_epoch
from training.classification.transforms import AugmentConfig
from training.common.ood import (
    add_ood_statistics,
    add_percentile_argument,
    confidence_of,
    percentile_of,
    read_pixels,
)
from training.common.options import add_device_argument, add_intensity_argument, json_args, parse_size
from training.common.precision import mixed_precision
from training.common.run import TrainResult, write_history
from training.common.runtime import cpu_threads, seed_everything, show_progress
from training.common.schedule import warmup_cosine
from training.common.state import (
    load_training_state,
    restore_training_state,
    save_training_state,
    training_state,
)

log = logging.getLogger(__name__)

SELECT_METRICS = ("balanced_accuracy", "accuracy", "auc", "loss")
STATE_FILE = "last.pth"


def parse_int_list(text: str) -> list[int]:
    """``"512,256"`` -> [512, 256]."""
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
    data.add_argument("--img-size", type=parse_size, default=(224, 224), help="N or HxW; images are resized")
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
        "--fc-hidden", type=parse_int_list, default=[256], help="fc head hidden widths, e.g. 512,256"
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
    add_device_argument(opt)
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
    add_percentile_argument(opt)
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


def run_dir_of(args: argparse.Namespace) -> Path:
    """``--run-dir``, by default ``<out stem>-run`` beside ``--out``."""
    out = Path(args.out)
    return Path(args.run_dir) if args.run_dir is not None else out.with_name(f"{out.stem}-run")


def selection_score(metrics: dict[str, Any], select: str) -> tuple[float, float]:
    """Sort key for model selection: the chosen metric (higher is better), then lower validation loss."""
    loss = float(metrics["val_loss"])
    if select == "loss":
        return -loss, 0.0
    value = metrics.get(f"val_{select}")
    return (float("-inf") if value is None else float(value)), -loss


def check_args(args: argparse.Namespace) -> None:
    """Refuses option values no run can use (ValueError naming the option)."""
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
    percentile_of(args)
    confidence_of(args)


def build_model(args: argparse.Namespace, n_classes: int, in_channels: int, pretrained: str) -> Classifier:
    """The classifier the model options describe, with its ``--strategy`` (which layers train) applied."""
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


@dataclass
class Prepared:
    """A run's data: the samples found, their preprocessing and fingerprint."""

    data: ClassificationData
    spec: Preprocessing
    fingerprint: str

    @property
    def train_labels(self) -> list[int]:
        return [s.label for s in self.data.train]


def prepare_data(args: argparse.Namespace) -> Prepared:
    """Finds the samples and derives the preprocessing spec (channels detected unless ``--in-channels``)."""
    data: ClassificationData = discover(args.data, args.val_split, args.seed)
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
        len(data.classes),
        data.classes,
        len(data.train),
        len(data.val),
        data.val_source,
        in_channels,
        *spec.img_size,
    )
    return Prepared(data, spec, data_fingerprint(data.train + data.val))


def build_augment(args: argparse.Namespace) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The training augmentation the options ask for (None with ``--no-augment``)."""
    if not args.augment:
        return None
    return AugmentConfig(
        rotation=args.rotation,
        scale=args.scale,
        translate=args.translate,
        brightness=args.brightness,
        contrast=args.contrast,
        hflip=args.hflip,
        vflip=args.vflip,
    ).build()


def checkpoint_metadata(
    args: argparse.Namespace,
    model: Classifier,
    prepared: Prepared,
    epoch: int,
    metrics: dict[str, Any],
    logits: torch.Tensor,
    labels: torch.Tensor,
    fitted_on: str,
    train_seconds: float,
) -> CheckpointMetadata:
    """The checkpoint's metadata, with the softmax temperature fitted on (``logits``, ``labels``)."""
    data = prepared.data
    temperature = fit_temperature(logits, labels)
    nll_before = float(nn.functional.cross_entropy(logits, labels)) if len(labels) else None
    probs = probabilities(logits, temperature)
    nll_after = float(nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels)) if len(labels) else None
    return CheckpointMetadata(
        task="classification",
        architecture=Architecture(name="classifier", args=model.architecture_args()),
        classes=data.classes,
        preprocessing=prepared.spec,
        training=json_args(args),
        metrics={"epoch": epoch, **metrics},
        data_fingerprint=prepared.fingerprint,
        extra={
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
                "class_counts": np.bincount(prepared.train_labels, minlength=len(data.classes)).tolist(),
            },
            "temperature": temperature,
            "calibration": {
                "method": "temperature scaling: T minimises the NLL of softmax(logits / T)",
                "fitted_on": fitted_on,
                "n_images": len(labels),
                "nll_before": nll_before,
                "nll_after": nll_after,
            },
            "train_seconds": round(train_seconds, 1),
        },
    )


def run(args: argparse.Namespace) -> TrainResult:
    """Runs a whole training (or resumes one) and returns the best checkpoint.

    Raises:
        ValueError: bad configuration or data layout.
        PretrainedWeightsError: the requested pretrained weights are not available.
    """
    check_args(args)
    started = time.perf_counter()
    seed_everything(args.seed)
    device = resolve_device(args.device)
    progress = show_progress(args.progress)
    run_dir = run_dir_of(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)

    prepared = prepare_data(args)
    data, spec = prepared.data, prepared.spec
    k = len(data.classes)

    state: dict[str, Any] | None = None
    if args.resume is not None:
        state = load_training_state(run_dir / STATE_FILE if args.resume == "auto" else Path(args.resume))
    if args.strategy != "full" and str(args.pretrained) == "none":
        log.warning("--strategy %s with --pretrained none freezes randomly initialised layers", args.strategy)
    # When resuming, the saved weights replace everything, so nothing is downloaded.
    model = build_model(args, k, spec.in_channels, "none" if state is not None else str(args.pretrained))
    if state is not None and state["architecture"] != model.architecture_args():
        raise ValueError(
            f"--resume: the saved run used {state['architecture']}, these arguments give "
            f"{model.architecture_args()}; pass the same model options"
        )
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # Always fp16 (with gradient scaling) on CUDA, as the models were tuned with.
    precision = mixed_precision(device, bool(args.amp), allow_bf16=False)

    cache = cache_fits(len(data.train) + len(data.val), spec, args.cache_mb)
    workers = args.workers if args.workers is not None else (0 if cache else min(4, os.cpu_count() or 1))
    train_ds = ClassificationDataset(
        data.train, spec, transform=build_augment(args), cache=cache, progress=progress
    )
    val_ds = ClassificationDataset(data.val, spec, cache=cache, progress=progress)
    loader_gen = torch.Generator().manual_seed(args.seed)
    sampler = balanced_sampler(prepared.train_labels, k, args.seed) if args.balance == "sampler" else None
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
    weight = class_weights(prepared.train_labels, k).to(device) if args.balance == "loss" else None
    criterion = make_loss(args.head, weight, args.label_smoothing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    total_steps = args.epochs * len(loader)
    warmup_steps = max(1, int(args.warmup_epochs * len(loader)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps))

    history: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None
    best_meta: CheckpointMetadata | None = None
    start_epoch = 1
    train_seconds = 0.0
    if state is not None:
        restore_training_state(state, model, optimizer, scheduler, precision.scaler)
        torch.set_rng_state(state["torch_rng"])
        loader_gen.set_state(state["loader_rng"])
        history = list(state["history"])
        best = (float(state["best"][0]), float(state["best"][1])) if state["best"] is not None else None
        start_epoch = int(state["epoch"]) + 1
        train_seconds = float(state["train_seconds"])
        log.info("resumed after epoch %d of %d", start_epoch - 1, args.epochs)

    def save(
        epoch: int, metrics: dict[str, Any], logits: torch.Tensor, labels: torch.Tensor, on: str
    ) -> None:
        nonlocal best_meta
        meta = checkpoint_metadata(args, model, prepared, epoch, metrics, logits, labels, on, train_seconds)
        best_meta = save_checkpoint(out, model, meta)
        log.info("saved %s (epoch %d, temperature %.3f)", out, epoch, meta.extra["temperature"])

    for epoch in range(start_epoch, args.epochs + 1):
        epoch_start = time.perf_counter()
        bar = tqdm(
            total=len(loader),
            desc=f"epoch {epoch}/{args.epochs}",
            disable=not progress,
            leave=False,
            unit="batch",
        )
        scores = train_one_epoch(
            model, criterion, optimizer, scheduler, loader, device, precision=precision, progress=bar
        )
        bar.close()
        record: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **scores}
        validation = None
        if len(val_ds):
            validation = evaluate(
                model,
                criterion,
                val_ds,
                data.classes,
                device,
                batch_size=args.batch_size * 2,
                workers=workers,
                precision=precision.precision,
                progress=progress,
            )
            record.update({f"val_{key}": value for key, value in validation.metrics.items()})
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
        if validation is not None:
            score = selection_score(record, args.select_metric)
            if best is None or score > best:
                best = score
                save(epoch, metrics, validation.logits, validation.labels, "validation images")
        elif epoch == args.epochs:
            # Without validation images the last model is kept, calibrated on the un-augmented training images.
            plain = ClassificationDataset(data.train, spec, cache=False)
            logits_tr, labels_tr = predict_logits(
                model, plain, device, args.batch_size * 2, workers, precision=precision.precision
            )
            save(epoch, metrics, logits_tr, labels_tr, "training images (no validation set)")
        save_training_state(
            run_dir / STATE_FILE,
            {
                "epoch": epoch,
                "architecture": model.architecture_args(),
                **training_state(model, optimizer, scheduler, precision.scaler),
                "torch_rng": torch.get_rng_state(),
                "loader_rng": loader_gen.get_state(),
                "history": history,
                "best": list(best) if best is not None else None,
                "train_seconds": train_seconds,
            },
        )
        write_history(
            run_dir,
            history,
            document={"select_metric": args.select_metric, "epochs": history},
            loss_keys=["train_loss", "val_loss"],
            metric_keys=["train_accuracy", "val_accuracy", "val_balanced_accuracy", "val_auc"],
            title=f"{args.backbone} / {args.head} head / {args.strategy}",
        )

    if best_meta is None:
        best_meta, _ = load_checkpoint(out)  # resumed after the last improvement: the file is current
    percentile = percentile_of(args)
    if percentile is not None:
        # The best epoch's model: statistics of its un-augmented training features, threshold on validation.
        best_meta = add_ood_statistics(
            out,
            read_pixels([s.path for s in data.train], spec.intensity),
            prepared.train_labels,
            read_pixels([s.path for s in data.val], spec.intensity),
            percentile=percentile,
            confidence=confidence_of(args),
            device=device,
            batch_size=args.batch_size * 2,
        )
    seconds = time.perf_counter() - started
    best_epoch = best_meta.metrics.get("epoch")
    log.info("done in %.0f s; best checkpoint %s (epoch %s)", seconds, out, best_epoch)
    selected = {"epoch": best_epoch, args.select_metric: best_meta.metrics.get(f"val_{args.select_metric}")}
    return TrainResult(out, best_meta, history, selected, model, seconds)


def main(args: argparse.Namespace) -> int:
    try:
        with cpu_threads(args.threads):
            run(args)
    except (ValueError, PretrainedWeightsError) as exc:
        log.error("%s", exc)
        return 2
    return 0
