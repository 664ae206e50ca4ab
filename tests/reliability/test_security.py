"""Security: a pickle payload in a checkpoint is refused unexecuted; no key, no access; keys never reach the logs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import APIRouter, FastAPI

from app.auth import AccessPolicy, ApiKeys, include_routes
from app.errors import install_error_handlers
from tests.app.helpers import (
    PNG,
    assert_problem,
    encode_image,
    random_image,
    save_pixel_model,
    serve,
    settings,
)

pytestmark = pytest.mark.anyio

KEY = "mk-7Hq2vX9pLr4TzW8nB3cY"
OTHER_KEY = "ops-Qw5Er7Ty9Ui1Op3As5Df"


class Payload:
    """Unpickling this runs ``exec`` and writes ``marker``: what a crafted checkpoint would do to a server."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def write_malicious_checkpoint(path: Path, marker: Path) -> None:
    """A real MedServe checkpoint (header, metadata, weights) with a code-executing object slipped in."""
    save_pixel_model(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["state_dict"]["extra_hook"] = Payload(marker)
    torch.save(payload, path)


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Loaded the unsafe way, the file does run code (here: harmlessly), so the next test is meaningful."""
    marker = tmp_path / "executed"
    write_malicious_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", map_location="cpu", weights_only=False)
    assert marker.read_text() == "pwned"


async def test_a_checkpoint_with_a_pickle_payload_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    write_malicious_checkpoint(tmp_path / "evil.pt", marker)
    save_pixel_model(tmp_path / "good.pt")
    image = encode_image(random_image(8, 8, seed=0))
    async with serve(settings(tmp_path)) as (_, client):
        listing = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
        refused = await client.post("/segment?model=evil", content=image, headers=PNG)
        served = await client.post("/segment?model=good", content=image, headers=PNG)
    assert not marker.exists()  # the payload never ran
    assert listing["evil"]["status"] == "failed"
    assert "evil.pt" in listing["evil"]["error"] and str(tmp_path) not in listing["evil"]["error"]
    assert listing["good"]["status"] == "ready"
    assert_problem(refused, 503, "model-unavailable")
    assert served.status_code == 200


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    save_pixel_model(tmp_path / "pixel.pt")
    return tmp_path


async def test_without_a_valid_key_nothing_but_health_answers(model_dir: Path) -> None:
    image = encode_image(random_image(8, 8, seed=1))
    async with serve(settings(model_dir, api_keys=f"{KEY},{OTHER_KEY}")) as (_, client):
        missing = await client.post("/segment", content=image, headers=PNG)
        wrong = await client.post("/segment", content=image, headers={**PNG, "X-API-Key": KEY[:-1] + "x"})
        wrong_bearer = await client.post(
            "/segment", content=image, headers={**PNG, "Authorization": f"Bearer {KEY}x"}
        )
        basic = await client.get("/models", headers={"Authorization": f"Basic {KEY}"})
        unknown_path = await client.get("/admin")
        for response in (missing, wrong, wrong_bearer, basic, unknown_path):
            body = assert_problem(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert KEY not in response.text and KEY not in body["detail"]
        assert "X-API-Key" in assert_problem(missing, 401, "unauthorized")["detail"]
        # Probes and the API description stay open; metrics are protected by default.
        assert (await client.get("/health/live")).status_code == 200
        assert (await client.get("/health/ready")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200
        assert_problem(await client.get("/metrics"), 401, "unauthorized")
        # Either key, in either header, opens everything.
        by_header = await client.post("/segment", content=image, headers={**PNG, "X-API-Key": KEY})
        by_bearer = await client.post(
            "/segment", content=image, headers={**PNG, "Authorization": f"bearer {OTHER_KEY}"}
        )
        assert by_header.status_code == 200 and by_bearer.status_code == 200
        assert by_header.content == by_bearer.content
        metrics = await client.get("/metrics", headers={"X-API-Key": KEY})
        assert metrics.status_code == 200
        # Refusals are counted under the endpoint they were aimed at (or "unmatched"), never with a model.
        refused = 'medserve_requests_total{endpoint="/segment",model="",status="401"} 3.0'
        assert refused in metrics.text
        assert 'medserve_requests_total{endpoint="unmatched",model="",status="401"} 1.0' in metrics.text


async def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(model_dir: Path) -> None:
    received = 0

    async def body() -> Any:
        nonlocal received
        for _ in range(64):
            received += 1
            yield b"\0" * 65536

    async with serve(settings(model_dir, api_keys=KEY)) as (_, client):
        response = await client.post("/segment", content=body(), headers=PNG)
    assert_problem(response, 401, "unauthorized")
    assert received <= 1  # httpx may hand over the first chunk; the service reads none of it


async def test_the_key_never_appears_in_the_logs(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    image = encode_image(random_image(8, 8, seed=2))
    caplog.set_level(logging.DEBUG)
    async with serve(settings(model_dir, api_keys=KEY)) as (_, client):
        await client.post("/segment", content=image, headers={**PNG, "X-API-Key": KEY})
        await client.post("/segment", content=image, headers={**PNG, "Authorization": f"Bearer {KEY}"})
        await client.post("/segment", content=image, headers={**PNG, "X-API-Key": KEY + "-wrong"})
        await client.post("/segment", content=b"garbage", headers={**PNG, "X-API-Key": KEY})
        await client.get(f"/models?key={KEY[:4]}", headers={"Authorization": f"Bearer {KEY}"})
    assert caplog.records, "the service logged nothing: the check would be empty"
    assert any(r.name == "medserve.access" for r in caplog.records)
    for record in caplog.records:
        text = record.getMessage() + repr(record.__dict__)
        assert KEY not in text, record.name


async def test_keys_can_come_from_a_file(model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# integration engine\n{KEY}\n\n{OTHER_KEY}  # monitoring\n")
    image = encode_image(random_image(8, 8, seed=3))
    async with serve(settings(model_dir, api_keys_file=keys)) as (_, client):
        assert_problem(await client.post("/segment", content=image, headers=PNG), 401, "unauthorized")
        ok = await client.post("/segment", content=image, headers={**PNG, "X-API-Key": OTHER_KEY})
        assert ok.status_code == 200


async def test_metrics_can_be_left_open_and_docs_closed(model_dir: Path) -> None:
    config = settings(model_dir, api_keys=KEY, metrics_auth=False, docs_auth=True)
    async with serve(config) as (_, client):
        assert (await client.get("/metrics")).status_code == 200
        for path in ("/openapi.json", "/docs", "/problems/timeout"):
            assert_problem(await client.get(path), 401, "unauthorized")
        assert (await client.get("/openapi.json", headers={"X-API-Key": KEY})).status_code == 200


def test_weak_or_unreadable_keys_stop_the_start_without_showing_the_key(
    model_dir: Path, tmp_path: Path
) -> None:
    from app.auth import load_api_keys
    from app.settings import SettingsError

    short = "short-key"
    with pytest.raises(SettingsError, match="key #2 is shorter than 16") as raised:
        load_api_keys(settings(model_dir, api_keys=f"{KEY},{short}"))
    assert short not in str(raised.value) and KEY not in str(raised.value)
    with pytest.raises(SettingsError, match="MEDSERVE_API_KEYS_FILE"):
        load_api_keys(settings(model_dir, api_keys_file=tmp_path / "missing.txt"))
    assert load_api_keys(settings(model_dir)) is None


def test_key_comparison_checks_every_key() -> None:
    from app.auth import ApiKeys

    keys = ApiKeys([KEY, OTHER_KEY])
    assert keys.check(KEY) and keys.check(OTHER_KEY)
    assert not keys.check(None) and not keys.check("") and not keys.check(KEY[:-1])
    assert not keys.check(KEY + KEY) and not keys.check("\udcff" * 20)
    assert KEY not in repr(keys)


async def test_the_documented_security_is_what_is_enforced(model_dir: Path) -> None:
    """The schemes come from FastAPI's security dependencies; every operation documented as needing a key
    refuses a request without one, and every other one answers it, under both access policies."""
    for overrides in ({}, {"metrics_auth": False, "docs_auth": True}):
        async with serve(settings(model_dir, api_keys=KEY, **overrides)) as (_, client):
            schema = (await client.get("/openapi.json", headers={"X-API-Key": KEY})).json()
            schemes = schema["components"]["securitySchemes"]
            assert schemes["ApiKeyHeader"] == {
                "type": "apiKey",
                "in": "header",
                "name": "X-API-Key",
                "description": schemes["ApiKeyHeader"]["description"],
            }
            assert schemes["BearerToken"]["type"] == "http" and schemes["BearerToken"]["scheme"] == "bearer"
            protected = set()
            for path, operations in schema["paths"].items():
                for method, operation in operations.items():
                    url = path.replace("{slug}", "timeout")
                    response = await client.request(method, url, content=b"", headers=PNG)
                    if "security" in operation:
                        assert operation["security"] == [{"ApiKeyHeader": []}, {"BearerToken": []}]
                        assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
                        assert_problem(response, 401, "unauthorized")
                        protected.add(path)
                    else:
                        assert "401" not in operation["responses"] and response.status_code != 401, path
        expected = {"/segment", "/segment/interactive", "/classify", "/models", "/admin/models/reload"}
        # The Open Inference Protocol: all but its two probes, which are open like /health/*.
        expected |= {
            "/v2",
            "/v2/models/{name}",
            "/v2/models/{name}/ready",
            "/v2/models/{name}/infer",
            "/v2/models/{name}/versions/{version}",
            "/v2/models/{name}/versions/{version}/ready",
            "/v2/models/{name}/versions/{version}/infer",
        }
        # The PACS endpoints (app.pacs): STOW-RS and the jobs API need the key like the others.
        expected |= {"/dicomweb/studies", "/dicomweb/studies/{study_instance_uid}", "/jobs", "/jobs/{job_id}"}
        expected.add("/jobs/{job_id}/retry")
        if overrides:
            expected.add("/problems/{slug}")
        else:
            expected.add("/metrics")
        assert protected == expected


async def test_a_protected_operation_refuses_without_the_middleware_too() -> None:
    """``require_api_key`` checks the key itself: an app assembled without ``ApiKeyAuth`` stays closed."""
    router = APIRouter()

    @router.get("/models")
    async def models() -> dict[str, str]:
        return {"status": "ok"}

    app = FastAPI()
    install_error_handlers(app)
    include_routes(app, router, AccessPolicy())
    app.state.api_keys = ApiKeys([KEY])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://medserve.test") as client:
        missing = await client.get("/models")
        wrong = await client.get("/models", headers={"Authorization": f"Bearer {OTHER_KEY}"})
        ok = await client.get("/models", headers={"Authorization": f"Bearer {KEY}"})
    assert "X-API-Key" in assert_problem(missing, 401, "unauthorized")["detail"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert_problem(wrong, 401, "unauthorized")
    assert ok.status_code == 200 and ok.json() == {"status": "ok"}
