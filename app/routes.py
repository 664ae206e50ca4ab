"""HTTP endpoints. They read requests, pick the model and hand work to the runner and batcher; no torch here.

Per request: resolve the model -> take a place in its batcher (503 at once when full) -> read the upload ->
decode + preprocess in the thread pool -> submit to the batcher and wait (dropped if the client goes away)
-> encode the result in the thread pool -> respond.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Annotated, Any, Literal, TypeVar, cast

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from app.errors import (
    PROBLEM_BASE,
    PROBLEM_TYPES,
    ClientDisconnected,
    NotFound,
    NotReady,
    UnprocessableImage,
    UnsupportedMediaType,
    from_image_error,
    retry_after,
)
from app.registry import ModelHandle, ModelRegistry
from app.runners import (
    ClassificationInput,
    ClassificationRunner,
    ImageUpload,
    SegmentationInput,
    SegmentationRunner,
)
from app.schemas import (
    ClassifyResponse,
    Health,
    ModelsResponse,
    ProblemType,
    SegmentSummary,
    image_request_body,
    problem_responses,
)
from app.settings import Settings
from app.uploads import read_uploads
from models.dicom_seg import SEG_MEDIA_TYPE, DicomSegError
from models.imageio import ImageError

T = TypeVar("T")

router = APIRouter()

# Largest number of probabilities (images x classes) a /classify answer serialises on the event loop.
INLINE_ENCODE_MAX_VALUES = 256


def _state(request: Request, name: str) -> Any:
    value = getattr(request.app.state, name, None)
    if value is None:  # the lifespan has not run (yet)
        raise NotReady("the service is starting", headers=retry_after(5))
    return value


# The dependencies are coroutines on purpose: FastAPI runs a plain `def` dependency in a worker thread, and
# three thread round trips per request (for reading app.state) cost a lone request about a millisecond.
async def get_settings(request: Request) -> Settings:
    return cast(Settings, _state(request, "settings"))


async def get_registry(request: Request) -> ModelRegistry:
    return cast(ModelRegistry, _state(request, "registry"))


async def get_pool(request: Request) -> Executor:
    return cast(Executor, _state(request, "pool"))


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
PoolDep = Annotated[Executor, Depends(get_pool)]
ModelQuery = Annotated[
    str | None,
    Query(
        description="model name (checkpoint file stem, see GET /models); optional when one model of the "
        "task is served",
        examples=["unet"],
    ),
]
SegmentFormat = Literal["png", "overlay", "json", "dicom-seg"]


async def in_pool(pool: Executor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Runs blocking work (decoding, encoding) in the thread pool, off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args, **kwargs))


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (or arrives when the response is done).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Awaits ``awaitable`` unless the client disconnects first; then it is cancelled (dropped if queued)."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
    if work.cancelled():
        raise ClientDisconnected("the client closed the connection; the request was dropped")
    return work.result()


def _model_headers(handle: ModelHandle) -> dict[str, str]:
    runner = handle.runner
    assert runner is not None
    return {"X-Model-Name": handle.name, "X-Model-Version": runner.version}


def _image_responses(ok: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of an image endpoint: ``ok`` (what a 200 carries) with the headers naming the model,
    and the problems any image request can meet."""
    return {
        200: {
            **ok,
            "headers": {
                "X-Model-Name": {"description": "model that answered", "schema": {"type": "string"}},
                "X-Model-Version": {
                    "description": "its version (content hash)",
                    "schema": {"type": "string"},
                },
            },
        },
        **problem_responses(400, 404, 413, 415, 422, 500, 503, 504),
    }


SEGMENT_DESCRIPTION = """Segments one image and returns the mask at the image's original size.

Send the image as multipart field `file` (`curl -F file=@scan.png`) or as the raw body with its content type
(`curl --data-binary @scan.png -H 'Content-Type: image/png'`). PNG, JPEG, TIFF, BMP and DICOM are read.

* `format=png` (default): single-channel 8-bit PNG: 0/255 for a binary model, the class index otherwise.
* `format=overlay`: RGB PNG of the image with the mask drawn over it in colour.
* `format=json`: per-class area, bounding box and connected components; for DICOM input also `dicom`, the
  request's Study/Series/SOP Instance UIDs (never patient data).
* `format=dicom-seg` (DICOM input only; other input: 415): a DICOM Segmentation object (`application/dicom`)
  in the source's study, referencing the source series and instance, one segment per foreground class named
  after it.

Headers `X-Model-Name` and `X-Model-Version` name the model that answered.
"""


