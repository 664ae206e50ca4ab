"""The served models: discovery in the model directory, loading, warm-up, one batcher each, and lookup.

Every ``*.pt`` file in ``MEDSERVE_MODEL_DIR`` is one model, named by its file stem. A checkpoint that fails to
load or warm up is kept in the registry with status ``failed`` and its error (shown by ``GET /models`` and
logged); the other models still serve.

Models are replaced while the service runs: each loaded checkpoint is a ``ModelVersion`` with its own runner and
batcher; a model (``ModelHandle``) serves its newest version and keeps ``KEEP_VERSIONS`` previous ones for
``?version=``. ``ModelRegistry.rescan`` (startup, the watcher every ``MODEL_POLL_S`` seconds,
``POST /admin/models/reload``) loads new and replaced files in the background and retires removed ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import torch

from app.batching import Batcher
from app.errors import (
    ModelNotFound,
    ModelRequired,
    ModelUnavailable,
    NotReady,
    VersionNotFound,
    retry_after,
)
from app.logs import note_model
from app.memory import collect_all, freeze_heap, release_freed_memory
from app.runners import Runner, load_runner
from app.runtimes import RuntimeSelection, RuntimeSelectionError, select_runtime
from app.settings import Settings
from models.checkpoint import SUFFIX, CheckpointError
from models.inference import Precision

logger = logging.getLogger("medserve.registry")

Status = Literal["loading", "ready", "failed"]

# Batch-size tuning at warm-up: a larger batch is chosen only if it beats the best so far by this factor (a
# noise guard; smaller batches also mean lower latency), and doubling stops once a size is clearly slower.
AUTOTUNE_MARGIN = 1.02
AUTOTUNE_STOP = 0.9
# A retired version's memory is released once no request holds it any more: checked this often, this many times.
RELEASE_CHECK_S = 0.05
RELEASE_CHECKS = 200


def candidate_batch_sizes(limit: int) -> list[int]:
    """1, 2, 4, ... below ``limit``, then ``limit`` itself (e.g. 12 -> [1, 2, 4, 8, 12])."""
    sizes = [1]
    while sizes[-1] * 2 < limit:
        sizes.append(sizes[-1] * 2)
    if limit > 1:
        sizes.append(limit)
    return sizes


def _timed(fn: Callable[[list[Any]], Any], inputs: list[Any]) -> float:
    started = time.perf_counter()
    fn(inputs)
    return time.perf_counter() - started


VersionState = Literal["serving", "previous", "draining", "stopped"]


@dataclass(eq=False)
class ModelVersion:
    """One loaded version of a model: its own runner and batcher.

    A request holds the version it was admitted by (``ModelRegistry.resolve``) until it is answered, so a
    replaced or removed model finishes what it admitted on the runner that admitted it.
    """

    name: str
    runner: Runner[Any]
    batcher: Batcher[Any, Any]
    load_seconds: float
    batch_rates: dict[int, float] | None = None
    loaded_at: float = field(default_factory=time.time)
    state: VersionState = "serving"
    runtime: RuntimeSelection | None = None

    @property
    def version(self) -> str:
        return self.runner.version

    @property
    def task(self) -> str:
        return self.runner.task

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "state": self.state,
            "loaded_at": datetime.fromtimestamp(self.loaded_at, UTC).isoformat(timespec="seconds"),
            "load_seconds": self.load_seconds,
            "requests": self.batcher.stats.requests,
            "queue_depth": self.batcher.queue_depth,
            "announced": self.batcher.announced,
        }


@dataclass(frozen=True)
class FileSignature:
    """What the watcher compares between scans: size, modification time and inode of a checkpoint file."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileSignature:
        stat = path.stat()
        return cls(stat.st_size, stat.st_mtime_ns, stat.st_ino)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (a touched but unchanged checkpoint is not reloaded)."""
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


@dataclass(eq=False)
class ModelHandle:
    """One checkpoint file of the model directory and its loaded versions.

    Attributes:
        status: ``loading`` (no version loaded yet), ``ready`` (a version serves) or ``failed`` (the file could
            not be loaded and no earlier version serves).
        error: why the file failed to load; also set while an earlier version keeps serving.
        versions: the serving version first, then the previous ones kept (``KEEP_VERSIONS``), newest first.
        reloading: a new file is loading and warming up in the background.
    """

    name: str
    path: Path
    status: Status = "loading"
    error: str | None = None
    versions: list[ModelVersion] = field(default_factory=list)
    load_seconds: float | None = None
    reloading: bool = False
    signature: FileSignature | None = None
    digest: str | None = None
    # The runtimes tried when the last load failed for want of one that can serve (app.runtimes).
    failed_runtime: RuntimeSelection | None = None

    @property
    def current(self) -> ModelVersion | None:
        """The version that takes new requests without ``?version=``."""
        return self.versions[0] if self.versions else None

    @property
    def runner(self) -> Runner[Any] | None:
        return self.versions[0].runner if self.versions else None

    @property
    def batcher(self) -> Batcher[Any, Any] | None:
        return self.versions[0].batcher if self.versions else None

    @property
    def batch_rates(self) -> dict[int, float] | None:
        return self.versions[0].batch_rates if self.versions else None

    @property
    def task(self) -> str | None:
        return self.versions[0].task if self.versions else None

    def select(self, version: str | None) -> ModelVersion:
        """The serving version (``version`` None) or the loaded one of that version.

        Raises:
            VersionNotFound: no loaded version of this model is ``version``.
        """
        current = self.current
        assert current is not None, "select needs a loaded version"
        if version is None:
            return current
        for candidate in self.versions:
            if candidate.version == version:
                return candidate
        loaded = [v.version for v in self.versions]
        raise VersionNotFound(f"model {self.name!r} has no loaded version {version!r}; loaded: {loaded}")

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.name, "file": self.path.name, "status": self.status}
        if self.error is not None:
            info["error"] = self.error
        current = self.current
        if current is not None:
            info.update(current.runner.describe())
        info["load_seconds"] = self.load_seconds
        if current is not None and current.batch_rates:
            info["batch_autotune"] = {
                "chosen": current.batcher.max_batch_size,
                "images_per_second": {str(k): round(v, 3) for k, v in current.batch_rates.items()},
            }
        runtime = current.runtime if current is not None else self.failed_runtime
        if self.failed_runtime is not None and self.error is not None:
            runtime = self.failed_runtime
        if runtime is not None:
            info["runtime"] = runtime.describe()
        if current is not None:
            info["stats"] = current.batcher.snapshot()
        info["versions"] = [v.describe() for v in self.versions]
        if self.reloading:
            info["reloading"] = True
        return info


@dataclass
class ReloadReport:
    """What one scan of the model directory changed (the answer of ``POST /admin/models/reload``)."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.removed or self.failed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "replaced": self.replaced,
            "removed": self.removed,
            "failed": self.failed,
            "unchanged": self.unchanged,
            "versions": self.versions,
        }


