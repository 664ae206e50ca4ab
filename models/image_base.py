"""What every image reader shares: the decoded-image type, the typed errors, the intensity policies and the
two sample rules both PIL formats and DICOM use (the pixel-count check and per-image min-max scaling).

``models.imageio`` (the one image-reading entry point, which dispatches DICOM to ``models.dicom``) and
``models.dicom`` both import this module, so neither has to import the other's internals. The public names are
re-exported by ``models.imageio``, where callers import them from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_INTENSITY = "dicom-window"
INTENSITY_POLICIES: dict[str, str] = {
    "dicom-window": (
        "<=8-bit integer samples: v/(2**bits-1); more bits: per-image min-max; DICOM: modality LUT, then the "
        "VOI LUT or first window when present (PS3.3 C.11.2), MONOCHROME1 inverted"
    ),
    "ignore-window": (
        "as dicom-window, but DICOM VOI LUTs and windows are ignored: DICOM with more than 8 bits is min-max "
        "scaled after the modality LUT, like 16-bit PNG"
    ),
}
# The free-text default that ``Preprocessing.intensity`` carried before policies had names: it described the
# "dicom-window" pipeline, so checkpoints that record it keep that behaviour.
_LEGACY_INTENSITY = "uint8:/255; high-bit-depth and DICOM: modality LUT, VOI window (else min-max) to [0,1]"


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
    """Identifiers of a DICOM source image that may be echoed back (never patient identifiers).

    Attributes:
        study_instance_uid: StudyInstanceUID, or None when absent or not a syntactically valid UID.
        series_instance_uid: SeriesInstanceUID, likewise.
        sop_instance_uid: SOPInstanceUID, likewise.
        dataset: the full pydicom ``Dataset`` (patient data included), kept only to write DICOM SEG; never log
            or serialise it.
    """

    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    dataset: Any = field(default=None, repr=False)

    def uids(self) -> dict[str, str | None]:
        """The three UIDs keyed by their DICOM keywords (values may be None)."""
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
        format: source format, e.g. ``"png"``, ``"jpeg"``, ``"tiff"``, ``"dicom"``.
        bit_depth: bits per sample of the source (DICOM: ``BitsStored``).
        dicom: DICOM identifiers when the source was DICOM.
        normalization: how this image's samples were mapped to [0, 1]: ``"bit-depth"``, ``"min-max"``,
            ``"voi-lut"`` or ``"window-linear"`` / ``"window-linear_exact"`` / ``"window-sigmoid"``.
    """

    pixels: np.ndarray
    format: str
    bit_depth: int = 8
    dicom: DicomRef | None = None
    normalization: str = "bit-depth"

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def resolve_intensity(value: str | None) -> str:
    """Validates an intensity policy name (e.g. ``Preprocessing.intensity`` from a checkpoint).

    Args:
        value: a key of ``INTENSITY_POLICIES``; None, "" and the legacy free-text default mean the default.

    Returns:
        The policy name.

    Raises:
        ValueError: an unknown policy (e.g. a checkpoint written by a newer MedServe).
    """
    if value is None or value.strip() in ("", _LEGACY_INTENSITY):
        return DEFAULT_INTENSITY
    name = value.strip()
    if name not in INTENSITY_POLICIES:
        raise ValueError(f"unknown intensity policy {value!r}; known: {sorted(INTENSITY_POLICIES)}")
    return name


def check_pixels(height: int, width: int, max_pixels: int | None) -> None:
    """Refuses an empty image (``ImageError``) or one over ``max_pixels`` (``ImageTooLargeError``)."""
    if height <= 0 or width <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max_pixels is not None and height * width > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )


def scale_to_unit(arr: np.ndarray) -> np.ndarray:
    """Per-image min-max to [0, 1] (computed in float64; NaN/inf are treated as the minimum)."""
    values = np.asarray(arr, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        values = np.where(finite, values, np.min(values[finite]) if finite.any() else 0.0)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)
