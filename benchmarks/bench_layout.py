"""Speed by memory layout (contiguous vs channels_last): U-Net training and inference, classifier inference.

A U-Net training step is what ``medserve train segment`` does per batch: forward, Dice + cross-entropy loss,
backward, AdamW step. Inference is one forward pass under ``torch.inference_mode``, the service's path, for
U-Nets of several widths and for ``Classifier`` backbones (224x224, three channels, ``fc`` head). Layouts are
timed in alternation, step by step, so that machine drift affects them alike; the tables show the median
seconds per image and the speed-up of channels_last over the default layout.

    python benchmarks/bench_layout.py
    python benchmarks/bench_layout.py --device cuda --batch-sizes 8 16   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoint import CheckpointMetadata, load_model  # noqa: E402
from models.classifier import BACKBONES, Classifier  # noqa: E402
from models.imageio import resolve_intensity  # noqa: E402
from models.inference import resolve_device, segment_probabilities  # noqa: E402
from models.preprocessing import prepare  # noqa: E402
from models.unet import UNet  # noqa: E402
from training.segmentation import data as D  # noqa: E402
from training.segmentation.losses import DiceCELoss  # noqa: E402
from training.segmentation.train import parse_channels  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LAYOUTS = ("contiguous", "channels_last")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _in_layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else tensor


def _twins(make: Callable[[], torch.nn.Module], device: torch.device) -> dict[str, torch.nn.Module]:
    """The network ``make()`` builds, once per layout, with the same weights."""
    base = make().to(device)
    twin = make().to(device)
    twin.load_state_dict(base.state_dict())
    return {"contiguous": base, "channels_last": twin.to(memory_format=torch.channels_last)}


def summarise(
    row: dict[str, Any], kind: str, times: dict[str, list[float]], baseline: str, candidate: str
) -> None:
    """Adds the median seconds per image of ``baseline`` and ``candidate`` and the candidate's speed-up to ``row``."""
    for name in (baseline, candidate):
        row[f"{kind}_s_per_image_{name}"] = float(np.median(times[name]))
    row[f"{kind}_speedup_{candidate}"] = (
        row[f"{kind}_s_per_image_{baseline}"] / row[f"{kind}_s_per_image_{candidate}"]
    )


def time_unets(
    nets: dict[str, tuple[torch.nn.Module, str]],
    batch: int,
    size: int,
    steps: int,
    device: torch.device,
    *,
    train: bool = True,
    infer: bool = True,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per image of a training step and of inference for each named (U-Net, layout), in alternation.

    Args:
        train, infer: which of the two to time (the other's lists stay empty).

    Returns:
        (train, infer): name -> one time per step, after one warm-up step that is not counted.
    """
    optimizers = {name: torch.optim.AdamW(net.parameters(), lr=1e-3) for name, (net, _layout) in nets.items()}
    criterion = DiceCELoss().to(device)
    images = torch.randn(batch, 1, size, size, device=device)
    masks = torch.randint(0, 2, (batch, size, size), device=device)
    train_times: dict[str, list[float]] = {name: [] for name in nets}
    infer_times: dict[str, list[float]] = {name: [] for name in nets}
    for step in range(steps + 1):  # step 0 warms up (allocations, kernel selection)
        for name, (net, layout) in nets.items():
            x = _in_layout(images, layout)
            if train:
                optimizer = optimizers[name]
                net.train()
                _sync(device)
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                criterion(net(x), masks).backward()
                optimizer.step()
                _sync(device)
                if step:
                    train_times[name].append((time.perf_counter() - start) / batch)
            if infer:
                net.eval()
                _sync(device)
                start = time.perf_counter()
                with torch.inference_mode():
                    net(x)
                _sync(device)
                if step:
                    infer_times[name].append((time.perf_counter() - start) / batch)
    return train_times, infer_times


def measure(
    channels: Sequence[int], batch: int, size: int, steps: int, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """Median seconds per image for a training step and for inference, in both layouts."""
    torch.manual_seed(seed)
    nets = _twins(lambda: UNet(in_channels=1, out_channels=2, channels=list(channels), norm="batch"), device)
    train, infer = time_unets(
        {layout: (net, layout) for layout, net in nets.items()}, batch, size, steps, device
    )
    row: dict[str, Any] = {"channels": list(channels), "batch": batch, "size": size, "steps": steps}
    summarise(row, "train", train, *LAYOUTS)
    summarise(row, "infer", infer, *LAYOUTS)
    return row


def measure_classifier(backbone: str, batch: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Median inference seconds per image of a randomly initialised classifier, in both layouts."""
    torch.manual_seed(0)
    nets = _twins(lambda: Classifier(backbone, num_classes=2, in_channels=3).eval(), device)
    images = torch.randn(batch, 3, 224, 224, device=device)
    times: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    with torch.inference_mode():
        for step in range(steps + 1):
            for layout, net in nets.items():
                x = _in_layout(images, layout)
                _sync(device)
                start = time.perf_counter()
                net(x)
                _sync(device)
                if step:
                    times[layout].append((time.perf_counter() - start) / batch)
    row: dict[str, Any] = {"backbone": backbone, "batch": batch, "steps": steps}
    summarise(row, "infer", times, *LAYOUTS)
    return row


def add_unet_arguments(parser: argparse.ArgumentParser, widths: list[list[int]], widths_help: str) -> None:
    """The options every U-Net timing script takes: widths, batch sizes, crop size, steps, device, report."""
    parser.add_argument("--widths", nargs="+", type=parse_channels, default=widths, help=widths_help)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--size", type=int, default=256, help="crop side (default 256, the training default)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant after one warm-up")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default benchmarks/results/)")


def environment(device: torch.device) -> dict[str, Any]:
    """What a report records about where it was measured; ``created_at`` also names the default file."""
    return {
        "created_at": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }


def add_labelled_set_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    """The options of the scripts that measure a labelled image folder, and optionally a checkpoint on it."""
    parser.add_argument("--data", required=True, type=Path, help="folder with images/ and masks/")
    parser.add_argument("--class-index", type=int, default=0, help="class to measure (ISBI membranes: 0)")
    parser.add_argument("--model", type=Path, default=None, help=model_help)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: benchmarks/results/)")


