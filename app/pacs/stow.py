"""DICOMweb STOW-RS (PS3.18 10.5): ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{StudyInstanceUID}``.

The body is ``multipart/related; type="application/dicom"``, one DICOM Part 10 instance per part. It is parsed
as it streams in (python-multipart's ``MultipartParser``); then all parts go to the intake together (``Intake.accept_many``:
each checked and spooled durably, then one flush of the spool folder and one database transaction records them
with their jobs), so the response is sent only once every accepted instance is safe on disk and in the store.

The response is ``application/dicom+json`` (pydicom's ``Dataset.to_json_dict``): ``ReferencedSOPSequence``
(0008,1199) lists the accepted instances (ReferencedSOPClassUID, ReferencedSOPInstanceUID),
``FailedSOPSequence`` (0008,1198) the refused ones with ``FailureReason`` (0008,1197): 0xC000 (not DICOM,
truncated, no UIDs), 0xA900 (another study than the URL names), 0xA700 (the spool is full), 0x0110 (the store
failed). Status: 200 when every instance was accepted, 202 when some were, 409 when none was; 507
(problem+json ``spool-full``) when none was because the spool is full. An instance sent again is accepted again
(its jobs are not repeated). A multi-frame instance or one of an unsupported transfer syntax is accepted: its
job fails with the reason (see ``GET /jobs``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydicom.dataset import Dataset
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from app.errors import BadRequest, NotReady, Problem, UnsupportedMediaType, retry_after
from app.pacs.intake import OUT_OF_RESOURCES, AcceptResult, IntakeUnavailable
from app.pacs.problems import JobsDisabled, SpoolFullProblem
from app.pacs.service import PacsService
from app.schemas import problem_responses

DICOM_JSON = "application/dicom+json"
DICOM = "application/dicom"

router = APIRouter()


def pacs_of(request: Request) -> PacsService:
    """The job system of the app; 503 ``not-ready`` before the lifespan ran, ``jobs-disabled`` when it is off."""
    state = request.app.state
    if getattr(state, "settings", None) is None:
        raise NotReady("the service is starting", headers=retry_after(5))
    pacs = getattr(state, "pacs", None)
    if pacs is None:
        raise JobsDisabled("the job system is off on this service; see the service log")
    return cast(PacsService, pacs)


def _boundary(request: Request) -> bytes:
    header = request.headers.get("content-type", "")
    media_type, options = parse_options_header(header)
    kind = options.get(b"type", b"").decode("latin-1").strip('"').lower()
    if media_type.lower() != b"multipart/related" or kind != DICOM:
        raise UnsupportedMediaType(
            'STOW-RS takes multipart/related; type="application/dicom" (one DICOM Part 10 instance per part)'
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadRequest("the multipart/related content type has no boundary")
    return boundary


async def read_parts(request: Request, on_part: Callable[[bytes, str], Awaitable[None]]) -> int:
    """Streams the multipart/related body, calling ``on_part(data, content_type)`` for each part in order.

    Returns the number of parts.

    Raises:
        BadRequest: a broken multipart body (no closing boundary, malformed headers).
    """
    boundary = _boundary(request)
    finished: list[tuple[bytes, str]] = []
    current = bytearray()
    headers: dict[str, str] = {}
    field: list[bytes] = []
    value: list[bytes] = []
    ended = False

    def on_part_begin() -> None:
        current.clear()
        headers.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current.extend(data[start:end])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.append(data[start:end])

    def on_header_end() -> None:
        headers[b"".join(field).decode("latin-1").lower()] = b"".join(value).decode("latin-1")
        field.clear()
        value.clear()

    def on_part_end() -> None:
        finished.append((bytes(current), headers.get("content-type", "")))
        current.clear()

    def on_end() -> None:
        nonlocal ended
        ended = True

    callbacks: dict[str, Any] = {
        "on_part_begin": on_part_begin,
        "on_part_data": on_part_data,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_end": on_part_end,
        "on_end": on_end,
    }
    parser = MultipartParser(boundary, cast(Any, callbacks))
    count = 0
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            while finished:
                data, content_type = finished.pop(0)
                count += 1
                await on_part(data, content_type)
        parser.finalize()
    except (Problem, ClientDisconnect):  # the size limit, a disconnect, the intake's own answers
        raise
    except Exception as exc:  # python-multipart's parse errors
        raise BadRequest("the multipart/related body is malformed") from exc
    for data, content_type in finished:
        count += 1
        await on_part(data, content_type)
    if not ended:
        raise BadRequest("the multipart/related body ends before its closing boundary")
    return count


def stow_response(results: list[AcceptResult]) -> Response:
    """The PS3.18 STOW-RS response for the instances' outcomes (200, 202 or 409)."""
    response = Dataset()
    accepted = [r for r in results if r.accepted]
    failed = [r for r in results if not r.accepted]
    if accepted:
        items = []
        for result in accepted:
            item = Dataset()
            item.ReferencedSOPClassUID = result.sop_class_uid
            item.ReferencedSOPInstanceUID = result.sop_instance_uid
            items.append(item)
        response.ReferencedSOPSequence = items
    if failed:
        items = []
        for result in failed:
            item = Dataset()
            item.ReferencedSOPClassUID = result.sop_class_uid
            item.ReferencedSOPInstanceUID = result.sop_instance_uid
            item.FailureReason = result.failure_reason
            items.append(item)
        response.FailedSOPSequence = items
    status = 200 if not failed else 202 if accepted else 409
    return Response(json.dumps(response.to_json_dict()), status_code=status, media_type=DICOM_JSON)


