"""The one way an instance enters MedServe's job system: STOW-RS, the DIMSE C-STORE SCP and pull all call it.

``Intake.accept_bytes(data, source)`` (or ``accept_dataset`` for a pydicom ``Dataset``) checks one DICOM
instance, writes it durably into the spool (temp file, fsync, rename), records it in the job store and makes
its jobs (one per model the routing rules name, or one ``skipped`` job when no rule matches), all before it
returns: once it has answered ``accepted``, the instance survives a crash and leads to exactly one result per
job. The same SOP Instance UID sent again is accepted again (``duplicate=True``) and makes no new job.

Signatures (every method is thread-safe; the synchronous ones block on disk and database I/O, so call them
from a worker thread, e.g. the DICOM node's bridge thread, never from the event loop):

    Intake.accept_bytes(data: bytes, source: str, *, study_instance_uid: str | None = None) -> AcceptResult
    Intake.accept_dataset(dataset: pydicom.Dataset, source: str) -> AcceptResult
    Intake.accept_many(items: Sequence[bytes], source: str, *, study_instance_uid=None) -> list[AcceptResult]
    Intake.accept_spooled(instance: SpooledInstance, source: str) -> AcceptResult
    await Intake.accept_bytes_async(data, source, *, study_instance_uid=None) -> AcceptResult   (routes)

``accept_spooled`` takes an instance that another process (the DICOM node) checked with ``inspect_instance``
and wrote into this intake's spool with ``Spool.receive``: it is counted against the spool's limit, recorded
and routed here, so the service's own share of a C-STORE is one small message and one commit.

``source`` is ``stow``, ``dimse`` or ``pull``. ``study_instance_uid``: the instance must belong to this study
(STOW-RS to ``/dicomweb/studies/{StudyInstanceUID}``), else it fails with ``STUDY_MISMATCH``.

A refused instance is not an exception: ``AcceptResult.accepted`` is False and ``failure_reason`` holds the
DICOM status that says why (PS3.18 FailureReason for STOW-RS, PS3.4 C-STORE status for DIMSE), ``detail``
the reason in words (never a tag value). ``IntakeUnavailable`` is raised when nothing can be accepted at all
(models still loading, jobs disabled); a C-STORE SCP answers it with ``OUT_OF_RESOURCES`` (0xA700).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from app.pacs.routing import Decision, InstanceAttributes, Router
from app.pacs.spool import Spool, SpoolFull
from app.pacs.store import FAILED, SKIPPED, InstanceRecord, JobStore, NewJob

logger = logging.getLogger("medserve.pacs.intake")

# DICOM status codes (PS3.4 Annex B C-STORE statuses, used as PS3.18 STOW-RS FailureReason values).
OUT_OF_RESOURCES = 0xA700  # the spool is full (MEDSERVE_SPOOL_MAX_BYTES or the disk)
STUDY_MISMATCH = 0xA900  # "data set does not match": another study than the STOW-RS URL names
CANNOT_UNDERSTAND = 0xC000  # not DICOM, truncated, or missing the UIDs every instance has
PROCESSING_FAILURE = 0x0110  # the store or the spool failed unexpectedly

SOURCES = ("stow", "dimse", "pull")
# Instances of one request recorded per transaction: one commit (fsync) for several, and the first jobs may
# start before a long request has been spooled to the end.
RECORD_CHUNK = 8


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


@dataclass(frozen=True)
class ModelChoice:
    """A model jobs may go to: its name, version and task, whether it serves (``ready``) and whether its task
    has a DICOM result type (``has_result``)."""

    name: str
    version: str
    task: str
    ready: bool
    has_result: bool


class ModelCatalog(Protocol):
    """The models the intake routes to (the registry, seen through ``app.pacs.worker.RegistryCatalog``)."""

    def loaded(self) -> bool:
        """Whether loading is over (before that, nothing is accepted)."""
        ...

    def choices(self) -> list[ModelChoice]: ...


@dataclass(frozen=True)
class Inspected:
    """The identifiers and routing attributes of an instance that passed ``inspect_instance``."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    attributes: InstanceAttributes


