"""Optional API-key authentication: an ASGI middleware in front of every endpoint but the open ones.

Keys come from ``MEDSERVE_API_KEYS`` (comma-separated) and/or ``MEDSERVE_API_KEYS_FILE`` (one key per line,
``#`` comments); with neither, the service is open. A client sends its key as ``X-API-Key: KEY`` or
``Authorization: Bearer KEY``. The presented key is compared with every configured key in constant time
(``hmac.compare_digest`` over SHA-256 digests, so neither the position of the first wrong character nor the
key's length leaks through timing, and no early exit reveals which key matched).

Open without a key: ``/health/live`` and ``/health/ready`` (probes), the API description (``/docs``,
``/redoc``, ``/openapi.json``) and the problem-type pages (``/problems/...``) unless ``MEDSERVE_DOCS_AUTH`` is
true, and ``/metrics`` when ``MEDSERVE_METRICS_AUTH`` is false. Everything else, unknown paths included, needs
a key: a caller without one learns nothing, not even which endpoints exist.

Refusals are 401 ``application/problem+json`` (``/problems/unauthorized``) with ``WWW-Authenticate``; the
request body is never read. Keys are never logged, echoed or shown in error messages.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import NotReady, Unauthorized, problem_response, retry_after
from app.settings import Settings, SettingsError, env_name

API_KEY_HEADER = "X-API-Key"
MIN_KEY_LENGTH = 16
# Printable ASCII without spaces or commas: a key must survive HTTP headers and the comma-separated variable.
_KEY_CHARS = re.compile(r"^[\x21-\x2b\x2d-\x7e]+$")
_BEARER = re.compile(r"^bearer[ \t]+(\S+)[ \t]*$", re.IGNORECASE)

HEALTH_PATHS = frozenset({"/health/live", "/health/ready"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PROBLEMS_PREFIX = "/problems/"
METRICS_PATH = "/metrics"
WWW_AUTHENTICATE = 'Bearer realm="medserve", charset="UTF-8"'


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class ApiKeys:
    """The configured keys, kept only as SHA-256 digests.

    Args:
        keys: the keys; each at least ``MIN_KEY_LENGTH`` printable ASCII characters, no spaces or commas.
        source: where they came from, for error messages (never the keys themselves).

    Raises:
        ValueError: an empty list, or a key that is too short or has characters a header cannot carry; the
            message gives the key's position, never its value.
    """

    def __init__(self, keys: Iterable[str], source: str = "API keys") -> None:
        digests = []
        for position, key in enumerate(keys, start=1):
            if len(key) < MIN_KEY_LENGTH:
                raise ValueError(f"{source}: key #{position} is shorter than {MIN_KEY_LENGTH} characters")
            if not _KEY_CHARS.match(key):
                raise ValueError(
                    f"{source}: key #{position} has characters other than printable ASCII "
                    "(no spaces or commas)"
                )
            digests.append(_digest(key.encode("ascii")))
        if not digests:
            raise ValueError(f"{source}: no keys")
        self._digests = tuple(dict.fromkeys(digests))

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self)} key(s))"

    def check(self, presented: str | None) -> bool:
        """True when ``presented`` equals one of the keys; constant time in the key compared and its length."""
        if presented is None:
            return False
        candidate = _digest(presented.encode("utf-8", "surrogateescape"))
        matched = False
        for digest in self._digests:  # every key is compared: no early exit tells which one matched
            matched |= hmac.compare_digest(candidate, digest)
        return matched


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

    def is_open(self, path: str) -> bool:
        if path in HEALTH_PATHS:
            return True
        if path in DOCS_PATHS or path.startswith(PROBLEMS_PREFIX):
            return self.docs_open
        if path == METRICS_PATH:
            return self.metrics_open
        return False


class ApiKeyAuth:
    """ASGI middleware: refuses requests to protected paths without a valid key (401), before any body is read.

    It reads ``app.state.api_keys`` (``ApiKeys`` or None: no authentication) and ``app.state.access_policy``,
    both set by the lifespan. Before the lifespan has run, protected paths answer 503 (fail closed).
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
                await problem_response(starting)(scope, receive, send)
            return
        keys: ApiKeys | None = getattr(state, "api_keys", None)
        if keys is None or policy.is_open(path):
            await self.app(scope, receive, send)
            return
        key, sent = presented_key(scope.get("headers", []))
        if keys.check(key):
            await self.app(scope, receive, send)
            return
        detail = (
            "the API key is not valid"
            if sent
            else f"an API key is required: send it as '{API_KEY_HEADER}: KEY' or 'Authorization: Bearer KEY'"
        )
        problem = Unauthorized(detail, headers={"WWW-Authenticate": WWW_AUTHENTICATE})
        await problem_response(problem)(scope, receive, send)


# -- OpenAPI ----------------------------------------------------------------------------------------------

API_KEY_SCHEME = "ApiKeyHeader"
BEARER_SCHEME = "BearerToken"


def _unauthorized_response() -> dict[str, Any]:
    from app.schemas import problem_responses  # the one place that describes problem bodies

    entry = problem_responses(401)[401]
    entry["headers"] = {
        "WWW-Authenticate": {"description": "the accepted scheme", "schema": {"type": "string"}}
    }
    return entry


def document_security(app: FastAPI) -> None:
    """Adds the two key schemes, and a 401 response to every protected operation, to the app's OpenAPI.

    Which operations are protected follows the policy in force (``app.state.access_policy``, the defaults
    before startup). The description says keys apply only when the service has some configured.
    """
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # cached by FastAPI after the first call
        if "securitySchemes" in schema.get("components", {}):
            return schema
        policy: AccessPolicy = getattr(app.state, "access_policy", None) or AccessPolicy()
        note = "needed only when the service is configured with MEDSERVE_API_KEYS or MEDSERVE_API_KEYS_FILE"
        schema.setdefault("components", {})["securitySchemes"] = {
            API_KEY_SCHEME: {
                "type": "apiKey",
                "in": "header",
                "name": API_KEY_HEADER,
                "description": f"API key ({note})",
            },
            BEARER_SCHEME: {
                "type": "http",
                "scheme": "bearer",
                "description": f"the API key as a token ({note})",
            },
        }
        unauthorized = _unauthorized_response()
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                if policy.is_open(path):
                    operation["security"] = []
                    continue
                operation["security"] = [{API_KEY_SCHEME: []}, {BEARER_SCHEME: []}]
                operation.setdefault("responses", {}).setdefault("401", unauthorized)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
