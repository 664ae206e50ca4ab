"""Reading images from requests: multipart ``file`` fields or a raw body, with the upload size limit.

``BodySizeLimit`` (ASGI middleware) enforces ``MEDSERVE_MAX_UPLOAD_BYTES`` before any work is done: a declared
``Content-Length`` above the limit is refused at once, and a body streamed without one is cut off as soon as
the limit is passed. ``read_uploads`` then accepts either form of upload and names what is wrong otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.contract import ImageUpload
from app.errors import BadRequest, MissingFile, PayloadTooLarge, UnsupportedMediaType, problem_response

FILE_FIELD = "file"
# Raw-body content types; octet-stream is sniffed by the decoder like a multipart part.
RAW_IMAGE_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/tiff",
        "image/bmp",
        "image/x-ms-bmp",
        "application/dicom",
        "application/octet-stream",
    }
)
MULTIPART = "multipart/form-data"


def media_type(request: Request) -> str:
    """The request's content type without parameters, lower case ("" when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes (MEDSERVE_MAX_UPLOAD_BYTES)")


class BodySizeLimit:
    """ASGI middleware refusing request bodies over the limit in ``app.state.settings.max_upload_bytes``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The app (set in the scope by Starlette) holds the settings once the lifespan has read them.
        settings = getattr(getattr(scope.get("app"), "state", None), "settings", None)
        if scope["type"] != "http" or settings is None:
            await self.app(scope, receive, send)
            return
        limit: int = settings.max_upload_bytes
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # Refused before reading a byte of the body.
            await problem_response(_too_large(limit), path=scope["path"])(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)
            return message

        await self.app(scope, limited_receive, send)


async def read_uploads(request: Request, *, max_files: int) -> list[ImageUpload]:
    """The images of a request: every multipart ``file`` field, or the raw body with its content type.

    Raises:
        MissingFile: no ``file`` field, an empty file or an empty body (422).
        UnsupportedMediaType: a body whose content type is neither multipart nor an image type (415).
        PayloadTooLarge: more than ``max_files`` images, or a body over the byte limit (413).
        BadRequest: a malformed multipart body (400).
    """
    uploads, _ = await read_uploads_and_fields(request, max_files=max_files)
    return uploads


async def read_uploads_and_fields(
    request: Request, *, max_files: int, fields: Sequence[str] = ()
) -> tuple[list[ImageUpload], dict[str, str | bytes]]:
    """The images of a request (as ``read_uploads``) and the multipart ``fields`` it has besides ``file``: text
    as ``str``, file parts as their bytes (the first of each name). A raw body has no fields.

    Raises:
        as ``read_uploads``.
    """
    ctype = media_type(request)
    if ctype == MULTIPART:
        return await _read_multipart(request, max_files, fields)
    if ctype in RAW_IMAGE_TYPES:
        body = await request.body()
        if not body:
            raise MissingFile(
                "the request body is empty; send the image as the body or as multipart field 'file'"
            )
        return [ImageUpload(body, ctype, None)], {}
    if not ctype:
        # Without a content type the body cannot be interpreted; an empty request simply has no image.
        if not await request.body():
            raise MissingFile("no image: send multipart field 'file' or the image as the body")
        raise UnsupportedMediaType(
            "the request has no Content-Type; use multipart/form-data or an image type"
        )
    raise UnsupportedMediaType(
        f"content type {ctype!r} is not supported; use multipart/form-data (field 'file') or one of "
        f"{', '.join(sorted(RAW_IMAGE_TYPES))}"
    )


async def _read_multipart(
    request: Request, max_files: int, fields: Sequence[str]
) -> tuple[list[ImageUpload], dict[str, str | bytes]]:
    try:
        # One file more than allowed is parsed so that "too many" can be told apart from a broken body; the
        # fields' own file parts count as files too.
        form = await request.form(max_files=max_files + 1 + len(fields), max_fields=max_files + 16)
    except HTTPException as exc:
        if str(exc.detail).startswith("Too many files"):
            # More than one file over the limit: the parser stopped counting, the answer is still "too many".
            raise PayloadTooLarge(f"at most {max_files} image(s) per request to this endpoint") from exc
        raise BadRequest(f"malformed multipart body: {exc.detail}") from exc
    try:
        parts: list[Any] = form.getlist(FILE_FIELD)
        if not parts:
            raise MissingFile(f"the multipart body has no '{FILE_FIELD}' field")
        if len(parts) > max_files:
            raise PayloadTooLarge(f"at most {max_files} image(s) per request to this endpoint")
        uploads = []
        for index, part in enumerate(parts):
            if not isinstance(part, UploadFile):
                raise MissingFile(f"field '{FILE_FIELD}' #{index + 1} is text, not a file upload")
            data = await part.read()
            if not data:
                raise MissingFile(f"file #{index + 1} ({part.filename or 'unnamed'}) is empty")
            uploads.append(ImageUpload(data, part.content_type, part.filename))
        values: dict[str, str | bytes] = {}
        for name in fields:
            value = form.get(name)
            if isinstance(value, UploadFile):
                values[name] = await value.read()
            elif value is not None:
                values[name] = value
        return uploads, values
    finally:
        await form.close()
