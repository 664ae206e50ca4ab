"""Delivery of result objects (DICOM Part 10 bytes) to the archive, and the retry policy around it.

Two transports, chosen by the settings:

- ``MEDSERVE_PACS_URL`` (the archive's DICOMweb root, e.g. Orthanc's ``http://pacs:8042/dicom-web``; optional
  ``MEDSERVE_PACS_USERNAME`` / ``MEDSERVE_PACS_PASSWORD`` for HTTP basic authentication): STOW-RS
  (``StowDelivery``; ``deliver_many`` sends several results of a study in one request).
- ``MEDSERVE_DIMSE_DESTINATION`` (``AE@host:port``), for archives that speak DIMSE only: C-STORE with pynetdicom
  (``CStoreDelivery``), calling as ``MEDSERVE_DIMSE_AE_TITLE``.

Each ``deliver(result)`` either returns (the archive holds the object) or raises one of the errors of
``app.pacs.results``: ``PermanentDeliveryError`` when trying again cannot help (HTTP 4xx, a failed entry in the
STOW response, DIMSE statuses such as 0xA9xx "data set does not match SOP class" or 0xC000-0xCFFF "cannot
understand", an object the archive has no presentation context for), with the archive's reason;
``TransientDeliveryError`` otherwise (HTTP 5xx, 408/429, time-outs, refused connections, association rejected or
aborted, DIMSE 0xA7xx "out of resources", no response). The worker retries transient failures after
``RetryPolicy.delay_s``: capped exponential backoff with jitter, at most ``MEDSERVE_DELIVERY_MAX_ATTEMPTS`` tries.

Reasons never quote the object's attribute values: they carry status codes, UIDs and the archive's own words.
"""

from __future__ import annotations

import io
import logging
import random
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pydicom
import requests
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from app.pacs.results import (
    DeliveryError,
    PermanentDeliveryError,
    ResultObject,
    TransientDeliveryError,
    backoff_delay,
)
from app.settings import Settings

logger = logging.getLogger("medserve.pacs.delivery")

# HTTP statuses that are worth trying again although they are 4xx (PS3.18 and RFC 9110 semantics).
RETRIABLE_HTTP = frozenset({408, 425, 429})
REASON_MAX = 300  # characters of an archive's answer kept in a reason
GROUP_MAX_BYTES = 64 * 1024 * 1024  # most Part 10 bytes in one STOW-RS request of several results
# DICOM JSON tags of a STOW-RS answer (PS3.18 table 10.5.3-1)
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"


class Delivery(Protocol):
    """A ``ResultSink`` that can also send bare Part 10 bytes; ``describe()`` names the destination (no
    credentials)."""

    def deliver(self, result: ResultObject) -> None: ...

    def deliver_bytes(self, data: bytes, study_instance_uid: str | None = None) -> None: ...

    def describe(self) -> str: ...