@router.post(
    "/segment",
    summary="Segment an image",
    description=SEGMENT_DESCRIPTION,
    response_class=Response,
    responses=_image_responses(
        {
            "description": "the mask (PNG), the overlay (PNG), the summary (JSON) or a DICOM SEG",
            "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                SEG_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
                "application/json": {
                    "schema": SegmentSummary.model_json_schema(),
                    "example": {
                        "model": "unet",
                        "version": "3f2a9c0d1e4b5a67",
                        "width": 512,
                        "height": 480,
                        "classes": [
                            {
                                "index": 0,
                                "name": "background",
                                "pixels": 239104,
                                "fraction": 0.973,
                                "bbox": {"x": 0, "y": 0, "width": 512, "height": 480},
                                "components": 1,
                            },
                            {
                                "index": 1,
                                "name": "lesion",
                                "pixels": 6656,
                                "fraction": 0.027,
                                "bbox": {"x": 200, "y": 180, "width": 90, "height": 84},
                                "components": 1,
                            },
                        ],
                    },
                },
            },
        }
    ),
    openapi_extra=image_request_body(multiple=False),
)
async def segment(
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    pool: PoolDep,
    model: ModelQuery = None,
    fmt: Annotated[
        SegmentFormat,
        Query(
            alias="format",
            description="png (mask), overlay (RGB PNG), json (summary) or dicom-seg (DICOM SEG; DICOM input)",
        ),
    ] = "png",
) -> Response:
    handle = registry.resolve("segmentation", model)
    runner = cast(SegmentationRunner, handle.runner)
    assert handle.batcher is not None
    with handle.batcher.reserve() as reservation:
        uploads = await read_uploads(request, max_files=1)
        item = await in_pool(
            pool,
            runner.decode,
            uploads[0],
            max_pixels=settings.max_pixels,
            keep_pixels=fmt == "overlay",
            keep_source=fmt == "dicom-seg",
        )
        if fmt == "dicom-seg":
            _check_seg_source(runner, item)
        probs = await until_disconnected(request, reservation.submit(item))
    try:
        encoded = await in_pool(pool, runner.encode, item, probs, fmt)
    except DicomSegError as exc:
        raise UnprocessableImage(str(exc)) from exc
    return Response(encoded.body, media_type=encoded.media_type, headers=_model_headers(handle))


def _check_seg_source(runner: SegmentationRunner, item: SegmentationInput) -> None:
    """Refuses ``format=dicom-seg`` before the model runs: non-DICOM input 415, unusable DICOM 422."""
    if item.source is None:
        raise UnsupportedMediaType(
            "format=dicom-seg writes a DICOM Segmentation, which must reference a DICOM source image; "
            f"this request sent a {item.source_format or 'non-DICOM'} image. Send DICOM "
            "(application/dicom or a .dcm file) or use format=png, overlay or json"
        )
    try:
        runner.check_seg_source(item)
    except DicomSegError as exc:
        raise UnprocessableImage(str(exc)) from exc


CLASSIFY_DESCRIPTION = """Classifies one or more images.

Send each image as a multipart field `file` (repeat the field for several: `curl -F file=@a.png -F file=@b.png`)
or one image as the raw body with its content type. Predictions come in the order of the files; each lists
the most probable label and the class probabilities (softmax of the calibrated logits; all classes sum to 1,
`top_k` lists only the best K), and for DICOM input `dicom`: its Study/Series/SOP Instance UIDs (never patient
data). If any image cannot be read, the whole request fails with the status of that
image's problem (400 for an unreadable file) and the detail names the file; no other request is affected.
"""


