"""Command-line pieces shared by ``medserve train classify`` and ``medserve train segment``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from models.imageio import DEFAULT_INTENSITY, INTENSITY_POLICIES


def add_intensity_argument(group: argparse._ActionsContainer) -> None:
    """``--intensity``: the policy images are read with, stored in the checkpoint and reapplied when serving."""
    group.add_argument(
        "--intensity",
        choices=sorted(INTENSITY_POLICIES),
        default=DEFAULT_INTENSITY,
        help="how image samples map to [0, 1], stored and reapplied when serving: dicom-window (default: "
        "DICOM VOI LUT/window when present) or ignore-window (DICOM min-max like 16-bit PNG); README section 'Image formats'",
    )


def json_args(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed arguments as JSON values (paths as strings, tuples as lists), for a checkpoint's metadata."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith("_") or callable(value):
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out
