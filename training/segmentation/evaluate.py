"""`medserve eval segment --model PATH --data DIR --out OUTDIR`: U-Net against classical baselines.

Every image of ``DIR/images`` (with ``DIR/masks``) is predicted as the checkpoint's preprocessing says: at full
resolution (``resize="tile"``, native scale) or fitted to the working size (``resize="fit"``), by sliding-window
inference (``models.inference.segment_probabilities``; windows of the training crop size, overlapping and
blended, pooled over ``CHUNK`` images per forward batch as the service pools requests), with test-time
augmentation over the flips the model was trained with unless ``--no-tta``. Scores are mapped back to each
image's original size (``models.preprocessing.to_original_size``) and compared with the original masks. The
baselines of ``training.segmentation.baselines`` chosen by ``--baselines`` (default all) run on the same images.

Writes ``OUTDIR/report.json`` (``n_images``; ``methods`` -> ``unet`` and each baseline (``otsu``, ``kmeans``,
``region_growing``, ...) -> ``dice``, ``iou``, ``hd95``, ``per_class_dice``, ``seconds_per_image``, ``rank``
(1 = highest Dice) and, for the baselines, ``beaten_by_unet``), ``OUTDIR/report.md`` (with the ranking and a
pairwise table of per-image wins), ``OUTDIR/per_image.csv`` and contour overlays of the best and worst U-Net
cases in ``OUTDIR/overlays/``. With ``--interactive K``, report.json gains ``interactive`` and report.md a
table: Dice after each of K simulated clicks (``training.segmentation.interactive``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.checkpoint import CheckpointError, CheckpointMetadata, load_model
from models.imageio import resolve_intensity
from models.inference import resolve_device
from models.preprocessing import prepare
from training.segmentation import baselines, interactive
from training.segmentation import data as D
from training.segmentation.engine import predict_probabilities
from training.segmentation.metrics import ImageScores, aggregate, score_image
from training.segmentation.overlays import save_overlay

log = logging.getLogger(__name__)

METHOD_LABELS = {"unet": "U-Net", **baselines.LABELS}
CHUNK = 8  # images predicted together (bounds memory on large data sets)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="segmentation checkpoint (*.pt)")
    parser.add_argument("--data", required=True, type=Path, help="folder with images/ and masks/")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the report")
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="average the prediction over the flips the model was trained with (default on)",
    )
    parser.add_argument(
        "--baselines",
        type=baselines_option,
        default=baselines.METHODS,
        help=f"comma-separated baselines to compare with, or 'none' (default all: {','.join(baselines.METHODS)})",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per forward pass (default 8)")
    parser.add_argument(
        "--overlap", type=float, default=None, help="tile overlap (default: the checkpoint's tile_overlap)"
    )
    parser.add_argument(
        "--overlays",
        type=int,
        default=2,
        help="overlays written for the best and for the worst cases (default 2)",
    )
    parser.add_argument(
        "--interactive",
        type=int,
        default=0,
        metavar="K",
        help="also simulate K correction clicks per image and report Dice after each (default 0: off)",
    )


def baselines_option(text: str) -> tuple[str, ...]:
    """``--baselines``: comma-separated names, ``all`` or ``none``."""
    try:
        return baselines.parse_methods(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def targets_for(data: D.SegmentationSet, meta: CheckpointMetadata) -> list[np.ndarray]:
    """Masks as class indices, using the checkpoint's convention (binary 0/255 or index)."""
    stored = meta.extra.get("mask_mode")
    mode: D.MaskMode = stored if stored in ("binary", "index") else D.mask_mode(data.masks)
    if mode == "binary" and D.mask_mode(data.masks) != "binary":
        raise D.DataLayoutError(
            f"the model was trained on binary 0/255 masks, but masks in {data.mask_paths[0].parent} are not"
        )
    k = len(meta.classes)
    targets = [D.encode_mask(m, mode) for m in data.masks]
    bad = [s for s, t in zip(data.stems, targets, strict=True) if t.min() < 0 or t.max() >= k]
    if bad:
        raise D.DataLayoutError(f"masks hold values outside the model's {k} classes: {D.first_few(bad)}")
    return targets


