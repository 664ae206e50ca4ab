"""DICOM reading: the PS3.3 pixel pipeline, transfer syntaxes, rejections, and privacy of pydicom's messages."""

from __future__ import annotations

import io
import logging
import math
import struct
import warnings
from typing import Any

import numpy as np
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from models import dicom
from models.imageio import (
    ImageError,
    ImageTooLargeError,
    UnprocessableImageError,
    UnsupportedImageError,
    image_size,
    read_image,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")

PATIENT_NAME = "Doe^Jane^Quincy"
MPEG4_AVC = UID(
    "1.2.840.10008.1.2.4.102"
)  # a video syntax: pydicom has no decoder for it, whatever is installed


def make_dataset(
    stored: np.ndarray,
    *,
    bits_stored: int = 16,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    transfer_syntax: UID = ExplicitVRLittleEndian,
    **attributes: Any,
) -> Dataset:
    """A single-frame grey DICOM dataset with the given stored values (H, W), patient data included."""
    bits_allocated = 8 if bits_stored <= 8 and not signed else 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "MRN-0042"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(bits_allocated, signed)]
    ds.PixelData = stored.astype(dtype).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def make_dicom(stored: np.ndarray, **kwargs: Any) -> bytes:
    """DICOM Part 10 bytes of ``make_dataset``."""
    return to_bytes(make_dataset(stored, **kwargs))


def anatomy(height: int = 24, width: int = 32, peak: int = 4095) -> np.ndarray:
    """A deterministic 12-bit 'phantom': a gradient with a bright disc, values spanning [0, peak]."""
    y, x = np.mgrid[0:height, 0:width]
    img = (x / (width - 1)) * 0.6 * peak
    img[(y - height / 2) ** 2 + (x - width / 3) ** 2 < (height / 4) ** 2] = peak
    return np.rint(img).astype(np.int64)


# PS3.3 C.11.2.1.2.1 / C.11.2.1.3.1 / C.11.2.1.3.2, written out per value with ymin = 0 and ymax = 1.
def standard_window(x: float, c: float, w: float, function: str) -> float:
    if function == "LINEAR":
        if x <= c - 0.5 - (w - 1) / 2:
            return 0.0
        if x > c - 0.5 + (w - 1) / 2:
            return 1.0
        return ((x - (c - 0.5)) / (w - 1) + 0.5) * (1 - 0) + 0
    if function == "LINEAR_EXACT":
        if x <= c - w / 2:
            return 0.0
        if x > c + w / 2:
            return 1.0
        return ((x - c) / w + 0.5) * (1 - 0) + 0
    assert function == "SIGMOID"
    return (1 - 0) / (1 + math.exp(-4 * (x - c) / w)) + 0


def grey(data: bytes, **kwargs: Any) -> np.ndarray:
    image = read_image(data, **kwargs)
    assert image.format == "dicom" and image.pixels.shape[2] == 1 and image.pixels.dtype == np.float32
    return image.pixels[:, :, 0]


@pytest.mark.parametrize("window", [None, ("LINEAR_EXACT", 1500.0, 2000.0)])
def test_monochrome1_and_monochrome2_of_the_same_anatomy_read_the_same(
    window: tuple[str, float, float] | None,
):
    values = anatomy()
    extra2: dict[str, Any] = {}
    extra1: dict[str, Any] = {}
    if window is not None:
        function, center, width = window
        extra2 = {"VOILUTFunction": function, "WindowCenter": center, "WindowWidth": width}
        # The same window expressed on the inverted stored values.
        extra1 = {"VOILUTFunction": function, "WindowCenter": 4095 - center, "WindowWidth": width}
    mono2 = grey(make_dicom(values, bits_stored=12, **extra2))
    mono1 = grey(make_dicom(4095 - values, bits_stored=12, photometric="MONOCHROME1", **extra1))
    np.testing.assert_allclose(mono1, mono2, atol=1e-6)
    assert mono2.max() > mono2.min()  # the phantom is not flat, so the comparison means something


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_rescale_then_window_follows_ps3_3(function: str):
    stored = np.arange(0, 2000, 7, dtype=np.int64).reshape(1, -1)  # includes the window edges
    slope, intercept, center, width = 2.0, -1024.0, 40.0, 400.0
    data = make_dicom(
        stored,
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        WindowCenter=center,
        WindowWidth=width,
        VOILUTFunction=function,
    )
    image = read_image(data)
    expected = [standard_window(slope * s + intercept, center, width, function) for s in stored.ravel()]
    np.testing.assert_allclose(image.pixels[0, :, 0], expected, atol=1e-6)
    assert image.normalization == f"window-{function.lower()}"


