"""`medserve export --model PATH --format onnx|torchscript --out FILE`: a checkpoint for Triton / ONNX Runtime.

Writes FILE and FILE.json (the checkpoint's metadata: classes, preprocessing, version, plus the exported
tensors' names and shapes), after checking that the exported model gives the PyTorch model's outputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.checkpoint import CheckpointError
from models.export import FORMATS, ExportError, export_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, type=Path, metavar="PATH", help="MedServe checkpoint (*.pt)"
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="export format")
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="FILE",
        help="file to write (e.g. model.onnx, or model.pt for Triton's PyTorch backend); FILE.json is "
        "written beside it",
    )
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument(
        "--atol", type=float, default=1e-4, help="absolute tolerance of the check against PyTorch"
    )
    parser.add_argument(
        "--rtol", type=float, default=1e-3, help="relative tolerance of the check against PyTorch"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip running the export and comparing with PyTorch"
    )


def main(args: argparse.Namespace) -> int:
    if args.out.resolve() == args.model.resolve():
        print("error: --out must differ from --model", file=sys.stderr)
        return 2
    try:
        result = export_checkpoint(
            args.model,
            args.out,
            args.format,
            opset=args.opset,
            verify=not args.no_verify,
            atol=args.atol,
            rtol=args.rtol,
        )
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    export = result.sidecar["export"]
    size_mb = result.path.stat().st_size / 1e6
    shape = export["inputs"][0]["shape"]
    print(f"wrote {result.path} ({result.format}, {size_mb:.1f} MB, input {_shape_text(shape)})")
    print(f"wrote {result.metadata_path} (classes, preprocessing, version {result.sidecar['version']})")
    check = export["verification"]
    if check.get("checked"):
        print(
            f"checked against PyTorch on shapes {check['shapes']}: max |diff| = {check['max_abs_diff']:.2e}"
        )
    else:
        print(f"not checked against PyTorch: {check.get('reason')}")
    return 0


def _shape_text(shape: list[int | str]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
