"""The job worker: claims jobs from the store, runs them through the models' batchers, delivers the results.

One ``JobWorker`` per service process. Its loop claims up to ``MEDSERVE_JOBS_CONCURRENCY`` jobs of the models
this process serves (``JobStore.claim``) and runs each as a task:

1. run (``queued`` -> ``running``): the spooled instance is read and decoded by the model's runner (the same
   ``decode`` as ``/segment``, keeping the source DICOM), checked by the result's output format, submitted to
   the model's batcher in its low-priority lane (``Batcher.submit_background``: interactive requests go
   first), and the result object written by that output format (``dicom-seg`` for segmentation; ``dicom-sr``
   for classification once that format is registered), written once with the deterministic UIDs of
   ``models.dicom_uids`` (passed to the writer in ``ResponseOptions``).
2. deliver: the result goes straight to a delivery attempt through the ``ResultSink``: the results ready at
   the same time go together (``deliver_all``: one STOW-RS request for several, ``GROUP_MAX`` at most, while
   ``DELIVERY_SENDERS`` attempts are under way), and their outcomes are recorded in one transaction
   (``JobStore.settle``): ``done`` when it lands, ``failed`` when the archive refuses it (no retry), else the
   result is spooled and the job waits ``delivering`` for another attempt after a capped exponential backoff
   with jitter, at most ``MEDSERVE_DELIVERY_MAX_ATTEMPTS`` in all. A job cancelled (or taken over) before its
   attempt is dropped; one that is no longer this process's when the outcome is recorded is left alone.

Anything that makes a job impossible (multi-frame, an unsupported transfer syntax, a source the result cannot
reference, the model failing on it) fails the job with the reason, never the worker. Leases are renewed every
third of ``MEDSERVE_JOBS_LEASE_S``; on shutdown the worker cancels what it holds and gives it back to the queue.
Spooled instances whose jobs are all finished are deleted (after ``MEDSERVE_SPOOL_RETENTION_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from app.batching import BatcherClosedError, InferenceError
from app.contract import ImageUpload, OutputFormat, Prediction, ResponseOptions, Runner
from app.outputs import check_input, output_formats
from app.pacs.delivery import delivery_from_settings
from app.pacs.intake import ModelChoice
from app.pacs.metrics import JobMetrics
from app.pacs.results import (
    SEG,
    SR,
    FolderSink,
    PermanentDeliveryError,
    ResultObject,
    ResultSink,
    TransientDeliveryError,
    backoff_delay,
    deliver_all,
)
from app.pacs.spool import Spool
from app.pacs.store import DONE_OUTCOME, FAILED_OUTCOME, RETRY_OUTCOME, Claimed, JobStore, Settled
from app.pacs.writers import ResultWriters, WriterUnavailable
from app.registry import ModelHandle, ModelRegistry
from app.settings import Settings
from models.dicom_seg import DicomSegError
from models.dicom_sr import DicomSrError
from models.dicom_uids import result_instance_uid, result_series_uid
from models.imageio import ImageError, UnprocessableImageError

logger = logging.getLogger("medserve.pacs.worker")

T = TypeVar("T")

# The output format that writes each task's DICOM result, and the result's kind (models.dicom_uids).
RESULT_FORMATS: dict[str, tuple[str, str]] = {
    "segmentation": ("dicom-seg", SEG),
    "classification": ("dicom-sr", SR),
}
RESULT_SOP_CLASSES = {SEG: "1.2.840.10008.5.1.4.1.1.66.4", SR: "1.2.840.10008.5.1.4.1.1.88.34"}
IDLE_POLL_S = 1.0  # how often an idle worker looks for jobs other processes queued or retries that fell due
CLEANUP_EVERY_S = 5.0
CLAIM_COALESCE_S = 0.25  # how long a claim for fewer than a chunk of places waits while jobs are in hand
CLAIM_INTERVAL_S = 0.05  # the shortest time between two claims while jobs are in hand
DELIVERY_SENDERS = 2  # delivery attempts under way at once; results that come meanwhile go together next
GROUP_MAX = 16  # most results in one delivery attempt (one STOW-RS request, one store commit)


def result_format(task: str) -> tuple[OutputFormat[Any], str] | None:
    """The output format writing ``task``'s DICOM result and the result kind; None when none is registered."""
    entry = RESULT_FORMATS.get(task)
    if entry is None:
        return None
    output_format = output_formats(task).get(entry[0])
    return None if output_format is None else (output_format, entry[1])


