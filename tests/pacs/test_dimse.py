"""The DICOM node (C-ECHO / C-STORE SCP) driven by dcmtk's echoscu and storescu, real processes."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from app.pacs.dimse import (
    STORAGE_SOP_CLASSES,
    AllowedPeer,
    DimseServer,
    is_allowed,
    parse_allowed,
)
from app.pacs.dimse_node import DimseProcess, dimse_server_from_settings
from app.pacs.intake import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    AcceptResult,
    IntakeUnavailable,
)
from app.settings import Settings, SettingsError
from tests.deploy.helpers import free_port
from tests.pacs.sources import CT_IMAGE, DX_PRESENTATION, ct_path, dx_dataset, part10

AE = "MEDSERVE"


@dataclass
class RecordingIntake:
    """Records what the SCP hands over; answers ``refuse`` (a failure reason) or ``unavailable`` instead."""

    refuse: int | None = None
    unavailable: bool = False
    received: list[tuple[bytes, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accept_bytes(
        self, data: bytes, source: str, *, study_instance_uid: str | None = None
    ) -> AcceptResult:
        if self.unavailable:
            raise IntakeUnavailable("models are still loading")
        dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        uid = str(dataset.SOPInstanceUID)
        if self.refuse is not None:
            return AcceptResult(
                accepted=False, sop_instance_uid=uid, failure_reason=self.refuse, detail="refused"
            )
        with self.lock:
            self.received.append((data, source))
        return AcceptResult(
            accepted=True, sop_instance_uid=uid, sop_class_uid=str(dataset.SOPClassUID), job_ids=[1]
        )


@pytest.fixture
def intake() -> RecordingIntake:
    return RecordingIntake()


def start_scp(intake: RecordingIntake | None, allowed: str) -> DimseServer:
    server = DimseServer(
        lambda: intake,
        ae_title=AE,
        port=free_port(),
        host="127.0.0.1",
        allowed=parse_allowed(allowed),
        timeout_s=10.0,
    )
    server.start()
    return server


@pytest.fixture
def scp(intake: RecordingIntake) -> Iterator[DimseServer]:
    server = start_scp(intake, "MODALITY@127.0.0.1, ORTHANC@localhost")
    try:
        yield server
    finally:
        server.stop()


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def echo(
    dcmtk: dict[str, str], server: DimseServer, calling: str, called: str = AE
) -> subprocess.CompletedProcess[str]:
    return run([dcmtk["echoscu"], "-aet", calling, "-aec", called, "127.0.0.1", str(server.port)])


def store(
    dcmtk: dict[str, str], server: DimseServer, files: list[Path], calling: str = "MODALITY"
) -> subprocess.CompletedProcess[str]:
    return run(
        [
            dcmtk["storescu"],
            "-v",
            "-aet",
            calling,
            "-aec",
            AE,
            "127.0.0.1",
            str(server.port),
            *map(str, files),
        ]
    )


def test_an_allowed_caller_echoes(dcmtk: dict[str, str], scp: DimseServer) -> None:
    result = echo(dcmtk, scp, "MODALITY")
    assert result.returncode == 0, result.stdout + result.stderr
    # a host name in the list is resolved: ORTHANC@localhost admits 127.0.0.1
    assert echo(dcmtk, scp, "ORTHANC").returncode == 0


@pytest.mark.parametrize("calling", ["STRANGER", "modality", "MODALITY2"])
def test_an_unknown_calling_ae_is_rejected(dcmtk: dict[str, str], scp: DimseServer, calling: str) -> None:
    result = echo(dcmtk, scp, calling)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Association Rejected" in output
    assert "Calling AE Title Not Recognized" in output
    assert "Rejected Permanent" in output


def test_an_allowed_title_from_another_host_is_rejected(
    dcmtk: dict[str, str], intake: RecordingIntake
) -> None:
    server = start_scp(intake, "MODALITY@192.0.2.10")  # TEST-NET-1: not this machine
    try:
        result = echo(dcmtk, server, "MODALITY")
        assert result.returncode != 0
        assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    finally:
        server.stop()


def test_an_empty_allow_list_refuses_everyone(dcmtk: dict[str, str], intake: RecordingIntake) -> None:
    server = start_scp(intake, "")
    try:
        for calling in ("MODALITY", "STORESCU", "ANY"):
            assert (
                "Association Rejected"
                in echo(dcmtk, server, calling).stdout + echo(dcmtk, server, calling).stderr
            )
    finally:
        server.stop()


def test_the_wrong_called_ae_is_rejected(dcmtk: dict[str, str], scp: DimseServer) -> None:
    result = echo(dcmtk, scp, "MODALITY", called="OTHER")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr


def test_a_ct_and_a_dx_are_stored_and_reach_the_intake(
    dcmtk: dict[str, str], scp: DimseServer, intake: RecordingIntake, tmp_path: Path
) -> None:
    dx = dx_dataset()
    dx_file = tmp_path / "dx.dcm"
    dx_file.write_bytes(part10(dx))
    result = store(dcmtk, scp, [ct_path(), dx_file])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("Received Store Response (Success)") == 2
    received = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)) for data, _ in intake.received]
    assert [source for _, source in intake.received] == ["dimse", "dimse"]
    assert sorted(str(ds.SOPClassUID) for ds in received) == sorted([CT_IMAGE, DX_PRESENTATION])
    by_class = {str(ds.SOPClassUID): ds for ds in received}
    ct = pydicom.dcmread(ct_path())
    assert by_class[CT_IMAGE].SOPInstanceUID == ct.SOPInstanceUID
    assert by_class[CT_IMAGE].PixelData == ct.PixelData
    assert by_class[DX_PRESENTATION].SOPInstanceUID == dx.SOPInstanceUID
    assert by_class[DX_PRESENTATION].PixelData == dx.PixelData
    assert by_class[DX_PRESENTATION].file_meta.TransferSyntaxUID in (
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
    )
    assert scp.stored == 2


def test_an_unsupported_sop_class_is_refused(
    dcmtk: dict[str, str], scp: DimseServer, intake: RecordingIntake
) -> None:
    rtdose = get_testdata_file("rtdose.dcm")
    assert isinstance(rtdose, str)
    result = store(dcmtk, scp, [Path(rtdose)])
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # the association was accepted for the other contexts storescu proposed, not for RT Dose
    assert "No valid Presentation Context ID" in output, output
    assert "Received Store Response" not in output
    assert intake.received == []


def test_the_context_of_an_unsupported_sop_class_is_rejected_in_negotiation(scp: DimseServer) -> None:
    from pynetdicom import AE as PynetdicomAE

    ae = PynetdicomAE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.481.2")  # RT Dose Storage
    ae.add_requested_context(CT_IMAGE)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=AE)
    try:
        assert assoc.is_established
        rejected = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
        assert rejected == {"1.2.840.10008.5.1.4.1.1.481.2": 0x03}  # abstract syntax not supported
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [CT_IMAGE]
    finally:
        assoc.release()
        ae.shutdown()


def pynetdicom_store(server: DimseServer, dataset_bytes: bytes) -> int:
    """The status code of one C-STORE by pynetdicom as the SCU."""
    from pynetdicom import AE as PynetdicomAE

    dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dataset_bytes))
    ae = PynetdicomAE(ae_title="MODALITY")
    ae.add_requested_context(str(dataset.SOPClassUID), [str(dataset.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", server.port, ae_title=AE)
    try:
        assert assoc.is_established
        status = assoc.send_c_store(dataset)
        return int(status.Status)
    finally:
        assoc.release()
        ae.shutdown()


@pytest.mark.parametrize(
    ("refuse", "unavailable", "code", "words"),
    [
        (OUT_OF_RESOURCES, False, 0xA700, "refused: outofresources"),
        (CANNOT_UNDERSTAND, False, 0xC000, "error: cannotunderstand"),
        (PROCESSING_FAILURE, False, 0xC001, "error: cannotunderstand"),
        (None, True, 0xA700, "refused: outofresources"),
    ],
)
def test_intake_refusals_become_c_store_statuses(
    dcmtk: dict[str, str], refuse: int | None, unavailable: bool, code: int, words: str
) -> None:
    intake = RecordingIntake(refuse=refuse, unavailable=unavailable)
    server = start_scp(intake, "MODALITY@127.0.0.1")
    try:
        result = store(dcmtk, server, [ct_path()])
        output = (result.stdout + result.stderr).lower()
        assert f"received store response ({words})" in output, output
        assert pynetdicom_store(server, ct_path().read_bytes()) == code
        assert server.stored == 0 and intake.received == []
    finally:
        server.stop()


def test_without_an_intake_stores_are_out_of_resources(dcmtk: dict[str, str]) -> None:
    server = start_scp(None, "MODALITY@127.0.0.1")
    try:
        result = store(dcmtk, server, [ct_path()])
        assert "received store response (refused: outofresources)" in (result.stdout + result.stderr).lower()
    finally:
        server.stop()


def test_the_allow_list_parses_and_refuses_bad_entries() -> None:
    fake = {"pacs": frozenset({"10.0.0.5"}), "127.0.0.1": frozenset({"127.0.0.1"})}
    peers = parse_allowed(" ORTHANC@pacs ,MOD@127.0.0.1,, ANY@* ", resolve=lambda host: fake[host])
    assert peers == [
        AllowedPeer("ORTHANC", "pacs", frozenset({"10.0.0.5"})),
        AllowedPeer("MOD", "127.0.0.1", frozenset({"127.0.0.1"})),
        AllowedPeer("ANY", "*", frozenset()),
    ]
    assert is_allowed(peers, "ORTHANC", "10.0.0.5")
    assert not is_allowed(peers, "ORTHANC", "127.0.0.1")
    assert is_allowed(peers, "ANY", "203.0.113.9")
    assert not is_allowed(peers, "MOD", "10.0.0.5")
    assert not is_allowed([], "MOD", "127.0.0.1")
    for bad in ("ORTHANC", "@host", "AE@", "SEVENTEEN_CHARS_AE@host"):
        with pytest.raises(SettingsError, match="MEDSERVE_DIMSE_ALLOWED"):
            parse_allowed(bad, resolve=lambda host: frozenset())
    with pytest.raises(SettingsError, match="does not resolve"):
        parse_allowed("AE@no-such-host.invalid")


def test_the_settings_make_the_server() -> None:
    assert dimse_server_from_settings(Settings(), lambda: None) is None
    server = dimse_server_from_settings(
        Settings(dimse_port=11112, dimse_ae_title="AI", dimse_allowed="PACS@127.0.0.1"), lambda: None
    )
    assert server is not None and not server.running
    assert (server.ae_title, server.port, [p.ae_title for p in server.allowed]) == ("AI", 11112, ["PACS"])
    assert Settings().dimse_ae_title == "MEDSERVE"


def test_the_sop_classes_cover_the_issue() -> None:
    names = set(STORAGE_SOP_CLASSES)
    for wanted in (
        "ComputedRadiographyImageStorage",
        "DigitalXRayImageStorageForPresentation",
        "DigitalXRayImageStorageForProcessing",
        "DigitalMammographyXRayImageStorageForPresentation",
        "DigitalIntraOralXRayImageStorageForPresentation",
        "CTImageStorage",
        "MRImageStorage",
        "EnhancedMRImageStorage",
        "SecondaryCaptureImageStorage",
        "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    ):
        assert wanted in names
    from pynetdicom import sop_class

    for name, uid in STORAGE_SOP_CLASSES.items():
        assert getattr(sop_class, name) == uid


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_service_lifespan_starts_and_stops_the_node(dcmtk: dict[str, str], tmp_path: Path) -> None:
    from tests.app.helpers import save_pixel_model, serve, settings

    save_pixel_model(tmp_path / "pixel.pt")
    port = free_port()
    config = settings(tmp_path, dimse_port=port, dimse_host="127.0.0.1", dimse_allowed="ECHOSCU@127.0.0.1")
    async with serve(config) as (app, _client):
        node: DimseProcess = app.state.dimse
        assert node.running and node.port == port and node.ae_title == "MEDSERVE"
        ok = run([dcmtk["echoscu"], "-aet", "ECHOSCU", "-aec", "MEDSERVE", "127.0.0.1", str(port)])
        assert ok.returncode == 0, ok.stdout + ok.stderr
        stranger = run([dcmtk["echoscu"], "-aet", "STRANGER", "-aec", "MEDSERVE", "127.0.0.1", str(port)])
        assert "Calling AE Title Not Recognized" in stranger.stdout + stranger.stderr
    assert not node.running
    after = run([dcmtk["echoscu"], "-to", "5", "-aet", "ECHOSCU", "-aec", "MEDSERVE", "127.0.0.1", str(port)])
    assert after.returncode != 0  # nobody listens any more


@pytest.mark.anyio
async def test_without_a_port_there_is_no_node(tmp_path: Path) -> None:
    from tests.app.helpers import save_pixel_model, serve, settings

    save_pixel_model(tmp_path / "pixel.pt")
    async with serve(settings(tmp_path)) as (app, _client):
        assert app.state.dimse is None


@pytest.mark.anyio
async def test_a_dicom_port_in_use_stops_the_start_naming_the_setting(tmp_path: Path) -> None:
    from tests.app.helpers import save_pixel_model, serve, settings

    save_pixel_model(tmp_path / "pixel.pt")
    holder = start_scp(RecordingIntake(), "")
    try:
        config = settings(tmp_path, dimse_port=holder.port, dimse_host="127.0.0.1")
        with pytest.raises(SettingsError, match=f"MEDSERVE_DIMSE_PORT={holder.port}: cannot listen"):
            async with serve(config):
                pass
    finally:
        holder.stop()


@pytest.mark.anyio
async def test_with_several_workers_the_port_goes_to_the_first(
    dcmtk: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.app.helpers import save_pixel_model, serve, settings

    save_pixel_model(tmp_path / "pixel.pt")
    port = free_port()
    config = settings(
        tmp_path, dimse_port=port, dimse_host="127.0.0.1", dimse_allowed="ECHOSCU@127.0.0.1", workers=2
    )
    async with serve(config) as (first, _client):
        assert first.state.dimse.running
        async with serve(config) as (second, _other):  # another worker of the same service
            assert not second.state.dimse.running
            assert "is held by another worker of this service" in caplog.text
            ok = run([dcmtk["echoscu"], "-aet", "ECHOSCU", "-aec", "MEDSERVE", "127.0.0.1", str(port)])
            assert ok.returncode == 0  # the first worker answers
