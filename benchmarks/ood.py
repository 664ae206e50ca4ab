"""Out-of-distribution flag: flag rates and AUROC, in-distribution test images against another domain.

Each image is scored exactly as the service scores it: read and decoded by the model's runner
(``app.runners.load_runner``: the checkpoint's intensity policy and preprocessing), then ``run_batch``, whose
prediction pass also yields the OOD score (``models.ood``). For each (model, in-distribution set, other domain)
pair it reports the fraction of each set flagged (score above the checkpoint's threshold) and the AUROC of the
score for telling the other domain from the in-distribution images (``sklearn.metrics.roc_auc_score``; 1.0:
every foreign image scores above every in-distribution one). Goal in every pair: at most 5 % of the
in-distribution images flagged, at least 95 % of the other domain flagged.

Pairs:
    * the pneumonia classifier on its test set (``pneumonia-cxr/test``) vs the ISBI 2012 EM slices, and vs dental
      phantoms;
    * the demo lesion classifier on held-out lesion phantoms (seeds 1-3, never seen in training) vs the chest
      X-rays of ``pneumonia-cxr/test``;
    * the demo dental U-Net on held-out dental phantoms (seeds 1-3) vs the same chest X-rays.

Models: ``RUN/pneumonia-ood.pt`` and ``RUN/demo/{dental,lesions}.pt``; with ``--train`` the commands below build
whichever is missing (about 6 + 5 minutes for the pneumonia classifier, 15-20 for the demo on a shared 2-core
CPU). Prints a table and writes ``benchmarks/results/ood.json``.

    python benchmarks/ood.py --run runs/ood --train
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GOAL_IN_MAX = 0.05
GOAL_OUT_MIN = 0.95
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm")


def pneumonia_commands(run: Path, datasets: Path) -> list[list[str]]:
    """The short pneumonia classifier (ResNet-18 from scratch, 64 px, 2 epochs) and its OOD calibration."""
    train = datasets / "pneumonia-cxr" / "train"
    return [
        ["train", "classify", "--data", str(train), "--out", str(run / "pneumonia.pt"), "--backbone", "resnet18",
         "--strategy", "full", "--head", "fc", "--pretrained", "none", "--img-size", "64", "--epochs", "2",
         "--val-split", "0.1", "--seed", "0", "--device", "cpu", "--threads", "2", "--no-progress"],
        ["calibrate-ood", "--model", str(run / "pneumonia.pt"), "--data", str(train), "--out",
         str(run / "pneumonia-ood.pt"), "--device", "cpu", "--threads", "2"],
    ]  # fmt: skip


def demo_commands(run: Path) -> list[list[str]]:
    return [["demo", "--model-dir", str(run / "demo"), "--device", "cpu"]]


def shown(text: str) -> str:
    """``text`` with this checkout's absolute paths made relative to it (the results file names no machine)."""
    return text.replace(str(ROOT) + os.sep, "").replace(str(ROOT.parent) + os.sep, "../")


def medserve(words: list[str]) -> float:
    """Runs ``medserve WORDS`` (this checkout's, with this interpreter) and returns its seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "training", *words], cwd=ROOT, check=True)
    return time.perf_counter() - start


def images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


HELD_OUT_SEEDS = (1, 2, 3)  # the demo models saw seed 0


def held_out_phantoms(run: Path) -> dict[str, list[Path]]:
    """Lesion (100 per class, 64 px) and dental (60, 192 px) phantoms of each seed in ``HELD_OUT_SEEDS``: 600
    and 180 images, enough that the flag rate is measured to about +-2 % (one seed's 60 dental phantoms moved
    it by 3-7 %)."""
    from training.classification.lesions import generate_lesion_dataset
    from training.segmentation.synthetic import generate_dental

    found: dict[str, list[Path]] = {"lesions": [], "dental": []}
    for seed in HELD_OUT_SEEDS:
        lesions, dental = run / "data" / f"lesions-seed{seed}", run / "data" / f"dental-seed{seed}"
        if not images_under(lesions):
            generate_lesion_dataset(lesions, 100, 64, seed=seed)
        if not images_under(dental / "images"):
            generate_dental(dental, 60, 192, seed=seed)
        found["lesions"] += images_under(lesions)
        found["dental"] += images_under(dental / "images")
    return found


def score_files(checkpoint: Path, files: Sequence[Path], batch: int = 16) -> np.ndarray:
    """The OOD score the service gives each file (decode + ``run_batch`` of the model's runner)."""
    from app.runners import ImageUpload, load_runner

    runner = load_runner(
        checkpoint.stem, checkpoint, device=torch.device("cpu"), precision="fp32", forward_batch_size=batch
    )
    if runner.ood is None:
        raise SystemExit(f"{checkpoint}: no OOD statistics (run medserve calibrate-ood)")
    scores: list[float] = []
    for start in range(0, len(files), batch):
        items = [
            runner.decode(ImageUpload(path.read_bytes(), filename=path.name), max_pixels=None)
            for path in files[start : start + batch]
        ]
        runner.run_batch(items)
        scores.extend(float(item.ood.score) for item in items if item.ood is not None)
    if len(scores) != len(files):
        raise RuntimeError(f"{checkpoint}: {len(scores)} scores for {len(files)} files")
    return np.asarray(scores)


def pair_result(inside: np.ndarray, outside: np.ndarray, threshold: float) -> dict[str, Any]:
    """Flag rates, AUROC and score quantiles of one in-distribution / other-domain pair."""
    labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    flagged_in = float(np.mean(inside > threshold))
    flagged_out = float(np.mean(outside > threshold))
    return {
        "n_in": len(inside),
        "n_out": len(outside),
        "flagged_in": round(flagged_in, 4),
        "flagged_out": round(flagged_out, 4),
        "auroc": round(float(roc_auc_score(labels, np.r_[inside, outside])), 4),
        "threshold": round(threshold, 4),
        "score_in": {
            q: round(float(np.percentile(inside, p)), 3) for q, p in (("p50", 50), ("p95", 95), ("max", 100))
        },
        "score_out": {
            q: round(float(np.percentile(outside, p)), 3) for q, p in (("min", 0), ("p5", 5), ("p50", 50))
        },
        "goal_met": flagged_in <= GOAL_IN_MAX and flagged_out >= GOAL_OUT_MIN,
    }


def environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
    }


