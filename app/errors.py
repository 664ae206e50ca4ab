"""Every failure becomes an RFC 9457 ``application/problem+json`` response; this is the one place that maps them.

A problem body has a stable ``type`` (a URI reference ``/problems/<slug>``, resolvable on the service itself),
``title`` (same for every occurrence of the type), ``status``, a human ``detail`` and an ``instance``
(``urn:uuid:...``, also written to the log so an operator can find the occurrence). Internals are logged, never
returned: no stack traces, no exception text from libraries. Bad input is always a 4xx.

Other modules raise either a ``Problem`` subclass (HTTP-aware code: routes, uploads, registry) or their own
domain exceptions (``models.imageio.ImageError``, ``app.batching`` errors), which ``problem_for`` maps here.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app import batching
from models.imageio import ImageError, ImageTooLargeError, UnprocessableImageError, UnsupportedImageError
from models.interactive import HintError

logger = logging.getLogger("medserve.errors")

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "/problems/"


class Problem(Exception):
    """An error with an HTTP status and a problem type; raise a subclass with a human ``detail``."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal server error"
    description: ClassVar[str] = "The service failed unexpectedly. The error has been logged."

    def __init__(
        self, detail: str, *, headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


class InvalidImage(Problem):
    status, slug, title = 400, "invalid-image", "Unreadable image"
    description = "The uploaded bytes are not a readable PNG, JPEG, TIFF, BMP or DICOM image."


class BadRequest(Problem):
    status, slug, title = 400, "bad-request", "Malformed request"
    description = "The request could not be parsed (e.g. a broken multipart body)."


class Unauthorized(Problem):
    status, slug, title = 401, "unauthorized", "API key required"
    description = "Send a valid API key as `X-API-Key: KEY` or `Authorization: Bearer KEY`."


class Forbidden(Problem):
    status, slug, title = 403, "forbidden", "Scope missing"
    description = (
        "The API key is valid but lacks the scope this endpoint needs (infer, jobs or admin); admin endpoints "
        "are refused when no API keys are configured."
    )


class ModelNotFound(Problem):
    status, slug, title = 404, "model-not-found", "Unknown model"
    description = "No model of the needed task has this name; GET /models lists them."


class VersionNotFound(Problem):
    status, slug, title = 404, "version-not-found", "Unknown model version"
    description = "The model has no loaded version of this name; GET /models lists each model's versions."


class NotFound(Problem):
    status, slug, title = 404, "not-found", "Not found"
    description = "No such endpoint."


class MethodNotAllowed(Problem):
    status, slug, title = 405, "method-not-allowed", "Method not allowed"
    description = "The endpoint exists but not with this HTTP method."


class PayloadTooLarge(Problem):
    status, slug, title = 413, "payload-too-large", "Upload too large"
    description = "The body exceeds MEDSERVE_MAX_UPLOAD_BYTES or the image exceeds MEDSERVE_MAX_PIXELS."


class UnsupportedMediaType(Problem):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"
    description = "Send multipart/form-data with a `file` field, or a raw image body with its content type."


class MissingFile(Problem):
    status, slug, title = 422, "missing-file", "No image in the request"
    description = "The request has no image: no multipart `file` field, or an empty body."


class UnprocessableImage(Problem):
    status, slug, title = 422, "unprocessable-image", "Image cannot be processed"
    description = "A valid image the models cannot take, e.g. a multi-frame volume."


class InvalidRequest(Problem):
    status, slug, title = 422, "invalid-request", "Invalid request parameters"
    description = "A query parameter is missing or invalid; `errors` lists each one."


class InvalidHints(Problem):
    status, slug, title = 422, "invalid-hints", "Unusable hints"
    description = (
        "The hints of an interactive correction are missing or unusable: not the documented JSON (points with "
        "x, y, label; radius), a point outside the image, no foreground hint (needed without a model), or a "
        "scribble that is not a one-channel PNG of the image's size with values 0, 1, 2."
    )


class ModelRequired(Problem):
    status, slug, title = 422, "model-required", "Model must be chosen"
    description = "Several models of this task are served; choose one with ?model=NAME."


class InferenceFailed(Problem):
    status, slug, title = 500, "inference-failed", "Inference failed"
    description = "The model failed on this request. The error has been logged."


class InternalError(Problem):
    pass


class NotReady(Problem):
    status, slug, title = 503, "not-ready", "Service not ready"
    description = "Models are still loading or warming up (or none could be loaded)."


class ModelUnavailable(Problem):
    status, slug, title = 503, "model-unavailable", "Model unavailable"
    description = "The model's checkpoint failed to load; GET /models shows the error."


class QueueFull(Problem):
    status, slug, title = 503, "queue-full", "Server busy"
    description = "The model's queue is full; retry after the number of seconds in Retry-After."


class ShuttingDown(Problem):
    status, slug, title = 503, "shutting-down", "Service shutting down"
    description = "The service is stopping and accepts no new work."


class ClientDisconnected(Problem):
    status, slug, title = 499, "client-closed-request", "Client closed request"
    description = "The client closed the connection before its answer was ready; the request was dropped."


class RequestTimeout(Problem):
    status, slug, title = 504, "timeout", "Request timed out"
    description = "The request waited longer than MEDSERVE_REQUEST_TIMEOUT_S before the model could run it."


PROBLEM_TYPES: dict[str, type[Problem]] = {
    cls.slug: cls
    for cls in (
        InvalidImage,
        BadRequest,
        Unauthorized,
        Forbidden,
        ModelNotFound,
        VersionNotFound,
        NotFound,
        MethodNotAllowed,
        PayloadTooLarge,
        UnsupportedMediaType,
        MissingFile,
        UnprocessableImage,
        InvalidRequest,
        InvalidHints,
        ModelRequired,
        InferenceFailed,
        InternalError,
        NotReady,
        ModelUnavailable,
        QueueFull,
        ShuttingDown,
        ClientDisconnected,
        RequestTimeout,
    )
}


def retry_after(seconds: float) -> dict[str, str]:
    """A ``Retry-After`` header of at least one whole second."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def from_image_error(exc: ImageError, prefix: str = "") -> Problem:
    """Maps the decoder's typed errors: too large 413, unsupported 415, unprocessable 422, unreadable 400."""
    detail = f"{prefix}{exc}"
    if isinstance(exc, ImageTooLargeError):
        return PayloadTooLarge(detail)
    if isinstance(exc, UnsupportedImageError):
        return UnsupportedMediaType(detail)
    if isinstance(exc, UnprocessableImageError):
        return UnprocessableImage(detail)
    return InvalidImage(detail)


def problem_for(exc: BaseException) -> Problem:
    """The problem a known exception stands for; anything unknown is an ``InternalError``."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, ImageError):
        return from_image_error(exc)
    if isinstance(exc, HintError):
        return InvalidHints(str(exc))
    if isinstance(exc, ClientDisconnect):
        return ClientDisconnected("the client closed the connection while sending its request")
    if isinstance(exc, batching.QueueFullError):
        return QueueFull(str(exc), headers=retry_after(exc.retry_after_s))
    if isinstance(exc, batching.BatcherClosedError):
        return ShuttingDown(str(exc))
    if isinstance(exc, batching.RequestTimeoutError):
        return RequestTimeout(str(exc))
    if isinstance(exc, batching.InferenceError):
        return InferenceFailed("the model failed on this image; the error has been logged")
    return InternalError("the service failed unexpectedly; the error has been logged")


def problem_body(problem: Problem, instance: str | None = None) -> dict[str, Any]:
    """The RFC 9457 members plus the problem's extension members (e.g. ``errors``)."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + problem.slug,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        "instance": instance or f"urn:uuid:{uuid.uuid4()}",
    }
    body.update(problem.extra)
    return body


