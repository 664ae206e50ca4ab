"""The viewer: a single page at ``GET /`` that shows what the models answer, using the service's own API only.

The page is plain HTML, CSS and JavaScript modules in ``app/viewer/static`` (no build step, nothing from a CDN):
``GET /`` answers ``index.html`` and ``GET /viewer/{name}`` its scripts and styles. In the browser it lists
``GET /models``, sends the chosen file to ``POST /segment`` or ``POST /classify`` and draws the answers (see
docs/viewer.md).

The page and its assets hold no data, so they are open even when API keys are configured (``app.auth``
``AccessPolicy``); every request the page makes for data carries the key the user enters (``X-API-Key``).

``index.html`` gets one value at serve time: the overlay colours and opacity of ``app.outputs``, so that the
masks the page draws have the colours of the service's ``format=overlay`` answers, and so that the page can
recover the grey image from an overlay when the browser cannot decode the upload itself (TIFF, DICOM).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from app.auth import VIEWER_PAGE, VIEWER_PREFIX
from app.errors import NotFound
from app.outputs import OVERLAY_ALPHA, OVERLAY_COLOURS

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONFIG_PLACEHOLDER = "{{viewer-config}}"
ASSET_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}

# The page runs only its own scripts and styles and talks only to its own origin; images come from the
# service's answers (blob: and data: URLs). Nothing may frame it.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def viewer_config() -> dict[str, Any]:
    """What the page needs to know about the service's rendering: the overlay colours (RGB, class 1, 2, ...;
    class k has colour ``(k - 1) % len``) and their opacity in ``format=overlay`` answers."""
    return {
        "overlayColours": [[int(channel) for channel in colour] for colour in OVERLAY_COLOURS],
        "overlayAlpha": OVERLAY_ALPHA,
    }


def render_page() -> str:
    """``index.html`` with the configuration filled in (JSON in a non-executed ``<script>`` block)."""
    template = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    if template.count(CONFIG_PLACEHOLDER) != 1:
        raise ValueError(f"index.html must hold {CONFIG_PLACEHOLDER} exactly once")
    config = json.dumps(viewer_config(), separators=(",", ":")).replace("</", "<\\/")
    return template.replace(CONFIG_PLACEHOLDER, config)


@dataclass(frozen=True)
class Asset:
    """A file of the page, read once: its bytes, media type and entity tag."""

    body: bytes
    media_type: str
    etag: str

    @classmethod
    def read(cls, path: Path) -> Asset:
        body = path.read_bytes()
        return cls(body, ASSET_TYPES[path.suffix], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def read_assets() -> dict[str, Asset]:
    """The scripts and styles of ``app/viewer/static`` by file name (the page itself is ``GET /``)."""
    return {p.name: Asset.read(p) for p in sorted(STATIC_DIR.iterdir()) if p.suffix in ASSET_TYPES}


def viewer_router() -> APIRouter:
    """``GET /`` (the page) and ``GET /viewer/{name}`` (its files). Both are left out of OpenAPI, like
    ``/docs``: they are not part of the API. Only the files of ``app/viewer/static`` are served (looked up by
    name, so no path reaches the file system)."""
    page = render_page()
    assets = read_assets()
    router = APIRouter()

    @router.get(VIEWER_PAGE, include_in_schema=False, response_class=HTMLResponse)
    async def viewer_page() -> HTMLResponse:
        return HTMLResponse(page, headers=SECURITY_HEADERS)

    @router.get(VIEWER_PREFIX + "{name}", include_in_schema=False)
    async def viewer_asset(name: str, request: Request) -> Response:
        asset = assets.get(name)
        if asset is None:
            raise NotFound(f"the viewer has no file {name!r}")
        headers = {**SECURITY_HEADERS, "ETag": asset.etag}
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    return router
