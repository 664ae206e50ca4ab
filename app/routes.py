"""HTTP endpoints. They read requests, pick the model and hand work to the runner and batcher; no torch here.

Per image request: resolve the model -> take a place in its batcher (503 at once when full) -> read the upload(s)
-> decode + preprocess in the thread pool (keeping what the output format needs) -> refuse inputs the format
cannot render -> submit to the batcher and wait (dropped if the client goes away) -> encode the answer in the
output format, in the thread pool -> respond.

The image endpoints are built per app by ``image_router`` from the output-format registry (``app.outputs``):
the ``format`` values they accept, how OpenAPI describes them and what decoding keeps all come from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, cast

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from app import explain, interactive
from app.contract import ImageUpload, ModelInput, OutputFormat, Prediction, ResponseOptions, Runner
from app.errors import (
    PROBLEM_BASE,
    PROBLEM_TYPES,
    ClientDisconnected,
    InvalidRequest,
    NotFound,
    NotReady,
    from_image_error,
    retry_after,
)
from app.metrics import ServiceMetrics
from app.ood import HEADERS_OPENAPI, ood_counts, ood_headers
from app.outputs import check_image_count, check_input, output_formats, spoken_list
from app.registry import ModelRegistry, ModelVersion
from app.runners import ClassificationRunner, SegmentationRunner
from app.schemas import (
    ClassifyResponse,
    Health,
    ModelsResponse,
    ProblemType,
    image_request_body,
    interactive_request_body,
    problem_responses,
)
from app.settings import Settings
from app.uploads import read_uploads, read_uploads_and_fields
from models.imageio import ImageError

T = TypeVar("T")

router = APIRouter()

# Largest number of values (images x classes) a cheap format's answer is encoded from on the event loop.
INLINE_ENCODE_MAX_VALUES = 256
BINARY_CONTENT: dict[str, Any] = {"schema": {"type": "string", "format": "binary"}}


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
VersionQuery = Annotated[
    str | None,
    Query(
        description="model version (see GET /models: the serving one and the previous ones kept); default "
        "the serving version",
        examples=["3f2a9c0d1e4b5a67"],
    ),
]


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
        # Not ``work.cancelled()`` afterwards: a cancelled gather(return_exceptions=True) ends with an exception.
        dropped = not work.done()
        if dropped:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
    if dropped:
        raise ClientDisconnected("the client closed the connection; the request was dropped")
    return work.result()


def first_failure_raised(results: Sequence[T | BaseException]) -> list[T]:
    """The results of a ``gather(..., return_exceptions=True)``; the first exception, in order, is raised."""
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], list(results))


def _model_headers(handle: ModelVersion, runner: Runner[Any]) -> dict[str, str]:
    return {"X-Model-Name": handle.name, "X-Model-Version": runner.version}


def answered_ood(request: Request, model: str, predictions: Sequence[Prediction[Any]]) -> dict[str, str]:
    """Counts the answer's OOD scores and flags in ``/metrics``; returns its OOD headers (``app.ood``)."""
    metrics = getattr(request.app.state, "metrics", None)
    if isinstance(metrics, ServiceMetrics):
        metrics.observe_ood(model, *ood_counts(predictions))
    return ood_headers(predictions)


async def _decode(
    pool: Executor,
    runner: Runner[Any],
    upload: ImageUpload,
    output_format: OutputFormat[Any],
    max_pixels: int,
    position: int | None,
    keep_pixels: bool = False,
) -> ModelInput:
    """Decodes one upload keeping what ``output_format`` needs (and the pixels when ``keep_pixels``); when
    ``position`` is given (one of several files), a failure names the file (position and name) in the problem
    detail."""
    try:
        return await in_pool(
            pool,
            runner.decode,
            upload,
            max_pixels=max_pixels,
            keep_pixels=output_format.needs_pixels or keep_pixels,
            keep_source=output_format.needs_source,
        )
    except ImageError as exc:
        if position is None:
            raise
        name = f" ({upload.filename})" if upload.filename else ""
        raise from_image_error(exc, prefix=f"file {position}{name}: ") from exc


