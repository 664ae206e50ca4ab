"""`medserve train segment --data DIR --out PATH`: train a U-Net and keep the best checkpoint by validation Dice.

Runs on one process, or on several with ``torchrun --nproc_per_node N -m training train segment ...``
(DistributedDataParallel; gloo on CPU, NCCL on GPU; ``--batch-size`` is per process). Only rank 0 writes files:
the checkpoint ``PATH`` (best validation Dice), ``<PATH stem>.train-state`` (for ``--resume``),
``history.json`` and ``learning_curves.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.imageio import resolve_intensity
from models.preprocessing import Preprocessing, fit_mask, prepare
from models.unet import NORMS, UPSAMPLES, UNet
from training.common.distributed import Dist, gather, init_distributed, sync_buffers
from training.common.ood import (
    add_ood_statistics,
    add_percentile_argument,
    confidence_of,
    percentile_of,
)
from training.common.options import add_device_argument, add_intensity_argument, json_args, parse_size
from training.common.precision import mixed_precision
from training.common.run import TrainResult, write_history
from training.common.runtime import seed_everything
from training.common.schedule import warmup_cosine
from training.common.state import (
    cpu_state_dict,
    load_training_state,
    restore_training_state,
    save_training_state,
    training_state,
)
from training.segmentation import data as D
from training.segmentation import planning
from training.segmentation.engine import evaluate, train_one_epoch
from training.segmentation.losses import DiceCELoss
from training.segmentation.metrics import ImageScores, aggregate
from training.segmentation.transforms import SegmentationAugment

log = logging.getLogger(__name__)

STATE_FORMAT = "medserve.train-state"
STATE_SUFFIX = ".train-state"
DEFAULT_CHANNELS = "16,32,64,128,256"


def parse_channels(text: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated widths like 32,64,128, got {text!r}"
        ) from exc
    if len(channels) < 2 or min(channels) < 1:
        raise argparse.ArgumentTypeError(f"need at least two positive widths, got {text!r}")
    return channels


def parse_target_size(text: str) -> tuple[int, ...]:
    """``--target-size``: ``"256"`` -> (256,) (the long side); ``"256x320"`` -> (256, 320) (height x width)."""
    if "x" in text.lower() or "," in text:
        return parse_size(text)
    (size,) = parse_size(text)[:1]
    return (size,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="folder with images/ and masks/ (and val/)")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint file to write (*.pt)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs (default 40)")
    parser.add_argument(
        "--img-size",
        type=parse_size,
        default=None,
        help="training crop N or HxW; also the inference tile (default: planned; 256 at native scale, the "
        "working size with --scale fit when it fits the device)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"crops per step and per process (default {planning.DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--scale",
        choices=planning.SCALES,
        default="auto",
        help="native: keep the pixel scale, train on crops and tile at inference; fit: resize every image "
        "(aspect kept, padded) to a working size and map masks back; auto (default): plan from the data set's "
        "image and structure sizes and the device (docs: 'Working scale')",
    )
    parser.add_argument(
        "--target-size",
        type=parse_target_size,
        default=None,
        help="working size with --scale fit (or auto choosing fit): the long side N or HxW (default: planned, "
        "256 on a CPU and 512 on CUDA)",
    )
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    parser.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="decay of a moving average of the weights to validate and save instead of the raw weights, "
        "e.g. 0.99 (about the last 100 steps); default 0 = off",
    )
    parser.add_argument(
        "--warmup", type=float, default=0.05, help="fraction of steps of linear warm-up before cosine decay"
    )
    parser.add_argument(
        "--val-split", type=float, default=0.1, help="fraction held out for validation unless DIR/val/ exists"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (training is deterministic on CPU)")
    add_device_argument(parser)
    add_percentile_argument(parser)
    parser.add_argument(
        "--resume", type=Path, default=None, help="continue from a .train-state file (or its .pt)"
    )
    parser.add_argument(
        "--classes",
        nargs="+",
        default=None,
        help="class names, in mask-value order (comma or space separated)",
    )
    parser.add_argument(
        "--channels",
        type=parse_channels,
        default=parse_channels(DEFAULT_CHANNELS),
        help=f"U-Net width per level; the count sets the depth (default {DEFAULT_CHANNELS})",
    )
    parser.add_argument("--norm", choices=NORMS, default="batch", help="normalisation layers (default batch)")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout in the two deepest blocks")
    parser.add_argument(
        "--upsample",
        choices=UPSAMPLES,
        default="deconv",
        help="up-convolution: deconv (2x2 transposed conv, default) or nearest (nearest + 2x2 conv, 4x the cost)",
    )
    parser.add_argument(
        "--augment",
        choices=("full", "flips", "none"),
        default="full",
        help="augmentation preset (default full)",
    )
    parser.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="random horizontal flips (default on; also the flips of test-time augmentation)",
    )
    parser.add_argument(
        "--vflip",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="random vertical flips (default off: X-rays have an up and a down, and flips hide a consistent "
        "sub-pixel offset of the masks from the model; docs/experiments/isbi.md)",
    )
    parser.add_argument(
        "--elastic-sigma", type=float, default=10.0, help="elastic displacement std in pixels (0 = off)"
    )
    parser.add_argument("--dice-weight", type=float, default=1.0, help="weight of the soft Dice loss")
    parser.add_argument("--ce-weight", type=float, default=1.0, help="weight of the cross-entropy loss")
    parser.add_argument(
        "--samples-per-epoch",
        type=int,
        default=0,
        help="random crops per epoch (0 = planned: at native scale enough to cover the training pixels once, "
        "at most 4 per image; with fit one per training image)",
    )
    parser.add_argument(
        "--tile-overlap", type=float, default=0.25, help="overlap of inference tiles (stored)"
    )
    add_intensity_argument(parser)
    parser.add_argument(
        "--val-tta", action="store_true", help="flip test-time augmentation during validation"
    )
    parser.add_argument(
        "--workers", type=int, default=-1, help="data loader workers (-1 = 0 on CPU, 4 on CUDA)"
    )
    parser.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        help="stop after the epoch that passes this many seconds (0 = off)",
    )


# ----------------------------------------------------------------------------------------------- data


@dataclass
class Prepared:
    train: D.SegmentationSet
    val: D.SegmentationSet
    classes: list[str]
    mode: D.MaskMode
    spec: Preprocessing
    fingerprint: str
    train_targets: list[np.ndarray] = field(default_factory=list)
    val_targets: list[np.ndarray] = field(default_factory=list)
    plan: planning.Plan | None = None


def class_names(raw: Sequence[str] | None) -> list[str] | None:
    if raw is None:
        return None
    names = [n.strip() for item in raw for n in item.split(",") if n.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"--classes names must be unique, got {names}")
    return names


def prepare_data(args: argparse.Namespace, device_type: str = "cpu", world: int = 1) -> Prepared:
    """Loads and checks all data, splits it, derives classes, plans the scale (``planning``) and the
    preprocessing spec for training on ``world`` processes of ``device_type``."""
    root = Path(args.data)
    # Namespaces built by callers without --intensity (library use) get the default policy.
    intensity = resolve_intensity(getattr(args, "intensity", None))
    full = D.load_set(root, intensity)
    if (root / "val").is_dir():
        train, val = full, D.load_set(root / "val", intensity)
    else:
        train_idx, val_idx = D.split_indices(len(full), args.val_split, args.seed)
        train, val = full.subset(train_idx), full.subset(val_idx)
    mode, classes = D.resolve_classes(train.masks + val.masks, class_names(args.classes))
    in_channels = D.infer_channels(train.images + val.images)
    mean, std = D.intensity_stats(train.images, in_channels)
    train_targets = [D.encode_mask(m, mode) for m in train.masks]
    val_targets = [D.encode_mask(m, mode) for m in val.masks]
    # Library callers' namespaces may lack the planning options: they get the defaults.
    the_plan = planning.plan(
        planning.fingerprint(train.images + val.images, train_targets + val_targets, classes, in_channels),
        [im.shape[:2] for im in train.images],
        device=device_type,
        scale=getattr(args, "scale", "auto"),
        target_size=getattr(args, "target_size", None),
        img_size=getattr(args, "img_size", None),
        batch_size=getattr(args, "batch_size", None),
        samples_per_epoch=getattr(args, "samples_per_epoch", 0),
        world=world,
    )
    spec = Preprocessing(
        in_channels=in_channels,
        img_size=the_plan.patch_size,
        resize="fit" if the_plan.scale == "fit" else "tile",
        working_size=the_plan.working_size,
        mean=mean,
        std=std,
        tile_overlap=args.tile_overlap,
        intensity=intensity,
    )
    return Prepared(
        train,
        val,
        classes,
        mode,
        spec,
        D.fingerprint(train.image_paths + train.mask_paths + val.image_paths + val.mask_paths),
        train_targets,
        val_targets,
        the_plan,
    )


def state_path(out: Path) -> Path:
    """The ``--resume`` state written beside checkpoint ``out``: ``<stem>.train-state``."""
    return out.with_name(out.stem + STATE_SUFFIX)


def build_augment(args: argparse.Namespace, size: tuple[int, int]) -> SegmentationAugment:
    """The training augmentation the options ask for; its ``flips`` are also those of TTA."""
    # Namespaces built by callers without the flip options (library use) get the defaults.
    return SegmentationAugment.preset(
        args.augment,
        size,
        elastic_sigma=args.elastic_sigma,
        hflip=getattr(args, "hflip", True),
        vflip=getattr(args, "vflip", False),
    )


def check_args(args: argparse.Namespace) -> None:
    """Refuses option values no run can use (ValueError naming the option)."""
    if Path(args.out).suffix != ".pt":
        raise ValueError(f"--out must name a .pt checkpoint file, got {args.out}")
    for name in ("epochs", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0:
        raise ValueError("--lr must be > 0")
    if not 0 <= args.warmup < 1:
        raise ValueError("--warmup must be in [0, 1)")
    if args.samples_per_epoch < 0:
        raise ValueError("--samples-per-epoch must be >= 0")
    if not 0 <= args.ema < 1:
        raise ValueError("--ema must be in [0, 1) (0 turns it off)")
    percentile_of(args)
    confidence_of(args)


# ----------------------------------------------------------------------------------------------- training


def ema_average(decay: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | int], torch.Tensor]:
    """``avg_fn`` for ``AveragedModel``: an exponential moving average whose decay ramps up from 0.1 over the
    first steps ((1 + n) / (10 + n), capped at ``decay``), so that short runs are not dominated by their
    random start; integer buffers (BatchNorm's batch counter) take the latest value."""

    def average(averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
        if not averaged.is_floating_point():
            return current
        steps = float(n)
        d = min(decay, (1.0 + steps) / (10.0 + steps))
        return averaged + (current - averaged) * (1.0 - d)

    return average


def weight_average(net: nn.Module, decay: float) -> AveragedModel | None:
    """The moving average of ``net``'s weights and BatchNorm statistics, or None when ``decay`` is 0."""
    if decay <= 0:
        return None
    return AveragedModel(net, avg_fn=ema_average(decay), use_buffers=True)


def run(args: argparse.Namespace) -> TrainResult:
    """Trains according to ``args`` (the parsed command line).

    Returns the model as after the last epoch, unwrapped: the moving average of the weights (what is validated
    and saved) unless ``--ema 0``, then the raw weights.
    """
    check_args(args)
    info, device = init_distributed(args.device)
    try:
        return _run(args, info, device)
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, info: Dist, device: torch.device) -> TrainResult:
    started = time.monotonic()
    out = Path(args.out)
    data = prepare_data(args, device.type, info.world)
    plan = data.plan
    assert plan is not None
    # The planned values are recorded in the checkpoint's training arguments, as given ones are.
    args.img_size, args.batch_size = plan.patch_size, plan.batch_size
    k = len(data.classes)
    seed_everything(args.seed)
    arch_args = {
        "in_channels": data.spec.in_channels,
        "out_channels": k,
        "channels": list(args.channels),
        "norm": args.norm,
        "dropout": args.dropout,
        "upsample": getattr(args, "upsample", "deconv"),
    }
    net = UNet(**arch_args).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    model: nn.Module = net
    # With --ema, the average is validated and saved instead of the raw weights (None when off).
    averaged = weight_average(net, args.ema)
    if info.enabled:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    augment = build_augment(args, data.spec.img_size)
    samples = plan.samples_per_epoch
    train_images, train_targets = data.train.images, data.train_targets
    val_targets = data.val_targets
    if data.spec.working_size is not None:
        # fit: every image and mask is fitted to the working size once; crops and validation work there.
        train_images, train_targets = D.fit_pairs(train_images, train_targets, data.spec.working_size)
        val_targets = [fit_mask(t, data.spec.working_size) for t in val_targets]
    dataset = D.SegmentationDataset(
        train_images, train_targets, data.spec, augment, samples_per_epoch=samples, seed=args.seed
    )
    generator = torch.Generator()
    sampler: DistributedSampler[Any] | RandomSampler
    if info.enabled:
        sampler = DistributedSampler(
            dataset, num_replicas=info.world, rank=info.rank, shuffle=True, seed=args.seed
        )
    else:
        sampler = RandomSampler(dataset, generator=generator)
    workers = args.workers if args.workers >= 0 else (4 if device.type == "cuda" else 0)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    steps_per_epoch = plan.steps_per_epoch = len(loader)
    criterion = DiceCELoss(args.dice_weight, args.ce_weight).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total_steps = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, int(args.warmup * total_steps), warmup_from=0.1, floor=0.01)
    )
    # bf16 where the GPU has it (no gradient scaling needed), else fp16.
    precision = mixed_precision(device, not args.no_amp, allow_bf16=True)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"dice": -1.0}
    start_epoch = 1
    if args.resume is not None:
        state = load_train_state(args.resume)
        restore_training_state(state, net, optimizer, scheduler, precision.scaler)
        if averaged is not None and state.get("ema"):
            averaged.load_state_dict(state["ema"])
        history = json.loads(state["history"])
        best = json.loads(state["best"])
        start_epoch = int(state["epoch"]) + 1
        if info.main:
            log.info("resumed from %s at epoch %d", args.resume, start_epoch)

    evaluated: nn.Module = net if averaged is None else averaged.module
    val_images = [prepare(im, data.spec) for im in data.val.images]
    shard = list(range(info.rank, len(val_images), info.world))
    metadata: CheckpointMetadata | None = None
    if info.main:
        log.info("plan:\n%s", planning.describe(plan.as_json()))
        log.info(
            "training on %d images (%d crops/epoch, %d steps/epoch), validating on %d; classes %s; device %s x%d",
            len(data.train),
            samples,
            steps_per_epoch,
            len(data.val),
            data.classes,
            device,
            info.world,
        )
    for epoch in range(start_epoch, args.epochs + 1):
        epoch_start = time.monotonic()
        # Everything random in an epoch is derived from (seed, epoch): runs and resumed runs are reproducible.
        torch.manual_seed(args.seed * 100003 + epoch)
        generator.manual_seed(args.seed * 100003 + epoch)
        dataset.set_epoch(epoch)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{args.epochs}",
            disable=not info.main,
            dynamic_ncols=True,
        )
        row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row.update(
            train_one_epoch(
                model,
                criterion,
                optimizer,
                scheduler,
                loader,
                device,
                precision=precision,
                after_step=None if averaged is None else lambda: averaged.update_parameters(net),
                progress=bar,
            )
        )
        sync_buffers(net, info)
        if averaged is not None:
            sync_buffers(averaged, info)
        if val_images:
            scores: list[ImageScores] = evaluate(
                evaluated,
                [val_images[i] for i in shard],
                [val_targets[i] for i in shard],
                k,
                data.spec.img_size,
                overlap=data.spec.tile_overlap,
                tta=args.val_tta,
                flips=augment.flips,
                device=device,
                batch_size=max(args.batch_size, 4),
                precision=precision.precision,
            )
            summary = aggregate(gather(scores, info), data.classes)
            row.update({f"val_{key}": value for key, value in summary.items()})
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", val_dice=f"{row['val_dice']:.4f}")
        else:
            bar.set_postfix(loss=f"{row['train_loss']:.4f}")
        bar.close()
        row["time_s"] = round(time.monotonic() - epoch_start, 2)
        history.append(row)
        # Without validation data, the latest epoch is kept.
        improved = not val_images or row["val_dice"] > best["dice"]
        if improved:
            best = {"dice": row.get("val_dice", float("nan")), "epoch": epoch}
        if info.main:
            if improved:
                metadata = save_checkpoint(
                    out,
                    evaluated,
                    checkpoint_metadata(args, data, arch_args, row, info, samples, augment.flips),
                )
            write_history(out.parent, history, title=f"{out.name}: learning curves")
            save_train_state(out, epoch, net, optimizer, scheduler, precision.scaler, history, best, averaged)
        if args.time_limit and time.monotonic() - started > args.time_limit and epoch < args.epochs:
            if info.main:
                log.warning("time limit of %.0f s reached after epoch %d; stopping", args.time_limit, epoch)
            break
    percentile = percentile_of(args)
    if info.main and percentile is not None and out.is_file():
        # The best epoch's model: statistics of the training images' features, threshold on validation.
        metadata = add_ood_statistics(
            out,
            data.train.images,
            [0] * len(data.train),
            data.val.images,
            percentile=percentile,
            confidence=confidence_of(args),
            device=device,
            batch_size=max(args.batch_size, 4),
        )
    elapsed = time.monotonic() - started
    if info.main:
        best_row = next(
            (r for r in history if r["epoch"] == best.get("epoch")), history[-1] if history else {}
        )
        print(
            f"best epoch {best.get('epoch')}: val Dice {best_row.get('val_dice', float('nan')):.4f}; "
            f"checkpoint {out}; {elapsed:.0f} s"
        )
    return TrainResult(out, metadata, history, best, evaluated, elapsed)