def describe(checkpoint: Path) -> dict[str, Any]:
    from models.checkpoint import load_checkpoint

    meta, _ = load_checkpoint(checkpoint)
    assert meta.ood is not None
    return {
        "file": shown(str(checkpoint)),
        "version": meta.version,
        "task": meta.task,
        "architecture": meta.architecture.model_dump(),
        "input_size": list(meta.preprocessing.img_size),
        "ood": meta.ood.summary(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "ood", help="models and generated data")
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--train", action="store_true", help="build missing models with the commands above")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "ood.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run, datasets = args.run.resolve(), args.datasets.resolve()
    pneumonia, dental, lesions = (
        run / "pneumonia-ood.pt",
        run / "demo" / "dental.pt",
        run / "demo" / "lesions.pt",
    )
    commands = {"pneumonia": pneumonia_commands(run, datasets), "demo": demo_commands(run)}
    seconds: dict[str, float] = {}
    for name, needed in (("pneumonia", [pneumonia]), ("demo", [dental, lesions])):
        if all(p.is_file() for p in needed):
            continue
        if not args.train:
            raise SystemExit(f"missing {', '.join(str(p) for p in needed)}; run with --train to build them")
        seconds[name] = round(sum(medserve(words) for words in commands[name]), 1)

    started = time.perf_counter()
    phantoms = held_out_phantoms(run)
    sets = {
        "pneumonia-cxr test": images_under(datasets / "pneumonia-cxr" / "test"),
        "ISBI 2012 EM slices": images_under(datasets / "isbi2012-em-membrane" / "images"),
        "dental phantoms (seeds 1-3)": phantoms["dental"],
        "lesion phantoms (seeds 1-3)": phantoms["lesions"],
    }
    pairs = [
        ("pneumonia classifier", pneumonia, "pneumonia-cxr test", "ISBI 2012 EM slices"),
        ("pneumonia classifier", pneumonia, "pneumonia-cxr test", "dental phantoms (seeds 1-3)"),
        ("demo lesion classifier", lesions, "lesion phantoms (seeds 1-3)", "pneumonia-cxr test"),
        ("demo dental U-Net", dental, "dental phantoms (seeds 1-3)", "pneumonia-cxr test"),
    ]
    cache: dict[tuple[Path, str], np.ndarray] = {}
    results = []
    for model_name, checkpoint, inside, outside in pairs:
        for name in (inside, outside):
            if (checkpoint, name) not in cache:
                cache[(checkpoint, name)] = score_files(checkpoint, sets[name])
        ood = describe(checkpoint)["ood"]
        result = pair_result(cache[(checkpoint, inside)], cache[(checkpoint, outside)], ood["threshold"])
        results.append({"model": model_name, "in_distribution": inside, "other_domain": outside, **result})
    document = {
        "benchmark": "ood",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "goal": {"flagged_in_max": GOAL_IN_MAX, "flagged_out_min": GOAL_OUT_MIN},
        "commands": {k: [shown(" ".join(["medserve", *w])) for w in v] for k, v in commands.items()},
        "command_seconds": seconds,
        "models": {
            "pneumonia classifier": describe(pneumonia),
            "demo lesion classifier": describe(lesions),
            "demo dental U-Net": describe(dental),
        },
        "sets": {name: len(files) for name, files in sets.items()},
        "pairs": results,
        "scoring_seconds": round(time.perf_counter() - started, 1),
        "environment": environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    raw = {f"{c.stem}: {name}": [round(float(v), 4) for v in scores] for (c, name), scores in cache.items()}
    (run / "ood-scores.json").write_text(json.dumps(raw))
    header = f"{'model':<24} {'in-distribution':<28} {'other domain':<28} {'flag in':>8} {'flag out':>9} {'AUROC':>7}  goal"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['model']:<24} {r['in_distribution']:<28} {r['other_domain']:<28} {r['flagged_in']:>8.1%} "
            f"{r['flagged_out']:>9.1%} {r['auroc']:>7.4f}  {'met' if r['goal_met'] else 'MISSED'}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
