"""STOW-RS into the job system and the jobs that follow, in process: a real SQLite store, spool and folder sink."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from app.pacs.intake import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, STUDY_MISMATCH
from app.pacs.results import read_delivery_log
from models.dicom_uids import result_instance_uid, result_series_uid
from tests.app.helpers import assert_problem, decode_png, serve, settings
from tests.app.pacs.helpers import (
    failure_reasons,
    instance,
    pacs_settings,
    sequence_uids,
    spool_files,
    stow,
    stow_body,
    wait_for_jobs,
)
from tests.app.test_dicom_api import seg_of
from tests.models.test_dicom import MPEG4_AVC, PATIENT_NAME, to_bytes

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore::UserWarning:pydicom", "ignore::UserWarning:highdicom"),
]
REFERENCED, FAILED = "00081199", "00081198"
DICOM = {"content-type": "application/dicom"}


async def test_a_stored_instance_becomes_a_seg_equal_to_the_png_mask_of_segment(
    pixel_dir: Path, tmp_path: Path
) -> None:
    ds = instance(1)
    async with serve(settings(pixel_dir, **pacs_settings(tmp_path))) as (_, client):
        response = await stow(client, [to_bytes(ds)])
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/dicom+json"
        assert sequence_uids(response.json(), REFERENCED) == [ds.SOPInstanceUID]
        assert FAILED not in response.json()
        (job,) = await wait_for_jobs(client, {"done"}, 1)
        png = await client.post("/segment", content=to_bytes(ds), headers=DICOM)
    assert job["model"] == "pixel" and job["source"] == "stow" and job["attempts"] == 1
    assert job["state"] == "done" and job["reason"] is None and job["result_kind"] == "seg"
    uid = result_instance_uid(ds.SOPInstanceUID, job["model_version"], "seg")
    assert job["result_sop_instance_uid"] == uid
    assert [(entry[0], entry[1]) for entry in read_delivery_log(tmp_path / "results")] == [(job["id"], uid)]
    data = (tmp_path / "results" / f"{uid}.dcm").read_bytes()
    seg, labels = seg_of(data, ds)
    assert seg.SOPInstanceUID == uid and seg.file_meta.MediaStorageSOPInstanceUID == uid
    assert seg.SeriesInstanceUID == result_series_uid(
        ds.SeriesInstanceUID, "pixel", job["model_version"], "seg"
    )
    assert seg.StudyInstanceUID == ds.StudyInstanceUID  # the result joins the source study
    expected = decode_png(png.content)
    assert 0 < expected.mean() < 255
    np.testing.assert_array_equal(np.where(labels > 0, 255, 0), expected)


async def test_one_bad_part_fails_alone_and_the_status_says_how_many_were_kept(
    pixel_dir: Path, tmp_path: Path
) -> None:
    good, other = instance(1), instance(2)
    truncated = to_bytes(instance(3))[:-200]
    async with serve(settings(pixel_dir, **pacs_settings(tmp_path))) as (_, client):
        mixed = await stow(client, [to_bytes(good), b"not dicom at all", truncated, to_bytes(other)])
        none = await stow(client, [b"\x00" * 300, (to_bytes(instance(4)), "image/png")])
        await wait_for_jobs(client, {"done"}, 2)
        assert await spool_files(tmp_path / "spool" / "instances") == []  # done: deleted (retention 0)
        assert await spool_files(tmp_path / "spool" / "results") == []
    assert mixed.status_code == 202, mixed.text
    assert sequence_uids(mixed.json(), REFERENCED) == [good.SOPInstanceUID, other.SOPInstanceUID]
    assert failure_reasons(mixed.json()) == [CANNOT_UNDERSTAND, CANNOT_UNDERSTAND]
    assert none.status_code == 409 and none.headers["content-type"] == "application/dicom+json"
    assert REFERENCED not in none.json() and failure_reasons(none.json()) == [CANNOT_UNDERSTAND] * 2


def damaged(data: bytes) -> bytes:
    """``data`` with a 3-byte Pixel Representation (a US value is 2 bytes): it reads, but cannot be converted."""
    element = b"\x28\x00\x03\x01US\x02\x00"
    at = data.index(element)
    return data[:at] + b"\x28\x00\x03\x01US\x03\x00" + data[at + 8 : at + 10] + b"\x00" + data[at + 10 :]


async def test_an_instance_with_a_damaged_element_is_refused_at_once(pixel_dir: Path, tmp_path: Path) -> None:
    good, broken = instance(1), instance(2)
    async with serve(settings(pixel_dir, **pacs_settings(tmp_path))) as (_, client):
        response = await stow(client, [to_bytes(good), damaged(to_bytes(broken))])
        jobs = await wait_for_jobs(client, {"done"}, 1)
    assert response.status_code == 202
    assert sequence_uids(response.json(), REFERENCED) == [good.SOPInstanceUID]
    assert failure_reasons(response.json()) == [CANNOT_UNDERSTAND]
    assert [job["sop_instance_uid"] for job in jobs] == [good.SOPInstanceUID]


async def test_the_study_url_refuses_instances_of_other_studies(pixel_dir: Path, tmp_path: Path) -> None:
    study = pydicom.uid.generate_uid()
    mine, foreign = instance(1, study=study), instance(2)
    async with serve(settings(pixel_dir, **pacs_settings(tmp_path))) as (_, client):
        response = await stow(client, [to_bytes(mine), to_bytes(foreign)], url=f"/dicomweb/studies/{study}")
        jobs = await wait_for_jobs(client, {"done"}, 1)
    assert response.status_code == 202
    assert sequence_uids(response.json(), REFERENCED) == [mine.SOPInstanceUID]
    assert sequence_uids(response.json(), FAILED) == [foreign.SOPInstanceUID]
    assert failure_reasons(response.json()) == [STUDY_MISMATCH]
    assert [job["study_instance_uid"] for job in jobs] == [study]


async def test_multi_frame_and_unsupported_syntax_are_accepted_and_their_jobs_fail_with_the_reason(
    pixel_dir: Path, tmp_path: Path
) -> None:
    frames = instance(1, NumberOfFrames=2)
    frames.PixelData = frames.PixelData * 2
    video = instance(2, transfer_syntax=MPEG4_AVC)
    video.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    video["PixelData"].VR = "OB"
    async with serve(settings(pixel_dir, **pacs_settings(tmp_path))) as (_, client):
        response = await stow(client, [to_bytes(frames), to_bytes(video)])
        jobs = await wait_for_jobs(client, {"failed"}, 2)
    assert response.status_code == 200, response.text
    by_uid = {job["sop_instance_uid"]: job for job in jobs}
    assert "multi-frame" in by_uid[frames.SOPInstanceUID]["reason"]
    assert str(MPEG4_AVC) in by_uid[video.SOPInstanceUID]["reason"]
    assert read_delivery_log(tmp_path / "results") == []


async def test_the_same_instance_sent_twice_makes_one_job_and_one_result(
    pixel_dir: Path, tmp_path: Path
) -> None:
    ds = instance(5)
    async with serve(settings(pixel_dir, **pacs_settings(tmp_path))) as (_, client):
        first = await stow(client, [to_bytes(ds), to_bytes(ds)])
        (job,) = await wait_for_jobs(client, {"done"}, 1)
        again = await stow(client, [to_bytes(ds)])
        jobs = await wait_for_jobs(client, {"done"}, 1)
    assert first.status_code == 200 and again.status_code == 200
    assert sequence_uids(again.json(), REFERENCED) == [ds.SOPInstanceUID]
    assert [j["id"] for j in jobs] == [job["id"]]
    assert len(read_delivery_log(tmp_path / "results")) == 1


async def test_a_full_spool_answers_507_and_keeps_nothing(pixel_dir: Path, tmp_path: Path) -> None:
    small, big = to_bytes(instance(1)), to_bytes(instance(2, size=(64, 64)))
    config = settings(pixel_dir, **pacs_settings(tmp_path, spool_max_bytes=len(small) + 100))
    async with serve(config) as (_, client):
        refused = await stow(client, [big])
        listed = (await client.get("/jobs")).json()["jobs"]
        partly = await stow(client, [small, big])
        await wait_for_jobs(client, {"done"}, 1)
        # Neither the refused instance nor a temporary file; the accepted one is deleted once done.
        assert await spool_files(tmp_path / "spool" / "instances") == []
    assert_problem(refused, 507, "spool-full")
    assert listed == []
    assert partly.status_code == 202 and failure_reasons(partly.json()) == [OUT_OF_RESOURCES]


async def test_stow_needs_multipart_related_dicom_and_the_api_key(pixel_dir: Path, tmp_path: Path) -> None:
    key = "k" * 20
    body, content_type = stow_body([to_bytes(instance(1))])
    async with serve(settings(pixel_dir, api_keys=key, **pacs_settings(tmp_path))) as (_, client):
        anonymous = await client.post(
            "/dicomweb/studies", content=body, headers={"content-type": content_type}
        )
        form = await client.post(
            "/dicomweb/studies", files={"file": ("a.dcm", body)}, headers={"X-API-Key": key}
        )
        broken = await client.post(
            "/dicomweb/studies", content=body[:-30], headers={"content-type": content_type, "X-API-Key": key}
        )
        jobs = await client.get("/jobs", headers={"X-API-Key": key})
    assert_problem(anonymous, 401, "unauthorized")
    assert_problem(form, 415, "unsupported-media-type")
    assert_problem(broken, 400, "bad-request")
    assert jobs.json()["jobs"] == []


async def test_job_records_and_logs_hold_no_patient_data(
    pixel_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ds = instance(1, PatientID="MRN-0042-XYZ")
    async with serve(settings(pixel_dir, **pacs_settings(tmp_path))) as (_, client):
        await stow(client, [to_bytes(ds)])
        await wait_for_jobs(client, {"done"}, 1)
        listed = (await client.get("/jobs")).text
    database = (tmp_path / "jobs.sqlite").read_bytes()
    for secret in (PATIENT_NAME.split("^")[0], "MRN-0042-XYZ"):
        assert secret not in listed and secret not in caplog.text
        assert secret.encode() not in database


async def test_a_body_over_the_upload_limit_is_refused_with_413(pixel_dir: Path, tmp_path: Path) -> None:
    parts = [to_bytes(instance(i, size=(64, 64))) for i in range(4)]
    body, content_type = stow_body(parts)
    config = settings(pixel_dir, max_upload_bytes=len(body) // 2, **pacs_settings(tmp_path))

    async def chunks() -> AsyncIterator[bytes]:  # streamed without a Content-Length: cut off while read
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    async with serve(config) as (_, client):
        refused = await client.post(
            "/dicomweb/studies", content=chunks(), headers={"content-type": content_type}
        )
    assert_problem(refused, 413, "payload-too-large")
