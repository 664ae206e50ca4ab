"""The one image-reading module, used by training, evaluation and the service.

Every reader returns a ``DecodedImage`` whose ``pixels`` are float32 (H, W, C) in [0, 1]:

* 8-bit images (PNG, JPEG, BMP, TIFF): value / 255. EXIF orientation is applied; palette, LA, RGBA and CMYK
  are converted (alpha composited on black, so transparent areas read as background).
* 16-bit and float images (PNG, TIFF): min-max scaled per image, at full depth - the same rule DICOM uses when it
  carries no VOI window.
* DICOM: see ``models.dicom``.

Errors are typed so the HTTP layer can map them to status codes without inspecting messages.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")
DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageError(ValueError):
    """The bytes are not a readable image (HTTP 400)."""


class UnsupportedImageError(ImageError):
    """A recognised but unsupported encoding, e.g. a DICOM transfer syntax no plugin decodes (HTTP 415)."""


class UnprocessableImageError(ImageError):
    """A valid image the models cannot take, e.g. a multi-frame DICOM volume (HTTP 422)."""


class ImageTooLargeError(ImageError):
    """More pixels than allowed, detected from the header before decoding (HTTP 413)."""


@dataclass
class DicomRef:
    """Identifiers of a DICOM source image that may be echoed back (never patient identifiers)."""

    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    dataset: Any = field(default=None, repr=False)  # pydicom Dataset, kept for writing DICOM SEG

    def uids(self) -> dict[str, str | None]:
        return {
            "StudyInstanceUID": self.study_instance_uid,
            "SeriesInstanceUID": self.series_instance_uid,
            "SOPInstanceUID": self.sop_instance_uid,
        }


@dataclass
class DecodedImage:
    """A decoded 2D image.

    Attributes:
        pixels: float32 (H, W, C) in [0, 1], C in {1, 3}.
        format: source format, e.g. ``"png"``, ``"jpeg"``, ``"dicom"``.
        bit_depth: bits per sample of the source.
        dicom: DICOM identifiers when the source was DICOM.
    """

    pixels: np.ndarray
    format: str
    bit_depth: int = 8
    dicom: DicomRef | None = None

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def looks_like_dicom(content_type: str | None, filename: str | None) -> bool:
    ct = (content_type or "").split(";")[0].strip().lower()
    return ct == "application/dicom" or (filename or "").lower().endswith(DICOM_SUFFIXES)


def _check_pixels(height: int, width: int, max_pixels: int | None) -> None:
    if height <= 0 or width <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max_pixels is not None and height * width > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")


def _scale_to_unit(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return (arr - lo) / (hi - lo)


def _pil_to_pixels(img: Image.Image) -> tuple[np.ndarray, int]:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        bits = 32 if mode in ("I", "F") else 16
        if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 255:
            return arr.astype(np.float32)[:, :, None] / 255.0, 8
        return _scale_to_unit(arr)[:, :, None], bits
    if mode == "1":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("LA", "RGBA", "PA"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        rgb = rgba[:, :, :3] * rgba[:, :, 3:4]  # composite on black
        if mode == "LA":
            return rgb[:, :, :1], 8
        return rgb, 8
    if mode == "L":
        return np.asarray(img, dtype=np.float32)[:, :, None] / 255.0, 8
    if mode == "I;16S":
        return _scale_to_unit(np.asarray(img))[:, :, None], 16
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0, 8


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the header alone, without decoding the pixels."""
    if is_dicom(data):
        from models import dicom

        return dicom.image_size(data)
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError("the data is not a readable image") from exc


def read_image(
    data: bytes,
    *,
    content_type: str | None = None,
    filename: str | None = None,
    max_pixels: int | None = None,
) -> DecodedImage:
    """Decodes image bytes (PNG, JPEG, TIFF, BMP or DICOM) to a ``DecodedImage``.

    The pixel count is checked from the header before the pixels are decoded, so a decompression bomb costs
    nothing. ``content_type``/``filename`` only matter to tell a file that claims to be DICOM but is not.

    Raises:
        ImageError: unreadable data. Subclasses: ``ImageTooLargeError``, ``UnsupportedImageError``,
            ``UnprocessableImageError``.
    """
    if not data:
        raise ImageError("the file is empty")
    if is_dicom(data) or looks_like_dicom(content_type, filename):
        from models import dicom

        return dicom.read_dicom(data, max_pixels=max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_pixels(img.height, img.width, max_pixels)
            fmt = (img.format or "unknown").lower()
            if getattr(img, "n_frames", 1) > 1 and fmt == "tiff":
                raise UnprocessableImageError("multi-page TIFF: only single 2D images are supported")
            img = ImageOps.exif_transpose(img) or img
            img.load()
            pixels, bits = _pil_to_pixels(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(str(exc)) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError("the data is not a readable image (corrupt or truncated file)") from exc
    if pixels.shape[2] == 4:
        pixels = pixels[:, :, :3]
    return DecodedImage(np.ascontiguousarray(pixels, dtype=np.float32), fmt, bits)


def read_image_file(path: str | Path, max_pixels: int | None = None) -> DecodedImage:
    """Reads an image file from disk with ``read_image`` (the format is sniffed from the bytes)."""
    path = Path(path)
    return read_image(path.read_bytes(), filename=path.name, max_pixels=max_pixels)


def read_mask_file(path: str | Path) -> np.ndarray:
    """Reads a label mask (PNG) as integer (H, W) without any scaling."""
    with Image.open(path) as img:
        if img.mode in ("RGB", "RGBA"):
            arr = np.asarray(img.convert("L"))
        elif img.mode == "P":
            arr = np.asarray(img)  # palette indices are the labels
        else:
            arr = np.asarray(img)
    if arr.ndim != 2:
        raise ImageError(f"mask {path} is not a single-channel image")
    return arr.astype(np.int64)
