"""The job system of one service process, started and stopped by the app's lifespan (``app.main``).

``open_pacs`` builds it from the settings: the job store (``MEDSERVE_JOBS_DB``; default an SQLite file at
``MODEL_DIR/.medserve/jobs.sqlite``), the spool (``MEDSERVE_SPOOL_DIR``; default ``MODEL_DIR/.medserve/spool``),
the routing rules (``MEDSERVE_ROUTES``), the result sink, the intake and the worker. It is off (None) with
``MEDSERVE_JOBS_ENABLED=false``, and also, with a warning, when the default location cannot be written (a
model directory mounted read-only): the PACS endpoints then answer 503 ``jobs-disabled``. A store, spool or
rules file that is set explicitly and unusable stops the service (``SettingsError``).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from app.pacs.intake import Intake
from app.pacs.metrics import JobMetrics
from app.pacs.results import ResultSink
from app.pacs.routing import Router, load_rules
from app.pacs.spool import Spool
from app.pacs.store import JobStore, StoreError, safe_url
from app.pacs.worker import JobWorker, RegistryCatalog, select_sink
from app.pacs.writers import ResultWriters
from app.registry import ModelRegistry
from app.settings import Settings, SettingsError, env_name

logger = logging.getLogger("medserve.pacs")

STATE_DIR = ".medserve"


def default_state_dir(settings: Settings) -> Path:
    return settings.model_dir / STATE_DIR


def jobs_db_url(settings: Settings) -> str:
    """``MEDSERVE_JOBS_DB``, or the default SQLite file beside the models."""
    if settings.jobs_db:
        return settings.jobs_db
    return f"sqlite:///{(default_state_dir(settings) / 'jobs.sqlite').resolve()}"


def spool_dir(settings: Settings) -> Path:
    """``MEDSERVE_SPOOL_DIR``, else ``spool`` beside an SQLite job store, else in the default state folder."""
    if settings.spool_dir is not None:
        return settings.spool_dir
    url = jobs_db_url(settings)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url[len("sqlite:///") :]).parent / "spool"
    return default_state_dir(settings) / "spool"


@dataclass
class PacsService:
    """The job system's parts, kept on ``app.state.pacs``."""

    settings: Settings
    store: JobStore
    spool: Spool
    router: Router
    intake: Intake
    worker: JobWorker
    sink: ResultSink
    metrics: JobMetrics

    def start(self) -> None:
        self.worker.start()

    async def stop(self) -> None:
        """Stops the worker (the jobs in hand go back to the queue), then closes the store."""
        await self.worker.stop()
        if self.worker.writers is not None:
            await asyncio.to_thread(self.worker.writers.close)
        await asyncio.to_thread(self.store.close)
        self.spool.close()


def open_pacs(
    settings: Settings, registry: ModelRegistry, pool: Executor, metrics_registry: CollectorRegistry
) -> PacsService | None:
    """Builds the job system (blocking: opens the database and the spool); None when it is off.

    Raises:
        SettingsError: an explicitly set store, spool or rules file is unusable (naming the variable, and for
            the rules the file and the line).
    """
    if not settings.jobs_enabled:
        logger.info("%s=false: the job system is off", env_name("jobs_enabled"))
        return None
    defaults = settings.jobs_db is None and settings.spool_dir is None
    router = Router()
    if settings.routes is not None:
        router = load_rules(settings.routes, set(registry.models))
    url = jobs_db_url(settings)
    try:
        if settings.jobs_db is None:
            default_state_dir(settings).mkdir(parents=True, exist_ok=True)
        spool = Spool(spool_dir(settings), settings.spool_max_bytes)
        store = JobStore(url)
    except (OSError, StoreError) as exc:
        if defaults:
            logger.warning(
                "the job system is off: its default store %s cannot be used (%s); set %s and %s to writable "
                "places to receive DICOM",
                safe_url(url),
                exc.strerror if isinstance(exc, OSError) else exc,
                env_name("jobs_db"),
                env_name("spool_dir"),
            )
            return None
        variable = env_name("jobs_db") if isinstance(exc, StoreError) else env_name("spool_dir")
        detail = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise SettingsError(f"{variable}: the job system cannot start: {detail}") from exc
    metrics = JobMetrics.of(metrics_registry, store)
    sink = select_sink(settings, spool)
    intake = Intake(store, spool, router, RegistryCatalog(registry), on_accept=metrics.observe_received)
    worker = JobWorker(
        store=store,
        spool=spool,
        registry=registry,
        sink=sink,
        settings=settings,
        pool=pool,
        metrics=metrics,
        writers=ResultWriters(settings.jobs_writers) if settings.jobs_writers else None,
    )
    intake.wake = worker.wake
    logger.info(
        "job system: store %s, spool %s, routing %s",
        safe_url(url),
        spool.root,
        settings.routes.name if settings.routes is not None else "default (every image to every ready model)",
    )
    return PacsService(settings, store, spool, router, intake, worker, sink, metrics)
