"""The jobs API and the worker's delivery policy, in process (real SQLite store, spool and folder sinks)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.pacs.results import (
    FolderSink,
    PermanentDeliveryError,
    ResultObject,
    TransientDeliveryError,
    read_delivery_log,
)
from models.dicom_uids import result_instance_uid
from tests.app.helpers import GATES, SAFETY_S, assert_problem, gated_pixel_model, serve, settings, wait_until
from tests.app.pacs.helpers import instance, pacs_settings, stow, wait_for_jobs
from tests.models.test_dicom import to_bytes

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore::UserWarning:pydicom", "ignore::UserWarning:highdicom"),
]


async def jobs_in_states(client: httpx.AsyncClient, states: list[str]) -> list[dict[str, Any]]:
    """Polls GET /jobs until the jobs' states, in id order, are ``states``."""
    for _ in range(int(SAFETY_S / 0.02)):
        jobs = (await client.get("/jobs")).json()["jobs"]
        if [job["state"] for job in jobs] == states:
            return list(jobs)
        await asyncio.sleep(0.02)
    raise AssertionError(f"jobs never were {states}: {jobs}")


class FlakySink:
    """Refuses the first ``failures`` deliveries (transient, or permanent), then writes into a folder."""

    def __init__(self, folder: Path, failures: int, *, permanent: bool = False) -> None:
        self.inner = FolderSink(folder)
        self.failures = failures
        self.permanent = permanent
        self.calls = 0
        self.lock = threading.Lock()

    def deliver(self, result: ResultObject) -> None:
        with self.lock:
            self.calls += 1
            failing = self.calls <= self.failures
        if failing and self.permanent:
            raise PermanentDeliveryError("the archive answered 409: the study is locked")
        if failing:
            raise TransientDeliveryError("the archive answered 503")
        self.inner.deliver(result)


async def test_transient_failures_are_retried_until_the_result_lands(pixel_dir: Path, tmp_path: Path) -> None:
    sink = FlakySink(tmp_path / "archive", failures=3)
    async with serve(settings(pixel_dir, **pacs_settings(tmp_path))) as (app, client):
        app.state.pacs.worker.sink = sink
        await stow(client, [to_bytes(instance(1))])
        (job,) = await wait_for_jobs(client, {"done"}, 1)
    assert sink.calls == 4 and job["attempts"] == 4 and job["reason"] is None
    assert len(read_delivery_log(tmp_path / "archive")) == 1


async def test_a_refusal_fails_the_job_at_once_with_the_archives_reason(
    pixel_dir: Path, tmp_path: Path
) -> None:
    sink = FlakySink(tmp_path / "archive", failures=1, permanent=True)
    async with serve(settings(pixel_dir, **pacs_settings(tmp_path))) as (app, client):
        app.state.pacs.worker.sink = sink
        await stow(client, [to_bytes(instance(1))])
        (job,) = await wait_for_jobs(client, {"failed"}, 1)
    assert sink.calls == 1 and job["attempts"] == 1
    assert job["reason"] == "the archive refused the result: the archive answered 409: the study is locked"


async def test_delivery_gives_up_after_max_attempts(pixel_dir: Path, tmp_path: Path) -> None:
    sink = FlakySink(tmp_path / "archive", failures=1000)
    config = settings(pixel_dir, **pacs_settings(tmp_path, delivery_max_attempts=3))
    async with serve(config) as (app, client):
        app.state.pacs.worker.sink = sink
        await stow(client, [to_bytes(instance(1))])
        (job,) = await wait_for_jobs(client, {"failed"}, 1)
    assert sink.calls == 3 and job["attempts"] == 3
    assert job["reason"].startswith("delivery failed 3 times, the last: the archive answered 503")


async def test_a_failed_job_is_retried_on_request_and_then_delivered(pixel_dir: Path, tmp_path: Path) -> None:
    sink = FlakySink(tmp_path / "archive", failures=1, permanent=True)
    config = settings(pixel_dir, **pacs_settings(tmp_path, spool_retention_s=3600))
    async with serve(config) as (app, client):
        app.state.pacs.worker.sink = sink
        await stow(client, [to_bytes(instance(1))])
        (job,) = await wait_for_jobs(client, {"failed"}, 1)
        retried = await client.post(f"/jobs/{job['id']}/retry")
        assert retried.status_code == 200 and retried.json()["state"] in (
            "queued",
            "running",
            "delivering",
            "done",
        )
        (done,) = await wait_for_jobs(client, {"done"}, 1)
        again = await client.post(f"/jobs/{job['id']}/retry")
    assert done["id"] == job["id"] and done["attempts"] == 1 and done["reason"] is None
    assert_problem(again, 409, "job-conflict")
    assert len(read_delivery_log(tmp_path / "archive")) == 1


