"""Optional API-key authentication: an ASGI middleware in front of every endpoint but the open ones.

Keys come from ``MEDSERVE_API_KEYS`` (comma-separated) and/or ``MEDSERVE_API_KEYS_FILE`` (one key per line,
``#`` comments); with neither, the service is open. A client sends its key as ``X-API-Key: KEY`` or
``Authorization: Bearer KEY``. The presented key is compared with every configured key in constant time
(``hmac.compare_digest`` over SHA-256 digests, so neither the position of the first wrong character nor the
key's length leaks through timing, and no early exit reveals which key matched).

Open without a key: ``/health/live`` and ``/health/ready`` (probes, and their Open Inference Protocol twins
``/v2/health/live`` and ``/v2/health/ready``), the API description (``/docs``,
``/redoc``, ``/openapi.json``) and the problem-type pages (``/problems/...``) unless ``MEDSERVE_DOCS_AUTH`` is
true, ``/metrics`` when ``MEDSERVE_METRICS_AUTH`` is false, and always the viewer page (``/``) and its assets
(``/viewer/...``): they hold no data, and the page asks for the key itself. Everything else, unknown paths
included, needs a key: a caller without one learns nothing, not even which endpoints exist.

Scopes: an entry may be ``KEY:SCOPE+SCOPE`` (scopes ``infer``, ``jobs``, ``admin``); a key without scopes has
``infer`` and ``jobs`` (everything but ``admin``). Each route declares the scope it needs when it is added
(``include_routes(..., scope=...)``, ``declare_scope`` for a mounted app): ``infer`` for the image endpoints,
``jobs`` for jobs and DICOMweb, ``admin`` for everything under ``/admin/``; routes without a scope (``/models``,
``/metrics``, ...) need any valid key. With no keys configured the service is open, except ``/admin/``, which is
then refused (403): replacing models needs a key with the ``admin`` scope.

Refusals are 401 ``application/problem+json`` (``/problems/unauthorized``) with ``WWW-Authenticate`` for a
missing or unknown key, and 403 (``/problems/forbidden``) for a valid key without the route's scope; the
request body is never read. Keys are never logged, echoed or shown in error messages.

In OpenAPI, the key schemes are FastAPI security dependencies (``APIKeyHeader`` and ``HTTPBearer`` in
``require_api_key``): ``include_routes`` adds that dependency to every route the access policy does not open,
so the documented ``securitySchemes`` and each operation's ``security`` are what the middleware enforces.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import Forbidden, NotReady, Problem, Unauthorized, problem_response, retry_after
from app.schemas import problem_responses
from app.settings import Settings, SettingsError, env_name, load_settings

API_KEY_HEADER = "X-API-Key"
MIN_KEY_LENGTH = 16
# Printable ASCII without spaces or commas: a key must survive HTTP headers and the comma-separated variable.
_KEY_CHARS = re.compile(r"^[\x21-\x2b\x2d-\x7e]+$")
_BEARER = re.compile(r"^bearer[ \t]+(\S+)[ \t]*$", re.IGNORECASE)

HEALTH_PATHS = frozenset({"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PROBLEMS_PREFIX = "/problems/"
METRICS_PATH = "/metrics"
VIEWER_PAGE = "/"  # the viewer (app.viewer) and its assets: no data in them, so open whatever the policy
VIEWER_PREFIX = "/viewer/"
WWW_AUTHENTICATE = 'Bearer realm="medserve", charset="UTF-8"'
ADMIN_PREFIX = "/admin/"

# The scopes a key may have, and what a key listed without any has (today's rights: all but admin).
INFER, JOBS, ADMIN = "infer", "jobs", "admin"
SCOPES = (INFER, JOBS, ADMIN)
DEFAULT_SCOPES = frozenset({INFER, JOBS})
_SCOPE_LIST = re.compile(r"^[a-z]+(\+[a-z]+)*$")


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def split_scopes(entry: str, position: int, source: str) -> tuple[str, frozenset[str]]:
    """An entry's key and scopes: ``KEY:SCOPE+SCOPE``, or ``KEY`` with ``DEFAULT_SCOPES``.

    The part after the last ``:`` is a scope list when it is lower-case words joined by ``+``; otherwise the
    whole entry is the key.

    Raises:
        ValueError: an unknown scope (the message names it and the key's position, never the key).
    """
    key, colon, suffix = entry.rpartition(":")
    if not colon or not key or not _SCOPE_LIST.match(suffix):
        return entry, DEFAULT_SCOPES
    scopes = suffix.split("+")
    unknown = sorted({scope for scope in scopes if scope not in SCOPES})
    if unknown:
        raise ValueError(
            f"{source}: key #{position} has unknown scope(s) {', '.join(unknown)} (known: {', '.join(SCOPES)})"
        )
    return key, frozenset(scopes)


class ApiKeys:
    """The configured keys, kept only as SHA-256 digests, each with its scopes.

    Args:
        keys: the entries, ``KEY`` or ``KEY:SCOPE+SCOPE`` (``split_scopes``); each key at least
            ``MIN_KEY_LENGTH`` printable ASCII characters, no spaces or commas.
        source: where they came from, for error messages (never the keys themselves).

    Raises:
        ValueError: an empty list, a key that is too short or has characters a header cannot carry, or an
            unknown scope; the message gives the key's position, never its value.
    """

    def __init__(self, keys: Iterable[str], source: str = "API keys") -> None:
        granted: dict[bytes, frozenset[str]] = {}
        for position, entry in enumerate(keys, start=1):
            key, scopes = split_scopes(entry, position, source)
            if len(key) < MIN_KEY_LENGTH:
                raise ValueError(f"{source}: key #{position} is shorter than {MIN_KEY_LENGTH} characters")
            if not _KEY_CHARS.match(key):
                raise ValueError(
                    f"{source}: key #{position} has characters other than printable ASCII "
                    "(no spaces or commas)"
                )
            digest = _digest(key.encode("ascii"))
            granted[digest] = granted.get(digest, frozenset()) | scopes  # a key listed twice has both
        if not granted:
            raise ValueError(f"{source}: no keys")
        self._digests = tuple(granted)
        self._scopes = tuple(granted.values())

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self)} key(s))"

    def check(self, presented: str | None) -> bool:
        """True when ``presented`` equals one of the keys; constant time in the key compared and its length."""
        return self.scopes(presented) is not None

    def scopes(self, presented: str | None) -> frozenset[str] | None:
        """The scopes of ``presented``; None when it is no configured key. Every key is compared, in constant
        time, as in ``check``."""
        if presented is None:
            return None
        candidate = _digest(presented.encode("utf-8", "surrogateescape"))
        found: frozenset[str] | None = None
        for digest, scopes in zip(self._digests, self._scopes, strict=True):
            if hmac.compare_digest(candidate, digest):  # every key is compared: no early exit
                found = scopes
        return found


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _read_key_file(path: Path) -> list[str]:
    variable = env_name("api_keys_file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{variable}={str(path)!r}: cannot be read ({type(exc).__name__})") from exc
    keys = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            keys.append(line)
    if not keys:
        raise SettingsError(f"{variable}={str(path)!r}: the file holds no key")
    return keys


def load_api_keys(settings: Settings) -> ApiKeys | None:
    """The keys of ``MEDSERVE_API_KEYS`` and ``MEDSERVE_API_KEYS_FILE`` together; None when neither is set.

    Raises:
        SettingsError: unreadable or empty file, or an invalid key (named by position, never shown).
    """
    keys: list[str] = []
    sources = []
    if settings.api_keys is not None:
        inline = _split(settings.api_keys.get_secret_value())
        if not inline:
            raise SettingsError(f"{env_name('api_keys')} is set but holds no key")
        keys += inline
        sources.append(env_name("api_keys"))
    if settings.api_keys_file is not None:
        keys += _read_key_file(settings.api_keys_file)
        sources.append(env_name("api_keys_file"))
    if not keys:
        return None
    try:
        return ApiKeys(keys, source=" + ".join(sources))
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str | None, bool]:
    """The key a request carries (``X-API-Key`` first, else a Bearer token) and whether any was sent."""
    api_key = None
    authorization = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"x-api-key" and api_key is None:
            api_key = value.decode("latin-1").strip()
        elif lowered == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
    if api_key:
        return api_key, True
    if authorization is not None:
        match = _BEARER.match(authorization)
        return (match.group(1) if match else None), True
    return None, False


@dataclass(frozen=True)
class AccessPolicy:
    """Which paths are open without a key."""

    docs_open: bool = True
    metrics_open: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        return cls(docs_open=not settings.docs_auth, metrics_open=not settings.metrics_auth)

    @classmethod
    def from_environment(cls) -> AccessPolicy:
        """The policy of the ``MEDSERVE_*`` settings; the defaults when they are invalid (startup then fails
        with the settings error)."""
        try:
            return cls.from_settings(load_settings())
        except SettingsError:
            return cls()

    def is_open(self, path: str) -> bool:
        if path in HEALTH_PATHS or path == VIEWER_PAGE or path.startswith(VIEWER_PREFIX):
            return True
        if path in DOCS_PATHS or path.startswith(PROBLEMS_PREFIX):
            return self.docs_open
        if path == METRICS_PATH:
            return self.metrics_open
        return False


@dataclass
class RouteScopes:
    """The scope each path needs (None: any valid key): ``/admin/...`` always ``admin``; the others as declared
    by ``include_routes(..., scope=)`` (the route's path pattern) and ``declare_scope`` (a path prefix)."""

    patterns: list[tuple[re.Pattern[str], str]] = field(default_factory=list)
    prefixes: list[tuple[str, str]] = field(default_factory=list)

    def needed(self, path: str) -> str | None:
        if path.startswith(ADMIN_PREFIX) or path == ADMIN_PREFIX.rstrip("/"):
            return ADMIN
        for pattern, scope in self.patterns:
            if pattern.match(path):
                return scope
        for prefix, scope in self.prefixes:
            if path == prefix.rstrip("/") or path.startswith(prefix.rstrip("/") + "/"):
                return scope
        return None


def route_scopes(app: FastAPI) -> RouteScopes:
    """The app's ``RouteScopes`` (made on first use)."""
    table: RouteScopes | None = getattr(app.state, "route_scopes", None)
    if table is None:
        table = app.state.route_scopes = RouteScopes()
    return table


def declare_scope(app: FastAPI, prefix: str, scope: str) -> None:
    """Every path under ``prefix`` (e.g. a mounted ``/dicomweb`` app) needs ``scope``.

    Raises:
        ValueError: an unknown scope.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r} (known: {', '.join(SCOPES)})")
    route_scopes(app).prefixes.append((prefix, scope))


def refusal(keys: ApiKeys, headers: Iterable[tuple[bytes, bytes]]) -> Unauthorized | None:
    """The 401 for a request without a valid key among ``headers``; None when its key is valid."""
    key, sent = presented_key(headers)
    if keys.check(key):
        return None
    detail = (
        "the API key is not valid"
        if sent
        else f"an API key is required: send it as '{API_KEY_HEADER}: KEY' or 'Authorization: Bearer KEY'"
    )
    return Unauthorized(detail, headers={"WWW-Authenticate": WWW_AUTHENTICATE})


def access_refusal(
    keys: ApiKeys | None, headers: Iterable[tuple[bytes, bytes]], scope: str | None
) -> Unauthorized | Forbidden | None:
    """Why a request to a path needing ``scope`` (None: any valid key) is refused: 401 without a valid key
    (``refusal``), 403 for a key without the scope, and 403 for ``admin`` when no keys are configured; None when
    it is allowed."""
    if keys is None:
        if scope == ADMIN:
            return Forbidden(
                "admin endpoints need an API key with the admin scope, and no API keys are configured "
                "(MEDSERVE_API_KEYS, e.g. KEY:admin)"
            )
        return None
    headers = list(headers)
    unauthorized = refusal(keys, headers)
    if unauthorized is not None or scope is None:
        return unauthorized
    granted = keys.scopes(presented_key(headers)[0]) or frozenset()
    if scope in granted:
        return None
    return Forbidden(f"this API key lacks the {scope!r} scope this endpoint needs")


class ApiKeyAuth:
    """ASGI middleware: refuses requests to protected paths without a valid key (401) or without the path's scope
    (403), before any body is read.

    It reads ``app.state.api_keys`` (``ApiKeys`` or None: no authentication) and ``app.state.access_policy``,
    both set by the lifespan, and ``app.state.route_scopes`` (``RouteScopes``, filled by ``include_routes`` and
    ``declare_scope``). Before the lifespan has run, protected paths answer 503 (fail closed).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = getattr(scope.get("app"), "state", None)
        policy: AccessPolicy | None = getattr(state, "access_policy", None)
        path: str = scope["path"]
        if policy is None:
            if path in HEALTH_PATHS:
                await self.app(scope, receive, send)
            else:
                starting = NotReady("the service is starting", headers=retry_after(5))
                await problem_response(starting, path=path)(scope, receive, send)
            return
        keys: ApiKeys | None = getattr(state, "api_keys", None)
        table: RouteScopes = getattr(state, "route_scopes", None) or RouteScopes()
        problem: Problem | None = None
        if not policy.is_open(path):
            problem = access_refusal(keys, scope.get("headers", []), table.needed(path))
        if problem is None:
            await self.app(scope, receive, send)
        else:
            await problem_response(problem, path=path)(scope, receive, send)


# -- OpenAPI: the key schemes as FastAPI security dependencies -------------------------------------------

KEYS_NOTE = "needed only when the service is configured with MEDSERVE_API_KEYS or MEDSERVE_API_KEYS_FILE"
API_KEY_SCHEME = APIKeyHeader(
    name=API_KEY_HEADER, scheme_name="ApiKeyHeader", description=f"API key ({KEYS_NOTE})", auto_error=False
)
BEARER_SCHEME = HTTPBearer(
    scheme_name="BearerToken", description=f"the API key as a token ({KEYS_NOTE})", auto_error=False
)


async def require_api_key(
    request: Request,
    api_key: Annotated[str | None, Security(API_KEY_SCHEME)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER_SCHEME)],
) -> None:
    """The key requirement of a protected operation, declared so that OpenAPI documents both schemes.

    ``ApiKeyAuth`` refused a request without a valid key before its body was read (this runs before the route
    reads it too, but cannot refuse unknown paths or the docs); checking here again keeps a protected
    operation closed even in an app assembled without the middleware. ``api_key`` and ``bearer`` (what
    FastAPI parsed) are not used: the one parser is ``presented_key``.
    """
    keys: ApiKeys | None = getattr(request.app.state, "api_keys", None)
    problem = None if keys is None else refusal(keys, request.scope.get("headers", []))
    if problem is not None:
        raise problem


def require_scope(scope: str) -> Callable[..., Awaitable[None]]:
    """The requirement of an operation that needs ``scope``: as ``require_api_key``, and 403 for a key without
    the scope (or, for ``admin``, when no keys are configured)."""

    async def require(
        request: Request,
        api_key: Annotated[str | None, Security(API_KEY_SCHEME)],
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER_SCHEME)],
    ) -> None:
        keys: ApiKeys | None = getattr(request.app.state, "api_keys", None)
        problem = access_refusal(keys, request.scope.get("headers", []), scope)
        if problem is not None:
            raise problem

    return require


