"""`medserve serve`: runs the inference service with uvicorn.

Flags override the matching ``MEDSERVE_*`` environment variables; every other setting is read from the
environment (see ``app.settings``). Invalid settings are reported in one message and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="checkpoint directory (default: $MEDSERVE_MODEL_DIR or checkpoints)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument(
        "--device", default=None, help="auto, cpu, cuda or cuda:N (default: $MEDSERVE_DEVICE or auto)"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="most requests per batch (default: $MEDSERVE_MAX_BATCH_SIZE)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level (default info)",
    )
    parser.add_argument("--no-access-log", action="store_true", help="do not log one line per request")


def main(args: argparse.Namespace) -> int:
    from app.settings import SettingsError, check_runtime, load_settings

    overrides: dict[str, Any] = {}
    if args.model_dir is not None:
        overrides["model_dir"] = args.model_dir
    if args.device is not None:
        overrides["device"] = args.device
    if args.max_batch_size is not None:
        overrides["max_batch_size"] = args.max_batch_size
    try:
        settings = load_settings(**overrides)
        check_runtime(settings)
    except SettingsError as exc:
        print(f"medserve serve: {exc}", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"medserve serve: --port must be in 1..65535, got {args.port}", file=sys.stderr)
        return 2

    import uvicorn

    from app.main import create_app

    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=not args.no_access_log,
    )
    return 0
