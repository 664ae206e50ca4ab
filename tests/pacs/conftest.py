"""Fixtures of the PACS tests."""

from __future__ import annotations

import pytest

from tests.components import require_program


@pytest.fixture
def dcmtk() -> dict[str, str]:
    """dcmtk's DICOM clients (a skip, or a failure under ``CI=true``, where dcmtk is absent)."""
    return {
        "echoscu": require_program("echoscu", "dcmtk"),
        "storescu": require_program("storescu", "dcmtk"),
    }
