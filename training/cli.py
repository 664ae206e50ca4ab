"""The `medserve` console command.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int | None``;
this file only wires them together, importing a module when its subcommand is chosen.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

# (command words, module, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("train", "segment"), "training.segmentation.train", "train a U-Net on DIR/images + DIR/masks"),
    (("train", "classify"), "training.classification.train", "fine-tune a CNN classifier on DIR/<class>/*"),
    (
        ("eval", "segment"),
        "training.segmentation.evaluate",
        "evaluate a segmentation model against classical baselines",
    ),
    (
        ("eval", "classify"),
        "training.classification.evaluate",
        "evaluate a classifier against classical baselines",
    ),
    (("synth",), "training.synth", "generate the synthetic phantom data sets"),
    (("demo",), "training.demo", "build demo checkpoints on synthetic data if none exist"),
    (("serve",), "app.cli", "start the inference service"),
    (("export",), "training.export", "export a checkpoint to ONNX or TorchScript"),
    (("info",), "training.info", "print a checkpoint's metadata"),
    (
        ("calibrate-ood",),
        "training.calibrate_ood",
        "add out-of-distribution statistics to a checkpoint (a new version)",
    ),
]


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medserve", description="Train and serve medical imaging models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, Any] = {}  # command word -> its sub-parsers (argparse has no public type for them)
    for words, module, help_text in COMMANDS:
        if len(words) == 1:
            cmd = sub.add_parser(words[0], help=help_text, description=help_text)
        else:
            if words[0] not in groups:
                group = sub.add_parser(words[0], help=f"{words[0]} a model (segment | classify)")
                groups[words[0]] = group.add_subparsers(dest="task", required=True, metavar="TASK")
            cmd = groups[words[0]].add_parser(words[1], help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
        # Only the chosen subcommand's module is imported (imports of torch etc. are slow).
        if _chosen(words, argv):
            importlib.import_module(module).add_arguments(cmd)
    return parser


def _chosen(words: tuple[str, ...], argv: Sequence[str]) -> bool:
    positional = [a for a in argv if not a.startswith("-")]
    return tuple(positional[: len(words)]) == words


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result = importlib.import_module(args._module).main(args)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
