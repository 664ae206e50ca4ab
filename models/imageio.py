"""The one image-reading module, used by training, evaluation and the service.

Every reader returns a ``DecodedImage`` whose ``pixels`` are float32 (H, W, C) in [0, 1], C in {1, 3}. The
mapping from stored sample values to [0, 1] is the *intensity policy* (``INTENSITY_POLICIES``); its name is what
``Preprocessing.intensity`` records in a checkpoint, so serving reproduces what training saw. Both policies share
these rules and differ only in whether a DICOM VOI window is used:

* Integer samples declared with at most 8 bits (8-bit PNG/JPEG/BMP/TIFF, 1-bit images, and DICOM with
  ``BitsStored`` <= 8, unsigned, identity modality LUT): ``value / (2**bits - 1)``, so an 8-bit DICOM and the same
  image as 8-bit PNG read identically.
* More than 8 bits (16-bit PNG/TIFF, 32-bit integer and float TIFF, DICOM with ``BitsStored`` > 8 or a
  non-identity modality LUT) and no VOI window: per-image min-max, ``(v - min) / (max - min)`` (all zeros for a
  constant image). A 16-bit PNG and the same samples as DICOM therefore read identically.
* DICOM with a VOI LUT or window, under ``"dicom-window"`` only: the window decides (``models.dicom``).
* Colour: 8 bits per sample / 255 (DICOM colour: / (2**BitsStored - 1)). EXIF orientation is applied; palette,
  LA, RGBA and CMYK are converted to grey or RGB, and alpha is composited on black (transparent = background).

Errors are typed so the HTTP layer can map them to status codes without inspecting messages.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models import dicom
from models.image_base import (
    DEFAULT_INTENSITY,
    INTENSITY_POLICIES,
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

# The shared types live in models.image_base (so that models.dicom need not import this module); callers keep
# importing them from here.
__all__ = [
    "DEFAULT_INTENSITY",
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "INTENSITY_POLICIES",
    "DecodedImage",
    "DicomRef",
    "ImageError",
    "ImageTooLargeError",
    "UnprocessableImageError",
    "UnsupportedImageError",
    "image_size",
    "is_dicom",
    "looks_like_dicom",
    "read_image",
    "read_image_file",
    "read_mask_file",
    "resolve_intensity",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")

_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I", "F")


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def looks_like_dicom(content_type: str | None, filename: str | None) -> bool:
    """Whether the client says the data is DICOM (content type ``application/dicom`` or a .dcm/.dicom name)."""
    ct = (content_type or "").split(";")[0].strip().lower()
    return ct == "application/dicom" or (filename or "").lower().endswith(DICOM_SUFFIXES)


# What PIL's decoders raise for damaged files (a TIFF with a corrupt tag table raises TypeError "Missing
# dimensions"; struct.error is raised by header parsers). All mean the client's bytes are bad: 400, not 500.
_PIL_DECODE_ERRORS: tuple[type[Exception], ...] = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    TypeError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    struct.error,
)
_MASK_READ_ERRORS: tuple[type[Exception], ...] = (Image.DecompressionBombError, *_PIL_DECODE_ERRORS)


def _high_depth_bits(img: Image.Image) -> int:
    tiff_bits = getattr(img, "tag_v2", {}).get(258) if img.format == "TIFF" else None
    if isinstance(tiff_bits, tuple):
        tiff_bits = tiff_bits[0]
    if isinstance(tiff_bits, int) and tiff_bits > 8:
        return tiff_bits
    return 16 if img.mode.startswith("I;16") else 32


def _pil_to_pixels(img: Image.Image) -> tuple[np.ndarray, int, str]:
    """Converts an opened PIL image to float (H, W, C) in [0, 1]; returns (pixels, bit depth, normalization)."""
    mode = img.mode
    if mode in _HIGH_DEPTH_MODES:
        return scale_to_unit(np.asarray(img))[:, :, None], _high_depth_bits(img), "min-max"
    bits = 1 if mode == "1" else 8
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode not in ("1", "L", "LA", "RGB", "RGBA", "PA"):
        try:  # CMYK, YCbCr, RGBX, ...: PIL's own conversion (Adobe-inverted CMYK JPEGs are handled by PIL)
            img = img.convert("RGB")
        except ValueError as exc:
            raise UnsupportedImageError(f"image mode {mode} cannot be converted to RGB") from exc
    if img.mode in ("LA", "RGBA", "PA"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        rgb = rgba[:, :, :3] * rgba[:, :, 3:4]  # composited on black: transparent areas read as background
        return (rgb[:, :, :1] if img.mode == "LA" else rgb), bits, "bit-depth"
    if img.mode in ("1", "L"):
        return np.asarray(img.convert("L"), dtype=np.float32)[:, :, None] / 255.0, bits, "bit-depth"
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0, bits, "bit-depth"


def image_size(data: bytes, *, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) from the header alone, without decoding the pixels.

    Args:
        data: the encoded file.
        max_pixels: only bounds the inflation of a deflated DICOM data set (see ``models.dicom``); the size
            itself is returned, not checked.

    Raises:
        ImageError: the header is unreadable (``ImageTooLargeError`` for a deflated DICOM bomb).
    """
    if is_dicom(data):
        return dicom.image_size(data, max_pixels=max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width
    except Image.DecompressionBombError as exc:
        # PIL refuses headers above twice its own limit (about 179 M pixels) while opening them.
        raise ImageTooLargeError("the image header declares more pixels than any limit allows") from exc
    except _PIL_DECODE_ERRORS as exc:
        raise ImageError("the data is not a readable image") from exc


def read_image(
    data: bytes,
    *,
    content_type: str | None = None,
    filename: str | None = None,
    max_pixels: int | None = None,
    intensity: str = DEFAULT_INTENSITY,
    check_elements: bool = True,
) -> DecodedImage:
    """Decodes image bytes (PNG, JPEG, TIFF, BMP or DICOM) to a ``DecodedImage``.

    The format is sniffed from the bytes. The pixel count is checked from the header before the pixels are
    decoded, so a decompression bomb costs nothing. ``content_type``/``filename`` only matter to tell a file that
    claims to be DICOM but is not (400).

    Args:
        data: the encoded file.
        content_type: the client's content type, if any.
        filename: the client's file name, if any (never logged).
        max_pixels: largest allowed height * width, or None for no limit.
        intensity: intensity policy name (``INTENSITY_POLICIES``; see ``resolve_intensity``).
        check_elements: DICOM: convert every element first, so that a damaged one is found here (400) rather
            than wherever it is read (``models.dicom.read_dicom``); False for an instance checked before.

    Returns:
        The decoded image, pixels float32 (H, W, C) in [0, 1].

    Raises:
        ImageError: unreadable data (400). Subclasses: ``ImageTooLargeError`` (413), ``UnsupportedImageError``
            (415), ``UnprocessableImageError`` (422).
        ValueError: an unknown intensity policy (a configuration error, not the client's).
    """
    policy = resolve_intensity(intensity)
    if not data:
        raise ImageError("the file is empty")
    if is_dicom(data) or looks_like_dicom(content_type, filename):
        return dicom.read_dicom(data, max_pixels=max_pixels, intensity=policy, check_elements=check_elements)
    try:
        # Image.open reads only the header. (No per-call warnings.catch_warnings: it swaps process-wide state and
        # races between server threads; max_pixels is checked here, and PIL itself refuses > 2x its own limit.)
        img: Image.Image = Image.open(io.BytesIO(data))
        check_pixels(img.height, img.width, max_pixels)
        fmt = (img.format or "unknown").lower()
        if getattr(img, "n_frames", 1) > 1 and fmt == "tiff":
            raise UnprocessableImageError("multi-page TIFF: only single 2D images are supported")
        img.load()
        img = ImageOps.exif_transpose(img) or img
        pixels, bits, how = _pil_to_pixels(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(str(exc)) from exc
    except _PIL_DECODE_ERRORS as exc:
        raise ImageError("the data is not a readable image (corrupt or truncated file)") from exc
    return DecodedImage(np.ascontiguousarray(pixels, dtype=np.float32), fmt, bits, normalization=how)


def read_image_file(
    path: str | Path, max_pixels: int | None = None, *, intensity: str = DEFAULT_INTENSITY
) -> DecodedImage:
    """Reads an image file from disk with ``read_image`` (format sniffed from the bytes; .dcm names => DICOM)."""
    path = Path(path)
    return read_image(path.read_bytes(), filename=path.name, max_pixels=max_pixels, intensity=intensity)


def read_mask_file(path: str | Path) -> np.ndarray:
    """Reads a label mask image (PNG, TIFF, ...) as integer (H, W) labels without any scaling.

    Palette images give their palette indices; 8/16-bit grey gives the stored values; RGB(A) masks must be grey
    (R = G = B), whose value is the label; alpha is ignored.

    Raises:
        ImageError: unreadable file, or a colour mask whose channels differ (the message names the file).
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            # Grey or palette index plus alpha: the first band holds the labels.
            arr = np.asarray(opened.getchannel(0) if opened.mode in ("LA", "PA") else opened)
    except _MASK_READ_ERRORS as exc:
        raise ImageError(f"mask {path} is not a readable image") from exc
    if arr.ndim == 3:
        rgb = arr[:, :, :3]
        if not (np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2])):
            raise ImageError(f"mask {path} is a colour image; save labels as grey or palette (index) PNG")
        arr = rgb[:, :, 0]
    if arr.ndim != 2:
        raise ImageError(f"mask {path} is not a single-channel image")
    return arr.astype(np.int64)
