"""Delivery error classification against a scripted HTTP archive and a closed port (no Orthanc needed)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app.pacs.delivery import (
    CStoreDelivery,
    DimseDestination,
    StowDelivery,
    delivery_from_settings,
    stow_failure_meaning,
)
from app.pacs.results import PermanentDeliveryError, ResultObject, TransientDeliveryError
from app.settings import Settings, SettingsError, load_settings
from tests.deploy.helpers import free_port
from tests.pacs.sources import ct_dataset, part10


def ct_bytes() -> bytes:
    return part10(ct_dataset())


@dataclass
class Script:
    """What the scripted archive answers next: status, headers, body, and a delay before answering."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/dicom+json"
    delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)


def failed_sop_json(code: int) -> bytes:
    return json.dumps(
        {
            "00081198": {
                "vr": "SQ",
                "Value": [
                    {
                        "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                        "00081155": {"vr": "UI", "Value": ["1.2.3.4"]},
                        "00081197": {"vr": "US", "Value": [code]},
                    }
                ],
            }
        }
    ).encode()


@pytest.fixture
def archive() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            script.requests.append(
                {"path": self.path, "headers": dict(self.headers), "size": len(body), "body": body[:4000]}
            )
            if script.delay_s:
                time.sleep(script.delay_s)
            self.send_response(script.status)
            self.send_header("content-type", script.content_type)
            self.send_header("content-length", str(len(script.body)))
            self.end_headers()
            self.wfile.write(script.body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", script
    finally:
        server.shutdown()
        server.server_close()


def test_success_posts_multipart_to_the_source_study(archive: tuple[str, Script]) -> None:
    url, script = archive
    StowDelivery(url, username="medserve", password="s3cret").deliver_bytes(ct_bytes())
    (request,) = script.requests
    study = ct_dataset().StudyInstanceUID
    assert request["path"] == f"/dicom-web/studies/{study}"
    assert request["headers"]["Content-Type"].startswith('multipart/related; type="application/dicom"')
    assert request["headers"]["Authorization"].startswith("Basic ")
    assert b"DICM" in request["body"]


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
def test_server_errors_and_throttling_are_transient(archive: tuple[str, Script], status: int) -> None:
    url, script = archive
    script.status, script.body = status, b'{"Message": "busy"}'
    with pytest.raises(TransientDeliveryError, match=f"HTTP {status}.*busy"):
        StowDelivery(url).deliver_bytes(ct_bytes())
    assert len(script.requests) == 1  # dicomweb-client's own retries are off: the policy decides


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 415])
def test_client_errors_are_permanent_with_the_archive_reason(
    archive: tuple[str, Script], status: int
) -> None:
    url, script = archive
    script.status = status
    script.content_type = "application/json"
    script.body = json.dumps({"Message": "Bad request", "Details": "the archive says no"}).encode()
    with pytest.raises(PermanentDeliveryError, match=f"HTTP {status}.*the archive says no"):
        StowDelivery(url).deliver_bytes(ct_bytes())


def test_a_plain_text_reason_is_kept_and_shortened(archive: tuple[str, Script]) -> None:
    url, script = archive
    script.status, script.content_type, script.body = 422, "text/plain", b"policy: " + b"x" * 2000
    with pytest.raises(PermanentDeliveryError) as caught:
        StowDelivery(url).deliver_bytes(ct_bytes())
    text = str(caught.value)
    assert "HTTP 422" in text and "policy:" in text and len(text) < 400


def test_failed_sop_sequence_in_a_4xx_answer_names_the_reason(archive: tuple[str, Script]) -> None:
    url, script = archive
    script.status, script.body = 409, failed_sop_json(0xA900)
    with pytest.raises(PermanentDeliveryError, match=r"1\.2\.3\.4 failed \(0xA900: data set does not match"):
        StowDelivery(url).deliver_bytes(ct_bytes())


def test_failed_sop_sequence_in_a_200_answer_is_a_failure(archive: tuple[str, Script]) -> None:
    url, script = archive
    script.status, script.body = 200, failed_sop_json(0xC000)
    with pytest.raises(PermanentDeliveryError, match="0xC000: cannot understand"):
        StowDelivery(url).deliver_bytes(ct_bytes())
    script.body = failed_sop_json(0xA700)  # out of resources: may work later
    with pytest.raises(TransientDeliveryError, match="0xA700: out of resources"):
        StowDelivery(url).deliver_bytes(ct_bytes())


def test_an_archive_that_does_not_answer_in_time_is_transient(archive: tuple[str, Script]) -> None:
    url, script = archive
    script.delay_s = 2.0
    with pytest.raises(TransientDeliveryError, match=r"did not answer within 0\.2 s"):
        StowDelivery(url, timeout_s=0.2).deliver_bytes(ct_bytes())


def test_a_refused_connection_is_transient() -> None:
    with pytest.raises(TransientDeliveryError, match=r"cannot reach the archive.*connection refused"):
        StowDelivery(f"http://127.0.0.1:{free_port()}/dicom-web").deliver_bytes(ct_bytes())
    destination = DimseDestination("PACS", "127.0.0.1", free_port())
    with pytest.raises(TransientDeliveryError, match=r"PACS@127\.0\.0\.1"):
        CStoreDelivery(destination, timeout_s=2.0).deliver_bytes(ct_bytes())


def test_bytes_that_are_not_dicom_fail_permanently_without_a_request(archive: tuple[str, Script]) -> None:
    url, script = archive
    with pytest.raises(PermanentDeliveryError, match="not a readable DICOM object"):
        StowDelivery(url).deliver_bytes(b"\x89PNG\r\n\x1a\n not dicom")
    assert script.requests == []


def test_destinations_parse_and_refuse_bad_forms() -> None:
    assert DimseDestination.parse("ORTHANC@pacs.local:4242") == DimseDestination(
        "ORTHANC", "pacs.local", 4242
    )
    assert str(DimseDestination.parse(" A@10.0.0.1:104 ")) == "A@10.0.0.1:104"
    for bad in (
        "ORTHANC",
        "ORTHANC@host",
        "@host:104",
        "A@host:0",
        "A@host:70000",
        "WAY_TOO_LONG_AE_TITLE@h:1",
    ):
        with pytest.raises(ValueError):
            DimseDestination.parse(bad)


def test_the_settings_choose_the_transport() -> None:
    assert delivery_from_settings(Settings()) is None
    stow = delivery_from_settings(Settings(pacs_url="http://pacs:8042/dicom-web/", pacs_username="u"))
    assert isinstance(stow, StowDelivery)
    assert stow.describe() == "STOW-RS http://pacs:8042/dicom-web" and stow.auth == ("u", "")
    both = delivery_from_settings(
        Settings(
            pacs_url="http://pacs:8042/dicom-web", dimse_destination="PACS@pacs:104", dimse_ae_title="AI"
        )
    )
    assert isinstance(both, CStoreDelivery)  # DIMSE_DESTINATION: "instead" of STOW-RS
    assert both.describe() == "C-STORE PACS@pacs:104" and both.calling_ae == "AI"
    with pytest.raises(SettingsError, match="MEDSERVE_DIMSE_DESTINATION"):
        load_settings(dimse_destination="pacs:104")


def test_status_meanings() -> None:
    assert stow_failure_meaning(0xA7FE) == "out of resources"
    assert stow_failure_meaning(0xC123).startswith("the study instance UID")
    assert stow_failure_meaning(0xC0FF) == "cannot understand"
    assert stow_failure_meaning(None) == "unknown"


def test_the_worker_sink_is_the_folder_then_the_archive(tmp_path: Path) -> None:
    from app.pacs.results import FolderSink
    from app.pacs.spool import Spool
    from app.pacs.worker import select_sink

    spool = Spool(tmp_path / "spool")
    default = select_sink(Settings(), spool)
    assert isinstance(default, FolderSink) and default.folder == spool.root / "results-out"
    stow = select_sink(Settings(pacs_url="http://pacs:8042/dicom-web"), spool)
    assert isinstance(stow, StowDelivery)
    cstore = select_sink(
        Settings(pacs_url="http://pacs:8042/dicom-web", dimse_destination="PACS@pacs:104"), spool
    )
    assert isinstance(cstore, CStoreDelivery)
    folder = select_sink(
        Settings(pacs_url="http://pacs:8042/dicom-web", results_dir=tmp_path / "review"), spool
    )
    assert isinstance(folder, FolderSink) and folder.folder == tmp_path / "review"


def results(n: int) -> list[ResultObject]:
    data = ct_bytes()
    study = str(ct_dataset().StudyInstanceUID)
    return [
        ResultObject(
            part10=data,
            kind="seg",
            study_instance_uid=study,
            series_instance_uid="1.2.3",
            sop_instance_uid=f"1.2.3.4.{i}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
            job_id=i,
            model="m",
        )
        for i in range(n)
    ]


