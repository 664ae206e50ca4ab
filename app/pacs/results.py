"""Result objects of jobs and the interface that delivers them (``ResultSink``).

The worker (``app.pacs.worker``) turns a finished prediction into a ``ResultObject`` (DICOM Part 10 bytes of a
SEG or SR plus its UIDs) and calls ``ResultSink.deliver`` with it, in a worker thread (blocking I/O is fine).

A sink makes ONE attempt per call and says how it failed:

* ``PermanentDeliveryError``: the archive refused the object for good (an HTTP 4xx, a C-STORE failure status
  such as 0xA900); the job becomes ``failed`` with ``reason`` (the archive's words, no patient data), never
  retried by itself.
* ``TransientDeliveryError``: the archive is down, unreachable or overloaded (5xx, connection refused, timeout,
  C-STORE 0xA700 out of resources); the worker retries later with capped exponential backoff and jitter
  (``backoff_delay``), at most ``MEDSERVE_DELIVERY_MAX_ATTEMPTS`` attempts in all, counted in the job store so
  that a restart does not reset them.
* Any other exception counts as transient (and is logged with its traceback).

Retries are the worker's business, not the sink's: the job store records attempts and the next attempt time,
so a result waiting for a retry survives a restart of the service.

A sink may also have ``deliver_many(results) -> list[DeliveryError | None]``: one attempt for several results
at once (one outcome each); ``deliver_all`` uses it when it is there.

Sinks: ``FolderSink`` here (writes each object as a file and appends one line per delivery to a log: the demo
and the tests use it); ``app.pacs.delivery`` (STOW-RS to ``MEDSERVE_PACS_URL``, C-STORE to
``MEDSERVE_DIMSE_DESTINATION``) implements the same protocol. ``select_sink`` picks the sink of the settings.
"""

from __future__ import annotations

import os
import random
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

SEG = "seg"
SR = "sr"
DELIVERY_LOG = "deliveries.log"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class DeliveryError(Exception):
    """A delivery attempt failed; ``reason`` is shown in the job record (it must hold no patient data)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PermanentDeliveryError(DeliveryError):
    """The archive refused the object (4xx, a C-STORE failure status): the job fails, no retries."""


class TransientDeliveryError(DeliveryError):
    """The archive could not take the object now (5xx, unreachable, timeout): retried with backoff."""


@dataclass(frozen=True)
class ResultObject:
    """One result to deliver: a DICOM Part 10 object and what identifies it.

    Attributes:
        part10: the object as DICOM Part 10 bytes (media type ``application/dicom``).
        kind: ``seg`` (DICOM Segmentation) or ``sr`` (Structured Report).
        study_instance_uid: the source study's UID (the result joins that study).
        series_instance_uid: the result series (``models.dicom_uids.result_series_uid``).
        sop_instance_uid: the result instance (``models.dicom_uids.result_instance_uid``): the same for a repeat
            delivery, so an archive replaces instead of duplicating.
        sop_class_uid: the result's SOP class.
        job_id: the job it comes from (for logs and the folder sink's delivery log).
        model: the model name that produced it.
    """

    part10: bytes
    kind: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    job_id: int
    model: str


@runtime_checkable
class ResultSink(Protocol):
    """Delivers result objects; ``deliver`` is called from a worker thread, possibly several at once."""

    def deliver(self, result: ResultObject) -> None:
        """Makes one delivery attempt.

        Raises:
            PermanentDeliveryError: refused for good (the job fails with ``reason``).
            TransientDeliveryError: try again later.
        """
        ...


def deliver_all(sink: ResultSink, results: Sequence[ResultObject]) -> list[Exception | None]:
    """One delivery attempt for each of ``results``: None for a result delivered, else the exception of that
    result alone. A sink with ``deliver_many(results)`` (``app.pacs.delivery.StowDelivery``: one STOW-RS request
    for several results) gets them all at once; any other gets one ``deliver`` call per result."""
    many = getattr(sink, "deliver_many", None)
    if many is not None and len(results) > 1:
        try:
            return list(many(results))
        except Exception as exc:  # counts for every result of the group
            return [exc] * len(results)
    outcomes: list[Exception | None] = []
    for result in results:
        try:
            sink.deliver(result)
        except Exception as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)
    return outcomes


class FolderSink:
    """Writes each result as ``<folder>/<SOP Instance UID>.dcm`` (temp file, fsync, rename: a repeat delivery
    replaces the file) and appends one line ``<job id> <SOP Instance UID> <kind> <model> <pid>`` per delivery to
    ``<folder>/deliveries.log`` (one ``O_APPEND`` write per line, so several processes may share the folder).

    A folder that cannot be written (disk full, permissions) is a transient failure: it may be fixed.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def deliver(self, result: ResultObject) -> None:
        if not _UID.match(result.sop_instance_uid):
            raise PermanentDeliveryError("the result has no valid SOP Instance UID")
        target = self.folder / f"{result.sop_instance_uid}.dcm"
        temporary = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        line = (
            f"{result.job_id} {result.sop_instance_uid} {result.kind} {result.model} {os.getpid()}\n".encode()
        )
        try:
            with open(temporary, "wb") as handle:
                handle.write(result.part10)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
            with self._lock:
                descriptor = os.open(
                    self.folder / DELIVERY_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
                )
                try:
                    os.write(descriptor, line)
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise TransientDeliveryError(
                f"cannot write the result into the results folder ({exc.strerror})"
            ) from exc


class Delivery(NamedTuple):
    """One line of a ``FolderSink``'s delivery log."""

    job_id: int
    sop_instance_uid: str
    kind: str
    model: str
    pid: int


def read_delivery_log(folder: Path) -> list[Delivery]:
    """The deliveries a ``FolderSink`` logged in ``folder``, in order."""
    path = folder / DELIVERY_LOG
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        job, uid, kind, rest = line.split(" ", 3)
        model, pid = rest.rsplit(" ", 1)
        entries.append(Delivery(int(job), uid, kind, model, int(pid)))
    return entries


def backoff_delay(attempt: int, *, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before delivery attempt ``attempt + 1`` after ``attempt`` failed attempts (>= 1).

    Capped exponential backoff with "full jitter": uniform in [d/2, d] where d = min(cap, base * 2**(attempt-1)),
    so that replicas retrying after the same outage spread out, and no wait exceeds ``cap_s``.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    ceiling = min(cap_s, base_s * 2.0 ** min(attempt - 1, 62))
    return (rng or random).uniform(ceiling / 2, ceiling)