@router.post(
    "/classify",
    summary="Classify images",
    description=CLASSIFY_DESCRIPTION,
    response_model=ClassifyResponse,
    responses=_image_responses(
        {
            "content": {
                "application/json": {
                    "example": {
                        "model": "classifier",
                        "version": "9d1e0f2a3b4c5d6e",
                        "predictions": [
                            {
                                "filename": "lesion-17.png",
                                "label": "malignant",
                                "probabilities": {"malignant": 0.91, "benign": 0.09},
                            }
                        ],
                    }
                }
            },
        }
    ),
    openapi_extra=image_request_body(multiple=True),
)
async def classify(
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    pool: PoolDep,
    model: ModelQuery = None,
    top_k: Annotated[int | None, Query(ge=1, description="list only the K most probable classes")] = None,
) -> Response:
    handle = registry.resolve("classification", model)
    runner = cast(ClassificationRunner, handle.runner)
    batcher = handle.batcher
    assert batcher is not None
    with contextlib.ExitStack() as places:
        # One place per image: the first before the body is read, the others once their number is known.
        reservations = [places.enter_context(batcher.reserve())]
        uploads = await read_uploads(request, max_files=settings.max_files)
        reservations += [places.enter_context(batcher.reserve()) for _ in uploads[1:]]
        items = await asyncio.gather(
            *(
                _decode_named(pool, runner, upload, index, settings.max_pixels)
                for index, upload in enumerate(uploads)
            ),
            return_exceptions=True,
        )
        for item in items:
            if isinstance(item, BaseException):
                raise item  # the first bad file, in upload order
        identifiers = [cast(ClassificationInput, item).dicom_uids for item in items]
        submitted = asyncio.gather(
            *(reservation.submit(item) for reservation, item in zip(reservations, items, strict=True)),
            return_exceptions=True,
        )
        outputs = await until_disconnected(request, submitted)
    for output in outputs:
        if isinstance(output, BaseException):
            raise output  # e.g. a timeout: the first in upload order
    results: list[Any] = list(outputs)

    def encode() -> bytes:
        predictions = [
            runner.encode(probs, upload.filename, top_k, dicom)
            for probs, upload, dicom in zip(results, uploads, identifiers, strict=True)
        ]
        return json.dumps(
            {"model": handle.name, "version": runner.version, "predictions": predictions}
        ).encode()

    # Returned as is (the response model documents it; no second validation). A few probabilities serialise in
    # microseconds, less than a thread round trip; long class lists go to the pool, off the event loop.
    small = len(results) * len(runner.classes) <= INLINE_ENCODE_MAX_VALUES
    body = encode() if small else await in_pool(pool, encode)
    return Response(body, media_type="application/json", headers=_model_headers(handle))


async def _decode_named(
    pool: Executor, runner: ClassificationRunner, upload: ImageUpload, index: int, max_pixels: int
) -> Any:
    """Decodes one of several files; a failure names the file (position and name) in the problem detail."""
    try:
        return await in_pool(pool, runner.decode, upload, max_pixels=max_pixels)
    except ImageError as exc:
        name = f" ({upload.filename})" if upload.filename else ""
        raise from_image_error(exc, prefix=f"file {index + 1}{name}: ") from exc


@router.get("/models", summary="Served models", response_model=ModelsResponse)
async def list_models(registry: RegistryDep) -> dict[str, Any]:
    """Every checkpoint of the model directory: task, version, classes, input size, training metrics, status
    (``failed`` ones with their error) and batching counters."""
    return {"ready": registry.ready, "device": str(registry.device), "models": registry.describe()}


@router.get("/health/live", summary="Liveness", response_model=Health)
async def live() -> dict[str, Any]:
    """200 while the process answers HTTP."""
    return {"status": "ok"}


@router.get("/health/ready", summary="Readiness", response_model=Health, responses={**problem_responses(503)})
async def ready(registry: RegistryDep) -> dict[str, Any]:
    """200 once every checkpoint was loaded (or failed) and warmed up and at least one model serves; else 503."""
    statuses = {h.name: h.status for h in registry.models.values()}
    if not registry.loaded.is_set():
        raise NotReady("models are still loading", headers=retry_after(5))
    if not registry.ready:
        reason = "no checkpoint in the model directory" if not statuses else "no model could be loaded"
        raise NotReady(f"{reason}; see GET /models", headers=retry_after(30))
    return {"status": "ready", "models": statuses}


@router.get(
    "/problems/{slug}",
    summary="Problem type",
    response_model=ProblemType,
    responses={**problem_responses(404)},
)
async def problem_type(slug: str) -> dict[str, Any]:
    """What a problem ``type`` of an error response means."""
    cls = PROBLEM_TYPES.get(slug)
    if cls is None:
        raise NotFound(f"no problem type {slug!r}")
    return {
        "type": PROBLEM_BASE + slug,
        "title": cls.title,
        "status": cls.status,
        "description": cls.description,
    }