@dataclass(frozen=True)
class ImageRequest:
    """One request of an image endpoint, as its answer function (``ImageAnswer``) gets it.

    Attributes:
        http: the HTTP request (its body not read yet).
        task: the endpoint's task; ``model`` the ``?model=`` value.
        output_format / options: the answer's format and the request's ``ResponseOptions``.
        multiple: the endpoint takes several images.
    """

    http: Request
    registry: ModelRegistry
    settings: Settings
    pool: Executor
    task: str
    model: str | None
    output_format: OutputFormat[Any]
    options: ResponseOptions
    multiple: bool
    version: str | None = None


ImageAnswer = Callable[[ImageRequest], Awaitable[Response]]


async def answer_images(call: ImageRequest) -> Response:
    """The whole request of an image endpoint of ``task``: one image, or up to ``MAX_FILES`` when ``multiple``.

    If any image cannot be read, the whole request fails with that image's problem (the first in upload order).
    With ``explain`` (``app.explain``) the request also takes a place in the model's explainer, which explains
    the images once the batch has classified them.
    """
    request, settings, pool, multiple = call.http, call.settings, call.pool, call.multiple
    output_format, options = call.output_format, call.options
    # The version resolved now answers the request: its first place is taken before the next await.
    handle = call.registry.resolve(call.task, call.model, call.version)
    runner, batcher = handle.runner, handle.batcher
    if output_format.check_options is not None:
        output_format.check_options(runner, options)
    plan = explain.plan_explanations(_state(request, "explanations"), runner, options)
    with contextlib.ExitStack() as places:
        explaining = places.enter_context(plan.reserve()) if plan is not None else None
        # One place per image: the first before the body is read, the others once their number is known.
        reservations = [places.enter_context(batcher.reserve())]
        uploads = await read_uploads(request, max_files=settings.max_files if multiple else 1)
        check_image_count(output_format, len(uploads))
        # Places of the same request: granted even if the version was retired meanwhile.
        reservations += [places.enter_context(reservations[0].another()) for _ in uploads[1:]]
        decoded = await asyncio.gather(
            *(
                _decode(
                    pool,
                    runner,
                    upload,
                    output_format,
                    settings.max_pixels,
                    index + 1 if multiple else None,
                    keep_pixels=plan is not None,
                )
                for index, upload in enumerate(uploads)
            ),
            return_exceptions=True,
        )
        items = first_failure_raised(decoded)
        for item in items:
            check_input(output_format, item)  # before the model spends time on it
        submitted = asyncio.gather(
            *(reservation.submit(item) for reservation, item in zip(reservations, items, strict=True)),
            return_exceptions=True,
        )
        outputs = first_failure_raised(await until_disconnected(request, submitted))
        explanations: list[dict[str, Any] | None] = [None] * len(items)
        if plan is not None and explaining is not None:
            explanations = list(await until_disconnected(request, plan.run(explaining, items, outputs)))
    predictions = [
        Prediction(item, output, explanation)
        for item, output, explanation in zip(items, outputs, explanations, strict=True)
    ]
    # A few numbers encode in microseconds, less than a thread round trip; the rest goes to the pool.
    cheap = output_format.cheap and plan is None
    if cheap and len(predictions) * len(runner.classes) <= INLINE_ENCODE_MAX_VALUES:
        encoded = runner.encode(predictions, output_format, options)
    else:
        encoded = await in_pool(pool, runner.encode, predictions, output_format, options)
    headers = {**_model_headers(handle, runner), **answered_ood(request, handle.name, predictions)}
    return Response(encoded.body, media_type=encoded.media_type, headers=headers)