def test_linear_window_of_width_one_is_a_threshold():
    stored = np.array([[99, 100, 101, 102]])
    pixels = grey(make_dicom(stored, WindowCenter=101, WindowWidth=1))
    np.testing.assert_array_equal(
        pixels[0], [standard_window(v, 101, 1, "LINEAR") for v in (99, 100, 101, 102)]
    )
    np.testing.assert_array_equal(pixels[0], [0, 0, 1, 1])  # x <= c - 0.5 -> 0, else 1


def test_first_of_several_windows_is_used():
    stored = np.arange(0, 4096, 64).reshape(1, -1)
    pixels = grey(make_dicom(stored, WindowCenter=[1000, 3000], WindowWidth=[500, 100]))
    expected = np.array([standard_window(float(v), 1000, 500, "LINEAR") for v in stored.ravel()])
    np.testing.assert_allclose(pixels[0], expected, atol=1e-6)


def test_without_window_the_modality_values_are_min_max_scaled():
    stored = np.array([[0, 100, 200, 400]])
    image = read_image(make_dicom(stored, RescaleSlope=3, RescaleIntercept=-50))
    np.testing.assert_allclose(image.pixels[0, :, 0], [0, 0.25, 0.5, 1.0], atol=1e-7)
    assert image.normalization == "min-max"


def test_negative_rescale_slope_inverts_intensities():
    stored = np.array([[0, 100, 400]])
    pixels = grey(make_dicom(stored, RescaleSlope=-1, RescaleIntercept=0))
    np.testing.assert_allclose(pixels[0], [1.0, 0.75, 0.0], atol=1e-7)


def test_signed_16_bit_values_keep_their_sign():
    stored = np.array([[-32768, -1000, 0, 1000, 32767]])
    pixels = grey(
        make_dicom(stored, signed=True, WindowCenter=0, WindowWidth=2001, VOILUTFunction="LINEAR_EXACT")
    )
    expected = [standard_window(v, 0, 2001, "LINEAR_EXACT") for v in stored.ravel()]
    np.testing.assert_allclose(pixels[0], expected, atol=1e-6)
    unwindowed = grey(make_dicom(stored, signed=True))
    np.testing.assert_allclose(unwindowed[0], (stored[0] + 32768) / 65535, atol=1e-6)


def test_bits_stored_12_ignores_garbage_in_the_unused_high_bits():
    clean = anatomy()
    dirty = clean | 0xA000  # bits 13 and 15 set: outside BitsStored = 12
    np.testing.assert_array_equal(
        grey(make_dicom(dirty, bits_stored=12, WindowCenter=2048, WindowWidth=4096)),
        grey(make_dicom(clean, bits_stored=12, WindowCenter=2048, WindowWidth=4096)),
    )


def test_signed_12_bit_twos_complement_is_sign_extended():
    values = np.array([[-2048, -1, 0, 2047]])
    raw = (values & 0x0FFF).astype(np.uint16).view(np.int16)  # 12-bit two's complement, high bits clear
    pixels = grey(make_dicom(raw, bits_stored=12, signed=True, WindowCenter=0, WindowWidth=4096))
    expected = [standard_window(v, 0, 4096, "LINEAR") for v in values.ravel()]
    np.testing.assert_allclose(pixels[0], expected, atol=1e-6)
    assert pixels[0, 0] == 0.0 and pixels[0, 3] == 1.0


