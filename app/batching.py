"""The dynamic batching engine: one module, one ``Batcher`` per model, used by every task.

Policy:
    * A request first takes a *reservation* ("announced": it is being read and decoded and will join soon),
      then submits its decoded input to the model's queue. The queue is bounded: when queued + announced
      requests reach ``max_queue``, a new request is refused at once (``QueueFullError`` -> 503 + Retry-After).
    * The collector takes the requests waiting in the queue and sends a batch when it holds
      ``max_batch_size`` requests, or ``max_delay_s`` after its first request arrived, or at once when nothing
      is announced: a lone request never waits for a batch that is not coming. Requests that arrive while a
      batch runs form the next one, so under load batches fill without any delay.
    * The model runs in one dedicated worker thread per model (``predict`` is called there with the inputs of
      one batch), so the event loop stays free while a batch runs.
    * Each request gets its own result. If a batch raises, its requests are retried one by one so that only
      the request at fault gets an error (``InferenceError``).
    * Requests cancelled by their client while queued are dropped before inference. A request that has not
      started within ``timeout_s`` of its arrival gets ``RequestTimeoutError`` (-> 504) and is never run.
    * ``stop()`` refuses new requests, runs everything accepted, then ends the worker thread.
    * Background work (``submit_background``: the PACS jobs) waits in a second, low-priority lane: a batch takes
      the interactive requests first and fills only the places they leave with background work; while an
      interactive request is being decoded, background work waits for it (up to the batch delay) instead of
      starting a batch without it. So an interactive request waits behind at most the one batch already
      running. Background work has no timeout and no place in ``max_queue`` (its producer bounds it).
    * ``stats`` counts batch sizes, queue depth, time in queue and time in the model.

This module knows nothing of HTTP or torch: the routes map its errors to responses (``app.errors``) and the
runners (``app.runners``) supply ``predict``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger("medserve.batching")

InputT = TypeVar("InputT")
OutputT = TypeVar("OutputT")
T = TypeVar("T")


class BatchingError(Exception):
    """Base class of the engine's errors."""


