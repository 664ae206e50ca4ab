"""Operator endpoints under ``/admin/`` (need an API key with the ``admin`` scope, see ``app.auth``).

``POST /admin/models/reload`` rescans the model directory at once (``ModelRegistry.rescan``): new and replaced
checkpoints are loaded and warmed up while the serving versions keep answering, removed ones retired; the answer
says what changed once the loads are over.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.routes import RegistryDep
from app.schemas import problem_responses

router = APIRouter(prefix="/admin", tags=["admin"])


class ReloadResponse(BaseModel):
    """What a rescan of the model directory changed (model names)."""

    added: list[str] = Field(description="new files, loaded and serving")
    replaced: list[str] = Field(description="changed files whose new version now serves")
    removed: list[str] = Field(
        description="files gone: no new requests; they stop once their queue is drained"
    )
    failed: list[str] = Field(
        description="new or changed files that could not be loaded (the previous version, if any, keeps "
        "serving; GET /models has the error)"
    )
    unchanged: list[str] = Field(description="files as they were at the previous scan")
    versions: dict[str, str | None] = Field(description="the serving version of each model after the scan")


@router.post(
    "/models/reload",
    summary="Rescan the model directory",
    response_model=ReloadResponse,
    responses={**problem_responses(503)},
)
async def reload_models(registry: RegistryDep) -> dict[str, Any]:
    """Loads new and replaced checkpoints (each warmed up before it takes traffic; requests already admitted
    finish on the version that admitted them) and retires removed ones, then answers what changed. A scan
    already running (the watcher's, every ``MEDSERVE_MODEL_POLL_S`` seconds) is waited for first."""
    report = await registry.rescan()
    return report.as_dict()
