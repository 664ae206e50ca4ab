"""Which features should the out-of-distribution score use? A study on the models of ``benchmarks/ood.py``.

For each model it extracts, in one pass per image set, the spatially pooled output of every stage of the
network (the five stages of a classifier's backbone, every encoder block of the U-Net), pooled by the mean
and by the standard deviation over positions. Gaussian statistics (class means, one Ledoit-Wolf covariance,
``models.ood.fit_gaussian``) are fitted per layer on the training images; a configuration's score is the
Mahalanobis distance under the block-diagonal covariance of its layers, ``sqrt(sum over layers of d_l^2)``
(minimised over classes jointly). The threshold is set on the validation images' scores by each of three
rules: the tolerance limit the service uses (at most 5 % flagged with confidence 0.9,
``models.ood.tolerance_threshold``), the split-conformal rank (at most 5 % on average) and numpy's interpolated
95th percentile. It reports, for each configuration and each pair of ``benchmarks/ood.py``, the flag rates
of the in-distribution test images and of the other domain, and the AUROC.

The images are read and prepared as training's calibration reads them (``training.common.ood``), not through
the service; ``benchmarks/ood.py`` measures what the service answers. Prints a table, writes
``benchmarks/results/ood_features.json``.

    python benchmarks/ood_features.py --run runs/ood
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ood import GOAL_IN_MAX, GOAL_OUT_MIN, held_out_phantoms, images_under  # noqa: E402

from models.checkpoint import CheckpointMetadata, build_model, load_checkpoint  # noqa: E402
from models.inference import split_tiles  # noqa: E402
from models.ood import (  # noqa: E402
    DEFAULT_CONFIDENCE,
    conformal_threshold,
    fit_gaussian,
    mahalanobis_scores,
    tolerance_threshold,
)
from models.unet import UNet  # noqa: E402
from training.calibrate_ood import classification_files, segmentation_files  # noqa: E402
from training.common.ood import model_input, read_pixels  # noqa: E402
from training.segmentation.demo import DEMO_IMAGES, DEMO_SIZE  # noqa: E402
from training.segmentation.synthetic import generate_dental  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(model, UNet):
        return [(f"down.{i}", block) for i, block in enumerate(model.down)]
    features = model.features
    assert isinstance(features, nn.Sequential)
    return [(f"features.{i}", block) for i, block in enumerate(features)]


def extract(
    model: nn.Module, metadata: CheckpointMetadata, pixels: Iterable[np.ndarray], batch: int = 32
) -> dict[str, np.ndarray]:
    """{"<layer>/mean" | "<layer>/std": (N, C)} for every stage."""
    spec = metadata.preprocessing
    tiled = metadata.task == "segmentation" and spec.resize in ("tile", "fit")
    layers = stages(model)
    collected: dict[str, list[torch.Tensor]] = {f"{n}/{k}": [] for n, _ in layers for k in ("mean", "std")}
    current: dict[str, list[torch.Tensor]] = {}

    def hook(name: str) -> Any:
        def run(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            flat = output.float().flatten(2)
            current.setdefault(f"{name}/mean", []).append(flat.mean(2))
            current.setdefault(f"{name}/std", []).append(flat.std(2, correction=0))

        return run

    handles = [module.register_forward_hook(hook(name)) for name, module in layers]
    pending: list[torch.Tensor] = []
    counts: list[int] = []

    def flush() -> None:
        if not pending:
            return
        x = torch.cat(pending) if tiled else torch.stack(pending)
        current.clear()
        for chunk in x.split(batch):
            model(chunk)
        for key, parts in current.items():
            rows = torch.cat(parts)
            if tiled:
                rows = torch.stack([p.mean(0) for p in rows.split(counts)])
            collected[key].append(rows)
        pending.clear()
        counts.clear()

    try:
        with torch.inference_mode():
            for p in pixels:
                image = model_input(p, metadata)
                if tiled:
                    tiles, tiling = split_tiles(image, spec.img_size, spec.tile_overlap)
                    pending.append(tiles)
                    counts.append(len(tiling.positions))
                else:
                    pending.append(image)
                if (sum(counts) if tiled else len(pending)) >= batch:
                    flush()
            flush()
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v).double().numpy() for k, v in collected.items()}


def scores_for(
    keys: Sequence[str], fit: dict[str, np.ndarray], groups: np.ndarray, n_groups: int, sets: dict[str, dict]
) -> dict[str, np.ndarray]:
    """Per set, sqrt(sum over keys of the squared Mahalanobis distance), min over groups jointly."""
    totals: dict[str, np.ndarray] = {}
    for key in keys:
        means, precision = fit_gaussian(fit[key], groups, n_groups)
        for name, feats in sets.items():
            # Squared distance to each group separately, so the minimum over groups is taken on the sum.
            per_group = np.stack(
                [mahalanobis_scores(feats[key], means[g : g + 1], precision) ** 2 for g in range(n_groups)],
                axis=1,
            )
            totals[name] = totals.get(name, 0.0) + per_group
    return {name: np.sqrt(t.min(axis=1)) for name, t in totals.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "ood")
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "ood_features.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run, datasets = args.run.resolve(), args.datasets.resolve()
    phantoms = held_out_phantoms(run)
    dental_train = run / "data" / "dental-seed0"  # the demo's own phantoms, regenerated from its seed
    if not images_under(dental_train / "images"):
        generate_dental(dental_train, DEMO_IMAGES, DEMO_SIZE, 0)
    cxr_test = images_under(datasets / "pneumonia-cxr" / "test")
    models = [
        ("pneumonia classifier", run / "pneumonia.pt", datasets / "pneumonia-cxr" / "train", cxr_test,
         {"ISBI 2012 EM slices": images_under(datasets / "isbi2012-em-membrane" / "images"),
          "dental phantoms (seeds 1-3)": phantoms["dental"]}),
        ("demo lesion classifier", run / "demo" / "lesions.pt", run / "demo" / "demo-data" / "lesions", phantoms["lesions"],
         {"pneumonia-cxr test": cxr_test}),
        ("demo dental U-Net", run / "demo" / "dental.pt", dental_train, phantoms["dental"],
         {"pneumonia-cxr test": cxr_test}),
    ]  # fmt: skip
    report: list[dict[str, Any]] = []
    for label, checkpoint, data, test_files, others in models:
        metadata, state = load_checkpoint(checkpoint)
        model = build_model(metadata)
        model.load_state_dict(state)
        model.eval()
        intensity = metadata.preprocessing.intensity
        if metadata.task == "classification":
            split = metadata.training.get("val_split", 0.1)
            train_files, labels, val_files = classification_files(
                metadata, data, float(split), int(metadata.training.get("seed", 0))
            )
        else:
            train_files, val_files, _ = segmentation_files(
                metadata, data, float(metadata.training.get("val_split", 0.15)), 0
            )
            labels = [0] * len(train_files)
        groups = np.asarray(labels)
        n_groups = len(metadata.classes) if metadata.task == "classification" else 1
        sets = {"fit": train_files, "val": val_files, "test": test_files, **others}
        feats = {
            name: extract(model, metadata, read_pixels(files, intensity)) for name, files in sets.items()
        }
        fit = feats.pop("fit")
        layer_names = [n for n, _ in stages(model)]
        configs: dict[str, list[str]] = {"last, mean (today)": [f"{layer_names[-1]}/mean"]}
        for name in layer_names:
            configs[f"{name}, mean"] = [f"{name}/mean"]
            configs[f"{name}, mean+std"] = [f"{name}/mean", f"{name}/std"]
        configs["all stages, mean"] = [f"{n}/mean" for n in layer_names]
        configs["all stages, mean+std"] = [f"{n}/{k}" for n in layer_names for k in ("mean", "std")]
        configs["all but first, mean+std"] = [f"{n}/{k}" for n in layer_names[1:] for k in ("mean", "std")]
        configs["first + last, mean+std"] = [
            f"{n}/{k}" for n in (layer_names[0], layer_names[-1]) for k in ("mean", "std")
        ]
        for config, keys in configs.items():
            scores = scores_for(keys, fit, groups, n_groups, feats)
            for rule in ("interpolated", "conformal", "tolerance"):
                val = scores["val"]
                if rule == "interpolated":
                    threshold = float(np.percentile(val, 95))
                elif rule == "conformal":
                    threshold = conformal_threshold(val, 95.0)[0]
                else:
                    threshold = tolerance_threshold(val, 95.0, DEFAULT_CONFIDENCE)[0]
                row: dict[str, Any] = {
                    "model": label,
                    "features": config,
                    "threshold_rule": rule,
                    "threshold": round(threshold, 4),
                    "flagged_val": round(float(np.mean(scores["val"] > threshold)), 4),
                    "flagged_in": round(float(np.mean(scores["test"] > threshold)), 4),
                    "other": {},
                }
                for other in others:
                    inside, outside = scores["test"], scores[other]
                    auroc = roc_auc_score(
                        np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]
                    )
                    row["other"][other] = {
                        "flagged_out": round(float(np.mean(outside > threshold)), 4),
                        "auroc": round(float(auroc), 4),
                    }
                row["goal_met"] = row["flagged_in"] <= GOAL_IN_MAX and all(
                    o["flagged_out"] >= GOAL_OUT_MIN for o in row["other"].values()
                )
                report.append(row)
                outs = "  ".join(
                    f"{k[:12]}: {v['flagged_out']:6.1%} (AUROC {v['auroc']:.3f})"
                    for k, v in row["other"].items()
                )
                print(
                    f"{label:<22} {config:<26} {rule[:6]} in {row['flagged_in']:6.1%}  {outs}  {'met' if row['goal_met'] else ''}"
                )
                sys.stdout.flush()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"benchmark": "ood_features", "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "goal": {"flagged_in_max": GOAL_IN_MAX, "flagged_out_min": GOAL_OUT_MIN},
                    "rows": report}, indent=2) + "\n"
    )  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
