"""DICOM output of a classification: a Structured Report (IHE AI Results) for one classified source image.

``build_dicom_sr`` writes a Comprehensive 3D SR (SOP class 1.2.840.10008.5.1.4.1.1.88.34) holding a TID 1500
Measurement Report, with highdicom:

* the observation context names the model as the observing device (TID 1004: manufacturer ``MedServe``, model
  name = the model's name) and the image library lists the source image;
* one measurement group (TID 1501, tracking identifier ``MedServe classification``) references the source image
  and the algorithm (name, version), and holds
    - the predicted label as a qualitative evaluation: concept ``(278201002, SCT, "Classification")``, value the
      class code;
    - each class probability as a numeric measurement: concept ``(prob-<index>, 99MEDSERVE, "Probability of
      <class>")``, value in [0, 1], unit UCUM ``{probability}``;
* ``VerificationFlag`` UNVERIFIED (nobody has checked it), ``PreliminaryFlag`` PRELIMINARY, ``CompletionFlag``
  COMPLETE;
* the model in the Contributing Equipment Sequence (purpose ``(109102, DCM, "Processing Equipment")``,
  manufacturer ``MedServe``, manufacturer model name = model name, software versions = model version).

Class codes are the ones the DICOM SEG uses (``models.dicom_seg``): the class index in the private scheme
``99MEDSERVE``, the class name as meaning. The SR belongs to the source's study (patient and study attributes
copied from the source as the IOD requires, empty when the source lacks a Type 2 one) and is a new series named
after the model; nothing else of the source is copied.
"""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import Mapping, Sequence

from pydicom.dataset import Dataset

from models import __version__
from models.dicom import install_privacy_guards
from models.dicom_seg import PRIVATE_SCHEME, new_or_checked_uid, source_for_highdicom
from models.dicom_uids import MEDSERVE_NAMESPACE
from models.image_base import DicomRef

install_privacy_guards()  # already run by importing models.dicom; explicit because highdicom drives pydicom too

SR_MEDIA_TYPE = "application/dicom"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
MANUFACTURER = "MedServe"
TRACKING_IDENTIFIER = "MedServe classification"
PROBABILITY_UNIT = ("{probability}", "UCUM", "probability")  # UCUM: the unit 1, annotated
# The concept name of the predicted label (DCM 121071 "Finding" names a group's finding type in TID 1501).
CLASSIFICATION = ("278201002", "SCT", "Classification")
_LO_MAX = 64  # DICOM LO value length (code meanings, names)


class DicomSrError(ValueError):
    """A DICOM SR cannot be written for this source image (e.g. an unknown SOP class); HTTP 422 at the API."""


def probability_code_value(index: int) -> str:
    """The code value (SH, at most 16 characters) of the probability of class ``index``."""
    return f"prob-{index}"


def device_uid(model_name: str) -> str:
    """The observer device UID of a model: the same for every report of that model (a ``2.25.`` OID)."""
    return "2.25." + str(uuid.uuid5(MEDSERVE_NAMESPACE, "device\x1f" + model_name).int)


def _probabilities(
    probabilities: Mapping[str, float] | Sequence[float], classes: Sequence[str] | None
) -> list[tuple[int, str, float]]:
    """(class index, class name, probability) for each reported class, in the order given."""
    if isinstance(probabilities, Mapping):
        names = [str(name) for name in probabilities]
        values = [float(value) for value in probabilities.values()]
        if classes is None:
            classes = names
        unknown = [name for name in names if name not in classes]
        if unknown:
            raise ValueError(f"probabilities of classes the model does not have: {unknown}")
        indices = [list(classes).index(name) for name in names]
    else:
        if classes is None:
            raise ValueError("probabilities given as a sequence need the class names (classes=...)")
        values = [float(value) for value in probabilities]
        if len(values) != len(classes):
            raise ValueError(f"{len(values)} probabilities for {len(classes)} classes")
        names, indices = [str(name) for name in classes], list(range(len(classes)))
    if not values:
        raise ValueError("a classification report needs at least one class probability")
    if len(set(names)) != len(names):
        raise ValueError("class names must be unique")
    bad = [value for value in values if not (math.isfinite(value) and 0.0 <= value <= 1.0)]
    if bad:
        raise ValueError(f"probabilities must be in [0, 1], got {bad}")
    return list(zip(indices, names, values, strict=True))


def library_dataset(dataset: Dataset) -> Dataset:
    """The dataset the image library entry is described from: ``dataset`` itself, or, when highdicom cannot
    write the modality's descriptors (TID 1603/1604) for it because an attribute they need is optional, absent
    or empty (e.g. a CR without Imager Pixel Spacing, an empty Patient Orientation, an MR without Slice
    Thickness), a copy without Modality, so the entry keeps the common descriptors (modality from the SOP class,
    rows, columns) and omits the others.

    Raises:
        KeyError, ValueError: the SOP class is no image storage class highdicom knows.
        AttributeError, TypeError: the dataset lacks what every image has (Rows, Columns).
    """
    import highdicom as hd

    try:
        hd.sr.ImageLibraryEntryDescriptors(dataset)
        return dataset
    except (AttributeError, IndexError, TypeError, ValueError):
        common = Dataset()
        common.update(dataset)
        common.Modality = ""
        hd.sr.ImageLibraryEntryDescriptors(common)  # the common descriptors alone; raises as documented
        return common


