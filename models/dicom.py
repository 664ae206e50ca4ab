"""DICOM reading for the one image-reading path (``models.imageio`` dispatches DICOM here).

Pixel pipeline for a single-frame 2D image, as PS3.3 C.7.6.3, C.11 describe it:

1. Stored values, ``BitsStored`` honoured (pydicom masks unused high bits and sign-extends signed data).
2. Modality LUT: ``RescaleSlope``/``RescaleIntercept`` or the Modality LUT Sequence (e.g. CT values to HU), by
   pydicom's ``apply_modality_lut``.
3. VOI (policy ``"dicom-window"`` only): the first VOI LUT Sequence item (pydicom's ``apply_voi``), else the first
   ``WindowCenter``/``WindowWidth`` pair with ``VOILUTFunction`` LINEAR (default), LINEAR_EXACT or SIGMOID
   (PS3.3 C.11.2.1.2-3, pydicom's ``apply_windowing``), mapped to [0, 1]. An invalid window (e.g. width 0) is
   ignored.
4. Without VOI: ``v / (2**BitsStored - 1)`` when the image is unsigned, at most 8 bits and the modality LUT is the
   identity; otherwise per-image min-max over the modality values (the same rule as 16-bit PNG/TIFF).
5. ``MONOCHROME1`` is inverted (``1 - v``) so that high always means bright, as in ``MONOCHROME2``.

Colour images (RGB, YBR_* converted to RGB by the decoder, PALETTE COLOR through its LUT) are divided by the
largest value their bit depth allows. Compressed transfer syntaxes are decoded by pydicom's plugins (Pillow,
pyjpegls, pylibjpeg); one no installed plugin decodes gives ``UnsupportedImageError`` naming it.

Privacy: pydicom quotes tag values (patient names included) in its validation warnings, so on import this module
withholds the text of records on the ``pydicom`` logger and silences pydicom's ``UserWarning``s.
"""

from __future__ import annotations

import io
import logging
import warnings
import zlib
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, get_decoder
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from models.image_base import (
    DEFAULT_INTENSITY,
    DecodedImage,
    DicomRef,
    ImageError,
    ImageTooLargeError,
    UnprocessableImageError,
    UnsupportedImageError,
    check_pixels,
    resolve_intensity,
    scale_to_unit,
)

logger = logging.getLogger(__name__)

# Non-pixel data allowed on top of the pixels when a deflated dataset is inflated (see ``_check_deflated``).
_DEFLATE_HEADER_ALLOWANCE = 16 * 2**20
_BYTES_PER_PIXEL_BOUND = 24  # 3 samples x 8 bytes (double float): no real pixel data is denser
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class _WithholdMessage(logging.Filter):
    """Replaces the text of pydicom's log records: they may quote tag values such as PatientName."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = "pydicom message withheld (it may quote DICOM tag values)"
        record.args = None
        return True


# Logger filters are not inherited by child loggers, so every logger pydicom 3 creates is named.
_PYDICOM_LOGGERS = (
    "pydicom",
    "pydicom.pixels.utils",
    "pydicom.pixels.decoders.base",
    "pydicom.pixels.encoders.base",
)


def install_privacy_guards() -> None:
    """Keeps pydicom's messages, which may quote tag values, out of logs and stderr (idempotent; runs on import).

    Records on pydicom's loggers keep their level but their text is replaced; pydicom's ``UserWarning``s are
    ignored. Call it again after anything that resets warning filters (e.g. pytest between tests).
    """
    for name in _PYDICOM_LOGGERS:
        pydicom_logger = logging.getLogger(name)
        if not any(isinstance(f, _WithholdMessage) for f in pydicom_logger.filters):
            pydicom_logger.addFilter(_WithholdMessage())
    # Static filter, installed once: ``warnings.catch_warnings`` per call would race between server threads.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


install_privacy_guards()


def _outside_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 0x0002


def _check_deflated(data: bytes, max_pixels: int | None) -> None:
    """Bounds the inflated size of a Deflated Explicit VR dataset before pydicom inflates it without limit."""
    if max_pixels is None:
        return
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        # The File Meta Information (group 0002, always Explicit VR Little Endian: PS3.10 7.1) alone; reading stops
        # at the first element of another group, where the deflated data set begins. (pydicom's own
        # read_file_meta_info takes only a path.)
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_outside_file_meta)
        deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    except Exception:  # let dcmread report the problem with its usual mapping
        return
    if not deflated:
        return
    limit = max_pixels * _BYTES_PER_PIXEL_BOUND + _DEFLATE_HEADER_ALLOWANCE
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = len(inflater.decompress(data[fp.tell() :], limit + 1))
    except zlib.error as exc:
        raise ImageError("the deflated DICOM data set is corrupt") from exc
    if inflated > limit:
        raise ImageTooLargeError(
            f"the deflated DICOM data set inflates to more than {limit} bytes, more than {max_pixels} pixels need"
        )


def _read_dataset(
    data: bytes,
    *,
    stop_before_pixels: bool = False,
    max_pixels: int | None = None,
    check_elements: bool = True,
) -> Dataset:
    """Parses DICOM Part 10 bytes (pixel data kept encoded), with every element converted unless
    ``check_elements`` is False. Raises ``ImageError`` for anything else."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ImageError(
            "the data is not a DICOM Part 10 file (no 'DICM' prefix after the 128-byte preamble)"
        )
    _check_deflated(data, max_pixels)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels, force=False)
        # pydicom converts element values lazily, on first access; a damaged element (unknown VR, a length that
        # is not a multiple of the value size) would then raise wherever it is first read (in the pipeline, or
        # in the DICOM SEG writer). Convert every element now, so damage is found here and answered as 400.
        if check_elements:
            for _element in ds.iterall():
                pass
            for _element in getattr(ds, "file_meta", Dataset()).iterall():
                pass
        return ds
    except InvalidDicomError as exc:
        raise ImageError("the data is not a valid DICOM file") from exc
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise ImageError("the DICOM file could not be parsed (corrupt or truncated)") from exc


