"""Speed of the U-Net's two up-convolutions: ``deconv`` (the default) against ``nearest``.

``deconv`` is a 2x2 transposed convolution with stride 2; ``nearest`` (the only kind before checkpoint format
version 2) up-samples by nearest neighbour and then applies a 2x2 convolution at the finer resolution, which
is 4x the multiply-adds of that layer. Both are timed in alternation, step by step, in the layout each path
uses (training: contiguous; inference: channels_last as the service runs it), with the training step of
``medserve train segment`` (forward, Dice + cross-entropy, backward, AdamW) and one inference forward. The
table shows median seconds per image and how much faster ``deconv`` is.

    python benchmarks/bench_upsample.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# benchmarks/, the script's own folder
from bench_layout import add_unet_arguments, environment, summarise, time_unets, write_report  # noqa: E402

from models.inference import resolve_device  # noqa: E402
from models.unet import UPSAMPLES, UNet  # noqa: E402


def measure(channels: list[int], batch: int, size: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Median seconds per image of a training step (contiguous) and inference (channels_last), per kind."""
    row: dict[str, Any] = {"channels": channels, "batch": batch, "size": size, "steps": steps}
    for path, layout in (("train", "contiguous"), ("infer", "channels_last")):
        torch.manual_seed(0)
        nets: dict[str, tuple[torch.nn.Module, str]] = {}
        for kind in UPSAMPLES:
            net = UNet(in_channels=1, out_channels=2, channels=channels, upsample=kind).to(device)
            if layout == "channels_last":
                net = net.to(memory_format=torch.channels_last)
            nets[kind] = (net, layout)
        train, infer = time_unets(
            nets, batch, size, steps, device, train=path == "train", infer=path == "infer"
        )
        summarise(row, path, train if path == "train" else infer, "nearest", "deconv")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_unet_arguments(
        parser,
        [[16, 32, 64, 128, 256], [32, 64, 128, 256, 512]],
        "U-Net channel lists (default: the training default 16-256 and the service benchmark's 32-512)",
    )
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    rows = [
        measure(list(channels), batch, args.size, args.steps, device)
        for channels in args.widths
        for batch in args.batch_sizes
    ]
    report = {**environment(device), "unet": rows}
    print(f"U-Net up-convolution, {args.size}x{args.size}, {device}, {torch.get_num_threads()} threads")
    print("s/image (median); train: contiguous, infer: channels_last")
    header = f"{'channels':<22} {'batch':>5} {'train nearest':>14} {'train deconv':>13} {'x':>5}"
    print(header + f" {'infer nearest':>14} {'infer deconv':>13} {'x':>5}")
    for r in rows:
        print(
            f"{','.join(map(str, r['channels'])):<22} {r['batch']:>5} "
            f"{r['train_s_per_image_nearest']:>14.3f} {r['train_s_per_image_deconv']:>13.3f} "
            f"{r['train_speedup_deconv']:>5.2f} "
            f"{r['infer_s_per_image_nearest']:>14.4f} {r['infer_s_per_image_deconv']:>13.4f} "
            f"{r['infer_speedup_deconv']:>5.2f}"
        )
    write_report(report, "upsample", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
