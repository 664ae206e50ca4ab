"""Per-request context: the request id, the access log line and the request metrics (outermost ASGI middleware).

The request id comes from the client's ``X-Request-ID`` header when it is 1 to 128 characters of
``A-Z a-z 0-9 . _ : -`` (so it cannot forge log lines or carry data), else a new UUID4 (hex) is used. It is set
for the logs of the request (``app.logs.CURRENT_REQUEST``) and returned in the ``X-Request-ID`` response header,
errors included. Each finished request gives one access-log line (``medserve.access``: method, route template,
status, duration, model; no query string, no client address, no headers) and its metrics.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import handle_exception
from app.logs import CURRENT_REQUEST, RequestInfo
from app.metrics import UNMATCHED, ServiceMetrics

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

access_logger = logging.getLogger("medserve.access")
logger = logging.getLogger("medserve.middleware")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` when it is safe to log and echo, else a new random id."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1")
            if _VALID_REQUEST_ID.match(text):
                return text
            break
    return uuid.uuid4().hex


def _match(routes: Iterable[Any], scope: Scope) -> str | None:
    for route in routes:
        # Routers included into the app may be wrapped (FastAPI): look inside them.
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        if inner is not None:
            found = _match(inner, scope)
            if found is not None:
                return found
            continue
        try:
            match, _ = route.matches(scope)
        except Exception:  # a route that cannot judge this scope is simply not it
            continue
        if match is Match.FULL and isinstance(getattr(route, "path", None), str):
            return str(route.path)
    return None


def endpoint_of(scope: Scope) -> str:
    """The route template the request matched (``/problems/{slug}``), or ``unmatched``: bounded label values.

    After routing, Starlette has put the route in the scope. Requests refused before routing (no key, body too
    large) are matched against the app's routes here.
    """
    route = scope.get("route")
    if isinstance(getattr(route, "path", None), str):
        return str(route.path)  # type: ignore[union-attr]
    return _match(getattr(scope.get("app"), "routes", ()), scope) or UNMATCHED


class RequestContext:
    """ASGI middleware: request id, access log and metrics for every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_from(scope.get("headers", []))
        info = RequestInfo(request_id)
        token = CURRENT_REQUEST.set(info)
        response: dict[str, Any] = {"status": None, "model": ""}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("ascii")))
                message = {**message, "headers": headers}
                response["status"] = message["status"]
                for name, value in headers:
                    if name.lower() == b"x-model-name":
                        response["model"] = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if response["status"] is not None:
                raise  # the response has begun: nothing can be sent any more
            # An error no handler caught: answered here (problem+json, logged) so it still has the request id.
            answer = await handle_exception(Request(scope), exc)
            await answer(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            endpoint = endpoint_of(scope)
            status = response["status"] or 500
            # The model the route resolved (a served checkpoint's name), else the one that answered.
            model = info.model or response["model"]
            state = getattr(scope.get("app"), "state", None)
            metrics = getattr(state, "metrics", None)
            if isinstance(metrics, ServiceMetrics):
                metrics.observe_request(endpoint, model, status, seconds)
            settings = getattr(state, "settings", None)
            if getattr(settings, "access_log", True):
                access_logger.info(
                    "%s %s %d %.1f ms",
                    scope["method"],
                    endpoint,
                    status,
                    1000 * seconds,
                    extra={
                        "method": scope["method"],
                        "endpoint": endpoint,
                        "status": status,
                        "duration_ms": round(1000 * seconds, 3),
                        "model": model or None,
                    },
                )
            CURRENT_REQUEST.reset(token)