async def test_a_retry_needs_the_instance_in_the_spool(pixel_dir: Path, tmp_path: Path) -> None:
    sink = FlakySink(tmp_path / "archive", failures=1, permanent=True)
    async with serve(settings(pixel_dir, **pacs_settings(tmp_path))) as (app, client):
        app.state.pacs.worker.sink = sink
        await stow(client, [to_bytes(instance(1))])
        (job,) = await wait_for_jobs(client, {"failed"}, 1)
        await wait_until(
            lambda: not any((tmp_path / "spool" / "instances").iterdir()), "the instance deleted"
        )
        refused = await client.post(f"/jobs/{job['id']}/retry")
    assert "no longer in the spool" in assert_problem(refused, 409, "job-conflict")["detail"]


async def test_cancelling_queued_and_running_jobs_delivers_nothing(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    with gated_pixel_model(models, "pacs-cancel") as model_dir:
        gate = GATES["pacs-cancel"]
        config = settings(model_dir, **pacs_settings(tmp_path, jobs_concurrency=1))
        async with serve(config) as (app, client):
            gate.clear()  # after the warm-up
            await stow(client, [to_bytes(instance(1)), to_bytes(instance(2))])
            running, queued = await jobs_in_states(client, ["running", "queued"])
            first = await client.delete(f"/jobs/{queued['id']}")
            second = await client.delete(f"/jobs/{running['id']}")
            gate.set()
            jobs = await wait_for_jobs(client, {"cancelled"}, 2)
            await wait_until(lambda: app.state.pacs.worker.in_flight == 0, "the running job dropped")
            again = await client.delete(f"/jobs/{queued['id']}")
    assert first.status_code == 200 and first.json()["state"] == "cancelled"
    assert second.status_code == 200 and second.json()["state"] == "cancelled"
    assert [job["state"] for job in jobs] == ["cancelled", "cancelled"]
    assert_problem(again, 409, "job-conflict")
    assert read_delivery_log(tmp_path / "results") == []


async def test_jobs_are_listed_by_filter_a_page_at_a_time(pixel_dir: Path, tmp_path: Path) -> None:
    study = "1.2.3.4.5"
    async with serve(settings(pixel_dir, **pacs_settings(tmp_path))) as (_, client):
        await stow(client, [to_bytes(instance(i, study=study)) for i in range(5)])
        await stow(client, [to_bytes(instance(10))])
        await wait_for_jobs(client, {"done"}, 6)
        pages, cursor = [], None
        while True:
            params: dict[str, str | int] = {
                "study": study,
                "limit": 2,
                **({"cursor": cursor} if cursor else {}),
            }
            page = (await client.get("/jobs", params=params)).json()
            pages.append([job["id"] for job in page["jobs"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        everything = (await client.get("/jobs")).json()["jobs"]
        by_model = (await client.get("/jobs", params={"model": "nothing"})).json()["jobs"]
        by_state = (await client.get("/jobs", params={"state": "failed"})).json()["jobs"]
        bad_state = await client.get("/jobs", params={"state": "lost"})
        unknown = await client.get("/jobs/999999")
        one = await client.get(f"/jobs/{everything[0]['id']}")
    in_study = [job["id"] for job in everything if job["study_instance_uid"] == study]
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [job for page in pages for job in page] == in_study and len(in_study) == 5
    assert by_model == [] and by_state == []
    assert_problem(bad_state, 422, "invalid-request")
    assert_problem(unknown, 404, "job-not-found")
    assert one.json() == everything[0]


async def test_metrics_count_jobs_by_state_and_delivery_attempts(pixel_dir: Path, tmp_path: Path) -> None:
    sink = FlakySink(tmp_path / "archive", failures=1)
    async with serve(settings(pixel_dir, **pacs_settings(tmp_path))) as (app, client):
        app.state.pacs.worker.sink = sink
        await stow(client, [to_bytes(instance(1)), b"junk"])
        await wait_for_jobs(client, {"done"}, 1)
        text = (await client.get("/metrics")).text
    assert 'medserve_jobs{state="done"} 1.0' in text
    assert 'medserve_jobs{state="queued"} 0.0' in text
    assert "medserve_jobs_queue_age_seconds 0.0" in text
    assert 'medserve_delivery_attempts_total{outcome="transient"} 1.0' in text
    assert 'medserve_delivery_attempts_total{outcome="delivered"} 1.0' in text
    assert "medserve_delivery_latency_seconds_count 1.0" in text
    assert 'medserve_instances_received_total{outcome="accepted",source="stow"} 1.0' in text
    assert 'medserve_instances_received_total{outcome="refused",source="stow"} 1.0' in text


async def test_a_clean_shutdown_gives_running_jobs_back_and_the_next_start_finishes_them(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    with gated_pixel_model(models, "pacs-shutdown") as model_dir:
        gate = GATES["pacs-shutdown"]
        config = settings(model_dir, **pacs_settings(tmp_path, jobs_concurrency=2))
        async with serve(config) as (app, client):
            gate.clear()  # after the warm-up
            await stow(client, [to_bytes(instance(i)) for i in range(3)])
            await wait_for_jobs(client, {"running", "queued"}, 3)
            gate.set()  # let the model go so that the batcher can stop
            await app.state.pacs.worker.stop()  # as the lifespan does first on shutdown
            states = sorted(job["state"] for job in (await client.get("/jobs")).json()["jobs"])
        assert "running" not in states
        async with serve(config) as (_, client):
            jobs = await wait_for_jobs(client, {"done"}, 3)
    assert len(jobs) == 3
    assert sorted(entry[0] for entry in read_delivery_log(tmp_path / "results")) == [j["id"] for j in jobs]


class GroupSink:
    """A sink that takes several results per attempt (``deliver_many``): refuses ``refuse`` for good, fails
    ``flaky`` once (transient), and holds the first attempts until ``hold_until()`` is true."""

    def __init__(self, folder: Path, hold_until: Any, *, refuse: set[str], flaky: set[str]) -> None:
        self.inner = FolderSink(folder)
        self.hold_until = hold_until
        self.refuse, self.flaky = refuse, set(flaky)
        self.groups: list[list[str]] = []
        self.lock = threading.Lock()

    def deliver(self, result: ResultObject) -> None:
        (error,) = self.deliver_many([result])
        if error is not None:
            raise error

    def deliver_many(self, results: list[ResultObject]) -> list[Exception | None]:
        for _ in range(int(SAFETY_S / 0.01)):
            if self.hold_until():
                break
            threading.Event().wait(0.01)
        outcomes: list[Exception | None] = []
        with self.lock:
            self.groups.append([r.sop_instance_uid for r in results])
            for result in results:
                if result.sop_instance_uid in self.refuse:
                    outcomes.append(PermanentDeliveryError("the archive answered 400: part refused"))
                elif result.sop_instance_uid in self.flaky:
                    self.flaky.discard(result.sop_instance_uid)
                    outcomes.append(TransientDeliveryError("the archive answered 503"))
                else:
                    self.inner.deliver(result)
                    outcomes.append(None)
        return outcomes


async def test_results_ready_together_go_in_one_attempt_and_a_failed_part_fails_alone(
    pixel_dir: Path, tmp_path: Path
) -> None:
    sources = [instance(i) for i in range(6)]
    async with serve(settings(pixel_dir, **pacs_settings(tmp_path))) as (app, client):
        worker = app.state.pacs.worker
        version = app.state.registry.models["pixel"].runner.version
        uids = [result_instance_uid(str(ds.SOPInstanceUID), version, "seg") for ds in sources]
        # the first attempts are held until the other results wait behind them: they then go together
        sink = GroupSink(
            tmp_path / "archive",
            lambda: worker.waiting_results >= 2 or worker.stats.delivered + worker.stats.failed > 0,
            refuse={uids[4]},
            flaky={uids[5]},
        )
        worker.sink = sink
        await stow(client, [to_bytes(ds) for ds in sources])
        jobs = await wait_for_jobs(client, {"done", "failed"}, 6)
    by_result = {job["result_sop_instance_uid"]: job for job in jobs}
    assert set(by_result) == set(uids)
    assert [by_result[uid]["state"] for uid in uids] == ["done"] * 4 + ["failed", "done"]
    assert (
        by_result[uids[4]]["reason"]
        == "the archive refused the result: the archive answered 400: part refused"
    )
    assert by_result[uids[4]]["attempts"] == 1
    assert by_result[uids[5]]["attempts"] == 2 and by_result[uids[5]]["reason"] is None
    assert all(by_result[uid]["attempts"] == 1 for uid in uids[:4])
    assert max(len(group) for group in sink.groups) >= 2  # several results in one attempt
    assert sum(len(group) for group in sink.groups) == 7  # six first attempts and one retry
    delivered = sorted(entry.sop_instance_uid for entry in read_delivery_log(tmp_path / "archive"))
    assert delivered == sorted([*uids[:4], uids[5]])