# ---- retry policy -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with "equal jitter".

    After the n-th failed attempt (n = 1, 2, ...) the next waits ``d/2 + U(0, d/2)`` seconds, where
    ``d = min(cap_s, base_s * 2**(n-1))``: the wait doubles with each failure until the cap, and the jitter
    keeps many jobs that failed together from coming back together. ``max_attempts`` counts every attempt,
    the first included: after that many, the failure is final.
    """

    max_attempts: int = 8
    base_s: float = 1.0
    cap_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_s <= 0 or self.cap_s < self.base_s:
            raise ValueError("backoff needs 0 < base_s <= cap_s")

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            max_attempts=settings.delivery_max_attempts,
            base_s=settings.delivery_backoff_s,
            cap_s=max(settings.delivery_backoff_max_s, settings.delivery_backoff_s),
        )

    def ceiling_s(self, attempt: int) -> float:
        """The longest wait after failed attempt number ``attempt`` (1-based)."""
        if attempt < 1:
            raise ValueError("attempts are numbered from 1")
        exponent = min(attempt - 1, 64)  # 2**64 * base is far above any cap; avoids float overflow
        return float(min(self.cap_s, self.base_s * 2.0**exponent))

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float | None:
        """Seconds to wait after failed attempt number ``attempt`` before the next; None when none is left.

        The wait is ``app.pacs.results.backoff_delay`` (uniform in [d/2, d]), the function the worker uses.
        """
        if attempt >= self.max_attempts:
            return None
        return backoff_delay(attempt, base_s=self.base_s, cap_s=self.cap_s, rng=rng)

    def should_retry(self, attempt: int, error: BaseException) -> bool:
        """Whether to try again after ``error`` ended attempt number ``attempt``."""
        return isinstance(error, TransientDeliveryError) and attempt < self.max_attempts


def deliver_with_retries(
    delivery: Delivery,
    data: bytes,
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], Any],
    rng: random.Random | None = None,
) -> int:
    """Delivers Part 10 ``data``, retrying transient failures as ``policy`` says; returns the number of attempts.

    ``sleep`` is called with each wait in seconds (``time.sleep``, or an event's ``wait`` to stop early).

    Raises:
        PermanentDeliveryError: at once, without retrying.
        TransientDeliveryError: the last failure once ``policy.max_attempts`` attempts have failed.
    """
    attempt = 1
    while True:
        try:
            delivery.deliver_bytes(data)
            return attempt
        except TransientDeliveryError as exc:
            wait = policy.delay_s(attempt, rng)
            if wait is None:
                raise
            logger.info(
                "delivery attempt %d to %s failed (%s); next in %.1f s",
                attempt,
                delivery.describe(),
                exc,
                wait,
            )
            sleep(wait)
            attempt += 1


# ---- helpers ----------------------------------------------------------------------------------------------------


def read_result(data: bytes) -> Dataset:
    """The result object as a pydicom dataset (Part 10 bytes, file meta included).

    Raises:
        PermanentDeliveryError: the bytes are no DICOM object (no archive would take them).
    """
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        raise PermanentDeliveryError(
            f"the result is not a readable DICOM object ({type(exc).__name__})"
        ) from exc


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 3] + "..."


def _http_reason(response: requests.Response) -> str:
    """The archive's reason for an HTTP error: the failed entries of a STOW answer, else its message or body."""
    detail = ""
    content_type = response.headers.get("content-type", "")
    try:
        payload = response.json() if response.content else None
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        failed = _failed_from_json(payload)
        if failed:
            detail = failed
        else:
            parts = [
                str(payload[k])
                for k in ("Message", "Details", "message", "detail", "error")
                if payload.get(k)
            ]
            detail = "; ".join(parts)
    elif response.content and "json" not in content_type and "html" not in content_type:
        detail = response.text
    text = f"HTTP {response.status_code} {response.reason or ''}".strip()
    return _short(f"{text}: {detail}" if detail else text)


def _failed_from_json(payload: dict[str, Any]) -> str:
    try:
        dataset = Dataset.from_json(payload)
    except Exception:  # not a DICOM JSON object: the caller falls back to the raw message
        return ""
    return describe_failures(dataset)


def describe_failures(response: Dataset) -> str:
    """``FailedSOPSequence`` of a STOW-RS answer as text (SOP Instance UID and failure reason per entry)."""
    entries = []
    for item in response.get("FailedSOPSequence", []) or []:
        reason = item.get("FailureReason")
        code = f"0x{int(reason):04X}" if reason is not None else "no reason given"
        entries.append(
            f"{item.get('ReferencedSOPInstanceUID', '?')} failed ({code}: {stow_failure_meaning(reason)})"
        )
    return "; ".join(entries)


def stow_failure_meaning(code: int | None) -> str:
    """The meaning of a STOW-RS ``FailureReason`` (PS3.18 table "Store Instance Failure Reasons")."""
    if code is None:
        return "unknown"
    meanings = {
        0x0110: "processing failure",
        0x0122: "SOP class not supported",
        0x0124: "not authorized",
        0xA700: "out of resources",
        0xA900: "data set does not match SOP class",
        0xC000: "cannot understand",
        0xC122: "referenced transfer syntax not supported",
        0xC123: "the study instance UID does not match the request",
    }
    if code in meanings:
        return meanings[code]
    if 0xA700 <= code <= 0xA7FF:
        return "out of resources"
    if 0xA900 <= code <= 0xA9FF:
        return "data set does not match SOP class"
    if 0xC000 <= code <= 0xCFFF:
        return "cannot understand"
    return "failure"


def is_transient_dimse_status(code: int) -> bool:
    """Whether a failed C-STORE / STOW status may succeed when tried again (out of resources, resource limits)."""
    return 0xA700 <= code <= 0xA7FF or code in (0x0213, 0x0110)


# ---- STOW-RS ----------------------------------------------------------------------------------------------------


class StowDelivery:
    """STOW-RS to a DICOMweb root; one keep-alive ``requests`` session per thread.

    The request is written here rather than by ``dicomweb-client``: the result's Part 10 bytes go into the
    multipart body as they are (no parsing and re-encoding of the object), and ``deliver_many`` sends several
    results of one study in one request. The answer is read per instance (``FailedSOPSequence``,
    ``ReferencedSOPSequence``), so one refused part fails alone.
    """

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.auth = (username, password or "") if username else None
        self.timeout_s = timeout_s
        self._local = threading.local()

    def describe(self) -> str:
        return f"STOW-RS {self.url}"

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.auth = self.auth
            session.trust_env = False  # no netrc or proxy look-up per request: the archive is configured here
            self._local.session = session
        return session

    def deliver(self, result: ResultObject) -> None:
        """One STOW-RS attempt to ``<url>/studies/<the source study>``."""
        (error,) = self.deliver_many([result])
        if error is not None:
            raise error

    def deliver_bytes(self, data: bytes, study_instance_uid: str | None = None) -> None:
        """One STOW-RS attempt for Part 10 ``data`` (to its own study unless ``study_instance_uid`` is given)."""
        dataset = read_result(data)
        study = study_instance_uid or str(dataset.get("StudyInstanceUID", "")) or None
        uid = str(dataset.get("SOPInstanceUID", ""))
        (error,) = self._post(study, [(uid, data)])
        if error is not None:
            raise error

    def deliver_many(self, results: Sequence[ResultObject]) -> list[DeliveryError | None]:
        """One STOW-RS attempt for several results: one request per study (at most ``GROUP_MAX_BYTES`` each);
        for each result, None when the archive stored it, else the error of that result alone."""
        errors: list[DeliveryError | None] = [None] * len(results)
        by_study: dict[str, list[int]] = {}
        for index, result in enumerate(results):
            if len(result.part10) < 132 or result.part10[128:132] != b"DICM":
                errors[index] = PermanentDeliveryError("the result is not a readable DICOM object (no DICM)")
                continue
            by_study.setdefault(result.study_instance_uid, []).append(index)
        for study, indexes in by_study.items():
            chunk: list[int] = []
            size = 0
            for index in [*indexes, -1]:
                part = len(results[index].part10) if index >= 0 else 0
                if chunk and (index < 0 or size + part > GROUP_MAX_BYTES):
                    parts = [(results[i].sop_instance_uid, results[i].part10) for i in chunk]
                    for i, error in zip(chunk, self._post(study or None, parts), strict=True):
                        errors[i] = error
                    chunk, size = [], 0
                if index >= 0:
                    chunk.append(index)
                    size += part
        return errors

    def _post(self, study: str | None, parts: Sequence[tuple[str, bytes]]) -> list[DeliveryError | None]:
        """One STOW-RS request of ``parts`` ((SOP Instance UID, Part 10 bytes)); an outcome per part."""
        boundary = uuid.uuid4().hex
        body = bytearray()
        for _, data in parts:
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            body += data
            body += b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        url = f"{self.url}/studies/{study}" if study else f"{self.url}/studies"
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json, application/json",
        }
        try:
            response = self._session().post(url, data=bytes(body), headers=headers, timeout=self.timeout_s)
        except requests.Timeout:
            error: DeliveryError = TransientDeliveryError(
                f"the archive did not answer within {self.timeout_s:g} s"
            )
            return [error] * len(parts)
        except requests.ConnectionError as exc:
            error = TransientDeliveryError(
                f"cannot reach the archive at {self.url} ({_connection_reason(exc)})"
            )
            return [error] * len(parts)
        except requests.RequestException as exc:
            error = TransientDeliveryError(f"STOW-RS to {self.url} failed ({type(exc).__name__})")
            return [error] * len(parts)
        return stow_outcomes(response, [uid for uid, _ in parts])


