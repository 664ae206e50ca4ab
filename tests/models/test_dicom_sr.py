"""DICOM SR output of a classification, read back with highdicom and pydicom."""

from __future__ import annotations

import io
from typing import Any

import highdicom as hd
import pydicom
import pytest
from highdicom.sr import ValueTypeValues
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset

from models.dicom_sr import (
    COMPREHENSIVE_3D_SR,
    DicomSrError,
    build_dicom_sr,
    device_uid,
    probability_code_value,
)
from models.dicom_uids import result_instance_uid, result_series_uid
from models.image_base import DicomRef
from models.imageio import read_image
from tests.models.dicom_sources import PATIENT_NAME, source_dataset
from tests.models.test_dicom import anatomy, make_dicom

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom", "ignore::UserWarning:highdicom")

CLASSES = ["normal", "pneumonia", "effusion"]
PROBABILITIES = {"normal": 0.125, "pneumonia": 0.75, "effusion": 0.125}


def report_of(data: bytes) -> tuple[Dataset, Any]:
    """The SR as a plain dataset, and its one TID 1501 measurement group (highdicom)."""
    sr = hd.sr.srread(io.BytesIO(data))
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    (group,) = report.get_image_measurement_groups()
    return pydicom.dcmread(io.BytesIO(data)), group


def probabilities_of(group: Any) -> dict[str, float]:
    return {m.name.meaning.removeprefix("Probability of "): float(m.value) for m in group.get_measurements()}


def test_sr_holds_the_label_the_probabilities_and_the_model() -> None:
    source = source_dataset("DX")
    data = build_dicom_sr(source, PROBABILITIES, model_name="chest-xray", model_version="0a1b2c3d")
    plain, group = report_of(data)

    assert plain.SOPClassUID == COMPREHENSIVE_3D_SR and plain.Modality == "SR"
    assert plain.VerificationFlag == "UNVERIFIED" and plain.CompletionFlag == "COMPLETE"
    assert plain.StudyInstanceUID == source.StudyInstanceUID  # same study, a new series named after the model
    assert plain.SeriesInstanceUID != source.SeriesInstanceUID
    assert plain.SeriesDescription == "MedServe chest-xray classification"
    assert plain.Manufacturer == "MedServe" and plain.ManufacturerModelName == "chest-xray"
    # TID 1500, the predicted label as a qualitative evaluation
    assert plain.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    (evaluation,) = group.get_qualitative_evaluations()
    assert (evaluation.name.value, evaluation.name.scheme_designator) == ("278201002", "SCT")
    assert (evaluation.value.value, evaluation.value.scheme_designator, evaluation.value.meaning) == (
        "1",
        "99MEDSERVE",
        "pneumonia",
    )
    # each class probability as a numeric measurement, unit {probability}
    assert probabilities_of(group) == PROBABILITIES
    measurements = group.get_measurements()
    assert [m.name.value for m in measurements] == [probability_code_value(i) for i in range(3)]
    assert {(m.unit.value, m.unit.scheme_designator) for m in measurements} == {("{probability}", "UCUM")}
    # the model: algorithm of the group, the observer device, the contributing equipment
    algorithm = {
        item.name.value: item.value
        for item in find_content_items(group[0], value_type=ValueTypeValues.TEXT, recursive=True)
    }
    assert (
        algorithm["111001"] == "chest-xray" and algorithm["111003"] == "0a1b2c3d"
    )  # Algorithm Name, Version
    (equipment,) = [e for e in plain.ContributingEquipmentSequence if e.Manufacturer == "MedServe"]
    assert equipment.ManufacturerModelName == "chest-xray" and equipment.SoftwareVersions == "0a1b2c3d"
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    observer = {
        item.name.value: item.value
        for item in hd.sr.srread(io.BytesIO(data)).content[0].ContentSequence
        if item.ValueType in ("UIDREF", "TEXT")
    }
    assert observer["121012"] == device_uid("chest-xray")  # Device Observer UID
    assert observer["121013"] == "chest-xray"  # Device Observer Name


def test_sr_references_the_source_image() -> None:
    source = source_dataset("CR")
    plain, group = report_of(build_dicom_sr(source, PROBABILITIES, model_name="m", model_version="v"))
    (referenced,) = group.source_images
    assert referenced.referenced_sop_instance_uid == source.SOPInstanceUID
    assert referenced.referenced_sop_class_uid == source.SOPClassUID
    evidence = plain.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # the image library (TID 1600) lists the source
    sr = hd.sr.srread(io.BytesIO(build_dicom_sr(source, PROBABILITIES)))
    library = [item for item in sr.content[0].ContentSequence if item.name.value == "111028"]
    assert len(library) == 1
    assert source.SOPInstanceUID in str(library[0])


def test_the_label_defaults_to_the_most_probable_class_and_can_be_given() -> None:
    source = source_dataset("CT")
    _, group = report_of(build_dicom_sr(source, [0.5, 0.25, 0.25], classes=CLASSES))
    assert group.get_qualitative_evaluations()[0].value.meaning == "normal"  # the first of equals too
    _, group = report_of(build_dicom_sr(source, [0.25, 0.375, 0.375], classes=CLASSES))
    assert group.get_qualitative_evaluations()[0].value.meaning == "pneumonia"
    _, group = report_of(build_dicom_sr(source, PROBABILITIES, "effusion"))
    assert group.get_qualitative_evaluations()[0].value.value == "2"


