"""`medserve info PATH`: print a checkpoint's metadata as JSON (without building the model)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.checkpoint import CheckpointError, load_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="checkpoint file (*.pt)")


def main(args: argparse.Namespace) -> int:
    try:
        metadata, _state = load_checkpoint(args.path)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(metadata.model_dump(mode="json"), indent=2))
    return 0
