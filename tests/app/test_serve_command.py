"""`medserve serve`: what it hands to uvicorn (workers, graceful-shutdown bound, logging), without serving."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from app.cli import add_arguments
from app.cli import main as serve_main
from app.logs import ServiceLogHandler


@pytest.fixture
def uvicorn_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Any, dict[str, Any]]]]:
    """Records uvicorn.run's arguments instead of serving; restores the environment and logging after."""
    import uvicorn

    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    monkeypatch.setattr(os, "environ", dict(os.environ))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield calls
    for handler in list(root.handlers):
        if isinstance(handler, ServiceLogHandler):
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_one_worker_serves_the_app_with_a_bounded_graceful_shutdown(
    tmp_path: Path, uvicorn_calls: list[tuple[Any, dict[str, Any]]]
) -> None:
    os.environ["MEDSERVE_SHUTDOWN_TIMEOUT_S"] = "12.5"
    assert serve_main(parse("--model-dir", str(tmp_path), "--port", "8123")) == 0
    ((app, kwargs),) = uvicorn_calls
    assert isinstance(app, FastAPI)
    assert kwargs["timeout_graceful_shutdown"] == 13  # whole seconds, rounded up
    assert kwargs["port"] == 8123 and kwargs["host"] == "127.0.0.1"
    # The service writes its own access line and configures logging for the whole process.
    assert kwargs["access_log"] is False and kwargs["log_config"] is None
    assert any(isinstance(h, ServiceLogHandler) for h in logging.getLogger().handlers)


def test_several_workers_get_the_flags_through_the_environment(
    tmp_path: Path, uvicorn_calls: list[tuple[Any, dict[str, Any]]]
) -> None:
    argv = ["--model-dir", str(tmp_path), "--workers", "3", "--max-batch-size", "4", "--no-access-log"]
    assert serve_main(parse(*argv, "--shutdown-timeout", "40")) == 0
    ((app, kwargs),) = uvicorn_calls
    # Worker processes build the app themselves, from the environment the flags were written to.
    assert app == "app.main:app" and kwargs["workers"] == 3
    assert kwargs["timeout_graceful_shutdown"] == 40
    assert os.environ["MEDSERVE_MODEL_DIR"] == str(tmp_path)
    assert os.environ["MEDSERVE_MAX_BATCH_SIZE"] == "4"
    assert os.environ["MEDSERVE_ACCESS_LOG"] == "false"
    from app.settings import load_settings

    inherited = load_settings()
    assert inherited.model_dir == tmp_path and inherited.max_batch_size == 4 and not inherited.access_log


def test_logs_of_the_serve_command_are_json(
    tmp_path: Path, uvicorn_calls: list[tuple[Any, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    assert serve_main(parse("--model-dir", str(tmp_path))) == 0
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    record = json.loads(stream.getvalue().splitlines()[-1])
    assert record["logger"] == "uvicorn.error" and record["message"] == "Started server process [42]"
    assert record["request_id"] is None


def test_invalid_workers_setting_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main(parse("--model-dir", str(tmp_path), "--workers", "0")) == 2
    assert "MEDSERVE_WORKERS" in capsys.readouterr().err