def test_a_subset_of_classes_keeps_the_class_indices_as_codes() -> None:
    top = {"effusion": 0.625, "normal": 0.25}  # the top 2, most probable first
    _, group = report_of(build_dicom_sr(source_dataset("CT"), top, classes=CLASSES))
    assert [m.name.value for m in group.get_measurements()] == ["prob-2", "prob-0"]
    assert probabilities_of(group) == top
    assert group.get_qualitative_evaluations()[0].value.value == "2"


@pytest.mark.parametrize(
    ("probabilities", "label", "classes", "message"),
    [
        ({"a": 1.5, "b": 0.0}, None, None, r"in \[0, 1\]"),
        ({"a": float("nan")}, None, None, r"in \[0, 1\]"),
        ([0.5, 0.5], None, None, "need the class names"),
        ([0.5, 0.5], None, CLASSES, "2 probabilities for 3 classes"),
        ({"a": 0.5, "x": 0.5}, None, ["a", "b"], "classes the model does not have"),
        ({"a": 0.5, "b": 0.5}, "c", None, "predicted label 'c'"),
        ({}, None, None, "at least one class"),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(
    probabilities: Any, label: str | None, classes: list[str] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_dicom_sr(source_dataset("CT"), probabilities, label, classes=classes)


def test_given_uids_are_used_and_defaults_are_new() -> None:
    source = source_dataset("DX")
    series = result_series_uid(source.SeriesInstanceUID, "chest", "v1", "sr")
    instance = result_instance_uid(source.SOPInstanceUID, "v1", "sr")
    first = pydicom.dcmread(
        io.BytesIO(
            build_dicom_sr(source, PROBABILITIES, series_instance_uid=series, sop_instance_uid=instance)
        )
    )
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (series, instance)
    assert first.file_meta.MediaStorageSOPInstanceUID == instance
    one, two = (pydicom.dcmread(io.BytesIO(build_dicom_sr(source, PROBABILITIES))) for _ in range(2))
    assert one.SOPInstanceUID != two.SOPInstanceUID and one.SeriesInstanceUID != two.SeriesInstanceUID
    assert pydicom.uid.UID(one.SOPInstanceUID).is_valid
    with pytest.raises(ValueError, match="sop_instance_uid"):
        build_dicom_sr(source, PROBABILITIES, sop_instance_uid="not a uid")


def test_only_the_patient_and_study_attributes_the_iod_needs_are_copied() -> None:
    source = source_dataset("DX")
    source.PatientAddress = "12 Elm Street"
    source.OtherPatientIDsSequence = [Dataset()]
    source.PatientComments = "allergic to contrast"
    source.InstitutionName = "St Elsewhere"
    source.PatientAge = "063Y"
    source.StudyDescription = f"{PATIENT_NAME} chest"
    plain = pydicom.dcmread(io.BytesIO(build_dicom_sr(source, PROBABILITIES)))
    assert (
        str(plain.PatientName) == PATIENT_NAME and plain.PatientID == source.PatientID
    )  # Type 2, as required
    dropped = (
        "PatientAddress",
        "OtherPatientIDsSequence",
        "PatientComments",
        "InstitutionName",
        "PatientAge",
    )
    for keyword in (*dropped, "StudyDescription"):
        assert keyword not in plain, keyword
    assert "12 Elm Street" not in str(plain) and "contrast" not in str(plain)


def test_a_source_without_type2_patient_attributes_still_gets_an_sr_and_is_not_modified() -> None:
    image = read_image(make_dicom(anatomy(8, 8)))
    assert image.dicom is not None
    source = image.dicom.dataset
    del source.PatientName, source.PatientID
    plain = pydicom.dcmread(io.BytesIO(build_dicom_sr(image.dicom, PROBABILITIES)))
    assert plain.PatientName == "" and plain.PatientID == ""
    assert "PatientName" not in source and "PatientBirthDate" not in source


def test_non_dicom_and_unknown_sop_class_sources_are_refused() -> None:
    with pytest.raises(DicomSrError, match="not DICOM"):
        build_dicom_sr(DicomRef(), PROBABILITIES)
    image = read_image(make_dicom(anatomy(8, 8), SOPClassUID="1.2.826.0.1.3680043.9.9999.1"))
    assert image.dicom is not None
    with pytest.raises(DicomSrError, match=r"1\.2\.826\.0\.1\.3680043\.9\.9999\.1"):
        build_dicom_sr(image.dicom, PROBABILITIES)


@pytest.mark.parametrize(
    ("kind", "keyword"), [("CT", "PixelSpacing"), ("CT", "SliceThickness"), ("DX", None)]
)
def test_sources_without_optional_descriptor_attributes_still_get_an_image_library(
    kind: str, keyword: str | None
) -> None:
    source = source_dataset(kind)
    if keyword == "SliceThickness":
        source.SliceThickness = None  # Type 2: present, empty
    elif keyword is not None:
        delattr(source, keyword)
    else:
        source.PatientOrientation = None  # Type 2C: present, empty
    sr = hd.sr.srread(io.BytesIO(build_dicom_sr(source, PROBABILITIES)))
    (library,) = [item for item in sr.content[0].ContentSequence if item.name.value == "111028"]
    text = str(library)
    assert source.SOPInstanceUID in text and "Pixel Data Rows" in text  # the common descriptors are kept
