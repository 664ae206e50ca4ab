"""The batching engine on its own, with a plain Python ``predict`` (no HTTP, no torch)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Sequence
from typing import TypeVar

import pytest

from app.batching import (
    Batcher,
    BatcherClosedError,
    InferenceError,
    QueueFullError,
    RequestTimeoutError,
)
from tests.app.helpers import SAFETY_S, wait_until

pytestmark = pytest.mark.anyio

T = TypeVar("T")


class Model:
    """Doubles numbers; records every batch; can be held busy (``gate``) or fail on negative inputs."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, inputs: list[int]) -> Sequence[int]:
        self.batches.append(list(inputs))
        self.started.set()
        self.gate.wait(SAFETY_S)
        if any(x < 0 for x in inputs):
            raise ValueError("negative input")
        return [2 * x for x in inputs]

    def seen(self) -> list[int]:
        return [x for batch in self.batches for x in batch]


# A batch delay no test could wait out: a request that waited for it would make the test fail (at SAFETY_S).
NEVER = 1000 * SAFETY_S


async def settle(awaitable: Awaitable[T]) -> T:
    """Awaits; a request stuck waiting for a batch that is not coming fails the test instead of hanging."""
    return await asyncio.wait_for(awaitable, SAFETY_S)


def make(model: Model, **kwargs: float) -> Batcher[int, int]:
    options = {"max_batch_size": 4, "max_delay_s": NEVER, "max_queue": 64, "timeout_s": NEVER}
    options.update(kwargs)
    return Batcher(
        "test",
        model,
        max_batch_size=int(options["max_batch_size"]),
        max_delay_s=options["max_delay_s"],
        max_queue=int(options["max_queue"]),
        timeout_s=options["timeout_s"],
    )


async def hold_busy(model: Model, batcher: Batcher[int, int]) -> asyncio.Task[int]:
    """Starts a request that occupies the model until ``model.gate`` is set."""
    model.gate.clear()
    model.started.clear()
    task = asyncio.create_task(batcher.submit(1000))
    await wait_until(model.started.is_set, "the model started the blocking batch")
    return task


async def test_lone_request_is_sent_at_once_despite_a_long_delay() -> None:
    model = Model()
    batcher = make(model, max_delay_s=NEVER)
    batcher.start()
    assert await settle(batcher.submit(21)) == 42
    assert model.batches == [[21]]
    await batcher.stop()


async def test_batch_is_sent_when_full_without_waiting_for_the_delay() -> None:
    model = Model()
    batcher = make(model, max_batch_size=4, max_delay_s=NEVER)
    batcher.start()
    # Six requests announced; four arrive: the batch is full and goes, although two are still announced.
    places = [batcher.reserve() for _ in range(6)]
    results = [asyncio.create_task(place.submit(i)) for i, place in enumerate(places[:4])]
    assert await settle(asyncio.gather(*results)) == [0, 2, 4, 6]
    assert model.batches == [[0, 1, 2, 3]]
    for place in places[4:]:
        place.release()
    await batcher.stop()


async def test_partial_batch_is_sent_after_the_delay_when_announced_requests_do_not_come() -> None:
    model = Model()
    batcher = make(model, max_batch_size=8, max_delay_s=0.05)
    batcher.start()
    late = batcher.reserve()  # announced, but never submitted while the batch waits
    assert await asyncio.gather(batcher.submit(1), batcher.submit(2)) == [2, 4]
    assert model.batches == [[1, 2]]
    assert batcher.stats.batch_sizes == {2: 1}
    late.release()
    await batcher.stop()


async def test_releasing_the_last_announced_request_flushes_at_once() -> None:
    model = Model()
    batcher = make(model, max_batch_size=8, max_delay_s=NEVER)
    batcher.start()
    pending = batcher.reserve()
    task = asyncio.create_task(batcher.submit(5))
    await wait_until(lambda: batcher.queue_depth == 1, "the request is queued")
    assert not model.batches  # waits for the announced request
    pending.release()  # e.g. its image failed to decode: nothing else is coming
    assert await settle(task) == 10
    await batcher.stop()


async def test_requests_arriving_during_a_batch_form_the_next_batch() -> None:
    model = Model()
    batcher = make(model, max_batch_size=8, max_delay_s=NEVER)
    batcher.start()
    first = await hold_busy(model, batcher)
    rest = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
    await wait_until(lambda: batcher.queue_depth == 5, "five requests queued behind the busy model")
    model.gate.set()
    assert await first == 2000
    assert await asyncio.gather(*rest) == [0, 2, 4, 6, 8]
    assert model.batches == [[1000], [0, 1, 2, 3, 4]]
    snapshot = batcher.snapshot()
    assert snapshot["batches"] == 2 and snapshot["requests"] == 6
    assert snapshot["mean_batch_size"] == 3.0
    assert snapshot["max_queue_depth"] == 5
    assert snapshot["max_queue_ms"] > 0
    await batcher.stop()


