"""The job store: received instances and their jobs, in any database SQLAlchemy 2 speaks (SQLite, PostgreSQL).

Two tables (created at start when missing):

* ``medserve_instances``: one row per received SOP instance: its Study/Series/SOP Instance UIDs, SOP class,
  transfer syntax, the spooled file (NULL once deleted), its size, when and how (``stow``, ``dimse``,
  ``pull``) it arrived.
* ``medserve_jobs``: one row per (instance, model): model name and version, task, state, times, delivery
  attempts, the next attempt's time, the lease of the process running it, a reason, the result's SOP Instance
  UID. Unique on (SOP Instance UID, model, model version): an instance sent twice makes one job.

Nothing identifying is stored: UIDs, model names, times, counts and reasons written by MedServe only (never
patient names, IDs, dates, accession numbers or any other tag value).

States: ``queued`` -> ``running`` (a process holds its lease; it runs the model and makes the first delivery
attempt) -> ``done``; through ``delivering`` when that attempt failed (the result is spooled; it waits for
``next_attempt_at``, then a process holds the lease while it sends it again); or ``failed`` (with a reason),
``skipped`` (no routing rule matched), ``cancelled`` (``DELETE /jobs/{id}``). ``settle`` records the outcomes
of several attempts in one transaction.

Durability on SQLite (WAL mode): the commits that accept instances and those of the API's cancel and retry are
``fsync``ed (``synchronous=FULL``); the job path's transitions (``durable=False``: claims, leases, outcomes)
are not flushed one by one (``synchronous=NORMAL``): they survive the process being killed, and a power cut
may only send a job back a step. ``sync()`` flushes them before files are deleted on their strength.

Claiming: ``claim`` takes jobs in one transaction: on PostgreSQL with ``SELECT ... FOR UPDATE SKIP LOCKED``,
so several replicas share one queue and never take the same job; on SQLite every transaction is a single
writer (``BEGIN IMMEDIATE``). A claimed job carries a lease (``lease_owner``, ``lease_expires_at``) that its
process renews (``heartbeat``); a job whose lease expired (its process died) is claimed again by anyone.
Every later state change is conditional on still holding the lease, so a job reclaimed by another process is
finished by that one only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    create_engine,
    event,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

logger = logging.getLogger("medserve.pacs.store")

QUEUED, RUNNING, DELIVERING, DONE, FAILED, SKIPPED, CANCELLED = (
    "queued",
    "running",
    "delivering",
    "done",
    "failed",
    "skipped",
    "cancelled",
)
STATES = (QUEUED, RUNNING, DELIVERING, DONE, FAILED, SKIPPED, CANCELLED)
TERMINAL = frozenset({DONE, FAILED, SKIPPED, CANCELLED})
# A job whose process died this many times while running it fails instead of taking the next one down too.
MAX_RUNS = 3
UID_LENGTH = 64  # PS3.5: a UID has at most 64 characters

metadata = MetaData()
# 64-bit ids on PostgreSQL; on SQLite an INTEGER PRIMARY KEY (the 64-bit rowid, auto-incremented).
Id = BigInteger().with_variant(Integer, "sqlite")
MAX_ID = 2**63 - 1

instances = Table(
    "medserve_instances",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("sop_instance_uid", String(UID_LENGTH), nullable=False, unique=True),
    Column("study_instance_uid", String(UID_LENGTH), nullable=False, index=True),
    Column("series_instance_uid", String(UID_LENGTH), nullable=False),
    Column("sop_class_uid", String(UID_LENGTH), nullable=False),
    Column("transfer_syntax_uid", String(UID_LENGTH), nullable=False),
    Column("spool_path", String(1024), nullable=True),
    Column("size_bytes", BigInteger, nullable=False),
    Column("source", String(8), nullable=False),
    Column("received_at", Double, nullable=False),
)

jobs = Table(
    "medserve_jobs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("instance_id", Id, ForeignKey("medserve_instances.id"), nullable=False, index=True),
    Column("sop_instance_uid", String(UID_LENGTH), nullable=False),
    Column("study_instance_uid", String(UID_LENGTH), nullable=False, index=True),
    Column("series_instance_uid", String(UID_LENGTH), nullable=False),
    Column("model", String(255), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("task", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", Text, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("runs", Integer, nullable=False, default=0),
    Column("created_at", Double, nullable=False),
    Column("started_at", Double, nullable=True),
    Column("finished_at", Double, nullable=True),
    Column("next_attempt_at", Double, nullable=True),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_expires_at", Double, nullable=True),
    Column("result_sop_instance_uid", String(UID_LENGTH), nullable=True),
    Column("result_kind", String(8), nullable=True),
    Column("result_path", String(1024), nullable=True),
    UniqueConstraint("sop_instance_uid", "model", "model_version", name="uq_medserve_jobs_instance_model"),
    Index("ix_medserve_jobs_state_next", "state", "next_attempt_at"),
)


class StoreError(Exception):
    """The job store cannot be opened or used; the message names the database (never its password)."""


# Built once (see JobStore.__init__): the delivery path asks it before every attempt.
_HELD = select(jobs.c.id).where(
    jobs.c.id.in_(bindparam("ids", expanding=True)),
    jobs.c.lease_owner == bindparam("owner"),
    jobs.c.state.in_((RUNNING, DELIVERING)),
)
# claim's update of the jobs it takes to run
_MARK_RUNNING = (
    update(jobs)
    .where(jobs.c.id.in_(bindparam("b_ids", expanding=True)))
    .values(
        state=RUNNING,
        started_at=bindparam("b_now"),
        runs=jobs.c.runs + 1,
        lease_owner=bindparam("b_owner"),
        lease_expires_at=bindparam("b_until"),
    )
)
# settle's usual case, a result delivered (as the general case below; the parameters are not column names)
_SETTLE_DONE = (
    update(jobs)
    .where(
        jobs.c.id == bindparam("b_id"),
        jobs.c.lease_owner == bindparam("b_owner"),
        jobs.c.state.in_((RUNNING, DELIVERING)),
    )
    .values(
        state=DONE,
        attempts=bindparam("b_attempts"),
        lease_owner=None,
        lease_expires_at=None,
        reason=None,
        finished_at=bindparam("b_now"),
        next_attempt_at=None,
        result_sop_instance_uid=bindparam("b_uid"),
        result_kind=bindparam("b_kind"),
    )
)


def engine_url(url: str) -> str:
    """``postgresql://`` (and ``postgres://``) mapped to the psycopg 3 driver; other URLs unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def safe_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable URL>"


