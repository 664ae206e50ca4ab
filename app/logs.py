"""Structured logs: one JSON object per line (python-json-logger), each with the request id of its request.

``configure_logging`` installs one handler on the root logger, writing to stderr, as JSON (default) or text
(``MEDSERVE_LOG_FORMAT``), at ``MEDSERVE_LOG_LEVEL``. Every record gets a ``request_id`` field: the id of the
request being served on this task (``CURRENT_REQUEST``, set by ``app.middleware.RequestContext``), or null outside
a request. ``medserve serve`` also routes uvicorn's own loggers through it, so the whole process logs JSON.

What is logged, and what never is: method, route, status, duration, model name, request id, problem types and
ids, and model errors with their stack trace. Never pixel data, never request bodies or headers (so never an
API key), never client file names or the details of problems (they may quote them), never DICOM tag values
(``models.dicom`` withholds pydicom's messages; ``install_privacy_guards`` makes sure that is in force).
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from typing import IO, Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["json", "text"]


@dataclass
class RequestInfo:
    """What the logs and metrics know of the request being served: its id and, once resolved, its model."""

    request_id: str
    model: str | None = None


# Set by the request middleware for the request's task; the routes' code runs in that context.
CURRENT_REQUEST: ContextVar[RequestInfo | None] = ContextVar("medserve_request", default=None)


def note_model(name: str) -> None:
    """Records the model serving the current request (a served checkpoint's name; no-op outside a request)."""
    info = CURRENT_REQUEST.get()
    if info is not None:
        info.model = name


# The loggers uvicorn writes to; ``medserve serve`` sends them through the service's handler.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the current request's id, or None) to every record passing the handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            info = CURRENT_REQUEST.get()
            record.request_id = info.request_id if info is not None else None
        return True


class ServiceLogHandler(logging.StreamHandler[IO[str]]):
    """The service's handler (a marker class, so that configuring twice replaces instead of duplicating)."""


def make_formatter(fmt: LogFormat) -> logging.Formatter:
    """JSON: ``{"time", "level", "logger", "message", "request_id", ...extra fields}``; or one text line."""
    if fmt == "json":
        return JsonFormatter(
            ["asctime", "levelname", "name", "message", "request_id"],
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            # uvicorn adds a copy of its message with terminal colour codes: not for a log pipeline.
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
            datefmt="%Y-%m-%dT%H:%M:%S%z",
        )
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format must be 'json' or 'text', got {fmt!r}")


def install_privacy_guards() -> None:
    """Imports ``models.dicom``, whose import withholds pydicom's log messages (they may quote tag values)."""
    from models import dicom

    dicom.install_privacy_guards()


def configure_logging(
    fmt: LogFormat = "json",
    level: str = "info",
    *,
    stream: IO[str] | None = None,
    whole_process: bool = False,
    only_if_unconfigured: bool = False,
) -> bool:
    """Installs the service's log handler on the root logger (idempotent: a second call replaces it).

    Args:
        fmt: ``json`` or ``text``.
        level: level name for the root logger (``debug``, ``info``, ...).
        stream: where to write (default: stderr).
        whole_process: the process is the service's (``medserve serve``): drop every other root handler,
            route uvicorn's loggers and Python warnings through this handler, so that every line is JSON.
        only_if_unconfigured: leave logging alone when the root logger already has handlers that are not
            the service's (someone else, e.g. a test runner or uvicorn's ``--log-config``, configured it).

    Returns:
        whether the handler was installed.

    Raises:
        ValueError: for an unknown format or level.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    formatter = make_formatter(fmt)
    install_privacy_guards()
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, ServiceLogHandler)]
    if only_if_unconfigured and not whole_process and len(ours) < len(root.handlers):
        return False
    for handler in list(root.handlers):
        if whole_process or isinstance(handler, ServiceLogHandler):
            root.removeHandler(handler)
    handler = ServiceLogHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())
    root.addHandler(handler)
    root.setLevel(numeric)
    if whole_process:
        for name in UVICORN_LOGGERS:
            uvicorn_logger = logging.getLogger(name)
            uvicorn_logger.handlers.clear()
            uvicorn_logger.propagate = True
            uvicorn_logger.setLevel(logging.NOTSET)
        logging.captureWarnings(True)
    return True