def _load_error(exc: Exception, path: Path) -> str:
    """The error shown in /models: the file name instead of the server's path, the cause in words."""
    message = str(exc).replace(str(path), path.name)
    if isinstance(exc, CheckpointError | RuntimeSelectionError):
        return message
    return f"{path.name}: cannot be served ({type(exc).__name__}: {message})"


class ModelRegistry:
    """Loads and holds the models of one model directory, and replaces them while the service runs.

    Each scan (``rescan``: at startup, every ``MODEL_POLL_S`` seconds from ``watch`` and on
    ``POST /admin/models/reload``) compares the directory with what is loaded: a new or replaced checkpoint is
    loaded and warmed up while the current version keeps serving, and takes new requests only once ready; a
    file that fails to load leaves the previous version serving (the error shows in ``GET /models``); the
    versions of a removed file, and versions beyond ``KEEP_VERSIONS``, take no new requests and stop once their
    queues are drained (``draining``), which releases their memory.

    Args:
        settings: the service settings (model directory, batching policy, precision, versions kept).
        device: where the models run (already resolved from ``settings.device``).
        model_threads: PyTorch intra-op threads of each model's worker thread (None: leave as inherited).
    """

    def __init__(
        self,
        settings: Settings,
        device: torch.device,
        model_threads: int | None = None,
        on_batch: Callable[[str, Sequence[float], float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.device = device
        self.model_threads = model_threads
        self.on_batch = on_batch
        self.models: dict[str, ModelHandle] = {
            name: ModelHandle(name, path) for name, path in self._files().items()
        }
        self.loaded = asyncio.Event()
        self.draining: list[ModelVersion] = []
        self._drains: set[asyncio.Task[None]] = set()
        self._scan_lock = asyncio.Lock()
        self._closing = False

    @property
    def ready(self) -> bool:
        """All checkpoints were tried and at least one model serves."""
        return self.loaded.is_set() and any(h.status == "ready" for h in self.models.values())

    def _files(self) -> dict[str, Path]:
        return {
            path.stem: path for path in sorted(self.settings.model_dir.glob(f"*{SUFFIX}")) if path.is_file()
        }

    async def load_all(self) -> None:
        """Loads, warms up and starts every model, one after the other; failures are recorded, not raised."""
        try:
            await self.rescan()
        finally:
            self.loaded.set()
        ready = [h.name for h in self.models.values() if h.status == "ready"]
        failed = [h.name for h in self.models.values() if h.status == "failed"]
        if not self.models:
            logger.warning("no checkpoints (*%s) in %s: nothing to serve", SUFFIX, self.settings.model_dir)
        logger.info("models ready: %s; failed: %s", ready or "none", failed or "none")

    async def watch(self, interval_s: float) -> None:
        """Rescans the model directory every ``interval_s`` seconds until cancelled; errors are logged."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                report = await self.rescan()
            except Exception:  # a scan that fails (e.g. the directory is gone for a moment) is retried
                logger.exception("scanning %s failed", self.settings.model_dir)
                continue
            if report.changed:
                logger.info("model directory changed: %s", report.as_dict())

    async def rescan(self) -> ReloadReport:
        """Compares the model directory with what is loaded and loads, replaces or retires accordingly.

        One scan runs at a time; new and replaced files load one after the other, each warmed up before it
        takes traffic. Returns what changed.
        """
        async with self._scan_lock:
            report = await self._scan()
            if report.added or report.replaced:
                # What the load brought in stays: out of the collector's way (app.memory.freeze_heap)
                await asyncio.to_thread(freeze_heap)
            return report

    async def _scan(self) -> ReloadReport:
        report = ReloadReport()
        found = self._files()
        for name in [n for n in self.models if n not in found]:
            gone = self.models.pop(name)
            for version in gone.versions:
                self._retire(version)
            gone.versions = []
            report.removed.append(name)
            logger.info("model %s: %s was removed; it stops once its queue is drained", name, gone.path.name)
        for name, path in found.items():
            handle = self.models.get(name)
            if handle is None:
                handle = self.models[name] = ModelHandle(name, path)
            try:
                signature = FileSignature.of(path)
                if signature == handle.signature:
                    report.unchanged.append(name)
                    continue
                digest = await asyncio.to_thread(file_digest, path)
                if FileSignature.of(path) != signature:
                    # Still being written (copy into place with a rename to avoid this): the next scan.
                    logger.info("model %s: %s is changing; it is read at the next scan", name, path.name)
                    continue
            except FileNotFoundError:  # removed during the scan: the next scan retires it
                if handle.digest is None and not handle.versions:
                    del self.models[name]  # never loaded: nothing to retire
                continue
            except OSError as exc:  # unreadable (permissions, I/O error): recorded, tried again next scan
                handle.error = f"{path.name}: cannot be read ({type(exc).__name__})"
                if handle.current is None:
                    handle.status = "failed"
                logger.error("model %s: %s", name, handle.error)
                report.failed.append(name)
                continue
            if digest == handle.digest:  # touched, or rewritten with the same bytes
                handle.signature = signature
                report.unchanged.append(name)
                continue
            kind = report.added if handle.digest is None else report.replaced
            handle.signature, handle.digest = signature, digest
            if await self._load(handle):
                kind.append(name)
            else:
                report.failed.append(name)
        report.versions = {
            name: h.current.version if h.current is not None else None for name, h in self.models.items()
        }
        return report

    async def _load(self, handle: ModelHandle) -> bool:
        """Loads the handle's file as a new version; True once it serves. A failure is recorded on the handle
        (and the previous version, if any, keeps serving)."""
        settings = self.settings
        started = time.perf_counter()
        batcher: Batcher[Any, Any] | None = None
        handle.reloading = handle.current is not None
        try:
            precision: Precision = settings.precision
            runner = await asyncio.to_thread(
                load_runner,
                handle.name,
                handle.path,
                device=self.device,
                precision=precision,
                forward_batch_size=settings.max_batch_size,
            )
            batcher = Batcher(
                handle.name,
                runner.run_batch,
                max_batch_size=settings.max_batch_size,
                max_delay_s=settings.max_batch_delay_s,
                max_queue=settings.max_queue,
                timeout_s=settings.request_timeout_s,
                on_batch=self.on_batch,
            )
            if settings.compile:
                # Compiled on its first forward passes: the warm-up, in the model's own thread.
                runner.model = cast(torch.nn.Module, torch.compile(runner.model))
            if self.model_threads:
                # The thread count is per OS thread with OpenMP: set it in the model's own worker thread.
                await batcher.call(torch.set_num_threads, self.model_threads)
            runtime = await select_runtime(
                runner, batcher.call, settings, self.device, self._warm_up_sizes(), source=handle.path
            )
            batch_rates = await self._warm_up(runner, batcher) if settings.warmup else None
            batcher.start()
        except asyncio.CancelledError:
            handle.reloading = False
            if batcher is not None:
                await batcher.stop()
            raise
        except Exception as exc:
            handle.reloading = False
            if batcher is not None:
                await batcher.stop()
            handle.error = _load_error(exc, handle.path)
            serving = handle.current
            if serving is None:
                handle.status = "failed"
                handle.load_seconds = round(time.perf_counter() - started, 3)
            if isinstance(exc, RuntimeSelectionError):
                handle.failed_runtime = exc.selection  # the candidates tried, and why none can serve
            # A refused checkpoint is expected operation; anything else gets its traceback in the log.
            trace = None if isinstance(exc, CheckpointError | RuntimeSelectionError) else exc
            if serving is None:
                logger.error("model %s failed to load: %s", handle.name, handle.error, exc_info=trace)
            else:
                logger.error(
                    "model %s: the new %s failed to load, version %s keeps serving: %s",
                    handle.name,
                    handle.path.name,
                    serving.version,
                    handle.error,
                    exc_info=trace,
                )
            return False
        handle.reloading = False
        handle.failed_runtime = None
        version = ModelVersion(
            handle.name,
            runner,
            batcher,
            round(time.perf_counter() - started, 3),
            batch_rates,
            runtime=runtime,
        )
        self._install(handle, version)
        logger.info(
            "model %s ready: %s, version %s, on %s", handle.name, runner.task, runner.version, self.device
        )
        return True

    def _install(self, handle: ModelHandle, version: ModelVersion) -> None:
        """Makes ``version`` the serving one (at once: no await here) and retires what ``KEEP_VERSIONS`` drops.

        A file holding a version that is loaded already (e.g. a rollback to a kept one) serves that one again;
        the duplicate just loaded is stopped.
        """
        same = next((v for v in handle.versions if v.version == version.version), None)
        if same is not None:
            self._retire(version)
            handle.versions.remove(same)
            version = same
        handle.versions.insert(0, version)
        keep = 1 + self.settings.keep_versions
        for old in handle.versions[keep:]:
            self._retire(old)
        del handle.versions[keep:]
        for position, kept in enumerate(handle.versions):
            kept.state = "serving" if position == 0 else "previous"
        handle.status, handle.error, handle.load_seconds = "ready", None, version.load_seconds

    def _retire(self, version: ModelVersion) -> None:
        """Takes ``version`` out of service: it admits no new request, runs those it admitted, then stops."""
        version.state = "draining"
        self.draining.append(version)
        task = asyncio.get_running_loop().create_task(
            self._drain(version), name=f"drain-{version.name}-{version.version}"
        )
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, version: ModelVersion) -> None:
        """Stops a retired version once its admitted requests have run, then releases its memory as soon as the
        last of those requests lets go of it (a version still referenced long after is logged: a leak)."""
        try:
            await version.batcher.stop()
        finally:
            self.draining.remove(version)
            version.state = "stopped"
        runner = weakref.ref(version.runner)
        name, number = version.name, version.version
        del version
        for attempt in range(RELEASE_CHECKS):
            if runner() is None or self._closing:
                break
            if attempt == 1:
                collect_all()  # a reference cycle, if any
            await asyncio.sleep(RELEASE_CHECK_S)
        if runner() is not None and not self._closing:
            logger.warning("model %s: version %s is still referenced after it stopped", name, number)
        await asyncio.to_thread(release_freed_memory, self.device)
        logger.info("model %s: version %s drained and stopped", name, number)

    def _warm_up_sizes(self) -> list[int]:
        """The batch sizes the warm-up runs (and the runtimes are timed at)."""
        limit = self.settings.max_batch_size
        return candidate_batch_sizes(limit) if self.settings.batch_autotune else sorted({1, limit})

    async def _warm_up(self, runner: Runner[Any], batcher: Batcher[Any, Any]) -> dict[int, float] | None:
        """Runs warm-up batches in the model's thread; with ``batch_autotune``, also picks the batch size.

        Without tuning: one batch of 1 and one of ``MAX_BATCH_SIZE`` (the shapes seen most). With tuning:
        batches of 1, 2, 4, ... up to ``MAX_BATCH_SIZE``, each run once to build its kernels and once timed;
        the model's batches are then capped at the size with the best throughput. On a CPU a large network can
        be slower per image in big batches (memory-bound), on a GPU the largest batch usually wins.

        Returns:
            images per second by batch size when tuning, else None.
        """
        settings = self.settings
        if not settings.batch_autotune:
            for size in sorted({1, settings.max_batch_size}):
                await batcher.call(runner.run_batch, [runner.warmup_input() for _ in range(size)])
            return None
        rates: dict[int, float] = {}
        best = 1
        for size in candidate_batch_sizes(settings.max_batch_size):
            inputs = [runner.warmup_input() for _ in range(size)]
            await batcher.call(runner.run_batch, inputs)
            rates[size] = size / max(await batcher.call(_timed, runner.run_batch, inputs), 1e-9)
            if rates[size] > rates[best] * AUTOTUNE_MARGIN:
                best = size
            elif rates[size] < rates[best] * AUTOTUNE_STOP:
                break
        batcher.max_batch_size = best
        runner.forward_batch_size = best
        logger.info(
            "model %s: batch size %d (of %d) has the best throughput: %s images/s",
            runner.name,
            best,
            settings.max_batch_size,
            {k: round(v, 2) for k, v in rates.items()},
        )
        return rates

    def resolve(self, task: str | None, name: str | None, version: str | None = None) -> ModelVersion:
        """The loaded version that serves a request: of model ``name`` (or the only model of ``task`` when
        ``name`` is None; ``task`` None: any task) and ``version`` (None: the serving one).

        Call ``reserve()`` on the returned version's batcher before the next ``await``: a version resolved is
        one still in service, and the reservation keeps it serving the request until answered.

        Raises:
            NotReady: models are still loading (or this one, new, is).
            ModelNotFound: no model of this task has that name (or none is served at all).
            ModelUnavailable: the model (or every model) failed to load.
            ModelRequired: several models of the task are served and none was named.
            VersionNotFound: the model has no loaded version ``version``.
        """
        if not self.loaded.is_set():
            raise NotReady("models are still loading; retry shortly", headers=retry_after(5))
        what = f"{task} model" if task is not None else "model"
        if name is not None:
            handle = self.models.get(name)
            if handle is not None:
                note_model(handle.name)  # a served checkpoint's name: safe as a log field and metric label
            if handle is not None and handle.status == "failed":
                raise ModelUnavailable(f"model {name!r} failed to load; GET /models shows the error")
            if handle is not None and handle.status == "loading":
                raise NotReady(f"model {name!r} is still loading; retry shortly", headers=retry_after(5))
            if handle is None or (task is not None and handle.task != task):
                raise ModelNotFound(f"no {what} named {name!r}; available: {self.names(task) or 'none'}")
            return handle.select(version)
        candidates = [
            h for h in self.models.values() if h.status == "ready" and (task is None or h.task == task)
        ]
        if len(candidates) == 1:
            note_model(candidates[0].name)
            return candidates[0].select(version)
        if len(candidates) > 1:
            raise ModelRequired(
                f"several {what}s are served; choose one with ?model=NAME: {self.names(task)}"
            )
        if any(h.status == "failed" for h in self.models.values()):
            raise ModelUnavailable(f"no {what} is available; some checkpoints failed to load (GET /models)")
        raise ModelNotFound(f"no {what} is served")

    def names(self, task: str | None) -> list[str]:
        return [
            h.name for h in self.models.values() if h.status == "ready" and (task is None or h.task == task)
        ]

    def describe(self) -> list[dict[str, Any]]:
        return [h.describe() for h in self.models.values()]

    def describe_draining(self) -> list[dict[str, Any]]:
        """The versions taken out of service whose admitted requests are still running."""
        return [{"name": v.name, **v.describe()} for v in self.draining]

    async def drained(self) -> None:
        """Waits until every retired version has stopped and released its memory."""
        while self._drains:
            await asyncio.gather(*list(self._drains))

    async def close(self) -> None:
        """Stops every batcher after it has run what it accepted (retired ones too)."""
        self._closing = True
        batchers = [v.batcher for h in self.models.values() for v in h.versions]
        await asyncio.gather(*(batcher.stop() for batcher in batchers), *list(self._drains))
