"""Source instances for the PACS tests: pydicom's CT, a DX and a secondary capture written here, as Part 10."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def ct_path() -> Path:
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    return Path(path)


def ct_dataset() -> Dataset:
    """pydicom's 128 x 128 CT (a fresh copy each call)."""
    return pydicom.dcmread(ct_path())


def part10(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def with_new_uids(dataset: Dataset, index: int = 0, *, study: str | None = None) -> Dataset:
    """A copy with new SOP Instance (and optionally Study) UIDs, as another instance of the same kind."""
    out = copy.deepcopy(dataset)
    out.SOPInstanceUID = generate_uid(entropy_srcs=[str(dataset.SOPInstanceUID), str(index)])
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    out.InstanceNumber = index + 1
    if study:
        out.StudyInstanceUID = study
    return out


def image_dataset(
    sop_class_uid: str,
    modality: str,
    pixels: np.ndarray,
    *,
    study: str | None = None,
    series: str | None = None,
) -> Dataset:
    """A minimal single-frame MONOCHROME2 image of ``sop_class_uid`` holding ``pixels`` (uint8 or uint16)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class_uid
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.Modality = modality
    ds.PatientName = "Test^Phantom"
    ds.PatientID = "PHANTOM-1"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "MedServe tests"
    ds.PatientOrientation = ["A", "F"] if modality in ("DX", "CR", "MG", "IO") else ""
    if modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImagerPixelSpacing = [0.2, 0.2]
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.BurnedInAnnotation = "NO"
        ds.ContentDate = "20260101"
        ds.ContentTime = "120000"
        ds.AcquisitionDeviceProcessingDescription = ""
        ds.DetectorType = "DIRECT"
    if sop_class_uid == SECONDARY_CAPTURE:
        ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def dx_dataset(size: int = 64, *, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return image_dataset(DX_PRESENTATION, "DX", rng.integers(0, 4096, (size, size), dtype=np.uint16))


def png_like_secondary_capture(pixels: np.ndarray, *, study: str | None = None) -> Dataset:
    """An 8-bit secondary capture of ``pixels``: the same image as a PNG of the same values."""
    return image_dataset(SECONDARY_CAPTURE, "OT", pixels.astype(np.uint8), study=study)
