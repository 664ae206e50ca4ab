"""The job store on SQLite and on a real PostgreSQL: one job per (instance, model), claims never shared,
leases reclaimed after a process died."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.pacs.store import (
    CANCELLED,
    DELIVERING,
    DONE,
    DONE_OUTCOME,
    FAILED,
    FAILED_OUTCOME,
    MAX_RUNS,
    QUEUED,
    RETRY_OUTCOME,
    RUNNING,
    InstanceRecord,
    JobStore,
    NewJob,
    Settled,
    engine_url,
)
from tests.app.pacs.postgres import postgres_server


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        opened = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    else:
        opened = JobStore(request.getfixturevalue("postgres_url"))
        with opened.engine.begin() as db:  # a clean slate per test
            db.exec_driver_sql("TRUNCATE medserve_jobs, medserve_instances RESTART IDENTITY")
    yield opened
    opened.close()


def record(uid: str, study: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(
        uid, study, "1.2.3.4", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.1", f"/s/{uid}", 10, "stow"
    )


MODELS = {"m": "v1"}


def test_postgresql_urls_use_psycopg_3() -> None:
    assert engine_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert engine_url("postgres://h/db") == "postgresql+psycopg://h/db"
    assert engine_url("sqlite:///x.sqlite") == "sqlite:///x.sqlite"


def test_the_same_instance_twice_makes_one_job_per_model(store: JobStore) -> None:
    first = store.record(
        record("1.1"), [NewJob("m", "v1", "segmentation"), NewJob("n", "v1", "segmentation")]
    )
    again = store.record(record("1.1"), [NewJob("m", "v1", "segmentation")])
    newer = store.record(record("1.1"), [NewJob("m", "v2", "segmentation")])  # a new model version: a new job
    assert not first.known and first.new_jobs == 2 and len(first.job_ids) == 2
    assert again.known and again.new_jobs == 0 and again.job_ids == first.job_ids
    assert newer.known and newer.new_jobs == 1 and len(newer.job_ids) == 3
    assert store.counts()[QUEUED] == 3


def test_concurrent_claims_never_take_the_same_job(store: JobStore) -> None:
    for i in range(60):
        store.record(record(f"2.{i}"), [NewJob("m", "v1", "segmentation")])
    taken: dict[str, list[int]] = {}
    start = threading.Barrier(4)

    def worker(owner: str) -> None:
        start.wait()
        mine = taken.setdefault(owner, [])
        while True:
            claimed = store.claim(owner, MODELS, 3, lease_s=60)
            if not claimed:
                return
            mine.extend(job.id for job in claimed)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [job for jobs in taken.values() for job in jobs]
    assert len(everything) == 60 and len(set(everything)) == 60


def test_a_job_whose_lease_expired_is_reclaimed_and_fails_after_max_runs(store: JobStore) -> None:
    (job_id,) = store.record(record("3.1"), [NewJob("m", "v1", "segmentation")]).job_ids
    (first,) = store.claim("dead-1", MODELS, 10, lease_s=0.05)
    assert first.id == job_id and first.phase == "run"
    assert store.claim("alive", MODELS, 10, lease_s=60) == []  # leased
    time.sleep(0.1)
    for owner in [f"dead-{n}" for n in range(2, MAX_RUNS + 1)]:
        (again,) = store.claim(owner, MODELS, 10, lease_s=0.05)
        assert again.id == job_id
        assert not store.result_ready(job_id, "dead-1", "/r", "9.9", "seg")  # the old owner lost it
        time.sleep(0.1)
    assert store.claim("alive", MODELS, 10, lease_s=60) == []
    row = store.get(job_id)
    assert row is not None and row["state"] == FAILED and f"stopped {MAX_RUNS} times" in row["reason"]


def test_delivering_jobs_wait_for_their_attempt_time_and_finish_once(store: JobStore) -> None:
    (job_id,) = store.record(record("4.1"), [NewJob("m", "v1", "segmentation")]).job_ids
    store.claim("a", MODELS, 10, lease_s=60)
    assert store.result_ready(job_id, "a", "/r/1.dcm", "9.1", "seg")
    assert store.retry_later(job_id, "a", 1, delay_s=0.2, reason="attempt 1 failed: 503")
    assert store.claim("b", MODELS, 10, lease_s=60) == []  # not due yet
    time.sleep(0.25)
    (due,) = store.claim("b", MODELS, 10, lease_s=60)
    assert due.phase == "deliver" and due.attempts == 1 and due.result_path == "/r/1.dcm"
    assert not store.delivered(job_id, "a", 2)  # no longer a's
    assert store.delivered(job_id, "b", 2)
    row = store.get(job_id)
    assert row is not None and row["state"] == DONE and row["attempts"] == 2 and row["reason"] is None


def test_jobs_of_other_models_or_versions_are_left_alone(store: JobStore) -> None:
    store.record(record("5.1"), [NewJob("m", "v0", "segmentation"), NewJob("x", "v1", "segmentation")])
    assert store.claim("a", MODELS, 10, lease_s=60) == []
    assert [job.model for job in store.claim("a", {"x": "v1"}, 10, lease_s=60)] == ["x"]


def test_the_claim_query_built_once_still_takes_its_limit_versions_and_time(store: JobStore) -> None:
    ids = [store.record(record(f"5.5.{i}"), [NewJob("m", "v1", "segmentation")]).job_ids[0] for i in range(3)]
    assert [job.id for job in store.claim("a", MODELS, 1, lease_s=0.05)] == ids[:1]
    assert [job.id for job in store.claim("a", MODELS, 1, lease_s=0.05)] == ids[1:2]  # the same query again
    assert store.claim("a", {"m": "v2"}, 10, lease_s=60) == []  # another version: another query
    time.sleep(0.1)  # the first two leases expire: a later time, the same query
    assert sorted(job.id for job in store.claim("b", MODELS, 10, lease_s=60)) == ids


def test_spool_clean_up_forgets_many_files_in_one_call_but_not_a_respooled_one(store: JobStore) -> None:
    ids = [store.record(record(f"6.{i}"), [NewJob("m", "v1", "segmentation")]).job_ids[0] for i in range(3)]
    claimed = store.claim("a", MODELS, 10, lease_s=60)
    assert sorted(job.id for job in claimed) == sorted(ids)
    for job_id in ids:
        assert store.result_ready(job_id, "a", f"/r/{job_id}.dcm", f"9.{job_id}", "seg")
        assert store.delivered(job_id, "a", 1)
    spooled = store.finished_spool(time.time() + 1)
    assert sorted(path for _, path in spooled) == ["/s/6.0", "/s/6.1", "/s/6.2"]
    first, *others = spooled
    # one of them was spooled again meanwhile (another path): its record is kept
    assert store.forget_spools([(first[0], "/s/elsewhere"), *others]) == 2
    assert store.finished_spool(time.time() + 1) == [first]
    assert sorted(path for _, path in store.results_to_delete()) == [f"/r/{i}.dcm" for i in sorted(ids)]
    store.forget_results(ids[:2])
    assert store.results_to_delete() == [(ids[2], f"/r/{ids[2]}.dcm")]
    store.forget_results([])
    assert store.forget_spools([]) == 0


def test_settle_records_a_group_of_attempts_in_one_call_for_the_jobs_still_held(store: JobStore) -> None:
    ids = [store.record(record(f"7.{i}"), [NewJob("m", "v1", "segmentation")]).job_ids[0] for i in range(4)]
    claimed = store.claim("a", MODELS, 10, lease_s=60)
    assert sorted(job.id for job in claimed) == sorted(ids)
    assert [(store.get(job_id) or {}).get("state") for job_id in ids] == [RUNNING] * 4
    done, refused, retried, cancelled = ids
    assert store.cancel(cancelled, [RUNNING])
    assert store.held(ids, "a") == {done, refused, retried}
    assert store.held(ids, "b") == set()
    updated = store.settle(
        "a",
        [
            Settled(done, DONE_OUTCOME, 1, "9.1", "seg"),
            Settled(refused, FAILED_OUTCOME, 1, "9.2", "seg", "the archive refused the result: 409"),
            Settled(
                retried, RETRY_OUTCOME, 1, "9.3", "seg", "attempt 1 failed: 503", time.time() + 60, "/r/3.dcm"
            ),
            Settled(cancelled, DONE_OUTCOME, 1, "9.4", "seg"),
        ],
    )
    assert updated == {done, refused, retried}
    rows = {job_id: store.get(job_id) or {} for job_id in ids}
    assert rows[done]["state"] == DONE and rows[done]["reason"] is None
    assert rows[done]["result_sop_instance_uid"] == "9.1" and rows[done]["result_kind"] == "seg"
    assert rows[refused]["state"] == FAILED
    assert rows[refused]["reason"] == "the archive refused the result: 409" and rows[refused]["attempts"] == 1
    assert rows[retried]["state"] == DELIVERING
    assert rows[retried]["result_path"] == "/r/3.dcm" and rows[retried]["lease_owner"] is None
    assert rows[cancelled]["state"] == CANCELLED
    assert store.claim("b", MODELS, 10, lease_s=60) == []  # the retry is not due yet
    assert store.settle("a", [Settled(retried, DONE_OUTCOME, 2)]) == set()  # no longer a's lease
    with pytest.raises(ValueError, match="unknown outcome"):
        store.settle("a", [Settled(done, "lost", 1)])


def test_on_sqlite_only_acceptance_and_api_actions_are_flushed_by_their_commit(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")

    def synchronous() -> int:  # the mode the last transaction left on the (one, reused) connection
        with store.engine.connect() as db:
            return int(db.exec_driver_sql("PRAGMA synchronous").scalar_one())

    full, normal = 2, 1
    (job_id,) = store.record(record("8.1"), [NewJob("m", "v1", "segmentation")]).job_ids
    assert synchronous() == full
    assert [job.id for job in store.claim("a", MODELS, 10, lease_s=60)] == [job_id]
    assert synchronous() == normal
    store.settle("a", [Settled(job_id, DONE_OUTCOME, 1, "9.1", "seg")])
    assert synchronous() == normal
    store.sync()  # flushes them: the write-ahead log is fsync'ed
    # committed all the same: another store on the file sees them
    other = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    assert (other.get(job_id) or {}).get("state") == DONE
    assert store.requeue(job_id, [DONE])
    assert synchronous() == full
    other.close()
    store.close()