def _int(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"the DICOM attribute {keyword} is not an integer") from exc


def _geometry(ds: Dataset, max_pixels: int | None) -> tuple[int, int]:
    """Checks Rows/Columns, frames and samples from the header; returns (rows, columns)."""
    if "SOPClassUID" not in ds and "Rows" not in ds:  # every IOD has a SOP class: this parsed as junk
        raise ImageError("the data is not a valid DICOM object (no SOPClassUID)")
    if "Rows" not in ds or "Columns" not in ds:
        raise UnprocessableImageError("the DICOM file holds no image (no Rows/Columns)")
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    check_pixels(rows, cols, max_pixels)
    frames = _int(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise UnprocessableImageError(
            f"multi-frame DICOM ({frames} frames, a volume or cine): only single-frame 2D images are supported; "
            "send one frame per request"
        )
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples not in (1, 3):
        raise UnprocessableImageError(f"DICOM with {samples} samples per pixel: only 1 (grey) or 3 (colour)")
    return rows, cols


def image_size(data: bytes, *, max_pixels: int | None = None) -> tuple[int, int]:
    """(rows, columns) of a DICOM file from its header, without reading the pixel data.

    ``max_pixels`` bounds the inflation of a deflated data set (``ImageTooLargeError``); it does not check the size.
    """
    ds = _read_dataset(data, stop_before_pixels=True, max_pixels=max_pixels)
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageError("the DICOM file has no image (Rows/Columns missing)")
    return _int(ds, "Rows", 0), _int(ds, "Columns", 0)


def _transfer_syntax(ds: Dataset) -> UID:
    tsuid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if not tsuid:
        raise ImageError("the DICOM file meta information has no TransferSyntaxUID")
    return UID(str(tsuid))


def _decode(ds: Dataset) -> tuple[np.ndarray, str]:
    """Decodes the pixel data of a checked single-frame dataset; returns (array, photometric interpretation)."""
    tsuid = _transfer_syntax(ds)
    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError as exc:
        raise UnsupportedImageError(
            f"DICOM transfer syntax {tsuid.name} ({tsuid}) is not supported: no decoder exists for it"
        ) from exc
    if not decoder.is_available:
        raise UnsupportedImageError(
            f"DICOM transfer syntax {tsuid.name} ({tsuid}) cannot be decoded: no installed plugin handles it"
        )
    try:
        options: dict[str, Any] = {"as_rgb": True}  # YBR_* -> RGB
        arr, meta = decoder.as_array(ds, index=0, **options)
    except Exception as exc:
        raise ImageError(
            f"the DICOM pixel data ({tsuid.name}) could not be decoded by the installed plugins "
            "(corrupt, or an encoding variant they do not handle)"
        ) from exc
    photometric = str(
        meta.get("photometric_interpretation") or ds.get("PhotometricInterpretation", "MONOCHROME2")
    )
    return arr, photometric.strip().upper()


def _first(value: Any) -> float:
    """The first of a multi-valued attribute (several windows may be given; the first is the default)."""
    return float(value[0]) if isinstance(value, (MultiValue, list, tuple)) else float(value)


_WINDOW_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """A VOI window (PS3.3 C.11.2.1.2-3) with output range [0, 1], computed by ``pydicom.pixels.apply_windowing``.

    Args:
        values: modality LUT output, any shape.
        center: WindowCenter.
        width: WindowWidth (>= 1 for LINEAR, > 0 otherwise).
        function: VOILUTFunction, LINEAR (the default), LINEAR_EXACT or SIGMOID.

    Returns:
        float32 array of the same shape in [0, 1].

    Raises:
        ValueError: an invalid width or an unknown function.
    """
    function = function.strip().upper() or "LINEAR"
    c, w = float(center), float(width)
    if function not in _WINDOW_FUNCTIONS:
        raise ValueError(f"unknown VOILUTFunction {function!r}")
    # Checked here although pydicom checks too: its ``width < 1`` lets a NaN width through.
    if function == "LINEAR" and not w >= 1.0:
        raise ValueError(f"LINEAR window width must be >= 1, got {w}")
    if function != "LINEAR" and not w > 0.0:
        raise ValueError(f"{function} window width must be > 0, got {w}")
    # A dataset of its own, not the file's: pydicom scales the window's output to the range the stored values can
    # take (BitsStored, PixelRepresentation, rescale) and casts those attributes in the dataset it is given. One
    # unsigned bit and no rescale make that range [0, 1] exactly (ymin 0, ymax 1): PS3.3's arithmetic on
    # MedServe's output range, bit for bit the numbers of the implementation this replaced, with no rescaling.
    window = Dataset()
    window.WindowCenter = c
    window.WindowWidth = w
    window.VOILUTFunction = function
    window.BitsStored = 1
    window.PixelRepresentation = 0
    # Windowing is the same for both; MONOCHROME1 is inverted after it (see ``_grey_to_unit``).
    window.PhotometricInterpretation = "MONOCHROME2"
    # NaN samples, the unused ramp of a 1-wide LINEAR threshold, and SIGMOID's exp overflowing far below the
    # centre would each warn. The overflow's 1 / (1 + inf) = 0 is the right limit (the code this replaced
    # clipped the exponent at 700 instead: the same float32 result).
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = apply_windowing(np.asarray(values, dtype=np.float64), window)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _voi(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str] | None:
    """The VOI LUT or first window in [0, 1] with its name, or None when the file has no usable VOI."""
    sequence = ds.get("VOILUTSequence")
    if sequence:
        item = sequence[0]
        try:
            entries, first_map, bits = (int(v) for v in item.LUTDescriptor)
            entries = entries or 2**16
            # Integer input clipped to the LUT's domain: pydicom's lookup would wrap outside uint16.
            lut_input = np.clip(np.rint(values), first_map, first_map + entries - 1).astype(np.int64)
            out = apply_voi(lut_input, ds, index=0).astype(np.float64)
            return np.clip(out / float(2**bits - 1), 0.0, 1.0).astype(np.float32), "voi-lut"
        except (AttributeError, KeyError, TypeError, ValueError, IndexError, NotImplementedError):
            logger.warning("ignoring an unusable DICOM VOI LUT Sequence")
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in _WINDOW_FUNCTIONS:
        logger.warning("unknown DICOM VOILUTFunction; using LINEAR as PS3.3 defines for the default")
        function = "LINEAR"
    try:
        return apply_window(values, _first(center), _first(width), function), f"window-{function.lower()}"
    except (TypeError, ValueError, IndexError):
        logger.warning("ignoring an invalid DICOM window (WindowCenter/WindowWidth)")
        return None


def _is_identity_modality(ds: Dataset) -> bool:
    if ds.get("ModalityLUTSequence"):
        return False
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return True
    return slope == 1.0 and intercept == 0.0


def _grey_to_unit(
    stored: np.ndarray, ds: Dataset, photometric: str, intensity: str
) -> tuple[np.ndarray, str]:
    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise ImageError("the DICOM modality LUT (RescaleSlope/Intercept or LUT) is invalid") from exc
    result = _voi(values, ds) if intensity == "dicom-window" else None
    if result is None:
        bits = _int(ds, "BitsStored", 8)
        unsigned = _int(ds, "PixelRepresentation", 0) == 0
        if np.issubdtype(stored.dtype, np.integer) and unsigned and bits <= 8 and _is_identity_modality(ds):
            result = (values / float(2**bits - 1)).astype(np.float32), "bit-depth"
        else:
            result = scale_to_unit(values), "min-max"
    unit, how = result
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return unit, how


def read_dicom(
    data: bytes,
    max_pixels: int | None = None,
    *,
    intensity: str = DEFAULT_INTENSITY,
    check_elements: bool = True,
) -> DecodedImage:
    """Decodes a single-frame 2D DICOM image to a ``DecodedImage`` (pipeline in the module docstring).

    Args:
        data: DICOM Part 10 bytes.
        max_pixels: largest allowed Rows * Columns, checked from the header before decoding; None = no limit.
        intensity: intensity policy name (``models.imageio.INTENSITY_POLICIES``).
        check_elements: convert every element before decoding, so that a damaged one is an ``ImageError``
            here; False for an instance checked before (the job system's intake checks each on arrival).

    Returns:
        pixels float32 (H, W, 1) for grey or (H, W, 3) for colour, in [0, 1], with the UIDs and the dataset.

    Raises:
        ImageError: not DICOM or corrupt (400); ``ImageTooLargeError`` (413); ``UnsupportedImageError`` for a
            transfer syntax no installed plugin decodes (415); ``UnprocessableImageError`` for multi-frame,
            volumes or files without an image (422).
    """
    policy = resolve_intensity(intensity)
    ds = _read_dataset(data, max_pixels=max_pixels, check_elements=check_elements)
    rows, cols = _geometry(ds, max_pixels)  # before any pixel is decoded
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise UnprocessableImageError("the DICOM file holds no pixel data")
    arr, photometric = _decode(ds)
    if arr.shape[:2] != (rows, cols) or arr.ndim not in (2, 3):
        raise UnprocessableImageError(f"DICOM pixel data has shape {arr.shape}: only 2D images are supported")
    bits = _int(ds, "BitsStored", 8 * arr.dtype.itemsize)
    if arr.ndim == 2 and photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as exc:
            raise ImageError("the DICOM palette colour lookup table is invalid") from exc
        lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        pixels = rgb.astype(np.float32) / float(2**lut_bits - 1)
        how = "bit-depth"
    elif arr.ndim == 3:
        pixels = arr.astype(np.float32) / float(2**bits - 1)
        how = "bit-depth"
    else:
        unit, how = _grey_to_unit(arr, ds, photometric, policy)
        pixels = unit[:, :, None]
    pixels = np.ascontiguousarray(np.clip(pixels, 0.0, 1.0), dtype=np.float32)
    return DecodedImage(pixels, "dicom", bits, _ref(ds), normalization=how)


def _valid_uid(ds: Dataset, keyword: str) -> str | None:
    """The UID when present and syntactically valid (so a crafted 'UID' cannot carry other text to a client)."""
    value = ds.get(keyword)
    if value is None:
        return None
    uid = UID(str(value).strip())
    return str(uid) if uid and uid.is_valid else None


def _ref(ds: Dataset) -> DicomRef:
    return DicomRef(
        study_instance_uid=_valid_uid(ds, "StudyInstanceUID"),
        series_instance_uid=_valid_uid(ds, "SeriesInstanceUID"),
        sop_instance_uid=_valid_uid(ds, "SOPInstanceUID"),
        dataset=ds,
    )