def _comparison(methods: dict[str, dict[str, Any]]) -> list[str]:
    unet = methods["unet"]
    lines = []
    for name in (m for m in baselines.METHODS if m in methods):
        other = methods[name]
        diff = unet["dice"] - other["dice"]
        verb = "beats" if diff > 0 else "does not beat"
        relative = f" ({100 * diff / other['dice']:+.1f}%)" if other["dice"] > 0 else ""
        lines.append(
            f"- U-Net {verb} {METHOD_LABELS[name]}: Dice {unet['dice']:.4f} vs {other['dice']:.4f}, "
            f"{diff:+.4f}{relative}; IoU {unet['iou'] - other['iou']:+.4f}; "
            f"HD95 {unet['hd95']:.1f} vs {other['hd95']:.1f} px; per-class Dice "
            + ", ".join(
                f"`{c}` {unet['per_class_dice'][c] - other['per_class_dice'][c]:+.4f}"
                for c in unet["per_class_dice"]
            )
            + "."
        )
    return lines


def rank_methods(methods: dict[str, dict[str, Any]]) -> None:
    """Adds ``rank`` (1 = highest mean Dice) to every method and ``beaten_by_unet`` to the baselines."""
    for rank, name in enumerate(sorted(methods, key=lambda m: -methods[m]["dice"]), 1):
        methods[name]["rank"] = rank
    for name, scores in methods.items():
        if name != "unet":
            scores["beaten_by_unet"] = methods["unet"]["dice"] > scores["dice"]


def pairwise_wins(scores: dict[str, list[ImageScores]], names: list[str]) -> list[str]:
    """Markdown table: in row A, column B, the number of images on which A's Dice is higher than B's."""
    n = len(next(iter(scores.values())))
    rows = [
        f"| images won (of {n}) | " + " | ".join(METHOD_LABELS[b] for b in names) + " |",
        "|" + "---|" * (1 + len(names)),
    ]
    for a in names:
        cells = [
            "-"
            if a == b
            else str(sum(x["dice"] > y["dice"] for x, y in zip(scores[a], scores[b], strict=True)))
            for b in names
        ]
        rows.append(f"| {METHOD_LABELS[a]} | " + " | ".join(cells) + " |")
    return rows


