"""The FastAPI application: ``create_app(settings)`` for tests and the CLI, ``app`` for ``uvicorn app.main:app``.

Startup runs in the lifespan: settings are validated (a clear ``SettingsError`` otherwise), the device resolved,
and the models are loaded, warmed up and given their batchers by a background task, so that
``/health/live`` answers at once and ``/health/ready`` says 503 until loading is over. Shutdown stops every
batcher after it has run what it accepted, then the thread pool.

Around the routes (outermost first): ``RequestContext`` (request id, access log, metrics), ``ApiKeyAuth``
(optional API keys), ``BodySizeLimit`` (``MAX_UPLOAD_BYTES`` while the body is read). ``GET /metrics`` comes
from ``app.metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI

from app.auth import AccessPolicy, ApiKeyAuth, include_routes, load_api_keys
from app.errors import install_error_handlers
from app.explain import Explanations
from app.logs import configure_logging
from app.metrics import ServiceMetrics
from app.metrics import router as metrics_router
from app.middleware import RequestContext
from app.registry import ModelRegistry
from app.routes import image_router, router
from app.settings import Settings, SettingsError, check_runtime, env_name, load_settings
from app.uploads import BodySizeLimit
from models import __version__
from models.inference import resolve_device

logger = logging.getLogger("medserve.app")

DESCRIPTION = """Segmentation and classification of medical images (PNG, JPEG, TIFF, BMP, DICOM) with dynamic
batching. Errors are `application/problem+json` (RFC 9457); `GET /problems/{slug}` explains each type."""


IO_THREAD_NICENESS = 5


def _init_io_thread() -> None:
    """Start-up of each decode/encode thread.

    Its torch ops (normalisation, resizing) run single-threaded: a thread calling a parallel op would otherwise
    start its own OpenMP team and compete with the model's threads for the cores. It also runs at a lower
    scheduling priority (Linux: per-thread niceness), so that on a busy CPU it fills the gaps the model's
    threads leave instead of pre-empting one of them: the others would wait for it at the end of every
    parallel region. Decoding keeps up anyway: under load, requests wait in the queue far longer.
    """
    torch.set_num_threads(1)
    if hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), IO_THREAD_NICENESS)


def _startup_settings(app: FastAPI) -> Settings:
    settings: Settings | None = app.state.configured_settings
    if settings is None:
        settings = load_settings()
    check_runtime(settings)
    return settings


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # JSON logs on stderr unless logging was configured by someone else (a --log-config, a test runner); this
    # also imports models.dicom, whose import withholds pydicom's messages (they may quote tag values).
    configure_logging(only_if_unconfigured=True)
    try:
        settings = _startup_settings(app)
        configure_logging(settings.log_format, settings.log_level, only_if_unconfigured=True)
        try:
            device = resolve_device(settings.device)
        except ValueError as exc:
            raise SettingsError(f"{env_name('device')}={settings.device!r}: {exc}") from exc
        api_keys = load_api_keys(settings)
    except SettingsError as exc:
        logger.error("%s", exc)
        raise
    app.state.api_keys = api_keys
    # Enforced as declared on the routes (and so documented), whatever the environment says by now.
    app.state.access_policy = app.state.declared_access_policy
    if api_keys is None:
        logger.warning("no API keys configured (MEDSERVE_API_KEYS / MEDSERVE_API_KEYS_FILE): the API is open")
    else:
        logger.info(
            "%d API key(s) configured; /metrics %s, docs %s",
            len(api_keys),
            "protected" if settings.metrics_auth else "open",
            "protected" if settings.docs_auth else "open",
        )
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    model_threads = torch.get_num_threads()
    if settings.precision != "fp32" and device.type != "cuda":
        logger.info(
            "%s=%s applies on CUDA only; running fp32 on %s",
            env_name("precision"),
            settings.precision,
            device,
        )
    pool = ThreadPoolExecutor(
        max_workers=settings.decode_workers, thread_name_prefix="medserve-io", initializer=_init_io_thread
    )
    metrics: ServiceMetrics = app.state.metrics
    registry = ModelRegistry(settings, device, model_threads=model_threads, on_batch=metrics.observe_batch)
    metrics.bind(registry)
    app.state.settings = settings
    app.state.pool = pool
    app.state.registry = registry
    app.state.explanations = explanations = Explanations(settings)
    logger.info("loading %d checkpoint(s) from %s onto %s", len(registry.models), settings.model_dir, device)
    loading = asyncio.create_task(registry.load_all(), name="load-models")
    try:
        yield
    finally:
        if not loading.done():
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
        waiting = sum(
            h.batcher.queue_depth + h.batcher.announced for h in registry.models.values() if h.batcher
        )
        logger.info("shutting down: running the %d request(s) still queued, then stopping", waiting)
        await registry.close()
        await explanations.close()
        pool.shutdown(wait=True)
        logger.info("stopped")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Builds the app. ``settings=None`` reads ``MEDSERVE_*`` from the environment at startup."""
    app = FastAPI(title="MedServe", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.configured_settings = settings
    app.state.metrics = ServiceMetrics()  # its own registry: several apps in one process never clash
    install_error_handlers(app)
    # Outermost last: request id, access log and metrics see every request, refusals included; unauthenticated
    # requests are refused before any body is read; the size limit applies while the body is read.
    app.add_middleware(BodySizeLimit)
    app.add_middleware(ApiKeyAuth)
    app.add_middleware(RequestContext)
    # Which operations need a key is fixed here, so that OpenAPI documents what the middleware enforces.
    policy = AccessPolicy.from_settings(settings) if settings is not None else AccessPolicy.from_environment()
    app.state.declared_access_policy = policy
    for routes in (image_router(), router, metrics_router):  # the image routes follow the output formats
        include_routes(app, routes, policy)
    return app


app = create_app()