def test_voi_lut_sequence_is_applied_before_windows():
    lut = Dataset()
    lut.add_new(0x00283002, "US", [4, 100, 8])  # LUTDescriptor: 4 entries, first input 100, 8-bit output
    lut.add_new(0x00283006, "US", [0, 51, 204, 255])  # LUTData
    stored = np.array([[0, 100, 101, 102, 103, 500]])
    image = read_image(make_dicom(stored, VOILUTSequence=[lut], WindowCenter=0, WindowWidth=10))
    np.testing.assert_allclose(image.pixels[0, :, 0], np.array([0, 0, 51, 204, 255, 255]) / 255, atol=1e-7)
    assert image.normalization == "voi-lut"


def test_modality_lut_sequence_is_applied():
    lut = Dataset()
    lut.add_new(0x00283002, "US", [3, 0, 16])  # LUTDescriptor
    lut.ModalityLUTType = "OD"
    lut.add_new(0x00283006, "US", [0, 3000, 1000])  # LUTData, not monotonic: the table, not a ramp, is used
    stored = np.array([[0, 1, 2]])
    pixels = grey(make_dicom(stored, ModalityLUTSequence=[lut]))
    np.testing.assert_allclose(pixels[0], [0, 1, 1 / 3], atol=1e-6)


def test_invalid_window_is_ignored_rather_than_rejected():
    stored = np.array([[0, 50, 100]])
    image = read_image(make_dicom(stored, WindowCenter=50, WindowWidth=0))
    assert image.normalization == "min-max"
    np.testing.assert_allclose(image.pixels[0, :, 0], [0, 0.5, 1], atol=1e-7)


def test_ignore_window_policy_reads_windowed_dicom_like_16_bit_png():
    stored = np.array([[0, 1000, 4000]])
    data = make_dicom(stored, WindowCenter=500, WindowWidth=100)
    assert read_image(data).normalization == "window-linear"
    ignored = read_image(data, intensity="ignore-window")
    assert ignored.normalization == "min-max"
    np.testing.assert_allclose(ignored.pixels[0, :, 0], [0, 0.25, 1], atol=1e-7)


def test_eight_bit_dicom_is_divided_by_255_like_eight_bit_png():
    stored = np.array([[10, 20, 30]])
    image = read_image(make_dicom(stored, bits_stored=8))
    assert image.normalization == "bit-depth" and image.bit_depth == 8
    np.testing.assert_allclose(image.pixels[0, :, 0], stored[0] / 255, atol=1e-7)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_compressed_transfer_syntaxes_decode_to_the_same_pixels(syntax: UID):
    values = anatomy(64, 64)  # JPEG 2000's default 6 resolution levels need >= 32 pixels a side
    plain = make_dataset(values, bits_stored=12, WindowCenter=2000, WindowWidth=3000)
    compressed = make_dataset(values, bits_stored=12, WindowCenter=2000, WindowWidth=3000)
    try:
        compressed.compress(syntax)
    except (RuntimeError, NotImplementedError) as exc:  # encoder plugin absent: decoding is what is tested
        pytest.skip(f"no encoder for {syntax.name} here: {exc}")
    assert compressed.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(grey(to_bytes(compressed)), grey(to_bytes(plain)))


def test_transfer_syntax_without_decoder_is_unsupported_and_named():
    ds = make_dataset(anatomy(8, 8), transfer_syntax=MPEG4_AVC)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    with pytest.raises(UnsupportedImageError) as excinfo:
        read_image(to_bytes(ds))
    assert str(MPEG4_AVC) in str(excinfo.value)
    assert MPEG4_AVC.name in str(excinfo.value)