async def answer_interactive(call: ImageRequest) -> Response:
    """The whole request of ``POST /segment/interactive``: one image and its hints (see ``app.interactive``).

    Without ``model`` the graph cut segments from the hints alone, in the thread pool; with it the model's
    prediction comes through its batcher as for ``/segment`` and the graph cut refines it in the thread pool.
    """
    if call.multiple:
        raise ValueError("an interactive correction covers one image")
    pool, options = call.pool, call.options
    if call.model is None:
        interactive.refuse_class_without_model(options.foreground_class)
        if call.version is not None:
            message = "version chooses a model's version: it needs ?model=NAME"
            raise InvalidRequest(
                f"invalid parameter(s): version ({message})",
                extra={"errors": [{"loc": ["query", "version"], "msg": message}]},
            )
        item, hints = await _read_image_and_hints(
            call, interactive.decode_for_graph_cut, need_foreground=True
        )
        mask = await in_pool(pool, interactive.cut_from_hints, item, hints)
        answerer = interactive.GRAPH_CUT_ANSWERER
    else:
        handle = call.registry.resolve(call.task, call.model, call.version)
        runner, batcher = handle.runner, handle.batcher
        assert isinstance(runner, SegmentationRunner)
        class_index = interactive.foreground_class_index(runner.classes, options.foreground_class)
        with batcher.reserve() as reservation:
            decode = functools.partial(runner.decode, keep_pixels=True)
            item, hints = await _read_image_and_hints(call, decode, need_foreground=False)
            scores = await until_disconnected(call.http, reservation.submit(item))
        mask = await in_pool(pool, interactive.refine_prediction, runner, item, scores, hints, class_index)
        answerer = interactive.MaskAnswerer(handle.name, runner.version, runner.classes)
    body = await in_pool(pool, call.output_format.encoder, answerer, [Prediction(item, mask)], options)
    headers = {"X-Model-Name": answerer.name, "X-Model-Version": answerer.version}
    if call.model is not None:  # the model's prediction was refined: its OOD flag applies
        headers.update(answered_ood(call.http, answerer.name, [Prediction(item, mask)]))
    return Response(body, media_type=call.output_format.media_type, headers=headers)


async def _read_image_and_hints(
    call: ImageRequest, decode: Callable[..., ModelInput], *, need_foreground: bool
) -> tuple[ModelInput, Any]:
    """Reads the image and the ``hints`` field, decodes both in the thread pool (``decode(upload, max_pixels=,
    keep_source=)`` must keep the pixels) and refuses, before any cut or model runs, what cannot be answered."""
    uploads, fields = await read_uploads_and_fields(call.http, max_files=1, fields=(interactive.HINTS_FIELD,))
    item: ModelInput = await in_pool(
        call.pool,
        decode,
        uploads[0],
        max_pixels=call.settings.max_pixels,
        keep_source=call.output_format.needs_source,
    )
    hints = await in_pool(
        call.pool,
        interactive.read_hints,
        fields.get(interactive.HINTS_FIELD),
        item,
        need_foreground=need_foreground,
    )
    check_input(call.output_format, item)
    return item, hints


# -- building the image endpoints from the output-format registry ---------------------------------------


def format_parameter(
    formats: dict[str, OutputFormat[Any]], default: str
) -> Callable[..., Awaitable[OutputFormat[Any]]]:
    """A dependency giving the request's output format: the ``format`` query parameter (one of ``formats``,
    refused like a ``Literal``: the same 422) or, when the task has one format only, that one, with no parameter.
    """
    if len(formats) == 1:
        (only,) = formats.values()

        async def the_only_format() -> OutputFormat[Any]:
            return only

        return the_only_format
    names = list(formats)
    expected = spoken_list([repr(name) for name in names])
    described = Query(
        default,
        alias="format",
        description=f"{spoken_list(names)} (see the operation's description)",
        json_schema_extra={"enum": names},
    )

    # The Query is a default (not in Annotated): this module's annotations are strings, which FastAPI resolves
    # in the module's namespace, and the names are known only here.
    async def chosen_format(fmt: str = described) -> OutputFormat[Any]:
        output_format = formats.get(fmt)
        if output_format is None:  # the error a Literal parameter gives
            error = {
                "type": "literal_error",
                "loc": ("query", "format"),
                "msg": f"Input should be {expected}",
            }
            raise RequestValidationError([{**error, "input": fmt, "ctx": {"expected": expected}}])
        return output_format

    return chosen_format


def describe_formats(formats: dict[str, OutputFormat[Any]], default: str) -> str:
    """The Markdown list of the formats for an endpoint's description ("" when there is no choice)."""
    if len(formats) < 2:
        return ""
    lines = []
    for name, output_format in formats.items():
        notes = " (default)" if name == default else ""
        if output_format.needs_source:
            notes += " (DICOM input only; other input: 415)"
        lines.append(f"* `format={name}`{notes}: {output_format.description}")
    return "\n".join(lines) + "\n\n"