class RegistryCatalog:
    """The registry's models as the intake sees them (``app.pacs.intake.ModelCatalog``)."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def loaded(self) -> bool:
        return self.registry.loaded.is_set()

    def choices(self) -> list[ModelChoice]:
        choices = []
        for handle in list(self.registry.models.values()):
            runner = handle.runner
            task = handle.task or ""
            choices.append(
                ModelChoice(
                    name=handle.name,
                    version=runner.version if runner is not None else "",
                    task=task,
                    ready=handle.status == "ready",
                    has_result=result_format(task) is not None,
                )
            )
        return choices


def select_sink(settings: Settings, spool: Spool) -> ResultSink:
    """The result sink of the settings, first that applies: a ``FolderSink`` on ``MEDSERVE_RESULTS_DIR`` when it
    is set (results kept in a folder, say for review, although ``PACS_URL`` names the archive studies are pulled
    from); the archive sinks of ``app.pacs.delivery`` (C-STORE to ``MEDSERVE_DIMSE_DESTINATION``, else STOW-RS
    to ``MEDSERVE_PACS_URL``); else a folder in the spool (``SPOOL_DIR/results-out``).
    """
    if settings.results_dir is not None:
        return FolderSink(settings.results_dir)
    archive = delivery_from_settings(settings)
    if archive is not None:
        return archive
    return FolderSink(spool.root / "results-out")


@dataclass
class Outgoing:
    """A result waiting for its delivery attempt: ``spooled`` when it is in the spool already (a retry), else
    fresh from the model (spooled only if the attempt fails and a retry is needed)."""

    job: Claimed
    result: ResultObject
    spooled: bool
    done: asyncio.Future[None]


@dataclass
class Attempted:
    """What became of one result of a delivery attempt (worked out in a thread, reported on the loop)."""

    item: Outgoing
    error: Exception | None
    settled: Settled
    recorded: bool = False


@dataclass
class WorkerStats:
    """What this process did (for tests and logs)."""

    claimed: int = 0
    ran: int = 0
    delivered: int = 0
    failed: int = 0


class JobWorker:
    """Runs the jobs of the models ``registry`` serves; ``start`` on the event loop, ``stop`` at shutdown."""

    def __init__(
        self,
        *,
        store: JobStore,
        spool: Spool,
        registry: ModelRegistry,
        sink: ResultSink,
        settings: Settings,
        pool: Executor,
        metrics: JobMetrics | None = None,
        writers: ResultWriters | None = None,
    ) -> None:
        self.store = store
        self.writers = writers
        self.spool = spool
        self.registry = registry
        self.sink = sink
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.owner = f"{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.stats = WorkerStats()
        self._tasks: set[asyncio.Task[None]] = set()
        self._delivering: set[asyncio.Task[Any]] = (
            set()
        )  # not cancelled at shutdown: a sent result is recorded
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_cleanup = 0.0
        self._cleanup_due = True
        self._claim_chunk = max(1, settings.jobs_concurrency // 8)
        self._last_claim = 0.0
        self._claim_timer: asyncio.TimerHandle | None = None
        self._outbox: asyncio.Queue[Outgoing] = asyncio.Queue()
        self._senders: list[asyncio.Task[None]] = []

    # -- life cycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._main = self._loop.create_task(self._run(), name="medserve-jobs")
        self._senders = [
            self._loop.create_task(self._sender(), name=f"medserve-delivery-{n}")
            for n in range(DELIVERY_SENDERS)
        ]

    def wake(self) -> None:
        """New jobs are waiting (thread-safe: the intake calls it from any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake.set)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def waiting_results(self) -> int:
        """Results made and waiting for a delivery attempt (while the senders are busy)."""
        return self._outbox.qsize()

    async def stop(self) -> None:
        """Cancels the loop and the jobs in hand and gives them back to the queue (another process or the next
        start takes them); a delivery under way is let finish, so that its outcome is recorded."""
        self._stopping = True
        tasks = [t for t in (self._main, *self._tasks) if t is not None]
        for task in tasks:
            if task not in self._delivering:
                task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sender in self._senders:  # after the jobs: a job's delivery under way is let finish
            sender.cancel()
        for sender in self._senders:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
        try:
            released = await asyncio.to_thread(self.store.release, self.owner)
        except Exception:
            logger.exception("cannot give the jobs in hand back to the job store")
        else:
            if released:
                logger.info("gave %d job(s) in hand back to the queue", released)

    # -- the loop -------------------------------------------------------------------------------------------

    def _ready(self) -> dict[str, ModelHandle]:
        return {
            name: handle
            for name, handle in self.registry.models.items()
            if handle.status == "ready" and handle.batcher is not None and handle.runner is not None
        }

    async def _run(self) -> None:
        await self.registry.loaded.wait()
        lease_s = self.settings.jobs_lease_s
        last_beat = time.monotonic()
        while not self._stopping:
            ready = self._ready()
            free = self.settings.jobs_concurrency - len(self._tasks)
            claimed: list[Claimed] = []
            # Cleared before the claim: a wake-up that comes while it runs is not lost (else it waits a poll).
            self._wake.clear()
            # With jobs in hand and few places free, claims wait (CLAIM_COALESCE_S at most) for more places, so
            # that one transaction takes several jobs rather than one per finished job.
            # Likewise, while jobs are in hand, new jobs that come one by one (C-STOREs) are claimed together
            # at most every CLAIM_INTERVAL_S, not each in a transaction of its own.
            since_claim = time.monotonic() - self._last_claim
            wait_s = CLAIM_COALESCE_S if free < self._claim_chunk else CLAIM_INTERVAL_S
            if ready and free > 0 and self._tasks and since_claim < wait_s:
                self._claim_later(wait_s - since_claim)
            elif ready and free > 0:
                self._last_claim = time.monotonic()
                try:
                    versions = {name: h.runner.version for name, h in ready.items() if h.runner is not None}
                    claimed = await asyncio.to_thread(self.store.claim, self.owner, versions, free, lease_s)
                except Exception:
                    logger.exception("cannot claim jobs from the job store; retrying")
            if claimed and self.writers is not None:
                self.writers.start()  # once: spawned while the first jobs decode and run
            for job in claimed:
                self.stats.claimed += 1
                task = asyncio.create_task(self._job(job, ready[job.model]), name=f"job-{job.id}")
                self._tasks.add(task)
                task.add_done_callback(self._finished)
            if time.monotonic() - last_beat > lease_s / 3:
                last_beat = time.monotonic()
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.store.heartbeat, self.owner, lease_s)
            # Clean-up after finished jobs once the worker is idle or every CLEANUP_EVERY_S, not after each job:
            # under load it would cost two queries and two commits per job on the claim loop's path.
            since = time.monotonic() - self._last_cleanup
            if (self._cleanup_due and not self._tasks) or since > CLEANUP_EVERY_S:
                await self._cleanup()
            if claimed and len(self._tasks) < self.settings.jobs_concurrency:
                continue  # there may be more
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(IDLE_POLL_S, lease_s / 3)):
                    await self._wake.wait()

    def _claim_later(self, delay_s: float) -> None:
        if self._loop is not None and (self._claim_timer is None or self._claim_timer.cancelled()):
            self._claim_timer = self._loop.call_later(delay_s, self._claim_due)

    def _claim_due(self) -> None:
        self._claim_timer = None
        self._wake.set()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._cleanup_due = True
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            logger.error("a job task failed unexpectedly", exc_info=task.exception())

    async def _cleanup(self) -> None:
        self._cleanup_due = False
        self._last_cleanup = time.monotonic()
        cutoff = time.time() - self.settings.spool_retention_s
        try:
            await asyncio.to_thread(self._clean_up, cutoff)
        except Exception:
            logger.exception("spool clean-up failed; retrying later")

    def _clean_up(self, cutoff: float) -> None:
        # One thread hop and one transaction per kind for everything due (a file is deleted before the store
        # forgets it: a crash in between leaves a record whose file is gone, which the next pass forgets).
        spooled = self.store.finished_spool(cutoff)
        results = self.store.results_to_delete()
        if spooled or results:
            # The job states that let these files go are made durable first (the job path's transitions are
            # not flushed one by one): a power cut can then no longer bring back a job that needs them.
            self.store.sync()
        for _, path in spooled:
            self.spool.delete(path)
        self.store.forget_spools(spooled)
        for _, path in results:
            self.spool.delete(path)
        self.store.forget_results([job_id for job_id, _ in results])

    # -- one job --------------------------------------------------------------------------------------------

    async def _in_pool(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(fn, *args, **kwargs)
        )

    async def _fail(self, job: Claimed, reason: str, attempts: int | None = None) -> None:
        self.stats.failed += 1
        logger.info("job %d (%s) failed: %s", job.id, job.model, reason)
        await asyncio.to_thread(self.store.fail, job.id, self.owner, reason, attempts=attempts)

    async def _job(self, job: Claimed, handle: ModelHandle) -> None:
        try:
            if job.phase == "run":
                result = await self._run_model(job, handle)
            else:
                result = await self._spooled_result(job)
            if result is None:
                return
            await self._deliver(job, result, spooled=job.phase != "run")
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("job %d failed unexpectedly", job.id)
            with contextlib.suppress(Exception):
                await self._fail(job, "MedServe failed unexpectedly on this job; see the service log")

    @staticmethod
    def _read_and_decode(runner: Runner[Any], path: str, **options: Any) -> Any:
        # One hop into the pool for reading the spooled file and decoding it (checked by the intake on arrival).
        upload = ImageUpload(Path(path).read_bytes(), content_type="application/dicom", checked=True)
        return runner.decode(upload, **options)

    async def _run_model(self, job: Claimed, handle: ModelHandle) -> ResultObject | None:
        runner, batcher = handle.runner, handle.batcher
        assert runner is not None and batcher is not None
        found = result_format(runner.task)
        if found is None:
            await self._fail(job, f"this build writes no DICOM result for {runner.task} models")
            return None
        output_format, kind = found
        deleted = "the spooled instance was deleted; send the instance again"
        if job.spool_path is None:
            await self._fail(job, deleted)
            return None
        try:
            item = await self._in_pool(
                self._read_and_decode,
                runner,
                job.spool_path,
                max_pixels=self.settings.max_pixels,
                keep_pixels=output_format.needs_pixels,
                keep_source=True,
            )
            check_input(output_format, item)
        except FileNotFoundError:
            await self._fail(job, deleted)
            return None
        except ImageError as exc:
            await self._fail(job, f"the instance cannot be processed: {exc}")
            return None
        try:
            output = await batcher.submit_background(item)
        except InferenceError:
            await self._fail(job, f"model {job.model!r} failed on this instance; see the service log")
            return None
        except BatcherClosedError:
            return None  # shutting down: the job goes back to the queue
        self.stats.ran += 1
        series_uid = result_series_uid(job.series_instance_uid, job.model, job.model_version, kind)
        sop_uid = result_instance_uid(job.sop_instance_uid, job.model_version, kind)
        # The writers take the deterministic UIDs: the object is written once, with them.
        options = ResponseOptions(series_instance_uid=series_uid, sop_instance_uid=sop_uid)
        try:
            part10 = await self._write(
                runner, output_format, Prediction(item, output), options, job.spool_path
            )
        except ImageError as exc:
            await self._fail(job, f"cannot write the {kind.upper()} result: {exc}")
            return None
        # Not spooled yet: the first attempt goes out straight away, and the result is spooled only when a
        # retry needs it. A crash before the attempt is recorded leaves the job running: it runs again once its
        # lease expires, and its result (the same UIDs) replaces the one that may have arrived.
        return ResultObject(
            part10=part10,
            kind=kind,
            study_instance_uid=job.study_instance_uid,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=RESULT_SOP_CLASSES[kind],
            job_id=job.id,
            model=job.model,
        )

    async def _write(
        self,
        runner: Runner[Any],
        output_format: OutputFormat[Any],
        prediction: Prediction[Any],
        options: ResponseOptions,
        source_path: str,
    ) -> bytes:
        """The result object: by a writer process from the spooled instance (``app.pacs.writers``), else (no
        writers, a format without ``result_request``, a writer that died) by the output format in a thread."""
        if self.writers is not None and output_format.result_request is not None:
            request = await self._in_pool(output_format.result_request, runner, [prediction], options)
            try:
                return await self.writers.write(request, source_path)
            except (DicomSegError, DicomSrError) as exc:
                raise UnprocessableImageError(str(exc)) from exc
            except (WriterUnavailable, OSError):
                pass  # written here instead
        return await self._in_pool(self._encode, runner, output_format, prediction, options)

    @staticmethod
    def _encode(
        runner: Runner[Any],
        output_format: OutputFormat[Any],
        prediction: Prediction[Any],
        options: ResponseOptions,
    ) -> bytes:
        return runner.encode([prediction], output_format, options).body

    async def _spooled_result(self, job: Claimed) -> ResultObject | None:
        """The result of a job claimed for delivery (a retry, or a job whose process died while sending it)."""
        kind = job.result_kind or SEG
        if job.result_path is None or not Path(job.result_path).exists() or not job.result_sop_instance_uid:
            # Nothing to send any more (deleted by hand, or it could not be spooled): run the model again.
            await asyncio.to_thread(self.store.requeue, job.id, ["delivering"])
            self._wake.set()
            return None
        part10 = await asyncio.to_thread(Path(job.result_path).read_bytes)
        return ResultObject(
            part10=part10,
            kind=kind,
            study_instance_uid=job.study_instance_uid,
            series_instance_uid=result_series_uid(
                job.series_instance_uid, job.model, job.model_version, kind
            ),
            sop_instance_uid=job.result_sop_instance_uid,
            sop_class_uid=RESULT_SOP_CLASSES.get(kind, ""),
            job_id=job.id,
            model=job.model,
        )

    # -- delivery -------------------------------------------------------------------------------------------

    async def _deliver(self, job: Claimed, result: ResultObject, *, spooled: bool) -> None:
        """Hands the result to the senders and waits for its attempt to be recorded."""
        current = asyncio.current_task()
        if self._stopping or current is None:
            # Shutting down: a spooled result waits for the next process; a fresh one is made again (the job
            # goes back to the queue).
            return
        self._delivering.add(current)
        try:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._outbox.put_nowait(Outgoing(job, result, spooled, done))
            await done
        finally:
            self._delivering.discard(current)

    async def _sender(self) -> None:
        """Takes the results waiting (up to ``GROUP_MAX``) and makes one delivery attempt for them together:
        while one attempt is under way, the results that come meanwhile gather for the next."""
        while True:
            group = [await self._outbox.get()]
            while len(group) < GROUP_MAX and not self._outbox.empty():
                group.append(self._outbox.get_nowait())
            try:
                await self._send_group(group)
            except asyncio.CancelledError:
                for item in group:
                    if not item.done.done():
                        item.done.cancel()
                raise
            except Exception as exc:
                logger.exception("a delivery attempt failed unexpectedly")
                for item in group:
                    if not item.done.done():
                        item.done.set_exception(exc)

    async def _send_group(self, group: list[Outgoing]) -> None:
        try:
            held = await asyncio.to_thread(self.store.held, [item.job.id for item in group], self.owner)
        except Exception:
            logger.exception("cannot read the jobs of a delivery attempt; sending them anyway")
            held = {item.job.id for item in group}
        sending = []
        for item in group:
            if item.job.id in held:
                sending.append(item)
            else:
                logger.info(
                    "job %d was cancelled or taken over before its result was sent; the result is dropped",
                    item.job.id,
                )
                item.done.set_result(None)
        if not sending:
            return
        attempted = await asyncio.to_thread(self._attempt, sending)
        for entry in attempted:
            self._report(entry)
            if not entry.item.done.done():
                entry.item.done.set_result(None)

    def _attempt(self, items: list[Outgoing]) -> list[Attempted]:
        """In a thread: one delivery attempt for ``items``, the results that need a retry spooled, and every
        outcome recorded in one transaction."""
        settings = self.settings
        errors = deliver_all(self.sink, [item.result for item in items])
        attempted = []
        for item, error in zip(items, errors, strict=True):
            job, result = item.job, item.result
            attempts = job.attempts + 1
            uid, kind = result.sop_instance_uid, result.kind
            if error is None:
                settled = Settled(job.id, DONE_OUTCOME, attempts, uid, kind)
            elif isinstance(error, PermanentDeliveryError):
                reason = f"the archive refused the result: {error.reason}"
                settled = Settled(job.id, FAILED_OUTCOME, attempts, uid, kind, reason)
            else:
                why = error.reason if isinstance(error, TransientDeliveryError) else type(error).__name__
                if not isinstance(error, TransientDeliveryError):
                    logger.error("job %d: the result sink failed unexpectedly", job.id, exc_info=error)
                if attempts >= settings.delivery_max_attempts:
                    reason = f"delivery failed {attempts} times, the last: {why}; retry when it is fixed"
                    settled = Settled(job.id, FAILED_OUTCOME, attempts, uid, kind, reason)
                else:
                    delay = backoff_delay(
                        attempts, base_s=settings.delivery_backoff_s, cap_s=settings.delivery_backoff_max_s
                    )
                    path = None
                    if not item.spooled:
                        try:
                            path = str(self.spool.write_result(job.id, result.part10))
                        except OSError as exc:  # not spooled: the retry runs the model again
                            logger.error("job %d: cannot spool its result for a retry (%s)", job.id, exc)
                    settled = Settled(
                        job.id,
                        RETRY_OUTCOME,
                        attempts,
                        uid,
                        kind,
                        reason=f"delivery attempt {attempts} failed: {why}",
                        next_attempt_at=self.store.clock() + delay,
                        result_path=path,
                    )
            attempted.append(Attempted(item, error, settled))
        try:
            recorded = self.store.settle(self.owner, [entry.settled for entry in attempted])
        except Exception:
            # Not recorded: the jobs keep their state and lease; once the lease expires they are taken again
            # (run or delivered again: the results replace themselves, their UIDs being the same).
            logger.exception("cannot record %d delivery outcome(s) in the job store", len(attempted))
            recorded = set()
        for entry in attempted:
            entry.recorded = entry.item.job.id in recorded
            path = entry.settled.result_path
            if path is not None and not entry.recorded:
                self.spool.delete(path)  # spooled for a retry of a job that is no longer ours
        return attempted

    def _report(self, entry: Attempted) -> None:
        """Logs, counters and metrics of one attempted result (on the loop)."""
        job, settled, error = entry.item.job, entry.settled, entry.error
        if error is None:
            self._observe("delivered", max(0.0, time.time() - job.created_at))
        else:
            self._observe("permanent" if isinstance(error, PermanentDeliveryError) else "transient")
        if not entry.recorded:
            logger.info("job %d was cancelled or taken over while its result was being delivered", job.id)
            return
        if settled.outcome == DONE_OUTCOME:
            self.stats.delivered += 1
        elif settled.outcome == FAILED_OUTCOME:
            self.stats.failed += 1
            logger.info("job %d (%s) failed: %s", job.id, job.model, settled.reason)
        else:
            delay = max(0.0, (settled.next_attempt_at or 0.0) - self.store.clock())
            logger.info("job %d: %s; next in %.1f s", job.id, settled.reason, delay)
            asyncio.get_running_loop().call_later(delay, self._wake.set)  # look again when it falls due

    def _observe(self, outcome: str, latency_s: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.observe_delivery(outcome, latency_s)
