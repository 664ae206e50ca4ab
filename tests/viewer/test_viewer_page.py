"""The viewer page as the service serves it: open with API keys on, only its own files, no data, no CDN."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app.outputs import OVERLAY_ALPHA, OVERLAY_COLOURS
from app.viewer import STATIC_DIR, render_page
from tests.app.helpers import assert_problem, save_pixel_model, serve, settings
from tests.viewer.helpers import KEY

pytestmark = pytest.mark.anyio


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    save_pixel_model(tmp_path / "pixel.pt")
    return tmp_path


def config_of(html: str) -> dict[str, object]:
    found = re.search(r'<script type="application/json" id="viewer-config">(.*?)</script>', html, re.S)
    assert found, "no configuration block in the page"
    value: dict[str, object] = json.loads(found.group(1))
    return value


async def test_the_page_and_its_files_are_served_with_a_strict_policy(model_dir: Path) -> None:
    async with serve(settings(model_dir)) as (_, client):
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "connect-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        # The page refers to its own files only (no CDN, nothing to build) and each of them is served.
        references = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assets = [ref for ref in references if ref.startswith("/viewer/")]
        assert {"/viewer/viewer.js", "/viewer/viewer.css"} <= set(assets)
        assert not [ref for ref in references if "//" in ref], references
        for asset in assets:
            response = await client.get(asset)
            assert response.status_code == 200, asset
            expected = "text/javascript" if asset.endswith(".js") else "text/css"
            assert response.headers["content-type"].startswith(expected)
            assert response.headers["content-security-policy"] == policy
        # Every module the entry script imports is served too.
        script = (await client.get("/viewer/viewer.js")).text
        for module in re.findall(r'from "\./([^"]+)"', script):
            assert (await client.get(f"/viewer/{module}")).status_code == 200, module
        # A repeated load is answered from the browser's cache.
        first = await client.get("/viewer/viewer.js")
        again = await client.get("/viewer/viewer.js", headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 304 and not again.content


async def test_the_page_draws_in_the_colours_of_the_service_overlays() -> None:
    config = config_of(render_page())
    assert config == {
        "overlayColours": [[int(c) for c in colour] for colour in OVERLAY_COLOURS],
        "overlayAlpha": OVERLAY_ALPHA,
    }


async def test_only_the_viewer_files_are_served(model_dir: Path) -> None:
    async with serve(settings(model_dir)) as (_, client):
        for path in ("/viewer/index.html", "/viewer/", "/viewer/..%2Fauth.py", "/viewer/nothing.js"):
            assert_problem(await client.get(path), 404, "not-found")


async def test_the_page_stays_open_with_api_keys_while_the_api_is_closed(model_dir: Path) -> None:
    for overrides in ({}, {"docs_auth": True}):
        async with serve(settings(model_dir, api_keys=KEY, **overrides)) as (_, client):
            assert (await client.get("/")).status_code == 200
            assert (await client.get("/viewer/viewer.js")).status_code == 200
            assert_problem(await client.get("/models"), 401, "unauthorized")
            assert_problem(await client.get("/viewer-data"), 401, "unauthorized")
            assert (await client.get("/models", headers={"X-API-Key": KEY})).status_code == 200


async def test_the_page_is_not_part_of_the_api_description(model_dir: Path) -> None:
    async with serve(settings(model_dir)) as (_, client):
        paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/" not in paths and not [p for p in paths if p.startswith("/viewer")]


def test_the_page_holds_the_intended_use_statement_and_labels_every_control() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    assert "not a certified" in html and "must not be used for diagnosis" in html
    ids = set(re.findall(r'<(?:input|select)[^>]*\bid="([^"]+)"', html))
    labelled = set(re.findall(r'<label[^>]*\bfor="([^"]+)"', html))
    assert ids and ids <= labelled, ids - labelled
