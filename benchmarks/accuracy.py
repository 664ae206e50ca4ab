"""Accuracy of the documented experiments, end to end through the ``medserve`` command.

Each experiment runs the commands the docs give (training, then evaluation) in a run folder and writes
``benchmarks/results/accuracy_<experiment>.json``: the commands, their seconds, the environment and the
evaluation report's summary (every method's scores), so that the figures the README and ``docs/`` quote are
backed by a file this script wrote. It prints a table of the methods' scores.

    python benchmarks/accuracy.py demo-phantoms           # about 3 minutes on a 2-core CPU
    python benchmarks/accuracy.py isbi                    # ../shared/datasets (or --datasets DIR); ~16-25 min
    python benchmarks/accuracy.py chest-phantoms          # 70 + 30 large mixed-size phantoms, all defaults
    python benchmarks/accuracy.py pneumonia               # 14 epochs, about 75 minutes on a 2-core CPU
    python benchmarks/accuracy.py isbi --reuse            # evaluate the run folder's checkpoint again

Segmentation reports give Dice, IoU and HD95 of the foreground classes per method (U-Net and the classical
baselines); classification reports give accuracy, balanced accuracy and AUC of the CNN and its baselines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ISBI_TEST_SLICES = range(24, 30)  # slices 0-23 train the U-Net, 24-29 are never seen in training


@dataclass(frozen=True)
class Plan:
    """The commands of one experiment: ``prepare`` lays out data, then training, then evaluation."""

    checkpoint: Path
    train: list[str]
    evaluate: list[str]
    prepare: Callable[[], object] = lambda: None


def eval_segment(checkpoint: Path, data: Path, out: Path) -> list[str]:
    """The ``medserve eval segment`` words of a segmentation experiment."""
    return ["eval", "segment", "--model", str(checkpoint), "--data", str(data), "--out", str(out)]


def demo_phantoms(run: Path, datasets: Path) -> Plan:
    """The demo U-Net (``medserve demo``) on 16 new dental phantoms, against the classical baselines."""
    models, test = run / "models", run / "test"
    return Plan(
        checkpoint=models / "dental.pt",
        prepare=lambda: _medserve(
            ["synth", "dental", "--out", str(test), "--n", "16", "--size", "192", "--seed", "1"]
        ),
        train=["demo", "--model-dir", str(models)],
        evaluate=eval_segment(models / "dental.pt", test, run / "eval"),
    )


def chest_phantoms(run: Path, datasets: Path) -> Plan:
    """Large, mixed-resolution chest phantoms (``medserve synth chest``): all training defaults (``--scale auto``)."""
    train, test, checkpoint = run / "train", run / "test", run / "chest.pt"

    def synthesise() -> None:
        for folder, n, seed in ((train, "70", "0"), (test, "30", "1")):
            if not (folder / "images").is_dir():  # kept by --reuse: the phantoms are deterministic
                _medserve(["synth", "chest", "--out", str(folder), "--n", n, "--seed", seed])

    return Plan(
        checkpoint=checkpoint,
        prepare=synthesise,
        train=["train", "segment", "--data", str(train), "--out", str(checkpoint)],
        evaluate=eval_segment(checkpoint, test, run / "eval"),
    )


def isbi(run: Path, datasets: Path) -> Plan:
    """ISBI 2012 membranes: a U-Net with default settings (36 epochs) on slices 0-23, evaluated on 24-29."""
    source = datasets / "isbi2012-em-membrane"

    def split() -> None:
        if not source.is_dir():
            raise SystemExit(f"error: {source} not found (pass --datasets DIR)")
        for i in range(30):
            part = "test" if i in ISBI_TEST_SLICES else "train"
            for kind in ("images", "masks"):
                link = run / "data" / part / kind / f"{i}.png"
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to((source / kind / f"{i}.png").resolve())

    checkpoint = run / "isbi.pt"
    return Plan(
        checkpoint=checkpoint,
        prepare=split,
        train=[
            "train",
            "segment",
            "--data",
            str(run / "data" / "train"),
            "--out",
            str(checkpoint),
            "--epochs",
            "36",
        ],
        evaluate=eval_segment(checkpoint, run / "data" / "test", run / "eval"),
    )


def pneumonia(run: Path, datasets: Path) -> Plan:
    """Pneumonia chest X-rays: ResNet-18 from scratch at 128 px (no pretrained weights can be downloaded here)."""
    source = datasets / "pneumonia-cxr"
    checkpoint = run / "pneumonia.pt"
    train = ["train", "classify", "--data", str(source / "train"), "--out", str(checkpoint)]
    train += ["--backbone", "resnet18", "--strategy", "full", "--head", "fc", "--pretrained", "none"]
    train += ["--img-size", "128", "--epochs", "14", "--batch-size", "32", "--lr", "1e-3", "--seed", "0"]
    return Plan(
        checkpoint=checkpoint,
        train=train,
        evaluate=[
            "eval",
            "classify",
            "--model",
            str(checkpoint),
            "--data",
            str(source / "test"),
            "--out",
            str(run / "eval"),
        ],
    )


EXPERIMENTS: dict[str, Callable[[Path, Path], Plan]] = {
    "chest-phantoms": chest_phantoms,
    "demo-phantoms": demo_phantoms,
    "isbi": isbi,
    "pneumonia": pneumonia,
}


def _medserve(words: list[str]) -> float:
    """Runs ``medserve WORDS`` (this checkout's, with this interpreter) and returns its seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "training", *words], cwd=ROOT, check=True)
    return time.perf_counter() - start


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The scores of every method of an evaluation report (segmentation or classification)."""
    if "methods" in report:  # medserve eval segment
        keys: tuple[str, ...] = (
            "dice",
            "iou",
            "hd95",
            "per_class_dice",
            "seconds_per_image",
            "rank",
            "beaten_by_unet",
        )
        return {
            name: {k: scores[k] for k in keys if k in scores} for name, scores in report["methods"].items()
        }
    keys = ("accuracy", "balanced_accuracy", "auc", "ece", "seconds")  # medserve eval classify
    methods = {"cnn": {k: report[k] for k in keys if k in report}}
    for name, scores in report.get("baselines", {}).items():
        methods[name] = {k: scores[k] for k in keys if k in scores}
    return methods


def cpu_name() -> str:
    """The processor's model name (Linux reports it in /proc/cpuinfo; platform.processor() is often empty)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def print_table(methods: dict[str, dict[str, Any]]) -> None:
    columns = sorted({k for scores in methods.values() for k, v in scores.items() if isinstance(v, float)})
    print("| method | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for name, scores in methods.items():
        cells = [f"{scores[c]:.4f}" if isinstance(scores.get(c), float) else "-" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/accuracy/<experiment>")
    parser.add_argument(
        "--reuse", action="store_true", help="keep the run folder's checkpoint, only evaluate"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/accuracy_<name>.json"
    )
    args = parser.parse_args(argv)

    run = args.run_dir or ROOT / "runs" / "accuracy" / args.experiment
    if run.exists() and not args.reuse:
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    plan = EXPERIMENTS[args.experiment](run, args.datasets)
    plan.prepare()
    out = args.out or RESULTS / f"accuracy_{args.experiment}.json"
    seconds: dict[str, float | None] = {"train": None}
    if not (args.reuse and plan.checkpoint.exists()):
        seconds["train"] = _medserve(plan.train)
    elif out.exists():  # evaluated again: the training record of the same checkpoint stays
        seconds["train"] = json.loads(out.read_text())["seconds"]["train"]
    seconds["evaluate"] = _medserve(plan.evaluate)
    report = json.loads((run / "eval" / "report.json").read_text())
    result = {
        "experiment": args.experiment,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commands": {
            "train": "medserve " + " ".join(plan.train),
            "evaluate": "medserve " + " ".join(plan.evaluate),
        },
        "seconds": seconds,
        "environment": environment(),
        "n_images": report.get("n_images"),
        "methods": summary(report),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # Paths are written relative to the checkout so the committed file names no machine.
    text = (
        json.dumps(result, indent=2)
        .replace(str(ROOT) + "/", "")
        .replace(str(args.datasets.resolve()), "DATASETS")
    )
    out.write_text(text + "\n")
    print_table(result["methods"])
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