def build_dicom_sr(
    source: DicomRef | Dataset,
    probabilities: Mapping[str, float] | Sequence[float],
    label: str | None = None,
    *,
    classes: Sequence[str] | None = None,
    model_name: str = "MedServe",
    model_version: str = "",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_description: str | None = None,
    series_number: int = 1,
) -> bytes:
    """Encodes a classification of one source image as a DICOM Comprehensive 3D SR (TID 1500).

    Args:
        source: the source image's ``DicomRef`` (``DecodedImage.dicom``) or its pydicom ``Dataset``.
        probabilities: class name -> probability (reported in that order), or one probability per class of
            ``classes`` (in class order).
        label: the predicted class; None: the most probable one (the first of equals).
        classes: the model's class names, index = class code value; needed for a sequence of probabilities,
            and for a mapping that holds only some classes (e.g. the top k) so that codes keep their index.
        model_name: the model's name: observer device name, manufacturer model name, algorithm name.
        model_version: the model's version (e.g. the checkpoint hash): software versions, algorithm version.
        series_instance_uid / sop_instance_uid: the SR's UIDs; None: new random ones (pass
            ``models.dicom_uids.result_series_uid`` / ``result_instance_uid`` for deterministic ones).
        series_description: SeriesDescription of the new series; None: ``MedServe <model> classification``.
        series_number: SeriesNumber of the new series.

    Returns:
        The SR as DICOM Part 10 bytes (media type ``application/dicom``).

    Raises:
        DicomSrError: the source is not DICOM or highdicom cannot reference it (e.g. an unknown SOP class).
        ValueError: bad arguments (probabilities out of [0, 1], unknown label or class, a UID that is not one).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    dataset = source.dataset if isinstance(source, DicomRef) else source
    if not isinstance(dataset, Dataset):
        raise DicomSrError("a DICOM SR needs the source DICOM dataset; the input was not DICOM")
    reported = _probabilities(probabilities, classes)
    if label is None:
        predicted = max(reported, key=lambda entry: entry[2])
    else:
        matches = [entry for entry in reported if entry[1] == label]
        if not matches:
            raise ValueError(f"the predicted label {label!r} is not one of the reported classes")
        predicted = matches[0]
    series_uid = new_or_checked_uid(series_instance_uid, "series_instance_uid")
    instance_uid = new_or_checked_uid(sop_instance_uid, "sop_instance_uid")
    version = (model_version or __version__)[:_LO_MAX]
    name = model_name[:_LO_MAX]

    def class_code(index: int, class_name: str) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(
            value=str(index), scheme_designator=PRIVATE_SCHEME, meaning=class_name[:_LO_MAX]
        )

    unit = hd.sr.CodedConcept(*PROBABILITY_UNIT)
    source_copy = source_for_highdicom(dataset)
    try:
        library_source = library_dataset(source_copy)
    except (KeyError, ValueError) as exc:  # highdicom knows no image storage class of that UID
        raise DicomSrError(
            f"cannot write a DICOM SR: the source SOP class {dataset.get('SOPClassUID')} is not a known image "
            "storage class"
        ) from exc
    except (AttributeError, TypeError) as exc:  # not echoed: it could quote source attribute values
        raise DicomSrError(f"cannot write a DICOM SR for this source image ({type(exc).__name__})") from exc
    try:
        observer = hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid(model_name), name=name, manufacturer_name=MANUFACTURER, model_name=name
            ),
        )
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=new_or_checked_uid(None, "tracking uid"), identifier=TRACKING_IDENTIFIER
            ),
            algorithm_id=hd.sr.AlgorithmIdentification(name=name, version=version),
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source_copy)],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(
                    name=hd.sr.CodedConcept(*CLASSIFICATION), value=class_code(predicted[0], predicted[1])
                )
            ],
            measurements=[
                hd.sr.Measurement(
                    name=hd.sr.CodedConcept(
                        value=probability_code_value(index),
                        scheme_designator=PRIVATE_SCHEME,
                        meaning=f"Probability of {class_name}"[:_LO_MAX],
                    ),
                    value=value,
                    unit=unit,
                )
                for index, class_name, value in reported
            ],
        )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=codes.SCT.ImagingProcedure,
            imaging_measurements=[group],
            referenced_images=[library_source],
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=[source_copy],
            content=report,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=instance_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description=(series_description or f"MedServe {model_name} classification")[:_LO_MAX],
            manufacturer_model_name=name,
            software_versions=version,
            contributing_equipment=[
                hd.ContributingEquipment(
                    manufacturer=MANUFACTURER,
                    purpose_of_reference=codes.DCM.ProcessingEquipment,
                    manufacturer_model_name=name,
                    software_versions=version,
                    contribution_description=f"The model {name} that classified the source image",
                )
            ],
        )
    except KeyError as exc:  # highdicom's SOP class tables; a UID is not identifying
        raise DicomSrError(
            f"cannot write a DICOM SR: the source SOP class {dataset.get('SOPClassUID')} is not a known IOD"
        ) from exc
    except (AttributeError, TypeError, ValueError) as exc:
        # The exception text is not echoed: it could quote source attribute values.
        raise DicomSrError(f"cannot write a DICOM SR for this source image ({type(exc).__name__})") from exc
    buffer = io.BytesIO()
    sr.save_as(buffer)
    return buffer.getvalue()