def _stow_answer(response: requests.Response) -> dict[str, Any]:
    if not response.content:
        return {}
    try:
        payload = response.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _sequence_items(payload: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = payload.get(tag)
    items = element.get("Value") if isinstance(element, dict) else None
    return [item for item in items or [] if isinstance(item, dict)]


def _first_value(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _failure_code(item: dict[str, Any]) -> int | None:
    try:
        value = _first_value(item, FAILURE_REASON)
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _failure_text(uid: str, code: int | None) -> str:
    shown = f"0x{code:04X}" if code is not None else "no reason given"
    return f"{uid or '?'} failed ({shown}: {stow_failure_meaning(code)})"


def _failure_error(prefix: str, entries: Sequence[tuple[str, int | None]]) -> DeliveryError:
    reason = _short(prefix + "; ".join(_failure_text(uid, code) for uid, code in entries))
    codes = [0x0110 if code is None else code for _, code in entries]
    if all(is_transient_dimse_status(code) for code in codes):
        return TransientDeliveryError(reason)
    return PermanentDeliveryError(reason)


def stow_outcomes(response: requests.Response, uids: Sequence[str]) -> list[DeliveryError | None]:
    """What a STOW-RS answer says of each instance sent (by SOP Instance UID): None when stored, else the error.

    An error status (4xx, 5xx) decides for every instance the answer does not list as stored: 5xx, 408, 425 and
    429 are transient, any other 4xx permanent, with the archive's reason (the instance's own
    ``FailedSOPSequence`` entry when it has one). In a 2xx answer, an instance listed in ``FailedSOPSequence``
    failed with its ``FailureReason`` (transient when every code is out of resources or a resource limit, else
    permanent), failures that name no instance sent apply to every instance not listed as stored, and the
    others were stored.
    """
    payload = _stow_answer(response)
    failed: dict[str, int | None] = {}
    for item in _sequence_items(payload, FAILED_SOP_SEQUENCE):
        failed[str(_first_value(item, REFERENCED_SOP_INSTANCE_UID) or "")] = _failure_code(item)
    referenced_items = _sequence_items(payload, REFERENCED_SOP_SEQUENCE)
    referenced = {str(_first_value(item, REFERENCED_SOP_INSTANCE_UID) or "") for item in referenced_items}
    sent = set(uids)
    unmatched = [(uid, code) for uid, code in failed.items() if uid not in sent]
    status = response.status_code
    ok = 200 <= status < 300
    http_text = f"HTTP {status} {response.reason or ''}".strip()
    outcomes: list[DeliveryError | None] = []
    transient_status = status >= 500 or status in RETRIABLE_HTTP
    for uid in uids:
        if uid in failed and ok:
            outcomes.append(_failure_error("STOW-RS answered ", [(uid, failed[uid])]))
        elif uid in failed:  # an error status: it decides, the entry says why
            reason = _short(f"STOW-RS answered {http_text}: {_failure_text(uid, failed[uid])}")
            outcomes.append(
                TransientDeliveryError(reason) if transient_status else PermanentDeliveryError(reason)
            )
        elif uid in referenced:
            outcomes.append(None)
        elif unmatched and ok:
            outcomes.append(_failure_error("STOW-RS answered ", unmatched))
        elif ok:
            # stored, unless the answer lists what it stored and this instance is not among them
            outcomes.append(
                None
                if not referenced_items
                else TransientDeliveryError(f"STOW-RS answered {http_text} without a word on {uid}")
            )
        else:
            reason = "STOW-RS answered " + _http_reason(response)
            outcomes.append(
                TransientDeliveryError(reason) if transient_status else PermanentDeliveryError(reason)
            )
    return outcomes


def _connection_reason(exc: requests.ConnectionError) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "No route to host", "Connection reset"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__


# ---- C-STORE ----------------------------------------------------------------------------------------------------

_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class DimseDestination:
    """A DICOM node, from ``AE@host:port``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> DimseDestination:
        """Parses ``AE@host:port``.

        Raises:
            ValueError: not of that form, an AE title longer than 16 characters, or a port outside 1-65535.
        """
        match = _DESTINATION.match(text.strip())
        if match is None:
            raise ValueError(f"expected AE@host:port (an AE title of at most 16 characters), got {text!r}")
        port = int(match["port"])
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is outside 1-65535")
        return cls(match["ae"].strip(), match["host"], port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class CStoreDelivery:
    """C-STORE to a DICOM node with pynetdicom, one association per object, calling as ``calling_ae``."""

    def __init__(
        self, destination: DimseDestination, *, calling_ae: str = "MEDSERVE", timeout_s: float = 30.0
    ) -> None:
        self.destination = destination
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s

    def describe(self) -> str:
        return f"C-STORE {self.destination}"

    def deliver(self, result: ResultObject) -> None:
        """One C-STORE attempt (one association)."""
        self.deliver_bytes(result.part10)

    def deliver_bytes(self, data: bytes, study_instance_uid: str | None = None) -> None:
        """One C-STORE attempt for Part 10 ``data`` (``study_instance_uid`` is unused: DIMSE has no URL)."""
        from pynetdicom import AE

        dataset = read_result(data)
        sop_class = str(dataset.get("SOPClassUID", ""))
        file_meta = getattr(dataset, "file_meta", None)
        syntax = str(getattr(file_meta, "TransferSyntaxUID", "") or "1.2.840.10008.1.2.1")
        if not sop_class:
            raise PermanentDeliveryError("the result has no SOP Class UID")
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        ae.add_requested_context(sop_class, [syntax])
        dest = self.destination
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        try:
            if assoc.is_rejected:
                raise TransientDeliveryError(f"{dest} rejected the association ({_rejection(assoc)})")
            if assoc.is_aborted:
                raise TransientDeliveryError(f"{dest} aborted the association")
            if not assoc.is_established:
                raise TransientDeliveryError(f"cannot reach {dest} (connection refused or timed out)")
            if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
                raise PermanentDeliveryError(
                    f"{dest} accepts no presentation context for SOP class {sop_class} in transfer syntax {syntax}"
                )
            status = assoc.send_c_store(dataset)
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
        code = status.get("Status") if status else None
        if code is None:
            raise TransientDeliveryError(f"{dest} sent no C-STORE response (aborted or timed out)")
        code = int(code)
        if code == 0x0000 or 0xB000 <= code <= 0xBFFF:  # success, or a warning (coerced, elements discarded)
            return
        comment = str(status.get("ErrorComment", "") or "")
        reason = f"{dest} answered C-STORE status 0x{code:04X} ({stow_failure_meaning(code)})"
        reason = _short(f"{reason}: {comment}" if comment else reason)
        if is_transient_dimse_status(code):
            raise TransientDeliveryError(reason)
        raise PermanentDeliveryError(reason)


def _rejection(assoc: Any) -> str:
    primitive = getattr(getattr(assoc, "acceptor", None), "primitive", None)
    result = getattr(primitive, "result_str", None)
    reason = getattr(primitive, "reason_str", None)
    parts = [str(p) for p in (result, reason) if p]
    return ", ".join(parts) or "no reason given"


# ---- from the settings ------------------------------------------------------------------------------------------


def delivery_from_settings(settings: Settings) -> Delivery | None:
    """The configured transport: C-STORE when ``DIMSE_DESTINATION`` is set (a DIMSE-only archive; ``PACS_URL``
    may still name the DICOMweb root studies are pulled from), else STOW-RS to ``PACS_URL``, else None (results
    are not delivered)."""
    if settings.dimse_destination:
        return CStoreDelivery(
            DimseDestination.parse(settings.dimse_destination),
            calling_ae=settings.dimse_ae_title,
            timeout_s=settings.delivery_timeout_s,
        )
    if settings.pacs_url:
        password = settings.pacs_password.get_secret_value() if settings.pacs_password else None
        return StowDelivery(
            settings.pacs_url,
            username=settings.pacs_username,
            password=password,
            timeout_s=settings.delivery_timeout_s,
        )
    return None
