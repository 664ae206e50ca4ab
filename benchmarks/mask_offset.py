"""Are the masks centred on the structures they label, and does a model's output sit where the masks do?

Flip augmentation assumes masks are centred on their structures. Masks drawn with a consistent sub-pixel offset
(a rasteriser's pixel-corner convention, for instance) break that assumption: a flip mirrors the offset, the
model learns the average of the two, and its output lands off the labels by the offset. This script measures
both sides:

* **Mask offset** (always): per image, the shift (dy, dx) that best aligns the mask of ``--class-index`` with
  the image's intensity, from the cross-correlation of the class indicator with the mean-removed intensity
  (inverted when the class is darker than the rest), over integer shifts of up to 3 pixels in each direction,
  refined to sub-pixel by a parabola through the peak along each axis. Positive dy: the structure lies dy pixels below its mask.
* **Output offset** (with ``--model``): the checkpoint predicts every image as ``medserve eval segment``
  does (tiles, TTA over its training flips), and the class's Dice is computed for the probability map
  shifted by a grid of sub-pixel offsets (cubic spline). A best shift away from (0, 0) means the model
  predicts off the labels.

    python benchmarks/mask_offset.py --data runs/isbi/data/test --model runs/isbi/e32/isbi.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# benchmarks/, the script's own folder
from bench_layout import (  # noqa: E402
    add_labelled_set_arguments,
    environment,
    evaluation_probabilities,
    load_labelled_set,
    write_report,
)

from models.inference import resolve_device  # noqa: E402
from training.segmentation import data as D  # noqa: E402
from training.segmentation.metrics import dice_per_class  # noqa: E402

MAX_SHIFT = 3
BORDER = 8  # pixels ignored at each edge, where shifted maps wrap or extrapolate


def _parabola_peak(values: np.ndarray) -> float:
    """Sub-pixel position of the maximum of ``values`` sampled at 0..n-1."""
    i = int(np.argmax(values))
    if 0 < i < len(values) - 1:
        left, mid, right = values[i - 1], values[i], values[i + 1]
        curvature = left - 2 * mid + right
        if curvature < 0:
            return i + 0.5 * (left - right) / curvature
    return float(i)


def mask_offset(gray: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(dy, dx) that moves ``mask`` (bool, H x W) onto the structure it labels in ``gray`` (H x W)."""
    inside = gray[mask].mean() if mask.any() else 0.0
    outside = gray[~mask].mean() if (~mask).any() else 0.0
    signal = gray - gray.mean()
    if inside < outside:  # the class is darker: correlate with the inverted intensity
        signal = -signal
    indicator = mask.astype(np.float64) - mask.mean()
    crop = (slice(BORDER, -BORDER), slice(BORDER, -BORDER))
    shifts = range(-MAX_SHIFT, MAX_SHIFT + 1)
    scores = np.array(
        [
            [(np.roll(indicator, (sy, sx), (0, 1))[crop] * signal[crop]).sum() for sx in shifts]
            for sy in shifts
        ]
    )
    # The best integer shift in 2-D, then a parabola along each axis through it.
    iy, ix = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return _parabola_peak(scores[:, ix]) - MAX_SHIFT, _parabola_peak(scores[iy, :]) - MAX_SHIFT


def output_offsets(
    probabilities: list[np.ndarray], targets: list[np.ndarray], steps: list[float]
) -> list[dict[str, float]]:
    """Mean Dice of each probability map shifted by (dy, dx) on the grid ``steps`` x ``steps``."""
    crop = (slice(BORDER, -BORDER), slice(BORDER, -BORDER))
    rows = []
    for dy in steps:
        for dx in steps:
            scores = [
                # Class "1" of the two boolean maps: the evaluation's own Dice.
                dice_per_class((ndimage.shift(p, (dy, dx), order=3, mode="nearest") > 0.5)[crop], t[crop], 2)[
                    1
                ]
                for p, t in zip(probabilities, targets, strict=True)
            ]
            rows.append({"dy": dy, "dx": dx, "dice": float(np.mean(scores))})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_labelled_set_arguments(parser, "segmentation checkpoint to check as well")
    parser.add_argument(
        "--steps",
        type=float,
        nargs="+",
        default=[-0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75],
        help="output shifts tried per axis, in pixels",
    )
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    data, checkpoint = load_labelled_set(args.data, args.model, device)
    mode = D.mask_mode(data.masks)
    targets = [D.encode_mask(m, mode) == args.class_index for m in data.masks]
    grays = [image.mean(axis=2) for image in data.images]
    report: dict[str, Any] = {**environment(device), "data": str(args.data), "class_index": args.class_index}

    per_image = []
    print(f"{'image':>12} {'mask dy':>8} {'mask dx':>8}")
    for stem, gray, target in zip(data.stems, grays, targets, strict=True):
        dy, dx = mask_offset(gray, target)
        per_image.append({"image": stem, "dy": round(dy, 3), "dx": round(dx, 3)})
        print(f"{stem:>12} {dy:8.2f} {dx:8.2f}")
    mean_dy = float(np.mean([r["dy"] for r in per_image]))
    mean_dx = float(np.mean([r["dx"] for r in per_image]))
    print(
        f"{'mean':>12} {mean_dy:8.2f} {mean_dx:8.2f}  (positive: the structure lies below / right of its mask)"
    )
    report["mask_offset"] = {"per_image": per_image, "mean_dy": mean_dy, "mean_dx": mean_dx}

    if checkpoint is not None:
        model, meta = checkpoint
        probs = evaluation_probabilities(model, meta, data.images, device)
        maps = [p[args.class_index].numpy() for p in probs]
        rows = output_offsets(maps, targets, args.steps)
        best = max(rows, key=lambda r: r["dice"])
        unshifted = next(r for r in rows if r["dy"] == 0 and r["dx"] == 0)
        print(f"\nmodel {args.model} (TTA flips {meta.tta_flips}): Dice of class {args.class_index}")
        print(f"{'dy | dx':>8} " + " ".join(f"{dx:>7.2f}" for dx in args.steps))
        for dy in args.steps:
            cells = [r["dice"] for r in rows if r["dy"] == dy]
            print(f"{dy:>8.2f} " + " ".join(f"{c:7.4f}" for c in cells))
        print(
            f"unshifted {unshifted['dice']:.4f}; best shift ({best['dy']:+.2f}, {best['dx']:+.2f}) px: "
            f"{best['dice']:.4f} (shifted maps are scored {BORDER} px inside the border)"
        )
        report["output_offset"] = {
            "model": str(args.model),
            "tta_flips": meta.tta_flips,
            "grid": rows,
            "unshifted_dice": unshifted["dice"],
            "best": best,
        }
    write_report(report, "mask-offset", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
