"""The one way an instance enters MedServe's job system: STOW-RS, the DIMSE C-STORE SCP and pull all call it.

``Intake.accept_bytes(data, source)`` (or ``accept_dataset`` for a pydicom ``Dataset``) checks one DICOM
instance, writes it durably into the spool (temp file, fsync, rename), records it in the job store and makes
its jobs (one per model the routing rules name, or one ``skipped`` job when no rule matches), all before it
returns: once it has answered ``accepted``, the instance survives a crash and leads to exactly one result per
job. The same SOP Instance UID sent again is accepted again (``duplicate=True``) and makes no new job.

Signatures (every method is thread-safe; the synchronous ones block on disk and database I/O, so call them
from a worker thread, e.g. pynetdicom's handler thread, never from the event loop):

    Intake.accept_bytes(data: bytes, source: str, *, study_instance_uid: str | None = None) -> AcceptResult
    Intake.accept_dataset(dataset: pydicom.Dataset, source: str) -> AcceptResult
    await Intake.accept_bytes_async(data, source, *, study_instance_uid=None) -> AcceptResult   (routes)

``source`` is ``stow``, ``dimse`` or ``pull``. ``study_instance_uid``: the instance must belong to this study
(STOW-RS to ``/dicomweb/studies/{StudyInstanceUID}``), else it fails with ``STUDY_MISMATCH``.

A refused instance is not an exception: ``AcceptResult.accepted`` is False and ``failure_reason`` holds the
DICOM status that says why (PS3.18 FailureReason for STOW-RS, PS3.4 C-STORE status for DIMSE), ``detail``
the reason in words (never a tag value). ``IntakeUnavailable`` is raised when nothing can be accepted at all
(models still loading, jobs disabled); a C-STORE SCP answers it with ``OUT_OF_RESOURCES`` (0xA700).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# DICOM status codes (PS3.4 Annex B C-STORE statuses, used as PS3.18 STOW-RS FailureReason values).
OUT_OF_RESOURCES = 0xA700  # the spool is full (MEDSERVE_SPOOL_MAX_BYTES or the disk)
STUDY_MISMATCH = 0xA900  # "data set does not match": another study than the STOW-RS URL names
CANNOT_UNDERSTAND = 0xC000  # not DICOM, truncated, or missing the UIDs every instance has
PROCESSING_FAILURE = 0x0110  # the store or the spool failed unexpectedly

SOURCES = ("stow", "dimse", "pull")


class IntakeUnavailable(Exception):
    """Nothing can be accepted now (models still loading, jobs disabled); the message says why."""


@dataclass(frozen=True)
class AcceptResult:
    """What became of one instance.

    Attributes:
        accepted: spooled and recorded (or already known): it leads to its jobs' results.
        sop_instance_uid / sop_class_uid / study_instance_uid / series_instance_uid: read from the instance
            ("" when it could not be read).
        duplicate: the instance was known already; no new job was made.
        failure_reason: the DICOM status of a refusal (``OUT_OF_RESOURCES``, ``STUDY_MISMATCH``,
            ``CANNOT_UNDERSTAND``, ``PROCESSING_FAILURE``); None when accepted.
        detail: a refusal in words (no tag values).
        job_ids: the instance's jobs (new or, for a duplicate, the existing ones).
    """

    accepted: bool
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    duplicate: bool = False
    failure_reason: int | None = None
    detail: str = ""
    job_ids: list[int] = field(default_factory=list)
