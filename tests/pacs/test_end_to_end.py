"""End to end as an integrator sets it up: Orthanc forwards what it stores to MedServe, MedServe stores its SEG back.

Orthanc runs the shipped ``deploy/orthanc/orthanc.json`` and ``forward-to-medserve.lua`` (only this machine's parts
rewritten: loopback ports, a temporary storage folder, the plugin and script paths, the ``medserve`` server's URL);
MedServe runs as a real process with ``MEDSERVE_PACS_URL`` pointing at Orthanc's DICOMweb root. An instance
uploaded to Orthanc is forwarded by STOW-RS (the Lua ``OnStoredInstance`` script), becomes a job, and its SEG is
delivered back into the same study; the SEG's mask is the PNG mask ``/segment`` answers for the same file.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.app.helpers import decode_png
from tests.components import require_program
from tests.deploy.helpers import ROOT, free_port
from tests.pacs.flows import API_KEY, MedServeProcess, save_tiny_unet, wait_for
from tests.pacs.orthanc import Orthanc, find_orthanc, orthanc_server
from tests.pacs.sources import SEG_STORAGE, ct_dataset, dx_dataset, part10

pytestmark = pytest.mark.slow

ORTHANC_DIR = ROOT / "deploy" / "orthanc"


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[tuple[Orthanc, MedServeProcess]]:
    shipped = json.loads((ORTHANC_DIR / "orthanc.json").read_text())
    medserve = MedServeProcess(tmp_path / "medserve", save_tiny_unet(tmp_path / "models"))
    orthanc = Orthanc(
        find_orthanc(),
        tmp_path / "orthanc",
        base=shipped,
        lua_scripts=[ORTHANC_DIR / "forward-to-medserve.lua"],
        dicomweb_servers={
            "medserve": {**shipped["DicomWeb"]["Servers"]["medserve"], "Url": f"{medserve.url}/dicomweb/"}
        },
        env={"MEDSERVE_API_KEY": API_KEY},  # the shipped file reads the key from Orthanc's environment
    )
    medserve.env = {"MEDSERVE_PACS_URL": orthanc.dicomweb_url, "MEDSERVE_JOBS_CONCURRENCY": "2"}
    orthanc.start()
    try:
        medserve.start()
        try:
            yield orthanc, medserve
        finally:
            medserve.stop()
    finally:
        orthanc.stop()


def seg_mask(seg: pydicom.Dataset) -> np.ndarray:
    """The lesion mask of a one-segment BINARY SEG (one frame)."""
    frames = seg.pixel_array
    assert int(seg.NumberOfFrames) == 1 and len(seg.SegmentSequence) == 1
    return np.asarray(frames).reshape(int(seg.Rows), int(seg.Columns)).astype(bool)


def results_in_study(orthanc: Orthanc, study_uid: str) -> list[str]:
    with orthanc.client() as client:
        response = client.post(
            "/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
        )
        response.raise_for_status()
        ids = list(response.json())
    return [i for i in ids if orthanc.instance_tags(i).get("SOPClassUID") == SEG_STORAGE]


@pytest.mark.parametrize("kind", ["CT", "DX"])
def test_an_instance_uploaded_to_orthanc_gets_its_seg_in_the_same_study(
    wired: tuple[Orthanc, MedServeProcess], kind: str
) -> None:
    orthanc, medserve = wired
    source = ct_dataset() if kind == "CT" else dx_dataset(96, seed=3)
    data = part10(source)
    orthanc.upload(data)  # as a modality or a viewer would store it
    study = str(source.StudyInstanceUID)
    wait_for(
        lambda: len(results_in_study(orthanc, study)) >= 1,
        f"the SEG of the {kind} in Orthanc",
        log=lambda: medserve.output() + orthanc.output(),
    )
    (seg_id,) = results_in_study(orthanc, study)
    assert len(orthanc.studies()) == 1  # the same study, a new series
    study_info = orthanc.get_json(f"/studies/{orthanc.studies()[0]}")
    assert len(study_info["Series"]) == 2
    seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(seg_id)))
    assert seg.StudyInstanceUID == study
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert referenced == source.SOPInstanceUID
    # MedServe's result was not forwarded back to MedServe: one job, for the source only
    jobs = medserve.jobs()
    assert [job["sop_instance_uid"] for job in jobs] == [source.SOPInstanceUID]
    assert jobs[0]["state"] == "done" and jobs[0]["result_sop_instance_uid"] == seg.SOPInstanceUID
    # the same image through /segment: the same mask
    with medserve.client() as client:
        response = client.post("/segment", content=data, headers={"content-type": "application/dicom"})
    assert response.status_code == 200, response.text
    png_mask = decode_png(response.content) > 0
    mask = seg_mask(seg)
    assert mask.shape == png_mask.shape == (int(source.Rows), int(source.Columns))
    assert 0 < int(mask.sum()) < mask.size  # a mask with both classes: the comparison means something
    assert np.array_equal(mask, png_mask)


def test_dimse_in_and_c_store_out(tmp_path: Path) -> None:
    """A DIMSE-only setup: storescu sends to MedServe's DICOM port, MedServe C-STOREs the SEG to Orthanc."""
    storescu = require_program("storescu", "dcmtk")
    dimse_port = free_port()
    with orthanc_server(tmp_path / "orthanc", extra={"DicomCheckCalledAet": True}) as orthanc:
        medserve = MedServeProcess(
            tmp_path / "medserve",
            save_tiny_unet(tmp_path / "models"),
            env={
                "MEDSERVE_DIMSE_DESTINATION": orthanc.dimse_destination,
                "MEDSERVE_DIMSE_PORT": str(dimse_port),
                "MEDSERVE_DIMSE_HOST": "127.0.0.1",
                "MEDSERVE_DIMSE_ALLOWED": "MODALITY@127.0.0.1",
            },
        )
        medserve.start()
        try:
            sources = [ct_dataset(), dx_dataset(64, seed=5)]
            files = []
            for index, source in enumerate(sources):
                path = tmp_path / f"{index}.dcm"
                path.write_bytes(part10(source))
                files.append(str(path))
            sent = subprocess.run(
                [
                    storescu,
                    "-v",
                    "-aet",
                    "MODALITY",
                    "-aec",
                    "MEDSERVE",
                    "127.0.0.1",
                    str(dimse_port),
                    *files,
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert (sent.stdout + sent.stderr).count("Received Store Response (Success)") == 2
            wait_for(lambda: len(medserve.jobs(state="done")) == 2, "2 jobs done", log=medserve.output)
            jobs = medserve.jobs()
        finally:
            medserve.stop()
        assert sorted(job["source"] for job in jobs) == ["dimse", "dimse"]
        for source in sources:
            (seg_id,) = results_in_study(orthanc, str(source.StudyInstanceUID))
            seg = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(seg_id)))
            referenced = (
                seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
            )
            assert referenced == source.SOPInstanceUID
        assert len(orthanc.instances()) == 2  # the two SEGs (the sources went to MedServe only)
