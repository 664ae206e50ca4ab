"""How thick are the labelled structures, per image, and how thick does a model draw them?

Thin structures (membranes, vessel walls, contours) are scored with Dice, which counts every pixel of their
width. If the annotators drew them thinner on some images than on others, a model trained on the thicker ones
draws the thicker style everywhere, and its Dice on the thinner images drops however good it is. This script
measures that:

* **Label width** (always): per image, the mean width in pixels of the structures of ``--class-index`` in the
  mask, as area / (boundary length / 2), the boundary length being the number of 4-connected pixel edges
  between the class and the rest. A straight strip of width w gives w; diagonal edges make it up to about
  1.4x smaller, alike for every image.
* **Predicted width** (with ``--model``): the checkpoint predicts every image as ``medserve eval segment`` does
  (tiles, overlap, TTA over its training flips), and the table adds the width of the predicted class, the
  class's Dice, and its false-positive and false-negative pixels.

    python benchmarks/label_width.py --data ../shared/datasets/isbi2012-em-membrane
    python benchmarks/label_width.py --data runs/isbi/data/test --model runs/isbi/interp36/isbi.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

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


def structure_width(mask: np.ndarray) -> float:
    """Mean width in pixels of the True structures of a (H, W) boolean mask: area / (boundary length / 2).

    The boundary is counted in 4-connected pixel edges between True and False, inside the image only.
    Returns 0.0 for a mask without any boundary (empty or full).
    """
    mask = np.asarray(mask, dtype=bool)
    edges = np.count_nonzero(mask[1:, :] != mask[:-1, :]) + np.count_nonzero(mask[:, 1:] != mask[:, :-1])
    if edges == 0:
        return 0.0
    return float(2.0 * np.count_nonzero(mask) / edges)


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_labelled_set_arguments(parser, "segmentation checkpoint to compare")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    data, checkpoint = load_labelled_set(args.data, args.model, device)
    mode = D.mask_mode(data.masks)
    labels = [D.encode_mask(m, mode) for m in data.masks]
    targets = [label == args.class_index for label in labels]

    predictions: list[np.ndarray] = []
    tta_flips = None
    n_classes = args.class_index + 1
    if checkpoint is not None:
        model, meta = checkpoint
        probabilities = evaluation_probabilities(model, meta, data.images, device)
        predictions = [p.argmax(dim=0).numpy() for p in probabilities]
        tta_flips = meta.tta_flips
        n_classes = max(len(meta.classes), n_classes)

    rows: list[dict[str, Any]] = []
    header = f"{'image':>12} {'share':>6} {'width':>6}"
    if predictions:
        header += f" {'pred width':>10} {'Dice':>6} {'false +':>8} {'false -':>8}"
    print(header)
    for i, (stem, target) in enumerate(zip(data.stems, targets, strict=True)):
        row: dict[str, Any] = {
            "image": stem,
            "share": float(target.mean()),
            "width": structure_width(target),
        }
        line = f"{stem:>12} {row['share']:6.3f} {row['width']:6.2f}"
        if predictions:
            predicted = predictions[i] == args.class_index
            row |= {
                "predicted_width": structure_width(predicted),
                "dice": float(dice_per_class(predictions[i], labels[i], n_classes)[args.class_index]),
                "false_positive": int(np.count_nonzero(predicted & ~target)),
                "false_negative": int(np.count_nonzero(~predicted & target)),
            }
            line += (
                f" {row['predicted_width']:10.2f} {row['dice']:6.3f}"
                f" {row['false_positive']:8d} {row['false_negative']:8d}"
            )
        rows.append(row)
        print(line)

    summary: dict[str, Any] = {"width": _stats([r["width"] for r in rows])}
    footer = f"{'mean':>12} {np.mean([r['share'] for r in rows]):6.3f} {summary['width']['mean']:6.2f}"
    if predictions:
        summary["predicted_width"] = _stats([r["predicted_width"] for r in rows])
        summary["dice"] = float(np.mean([r["dice"] for r in rows]))
        footer += f" {summary['predicted_width']['mean']:10.2f} {summary['dice']:6.3f}"
    print(footer)

    report: dict[str, Any] = {
        **environment(device),
        "data": str(args.data),
        "class_index": args.class_index,
        "model": str(args.model) if args.model else None,
        "tta_flips": tta_flips,
        "per_image": rows,
        "summary": summary,
    }
    write_report(report, "label-width", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