def test_multi_frame_is_unprocessable():
    frames = np.stack([anatomy(8, 8)] * 3)
    ds = make_dataset(frames[0], NumberOfFrames=3)
    ds.PixelData = frames.astype(np.uint16).tobytes()
    with pytest.raises(UnprocessableImageError, match="multi-frame"):
        read_image(to_bytes(ds))


def test_dicom_without_pixels_is_unprocessable():
    ds = make_dataset(anatomy(4, 4))
    del ds.PixelData
    with pytest.raises(UnprocessableImageError, match="no pixel data"):
        read_image(to_bytes(ds))


@pytest.mark.parametrize(
    ("data", "content_type", "filename"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "application/dicom", None),
        (b"hello, this is plain text and not an image at all" * 4, None, "scan.dcm"),
        (bytes(128) + b"DICM" + b"\xff" * 40, "application/dicom", "x.dcm"),  # prefix, then garbage
    ],
)
def test_data_claiming_to_be_dicom_but_not_dicom_is_a_client_error(
    data: bytes, content_type: str | None, filename: str | None
):
    with pytest.raises(ImageError) as excinfo:
        read_image(data, content_type=content_type, filename=filename)
    assert type(excinfo.value) is ImageError  # 400, not one of the 413/415/422 subclasses


def damage_explicit_vr(data: bytes, tag: tuple[int, int], vr: bytes, new_vr: bytes) -> bytes:
    """Rewrites the two VR bytes of an explicit-VR little-endian element (found by its tag and VR)."""
    key = struct.pack("<HH", *tag) + vr
    assert data.count(key) == 1
    return data.replace(key, struct.pack("<HH", *tag) + new_vr)


@pytest.mark.parametrize(
    ("tag", "vr", "new_vr"),
    [
        ((0x0002, 0x0010), b"UI", b"U&"),  # file meta: TransferSyntaxUID with an unknown VR
        ((0x0020, 0x000E), b"UI", b"U&"),  # SeriesInstanceUID with an unknown VR
        ((0x0028, 0x0010), b"US", b"UL"),  # Rows: 2 bytes cannot hold a 4-byte UL
    ],
)
def test_damaged_elements_are_a_client_error_wherever_they_are(
    tag: tuple[int, int], vr: bytes, new_vr: bytes
):
    # pydicom converts values lazily and would raise NotImplementedError / BytesLengthException on first use.
    data = damage_explicit_vr(make_dicom(anatomy(4, 4)), tag, vr, new_vr)
    for read in (read_image, image_size):
        with pytest.raises(ImageError) as excinfo:
            read(data, max_pixels=10**6)  # a limit also makes the deflate check read the file meta
        assert type(excinfo.value) is ImageError


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    ds = make_dataset(anatomy(4, 4))
    ds.Rows, ds.Columns = 3000, 3000  # the header claims 9 Mpixel; the pixel data is 32 bytes
    data = to_bytes(ds)
    with pytest.raises(ImageTooLargeError, match="limit is 1000"):
        read_image(data, max_pixels=1000)
    with pytest.raises(ImageError) as excinfo:  # decoding it would have failed: the limit came first
        read_image(data)
    assert type(excinfo.value) is ImageError
    assert image_size(data) == (3000, 3000)


def test_deflated_dataset_is_bounded_before_inflation():
    ds = make_dataset(anatomy(4, 4), transfer_syntax=DeflatedExplicitVRLittleEndian)
    ds.add_new(0x00091010, "OB", bytes(20 * 2**20))  # 20 MiB of zeros deflate to ~20 KiB
    data = to_bytes(ds)
    assert len(data) < 2**20
    with pytest.raises(ImageTooLargeError, match="inflates"):
        read_image(data, max_pixels=100)
    assert read_image(data).pixels.shape == (4, 4, 1)  # no limit: read normally


