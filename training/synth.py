"""`medserve synth KIND --out DIR`: the synthetic phantom data sets, with exact ground truth.

Kinds are registered in ``GENERATORS`` (kind -> "module:function", imported only when chosen); each generator
takes ``(out_dir, n, size, seed)`` and returns the written image paths:

* ``dental``: dental-X-ray-like images and tooth masks for segmentation (``training.segmentation.synthetic``).
* ``chest``: chest-X-ray-like images of mixed sizes (long side from a fifth of ``--size`` up to it; default
  3000) and lung masks (``training.segmentation.synthetic``).
* ``lesions``: benign / malignant lesion folders for classification (``training.classification.lesions``).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path

Generator = Callable[[Path, int, int, int], list[Path]]

GENERATORS: dict[str, str] = {
    "dental": "training.segmentation.synthetic:generate_dental",
    "lesions": "training.classification.lesions:generate_lesions",
    "chest": "training.segmentation.synthetic:generate_chest",
}
# ``--size`` when not given: image height and width, or for ``chest`` the largest long side.
DEFAULT_SIZES: dict[str, int] = {"chest": 3000}
DEFAULT_SIZE = 256


def get_generator(kind: str) -> Generator:
    """The generator function registered for ``kind``."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown phantom kind {kind!r}; known: {sorted(GENERATORS)}")
    module_name, func_name = GENERATORS[kind].split(":")
    generator: Generator = getattr(importlib.import_module(module_name), func_name)
    return generator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=sorted(GENERATORS), help="which phantom to generate")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--n", type=int, default=40, help="number of images (per class for classification kinds; default 40)"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help=f"image height and width in pixels (default {DEFAULT_SIZE}); for chest the largest long side "
        f"(default {DEFAULT_SIZES['chest']})",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def main(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise SystemExit("--n must be >= 1")
    size = args.size or DEFAULT_SIZES.get(args.kind, DEFAULT_SIZE)
    paths = get_generator(args.kind)(args.out, args.n, size, args.seed)
    shape = f"long side up to {size}" if args.kind in DEFAULT_SIZES else f"{size}x{size}"
    print(f"wrote {len(paths)} {args.kind} phantom images ({shape}) to {args.out}")
    return 0