def write_markdown(
    path: Path,
    report: dict[str, Any],
    meta: CheckpointMetadata,
    model_path: Path,
    data_dir: Path,
    settings: str,
    scores: dict[str, list[ImageScores]],
) -> None:
    methods: dict[str, dict[str, Any]] = report["methods"]
    classes = list(methods["unet"]["per_class_dice"])
    head = (
        "| rank | method | Dice | IoU | HD95 (px) | "
        + " | ".join(f"Dice `{c}`" for c in classes)
        + " | s/image |"
    )
    rows = [head, "|" + "---|" * (6 + len(classes))]
    ranked = sorted(methods, key=lambda m: methods[m]["rank"])
    for name in ranked:
        s = methods[name]
        per_class = " | ".join(f"{s['per_class_dice'][c]:.4f}" for c in classes)
        rows.append(
            f"| {s['rank']} | {METHOD_LABELS[name]} | {s['dice']:.4f} | {s['iou']:.4f} | {s['hd95']:.2f} | "
            f"{per_class} | {s['seconds_per_image']:.3f} |"
        )
    text = [
        "# Segmentation evaluation",
        "",
        f"Model `{model_path}` (version `{meta.version}`, classes {meta.classes}) on {report['n_images']} images "
        f"of `{data_dir}`. {settings}",
        "",
        "Dice, IoU and HD95 are means over images of the mean over the foreground classes; HD95 is in pixels "
        "(lower is better). Per-class Dice includes the background class. Methods are ranked by Dice; s/image "
        "is the wall time of each method's predictions divided by the number of images.",
        "",
        *rows,
        "",
        "## U-Net against the classical baselines",
        "",
        *_comparison(methods),
        "",
        "Baselines work on the grayscale intensity; which intensity group is which class is decided once on the "
        "evaluated data (the class ranking by mean intensity), see `training/segmentation/baselines.py`.",
        "",
        "## Which beat which",
        "",
        "Per image, by Dice:",
        "",
        *pairwise_wins(scores, ranked),
        "",
        "Overlays (`overlays/`): green = true contour, magenta = U-Net contour.",
        "",
    ]
    path.write_text("\n".join(text))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluates and writes the report files; returns the ``report.json`` content."""
    started = time.monotonic()
    device = resolve_device(args.device)
    model, meta = load_model(args.model, device)
    if meta.task != "segmentation":
        raise CheckpointError(f"{args.model}: a {meta.task} checkpoint, not a segmentation model")
    try:
        intensity = resolve_intensity(meta.preprocessing.intensity)
    except ValueError as exc:  # a policy this MedServe does not know: the checkpoint is from a newer one
        raise CheckpointError(f"{args.model}: {exc}") from exc
    # Images are read with the checkpoint's intensity policy, as training and the service read them.
    data = D.load_set(args.data, intensity)
    targets = targets_for(data, meta)
    spec = meta.preprocessing
    k = len(meta.classes)
    overlap = spec.tile_overlap if args.overlap is None else args.overlap

    unet_preds: list[np.ndarray] = []
    # The U-Net's probability of the corrected class, kept from the same pass for --interactive.
    foreground_probabilities: list[np.ndarray] = []
    unet_started = time.perf_counter()
    for i in range(0, len(data), CHUNK):
        tensors = [prepare(im, spec) for im in data.images[i : i + CHUNK]]
        probs = predict_probabilities(
            model,
            tensors,
            spec.img_size,
            overlap=overlap,
            tta=args.tta,
            flips=meta.tta_flips,
            device=device,
            batch_size=args.batch_size,
            spec=spec,
            original_sizes=[im.shape[:2] for im in data.images[i : i + CHUNK]],
        )
        unet_preds += [p.argmax(dim=0).numpy() for p in probs]
        if args.interactive > 0:
            foreground_probabilities += [p[interactive.FOREGROUND_CLASS].numpy() for p in probs]
    seconds = {"unet": time.perf_counter() - unet_started}
    order = baselines.class_intensity_order(data.images, targets, k)
    preds: dict[str, list[np.ndarray]] = {"unet": unet_preds}
    for method in args.baselines:
        method_started = time.perf_counter()
        preds[method] = [baselines.predict(method, im, order) for im in data.images]
        seconds[method] = time.perf_counter() - method_started
        log.info("%s: %.2f s per image", method, seconds[method] / len(data))
    scores: dict[str, list[ImageScores]] = {
        method: [score_image(p, t, k) for p, t in zip(maps, targets, strict=True)]
        for method, maps in preds.items()
    }
    methods = {
        method: aggregate(s, meta.classes) | {"seconds_per_image": seconds[method] / len(data)}
        for method, s in scores.items()
    }
    rank_methods(methods)
    report = {"n_images": len(data), "methods": methods}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    with open(out / "per_image.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "method", "dice", "iou", "hd95", *(f"dice_{c}" for c in meta.classes)])
        for method, method_scores in scores.items():
            for stem, s in zip(data.stems, method_scores, strict=True):
                writer.writerow(
                    [stem, method, f"{s['dice']:.6f}", f"{s['iou']:.6f}", f"{s['hd95']:.4f}"]
                    + [f"{d:.6f}" for d in s["per_class_dice"]]
                )
    # Best and worst U-Net cases.
    ranking = sorted(range(len(data)), key=lambda i: scores["unet"][i]["dice"])
    n = max(0, min(args.overlays, len(data)))
    picks = [("best", rank, i) for rank, i in enumerate(reversed(ranking[-n:] if n else []), 1)]
    picks += [("worst", rank, i) for rank, i in enumerate(ranking[:n], 1)]
    for label, rank, i in picks:
        save_overlay(
            out / "overlays" / f"{label}_{rank}_{data.stems[i]}.png",
            data.images[i],
            unet_preds[i],
            targets[i],
            caption=f"{data.stems[i]}: U-Net Dice {scores['unet'][i]['dice']:.3f}",
        )
    if not args.tta:
        tta = "flip TTA off"
    elif meta.tta_flips:
        tta = f"flip TTA over {' and '.join(meta.tta_flips)} flips (those of training)"
    else:
        tta = "flip TTA off (the model was trained without flips)"
    if spec.working_size is not None:
        scale = (
            f"Prediction at the {spec.working_size[0]}x{spec.working_size[1]} working size (every image fitted, "
            f"aspect kept) in {spec.img_size[0]}x{spec.img_size[1]} windows, masks mapped back to each image's "
            "size and scored there"
        )
    else:
        scale = f"Prediction at full resolution with {spec.img_size[0]}x{spec.img_size[1]} tiles"
    settings = f"{scale}, overlap {overlap:.2f}, {tta}; {time.monotonic() - started:.0f} s on {device}."
    write_markdown(out / "report.md", report, meta, Path(args.model), Path(args.data), settings, scores)
    if args.interactive > 0:
        report["interactive"] = interactive.evaluate_clicks(
            data.images, targets, foreground_probabilities, meta.classes, clicks=args.interactive
        )
        interactive.write_report(out, report)
    return report


def main(args: argparse.Namespace) -> int:
    try:
        report = run(args)
    except (CheckpointError, D.DataLayoutError) as exc:
        log.error("%s", exc)
        return 2
    for method, s in report["methods"].items():
        print(
            f"{method:>15}: Dice {s['dice']:.4f}  IoU {s['iou']:.4f}  HD95 {s['hd95']:.2f}  {s['per_class_dice']}"
        )
    print(f"report written to {args.out}/report.json and report.md")
    return 0
