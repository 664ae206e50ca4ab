"""DICOM output: a DICOM Segmentation object for a predicted mask, and the identifiers safe to echo in JSON.

``build_dicom_seg`` writes a BINARY Segmentation (SOP class 1.2.840.10008.5.1.4.1.1.66.4) with highdicom: one
segment per foreground class (class 0 is the background and gets no segment), segment number = class index,
``SegmentLabel`` = class name. The SEG belongs to the source image's study (same StudyInstanceUID; of the
patient and study only the attributes the IOD requires are copied from the source, ``source_for_highdicom``), is
a new series (random UIDs, or the caller's: ``models.dicom_uids``), and references the source series and SOP
instance. For a projection source (DX, CR: no plane orientation) it carries the source's Patient Orientation,
which the General Image module then requires. Segmented property codes are generic (category SCT 85756007 "Tissue"; type: the class
index in the private coding scheme ``99MEDSERVE`` with the class name as meaning) because a model's class names
carry no coded meaning.

``safe_identifiers`` returns only the Study/Series/SOP Instance UIDs: never the patient's name or any other tag.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from models import __version__
from models.dicom import install_privacy_guards
from models.image_base import DicomRef

install_privacy_guards()  # already run by importing models.dicom; explicit because highdicom drives pydicom too

SEG_MEDIA_TYPE = "application/dicom"
SAFE_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
PRIVATE_SCHEME = "99MEDSERVE"  # "99" prefix: a local coding scheme (PS3.16 8.2)

# Type 2 attributes (required, may be empty) that highdicom copies from the source into the SEG; de-identified
# files often drop them, so an empty value is supplied on a copy of the source.
_TYPE2_SOURCE_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# What of the source's patient and study a result keeps (highdicom copies every Patient and Study module attribute
# it finds): the Type 1, 2 and conditional attributes of the Patient (PS3.3 C.7.1.1) and General Study
# (C.7.2.1) modules, the issuer of the patient ID (to match the ID across domains) and the de-identification
# marks. Every other attribute of the patient groups (0010, 0012: demographics, comments, other IDs, clinical
# trial subject) and the optional General Study / Patient Study attributes below are dropped from the copy.
PATIENT_GROUPS = (0x0010, 0x0012)
KEPT_PATIENT_KEYWORDS = frozenset(
    {
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence",
        "PatientBirthDate",
        "PatientSex",
        "PatientSpeciesDescription",
        "PatientSpeciesCodeSequence",
        "PatientBreedDescription",
        "PatientBreedCodeSequence",
        "BreedRegistrationSequence",
        "ResponsiblePerson",
        "ResponsiblePersonRole",
        "ResponsibleOrganization",
        "PatientIdentityRemoved",
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",
    }
)
DROPPED_STUDY_KEYWORDS = (
    "StudyDescription",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence",
    "IssuerOfAccessionNumberSequence",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "RequestingServiceCodeSequence",
    "ReferencedStudySequence",
    "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence",
    "Occupation",
    "AdditionalPatientHistory",
    "ReasonForVisit",
    "ReasonForVisitCodeSequence",
)
_LO_MAX = 64  # DICOM LO value length


class DicomSegError(ValueError):
    """A DICOM SEG cannot be written for this source image (e.g. an unknown SOP class); HTTP 422 at the API."""


def _dataset_of(source: DicomRef | Dataset) -> Dataset:
    dataset = source.dataset if isinstance(source, DicomRef) else source
    if not isinstance(dataset, Dataset):
        raise DicomSegError("a DICOM SEG needs the source DICOM dataset; the input was not DICOM")
    return dataset


def safe_identifiers(source: DicomRef | Dataset | None) -> dict[str, str]:
    """The identifiers a JSON response may carry: Study/Series/SOP Instance UID, nothing else.

    Args:
        source: the decoded image's ``DicomRef``, a pydicom ``Dataset``, or None (non-DICOM input).

    Returns:
        ``{"StudyInstanceUID": ..., "SeriesInstanceUID": ..., "SOPInstanceUID": ...}`` with only the UIDs that are
        present and syntactically valid (so a malformed "UID" cannot smuggle other text out); {} for None.
    """
    if source is None:
        return {}
    if isinstance(source, DicomRef):
        values: dict[str, Any] = source.uids()
    else:
        values = {keyword: source.get(keyword) for keyword in SAFE_UID_KEYWORDS}
    out: dict[str, str] = {}
    for keyword in SAFE_UID_KEYWORDS:
        value = values.get(keyword)
        if value is None:
            continue
        uid = UID(str(value).strip())
        if uid and uid.is_valid:
            out[keyword] = str(uid)
    return out


def _check_mask(mask: np.ndarray, dataset: Dataset, n_classes: int) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"mask must be a 2D (H, W) label array, got shape {arr.shape}")
    expected = (int(dataset.Rows), int(dataset.Columns))
    if arr.shape != expected:
        raise ValueError(
            f"mask shape {arr.shape} differs from the source image size {expected} (Rows, Columns)"
        )
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(f"mask must hold integer class indices, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= n_classes):
        raise ValueError(
            f"mask labels must be in [0, {n_classes - 1}], got [{int(arr.min())}, {int(arr.max())}]"
        )
    return arr.astype(np.uint8 if n_classes <= 256 else np.uint16)


def source_for_highdicom(dataset: Dataset) -> Dataset:
    """The source as highdicom gets it to copy the patient and study from: a shallow copy with only the patient
    and study attributes a result needs to belong to the study (see ``KEPT_PATIENT_KEYWORDS``), empty Type 2
    attributes added, and Modality OT when it has none. The caller's dataset is not modified."""
    copy = Dataset()
    copy.update(dataset)  # a new element dict (Dataset(ds) and copy.copy would share the source's)
    if hasattr(dataset, "file_meta"):
        copy.file_meta = dataset.file_meta
    for tag in list(copy.keys()):  # by tag: iterating the elements would convert every value
        if tag.group in PATIENT_GROUPS and keyword_for_tag(tag) not in KEPT_PATIENT_KEYWORDS:
            del copy[tag]
    for keyword in DROPPED_STUDY_KEYWORDS:
        if keyword in copy:
            delattr(copy, keyword)
    for keyword in _TYPE2_SOURCE_KEYWORDS:
        if keyword not in copy:
            setattr(copy, keyword, "")
    if not copy.get("Modality"):
        copy.Modality = "OT"
    return copy


def new_or_checked_uid(value: str | None, keyword: str) -> str:
    """``value`` when it is a valid UID, a new random ``2.25.`` UID when it is None or empty.

    Raises:
        ValueError: ``value`` is not a valid UID (named by ``keyword``; a caller's value, quoted).
    """
    if not value:
        return str(generate_uid(prefix=None))
    if not UID(value).is_valid:
        raise ValueError(f"{keyword} {value!r} is not a valid UID")
    return value


def build_dicom_seg(
    source: DicomRef | Dataset,
    mask: np.ndarray,
    classes: Sequence[str],
    *,
    algorithm_name: str = "MedServe",
    algorithm_version: str = "",
    series_description: str = "MedServe segmentation",
    series_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> bytes:
    """Encodes a label mask as a DICOM Segmentation object referencing its source image.

    Args:
        source: the source image's ``DicomRef`` (``DecodedImage.dicom``) or its pydicom ``Dataset``.
        mask: integer (H, W) class indices at the source size (H = Rows, W = Columns); 0 is background.
        classes: class names, index = label value; ``classes[0]`` is the background.
        algorithm_name: written as the algorithm name and manufacturer model name (e.g. the model name).
        algorithm_version: the algorithm version (e.g. the checkpoint's version hash).
        series_description: SeriesDescription of the new SEG series.
        series_number: SeriesNumber of the new SEG series.
        series_instance_uid: the SEG's SeriesInstanceUID; None: a new random UID (e.g.
            ``models.dicom_uids.result_series_uid`` makes a repeat delivery land in the same series).
        sop_instance_uid: the SEG's SOPInstanceUID; None: a new random UID (e.g.
            ``models.dicom_uids.result_instance_uid`` makes a repeat delivery replace the first).

    Returns:
        The SEG as DICOM Part 10 bytes (media type ``application/dicom``).

    Raises:
        DicomSegError: the source is not DICOM or highdicom cannot reference it (e.g. an unknown SOP class).
        ValueError: bad arguments (mask shape or labels, fewer than two classes, a UID that is not one).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    dataset = _dataset_of(source)
    if len(classes) < 2:
        raise ValueError("a DICOM SEG needs a background class and at least one foreground class")
    labels = _check_mask(mask, dataset, len(classes))
    series_uid = new_or_checked_uid(series_instance_uid, "series_instance_uid")
    instance_uid = new_or_checked_uid(sop_instance_uid, "sop_instance_uid")
    version = algorithm_version or __version__
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name[:_LO_MAX], family=codes.cid7162.ArtificialIntelligence, version=version[:_LO_MAX]
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=index,
            segment_label=str(name)[:_LO_MAX],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=hd.sr.CodedConcept(
                value=str(index), scheme_designator=PRIVATE_SCHEME, meaning=str(name)[:_LO_MAX]
            ),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for index, name in enumerate(classes)
        if index > 0
    ]
    try:
        seg = hd.seg.Segmentation(
            source_images=[source_for_highdicom(dataset)],
            pixel_array=labels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=instance_uid,
            instance_number=1,
            manufacturer="MedServe",
            manufacturer_model_name=algorithm_name[:_LO_MAX],
            software_versions=__version__,
            device_serial_number=version[:_LO_MAX],
            series_description=series_description[:_LO_MAX],
            content_description=f"{algorithm_name} segmentation"[:_LO_MAX],
            omit_empty_frames=False,  # every class keeps its segment, even when nothing was found
        )
    except KeyError as exc:  # highdicom's SOP class -> IOD table; a UID is not identifying
        raise DicomSegError(
            f"cannot write a DICOM SEG: the source SOP class {dataset.get('SOPClassUID')} is not a known IOD"
        ) from exc
    except (AttributeError, TypeError, ValueError) as exc:
        # The exception text is not echoed: it could quote source attribute values.
        raise DicomSegError(f"cannot write a DICOM SEG for this source image ({type(exc).__name__})") from exc
    if "PlaneOrientationSequence" not in seg.SharedFunctionalGroupsSequence[0]:
        # A projection image (DX, CR, ...) has no plane orientation, so the General Image module's Patient
        # Orientation (Type 2C) is required: the source's own, else empty (Type 2, orientation unknown).
        seg.PatientOrientation = dataset.get("PatientOrientation", "")
    buffer = io.BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()