def not_yet_accepted(found: Inspected) -> AcceptResult:
    """The outcome of an inspected instance before it is spooled and recorded: its UIDs, not accepted."""
    return AcceptResult(
        False,
        sop_instance_uid=found.sop_instance_uid,
        sop_class_uid=found.sop_class_uid,
        study_instance_uid=found.study_instance_uid,
        series_instance_uid=found.series_instance_uid,
    )


class InstanceError(ValueError):
    """An instance that cannot be accepted; ``status`` is the DICOM failure reason."""

    def __init__(self, message: str, status: int = CANNOT_UNDERSTAND) -> None:
        super().__init__(message)
        self.status = status


_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _uid(ds: Dataset, keyword: str, where: Dataset | None = None) -> str:
    value = (where if where is not None else ds).get(keyword)
    uid = UID(str(value).strip()) if value is not None else UID("")
    if not uid or not uid.is_valid:
        raise InstanceError(f"the instance has no valid {keyword}")
    return str(uid)


def _int_or_none(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def _text_or_none(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() if value is not None and str(value).strip() else None


def _check_complete(ds: Dataset, data: bytes) -> None:
    """Raises ``InstanceError`` when the Part 10 bytes end before the data set does (a truncated transfer).

    pydicom reads a truncated file without complaint, so each top-level element's value is checked against
    the length its header declared, and encapsulated pixel data (the last element) against its delimiter.
    """
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH:
            continue
        if raw.value is not None and len(raw.value) != raw.length:
            raise InstanceError("the instance is truncated (an element ends before its declared length)")
    pixel = ds.get_item(0x7FE00010) if 0x7FE00010 in ds else None
    last = max(ds.keys()) if len(ds) else None
    encapsulated = isinstance(pixel, RawDataElement) and pixel.length == _UNDEFINED_LENGTH
    if encapsulated and last == 0x7FE00010 and not data.endswith(_SEQUENCE_DELIMITER):
        raise InstanceError("the instance is truncated (its encapsulated pixel data has no end)")
    rows, columns = _int_or_none(ds, "Rows"), _int_or_none(ds, "Columns")
    if (
        rows
        and columns
        and pixel is None
        and not any(k in ds for k in ("FloatPixelData", "DoubleFloatPixelData"))
    ):
        raise InstanceError("the instance is truncated or incomplete (image attributes but no pixel data)")
    if isinstance(pixel, RawDataElement) and pixel.length != _UNDEFINED_LENGTH and rows and columns:
        bits = _int_or_none(ds, "BitsAllocated") or 8
        samples = _int_or_none(ds, "SamplesPerPixel") or 1
        frames = _int_or_none(ds, "NumberOfFrames") or 1
        expected = (rows * columns * samples * frames * bits + 7) // 8
        if pixel.length < expected:
            raise InstanceError(
                f"the instance is truncated (its pixel data holds {pixel.length} of {expected} bytes)"
            )


# Bytes per value of the binary VRs: a value whose length is not a multiple cannot be converted.
_VALUE_SIZES = {
    "AT": 4, "FD": 8, "FL": 4, "OD": 8, "OF": 4, "OL": 4, "OV": 8, "OW": 2,
    "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8,
}  # fmt: skip


def _check_values(ds: Dataset) -> None:
    """Raises ``InstanceError`` for an element whose value cannot be converted (a binary value of a length its
    VR cannot have), in the data set and its sequences.

    The values themselves are not converted: that took most of an instance's acceptance time (a few ms of
    the GIL per instance, a multiple of that when the model's threads compete for it). Text values are
    decoded leniently anyway, and the elements acceptance needs (UIDs, routing attributes) are converted and
    checked by their readers.
    """
    for tag in list(ds.keys()):  # the raw elements, not converted as iterating the data set would
        element = ds.get_item(tag)
        if isinstance(element, RawDataElement):
            if element.value is None or element.length == _UNDEFINED_LENGTH:
                continue
            vr = element.VR
            if vr is None:  # implicit VR: the dictionary's
                try:
                    vr = dictionary_VR(element.tag)
                except KeyError:  # a private or unknown element: kept as bytes
                    continue
            size = _VALUE_SIZES.get(vr)
            if size and len(element.value) % size:
                raise InstanceError("the instance cannot be parsed (a damaged element)")
        elif element.VR == "SQ":
            for item in element.value or []:
                _check_values(item)


def inspect_instance(data: bytes) -> Inspected:
    """Parses DICOM Part 10 bytes far enough to accept them: UIDs, routing attributes, completeness.

    Raises:
        InstanceError: not Part 10 DICOM, corrupt, truncated, or without the UIDs every instance has.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise InstanceError("not a DICOM Part 10 instance (no 'DICM' prefix after the 128-byte preamble)")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise InstanceError("the instance cannot be parsed (corrupt DICOM)") from exc
    _check_complete(ds, data)
    try:
        _check_values(ds)  # damage is found here, not in the worker
    except InstanceError:
        raise
    except Exception as exc:
        raise InstanceError("the instance cannot be parsed (a damaged element)") from exc
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise InstanceError("the instance has no file meta information (TransferSyntaxUID)")
    sop_class = _uid(ds, "SOPClassUID")
    attributes = InstanceAttributes(
        sop_class_uid=sop_class,
        modality=_text_or_none(ds, "Modality"),
        body_part_examined=_text_or_none(ds, "BodyPartExamined"),
        photometric_interpretation=_text_or_none(ds, "PhotometricInterpretation"),
        rows=_int_or_none(ds, "Rows"),
        columns=_int_or_none(ds, "Columns"),
        has_pixels=any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
    )
    return Inspected(
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        sop_class_uid=sop_class,
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        transfer_syntax_uid=_uid(ds, "TransferSyntaxUID", meta),
        attributes=attributes,
    )


@dataclass(frozen=True)
class SpooledInstance:
    """An instance checked (``inspect_instance``) and written into the spool (``Spool.receive``) by another
    process: ``previous`` is the size of the earlier copy it replaced (None when there was none)."""

    found: Inspected
    path: str
    size: int
    previous: int | None

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> SpooledInstance:
        found = dict(value["found"])
        found["attributes"] = InstanceAttributes(**found["attributes"])
        return cls(Inspected(**found), str(value["path"]), int(value["size"]), value["previous"])


def dataset_bytes(dataset: Dataset) -> bytes:
    """A pydicom ``Dataset`` (e.g. pynetdicom's ``event.dataset``, whose ``file_meta`` is set) as Part 10 bytes.

    Without file meta information, one is made: the dataset's own encoding (explicit VR little endian unless
    it was read as implicit VR).
    """
    meta = getattr(dataset, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        meta = FileMetaDataset(meta) if meta is not None else FileMetaDataset()
        implicit = getattr(dataset, "is_implicit_VR", False)
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        dataset.file_meta = meta
    if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in dataset:
        meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    if "MediaStorageSOPInstanceUID" not in meta and "SOPInstanceUID" in dataset:
        meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def planned_jobs(decision: Decision, choices: list[ModelChoice]) -> list[NewJob]:
    """The jobs of a routing decision: one per named model (queued when it serves and its task has a result
    type, else failed with the reason), or one skipped job when the decision names none."""
    if decision.models is None:  # the default routing: every ready model with a result type
        jobs = [
            NewJob(choice.name, choice.version, choice.task)
            for choice in choices
            if choice.ready and choice.has_result
        ]
        if jobs:
            return jobs
        return [NewJob("", "", "", SKIPPED, "no ready model has a DICOM result type for this image")]
    if not decision.models:
        return [NewJob("", "", "", SKIPPED, decision.reason)]
    known = {choice.name: choice for choice in choices}
    planned = []
    for name in decision.models:
        choice = known.get(name)
        if choice is None:
            planned.append(NewJob(name, "", "", FAILED, f"model {name!r} is not in the model directory"))
        elif not choice.ready:
            planned.append(
                NewJob(name, "", choice.task, FAILED, f"model {name!r} failed to load; GET /models shows why")
            )
        elif not choice.has_result:
            planned.append(
                NewJob(
                    name,
                    choice.version,
                    choice.task,
                    FAILED,
                    f"model {name!r} is a {choice.task} model, for which this build writes no DICOM result",
                )
            )
        else:
            planned.append(NewJob(name, choice.version, choice.task))
    return planned


class Intake:
    """Accepts instances into the spool and the job store (see the module docstring for the contract).

    Args:
        store: the job store.
        spool: where instances are written.
        router: the routing rules.
        catalog: the models jobs may go to.
        executor: where ``accept_bytes_async`` runs the blocking work (None: asyncio's default pool).
        on_accept: called with (source, outcome) after each instance, outcome ``accepted``, ``duplicate`` or
            ``refused`` (for metrics); its errors are logged, not raised.
    """

    def __init__(
        self,
        store: JobStore,
        spool: Spool,
        router: Router,
        catalog: ModelCatalog,
        *,
        executor: Executor | None = None,
        on_accept: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.spool = spool
        self.router = router
        self.catalog = catalog
        self.executor = executor
        self.on_accept = on_accept
        self.wake: Callable[[], None] | None = None  # set by the worker: new jobs are waiting

    def _observe(self, source: str, outcome: str) -> None:
        if self.on_accept is not None:
            try:
                self.on_accept(source, outcome)
            except Exception:
                logger.exception("intake observer failed")

    def _observe_result(self, source: str, result: AcceptResult) -> None:
        self._observe(
            source, "duplicate" if result.duplicate else "accepted" if result.accepted else "refused"
        )

    def accept_bytes(
        self, data: bytes, source: str, *, study_instance_uid: str | None = None
    ) -> AcceptResult:
        """Accepts one DICOM Part 10 instance (blocking; thread-safe).

        Raises:
            IntakeUnavailable: models are still loading.
            ValueError: an unknown ``source``.
        """
        return self.accept_many([data], source, study_instance_uid=study_instance_uid)[0]

    def accept_many(
        self, items: Sequence[bytes], source: str, *, study_instance_uid: str | None = None
    ) -> list[AcceptResult]:
        """Accepts several instances (e.g. the parts of one STOW-RS request) in one go: each is checked and
        spooled on its own, then the spool folder is flushed once and ``RECORD_CHUNK`` at a time are recorded
        in one transaction, so a request costs a database commit per chunk instead of one per instance, and
        the jobs of the first chunk start while the rest is spooled. One result per item, in order.

        Raises:
            IntakeUnavailable: models are still loading.
            ValueError: an unknown ``source``.
        """
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if not self.catalog.loaded():
            raise IntakeUnavailable("models are still loading; retry shortly")
        results: list[AcceptResult] = []
        pending: list[tuple[int, Inspected, Path, bool, int]] = []  # index, instance, file, existed, size
        for data in items:
            try:
                found = inspect_instance(data)
            except InstanceError as exc:
                results.append(AcceptResult(False, failure_reason=exc.status, detail=str(exc)))
                continue
            ids = not_yet_accepted(found)
            results.append(ids)
            if study_instance_uid is not None and found.study_instance_uid != study_instance_uid:
                results[-1] = dataclasses.replace(
                    ids,
                    failure_reason=STUDY_MISMATCH,
                    detail="the instance belongs to another study than the request's URL names",
                )
                continue
            try:
                path, existed = self.spool.put_instance(found.sop_instance_uid, data, sync_folder=False)
            except SpoolFull as exc:
                results[-1] = dataclasses.replace(
                    ids, failure_reason=OUT_OF_RESOURCES, detail=exc.strerror or "spool full"
                )
                continue
            except OSError as exc:
                logger.error("cannot spool an instance: %s", exc.strerror)
                results[-1] = dataclasses.replace(
                    ids, failure_reason=PROCESSING_FAILURE, detail="the spool cannot be written"
                )
                continue
            pending.append((len(results) - 1, found, path, existed, len(data)))
            if len(pending) >= RECORD_CHUNK:  # recorded, the first jobs start while the rest is spooled
                self._record(pending, results, source)
                pending = []
        if pending:
            self._record(pending, results, source)
        for result in results:
            self._observe_result(source, result)
        return results

    def _record(
        self,
        pending: list[tuple[int, Inspected, Path, bool, int]],
        results: list[AcceptResult],
        source: str,
        *,
        synced: bool = False,
    ) -> None:
        choices = self.catalog.choices()
        entries = [
            (
                InstanceRecord(
                    sop_instance_uid=found.sop_instance_uid,
                    study_instance_uid=found.study_instance_uid,
                    series_instance_uid=found.series_instance_uid,
                    sop_class_uid=found.sop_class_uid,
                    transfer_syntax_uid=found.transfer_syntax_uid,
                    spool_path=str(path),
                    size_bytes=size,
                    source=source,
                ),
                planned_jobs(self.router.route(found.attributes), choices),
            )
            for _, found, path, _, size in pending
        ]
        try:
            if not synced:
                self.spool.sync_instances()  # the renames are durable before the store says "accepted"
            recorded = self.store.record_many(entries)
        except Exception:
            logger.exception("cannot record instances in the job store")
            for index, _, path, existed, _ in pending:
                if not existed:
                    self.spool.delete(path)
                results[index] = dataclasses.replace(
                    results[index],
                    failure_reason=PROCESSING_FAILURE,
                    detail="the job store cannot be written",
                )
            return
        for (index, *_), record in zip(pending, recorded, strict=True):
            duplicate = record.known and record.new_jobs == 0
            results[index] = dataclasses.replace(
                results[index], accepted=True, duplicate=duplicate, job_ids=record.job_ids
            )
        if any(record.new_jobs for record in recorded) and self.wake is not None:
            self.wake()

    def accept_spooled(self, instance: SpooledInstance, source: str) -> AcceptResult:
        """Counts, records and routes an instance another process spooled (see the module docstring). A refused
        one is deleted from the spool unless it replaced an earlier copy (which its records still name).

        Raises:
            IntakeUnavailable: models are still loading (the caller deletes the file it wrote).
            ValueError: an unknown ``source``, or a file that is not where this spool keeps that instance.
        """
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        found = instance.found
        path = self.spool.instance_path(found.sop_instance_uid)
        if Path(instance.path) != path:
            raise ValueError("the instance was spooled elsewhere than this intake's spool")
        if not self.catalog.loaded():
            raise IntakeUnavailable("models are still loading; retry shortly")
        results = [not_yet_accepted(found)]
        existed = instance.previous is not None
        try:
            self.spool.adopt(instance.size, instance.previous)
        except SpoolFull as exc:
            if not existed:
                self.spool.delete_uncounted(path)
            results[0] = dataclasses.replace(
                results[0], failure_reason=OUT_OF_RESOURCES, detail=exc.strerror or "spool full"
            )
        else:
            # the other process flushed the folder after its rename
            self._record([(0, found, path, existed, instance.size)], results, source, synced=True)
        self._observe_result(source, results[0])
        return results[0]

    def observe_refused(self, source: str) -> None:
        """Counts an instance another process refused before it reached the intake (for the metrics)."""
        self._observe(source, "refused")

    def accept_dataset(self, dataset: Dataset, source: str) -> AcceptResult:
        """Accepts a pydicom ``Dataset`` (encoded with ``dataset_bytes`` first); raises as ``accept_bytes``."""
        try:
            data = dataset_bytes(dataset)
        except Exception:
            self._observe(source, "refused")
            return AcceptResult(
                False, failure_reason=CANNOT_UNDERSTAND, detail="the data set cannot be encoded"
            )
        return self.accept_bytes(data, source)

    async def accept_many_async(
        self, items: Sequence[bytes], source: str, *, study_instance_uid: str | None = None
    ) -> list[AcceptResult]:
        """``accept_many`` in the executor, for the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor,
            functools.partial(self.accept_many, items, source, study_instance_uid=study_instance_uid),
        )

    async def accept_bytes_async(
        self, data: bytes, source: str, *, study_instance_uid: str | None = None
    ) -> AcceptResult:
        """``accept_bytes`` in the executor, for the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor,
            functools.partial(self.accept_bytes, data, source, study_instance_uid=study_instance_uid),
        )