async def store_instances(request: Request, study_instance_uid: str | None) -> Response:
    pacs = pacs_of(request)
    parts: list[tuple[bytes, str]] = []

    async def on_part(data: bytes, content_type: str) -> None:
        parts.append((data, content_type.split(";")[0].strip().lower()))

    count = await read_parts(request, on_part)
    if count == 0:
        raise BadRequest("the multipart/related body holds no instance")
    results: list[AcceptResult] = [
        AcceptResult(False, failure_reason=0xC000, detail=f"a {declared} part is not DICOM")
        for _, declared in parts
    ]
    dicom = [
        i for i, (_, declared) in enumerate(parts) if declared in ("", DICOM, "application/octet-stream")
    ]
    for _ in range(len(parts) - len(dicom)):
        pacs.metrics.observe_received("stow", "refused")
    try:  # all parts in one go: one flush of the spool folder and one database commit for the request
        accepted = await pacs.intake.accept_many_async(
            [parts[i][0] for i in dicom], "stow", study_instance_uid=study_instance_uid
        )
    except IntakeUnavailable as exc:
        raise NotReady(str(exc), headers=retry_after(5)) from exc
    for index, result in zip(dicom, accepted, strict=True):
        results[index] = result
    if not any(r.accepted for r in results) and any(r.failure_reason == OUT_OF_RESOURCES for r in results):
        raise SpoolFullProblem(
            "the spool has no room for these instances (MEDSERVE_SPOOL_DIR / MEDSERVE_SPOOL_MAX_BYTES); "
            "nothing was kept: retry later"
        )
    return stow_response(results)


STOW_CONTENT = {DICOM_JSON: {"schema": {"type": "object"}}}
STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every instance was stored", "content": STOW_CONTENT},
    202: {
        "description": "some instances were stored; FailedSOPSequence lists the others",
        "content": STOW_CONTENT,
    },
    409: {"description": "no instance was stored; FailedSOPSequence says why", "content": STOW_CONTENT},
    **problem_responses(400, 413, 415, 422, 503, 507),
}


@router.post(
    "/dicomweb/studies",
    summary="Store instances (STOW-RS)",
    response_class=Response,
    responses=STOW_RESPONSES,
    tags=["dicomweb"],
)
async def stow(request: Request) -> Response:
    """DICOM instances as `multipart/related; type="application/dicom"`: each is stored durably and queued as
    jobs (one per model its routing rule names) before the answer, `application/dicom+json` with
    ReferencedSOPSequence and FailedSOPSequence (PS3.18)."""
    return await store_instances(request, None)


@router.post(
    "/dicomweb/studies/{study_instance_uid}",
    summary="Store instances of one study (STOW-RS)",
    response_class=Response,
    responses=STOW_RESPONSES,
    tags=["dicomweb"],
)
async def stow_study(request: Request, study_instance_uid: str) -> Response:
    """As `POST /dicomweb/studies`, for instances of this study only: an instance of another study fails alone
    (FailureReason 0xA900)."""
    return await store_instances(request, study_instance_uid)
