"""Inputs for the fuzz tests: valid files of every format, headers that lie about the size, and mutations.

Every builder returns the bytes of a file as a client could send it. The "lying" files have a valid header
that declares a huge (or zero) width and height, followed by (almost) no pixel data: a decoder that trusted
the header would allocate gigabytes; MedServe must refuse them from the header (413) or as unreadable (400).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

SIDE = 12


def _gradient(height: int = SIDE, width: int = SIDE) -> np.ndarray:
    return (np.add.outer(np.arange(height) * 7, np.arange(width) * 11) % 256).astype(np.uint8)


def pil_bytes(array: np.ndarray, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def dicom_bytes(rows: int = SIDE, columns: int = SIDE, pixel_bytes: bytes | None = None) -> bytes:
    """A grey 8-bit DICOM Part 10 file; ``rows``/``columns`` may disagree with ``pixel_bytes`` (a lie)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Fuzz^Patient"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if pixel_bytes is None:
        pixel_bytes = _gradient(rows, columns).tobytes()
    ds.PixelData = pixel_bytes + (b"\0" if len(pixel_bytes) % 2 else b"")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def valid_files() -> dict[str, bytes]:
    """One small valid file per format and pixel layout the service reads."""
    gray = _gradient()
    rgb = np.stack([gray, gray[::-1], gray[:, ::-1]], axis=2)
    return {
        "png-gray": pil_bytes(gray, "PNG"),
        "png-rgb": pil_bytes(rgb, "PNG"),
        "png-16bit": pil_bytes(gray.astype(np.uint16) * 257, "PNG"),
        "jpeg": pil_bytes(rgb, "JPEG", quality=90),
        "tiff": pil_bytes(gray, "TIFF"),
        "bmp": pil_bytes(rgb, "BMP"),
        "dicom": dicom_bytes(),
    }


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR (valid CRC) declares ``width`` x ``height`` gray pixels, with a tiny IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small baseline JPEG whose SOF0 marker is patched to declare ``width`` x ``height``."""
    data = bytearray(pil_bytes(_gradient(), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    """A BMP whose info header is patched to declare ``width`` x ``height``."""
    data = bytearray(pil_bytes(np.stack([_gradient()] * 3, axis=2), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def dicom_claiming(rows: int, columns: int) -> bytes:
    """A DICOM file whose Rows/Columns declare ``rows`` x ``columns`` but carrying 64 bytes of pixels."""
    return dicom_bytes(rows, columns, pixel_bytes=bytes(64))


HUGE = 60_000  # 60000 x 60000 = 3.6e9 pixels: beyond PIL's own bomb limit, fits every format's header
LARGE = 8_000  # 8000 x 8000 = 6.4e7 pixels: above MAX_PIXELS (25e6 by default), below PIL's limits


def lying_files() -> dict[str, bytes]:
    """Headers declaring a decompression-bomb size (expected 413) ..."""
    files = {}
    for label, side in (("huge", HUGE), ("large", LARGE)):
        files[f"png-{label}"] = png_claiming(side, side)
        files[f"jpeg-{label}"] = jpeg_claiming(side, side)
        files[f"bmp-{label}"] = bmp_claiming(side, side)
        files[f"dicom-{label}"] = dicom_claiming(side, side)
    return files


def zero_size_files() -> dict[str, bytes]:
    """... and headers declaring no pixels at all (expected 400)."""
    return {
        "png-zero-width": png_claiming(0, 16),
        "png-zero-height": png_claiming(16, 0),
        "bmp-zero": bmp_claiming(0, 0),
        "dicom-zero-rows": dicom_claiming(0, 16),
        "jpeg-zero-width": jpeg_claiming(0, 16),
    }


@dataclass(frozen=True)
class Mutation:
    """One way to damage a file; ``apply`` is deterministic given the drawn numbers."""

    kind: str
    position: float  # relative position in the file, 0..1
    value: bytes

    def apply(self, data: bytes) -> bytes:
        at = min(len(data), int(self.position * len(data)))
        if self.kind == "truncate":
            return data[:at]
        if self.kind == "overwrite":
            return data[:at] + self.value + data[at + len(self.value) :]
        if self.kind == "insert":
            return data[:at] + self.value + data[at:]
        if self.kind == "delete":
            return data[:at] + data[at + max(1, len(self.value)) :]
        if self.kind == "wrong-magic":
            return self.value[:8].ljust(8, b"\0") + data[8:]
        raise ValueError(self.kind)


mutations = st.builds(
    Mutation,
    kind=st.sampled_from(["truncate", "overwrite", "insert", "delete", "wrong-magic"]),
    position=st.floats(min_value=0.0, max_value=1.0),
    value=st.binary(min_size=1, max_size=16),
)


def damaged_files() -> st.SearchStrategy[bytes]:
    """A valid file of any format with one to three mutations applied (truncation, flipped bytes, ...)."""
    originals = valid_files()
    return st.builds(
        lambda name, steps: _apply_all(originals[name], steps),
        st.sampled_from(sorted(originals)),
        st.lists(mutations, min_size=1, max_size=3),
    )


def _apply_all(data: bytes, steps: list[Mutation]) -> bytes:
    for step in steps:
        data = step.apply(data)
    return data


# Anything a client could send: damaged real files, random bytes, random bytes behind a real magic number.
MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"II*\0", b"MM\0*", b"BM", b"\0" * 128 + b"DICM"]
any_bytes = st.one_of(
    damaged_files(),
    st.binary(max_size=512),
    st.builds(lambda magic, tail: magic + tail, st.sampled_from(MAGICS), st.binary(max_size=512)),
    st.sampled_from([*lying_files().values(), *zero_size_files().values()]),
)
