"""Durability with real processes: MedServe (``python -m training serve``) delivering to a real Orthanc.

(a) 100 instances accepted by STOW-RS, the service SIGKILLed while it works through them, started again on the
    same job store and spool: Orthanc ends up holding exactly 100 results, one per instance.
(b) Orthanc stopped for 30 s while results are being delivered (10 stored, 20 to go): every result arrives
    once it is back (the worker retried with backoff), none is lost, none failed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from models.dicom_uids import result_instance_uid
from tests.pacs.flows import MedServeProcess, save_tiny_unet, wait_for
from tests.pacs.orthanc import Orthanc, orthanc_server
from tests.pacs.sources import SEG_STORAGE, ct_dataset, part10, with_new_uids

pytestmark = pytest.mark.slow

OUTAGE_S = 30.0  # the outage; the test asserts on what arrives, not on how fast


def ct_instances(count: int) -> list[bytes]:
    """``count`` CT instances of one study and series (pydicom's CT with new SOP Instance UIDs)."""
    base = ct_dataset()
    return [part10(with_new_uids(base, index)) for index in range(count)]


def source_uids(parts: list[bytes]) -> list[str]:
    return [
        str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(p), stop_before_pixels=True).SOPInstanceUID)
        for p in parts
    ]


def result_uids_in(orthanc: Orthanc) -> list[str]:
    """The SOP Instance UIDs of the SEGs Orthanc holds, one entry per stored instance."""
    return orthanc.sop_instance_uids(SEG_STORAGE)


def count_in(orthanc: Orthanc) -> int:
    try:
        return len(orthanc.instances()) if orthanc.running else -1
    except Exception:
        return -1


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with orthanc_server(tmp_path / "orthanc") as server:
        yield server


def medserve(tmp_path: Path, orthanc: Orthanc, **env: str) -> MedServeProcess:
    settings = {
        "MEDSERVE_PACS_URL": orthanc.dicomweb_url,
        "MEDSERVE_JOBS_LEASE_S": "3",
        "MEDSERVE_JOBS_CONCURRENCY": "4",
        "MEDSERVE_MAX_BATCH_SIZE": "4",
        "MEDSERVE_DELIVERY_TIMEOUT_S": "10",
        **env,
    }
    return MedServeProcess(tmp_path / "medserve", save_tiny_unet(tmp_path / "models"), env=settings)


def accept_all(service: MedServeProcess, parts: list[bytes], per_request: int = 25) -> None:
    for start in range(0, len(parts), per_request):
        response = service.stow(parts[start : start + per_request])
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["00081199"]["Value"]) == len(
            parts[start : start + per_request]
        )  # ReferencedSOPSequence


def expected_results(jobs: list[dict[str, Any]], sources: list[str]) -> set[str]:
    (version,) = {job["model_version"] for job in jobs}
    return {result_instance_uid(uid, version, "seg") for uid in sources}


def test_sigkill_in_the_middle_leaves_exactly_one_result_per_instance(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    parts = ct_instances(100)
    sources = source_uids(parts)
    service = medserve(tmp_path, orthanc)
    service.start()
    try:
        accept_all(service, parts)
        wait_for(
            lambda: count_in(orthanc) >= 1, "a first result in Orthanc", log=service.output, every_s=0.02
        )
        service.kill()
        delivered_before_kill = count_in(orthanc)
        assert 1 <= delivered_before_kill < 100, "the kill came after all the work: nothing to recover"
        service.start()  # the same job store and spool
        wait_for(lambda: count_in(orthanc) >= 100, "100 results in Orthanc", log=service.output)
        wait_for(
            lambda: len(service.jobs(state="done")) == 100,
            "100 jobs done",
            log=service.output,
        )
        jobs = service.jobs()
    finally:
        service.stop()
    stored = result_uids_in(orthanc)
    assert len(stored) == 100 == len(orthanc.instances())
    assert set(stored) == expected_results(jobs, sources)  # one result per source, no other object
    assert len(jobs) == 100 and {job["state"] for job in jobs} == {"done"}
    assert sorted(job["sop_instance_uid"] for job in jobs) == sorted(sources)


def test_an_archive_outage_delays_results_but_loses_none(tmp_path: Path, orthanc: Orthanc) -> None:
    parts = ct_instances(30)
    sources = source_uids(parts)
    service = medserve(
        tmp_path,
        orthanc,
        MEDSERVE_DELIVERY_BACKOFF_S="0.5",
        MEDSERVE_DELIVERY_BACKOFF_MAX_S="4",
        MEDSERVE_DELIVERY_MAX_ATTEMPTS="100",
    )
    service.start()
    try:
        # delivery under way: the first 10 results are in Orthanc when it goes away, the other 20 are not
        accept_all(service, parts[:10], per_request=10)
        wait_for(lambda: count_in(orthanc) == 10, "the first 10 results in Orthanc", log=service.output)
        orthanc.stop()
        stopped_at = time.monotonic()
        accept_all(service, parts[10:], per_request=20)
        wait_for(
            lambda: any(job["attempts"] >= 2 for job in service.jobs(state="delivering")),
            "a delivery retried while Orthanc is down",
            log=service.output,
        )
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
        during = service.jobs()
        assert not [job for job in during if job["state"] == "failed"], "a job failed during the outage"
        assert len([job for job in during if job["state"] == "done"]) == 10
        orthanc.start()  # the same ports and storage
        wait_for(lambda: len(service.jobs(state="done")) == 30, "30 jobs done", log=service.output)
        jobs = service.jobs()
    finally:
        service.stop()
    stored = result_uids_in(orthanc)
    assert len(stored) == 30 == len(orthanc.instances())
    assert set(stored) == expected_results(jobs, sources)
    assert {job["state"] for job in jobs} == {"done"}
    retried = [job for job in jobs if job["attempts"] >= 2]
    assert len(retried) == 20  # every result of the outage was retried until it was stored


def test_an_archive_that_refuses_fails_the_job_with_its_reason_once(tmp_path: Path) -> None:
    with orthanc_server(tmp_path / "orthanc", user=("medserve", "right-password")) as orthanc:
        service = medserve(
            tmp_path, orthanc, MEDSERVE_PACS_USERNAME="medserve", MEDSERVE_PACS_PASSWORD="wrong-password"
        )
        service.start()
        try:
            accept_all(service, ct_instances(2), per_request=2)
            wait_for(lambda: len(service.jobs(state="failed")) == 2, "2 jobs failed", log=service.output)
            time.sleep(2.0)  # were it retried, its attempts would grow (backoff 1 s)
            jobs = service.jobs()
        finally:
            service.stop()
        assert orthanc.instances() == []
    assert [job["state"] for job in jobs] == ["failed", "failed"]
    for job in jobs:
        assert job["attempts"] == 1  # a 4xx is not retried
        assert "HTTP 401 Unauthorized" in job["reason"], job["reason"]
        assert "wrong-password" not in job["reason"]