def stow_answer(referenced: list[str], failed: dict[str, int]) -> bytes:
    def item(uid: str, code: int | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
        if code is not None:
            entry["00081197"] = {"vr": "US", "Value": [code]}
        return entry

    answer: dict[str, Any] = {}
    if referenced:
        answer["00081199"] = {"vr": "SQ", "Value": [item(uid) for uid in referenced]}
    if failed:
        answer["00081198"] = {"vr": "SQ", "Value": [item(uid, code) for uid, code in failed.items()]}
    return json.dumps(answer).encode()


def test_several_results_of_a_study_go_in_one_request(archive: tuple[str, Script]) -> None:
    url, script = archive
    sent = results(3)
    script.body = stow_answer([r.sop_instance_uid for r in sent], {})
    assert StowDelivery(url).deliver_many(sent) == [None, None, None]
    (request,) = script.requests
    assert request["path"] == f"/dicom-web/studies/{sent[0].study_instance_uid}"
    boundary = request["headers"]["Content-Type"].split("boundary=")[1]
    assert request["size"] > 3 * len(sent[0].part10)
    assert request["body"].count(f"--{boundary}".encode()) >= 1


def test_a_part_refused_in_a_partial_answer_fails_alone(archive: tuple[str, Script]) -> None:
    url, script = archive
    sent = results(4)
    uids = [r.sop_instance_uid for r in sent]
    script.status = 202
    script.body = stow_answer([uids[0], uids[3]], {uids[1]: 0xC000, uids[2]: 0xA700})
    errors = StowDelivery(url).deliver_many(sent)
    assert errors[0] is None and errors[3] is None
    assert isinstance(errors[1], PermanentDeliveryError)
    assert errors[1].reason == f"STOW-RS answered {uids[1]} failed (0xC000: cannot understand)"
    assert isinstance(errors[2], TransientDeliveryError)  # out of resources: may work later
    assert errors[2].reason == f"STOW-RS answered {uids[2]} failed (0xA700: out of resources)"
    assert len(script.requests) == 1


def test_an_error_answer_fails_every_part_it_does_not_list_as_stored(archive: tuple[str, Script]) -> None:
    url, script = archive
    sent = results(2)
    script.status, script.body = 409, stow_answer([], {sent[0].sop_instance_uid: 0xA900})
    first, second = StowDelivery(url).deliver_many(sent)
    assert isinstance(first, PermanentDeliveryError) and isinstance(second, PermanentDeliveryError)
    assert first.reason == (
        f"STOW-RS answered HTTP 409 Conflict: {sent[0].sop_instance_uid} failed "
        "(0xA900: data set does not match SOP class)"
    )
    assert second.reason.startswith("STOW-RS answered HTTP 409")
    script.status, script.body = 503, b'{"Message": "busy"}'
    assert all(isinstance(e, TransientDeliveryError) for e in StowDelivery(url).deliver_many(sent))
    # a 2xx answer that lists what it stored, without this one: not known to be stored, so tried again
    script.status, script.body = 200, stow_answer([sent[0].sop_instance_uid], {})
    stored, unknown = StowDelivery(url).deliver_many(sent)
    assert stored is None and isinstance(unknown, TransientDeliveryError)


def test_results_of_several_studies_go_in_a_request_each(archive: tuple[str, Script]) -> None:
    url, script = archive
    first, second = results(2)
    second = ResultObject(**{**vars(second), "study_instance_uid": "1.2.3.77"})
    not_dicom = ResultObject(**{**vars(first), "part10": b"not dicom", "sop_instance_uid": "1.2.3.9"})
    outcomes = StowDelivery(url).deliver_many([first, second, not_dicom])
    assert outcomes[:2] == [None, None]
    assert isinstance(outcomes[2], PermanentDeliveryError)
    assert sorted(r["path"] for r in script.requests) == sorted(
        [f"/dicom-web/studies/{first.study_instance_uid}", "/dicom-web/studies/1.2.3.77"]
    )


def test_a_refused_connection_fails_every_part_transiently() -> None:
    outcomes = StowDelivery(f"http://127.0.0.1:{free_port()}/dicom-web").deliver_many(results(2))
    assert all(isinstance(e, TransientDeliveryError) and "connection refused" in e.reason for e in outcomes)
