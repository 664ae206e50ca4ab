"""MedServe as a DICOM node: a pynetdicom C-ECHO and C-STORE SCP (``MEDSERVE_DIMSE_PORT``).

With ``MEDSERVE_DIMSE_PORT`` set, the service listens for DICOM associations as ``MEDSERVE_DIMSE_AE_TITLE``
(default ``MEDSERVE``; a caller must call that title). Only the callers listed in ``MEDSERVE_DIMSE_ALLOWED`` may
associate: comma-separated ``AE@host`` entries (a host name is resolved when the server starts; ``AE@*`` allows
that title from anywhere); an empty list refuses everyone. Any other caller's association is rejected
(rejected-permanent, service user, "calling AE title not recognised"), before a presentation context is looked
at.

Presentation contexts: Verification, and the storage SOP classes of ``STORAGE_SOP_CLASSES`` (projection X-ray:
CR, DX and intra-oral and digital mammography for presentation and for processing; CT and enhanced CT; MR and
enhanced MR; secondary capture, single- and multi-frame) in the usual transfer syntaxes (``TRANSFER_SYNTAXES``:
implicit and explicit VR little endian, deflated, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE).
Any other SOP class is refused in the association negotiation (presentation context result "abstract syntax
not supported"), so a store of it gets the SOP class not supported outcome (0x0122) from the caller's side.
Whether a model can decode an instance is the job's business: a compressed or multi-frame instance is accepted
here and its job fails with the reason.

Each C-STORE hands the received Part 10 bytes to the intake (``app.pacs.intake``; in the service, the bridge of
``app.pacs.dimse_node``, which runs this server in a child process) in pynetdicom's handler thread and answers
its outcome: 0x0000 when accepted (also for an instance already known), 0xA700 (out of
resources) when the spool is full or nothing can be accepted yet, 0xA900 when the data set does not match,
0xC000 when the instance cannot be understood, 0xC001 when processing it failed. Nothing a caller sends is
logged but UIDs, AE titles and addresses; pynetdicom's own logger is limited to warnings (its debug and info
output can quote attribute values).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom.dataset import Dataset

from app.pacs.intake import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    STUDY_MISMATCH,
    AcceptResult,
    IntakeUnavailable,
)
from app.settings import SettingsError, env_name

logger = logging.getLogger("medserve.pacs.dimse")

SOURCE = "dimse"
VERIFICATION = "1.2.840.10008.1.1"

# Storage SOP classes the SCP accepts (PS3.4 Annex B.5): name -> UID.
STORAGE_SOP_CLASSES: dict[str, str] = {
    "ComputedRadiographyImageStorage": "1.2.840.10008.5.1.4.1.1.1",
    "DigitalXRayImageStorageForPresentation": "1.2.840.10008.5.1.4.1.1.1.1",
    "DigitalXRayImageStorageForProcessing": "1.2.840.10008.5.1.4.1.1.1.1.1",
    "DigitalMammographyXRayImageStorageForPresentation": "1.2.840.10008.5.1.4.1.1.1.2",
    "DigitalMammographyXRayImageStorageForProcessing": "1.2.840.10008.5.1.4.1.1.1.2.1",
    "DigitalIntraOralXRayImageStorageForPresentation": "1.2.840.10008.5.1.4.1.1.1.3",
    "DigitalIntraOralXRayImageStorageForProcessing": "1.2.840.10008.5.1.4.1.1.1.3.1",
    "CTImageStorage": "1.2.840.10008.5.1.4.1.1.2",
    "EnhancedCTImageStorage": "1.2.840.10008.5.1.4.1.1.2.1",
    "MRImageStorage": "1.2.840.10008.5.1.4.1.1.4",
    "EnhancedMRImageStorage": "1.2.840.10008.5.1.4.1.1.4.1",
    "SecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7",
    "MultiFrameSingleBitSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.1",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.2",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.3",
    "MultiFrameTrueColorSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.4",
}

TRANSFER_SYNTAXES: dict[str, str] = {
    "ImplicitVRLittleEndian": "1.2.840.10008.1.2",
    "ExplicitVRLittleEndian": "1.2.840.10008.1.2.1",
    "DeflatedExplicitVRLittleEndian": "1.2.840.10008.1.2.1.99",
    "JPEGBaseline8Bit": "1.2.840.10008.1.2.4.50",
    "JPEGExtended12Bit": "1.2.840.10008.1.2.4.51",
    "JPEGLossless": "1.2.840.10008.1.2.4.57",
    "JPEGLosslessSV1": "1.2.840.10008.1.2.4.70",
    "JPEGLSLossless": "1.2.840.10008.1.2.4.80",
    "JPEGLSNearLossless": "1.2.840.10008.1.2.4.81",
    "JPEG2000Lossless": "1.2.840.10008.1.2.4.90",
    "JPEG2000": "1.2.840.10008.1.2.4.91",
    "RLELossless": "1.2.840.10008.1.2.5",
}

# C-STORE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
PROCESSING_FAILED = 0xC001  # "cannot understand" range: the instance could not be processed
INTERNAL_ERROR = 0xC002
_LO_MAX = 64  # ErrorComment is LO
# The largest PDU the SCP receives (pynetdicom's default: 16 382 bytes). A 256 x 256 CT comes in one or two
# PDUs instead of eight, and each PDU costs pynetdicom a pass of its polling reactors: measured with storescu
# beside an intake that takes 20 ms, 36 instead of 26 C-STOREs/s and 4.9 instead of 7.0 ms of CPU each. A
# caller may still send smaller ones; memory per association stays bounded by this.
MAX_PDU_BYTES = 256 * 1024


class IntakeLike(Protocol):
    """What the SCP needs of ``app.pacs.intake.Intake``."""

    def accept_bytes(
        self, data: bytes, source: str, *, study_instance_uid: str | None = None
    ) -> AcceptResult: ...


# ---- who may associate ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllowedPeer:
    """One ``AE@host`` entry of ``MEDSERVE_DIMSE_ALLOWED``; ``addresses`` empty means any host (``AE@*``)."""

    ae_title: str
    host: str
    addresses: frozenset[str]

    def admits(self, ae_title: str, address: str) -> bool:
        return ae_title == self.ae_title and (not self.addresses or address in self.addresses)


def _addresses(host: str) -> frozenset[str]:
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    found = {str(info[4][0]) for info in infos}
    # an IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d
    found |= {f"::ffff:{a}" for a in list(found) if ":" not in a}
    return frozenset(found)


def parse_allowed(text: str, *, resolve: Callable[[str], frozenset[str]] = _addresses) -> list[AllowedPeer]:
    """Parses ``MEDSERVE_DIMSE_ALLOWED`` (``AE@host`` entries, comma-separated); resolves each host.

    Raises:
        SettingsError: an entry that is not ``AE@host`` (AE title of 1-16 characters), or a host that does not
            resolve; the message names the variable and the entry.
    """
    peers = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        ae_title, at, host = entry.rpartition("@")
        ae_title, host = ae_title.strip(), host.strip()
        if not at or not ae_title or not host or len(ae_title) > 16 or "\\" in ae_title:
            raise SettingsError(
                f"{env_name('dimse_allowed')}: {entry!r} is not AE@host (an AE title of 1-16 characters)"
            )
        if host == "*":
            peers.append(AllowedPeer(ae_title, host, frozenset()))
            continue
        try:
            addresses = resolve(host)
        except OSError as exc:
            raise SettingsError(
                f"{env_name('dimse_allowed')}: host {host!r} of {entry!r} does not resolve ({exc})"
            ) from exc
        peers.append(AllowedPeer(ae_title, host, addresses))
    return peers


def is_allowed(peers: list[AllowedPeer], ae_title: str, address: str) -> bool:
    return any(peer.admits(ae_title.strip(), address) for peer in peers)


# ---- C-STORE outcome --------------------------------------------------------------------------------------------


def store_status(result: AcceptResult) -> int:
    """The C-STORE status that answers an intake outcome."""
    if result.accepted:
        return SUCCESS
    return {
        OUT_OF_RESOURCES: OUT_OF_RESOURCES,
        STUDY_MISMATCH: STUDY_MISMATCH,
        CANNOT_UNDERSTAND: CANNOT_UNDERSTAND,
        PROCESSING_FAILURE: PROCESSING_FAILED,
    }.get(result.failure_reason or PROCESSING_FAILURE, PROCESSING_FAILED)


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:_LO_MAX]
    return status


# ---- the server -------------------------------------------------------------------------------------------------


NOBODY = "\x00"  # an AE title no caller can have (AE titles are printable): admits no one


def gated_ae(ae_title: str, titles_from: Callable[[str], list[str]]) -> Any:
    """A pynetdicom AE whose ``require_calling_aet`` depends on the caller's address.

    pynetdicom checks the calling AE title against ``ae.require_calling_aet`` while it negotiates, in the
    association's own thread, and rejects a stranger itself (rejected-permanent, service user, "calling AE
    title not recognised"). Here that list is computed for the association being negotiated: the titles
    ``titles_from(its peer address)`` returns, or a title no one has when the list is empty (pynetdicom reads
    an empty list as "no check").
    """
    from pynetdicom import AE
    from pynetdicom.association import Association

    class GatedAE(AE):
        @property
        def require_calling_aet(self) -> list[str]:
            assoc = threading.current_thread()
            if isinstance(assoc, Association) and assoc.is_acceptor:
                return titles_from(str(assoc.requestor.address)) or [NOBODY]
            return [NOBODY]

        @require_calling_aet.setter
        def require_calling_aet(self, ae_titles: list[str]) -> None:
            raise AttributeError("the calling AE titles come from MEDSERVE_DIMSE_ALLOWED")

    return GatedAE(ae_title=ae_title)


class DimseServer:
    """The SCP: ``start()`` listens in background threads, ``stop()`` closes it and its associations.

    ``intake`` returns the current intake (or None while there is none yet: stores then answer 0xA700), so that
    the server may start before the job system is ready.
    """

    def __init__(
        self,
        intake: Callable[[], IntakeLike | None],
        *,
        ae_title: str,
        port: int,
        allowed: list[AllowedPeer],
        host: str = "0.0.0.0",
        timeout_s: float = 30.0,
        max_associations: int = 16,
    ) -> None:
        self.intake = intake
        self.ae_title = ae_title
        self.port = port
        self.host = host
        self.allowed = allowed
        self.timeout_s = timeout_s
        self.max_associations = max_associations
        self.stored = 0  # instances accepted (also counted by the intake's metrics)
        self.refused = 0
        self._lock = threading.Lock()
        self._server: Any = None

    # pynetdicom handlers run in the association's thread
    def allowed_titles(self, address: str) -> list[str]:
        """The calling AE titles admitted from ``address``."""
        return [peer.ae_title for peer in self.allowed if not peer.addresses or address in peer.addresses]

    def _on_rejected(self, event: Any) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        logger.warning(
            "DIMSE association from %r at %s rejected (not in %s, or another called AE title than %r)",
            calling,
            assoc.requestor.address,
            env_name("dimse_allowed"),
            self.ae_title,
        )

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def _on_store(self, event: Any) -> Dataset:
        intake = self.intake()
        if intake is None:
            return _status(OUT_OF_RESOURCES, "MedServe is not ready to accept instances")
        try:
            data = bytes(event.encoded_dataset(include_meta=True))
            result = intake.accept_bytes(data, SOURCE)
        except IntakeUnavailable as exc:
            return _status(OUT_OF_RESOURCES, str(exc))
        except Exception:
            logger.exception("C-STORE: the intake failed")
            return _status(INTERNAL_ERROR, "MedServe could not process the instance")
        code = store_status(result)
        with self._lock:
            if code == SUCCESS:
                self.stored += 1
            else:
                self.refused += 1
        if code != SUCCESS:
            logger.info(
                "C-STORE of %s refused: 0x%04X %s", result.sop_instance_uid or "?", code, result.detail
            )
        return _status(code, "" if code == SUCCESS else result.detail)

    def start(self) -> None:
        from pynetdicom import evt

        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = gated_ae(self.ae_title, self.allowed_titles)
        ae.require_called_aet = True
        ae.maximum_associations = self.max_associations
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.acse_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        ae.network_timeout = self.timeout_s
        ae.add_supported_context(VERIFICATION)
        syntaxes = list(TRANSFER_SYNTAXES.values())
        for uid in STORAGE_SOP_CLASSES.values():
            ae.add_supported_context(uid, syntaxes)
        handlers: list[Any] = [
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])
        logger.info(
            "DICOM node %s listening on %s:%d (%d caller(s) allowed)",
            self.ae_title,
            self.host,
            self.port,
            len(self.allowed),
        )

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            logger.info("DICOM node %s stopped", self.ae_title)

    @property
    def running(self) -> bool:
        return self._server is not None
