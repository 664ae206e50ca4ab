"""The FastAPI application: ``create_app(settings)`` for tests and the CLI, ``app`` for ``uvicorn app.main:app``.

Startup runs in the lifespan: settings are validated (a clear ``SettingsError`` otherwise), the device resolved,
and the models are loaded, warmed up and given their batchers by a background task, so that
``/health/live`` answers at once and ``/health/ready`` says 503 until loading is over. Shutdown stops every
batcher after it has run what it accepted, then the thread pool.

Around the routes (outermost first): ``RequestContext`` (request id, access log, metrics), ``ApiKeyAuth``
(optional API keys), ``BodySizeLimit`` (``MAX_UPLOAD_BYTES`` while the body is read). ``GET /metrics`` comes
from ``app.metrics``; ``GET /`` (the viewer page) and ``GET /viewer/{name}`` from ``app.viewer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI

from app import admin
from app.auth import ADMIN, INFER, JOBS, AccessPolicy, ApiKeyAuth, include_routes, load_api_keys
from app.errors import install_error_handlers
from app.explain import Explanations
from app.kserve import router as kserve_router
from app.logs import configure_logging
from app.metrics import ServiceMetrics
from app.metrics import router as metrics_router
from app.middleware import RequestContext
from app.pacs.dimse import IntakeLike
from app.pacs.dimse_node import DimseProcess, dimse_server_from_settings
from app.pacs.jobs import router as jobs_router
from app.pacs.service import open_pacs
from app.pacs.stow import router as stow_router
from app.registry import ModelRegistry
from app.routes import image_router, router
from app.settings import Settings, SettingsError, check_runtime, env_name, load_settings
from app.uploads import BodySizeLimit
from app.viewer import viewer_router
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


def _current_intake(app: FastAPI) -> IntakeLike | None:
    pacs = getattr(app.state, "pacs", None)
    return pacs.intake if pacs is not None else None


def _start_dimse(dimse: DimseProcess, settings: Settings) -> None:
    """Starts the DICOM node. With several workers (``MEDSERVE_WORKERS``) the first to bind the port takes the
    associations; the others go on without it (their jobs come from the same store)."""
    try:
        dimse.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and settings.workers > 1:
            logger.warning(
                "%s=%d is held by another worker of this service (%s=%d): this worker takes no DICOM "
                "associations",
                env_name("dimse_port"),
                settings.dimse_port,
                env_name("workers"),
                settings.workers,
            )
            return
        error = SettingsError(f"{env_name('dimse_port')}={settings.dimse_port}: cannot listen ({exc})")
        logger.error("%s", error)
        raise error from exc


async def _load_and_watch(registry: ModelRegistry, poll_s: float) -> None:
    """Loads every model, then watches the model directory (``MODEL_POLL_S``; 0: no watcher)."""
    await registry.load_all()
    if poll_s > 0:
        await registry.watch(poll_s)


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
        # DICOM node (MEDSERVE_DIMSE_PORT): its C-STOREs go to the job system's intake
        dimse = dimse_server_from_settings(settings, lambda: _current_intake(app))
    except SettingsError as exc:
        logger.error("%s", exc)
        raise
    app.state.api_keys = api_keys
    app.state.dimse = dimse
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
    try:  # the job system (app.pacs): store, spool, routing rules; its worker starts once models are loaded
        pacs = await asyncio.to_thread(open_pacs, settings, registry, pool, metrics.registry)
    except SettingsError as exc:
        logger.error("%s", exc)
        pool.shutdown(wait=False)
        raise
    app.state.pacs = pacs
    app.state.explanations = explanations = Explanations(settings)
    logger.info("loading %d checkpoint(s) from %s onto %s", len(registry.models), settings.model_dir, device)
    loading = asyncio.create_task(_load_and_watch(registry, settings.model_poll_s), name="load-models")
    if pacs is not None:
        pacs.start()
    try:
        if dimse is not None:
            _start_dimse(dimse, settings)
        yield
    finally:
        if dimse is not None:
            dimse.stop()  # no new instances while the rest stops
        if not loading.done():
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
        if pacs is not None:
            await pacs.stop()  # its jobs in hand go back to the queue before the batchers stop
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
    # The image routes follow the output formats; each router's scope is what a scoped key needs for it.
    for routes, scope in (
        (image_router(), INFER),
        (router, None),
        (metrics_router, None),
        (admin.router, ADMIN),
        (kserve_router, INFER),
        (viewer_router(), None),  # GET /: the viewer page (open, see app.auth)
        (stow_router, JOBS),
        (jobs_router, JOBS),
    ):
        include_routes(app, routes, policy, scope=scope)
    return app


app = create_app()
