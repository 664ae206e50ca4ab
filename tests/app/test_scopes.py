"""API key scopes: ``KEY:SCOPE+SCOPE`` entries, each route's scope, 403 for a key without it, 401 unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from app.auth import (
    DEFAULT_SCOPES,
    AccessPolicy,
    ApiKeyAuth,
    ApiKeys,
    declare_scope,
    include_routes,
    load_api_keys,
)
from app.errors import install_error_handlers
from app.settings import SettingsError
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

PLAIN = "plain-Hj7Kl9Zx1Cv3Bn5Mq7Wr"  # no scopes: today's rights
INFER = "inf-Qa2Ws4Ed6Rf8Tg0Yh2Uj"
ADMIN = "adm-Po9Iu7Yt5Re3Wq1As3Df"
JOBS = "job-Lk8Jh6Gf4Ds2Az0Xc8Vb"
EVERYTHING = "all-Mn3Bv5Cx7Za9Sd1Fg3Hj"
IMAGE = encode_image(random_image(8, 8, seed=1))
KEYS = f"{PLAIN},{INFER}:infer,{ADMIN}:admin,{JOBS}:jobs,{EVERYTHING}:infer+jobs+admin"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    save_pixel_model(tmp_path / "pixel.pt")
    return tmp_path


def test_entries_carry_scopes_and_a_plain_key_keeps_everything_but_admin() -> None:
    keys = ApiKeys([PLAIN, f"{INFER}:infer", f"{EVERYTHING}:admin+infer+jobs", f"{JOBS}:jobs"])
    assert keys.scopes(PLAIN) == DEFAULT_SCOPES == frozenset({"infer", "jobs"})
    assert keys.scopes(INFER) == frozenset({"infer"})
    assert keys.scopes(EVERYTHING) == frozenset({"infer", "jobs", "admin"})
    assert keys.scopes(f"{INFER}:infer") is None  # the scope list is not part of the key
    assert keys.scopes(ADMIN) is None and keys.scopes(None) is None
    assert keys.check(INFER) and not keys.check(ADMIN)
    assert len(keys) == 4 and INFER not in repr(keys)


def test_a_key_listed_twice_has_the_scopes_of_both_entries() -> None:
    keys = ApiKeys([f"{INFER}:infer", f"{INFER}:admin"])
    assert keys.scopes(INFER) == frozenset({"infer", "admin"}) and len(keys) == 1


def test_a_colon_followed_by_no_scope_list_is_part_of_the_key() -> None:
    key = "colon:Ab3-Cd5-Ef7-Gh9-Ij1"
    assert ApiKeys([key]).scopes(key) == DEFAULT_SCOPES


def test_unknown_scopes_are_refused_naming_the_position_not_the_key(model_dir: Path) -> None:
    with pytest.raises(SettingsError, match=r"key #2 has unknown scope\(s\) amdin") as refused:
        load_api_keys(settings(model_dir, api_keys=f"{PLAIN},{INFER}:infer+amdin"))
    assert INFER not in str(refused.value)


def test_the_keys_file_takes_scoped_lines(model_dir: Path, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# operators\n{ADMIN}:admin  # reloads models\n{INFER}\n")
    keys = load_api_keys(settings(model_dir, api_keys_file=keys_file))
    assert keys is not None
    assert keys.scopes(ADMIN) == frozenset({"admin"}) and keys.scopes(INFER) == DEFAULT_SCOPES


async def test_each_endpoint_needs_its_scope(model_dir: Path) -> None:
    async with serve(settings(model_dir, api_keys=KEYS, model_poll_s=0.0)) as (_, client):

        async def status(key: str | None, method: str, path: str) -> int:
            headers = {**PNG, **({"X-API-Key": key} if key else {})}
            content = IMAGE if method == "POST" else None
            return (await client.request(method, path, content=content, headers=headers)).status_code

        table = {
            key: [
                await status(key, "POST", "/segment"),
                await status(key, "POST", "/classify"),
                await status(key, "POST", "/admin/models/reload"),
                await status(key, "GET", "/models"),
                await status(key, "GET", "/metrics"),
            ]
            for key in (PLAIN, INFER, ADMIN, JOBS, EVERYTHING, None, "not-a-key-Zz9Yy8Xx7Ww6")
        }
        forbidden = await client.post("/admin/models/reload", headers={"X-API-Key": INFER})
        bearer = await client.post(
            "/segment", content=IMAGE, headers={**PNG, "Authorization": f"Bearer {ADMIN}"}
        )
    # /classify: no classifier is served (404) once the key may infer
    assert table == {
        PLAIN: [200, 404, 403, 200, 200],
        INFER: [200, 404, 403, 200, 200],
        ADMIN: [403, 403, 200, 200, 200],
        JOBS: [403, 403, 403, 200, 200],
        EVERYTHING: [200, 404, 200, 200, 200],
        None: [401, 401, 401, 401, 401],
        "not-a-key-Zz9Yy8Xx7Ww6": [401, 401, 401, 401, 401],
    }
    assert "'admin' scope" in assert_problem(forbidden, 403, "forbidden")["detail"]
    assert "www-authenticate" not in forbidden.headers
    assert_problem(bearer, 403, "forbidden")


async def test_without_keys_the_api_is_open_but_admin_endpoints_are_refused(model_dir: Path) -> None:
    async with serve(settings(model_dir, model_poll_s=0.0)) as (_, client):
        segment = await client.post("/segment", content=IMAGE, headers=PNG)
        admin = await client.post("/admin/models/reload")
    assert segment.status_code == 200
    assert "no API keys are configured" in assert_problem(admin, 403, "forbidden")["detail"]


async def test_a_key_without_the_scope_is_refused_before_the_body_is_read(model_dir: Path) -> None:
    """The middleware refuses by path: the body (here a stream that fails if read) is never consumed."""

    async def body() -> AsyncIterator[bytes]:
        raise AssertionError("the body was read")
        yield b""  # pragma: no cover

    async with serve(settings(model_dir, api_keys=KEYS, model_poll_s=0.0)) as (_, client):
        refused = await client.post("/segment", content=body(), headers={**PNG, "X-API-Key": ADMIN})
    assert_problem(refused, 403, "forbidden")


async def test_routers_declare_their_scope_and_openapi_documents_the_403(tmp_path: Path) -> None:
    jobs = APIRouter()

    @jobs.get("/jobs/{job_id}")
    async def job(job_id: str) -> dict[str, str]:
        return {"id": job_id}

    mounted = FastAPI()

    @mounted.get("/studies")
    async def studies() -> list[str]:
        return []

    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(ApiKeyAuth)
    include_routes(app, jobs, AccessPolicy(), scope="jobs")
    app.mount("/dicomweb", mounted)
    declare_scope(app, "/dicomweb", "jobs")
    app.state.access_policy = AccessPolicy()
    app.state.api_keys = ApiKeys([f"{JOBS}:jobs", f"{INFER}:infer"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://medserve.test") as client:
        allowed = await client.get("/jobs/7", headers={"X-API-Key": JOBS})
        refused = await client.get("/jobs/7", headers={"X-API-Key": INFER})
        mount_allowed = await client.get("/dicomweb/studies", headers={"X-API-Key": JOBS})
        mount_refused = await client.get("/dicomweb/studies", headers={"X-API-Key": INFER})
        schema = (await client.get("/openapi.json", headers={"X-API-Key": JOBS})).json()
    assert allowed.json() == {"id": "7"}
    assert_problem(refused, 403, "forbidden")
    assert mount_allowed.status_code == 200
    assert_problem(mount_refused, 403, "forbidden")
    operation = schema["paths"]["/jobs/{job_id}"]["get"]
    assert "403" in operation["responses"] and "'jobs' scope" in operation["responses"]["403"]["description"]
    with pytest.raises(ValueError, match="unknown scope"):
        include_routes(app, APIRouter(), AccessPolicy(), scope="root")


async def test_a_scoped_operation_refuses_without_the_middleware_too(model_dir: Path) -> None:
    """``require_scope`` checks the scope itself, as ``require_api_key`` checks the key."""
    router = APIRouter()

    @router.post("/admin/thing")
    async def thing() -> dict[str, str]:
        return {"status": "done"}

    app = FastAPI()
    install_error_handlers(app)
    include_routes(app, router, AccessPolicy())
    app.state.api_keys = ApiKeys([f"{INFER}:infer", f"{ADMIN}:admin"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://medserve.test") as client:
        refused = await client.post("/admin/thing", headers={"X-API-Key": INFER})
        missing = await client.post("/admin/thing")
        done = await client.post("/admin/thing", headers={"X-API-Key": ADMIN})
    assert_problem(refused, 403, "forbidden")
    assert_problem(missing, 401, "unauthorized")
    assert done.json() == {"status": "done"}
