"""DICOM reading for the one image-reading path (``models.imageio``).

Pixel pipeline, as PS3.3 C.11 / C.8 describe it:
    stored values (BitsStored honoured, signed or unsigned) -> Modality LUT (RescaleSlope/Intercept or LUT)
    -> VOI LUT sequence, else the first WindowCenter/WindowWidth pair (linear function, C.11.2.1.2)
    -> scaled to [0, 1]; without any VOI information the image is min-max scaled (as 16-bit PNG/TIFF are)
    -> MONOCHROME1 inverted so that high always means bright (MONOCHROME2 convention).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from models.imageio import (
    DecodedImage,
    DicomRef,
    ImageError,
    UnprocessableImageError,
    UnsupportedImageError,
    _check_pixels,
    _scale_to_unit,
)


def _read_dataset(data: bytes, stop_before_pixels: bool = False) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels, force=False)
    except InvalidDicomError as exc:
        raise ImageError("the data is not a valid DICOM file") from exc
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise ImageError("the DICOM file could not be parsed (corrupt or truncated)") from exc


def image_size(data: bytes) -> tuple[int, int]:
    ds = _read_dataset(data, stop_before_pixels=True)
    try:
        return int(ds.Rows), int(ds.Columns)
    except AttributeError as exc:
        raise ImageError("the DICOM file has no image (Rows/Columns missing)") from exc


def _first(value: Any) -> float:
    """The first of a multi-valued attribute (several windows may be given; the first is the default)."""
    from pydicom.multival import MultiValue

    return float(value[0]) if isinstance(value, (MultiValue, list, tuple)) else float(value)


def _window(values: np.ndarray, ds: Any) -> np.ndarray | None:
    """Applies the VOI LUT or the first window; returns [0, 1] floats, or None when the file has no VOI."""
    from pydicom.pixels import apply_voi_lut

    has_lut = "VOILUTSequence" in ds
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if not (has_lut or has_window):
        return None
    if has_lut:
        out = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float32)
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
        return np.clip(out / float(2**bits - 1), 0.0, 1.0)
    c = _first(ds.WindowCenter)
    w = _first(ds.WindowWidth)
    if w < 1:
        raise ImageError("the DICOM WindowWidth must be >= 1")
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    v = values.astype(np.float64)
    if function == "LINEAR_EXACT":
        out = (v - c) / w + 0.5
    elif function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (v - c) / w))
    else:  # LINEAR, PS3.3 C.11.2.1.2.1
        out = ((v - (c - 0.5)) / (w - 1.0)) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def read_dicom(data: bytes, max_pixels: int | None = None) -> DecodedImage:
    """Decodes a single-frame 2D DICOM image to a ``DecodedImage`` (see the module doc for the pipeline)."""
    from pydicom.pixels import apply_modality_lut

    header = _read_dataset(data, stop_before_pixels=True)
    if "Rows" not in header or "Columns" not in header:
        raise UnprocessableImageError("the DICOM file holds no image (no Rows/Columns)")
    _check_pixels(int(header.Rows), int(header.Columns), max_pixels)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UnprocessableImageError(f"multi-frame DICOM ({frames} frames): only single 2D images are supported")
    ds = _read_dataset(data)
    if "PixelData" not in ds:
        raise UnprocessableImageError("the DICOM file holds no pixel data")
    try:
        stored = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        tsuid = ds.file_meta.get("TransferSyntaxUID", "unknown")
        name = getattr(tsuid, "name", str(tsuid))
        raise UnsupportedImageError(
            f"DICOM transfer syntax {name} ({tsuid}) cannot be decoded by the installed plugins"
        ) from exc
    except Exception as exc:
        raise ImageError("the DICOM pixel data could not be decoded (corrupt or truncated)") from exc
    if stored.ndim == 3 and stored.shape[-1] not in (3, 4):
        raise UnprocessableImageError("3D DICOM volumes are not supported: send single 2D images")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    bits = int(ds.get("BitsStored", 8) or 8)
    if stored.ndim == 3:  # colour
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            stored = convert_color_space(stored, photometric, "RGB")
        pixels = stored.astype(np.float32) / float(2**bits - 1)
        ref = _ref(ds)
        return DecodedImage(np.clip(pixels, 0, 1).astype(np.float32), "dicom", bits, ref)

    values = apply_modality_lut(stored, ds).astype(np.float64)
    unit = _window(values, ds)
    if unit is None:
        unit = _scale_to_unit(values)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return DecodedImage(np.ascontiguousarray(unit[:, :, None], dtype=np.float32), "dicom", bits, _ref(ds))


def _ref(ds: Any) -> DicomRef:
    return DicomRef(
        study_instance_uid=str(ds.get("StudyInstanceUID", "")) or None,
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")) or None,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")) or None,
        dataset=ds,
    )
