"""DICOM SEG output and the identifiers that JSON responses may carry."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from models.dicom_seg import DicomSegError, build_dicom_seg, safe_identifiers
from models.imageio import read_image, read_image_file
from tests.models.test_dicom import PATIENT_NAME, anatomy, make_dataset, make_dicom, to_bytes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom", "ignore::UserWarning:highdicom")

CLASSES = ["background", "lung", "nodule", "effusion"]
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def label_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.int64)
    mask[2:10, 3:20] = 1
    mask[12:16, 5:9] = 2  # class 3 ("effusion") is absent on purpose
    return mask


def seg_labels(data: bytes, source: Dataset) -> np.ndarray:
    """The SEG's segments for the source image, decoded by highdicom into one (H, W) label map."""
    seg = hd.seg.segread(io.BytesIO(data))
    return seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=True)[0]


def test_seg_references_the_source_and_round_trips_the_mask():
    image = read_image(make_dicom(anatomy(24, 32)))
    assert image.dicom is not None
    source = image.dicom.dataset
    mask = label_mask(24, 32)
    data = build_dicom_seg(image.dicom, mask, CLASSES, algorithm_name="lungs", algorithm_version="abc123")

    plain = pydicom.dcmread(io.BytesIO(data))
    assert plain.SOPClassUID == SEG_STORAGE and plain.Modality == "SEG"
    assert plain.StudyInstanceUID == source.StudyInstanceUID  # same study, new series
    assert plain.SeriesInstanceUID != source.SeriesInstanceUID
    referenced_series = plain.ReferencedSeriesSequence[0]
    assert referenced_series.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced_series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert [s.SegmentLabel for s in plain.SegmentSequence] == CLASSES[1:]
    assert [int(s.SegmentNumber) for s in plain.SegmentSequence] == [1, 2, 3]
    assert plain.SegmentSequence[0].SegmentAlgorithmName == "lungs"
    np.testing.assert_array_equal(seg_labels(data, source), mask)


def test_seg_from_a_bundled_ct_image():
    image = read_image_file(str(get_testdata_file("CT_small.dcm", download=False)))
    assert image.dicom is not None
    mask = (image.pixels[:, :, 0] > 0.6).astype(np.int64)
    assert 0 < mask.sum() < mask.size
    data = build_dicom_seg(image.dicom, mask, ["background", "bone"])
    np.testing.assert_array_equal(seg_labels(data, image.dicom.dataset), mask)


def test_source_without_type2_patient_attributes_still_gets_a_seg_and_is_not_modified():
    image = read_image(make_dicom(anatomy(8, 8)))
    assert image.dicom is not None
    source = image.dicom.dataset
    del source.PatientName, source.PatientID
    assert "PatientBirthDate" not in source
    data = build_dicom_seg(source, label_mask(8, 8) % 2, ["background", "x"])
    assert pydicom.dcmread(io.BytesIO(data)).PatientName == ""
    assert "PatientBirthDate" not in source and "PatientName" not in source


def test_seg_for_a_non_dicom_source_is_refused():
    from models.imageio import DicomRef

    with pytest.raises(DicomSegError, match="not DICOM"):
        build_dicom_seg(DicomRef(), np.zeros((2, 2), dtype=np.int64), CLASSES)


@pytest.mark.parametrize(
    ("mask", "classes", "message"),
    [
        (np.zeros((8, 9), dtype=np.int64), CLASSES, "differs from the source image size"),
        (np.full((8, 8), 4, dtype=np.int64), CLASSES, r"labels must be in \[0, 3\]"),
        (np.zeros((8, 8), dtype=np.float32), CLASSES, "integer class indices"),
        (np.zeros((8, 8), dtype=np.int64), ["background"], "at least one foreground class"),
    ],
)
def test_bad_masks_are_refused_with_a_reason(mask: np.ndarray, classes: list[str], message: str):
    image = read_image(make_dicom(anatomy(8, 8)))
    assert image.dicom is not None
    with pytest.raises(ValueError, match=message):
        build_dicom_seg(image.dicom, mask, classes)


def test_safe_identifiers_are_only_the_three_uids():
    image = read_image(make_dicom(anatomy(4, 4)))
    assert image.dicom is not None
    source = image.dicom.dataset
    expected = {
        "StudyInstanceUID": source.StudyInstanceUID,
        "SeriesInstanceUID": source.SeriesInstanceUID,
        "SOPInstanceUID": source.SOPInstanceUID,
    }
    assert safe_identifiers(image.dicom) == expected
    assert safe_identifiers(source) == expected
    assert PATIENT_NAME not in repr(safe_identifiers(source)) and PATIENT_NAME in str(source.PatientName)
    assert safe_identifiers(None) == {}