def test_uids_are_kept_and_invalid_uids_are_dropped():
    ds = make_dataset(anatomy(4, 4))
    good = read_image(to_bytes(ds)).dicom
    assert good is not None
    assert (good.study_instance_uid, good.series_instance_uid, good.sop_instance_uid) == (
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
    )
    ds.SeriesInstanceUID = PATIENT_NAME  # a crafted "UID" must not be echoed
    bad = read_image(to_bytes(ds)).dicom
    assert bad is not None and bad.series_instance_uid is None


def test_pydicom_messages_never_quote_tag_values(caplog: pytest.LogCaptureFixture):
    dicom.install_privacy_guards()  # pytest resets warning filters per test; the service installs them once
    ds = make_dataset(anatomy(4, 4))
    ds.SOPInstanceUID = PATIENT_NAME  # invalid UI value: pydicom's validation quotes it
    ds.PatientName = PATIENT_NAME * 8  # over-long PN component: another validation message
    data = to_bytes(ds)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        image = read_image(data, content_type="application/dicom", filename="Doe_Jane.dcm")
        _ = str(image.dicom.dataset.PatientName) if image.dicom else ""
    assert any("withheld" in record.getMessage() for record in caplog.records)  # pydicom did complain
    assert "Doe" not in caplog.text
    assert not any("Doe" in str(w.message) for w in caught)


