"""The batcher's low-priority lane (``submit_background``): jobs use only what interactive requests leave."""

from __future__ import annotations

import asyncio

import pytest

from app.batching import BatcherClosedError
from tests.app.helpers import wait_until
from tests.app.test_batching import NEVER, Model, hold_busy, make, settle

pytestmark = pytest.mark.anyio


async def test_with_500_jobs_queued_an_interactive_request_is_in_the_next_batch() -> None:
    model = Model()
    batcher = make(model, max_batch_size=4, max_delay_s=NEVER)
    batcher.start()
    try:
        blocker = await hold_busy(model, batcher)
        jobs = [asyncio.create_task(batcher.submit_background(i)) for i in range(500)]
        await wait_until(lambda: batcher.background_depth == 500, "500 jobs queued")
        interactive = asyncio.create_task(batcher.submit(777))
        await wait_until(lambda: batcher.queue_depth == 1, "the interactive request queued")
        model.gate.set()
        assert await settle(interactive) == 1554
        assert await settle(blocker) == 2000
        results = await settle(asyncio.gather(*jobs))
    finally:
        model.gate.set()
        await batcher.stop()
    assert results == [2 * i for i in range(500)]
    # Batch 0: the blocker. Batch 1: the interactive request first, filled up with jobs in their order.
    assert model.batches[1] == [777, 0, 1, 2]
    assert model.seen()[5:] == list(range(3, 500))  # then the jobs in order, never ahead of it
    assert all(len(batch) <= 4 for batch in model.batches)


async def test_interactive_requests_fill_a_batch_before_jobs_get_a_place() -> None:
    model = Model()
    batcher = make(model, max_batch_size=4, max_delay_s=NEVER)
    batcher.start()
    try:
        blocker = await hold_busy(model, batcher)
        jobs = [asyncio.create_task(batcher.submit_background(i)) for i in range(10)]
        interactive = [asyncio.create_task(batcher.submit(100 + i)) for i in range(6)]
        await wait_until(lambda: batcher.queue_depth == 6 and batcher.background_depth == 10, "all queued")
        model.gate.set()
        await settle(asyncio.gather(blocker, *interactive, *jobs))
    finally:
        model.gate.set()
        await batcher.stop()
    assert model.batches[1] == [100, 101, 102, 103]
    assert model.batches[2] == [104, 105, 0, 1]
    assert [x for batch in model.batches[3:] for x in batch] == list(range(2, 10))


async def test_jobs_wait_for_an_interactive_request_being_decoded() -> None:
    model = Model()
    batcher = make(model, max_batch_size=4, max_delay_s=NEVER)
    batcher.start()
    try:
        with batcher.reserve() as reservation:  # an interactive request being read and decoded
            jobs = [asyncio.create_task(batcher.submit_background(i)) for i in range(3)]
            await wait_until(lambda: batcher.background_depth == 3, "jobs queued")
            await asyncio.sleep(0.05)
            assert model.batches == []  # the jobs did not start a batch without it
            interactive = asyncio.create_task(reservation.submit(50))
            assert await settle(interactive) == 100
        await settle(asyncio.gather(*jobs))
    finally:
        await batcher.stop()
    assert model.batches[0] == [50, 0, 1, 2]


async def test_jobs_alone_run_in_full_batches_without_waiting_for_the_delay() -> None:
    model = Model()
    batcher = make(model, max_batch_size=4, max_delay_s=NEVER)
    batcher.start()
    try:
        blocker = await hold_busy(model, batcher)
        jobs = [asyncio.create_task(batcher.submit_background(i)) for i in range(9)]
        await wait_until(lambda: batcher.background_depth == 9, "jobs queued")
        model.gate.set()
        await settle(asyncio.gather(blocker, *jobs))
    finally:
        await batcher.stop()
    assert [len(batch) for batch in model.batches] == [1, 4, 4, 1]


async def test_a_cancelled_job_is_never_run_and_a_stopping_batcher_refuses_jobs() -> None:
    model = Model()
    batcher = make(model, max_batch_size=4, max_delay_s=NEVER)
    batcher.start()
    try:
        blocker = await hold_busy(model, batcher)
        dropped = asyncio.create_task(batcher.submit_background(7))
        kept = asyncio.create_task(batcher.submit_background(8))
        await wait_until(lambda: batcher.background_depth == 2, "jobs queued")
        dropped.cancel()
        await wait_until(lambda: batcher.background_depth == 1, "the cancelled job left the lane")
        model.gate.set()
        assert await settle(kept) == 16
        await settle(blocker)
    finally:
        model.gate.set()
        await batcher.stop()
    assert 7 not in model.seen()
    with pytest.raises(BatcherClosedError):
        await batcher.submit_background(1)