def ok_response(formats: dict[str, OutputFormat[Any]]) -> dict[str, Any]:
    """The OpenAPI 200 response of an image endpoint: each format's media type and the model headers."""
    content: dict[str, Any] = {}
    for output_format in formats.values():
        content.setdefault(output_format.media_type, output_format.openapi or BINARY_CONTENT)
    response: dict[str, Any] = {
        "content": content,
        "headers": {
            "X-Model-Name": {"description": "model that answered", "schema": {"type": "string"}},
            "X-Model-Version": {"description": "its version (content hash)", "schema": {"type": "string"}},
            **HEADERS_OPENAPI,
        },
    }
    if len(formats) > 1:
        response["description"] = "by format: " + spoken_list(
            [f"{name} ({f.media_type})" for name, f in formats.items()]
        )
    return response


def add_image_route(
    router: APIRouter,
    path: str,
    *,
    name: str,
    task: str,
    summary: str,
    description: str,
    default_format: str,
    multiple: bool,
    options: Callable[..., Awaitable[ResponseOptions]],
    answer: ImageAnswer = answer_images,
    request_body: dict[str, Any] | None = None,
    mask_only: bool = False,
    **route_options: Any,
) -> None:
    """Adds ``POST path`` answering images of ``task`` in any of the task's registered output formats.

    ``description`` is the operation's description; ``{formats}`` in it becomes the list of formats.
    ``options`` is a dependency giving the request's ``ResponseOptions`` (its query parameters). ``answer``
    answers the request (an ``ImageRequest``); ``request_body`` is its OpenAPI request body
    (default: ``image_request_body``). ``mask_only``: the answers are masks made without the model's scores,
    so the formats that render scores (``needs_scores``) are not offered.
    """
    formats = {
        name: output_format
        for name, output_format in output_formats(task).items()
        if not (mask_only and output_format.needs_scores)
    }
    if default_format not in formats:
        raise ValueError(f"{task} has no output format {default_format!r}")
    # Defaults, not Annotated aliases: these annotations are strings, resolved in the module's namespace.
    choose_format = Depends(format_parameter(formats, default_format))
    read_options = Depends(options)

    async def endpoint(
        request: Request,
        registry: RegistryDep,
        settings: SettingsDep,
        pool: PoolDep,
        output_format: OutputFormat[Any] = choose_format,
        response_options: ResponseOptions = read_options,
        model: ModelQuery = None,
        version: VersionQuery = None,
    ) -> Response:
        return await answer(
            ImageRequest(
                request,
                registry,
                settings,
                pool,
                task,
                model,
                output_format,
                response_options,
                multiple,
                version,
            )
        )

    router.add_api_route(
        path,
        endpoint,
        methods=["POST"],
        name=name,
        summary=summary,
        description=description.format(formats=describe_formats(formats, default_format)),
        responses={200: ok_response(formats), **problem_responses(400, 404, 413, 415, 422, 500, 503, 504)},
        openapi_extra=request_body or image_request_body(multiple=multiple),
        **route_options,
    )


async def no_options() -> ResponseOptions:
    return ResponseOptions()


async def classify_options(
    top_k: Annotated[int | None, Query(ge=1, description="list only the K most probable classes")] = None,
    explain_method: Annotated[
        explain.ExplainMethod | None,
        Query(
            alias="explain",
            description="gradcam: each prediction gains `explanation`, a Grad-CAM map of its label (or of "
            "`target`) as PNGs",
        ),
    ] = None,
    target: Annotated[
        str | None,
        Query(description="with explain: the class to explain (default: each image's predicted label)"),
    ] = None,
) -> ResponseOptions:
    explain.check_explain_options(explain_method, target)
    return ResponseOptions(top_k=top_k, explain=explain_method, explain_target=target)


async def segment_options(
    probability_class: Annotated[
        str | None,
        Query(
            alias="class",
            description="with format=probability: the class whose probability is drawn (default the first "
            "class after the background)",
        ),
    ] = None,
) -> ResponseOptions:
    return ResponseOptions(foreground_class=probability_class)


async def interactive_options(
    foreground_class: Annotated[
        str | None,
        Query(
            alias="class",
            description="with ?model=: the class to correct (default the first class after the background)",
        ),
    ] = None,
) -> ResponseOptions:
    return ResponseOptions(foreground_class=foreground_class)


