"""Valid source instances of the IODs results are written for (CT, DX, CR), and dicom3tools' ``dciodvfy``.

``projection_dataset("DX")`` is a DX Image (For Presentation) and ``projection_dataset("CR")`` a CR Image with
every Type 1 and Type 2 attribute of their IODs (PS3.3 A.26, A.2); ``dciodvfy`` finds no error in either (a test
proves it). The CR leaves out the Type 3 Imager Pixel Spacing on purpose: a real CR may, and the SR writer must
still describe it.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from tests.components import require_program

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
CR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.1")
SOURCE_KINDS = ("CT", "DX", "CR")
PATIENT_NAME = "Roe^Richard"
PATIENT_ID = "MRN-7731"
ROWS, COLUMNS = 32, 40


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def projection_dataset(modality: str) -> Dataset:
    """A chest PA projection X-ray (``DX`` or ``CR``): 12-bit MONOCHROME2 gradient, 32 x 40 pixels."""
    if modality not in ("DX", "CR"):
        raise ValueError(f"a projection modality is DX or CR, not {modality!r}")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION if modality == "DX" else CR_IMAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # SOP Common, Patient, General Study
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.PatientBirthDate, ds.PatientSex = "19610203", "M"
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = "20240102", "101500"
    ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", "A-17"
    # General Series, General Equipment, General Image
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.Manufacturer = "Test Modality Inc."
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]  # Type 2C: a projection image has no Image Orientation (Patient)
    ds.ContentDate, ds.ContentTime = "20240102", "101500"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    # Image Pixel
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    y, x = np.mgrid[0:ROWS, 0:COLUMNS]
    pixels = (x * 4095) // (COLUMNS - 1)
    pixels[(y - ROWS // 2) ** 2 + (x - COLUMNS // 3) ** 2 < (ROWS // 4) ** 2] = 4095
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    if modality == "DX":
        # DX Series, DX Image, DX Anatomy Imaged, DX Detector, DX Positioning, Acquisition Context
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.PresentationLUTShape = "IDENTITY"
        ds.LossyImageCompression = "00"
        ds.BurnedInAnnotation = "NO"
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.ImagerPixelSpacing = [0.1, 0.1]
        ds.DetectorType = "DIRECT"
        ds.ImageLaterality = "U"
        ds.AnatomicRegionSequence = [_code("51185008", "SCT", "Chest")]
        ds.ViewCodeSequence = [_code("399348003", "SCT", "postero-anterior")]
        ds.PatientPosition = ""
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = []
    return ds


def ct_dataset() -> Dataset:
    """pydicom's bundled ``CT_small.dcm`` (a valid CT Image)."""
    return dcmread(str(get_testdata_file("CT_small.dcm", download=False)))


def source_dataset(kind: str) -> Dataset:
    """The valid source of ``kind`` (one of ``SOURCE_KINDS``)."""
    return ct_dataset() if kind == "CT" else projection_dataset(kind)


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dciodvfy(data: bytes, folder: Path) -> tuple[list[str], list[str]]:
    """dicom3tools' IOD check of a Part 10 file: (its error lines, its warning lines).

    Skips (fails under CI=true) when dicom3tools is not installed.
    """
    program = require_program("dciodvfy", "dicom3tools")
    path = folder / f"checked-{len(list(folder.glob('checked-*')))}.dcm"
    path.write_bytes(data)
    run = subprocess.run([program, str(path)], capture_output=True, text=True, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error") or line.startswith("Abort")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings
