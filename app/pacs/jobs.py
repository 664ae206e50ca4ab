"""The jobs API: pull a study from the archive, list and inspect jobs, retry and cancel them.

* ``POST /jobs`` ``{"study_instance_uid": ..., "series_instance_uid": optional}``: fetches the study (or one
  series) from ``MEDSERVE_PACS_URL`` (QIDO-RS + WADO-RS, ``app.pacs.pull``), accepts every instance like
  STOW-RS does and answers 201 with what became of each and the jobs made.
* ``GET /jobs/{id}``; ``GET /jobs?state=&study=&model=&limit=&cursor=``: by id, oldest first; ``next_cursor``
  (an opaque string) fetches the next page, null on the last.
* ``POST /jobs/{id}/retry``: a ``failed`` or ``cancelled`` job is queued again (attempts reset), if its
  instance is still in the spool.
* ``DELETE /jobs/{id}``: cancels a ``queued``, ``running`` or ``delivering`` job (a result already on its way
  may still arrive).

A job record: ``id``, ``state``, ``model``, ``model_version``, ``task``, ``study_instance_uid``,
``series_instance_uid``, ``sop_instance_uid``, ``sop_class_uid``, ``source``, ``created_at``, ``started_at``,
``finished_at``, ``next_attempt_at`` (ISO 8601 UTC), ``attempts`` (delivery attempts), ``reason``,
``result_sop_instance_uid``, ``result_kind``. Never a patient name, ID, date or any other tag value.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from app.errors import InvalidRequest
from app.pacs.problems import JobConflict, JobNotFound
from app.pacs.pull import pull_study
from app.pacs.store import CANCELLED, DELIVERING, FAILED, MAX_ID, QUEUED, RUNNING
from app.pacs.stow import pacs_of
from app.schemas import problem_responses

router = APIRouter(tags=["jobs"])

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
MAX_PAGE = 1000
StateName = Literal["queued", "running", "delivering", "done", "failed", "skipped", "cancelled"]
RETRYABLE = (FAILED, CANCELLED)
CANCELLABLE = (QUEUED, RUNNING, DELIVERING)
JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="the job's id")]


class PullRequest(BaseModel):
    study_instance_uid: str = Field(pattern=UID_PATTERN, max_length=64)
    series_instance_uid: str | None = Field(default=None, pattern=UID_PATTERN, max_length=64)


def _time(value: float | None) -> str | None:
    if value is None:
        return None
    return datetime.datetime.fromtimestamp(value, datetime.UTC).isoformat(timespec="milliseconds")


def job_view(row: dict[str, Any]) -> dict[str, Any]:
    """A job record as the API shows it."""
    return {
        "id": row["id"],
        "state": row["state"],
        "model": row["model"] or None,
        "model_version": row["model_version"] or None,
        "task": row["task"] or None,
        "study_instance_uid": row["study_instance_uid"],
        "series_instance_uid": row["series_instance_uid"],
        "sop_instance_uid": row["sop_instance_uid"],
        "sop_class_uid": row["sop_class_uid"],
        "source": row["source"],
        "created_at": _time(row["created_at"]),
        "started_at": _time(row["started_at"]),
        "finished_at": _time(row["finished_at"]),
        "next_attempt_at": _time(row["next_attempt_at"]) if row["state"] == DELIVERING else None,
        "attempts": row["attempts"],
        "reason": row["reason"],
        "result_sop_instance_uid": row["result_sop_instance_uid"],
        "result_kind": row["result_kind"],
    }


async def _job_or_404(request: Request, job_id: int) -> dict[str, Any]:
    row = await asyncio.to_thread(pacs_of(request).store.get, job_id)
    if row is None:
        raise JobNotFound(f"no job {job_id}")
    return row


@router.post(
    "/jobs",
    summary="Pull a study from the archive and make its jobs",
    status_code=201,
    responses=problem_responses(400, 404, 409, 413, 422, 502, 503, 507),
)
async def create_jobs(request: Request, body: PullRequest) -> JSONResponse:
    """Fetches the study (or the series) from `MEDSERVE_PACS_URL` by QIDO-RS and WADO-RS and accepts each
    instance as STOW-RS does; answers with each instance's outcome and its job ids."""
    pacs = pacs_of(request)
    results = await pull_study(pacs, body.study_instance_uid, body.series_instance_uid)
    instances = [
        {
            "sop_instance_uid": r.sop_instance_uid or None,
            "accepted": r.accepted,
            "duplicate": r.duplicate,
            "failure_reason": r.failure_reason,
            "detail": r.detail or None,
            "job_ids": r.job_ids,
        }
        for r in results
    ]
    job_ids = sorted({job for r in results for job in r.job_ids})
    return JSONResponse(
        {
            "study_instance_uid": body.study_instance_uid,
            "series_instance_uid": body.series_instance_uid,
            "instances": instances,
            "job_ids": job_ids,
        },
        status_code=201,
    )


@router.get("/jobs", summary="List jobs", responses=problem_responses(400, 422, 503))
async def list_jobs(
    request: Request,
    state: Annotated[StateName | None, Query(description="only jobs in this state")] = None,
    study: Annotated[str | None, Query(description="only jobs of this Study Instance UID")] = None,
    model: Annotated[str | None, Query(description="only jobs of this model")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="most jobs in the page")] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> JSONResponse:
    """Jobs, oldest first, a page at a time: `next_cursor` fetches the next page (null on the last)."""
    pacs = pacs_of(request)
    after = 0
    if cursor is not None:
        if not cursor.isdigit() or len(cursor) > 19 or int(cursor) > MAX_ID:
            raise InvalidRequest("cursor: not a cursor this service gave", extra={"errors": []})
        after = int(cursor)
    rows = await asyncio.to_thread(
        pacs.store.find, state=state, study=study, model=model, after=after, limit=limit + 1
    )
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = str(rows[-1]["id"]) if more and rows else None
    return JSONResponse({"jobs": [job_view(row) for row in rows], "next_cursor": next_cursor})


@router.get("/jobs/{job_id}", summary="One job", responses=problem_responses(400, 404, 422, 503))
async def get_job(request: Request, job_id: JobId) -> JSONResponse:
    return JSONResponse(job_view(await _job_or_404(request, job_id)))


@router.post(
    "/jobs/{job_id}/retry",
    summary="Queue a failed or cancelled job again",
    responses=problem_responses(400, 404, 409, 422, 503),
)
async def retry_job(request: Request, job_id: JobId) -> JSONResponse:
    """A `failed` or `cancelled` job goes back to `queued` (attempts reset), if its instance is still spooled
    (keep it longer with MEDSERVE_SPOOL_RETENTION_S, or send the instance again)."""
    pacs = pacs_of(request)
    row = await _job_or_404(request, job_id)
    if row["state"] not in RETRYABLE or not row["model"]:
        raise JobConflict(
            f"job {job_id} is {row['state']}: only failed or cancelled jobs of a model are retried"
        )
    if not await asyncio.to_thread(pacs.store.instance_spooled, job_id):
        raise JobConflict(
            f"the instance of job {job_id} is no longer in the spool; send it again (MEDSERVE_SPOOL_RETENTION_S "
            "keeps instances longer)"
        )
    if not await asyncio.to_thread(pacs.store.requeue, job_id, RETRYABLE):
        raise JobConflict(f"job {job_id} changed state meanwhile; GET it again")
    pacs.worker.wake()
    return JSONResponse(job_view(await _job_or_404(request, job_id)))


@router.delete("/jobs/{job_id}", summary="Cancel a job", responses=problem_responses(400, 404, 409, 422, 503))
async def cancel_job(request: Request, job_id: JobId) -> JSONResponse:
    """Cancels a `queued`, `running` or `delivering` job; finished jobs answer 409."""
    pacs = pacs_of(request)
    row = await _job_or_404(request, job_id)
    if row["state"] not in CANCELLABLE or not await asyncio.to_thread(pacs.store.cancel, job_id, CANCELLABLE):
        raise JobConflict(
            f"job {job_id} is {row['state']}: only queued, running or delivering jobs are cancelled"
        )
    return JSONResponse(job_view(await _job_or_404(request, job_id)))