@dataclass(frozen=True)
class NewJob:
    """A job to make for an instance: model name, version and task, and its first state (``queued``, or
    ``skipped``/``failed`` with a reason)."""

    model: str
    model_version: str
    task: str
    state: str = QUEUED
    reason: str | None = None


@dataclass(frozen=True)
class InstanceRecord:
    """What the store keeps of a received instance (UIDs only)."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    spool_path: str
    size_bytes: int
    source: str


@dataclass(frozen=True)
class Recorded:
    """The outcome of ``JobStore.record``: the instance's row, its jobs, whether it was known already and
    whether any job was new."""

    instance_id: int
    job_ids: list[int]
    known: bool
    new_jobs: int


@dataclass(frozen=True)
class Claimed:
    """A job a process took: run it (``phase="run"``) or deliver its spooled result (``phase="deliver"``)."""

    id: int
    phase: str
    model: str
    model_version: str
    task: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    spool_path: str | None
    result_path: str | None
    result_sop_instance_uid: str | None
    result_kind: str | None
    attempts: int
    created_at: float


@dataclass(frozen=True)
class Settled:
    """The outcome of one delivery attempt of a job, for ``JobStore.settle``.

    ``outcome``: ``done`` (delivered), ``failed`` (with ``reason``) or ``retry`` (attempt again at
    ``next_attempt_at``, with ``reason``; ``result_path`` names the spooled result when the job comes from
    ``running``). ``result_sop_instance_uid`` / ``result_kind``: the result's UID and kind.
    """

    job_id: int
    outcome: str
    attempts: int
    result_sop_instance_uid: str | None = None
    result_kind: str | None = None
    reason: str | None = None
    next_attempt_at: float | None = None
    result_path: str | None = None


DONE_OUTCOME, FAILED_OUTCOME, RETRY_OUTCOME = "done", "failed", "retry"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own transaction handling off: SQLAlchemy's "begin" event issues BEGIN IMMEDIATE instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a committed record survives a power cut
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


READ_ONLY = "medserve_read_only"  # execution option: a read transaction (SQLite: a deferred BEGIN, no lock)


def _sqlite_begin(connection: Connection) -> None:
    if connection.get_execution_options().get(READ_ONLY):
        connection.exec_driver_sql("BEGIN")  # a reader: sees the last commit, never waits for a writer (WAL)
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")  # one writer at a time, taken at the start


class JobStore:
    """The job store at ``url`` (an SQLAlchemy URL); creates its tables when missing.

    Every method runs its own transaction and is thread-safe (one engine, a connection pool).

    Raises:
        StoreError: the database cannot be reached or its tables cannot be created.
    """

    def __init__(self, url: str, *, clock: Any = time.time) -> None:
        self.url = engine_url(url)
        self.clock = clock
        try:
            parsed = make_url(self.url)
        except Exception as exc:
            raise StoreError(f"not an SQLAlchemy database URL: {safe_url(url)}") from exc
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {}
        if self.dialect == "sqlite":
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30.0}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine: Engine = create_engine(self.url, **kwargs)
        except Exception as exc:  # an unknown driver, a bad option
            raise StoreError(f"cannot open the job store {safe_url(url)}: {type(exc).__name__}") from exc
        self._writer: threading.Lock | None = None
        self._wal_path: str | None = None
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                self._wal_path = os.path.abspath(parsed.database) + "-wal"
            self._writer = threading.Lock()
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._create_tables(url)
        # The intake's statements, built once and executed with parameters: building one per call (and its
        # cache key) cost more of the interpreter lock than the database's own work.
        self._insert_instance = self._insert(instances).returning(instances.c.id)
        self._insert_job = self._insert(jobs)
        self._insert_job_returning = self._insert(jobs).returning(jobs.c.id)
        self._claim_queries: dict[tuple[tuple[str, str], ...], Any] = {}

    def _create_tables(self, url: str) -> None:
        for attempt in range(3):
            try:
                metadata.create_all(self.engine, checkfirst=True)
                return
            except (IntegrityError, ProgrammingError) as exc:
                # Two replicas creating the tables at the same moment: the loser finds them on a second look.
                if attempt == 2:
                    raise StoreError(f"cannot create the job tables in {safe_url(url)}") from exc
            except OperationalError as exc:
                raise StoreError(
                    f"cannot open the job store {safe_url(url)}: {str(exc.orig).splitlines()[0]}"
                ) from exc

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _begin(self, *, durable: bool = True) -> Iterator[Connection]:
        """A write transaction. ``durable=False`` (SQLite): its commit is not flushed to disk by itself
        (``synchronous=NORMAL`` in WAL mode): it survives the process being killed, not a power cut, until
        the next durable commit or ``sync()``. The job path's own transitions use it: losing one sends a job
        a step back, to run or be delivered again (the result replaces itself: its UIDs are the same)."""
        if self._writer is None:
            with self.engine.begin() as connection:
                yield connection
            return
        # SQLite: one transaction of this process at a time, queued on a lock. Left to SQLite, a BEGIN IMMEDIATE
        # that finds another thread's transaction open sleeps in its busy handler (1, 2, 5, 10, ... ms), long
        # after the other one committed: under load the job path spent most of its store time there.
        with self._writer, self.engine.connect() as connection:
            mode = "FULL" if durable else "NORMAL"
            if connection.info.get("synchronous") != mode:
                # set on the driver's connection outside any transaction; kept until changed
                raw = connection.connection.dbapi_connection
                assert raw is not None
                raw.execute(f"PRAGMA synchronous={mode}")
                connection.info["synchronous"] = mode
            with connection.begin():
                yield connection

    def sync(self) -> None:
        """Makes every commit so far durable, those of ``durable=False`` transactions included (SQLite: an fsync
        of the write-ahead log, which holds them in order; other databases: nothing to do, every commit is
        durable). Called before files are deleted on the strength of such commits."""
        if self._wal_path is None or not os.path.exists(self._wal_path):
            return
        descriptor = os.open(self._wal_path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only transaction: on SQLite neither the process's writer lock nor SQLite's (WAL readers run
        beside the writer), so the API and the metrics never queue behind the job path's commits."""
        if self._writer is None:
            with self.engine.begin() as connection:
                yield connection
            return
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as connection, connection.begin():
            yield connection

    def _insert(self, table: Table) -> Any:
        """An INSERT that skips rows violating a unique constraint (both dialects have ON CONFLICT)."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table).on_conflict_do_nothing()
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()

    # -- intake ---------------------------------------------------------------------------------------------

    def record(self, instance: InstanceRecord, new_jobs: Sequence[NewJob]) -> Recorded:
        """Records an instance (or finds it: same SOP Instance UID) and makes the jobs it lacks, atomically."""
        return self.record_many([(instance, new_jobs)])[0]

    def record_many(self, entries: Sequence[tuple[InstanceRecord, Sequence[NewJob]]]) -> list[Recorded]:
        """``record`` for several instances in one transaction (one commit: one flush to disk for a request)."""
        now = self.clock()
        with self._begin() as db:
            return [self._record(db, instance, new_jobs, now) for instance, new_jobs in entries]

    def _record(
        self, db: Connection, instance: InstanceRecord, new_jobs: Sequence[NewJob], now: float
    ) -> Recorded:
        inserted = db.execute(
            self._insert_instance,
            {
                "sop_instance_uid": instance.sop_instance_uid,
                "study_instance_uid": instance.study_instance_uid,
                "series_instance_uid": instance.series_instance_uid,
                "sop_class_uid": instance.sop_class_uid,
                "transfer_syntax_uid": instance.transfer_syntax_uid,
                "spool_path": instance.spool_path,
                "size_bytes": instance.size_bytes,
                "source": instance.source,
                "received_at": now,
            },
        ).first()
        if inserted is not None:
            # A new instance has no jobs yet: its jobs' ids come back from their inserts (fewer statements,
            # each a round trip into the database).
            ids = []
            for job in new_jobs:
                made = db.execute(
                    self._insert_job_returning, self._job_values(inserted.id, instance, job, now)
                ).first()
                if made is not None:
                    ids.append(int(made.id))
            return Recorded(int(inserted.id), sorted(ids), False, len(ids))
        row = db.execute(
            select(instances.c.id, instances.c.spool_path).where(
                instances.c.sop_instance_uid == instance.sop_instance_uid
            )
        ).one()
        known = True  # RETURNING gave no row: the instance was there
        if row.spool_path is None:
            # Sent again after its file was deleted: the new copy serves retries.
            db.execute(
                update(instances).where(instances.c.id == row.id).values(spool_path=instance.spool_path)
            )
        before = db.execute(select(func.count()).where(jobs.c.instance_id == row.id)).scalar_one()
        for job in new_jobs:
            db.execute(self._insert_job, self._job_values(row.id, instance, job, now))
        ids = list(
            db.execute(select(jobs.c.id).where(jobs.c.instance_id == row.id).order_by(jobs.c.id)).scalars()
        )
        return Recorded(row.id, ids, known, len(ids) - before)

    @staticmethod
    def _job_values(instance_id: int, instance: InstanceRecord, job: NewJob, now: float) -> dict[str, Any]:
        return {
            "instance_id": instance_id,
            "sop_instance_uid": instance.sop_instance_uid,
            "study_instance_uid": instance.study_instance_uid,
            "series_instance_uid": instance.series_instance_uid,
            "model": job.model,
            "model_version": job.model_version,
            "task": job.task,
            "state": job.state,
            "reason": job.reason,
            "attempts": 0,
            "runs": 0,
            "created_at": now,
            "finished_at": now if job.state in TERMINAL else None,
        }

    # -- workers --------------------------------------------------------------------------------------------

    def claim(self, owner: str, models: Mapping[str, str], limit: int, lease_s: float) -> list[Claimed]:
        """Takes up to ``limit`` jobs of ``models`` (name -> version) for ``owner``: queued jobs due now and
        running jobs whose lease expired (to run), and delivering jobs due now and not leased (to deliver);
        oldest first."""
        if limit <= 0 or not models:
            return []
        query = self._claim_query(tuple(sorted(models.items())))
        now = self.clock()
        claimed: list[Claimed] = []
        lease = {"lease_owner": owner, "lease_expires_at": now + lease_s}
        with self._begin(durable=False) as db:
            rows = db.execute(query, {"b_now": now, "b_limit": limit}).all()
            to_run, to_deliver = [], []
            for row in rows:
                if row.state == DELIVERING:
                    to_deliver.append(row.id)
                elif row.runs >= MAX_RUNS:  # its process died that many times while running it
                    db.execute(
                        update(jobs)
                        .where(jobs.c.id == row.id)
                        .values(
                            state=FAILED,
                            reason=f"the service stopped {row.runs} times while running this job; "
                            "see the service log",
                            finished_at=now,
                            lease_owner=None,
                            lease_expires_at=None,
                        )
                    )
                    continue
                else:
                    to_run.append(row.id)
                claimed.append(
                    Claimed(
                        id=row.id,
                        phase="deliver" if row.state == DELIVERING else "run",
                        model=row.model,
                        model_version=row.model_version,
                        task=row.task,
                        sop_instance_uid=row.sop_instance_uid,
                        study_instance_uid=row.study_instance_uid,
                        series_instance_uid=row.series_instance_uid,
                        spool_path=row.spool_path,
                        result_path=row.result_path,
                        result_sop_instance_uid=row.result_sop_instance_uid,
                        result_kind=row.result_kind,
                        attempts=row.attempts,
                        created_at=row.created_at,
                    )
                )
            # One statement per kind for all the jobs taken (marked running in the claim itself).
            if to_run:
                db.execute(
                    _MARK_RUNNING, {"b_ids": to_run, "b_now": now, "b_owner": owner, "b_until": now + lease_s}
                )
            if to_deliver:
                db.execute(update(jobs).where(jobs.c.id.in_(to_deliver)).values(**lease))
        return claimed

    def _claim_query(self, models: tuple[tuple[str, str], ...]) -> Any:
        """The claim's query for these (model, version) pairs, built once per set (parameters ``b_now``,
        ``b_limit``)."""
        query = self._claim_queries.get(models)
        if query is None:
            now: Any = bindparam("b_now")
            served = or_(*(and_(jobs.c.model == name, jobs.c.model_version == v) for name, v in models))
            due = or_(jobs.c.next_attempt_at.is_(None), jobs.c.next_attempt_at <= now)
            free = or_(jobs.c.lease_owner.is_(None), jobs.c.lease_expires_at < now)
            wanted = and_(
                served,
                or_(
                    and_(jobs.c.state == QUEUED, due),
                    and_(jobs.c.state == RUNNING, jobs.c.lease_expires_at < now),
                    and_(jobs.c.state == DELIVERING, due, free),
                ),
            )
            query = (
                select(jobs, instances.c.spool_path)
                .join(instances, instances.c.id == jobs.c.instance_id)
                .where(wanted)
                .order_by(jobs.c.id)
                .limit(bindparam("b_limit"))
                .with_for_update(skip_locked=True, of=jobs)
            )
            if len(self._claim_queries) > 64:  # model sets change only with the model directory
                self._claim_queries.clear()
            self._claim_queries[models] = query
        return query

    def heartbeat(self, owner: str, lease_s: float) -> int:
        """Renews the leases of ``owner``'s jobs; returns how many it holds."""
        with self._begin(durable=False) as db:
            result = db.execute(
                update(jobs)
                .where(jobs.c.lease_owner == owner, jobs.c.state.in_((RUNNING, DELIVERING)))
                .values(lease_expires_at=self.clock() + lease_s)
            )
        return int(result.rowcount)

    def release(self, owner: str) -> int:
        """Gives back ``owner``'s jobs (a clean shutdown): running ones are queued again, delivering ones wait
        for the next process. Returns how many."""
        with self._begin(durable=False) as db:
            requeued = db.execute(
                update(jobs)
                .where(jobs.c.lease_owner == owner, jobs.c.state == RUNNING)
                .values(
                    state=QUEUED,
                    lease_owner=None,
                    lease_expires_at=None,
                    started_at=None,
                    runs=jobs.c.runs - 1,  # stopped cleanly: not a crash
                )
            ).rowcount
            freed = db.execute(
                update(jobs)
                .where(jobs.c.lease_owner == owner, jobs.c.state == DELIVERING)
                .values(lease_owner=None, lease_expires_at=None)
            ).rowcount
        return int(requeued) + int(freed)

    def _leased_update(self, job_id: int, owner: str, states: Sequence[str], **values: Any) -> bool:
        with self._begin(durable=False) as db:
            result = db.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.state.in_(list(states)))
                .values(**values)
            )
        return int(result.rowcount) == 1

    def result_ready(self, job_id: int, owner: str, result_path: str, result_uid: str, kind: str) -> bool:
        """running -> delivering, the result spooled at ``result_path``. False: the job is no longer this
        owner's (cancelled, or reclaimed after a lost lease)."""
        return self._leased_update(
            job_id,
            owner,
            [RUNNING],
            state=DELIVERING,
            result_path=result_path,
            result_sop_instance_uid=result_uid,
            result_kind=kind,
            next_attempt_at=None,
        )

    def delivered(self, job_id: int, owner: str, attempts: int) -> bool:
        """delivering -> done."""
        return self._leased_update(
            job_id,
            owner,
            [DELIVERING],
            state=DONE,
            attempts=attempts,
            finished_at=self.clock(),
            reason=None,
            lease_owner=None,
            lease_expires_at=None,
            next_attempt_at=None,
        )

    def retry_later(self, job_id: int, owner: str, attempts: int, delay_s: float, reason: str) -> bool:
        """A transient delivery failure: attempt again after ``delay_s`` (the lease is given up)."""
        return self._leased_update(
            job_id,
            owner,
            [DELIVERING],
            attempts=attempts,
            next_attempt_at=self.clock() + delay_s,
            reason=reason,
            lease_owner=None,
            lease_expires_at=None,
        )

    def fail(self, job_id: int, owner: str, reason: str, *, attempts: int | None = None) -> bool:
        """running or delivering -> failed with ``reason``."""
        values: dict[str, Any] = {
            "state": FAILED,
            "reason": reason,
            "finished_at": self.clock(),
            "lease_owner": None,
            "lease_expires_at": None,
            "next_attempt_at": None,
        }
        if attempts is not None:
            values["attempts"] = attempts
        return self._leased_update(job_id, owner, [RUNNING, DELIVERING], **values)

    def held(self, job_ids: Sequence[int], owner: str) -> set[int]:
        """Which of ``job_ids`` are still ``owner``'s (running or delivering under its lease): the others were
        cancelled or taken over meanwhile. A read: no commit."""
        if not job_ids:
            return set()
        with self._read() as db:
            return set(db.execute(_HELD, {"ids": list(job_ids), "owner": owner}).scalars())

    def settle(self, owner: str, outcomes: Sequence[Settled]) -> set[int]:
        """Records the delivery attempts of several jobs in one transaction (one commit for a group of results
        sent together); each update holds only while ``owner`` still holds the job's lease. A job goes from
        ``running`` (its first attempt, straight after the model) or ``delivering`` (a retry) to ``done``,
        ``failed``, or ``delivering`` with the next attempt's time. Returns the ids updated."""
        if not outcomes:
            return set()
        now = self.clock()
        updated: set[int] = set()
        with self._begin(durable=False) as db:
            for entry in outcomes:
                if entry.outcome == DONE_OUTCOME and entry.result_sop_instance_uid is not None:
                    done = db.execute(
                        _SETTLE_DONE,
                        {
                            "b_id": entry.job_id,
                            "b_owner": owner,
                            "b_attempts": entry.attempts,
                            "b_now": now,
                            "b_uid": entry.result_sop_instance_uid,
                            "b_kind": entry.result_kind,
                        },
                    )
                    if int(done.rowcount) == 1:
                        updated.add(entry.job_id)
                    continue
                values: dict[str, Any] = {
                    "attempts": entry.attempts,
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "reason": entry.reason,
                }
                if entry.result_sop_instance_uid is not None:
                    values["result_sop_instance_uid"] = entry.result_sop_instance_uid
                    values["result_kind"] = entry.result_kind
                if entry.outcome == DONE_OUTCOME:
                    values.update(state=DONE, finished_at=now, next_attempt_at=None, reason=None)
                elif entry.outcome == FAILED_OUTCOME:
                    values.update(state=FAILED, finished_at=now, next_attempt_at=None)
                elif entry.outcome == RETRY_OUTCOME:
                    values.update(state=DELIVERING, next_attempt_at=entry.next_attempt_at)
                    if entry.result_path is not None:
                        values["result_path"] = entry.result_path
                else:
                    raise ValueError(f"unknown outcome {entry.outcome!r}")
                result = db.execute(
                    update(jobs)
                    .where(
                        jobs.c.id == entry.job_id,
                        jobs.c.lease_owner == owner,
                        jobs.c.state.in_((RUNNING, DELIVERING)),
                    )
                    .values(**values)
                )
                if int(result.rowcount) == 1:
                    updated.add(entry.job_id)
        return updated

    # -- API ------------------------------------------------------------------------------------------------

    def get(self, job_id: int) -> dict[str, Any] | None:
        """One job with its instance's source, as a dict; None when unknown."""
        query = (
            select(jobs, instances.c.source, instances.c.sop_class_uid)
            .join(instances, instances.c.id == jobs.c.instance_id)
            .where(jobs.c.id == job_id)
        )
        with self._read() as db:
            row = db.execute(query).first()
        return None if row is None else dict(row._mapping)

    def find(
        self,
        *,
        state: str | None = None,
        study: str | None = None,
        model: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Jobs with an id above ``after`` matching the filters, by id, at most ``limit``."""
        query = (
            select(jobs, instances.c.source, instances.c.sop_class_uid)
            .join(instances, instances.c.id == jobs.c.instance_id)
            .where(jobs.c.id > after)
            .order_by(jobs.c.id)
            .limit(limit)
        )
        if state is not None:
            query = query.where(jobs.c.state == state)
        if study is not None:
            query = query.where(jobs.c.study_instance_uid == study)
        if model is not None:
            query = query.where(jobs.c.model == model)
        with self._read() as db:
            return [dict(row._mapping) for row in db.execute(query).all()]

    def requeue(self, job_id: int, from_states: Sequence[str]) -> bool:
        """``from_states`` -> queued, with attempts, runs and reason reset (``POST /jobs/{id}/retry``)."""
        with self._begin() as db:
            result = db.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state.in_(list(from_states)))
                .values(
                    state=QUEUED,
                    reason=None,
                    attempts=0,
                    runs=0,
                    started_at=None,
                    finished_at=None,
                    next_attempt_at=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    result_path=None,
                )
            )
        return int(result.rowcount) == 1

    def cancel(self, job_id: int, from_states: Sequence[str]) -> bool:
        """``from_states`` -> cancelled (a process running it finds out at its next step and drops it)."""
        with self._begin() as db:
            result = db.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state.in_(list(from_states)))
                .values(
                    state=CANCELLED,
                    reason="cancelled by DELETE /jobs/{id}",
                    finished_at=self.clock(),
                    lease_owner=None,
                    lease_expires_at=None,
                    next_attempt_at=None,
                )
            )
        return int(result.rowcount) == 1

    def instance_spooled(self, job_id: int) -> bool:
        """Whether the job's instance still has its spooled file (recorded, and on disk)."""
        query = (
            select(instances.c.spool_path)
            .join(jobs, jobs.c.instance_id == instances.c.id)
            .where(jobs.c.id == job_id)
        )
        with self._read() as db:
            path = db.execute(query).scalar()
        return path is not None and os.path.exists(path)

    # -- spool clean-up, metrics ----------------------------------------------------------------------------

    def finished_spool(self, finished_before: float, limit: int = 500) -> list[tuple[int, str]]:
        """Spooled instances whose jobs are all finished, the last before ``finished_before``: (id, path)."""
        unfinished = exists().where(jobs.c.instance_id == instances.c.id, jobs.c.state.not_in(list(TERMINAL)))
        late = exists().where(jobs.c.instance_id == instances.c.id, jobs.c.finished_at > finished_before)
        query = (
            select(instances.c.id, instances.c.spool_path)
            .where(instances.c.spool_path.is_not(None), ~unfinished, ~late)
            .order_by(instances.c.id)
            .limit(limit)
        )
        with self._read() as db:
            return [(row.id, row.spool_path) for row in db.execute(query).all()]

    def forget_spool(self, instance_id: int, path: str) -> bool:
        """Marks an instance's file deleted, unless it was spooled again meanwhile (another path)."""
        with self._begin(durable=False) as db:
            result = db.execute(
                update(instances)
                .where(instances.c.id == instance_id, instances.c.spool_path == path)
                .values(spool_path=None)
            )
        return int(result.rowcount) == 1

    def forget_spools(self, entries: Sequence[tuple[int, str]]) -> int:
        """``forget_spool`` for several (instance id, path) in one transaction; returns how many it marked."""
        if not entries:
            return 0
        marked = 0
        with self._begin(durable=False) as db:
            for instance_id, path in entries:
                result = db.execute(
                    update(instances)
                    .where(instances.c.id == instance_id, instances.c.spool_path == path)
                    .values(spool_path=None)
                )
                marked += int(result.rowcount)
        return marked

    def results_to_delete(self, limit: int = 500) -> list[tuple[int, str]]:
        """Finished jobs that still name a spooled result file: (job id, path)."""
        query = (
            select(jobs.c.id, jobs.c.result_path)
            .where(jobs.c.result_path.is_not(None), jobs.c.state.in_(list(TERMINAL)))
            .limit(limit)
        )
        with self._read() as db:
            return [(row.id, row.result_path) for row in db.execute(query).all()]

    def forget_result(self, job_id: int) -> None:
        with self._begin(durable=False) as db:
            db.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state.in_(list(TERMINAL)))
                .values(result_path=None)
            )

    def forget_results(self, job_ids: Sequence[int]) -> None:
        """``forget_result`` for several jobs in one transaction."""
        if not job_ids:
            return
        with self._begin(durable=False) as db:
            db.execute(
                update(jobs)
                .where(jobs.c.id.in_(list(job_ids)), jobs.c.state.in_(list(TERMINAL)))
                .values(result_path=None)
            )

    def counts(self) -> dict[str, int]:
        """Jobs by state (every state, zeros included)."""
        with self._read() as db:
            rows = db.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
        found = {state: int(count) for state, count in rows}
        return {state: found.get(state, 0) for state in STATES}

    def oldest_queued_at(self) -> float | None:
        """Creation time of the oldest queued job (None when none is queued)."""
        with self._read() as db:
            return db.execute(select(func.min(jobs.c.created_at)).where(jobs.c.state == QUEUED)).scalar()
