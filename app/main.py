"""The FastAPI application: ``create_app(settings)`` for tests and the CLI, ``app`` for ``uvicorn app.main:app``.

Startup runs in the lifespan: settings are validated (a clear ``SettingsError`` otherwise), the device resolved,
and the models are loaded, warmed up and given their batchers by a background task, so that
``/health/live`` answers at once and ``/health/ready`` says 503 until loading is over. Shutdown stops every
batcher after it has run what it accepted, then the thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI

from app.errors import install_error_handlers
from app.registry import ModelRegistry
from app.routes import router
from app.settings import Settings, SettingsError, check_runtime, env_name, load_settings
from app.uploads import BodySizeLimit
from models import __version__
from models.inference import resolve_device

logger = logging.getLogger("medserve.app")

DESCRIPTION = """Segmentation and classification of medical images (PNG, JPEG, TIFF, BMP, DICOM) with dynamic
batching. Errors are `application/problem+json` (RFC 9457); `GET /problems/{slug}` explains each type."""


def _ensure_logging() -> None:
    """Under ``uvicorn app.main:app`` nothing configures the root logger: show the service's INFO lines."""
    service = logging.getLogger("medserve")
    if not logging.getLogger().handlers and not service.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        service.addHandler(handler)
        service.setLevel(logging.INFO)


def _startup_settings(app: FastAPI) -> Settings:
    settings: Settings | None = app.state.configured_settings
    if settings is None:
        settings = load_settings()
    check_runtime(settings)
    return settings


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    _ensure_logging()
    try:
        settings = _startup_settings(app)
        try:
            device = resolve_device(settings.device)
        except ValueError as exc:
            raise SettingsError(f"{env_name('device')}={settings.device!r}: {exc}") from exc
    except SettingsError as exc:
        logger.error("%s", exc)
        raise
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
    # Decoding threads run small torch ops (normalisation, resizing) single-threaded: each thread calling a
    # parallel op would otherwise start its own OpenMP team and compete with the model's threads for the cores.
    pool = ThreadPoolExecutor(
        max_workers=settings.decode_workers,
        thread_name_prefix="medserve-io",
        initializer=torch.set_num_threads,
        initargs=(1,),
    )
    registry = ModelRegistry(settings, device, model_threads=model_threads)
    app.state.settings = settings
    app.state.pool = pool
    app.state.registry = registry
    logger.info("loading %d checkpoint(s) from %s onto %s", len(registry.models), settings.model_dir, device)
    loading = asyncio.create_task(registry.load_all(), name="load-models")
    try:
        yield
    finally:
        if not loading.done():
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
        await registry.close()
        pool.shutdown(wait=True)
        logger.info("stopped")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Builds the app. ``settings=None`` reads ``MEDSERVE_*`` from the environment at startup."""
    app = FastAPI(title="MedServe", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.configured_settings = settings
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit)
    app.include_router(router)
    return app


app = create_app()