def load_labelled_set(
    data_dir: Path, model_path: Path | None, device: torch.device
) -> tuple[D.SegmentationSet, tuple[torch.nn.Module, CheckpointMetadata] | None]:
    """The folder's images and masks, and the checkpoint's model and metadata when ``model_path`` is given.

    With a checkpoint, the images are read with its intensity policy, as training, evaluation and the service
    read them for it; without one, with the default policy.
    """
    if model_path is None:
        return D.load_set(data_dir), None
    model, meta = load_model(model_path, device)
    return D.load_set(data_dir, resolve_intensity(meta.preprocessing.intensity)), (model, meta)


def evaluation_probabilities(
    model: torch.nn.Module, meta: CheckpointMetadata, images: Sequence[np.ndarray], device: torch.device
) -> list[torch.Tensor]:
    """(K, H, W) class probabilities of decoded (H, W, C) images, predicted as ``medserve eval segment`` does:
    the checkpoint's preprocessing, tile size and overlap, and TTA over the flips it was trained with."""
    spec = meta.preprocessing
    return segment_probabilities(
        model,
        [prepare(image, spec) for image in images],
        spec.img_size,
        overlap=spec.tile_overlap,
        tta=True,
        flips=meta.tta_flips,
        device=device,
    )


def write_report(report: dict[str, Any], prefix: str, out: Path | None) -> None:
    """Writes ``report`` to ``out`` or to ``benchmarks/results/<prefix>-<created_at>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = out or RESULTS / f"{prefix}-{report['created_at']}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_unet_arguments(
        parser,
        [[16, 32, 64, 128, 256], [24, 48, 96, 192, 384], [32, 64, 128, 256, 512]],
        "U-Net channel lists, e.g. 16,32,64,128,256 (default: base 16, 24 and 32, five levels)",
    )
    parser.add_argument(
        "--backbones",
        nargs="*",
        choices=sorted(BACKBONES),
        default=["resnet18", "resnet50", "densenet121", "mobilenet_v3_large", "efficientnet_b0"],
        help="classifier backbones timed for inference (none: U-Net only)",
    )
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    rows = [
        measure(channels, batch, args.size, args.steps, device)
        for channels in args.widths
        for batch in args.batch_sizes
    ]
    classifier_rows = [
        measure_classifier(backbone, batch, args.steps, device)
        for backbone in args.backbones
        for batch in args.batch_sizes
    ]
    report = {**environment(device), "unet": rows, "classifiers": classifier_rows}
    print(
        f"U-Net, {args.size}x{args.size} crops, {device}, {torch.get_num_threads()} threads; s/image (median)"
    )
    print(
        f"{'channels':<22} {'batch':>5} {'train':>8} {'train CL':>9} {'x':>5} {'infer':>8} {'infer CL':>9} {'x':>5}"
    )
    for r in rows:
        print(
            f"{','.join(map(str, r['channels'])):<22} {r['batch']:>5} "
            f"{r['train_s_per_image_contiguous']:>8.3f} {r['train_s_per_image_channels_last']:>9.3f} "
            f"{r['train_speedup_channels_last']:>5.2f} "
            f"{r['infer_s_per_image_contiguous']:>8.4f} {r['infer_s_per_image_channels_last']:>9.4f} "
            f"{r['infer_speedup_channels_last']:>5.2f}"
        )
    if classifier_rows:
        print(f"\nClassifier inference, 224x224, {device}; s/image (median)")
        print(f"{'backbone':<22} {'batch':>5} {'infer':>8} {'infer CL':>9} {'x':>5}")
        for r in classifier_rows:
            print(
                f"{r['backbone']:<22} {r['batch']:>5} {r['infer_s_per_image_contiguous']:>8.4f} "
                f"{r['infer_s_per_image_channels_last']:>9.4f} {r['infer_speedup_channels_last']:>5.2f}"
            )
    write_report(report, "layout", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
