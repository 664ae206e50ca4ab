"""POST /jobs pulls a study from a real Orthanc (QIDO-RS + WADO-RS with dicomweb-client) into the job system."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydantic import SecretStr

from app.pacs.results import read_delivery_log
from tests.app.helpers import assert_problem, serve, settings
from tests.app.pacs.helpers import instance, pacs_settings, wait_for_jobs
from tests.app.pacs.orthanc_server import PASSWORD, USER, Orthanc, orthanc_server
from tests.models.test_dicom import to_bytes

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore::UserWarning:pydicom", "ignore::UserWarning:highdicom"),
]


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    with orthanc_server() as server:
        yield server


async def test_a_study_is_pulled_and_each_instance_gets_its_job(
    orthanc: Orthanc, pixel_dir: Path, tmp_path: Path
) -> None:
    study, other_study = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    first = [instance(i, study=study) for i in range(2)]
    second = instance(3, study=study)  # its own series
    stranger = instance(4, study=other_study)
    for ds in (*first, second, stranger):
        orthanc.upload(to_bytes(ds))
    config = settings(
        pixel_dir,
        pacs_url=orthanc.dicomweb,
        pacs_username=USER,
        pacs_password=SecretStr(PASSWORD),
        **pacs_settings(tmp_path),
    )
    async with serve(config) as (_, client):
        pulled = await client.post("/jobs", json={"study_instance_uid": study})
        jobs = await wait_for_jobs(client, {"done"}, 3)
        series = await client.post(
            "/jobs", json={"study_instance_uid": study, "series_instance_uid": second.SeriesInstanceUID}
        )
        unknown = await client.post("/jobs", json={"study_instance_uid": "1.2.3.999"})
        invalid = await client.post("/jobs", json={"study_instance_uid": "not a uid"})
        listed = (await client.get("/jobs", params={"study": study})).json()["jobs"]
    assert pulled.status_code == 201, pulled.text
    body = pulled.json()
    expected = {ds.SOPInstanceUID for ds in (*first, second)}
    assert {item["sop_instance_uid"] for item in body["instances"]} == expected
    assert all(item["accepted"] and not item["duplicate"] for item in body["instances"])
    assert sorted(body["job_ids"]) == sorted(job["id"] for job in jobs)
    assert {job["source"] for job in jobs} == {"pull"}
    assert series.status_code == 201
    assert [(i["sop_instance_uid"], i["duplicate"]) for i in series.json()["instances"]] == [
        (second.SOPInstanceUID, True)
    ]
    assert len(listed) == 3  # pulling again made no job
    assert len(read_delivery_log(tmp_path / "results")) == 3
    assert_problem(unknown, 404, "study-not-found")
    assert_problem(invalid, 422, "invalid-request")


async def test_pull_problems_name_what_is_wrong(orthanc: Orthanc, pixel_dir: Path, tmp_path: Path) -> None:
    wrong = settings(
        pixel_dir,
        pacs_url=orthanc.dicomweb,
        pacs_username=USER,
        pacs_password=SecretStr("wrong"),
        **pacs_settings(tmp_path),
    )
    async with serve(wrong) as (_, client):
        refused = await client.post("/jobs", json={"study_instance_uid": "1.2.3"})
    async with serve(settings(pixel_dir, **pacs_settings(tmp_path))) as (_, client):
        unconfigured = await client.post("/jobs", json={"study_instance_uid": "1.2.3"})
    assert "401" in assert_problem(refused, 502, "archive-error")["detail"]
    assert_problem(unconfigured, 409, "pacs-not-configured")