def test_safe_identifiers_drop_values_that_are_not_uids():
    image = read_image(make_dicom(anatomy(4, 4)))
    assert image.dicom is not None
    source = image.dicom.dataset
    source.StudyInstanceUID = PATIENT_NAME
    assert set(safe_identifiers(source)) == {"SeriesInstanceUID", "SOPInstanceUID"}


def test_seg_for_an_unknown_sop_class_is_refused_with_the_class_named():
    image = read_image(make_dicom(anatomy(8, 8), SOPClassUID="1.2.826.0.1.3680043.9.9999.1"))
    assert image.dicom is not None
    with pytest.raises(DicomSegError, match=r"1\.2\.826\.0\.1\.3680043\.9\.9999\.1"):
        build_dicom_seg(image.dicom, label_mask(8, 8) % 2, ["background", "x"])


def test_given_uids_are_used_and_defaults_are_new():
    from models.dicom_uids import result_instance_uid, result_series_uid

    image = read_image(make_dicom(anatomy(8, 8)))
    assert image.dicom is not None
    source = image.dicom.dataset
    series = result_series_uid(source.SeriesInstanceUID, "lungs", "v1", "seg")
    instance = result_instance_uid(source.SOPInstanceUID, "v1", "seg")
    mask = label_mask(8, 8) % 2
    given = pydicom.dcmread(
        io.BytesIO(
            build_dicom_seg(
                source, mask, ["background", "x"], series_instance_uid=series, sop_instance_uid=instance
            )
        )
    )
    assert (given.SeriesInstanceUID, given.SOPInstanceUID) == (series, instance)
    assert given.file_meta.MediaStorageSOPInstanceUID == instance
    one, two = (
        pydicom.dcmread(io.BytesIO(build_dicom_seg(source, mask, ["background", "x"]))) for _ in range(2)
    )
    assert one.SOPInstanceUID != two.SOPInstanceUID and one.SeriesInstanceUID != two.SeriesInstanceUID
    assert {one.SOPInstanceUID, one.SeriesInstanceUID}.isdisjoint({series, instance})
    with pytest.raises(ValueError, match="series_instance_uid"):
        build_dicom_seg(source, mask, ["background", "x"], series_instance_uid="1.2.abc")
    with pytest.raises(ValueError, match="sop_instance_uid"):
        build_dicom_seg(source, mask, ["background", "x"], sop_instance_uid="1.2.abc")


def test_a_projection_seg_carries_the_patient_orientation_a_ct_seg_does_not_need():
    from tests.models.dicom_sources import source_dataset

    dx = source_dataset("DX")
    mask = np.zeros((dx.Rows, dx.Columns), dtype=np.int64)
    seg = pydicom.dcmread(io.BytesIO(build_dicom_seg(dx, mask, ["background", "x"])))
    assert list(seg.PatientOrientation) == ["L", "F"]  # copied from the source
    del dx.PatientOrientation
    seg = pydicom.dcmread(io.BytesIO(build_dicom_seg(dx, mask, ["background", "x"])))
    assert "PatientOrientation" in seg and seg.PatientOrientation == ""  # Type 2: present, empty (unknown)
    assert "PatientOrientation" not in dx  # the source is not modified
    ct = source_dataset("CT")
    seg = pydicom.dcmread(
        io.BytesIO(build_dicom_seg(ct, np.zeros((ct.Rows, ct.Columns), np.int64), ["b", "x"]))
    )
    assert "PatientOrientation" not in seg  # a plane image: the SEG has a Plane Orientation instead
    assert "PlaneOrientationSequence" in seg.SharedFunctionalGroupsSequence[0]


@pytest.mark.parametrize("checked", [True, False], ids=["converted", "as-read"])
def test_only_the_patient_and_study_attributes_the_iod_needs_are_copied(checked: bool):
    # as-read: the elements pydicom has not converted yet (a job's source, checked by the intake on arrival)
    written = make_dataset(anatomy(8, 8))
    written.PatientBirthDate = "19610203"  # kept (Type 2 of the Patient module)
    written.EthnicGroup = "none of your business"
    image = read_image(to_bytes(written), check_elements=checked)
    assert image.dicom is not None
    source = image.dicom.dataset
    source.PatientComments = "allergic to contrast"
    source.OtherPatientIDsSequence = [Dataset()]
    source.PatientAge = "054Y"
    source.StudyDescription = f"{PATIENT_NAME} chest"
    source.PatientIdentityRemoved = "NO"
    seg = pydicom.dcmread(io.BytesIO(build_dicom_seg(source, label_mask(8, 8) % 2, ["background", "x"])))
    assert str(seg.PatientName) == PATIENT_NAME and seg.PatientID == source.PatientID  # Type 2: required
    assert seg.PatientIdentityRemoved == "NO" and seg.PatientBirthDate == "19610203"
    for keyword in (
        "PatientComments",
        "OtherPatientIDsSequence",
        "PatientAge",
        "StudyDescription",
        "EthnicGroup",
    ):
        assert keyword not in seg, keyword
        assert keyword in source, keyword