def checkpoint_metadata(
    args: argparse.Namespace,
    data: Prepared,
    arch_args: dict[str, Any],
    row: dict[str, Any],
    info: Dist,
    samples: int,
    flips: list[str],
) -> CheckpointMetadata:
    """The checkpoint's metadata after the epoch of history record ``row``."""
    metrics = {key.removeprefix("val_"): value for key, value in row.items() if key.startswith("val_")}
    metrics.update({"epoch": row["epoch"], "train_loss": row["train_loss"], "evaluated_on": "validation"})
    training = json_args(args)
    training.update(
        {
            "world_size": info.world,
            "samples_per_epoch": samples,
            "train_images": len(data.train),
            "val_images": len(data.val),
        }
    )
    extra: dict[str, Any] = {
        "mask_mode": data.mode,
        # Mask value written for each class index: binary masks come back as 0/255, like the training data.
        "mask_values": [0, 255] if data.mode == "binary" else list(range(len(data.classes))),
        "tta_flips": flips,
    }
    if data.plan is not None:
        extra["plan"] = data.plan.as_json()
    if len(data.train) + len(data.val) <= 2000:
        extra["split"] = {"train": data.train.stems, "val": data.val.stems}
    return CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="unet", args=arch_args),
        classes=data.classes,
        preprocessing=data.spec,
        training=training,
        metrics=metrics,
        data_fingerprint=data.fingerprint,
        extra=extra,
    )


def save_train_state(
    out: Path,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    history: list[dict[str, Any]],
    best: dict[str, Any],
    averaged: AveragedModel | None = None,
) -> Path:
    """Everything ``--resume`` needs, as plain data + tensors (loadable with ``weights_only=True``)."""
    payload = {
        "format": STATE_FORMAT,
        "epoch": epoch,
        **training_state(model, optimizer, scheduler, scaler),
        "history": json.dumps(history),
        "best": json.dumps(best),
        "ema": {} if averaged is None else cpu_state_dict(averaged),
    }
    return save_training_state(state_path(out), payload)


def load_train_state(path: Path) -> dict[str, Any]:
    """Reads a training state; a ``.pt`` checkpoint path is mapped to its ``.train-state`` sibling."""
    path = Path(path)
    if path.suffix == ".pt":
        path = state_path(path)
    return load_training_state(
        path, expected_format=STATE_FORMAT, hint="written beside the checkpoint during training"
    )


def main(args: argparse.Namespace) -> int:
    try:
        run(args)
    except (ValueError, D.DataLayoutError) as exc:
        log.error("%s", exc)
        return 2
    return 0