async def test_a_failing_batch_is_retried_one_by_one_so_only_the_bad_request_fails() -> None:
    model = Model()
    batcher = make(model, max_batch_size=8)
    batcher.start()
    first = await hold_busy(model, batcher)
    tasks = [asyncio.create_task(batcher.submit(x)) for x in (1, -1, 3)]
    await wait_until(lambda: batcher.queue_depth == 3, "three requests queued")
    model.gate.set()
    await first
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], InferenceError)
    assert isinstance(results[1].__cause__, ValueError)
    assert model.batches[1:] == [[1, -1, 3], [1], [-1], [3]]
    assert batcher.stats.retried_batches == 1 and batcher.stats.failed == 1
    await batcher.stop()


async def test_cancelled_requests_are_dropped_before_inference() -> None:
    model = Model()
    batcher = make(model, max_batch_size=8)
    batcher.start()
    first = await hold_busy(model, batcher)
    keep = asyncio.create_task(batcher.submit(1))
    gone = asyncio.create_task(batcher.submit(2))
    await wait_until(lambda: batcher.queue_depth == 2, "two requests queued")
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert batcher.queue_depth == 1
    model.gate.set()
    await first
    assert await keep == 2
    assert 2 not in model.seen()
    assert batcher.stats.cancelled == 1
    await batcher.stop()


async def test_request_waiting_past_the_timeout_gets_an_error_and_is_never_run() -> None:
    model = Model()
    batcher = make(model, timeout_s=0.3)
    batcher.start()
    first = await hold_busy(model, batcher)  # started in time: it completes however long it takes
    late = asyncio.create_task(batcher.submit(7))
    with pytest.raises(RequestTimeoutError):
        await late  # answered while the model is still busy
    model.gate.set()
    assert await first == 2000
    assert 7 not in model.seen()
    assert batcher.stats.timed_out == 1
    await batcher.stop()


async def test_full_queue_refuses_at_once_and_recovers() -> None:
    model = Model()
    batcher = make(model, max_queue=2)
    batcher.start()
    first = await hold_busy(model, batcher)  # running requests do not count against the queue
    queued = [asyncio.create_task(batcher.submit(i)) for i in range(2)]
    await wait_until(lambda: batcher.queue_depth == 2, "the queue is full")
    with pytest.raises(QueueFullError) as refused:
        batcher.reserve()
    assert refused.value.retry_after_s > 0
    assert batcher.stats.rejected == 1
    model.gate.set()
    await first
    assert await asyncio.gather(*queued) == [0, 2]
    assert await batcher.submit(4) == 8  # room again
    await batcher.stop()


async def test_stop_runs_everything_accepted_then_refuses_new_requests() -> None:
    model = Model()
    batcher = make(model, max_batch_size=2)
    batcher.start()
    first = await hold_busy(model, batcher)
    queued = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
    await wait_until(lambda: batcher.queue_depth == 5, "five requests queued")
    stopping = asyncio.create_task(batcher.stop())
    await wait_until(lambda: batcher._closing, "the batcher is closing")
    with pytest.raises(BatcherClosedError):
        batcher.reserve()
    model.gate.set()
    await stopping
    assert await first == 2000
    assert await asyncio.gather(*queued) == [0, 2, 4, 6, 8]
    assert not batcher.running


async def test_each_request_gets_its_own_result_under_concurrency() -> None:
    model = Model()
    batcher = make(model, max_batch_size=8, max_delay_s=0.01)
    batcher.start()
    results = await asyncio.gather(*(batcher.submit(i) for i in range(50)))
    assert results == [2 * i for i in range(50)]
    assert sorted(model.seen()) == list(range(50))
    assert max(len(b) for b in model.batches) > 1
    await batcher.stop()


async def test_a_wrong_number_of_outputs_is_an_error_not_a_mix_up() -> None:
    batcher: Batcher[int, int] = Batcher(
        "short", lambda xs: xs[:-1], max_batch_size=4, max_delay_s=0.0, max_queue=8, timeout_s=10.0
    )
    batcher.start()
    with pytest.raises(InferenceError):
        await batcher.submit(1)
    await batcher.stop()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_delay_s": -1.0},
        {"max_queue": 0},
        {"timeout_s": 0.0},
    ],
)
async def test_invalid_configuration_is_a_clear_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make(Model(), **kwargs)
