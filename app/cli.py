"""`medserve serve`: runs the inference service with uvicorn.

Flags override the matching ``MEDSERVE_*`` environment variables; every other setting is read from the
environment (see ``app.settings``). Invalid settings are reported in one message and exit with status 2.

``--workers N`` runs N uvicorn worker processes sharing the port; each loads its own copy of every model and
has its own batchers (memory grows with N; see docs/reliability.md). On SIGTERM uvicorn stops accepting
connections, lets accepted requests finish within ``MEDSERVE_SHUTDOWN_TIMEOUT_S``, then the lifespan drains the
batchers; the exit status is 0.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path
from types import FrameType
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
        default=None,
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (default: $MEDSERVE_LOG_LEVEL or info)",
    )
    parser.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes, each with its own copy of the models and its own batchers "
        "(default: $MEDSERVE_WORKERS or 1)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=None,
        help="on SIGTERM, seconds to let accepted requests finish (default: $MEDSERVE_SHUTDOWN_TIMEOUT_S or 25)",
    )


def _after_graceful_shutdown(signum: int, frame: FrameType | None) -> None:
    """Receives the stop signal uvicorn re-raises after its graceful shutdown: nothing is left to do."""


def main(args: argparse.Namespace) -> int:
    from app.settings import SettingsError, check_runtime, env_name, load_settings

    overrides: dict[str, Any] = {}
    for flag, field in (
        ("model_dir", "model_dir"),
        ("device", "device"),
        ("max_batch_size", "max_batch_size"),
        ("log_level", "log_level"),
        ("workers", "workers"),
        ("shutdown_timeout", "shutdown_timeout_s"),
    ):
        if getattr(args, flag, None) is not None:
            overrides[field] = getattr(args, flag)
    if getattr(args, "no_access_log", False):
        overrides["access_log"] = False
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

    from app.logs import configure_logging

    # The whole process logs through the service's handler (JSON by default), uvicorn's own lines included.
    configure_logging(settings.log_format, settings.log_level, whole_process=True)
    common: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_config": None,
        "log_level": settings.log_level,
        "access_log": False,  # the service writes its own access line (request id, model, no client data)
        # SIGTERM: stop accepting, let accepted requests finish for at most this long, then the lifespan runs
        # what the batchers still hold; uvicorn cancels whatever is left after the timeout.
        "timeout_graceful_shutdown": math.ceil(settings.shutdown_timeout_s),
    }
    if settings.workers == 1:
        from app.main import create_app  # here only: a supervisor of several workers needs no torch

        # uvicorn handles SIGTERM/SIGINT while it serves, then re-raises the signal once it has shut down
        # gracefully; by then everything accepted was answered, so the re-raised signal is ignored and the
        # command exits with status 0 (an orchestrator reads that as a clean stop).
        previous = {
            sig: signal.signal(sig, _after_graceful_shutdown) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            uvicorn.run(create_app(settings), **common)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0
    # Each worker is a fresh process that builds the app from the environment: pass the flags on that way.
    for field, value in overrides.items():
        os.environ[env_name(field)] = str(value).lower() if isinstance(value, bool) else str(value)
    uvicorn.run("app.main:app", workers=settings.workers, **common)
    return 0
