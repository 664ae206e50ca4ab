"""An interactive /segment request never waits behind queued jobs: with 500 jobs queued it is in the next batch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from tests.app.helpers import (
    PNG,
    SEEN,
    encode_image,
    open_gate,
    save_pixel_model,
    serve,
    settings,
    wait_until,
)
from tests.app.pacs.helpers import instance, pacs_settings, stow
from tests.models.test_dicom import to_bytes

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("ignore::UserWarning:pydicom")]
JOBS = 500
BATCH = 4


async def test_with_500_jobs_queued_a_segment_request_runs_in_the_next_batch(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    name = "pacs-priority"
    with open_gate(name) as gate:
        save_pixel_model(models / "gated.pt", gate=name, record=name)  # 16x16 tiles: one window per image
        config = settings(
            models,
            max_batch_size=BATCH,
            **pacs_settings(tmp_path, jobs_concurrency=JOBS, spool_retention_s=0),
        )
        async with serve(config) as (app, client):
            batcher = app.state.registry.models["gated"].batcher
            gate.clear()  # after the warm-up: the first job batch holds the model
            SEEN[name] = []
            for start in range(0, JOBS, 50):
                parts = [to_bytes(instance(i, size=(16, 16))) for i in range(start, start + 50)]
                assert (await stow(client, parts)).status_code == 200
            # The first job batch holds the model (as many jobs as were queued when it formed); the rest wait.
            seen = SEEN[name]
            await wait_until(
                lambda: len(seen) == 1 and batcher.background_depth == JOBS - len(seen[0]), "500 jobs in"
            )
            held = 1  # the index of the next batch
            # A dim image: its normalised maximum (100/255 - 0.5) / 0.25 tells it from every job's (noise to 255).
            dim = np.full((16, 16), 100, dtype=np.uint8)
            answer = asyncio.create_task(client.post("/segment", content=encode_image(dim), headers=PNG))
            await wait_until(lambda: batcher.queue_depth == 1, "the request queued behind the jobs")
            gate.set()
            response = await answer
            assert response.status_code == 200
            await wait_until(lambda: batcher.background_depth == 0, "the jobs drained")
        batches = SEEN.pop(name)
    marker = (100 / 255 - 0.5) / 0.25
    with_request = [i for i, maxima in enumerate(batches) if any(abs(m - marker) < 1e-4 for m in maxima)]
    assert with_request == [held], (held, with_request)  # the batch right after the one that was running
    assert batches[held][0] == pytest.approx(marker)  # first in its batch, jobs fill the rest
    assert len(batches[held]) == BATCH
