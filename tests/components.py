"""Real components that tests start themselves (nginx, Orthanc, dcmtk, dicom3tools, PostgreSQL, Chromium).

A test whose component is absent skips with the reason on a developer's machine; under ``CI=true`` the same
test fails, so CI always runs it (``.ci/run`` installs the Debian packages when missing).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def missing(component: str, reason: str) -> NoReturn:
    """Skips (fails under ``CI=true``) a test that needs ``component``, saying why it is absent."""
    message = f"needs {component}: {reason}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: this test must run; .ci/run installs it)", pytrace=False)
    pytest.skip(message)


def find_program(name: str, *extra_dirs: str) -> str | None:
    """``name`` on PATH or in one of ``extra_dirs`` (Debian puts some servers in /usr/sbin or versioned dirs)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in (*extra_dirs, "/usr/sbin", "/usr/local/sbin"):
        for candidate in sorted(Path("/").glob(directory.lstrip("/") + "/" + name), reverse=True):
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def require_program(name: str, package: str, *extra_dirs: str) -> str:
    """The path of program ``name`` from Debian package ``package``, or skip/fail via ``missing``."""
    path = find_program(name, *extra_dirs)
    if path is None:
        missing(name, f"not installed (Debian package {package!r})")
    return path


def require_module(name: str, install: str) -> None:
    """Skips (fails under ``CI=true``) a test that needs the Python package ``name``; ``install`` says how."""
    import importlib

    try:
        importlib.import_module(name)
    except ImportError:
        missing(name, f"the Python package is not installed ({install})")