class QueueFullError(BatchingError):
    """The model's queue is full; ``retry_after_s`` estimates when there will be room."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatcherClosedError(BatchingError):
    """The batcher is stopping or stopped and takes no new requests."""


class RequestTimeoutError(BatchingError):
    """The request waited past the timeout before the model could run it; it was not run."""


class InferenceError(BatchingError):
    """The model raised on this request (also when run alone); the cause is chained and logged."""


@dataclass
class BatcherStats:
    """Counters of one batcher since it started (read by /models and the benchmark)."""

    batches: int = 0
    requests: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    queue_seconds_total: float = 0.0
    queue_seconds_max: float = 0.0
    run_seconds_total: float = 0.0
    max_queue_depth: int = 0
    rejected: int = 0
    timed_out: int = 0
    cancelled: int = 0
    failed: int = 0
    retried_batches: int = 0

    def record_batch(self, queue_seconds: Sequence[float]) -> None:
        """Counts a batch about to run, with each request's time in the queue."""
        size = len(queue_seconds)
        self.batches += 1
        self.requests += size
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1
        self.queue_seconds_total += sum(queue_seconds)
        self.queue_seconds_max = max(self.queue_seconds_max, *queue_seconds)

    def record_run(self, seconds: float) -> None:
        self.run_seconds_total += seconds

    def mean_batch_seconds(self) -> float | None:
        return self.run_seconds_total / self.batches if self.batches else None

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view, with means (``None`` before the first batch)."""
        mean_size = self.requests / self.batches if self.batches else None
        mean_queue = 1000 * self.queue_seconds_total / self.requests if self.requests else None
        mean_batch = self.mean_batch_seconds()
        return {
            "batches": self.batches,
            "requests": self.requests,
            "mean_batch_size": mean_size,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "mean_queue_ms": mean_queue,
            "max_queue_ms": 1000 * self.queue_seconds_max,
            "mean_batch_ms": None if mean_batch is None else 1000 * mean_batch,
            "max_queue_depth": self.max_queue_depth,
            "rejected_queue_full": self.rejected,
            "timed_out": self.timed_out,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "retried_batches": self.retried_batches,
        }


class _State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


@dataclass(eq=False)
class _Request(Generic[InputT, OutputT]):
    payload: InputT
    future: asyncio.Future[OutputT]
    arrived_at: float
    enqueued_at: float
    deadline: float
    state: _State = _State.QUEUED


class Reservation(Generic[InputT, OutputT]):
    """A place in a batcher's queue, held from a request's arrival until its input is submitted.

    While held, the request counts as *announced*: the collector waits (up to the batch delay) for announced
    requests instead of sending a smaller batch. Use as a context manager: leaving it without ``submit``
    (e.g. the image failed to decode) gives the place back at once.
    """

    def __init__(self, batcher: Batcher[InputT, OutputT], arrived_at: float) -> None:
        self._batcher = batcher
        self._held = True
        self.arrived_at = arrived_at

    def __enter__(self) -> Reservation[InputT, OutputT]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def another(self) -> Reservation[InputT, OutputT]:
        """A further place for the same request (e.g. its other files), taken while this one is held: granted
        even when the batcher is stopping, which runs every request it admitted.

        Raises:
            QueueFullError: queued + announced requests already reach ``max_queue``.
            RuntimeError: this reservation was already used or released.
        """
        if not self._held:
            raise RuntimeError("this reservation was already used or released")
        return self._batcher._take_place()

    def release(self) -> None:
        """Gives the place back (idempotent)."""
        if self._held:
            self._held = False
            self._batcher._unannounce()

    async def submit(self, payload: InputT) -> OutputT:
        """Queues the decoded input in place of the reservation and waits for its result.

        Raises:
            RequestTimeoutError: not started within the timeout (counted from the reservation).
            InferenceError: the model failed on this input.
            RuntimeError: the reservation was already used or released.
        """
        if not self._held:
            raise RuntimeError("this reservation was already used or released")
        self._held = False
        # No await between leaving the announced count and joining the queue: the collector never sees the
        # request missing from both.
        self._batcher._unannounce(wake=False)
        return await self._batcher._enqueue_and_wait(payload, self.arrived_at)


class Batcher(Generic[InputT, OutputT]):
    """Collects requests for one model into batches and runs them in the model's worker thread.

    Args:
        name: the model's name (thread name and log messages).
        predict: called in the worker thread with the inputs of one batch; returns one output per input,
            in order. It may raise; the batch is then retried one request at a time.
        max_batch_size: most requests per batch (>= 1; 1 turns batching off).
        max_delay_s: longest time a batch waits to fill after its first request (>= 0).
        max_queue: most requests queued or announced at once (>= 1).
        timeout_s: a request not started this many seconds after its arrival is refused (> 0).
        clock: monotonic time source (seconds).
        on_batch: called on the event loop after each batch with the model's name, each request's time in the
            queue and the batch's run time (seconds), e.g. to feed metrics; its errors are logged, not raised.

    Raises:
        ValueError: for a non-positive size, queue or timeout, or a negative delay.
    """

    def __init__(
        self,
        name: str,
        predict: Callable[[list[InputT]], Sequence[OutputT]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_batch: Callable[[str, Sequence[float], float], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.stats = BatcherStats()
        self._predict = predict
        self._clock = clock
        self._on_batch = on_batch
        self._queue: deque[_Request[InputT, OutputT]] = deque()
        self._background: deque[_Request[InputT, OutputT]] = deque()
        self._announced = 0
        self._changed = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"medserve-model-{name}")
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- public API -------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests decoded and waiting for the model."""
        return len(self._queue)

    @property
    def background_depth(self) -> int:
        """Background requests (``submit_background``) waiting for the model."""
        return len(self._background)

    @property
    def announced(self) -> int:
        """Requests holding a reservation (being read or decoded)."""
        return self._announced

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Starts the collector task on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._collect_forever(), name=f"batcher-{self.name}"
            )

    async def stop(self) -> None:
        """Refuses new requests, runs every accepted one (queued or announced), then stops the worker."""
        self._closing = True
        self._changed.set()
        if self._task is not None:
            await self._task
        # The worker may still finish a warm-up batch: wait for it without blocking the event loop.
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    def reserve(self) -> Reservation[InputT, OutputT]:
        """Takes a place for a request about to be decoded.

        Raises:
            QueueFullError: queued + announced requests already reach ``max_queue``.
            BatcherClosedError: the batcher is stopping.
        """
        if self._closing:
            raise BatcherClosedError(f"model {self.name!r} is shutting down")
        return self._take_place()

    def _take_place(self) -> Reservation[InputT, OutputT]:
        if len(self._queue) + self._announced >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFullError(
                f"model {self.name!r} has {self.max_queue} requests waiting; retry later",
                retry_after_s=self.estimated_wait_s(),
            )
        self._announced += 1
        return Reservation(self, self._clock())

    async def submit(self, payload: InputT) -> OutputT:
        """Reserves and submits in one step (for inputs that are ready now). Raises as ``reserve``/``submit``."""
        return await self.reserve().submit(payload)

    async def submit_background(self, payload: InputT) -> OutputT:
        """Queues ``payload`` in the low-priority lane and waits for its result: it joins a batch only where
        interactive requests leave room (see the module docstring). No timeout; cancelling drops it.

        Raises:
            BatcherClosedError: the batcher is stopping.
            InferenceError: the model failed on this input.
        """
        if self._closing:
            raise BatcherClosedError(f"model {self.name!r} is shutting down")
        return await self._enqueue_and_wait(payload, self._clock(), background=True)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn(*args)`` in the model's worker thread (e.g. a warm-up before ``start``)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def estimated_wait_s(self) -> float:
        """Rough time until the current queue is worked off (for Retry-After)."""
        per_batch = self.stats.mean_batch_seconds() or 1.0
        batches = (len(self._queue) + self._announced) / self.max_batch_size
        return per_batch * (batches + 1)

    def snapshot(self) -> dict[str, Any]:
        """Stats plus the live queue state and the policy in force."""
        return {
            **self.stats.snapshot(),
            "queue_depth": len(self._queue),
            "background_depth": len(self._background),
            "announced": self._announced,
            "max_batch_size": self.max_batch_size,
            "max_batch_delay_ms": 1000 * self.max_delay_s,
            "max_queue": self.max_queue,
        }

    # -- internals --------------------------------------------------------------------------------------

    def _unannounce(self, wake: bool = True) -> None:
        self._announced -= 1
        if wake:
            self._changed.set()

    async def _enqueue_and_wait(
        self, payload: InputT, arrived_at: float, background: bool = False
    ) -> OutputT:
        now = self._clock()
        future: asyncio.Future[OutputT] = asyncio.get_running_loop().create_future()
        deadline = float("inf") if background else arrived_at + self.timeout_s
        request = _Request(payload, future, arrived_at, now, deadline)
        if background:
            self._background.append(request)
        else:
            self._queue.append(request)
            self.stats.max_queue_depth = max(self.stats.max_queue_depth, len(self._queue))
        self._changed.set()
        try:
            timeout = None if background else max(0.0, request.deadline - self._clock())
            done, _ = await asyncio.wait({future}, timeout=timeout)
            if not done and request.state is _State.QUEUED:
                self._drop(request, _State.EXPIRED)
                raise RequestTimeoutError(
                    f"waited more than {self.timeout_s:g} s for model {self.name!r}; the request was not run"
                )
            # Started before the deadline (or finished): its result is coming, wait for it.
            return await future
        except asyncio.CancelledError:
            if request.state is _State.QUEUED:
                self._drop(request, _State.CANCELLED)
            raise

    def _drop(self, request: _Request[InputT, OutputT], state: _State) -> None:
        request.state = state
        if state is _State.EXPIRED:
            self.stats.timed_out += 1
        else:
            self.stats.cancelled += 1
        with contextlib.suppress(ValueError):  # already taken by the collector, which skips it
            (self._queue if request in self._queue else self._background).remove(request)
        self._changed.set()

    async def _wait_for_change(self, timeout: float | None) -> None:
        # Callers check their condition right before this call without awaiting, so no wake-up is lost.
        self._changed.clear()
        if timeout is None:
            await self._changed.wait()
            return
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            pass

    async def _next_batch(self) -> list[_Request[InputT, OutputT]] | None:
        """Waits for the next batch by the policy in the module docstring; ``None`` when stopped and empty."""
        while True:
            while not self._queue and not self._background:
                if self._closing and self._announced == 0:
                    return None
                await self._wait_for_change(None)
            if self._queue or self._announced == 0:
                break
            # Only background work waits, and an interactive request is being decoded: it goes first, unless
            # it takes longer than the batch delay (or is given up).
            waited_until = self._clock() + self.max_delay_s
            while not self._queue and self._announced > 0 and self._clock() < waited_until:
                await self._wait_for_change(waited_until - self._clock())
            if not self._queue:
                break
        if self._queue:
            deadline = self._queue[0].enqueued_at + self.max_delay_s
            # Waiting only makes sense for requests that are announced: nothing else can join.
            while self._queue and len(self._queue) < self.max_batch_size and self._announced > 0:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                await self._wait_for_change(remaining)
        size = min(len(self._queue), self.max_batch_size)
        batch = [self._queue.popleft() for _ in range(size)]
        fill = min(len(self._background), self.max_batch_size - size)
        return batch + [self._background.popleft() for _ in range(fill)]

    async def _collect_forever(self) -> None:
        try:
            while True:
                batch = await self._next_batch()
                if batch is None:
                    return
                await self._execute(batch)
        except asyncio.CancelledError:
            for request in (*self._queue, *self._background):
                if not request.future.done():
                    request.future.set_exception(BatcherClosedError(f"model {self.name!r} stopped"))
            self._queue.clear()
            self._background.clear()
            raise

    def _run_checked(self, payloads: list[InputT]) -> Sequence[OutputT]:
        outputs = self._predict(payloads)
        if len(outputs) != len(payloads):
            raise RuntimeError(f"predict returned {len(outputs)} outputs for {len(payloads)} inputs")
        return outputs

    async def _execute(self, batch: list[_Request[InputT, OutputT]]) -> None:
        now = self._clock()
        live: list[_Request[InputT, OutputT]] = []
        for request in batch:
            if request.state is not _State.QUEUED or request.future.done():
                continue  # cancelled or expired while queued: never run
            if now > request.deadline:
                request.state = _State.EXPIRED
                self.stats.timed_out += 1
                request.future.set_exception(
                    RequestTimeoutError(f"waited more than {self.timeout_s:g} s for model {self.name!r}")
                )
                continue
            request.state = _State.RUNNING
            live.append(request)
        if not live:
            return
        queue_seconds = [now - r.enqueued_at for r in live]
        self.stats.record_batch(queue_seconds)
        loop = asyncio.get_running_loop()
        started = self._clock()
        try:
            outputs = await loop.run_in_executor(self._executor, self._run_checked, [r.payload for r in live])
        except Exception as exc:
            if len(live) == 1:
                self._fail(live[0], exc)
            else:
                # One bad input must not fail the others: find it by running each request alone.
                logger.warning("model %s: batch of %d failed; retrying one by one", self.name, len(live))
                self.stats.retried_batches += 1
                for request in live:
                    if request.future.done():
                        continue  # its client went away meanwhile
                    try:
                        single = await loop.run_in_executor(
                            self._executor, self._run_checked, [request.payload]
                        )
                    except Exception as single_exc:
                        self._fail(request, single_exc)
                    else:
                        self._resolve(request, single[0])
        else:
            for request, output in zip(live, outputs, strict=True):
                self._resolve(request, output)
        run_seconds = self._clock() - started
        self.stats.record_run(run_seconds)
        if self._on_batch is not None:
            try:
                self._on_batch(self.name, queue_seconds, run_seconds)
            except Exception:  # observing must never break serving
                logger.exception("model %s: batch observer failed", self.name)

    @staticmethod
    def _resolve(request: _Request[InputT, OutputT], output: OutputT) -> None:
        if not request.future.done():
            request.future.set_result(output)

    def _fail(self, request: _Request[InputT, OutputT], exc: Exception) -> None:
        self.stats.failed += 1
        logger.error("model %s failed on a request", self.name, exc_info=exc)
        if not request.future.done():
            error = InferenceError(f"model {self.name!r} failed on this input")
            error.__cause__ = exc
            request.future.set_exception(error)
