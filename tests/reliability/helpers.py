"""A running in-process service with a blocking client, for hypothesis tests (which are synchronous).

The app and its lifespan run on an event loop in a background thread (an anyio blocking portal); requests go
through httpx's ASGI transport on that loop, exactly as in ``tests.app.helpers.serve``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI

from app.settings import Settings
from tests.app.helpers import serve


class BlockingClient:
    """``get``/``post`` like httpx's, blocking; ``app`` is the served application."""

    def __init__(self, portal: BlockingPortal, app: FastAPI, client: httpx.AsyncClient) -> None:
        self.portal = portal
        self.app = app
        self._client = client

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.portal.call(functools.partial(self._client.request, method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


@contextlib.contextmanager
def running_service(config: Settings) -> Iterator[BlockingClient]:
    """Starts the app (lifespan, models loaded) on a background loop; stops it on exit."""
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(serve(config)) as (app, client):
        yield BlockingClient(portal, app, client)