SEGMENT_DESCRIPTION = """Segments one image and returns the mask at the image's original size.

Send the image as multipart field `file` (`curl -F file=@scan.png`) or as the raw body with its content type
(`curl --data-binary @scan.png -H 'Content-Type: image/png'`). PNG, JPEG, TIFF, BMP and DICOM are read.

{formats}Headers `X-Model-Name` and `X-Model-Version` name the model that answered.
"""

CLASSIFY_DESCRIPTION = """Classifies one or more images.

Send each image as a multipart field `file` (repeat the field for several: `curl -F file=@a.png -F file=@b.png`)
or one image as the raw body with its content type. Predictions come in the order of the files; each lists
the most probable label and the class probabilities (softmax of the calibrated logits; all classes sum to 1,
`top_k` lists only the best K), and for DICOM input `dicom`: its Study/Series/SOP Instance UIDs (never patient
data). If any image cannot be read, the whole request fails with the status of that
image's problem (400 for an unreadable file) and the detail names the file; no other request is affected.

`explain=gradcam`: each prediction also has `explanation`: `method`, `target` (the class explained: the label,
or `target=CLASS`), `heatmap_png` (base64 of an 8-bit gray PNG of the image's size: the Grad-CAM map, 255 where
the evidence for the class is strongest) and `overlay_png` (base64 of an RGB PNG: the map over the image).
Explanations run on their own worker per model (`MEDSERVE_EXPLAIN_MAX_QUEUE` requests; beyond: 503 with
Retry-After), never inside the inference batch; `GET /models` names the layer explained.

{formats}"""


INTERACTIVE_DESCRIPTION = """Segments one image from foreground and background hints by a graph cut, or refines a U-Net's
prediction with them (semi-automatic correction).

Send multipart field `file` (the image) and field `hints`: JSON points
(`-F 'hints={{"points": [{{"x": 120, "y": 80, "label": "foreground"}}], "radius": 5}}'`; `label` is `foreground` or
`background`, `x` the column and `y` the row in pixels, each point a disk of `radius` pixels, later points drawn
over earlier ones) or a scribble PNG of the image's size (`-F hints=@scribble.png`; one channel, 0 no hint,
1 foreground, 2 background). Hint pixels keep their label in the answer.

Without `model` the graph cut segments from the hints alone (at least one foreground hint; intensity models
fitted on the hint pixels) and answers as the model `graph-cut` (classes background, foreground). With
`model=NAME` it refines that model's probabilities of one class (`class=NAME`, default the first class after the
background); the answer has the model's classes. Unusable hints: 422 `/problems/invalid-hints`.

{formats}Headers `X-Model-Name` and `X-Model-Version` name the model that answered (`graph-cut` without one).
"""


def image_router() -> APIRouter:
    """``POST /segment``, ``POST /segment/interactive`` and ``POST /classify`` with the output formats registered
    now (see ``app.outputs``)."""
    images = APIRouter()
    add_image_route(
        images,
        "/segment",
        name="segment",
        task=SegmentationRunner.task,
        summary="Segment an image",
        description=SEGMENT_DESCRIPTION,
        default_format="png",
        multiple=False,
        options=segment_options,
        response_class=Response,
    )
    add_image_route(
        images,
        "/segment/interactive",
        name="segment_interactive",
        task=SegmentationRunner.task,
        summary="Segment or correct an image from hints",
        description=INTERACTIVE_DESCRIPTION,
        default_format="png",
        multiple=False,
        options=interactive_options,
        answer=answer_interactive,
        request_body=interactive_request_body(),
        mask_only=True,
        response_class=Response,
    )
    add_image_route(
        images,
        "/classify",
        name="classify",
        task=ClassificationRunner.task,
        summary="Classify images",
        description=CLASSIFY_DESCRIPTION,
        default_format="json",
        multiple=True,
        options=classify_options,
        response_model=ClassifyResponse,
    )
    return images


@router.get("/models", summary="Served models", response_model=ModelsResponse)
async def list_models(request: Request, registry: RegistryDep) -> dict[str, Any]:
    """Every checkpoint of the model directory: task, version, classes, input size, training metrics, status
    (``failed`` ones with their error), batching counters and, for classifiers, how they are explained."""
    models = explain.with_explainer_stats(registry.describe(), _state(request, "explanations"))
    return {
        "ready": registry.ready,
        "device": str(registry.device),
        "models": models,
        "draining": registry.describe_draining(),
    }


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
