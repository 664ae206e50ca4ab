"""Backpressure under a burst far above capacity: refusals come at once, accepted work completes, then recovery.

The model is held busy (its forward waits on a gate) while 64 requests arrive for a queue of 8: every request
beyond what the service holds must get 503 + Retry-After while the model is still blocked (so the refusal did
not wait for anything), every accepted request must then complete with its own correct answer, and once the
burst is over the service must serve normally again without any intervention.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.app.helpers import (
    GATES,
    PNG,
    assert_problem,
    decode_png,
    encode_image,
    expected_binary_mask,
    gated_pixel_model,
    random_image,
    serve,
    settings,
    wait_until,
)

pytestmark = pytest.mark.anyio

BURST = 64
MAX_QUEUE = 8
MAX_BATCH = 4


@pytest.fixture
def gated_dir(tmp_path: Path) -> Iterator[Path]:
    with gated_pixel_model(tmp_path, "overload") as directory:
        yield directory


async def test_a_burst_beyond_the_queue_is_refused_at_once_and_the_service_recovers(gated_dir: Path) -> None:
    images = [random_image(9, 13, seed=i) for i in range(BURST)]
    config = settings(
        gated_dir, max_queue=MAX_QUEUE, max_batch_size=MAX_BATCH, warmup=False, max_batch_delay_ms=0
    )
    async with serve(config) as (app, client):
        batcher = app.state.registry.models["gated"].batcher
        GATES["overload"].clear()
        tasks = [
            asyncio.create_task(client.post("/segment", content=encode_image(a), headers=PNG)) for a in images
        ]

        def settled() -> bool:
            refused = sum(t.done() for t in tasks)
            held = batcher.stats.requests + batcher.queue_depth  # in the blocked batch + queued
            return refused + held == BURST and batcher.announced == 0

        await wait_until(settled, "every request of the burst is either held or answered")
        # All answers so far came while the model was blocked: refusals never waited for capacity.
        answered = [t.result() for t in tasks if t.done()]
        held = BURST - len(answered)
        assert held <= MAX_QUEUE + MAX_BATCH
        assert len(answered) >= BURST - MAX_QUEUE - MAX_BATCH
        for response in answered:
            assert_problem(response, 503, "queue-full")
            assert int(response.headers["retry-after"]) >= 1

        GATES["overload"].set()
        responses = await asyncio.gather(*tasks)
        accepted = [(a, r) for a, r in zip(images, responses, strict=True) if r.status_code == 200]
        assert len(accepted) == held  # everything accepted completed
        for image, response in accepted:
            np.testing.assert_array_equal(decode_png(response.content), expected_binary_mask(image))
        assert batcher.stats.rejected == len(answered) and batcher.stats.timed_out == 0

        # The burst is over: a full queue's worth of new requests is served without a single refusal.
        after = await asyncio.gather(
            *(client.post("/segment", content=encode_image(a), headers=PNG) for a in images[:MAX_QUEUE])
        )
        assert [r.status_code for r in after] == [200] * MAX_QUEUE
        assert batcher.queue_depth == 0 and batcher.announced == 0