def unauthorized_response() -> dict[str, Any]:
    """The OpenAPI 401 response of a protected operation."""
    entry = problem_responses(401)[401]
    entry["headers"] = {
        "WWW-Authenticate": {"description": "the accepted scheme", "schema": {"type": "string"}}
    }
    return entry


def include_routes(app: FastAPI, router: APIRouter, policy: AccessPolicy, scope: str | None = None) -> None:
    """Adds ``router``'s routes to ``app``; those ``policy`` does not open declare the key requirement
    (``require_api_key``), so the OpenAPI schemes and each operation's ``security`` follow what is enforced.

    ``scope``: the scope its (protected) routes need (``infer``, ``jobs`` or ``admin``; None: any valid key);
    routes under ``/admin/`` need ``admin`` whatever is given here. The middleware enforces it by path.

    Raises:
        ValueError: an unknown scope.
    """
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r} (known: {', '.join(SCOPES)})")
    table = route_scopes(app)
    open_routes = [route for route in router.routes if policy.is_open(getattr(route, "path", ""))]
    protected = [route for route in router.routes if route not in open_routes]
    app.include_router(APIRouter(routes=open_routes))
    by_scope: dict[str | None, list[Any]] = {}
    for route in protected:
        needed = table.needed(getattr(route, "path", "")) or scope
        by_scope.setdefault(needed, []).append(route)
        pattern = getattr(route, "path_regex", None)
        if needed is not None and pattern is not None:
            table.patterns.append((pattern, needed))
    for needed, routes in by_scope.items():
        if needed is None:
            app.include_router(
                APIRouter(routes=routes),
                dependencies=[Depends(require_api_key)],
                responses={401: unauthorized_response()},
            )
        else:
            app.include_router(
                APIRouter(routes=routes),
                dependencies=[Depends(require_scope(needed))],
                responses={401: unauthorized_response(), **forbidden_response(needed)},
            )


def forbidden_response(scope: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI 403 response of an operation needing ``scope``."""
    entry = problem_responses(403)[403]
    entry["description"] = f"the API key lacks the {scope!r} scope" + (
        "; also when no API keys are configured" if scope == ADMIN else ""
    )
    return {403: entry}