def legacy_apply_window(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """``models.dicom.apply_window`` as it was before it called pydicom (commit 37861c1), kept as the reference
    for today's numbers."""
    x = np.asarray(values, dtype=np.float64)
    function = function.strip().upper() or "LINEAR"
    c, w = float(center), float(width)
    if function == "LINEAR":
        if not w >= 1.0:
            raise ValueError(f"LINEAR window width must be >= 1, got {w}")
        lo, hi = c - 0.5 - (w - 1.0) / 2.0, c - 0.5 + (w - 1.0) / 2.0
        with np.errstate(divide="ignore", invalid="ignore"):
            ramp = (x - (c - 0.5)) / (w - 1.0) + 0.5
        out = np.where(x <= lo, 0.0, np.where(x > hi, 1.0, ramp))
    elif function == "LINEAR_EXACT":
        if not w > 0.0:
            raise ValueError(f"LINEAR_EXACT window width must be > 0, got {w}")
        out = np.where(x <= c - w / 2.0, 0.0, np.where(x > c + w / 2.0, 1.0, (x - c) / w + 0.5))
    elif function == "SIGMOID":
        if not w > 0.0:
            raise ValueError(f"SIGMOID window width must be > 0, got {w}")
        out = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - c) / w, -700.0, 700.0)))
    else:
        raise ValueError(f"unknown VOILUTFunction {function!r}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def window_edges(center: float, width: float, function: str) -> tuple[float, float]:
    """The inputs where the window's output leaves ymin and reaches ymax (PS3.3 C.11.2.1.2.1, C.11.2.1.3.2)."""
    if function == "LINEAR":
        return center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    return center - width / 2, center + width / 2


def inputs_around_the_edges(center: float, width: float, function: str) -> np.ndarray:
    """Inputs at, just beside (one float step) and around both edges, across the window and far outside it."""
    lo, hi = window_edges(center, width, function)
    points = [center, center - width, center + width, center - 1e6 * width, center + 1e6 * width]
    for edge in (lo, hi):
        points += [edge, np.nextafter(edge, -np.inf), np.nextafter(edge, np.inf)]
        points += [edge + step for step in (-1.0, -0.5, -0.25, 0.25, 0.5, 1.0)]
    points += list(np.linspace(lo - width / 4, hi + width / 4, 41))
    return np.array(points, dtype=np.float64).reshape(1, -1)  # an image row, as the pipeline passes it


def standard_window_limit(x: float, c: float, w: float, function: str) -> float:
    """``standard_window``, with SIGMOID's limit ymin where ``exp`` overflows far below the centre."""
    try:
        return standard_window(x, c, w, function)
    except OverflowError:
        return 0.0


# (center, width) pairs: PS3.3's LINEAR examples (C.11.2.1.2.1: identity of 12 bits, threshold, a signed
# 100-wide window, threshold at zero), a CT soft-tissue window, and fractional values.
STANDARD_WINDOWS = [(2048.0, 4096.0), (2048.0, 1.0), (0.0, 100.0), (0.0, 1.0), (40.0, 400.0), (-0.25, 2.5)]

# The standard's LINEAR examples as it writes them out (there for an output range 0-255, here 0-1).
WRITTEN_OUT_LINEAR_EXAMPLES = {
    (2048.0, 4096.0): lambda x: np.where(x <= 0, 0.0, np.where(x > 4095, 1.0, (x - 2047.5) / 4095 + 0.5)),
    (2048.0, 1.0): lambda x: np.where(x <= 2047.5, 0.0, 1.0),
    (0.0, 100.0): lambda x: np.where(x <= -50, 0.0, np.where(x > 49, 1.0, (x + 0.5) / 99 + 0.5)),
    (0.0, 1.0): lambda x: np.where(x <= -0.5, 0.0, 1.0),
}


@pytest.mark.parametrize(("center", "width"), list(WRITTEN_OUT_LINEAR_EXAMPLES))
def test_linear_window_matches_the_standards_written_out_examples(center: float, width: float):
    x = inputs_around_the_edges(center, width, "LINEAR")
    expected = WRITTEN_OUT_LINEAR_EXAMPLES[center, width](x)
    np.testing.assert_allclose(dicom.apply_window(x, center, width), expected, atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize(("center", "width"), STANDARD_WINDOWS)
def test_window_by_pydicom_keeps_todays_numbers_and_the_standards(center: float, width: float, function: str):
    x = inputs_around_the_edges(center, width, function)
    new = dicom.apply_window(x, center, width, function)
    assert new.dtype == np.float32 and new.shape == x.shape
    np.testing.assert_array_equal(new, legacy_apply_window(x, center, width, function))  # bit for bit
    reference = [standard_window_limit(float(v), center, width, function) for v in x.ravel()]
    np.testing.assert_allclose(new[0], reference, atol=1e-6)
    if function != "SIGMOID":  # ymin at the lower edge itself, ymax one float step above the upper one
        lo, hi = window_edges(center, width, function)
        edges = dicom.apply_window(np.array([lo, np.nextafter(hi, np.inf)]), center, width, function)
        np.testing.assert_array_equal(edges, [0.0, 1.0])


@pytest.mark.parametrize(
    ("function", "width"),
    [
        ("LINEAR", 0.0),
        ("LINEAR", 0.5),
        ("LINEAR", math.nan),
        ("LINEAR_EXACT", 0.0),
        ("SIGMOID", -1.0),
        ("SIGMOID", math.nan),
        ("CUBIC", 10.0),
    ],
)
def test_invalid_windows_are_refused_as_before(function: str, width: float):
    with pytest.raises(ValueError) as legacy:
        legacy_apply_window(np.zeros(3), 0.0, width, function)
    with pytest.raises(ValueError) as new:
        dicom.apply_window(np.zeros(3), 0.0, width, function)
    assert str(new.value) == str(legacy.value)


def test_a_checked_instance_is_decoded_without_converting_every_element():
    """``check_elements=False`` (an instance the job system's intake checked on arrival) leaves the elements
    decoding does not read as pydicom read them: converting all of them was most of a job's decoding time."""
    data = make_dicom(anatomy(8, 8))

    def raw_elements(check: bool) -> int:
        decoded = read_image(data, check_elements=check)
        assert decoded.dicom is not None and decoded.pixels.shape == (8, 8, 1)
        dataset = decoded.dicom.dataset
        return sum(isinstance(dataset.get_item(tag), RawDataElement) for tag in list(dataset.keys()))

    assert raw_elements(True) == 0
    assert raw_elements(False) > 0
    same = read_image(data, check_elements=False).pixels
    assert np.array_equal(same, read_image(data).pixels)
