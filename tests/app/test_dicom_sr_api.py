"""``/classify?format=dicom-sr``: the classification of one DICOM image as a DICOM SR, through the real routes."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from models import dicom
from tests.app.helpers import (
    PNG,
    assert_problem,
    encode_image,
    random_image,
    save_mean_classifier,
    save_pixel_model,
    serve,
    settings,
)
from tests.models.dicom_sources import PATIENT_ID, PATIENT_NAME, part10, source_dataset
from tests.models.test_dicom import make_dataset, to_bytes

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore::UserWarning:pydicom", "ignore::UserWarning:highdicom"),
]

DICOM = {"content-type": "application/dicom"}
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def classifier_dir(tmp_path: Path) -> Path:
    save_mean_classifier(tmp_path / "mean.pt")  # classes dark, bright
    return tmp_path


def read_sr(data: bytes) -> tuple[pydicom.Dataset, str, dict[str, float]]:
    """The SR, its predicted label and its probabilities by class name."""
    sr = hd.sr.srread(io.BytesIO(data))
    (group,) = hd.sr.MeasurementReport.from_sequence(sr.content).get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations()
    value: Any = evaluation.value  # a CodedConcept for a qualitative evaluation
    probabilities = {
        m.name.meaning.removeprefix("Probability of "): float(m.value) for m in group.get_measurements()
    }
    return pydicom.dcmread(io.BytesIO(data)), value.meaning, probabilities


async def test_dicom_sr_holds_what_the_json_answer_says(classifier_dir: Path) -> None:
    source = source_dataset("DX")
    data = part10(source)
    async with serve(settings(classifier_dir)) as (_, client):
        answer = await client.post("/classify", content=data, headers=DICOM)
        raw = await client.post("/classify?format=dicom-sr", content=data, headers=DICOM)
        multipart = await client.post(
            "/classify?format=dicom-sr", files={"file": ("chest.dcm", data, "application/dicom")}
        )
    assert answer.status_code == 200 and raw.status_code == 200 and multipart.status_code == 200, raw.text
    (prediction,) = answer.json()["predictions"]
    for response in (raw, multipart):
        assert response.headers["content-type"] == "application/dicom"
        assert response.headers["x-model-name"] == "mean"
        plain, label, probabilities = read_sr(response.content)
        assert plain.SOPClassUID == SR_STORAGE and plain.VerificationFlag == "UNVERIFIED"
        assert plain.StudyInstanceUID == source.StudyInstanceUID
        assert plain.SeriesInstanceUID != source.SeriesInstanceUID
        assert plain.SeriesDescription == "MedServe mean classification"
        evidence = plain.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        (equipment,) = [e for e in plain.ContributingEquipmentSequence if e.Manufacturer == "MedServe"]
        assert equipment.ManufacturerModelName == "mean"
        assert equipment.SoftwareVersions == response.headers["x-model-version"]
        assert label == prediction["label"]
        assert probabilities.keys() == prediction["probabilities"].keys()
        for name, value in prediction["probabilities"].items():
            assert probabilities[name] == pytest.approx(value, abs=1e-6)  # DS holds 16 characters


async def test_top_k_reports_the_best_classes(classifier_dir: Path) -> None:
    data = part10(source_dataset("CR"))
    async with serve(settings(classifier_dir)) as (_, client):
        answer = await client.post("/classify?top_k=1", content=data, headers=DICOM)
        sr = await client.post("/classify?format=dicom-sr&top_k=1", content=data, headers=DICOM)
    assert sr.status_code == 200
    (prediction,) = answer.json()["predictions"]
    _, label, probabilities = read_sr(sr.content)
    assert list(probabilities) == list(prediction["probabilities"]) == [label]


async def test_dicom_sr_needs_dicom_input_as_dicom_seg_does(classifier_dir: Path) -> None:
    save_pixel_model(classifier_dir / "pixel.pt")
    png = encode_image(random_image(16, 16, seed=1))
    async with serve(settings(classifier_dir)) as (_, client):
        sr = await client.post("/classify?format=dicom-sr&model=mean", content=png, headers=PNG)
        seg = await client.post("/segment?format=dicom-seg&model=pixel", content=png, headers=PNG)
    sr_detail = assert_problem(sr, 415, "unsupported-media-type")["detail"]
    seg_detail = assert_problem(seg, 415, "unsupported-media-type")["detail"]
    assert "format=dicom-sr" in sr_detail and "DICOM" in sr_detail and "format=json" in sr_detail
    assert sr_detail.replace("dicom-sr", "dicom-seg").split(" or use ")[0] == seg_detail.split(" or use ")[0]


async def test_several_files_are_refused_before_decoding(classifier_dir: Path) -> None:
    data = part10(source_dataset("DX"))
    files = [
        ("file", ("a.dcm", data, "application/dicom")),
        ("file", ("b.dcm", b"not a DICOM file at all", "application/dicom")),
    ]
    async with serve(settings(classifier_dir)) as (_, client):
        refused = await client.post("/classify?format=dicom-sr", files=files)
        as_json = await client.post("/classify", files=files)
    body = assert_problem(refused, 422, "invalid-request")  # not the 400 that decoding file b would give
    assert body["errors"][0]["loc"] == ["query", "format"]
    assert "one image per request" in body["detail"] and "2 files" in body["detail"]
    assert "format=json" in body["detail"]
    assert_problem(as_json, 400, "invalid-image")  # the same files do reach decoding for the json format


async def test_sources_an_sr_cannot_reference_are_refused(classifier_dir: Path) -> None:
    values = np.arange(64, dtype=np.int64).reshape(8, 8) * 64
    unknown_class = make_dataset(values, bits_stored=12, SOPClassUID="1.2.826.0.1.3680043.9.9999.1")
    crafted = make_dataset(values, bits_stored=12)
    crafted.SOPInstanceUID = f"{PATIENT_NAME}^{PATIENT_ID}"
    async with serve(settings(classifier_dir)) as (_, client):
        unknown = await client.post(
            "/classify?format=dicom-sr", content=to_bytes(unknown_class), headers=DICOM
        )
        bad_uid = await client.post("/classify?format=dicom-sr", content=to_bytes(crafted), headers=DICOM)
    assert "1.2.826.0.1.3680043.9.9999.1" in assert_problem(unknown, 422, "unprocessable-image")["detail"]
    detail = assert_problem(bad_uid, 422, "unprocessable-image")["detail"]
    assert "DICOM SR" in detail and "SOPInstanceUID" in detail and "Roe" not in detail


async def test_openapi_lists_the_format(classifier_dir: Path) -> None:
    async with serve(settings(classifier_dir)) as (_, client):
        schema = (await client.get("/openapi.json")).json()
    operation = schema["paths"]["/classify"]["post"]
    parameter = next(p for p in operation["parameters"] if p["name"] == "format")
    assert parameter["schema"]["enum"] == ["json", "dicom-sr"] and parameter["schema"]["default"] == "json"
    assert set(operation["responses"]["200"]["content"]) == {"application/json", "application/dicom"}
    assert "`format=dicom-sr` (DICOM input only; other input: 415)" in operation["description"]


async def test_patient_data_reaches_the_sr_but_never_the_logs(
    classifier_dir: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    dicom.install_privacy_guards()
    for name in ("", "pydicom", "highdicom", "medserve", "app", "uvicorn", "httpx"):
        caplog.set_level(logging.DEBUG, logger=name)
    data = part10(source_dataset("DX"))
    responses: list[Any] = []
    async with serve(settings(classifier_dir)) as (_, client):
        responses.append(await client.post("/classify?format=dicom-sr", content=data, headers=DICOM))
        responses.append(
            await client.post(
                "/classify?format=dicom-sr", files=[("file", ("a.dcm", data, "x")) for _ in range(2)]
            )
        )
    assert [r.status_code for r in responses] == [200, 422]
    assert (
        str(pydicom.dcmread(io.BytesIO(responses[0].content)).PatientName) == PATIENT_NAME
    )  # as the IOD needs
    captured = capfd.readouterr()
    logged = caplog.text + "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert caplog.records
    for secret in ("Roe", "Richard", PATIENT_ID):
        for text in (logged, captured.out, captured.err, responses[1].text):
            assert secret not in text, secret