# The Open Inference Protocol's clients (tritonclient) read an error's message from an ``error`` member.
OPEN_INFERENCE_PREFIX = "/v2/"


def problem_response(problem: Problem, instance: str | None = None, *, path: str = "") -> JSONResponse:
    """The problem's response; under ``/v2/`` (the Open Inference Protocol) with ``error`` = the detail too."""
    body = problem_body(problem, instance)
    if path.startswith(OPEN_INFERENCE_PREFIX):
        body.setdefault("error", problem.detail)
    return JSONResponse(
        body,
        status_code=problem.status,
        headers=problem.headers,
        media_type=PROBLEM_JSON,
    )


def _respond(request: Request, problem: Problem, exc: BaseException) -> JSONResponse:
    instance = f"urn:uuid:{uuid.uuid4()}"
    # Never log the detail: it may carry a client file name. Status, type, path and instance suffice.
    where = f"{request.method} {request.url.path}"
    if problem.status >= 500 and problem.status not in (503, 504, 507):
        logger.error("%s -> %d %s (%s)", where, problem.status, problem.slug, instance, exc_info=exc)
    else:
        logger.info("%s -> %d %s (%s)", where, problem.status, problem.slug, instance)
    return problem_response(problem, instance, path=request.url.path)


async def handle_exception(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler for ``Problem``, image and batching errors, and anything unexpected."""
    return _respond(request, problem_for(exc), exc)


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's parameter validation errors -> 422 with an ``errors`` list (location and message only)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    listed = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in errors]
    names = ", ".join(".".join(e["loc"][1:]) or ".".join(e["loc"]) for e in listed) or "request"
    return _respond(request, InvalidRequest(f"invalid parameter(s): {names}", extra={"errors": listed}), exc)


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's HTTP errors (unknown route, wrong method, broken multipart) in problem form."""
    status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
    headers = dict(getattr(exc, "headers", None) or {})
    problem: Problem
    if status == 404:
        problem = NotFound(f"no endpoint {request.url.path}; see /docs")
    elif status == 405:
        problem = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}", headers=headers)
    elif status == 400:
        problem = BadRequest(f"malformed request: {getattr(exc, 'detail', 'unreadable body')}")
    else:
        problem = InternalError("the service failed unexpectedly; the error has been logged")
    return _respond(request, problem, exc)


def install_error_handlers(app: FastAPI) -> None:
    """Registers the handlers: every error response of the app is problem+json."""
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(Problem, handle_exception)
    app.add_exception_handler(ImageError, handle_exception)
    app.add_exception_handler(HintError, handle_exception)
    app.add_exception_handler(batching.BatchingError, handle_exception)
    app.add_exception_handler(ClientDisconnect, handle_exception)
    app.add_exception_handler(Exception, handle_exception)
