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
from models.ood import (  # noqa: E402
    DEFAULT_CONFIDENCE,
    FeatureSource,
    conformal_threshold,
    extract_blocks,
    fit_statistics,
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
    """{"<layer>/mean" | "<layer>/std": (N, C)} for every stage, computed by the service's feature code
    (``models.ood.extract_blocks`` with every stage hooked, mean and std pooled)."""
    spec = metadata.preprocessing
    tiled = metadata.task == "segmentation" and spec.resize in ("tile", "fit")
    layers = stages(model)
    source = FeatureSource(
        tuple(n for n, _ in layers), tuple(m for _, m in layers), "mean+std", "every stage"
    )
    with torch.inference_mode():
        found = extract_blocks(
            model,
            (model_input(p, metadata) for p in pixels),
            source=source,
            tile=spec.img_size if tiled else None,
            overlap=spec.tile_overlap,
            batch_size=batch,
        )
    keys = [f"{n}/{k}" for n, _ in layers for k in ("mean", "std")]
    columns = np.cumsum([0, *found.widths])
    values = found.values.double().numpy()
    return {key: values[:, columns[i] : columns[i + 1]] for i, key in enumerate(keys)}


def scores_for(
    keys: Sequence[str], fit: dict[str, np.ndarray], groups: np.ndarray, n_groups: int, sets: dict[str, dict]
) -> dict[str, np.ndarray]:
    """Per set, the score of ``models.ood`` over the blocks ``keys``: sqrt(sum over blocks of the squared
    Mahalanobis distance), min over groups jointly."""
    stats = fit_statistics(
        np.concatenate([fit[key] for key in keys], axis=1),
        groups,
        [str(g) for g in range(n_groups)],
        None,
        features="study",
        blocks=[fit[key].shape[1] for key in keys],
    )
    return {
        name: stats.scores(np.concatenate([feats[key] for key in keys], axis=1))
        for name, feats in sets.items()
    }


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
