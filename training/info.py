"""`medserve info PATH`: print a checkpoint's metadata as JSON (without building the model).

``--plan`` prints the segmentation plan instead (``extra["plan"]``: the scale, working size, patch, batch and
steps chosen from the data set's fingerprint, with the reasons), readably; see ``training.segmentation.planning``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.checkpoint import CheckpointError, load_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="checkpoint file (*.pt)")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print the segmentation plan (scale, sizes, steps and why) instead",
    )


def main(args: argparse.Namespace) -> int:
    try:
        metadata, _state = load_checkpoint(args.path)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "plan", False):
        plan = metadata.extra.get("plan")
        if plan is None:
            print(
                f"{args.path} has no plan (trained before plans were stored): it runs at "
                f"{'native scale' if metadata.preprocessing.resize == 'tile' else metadata.preprocessing.resize}"
            )
            return 0
        # Imported only here: the planner pulls in the training data code.
        from training.segmentation.planning import describe

        print(describe(plan))
        return 0
    print(json.dumps(metadata.model_dump(mode="json"), indent=2))
    return 0
