"""Raster image reading: full bit depth, PIL mode conversions, EXIF orientation, limits, masks, policies."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.imageio import (
    DEFAULT_INTENSITY,
    INTENSITY_POLICIES,
    ImageError,
    ImageTooLargeError,
    UnprocessableImageError,
    image_size,
    read_image,
    read_image_file,
    read_mask_file,
    resolve_intensity,
)
from models.preprocessing import Preprocessing
from tests.models.test_dicom import anatomy, make_dicom

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_image_and_the_same_samples_as_dicom_read_the_same(fmt: str):
    values = anatomy(peak=60000)  # needs all 16 bits
    raster = read_image(encode(Image.fromarray(values.astype(np.uint16)), fmt))
    dcm = read_image(make_dicom(values, bits_stored=16))
    assert raster.bit_depth == 16 and raster.normalization == dcm.normalization == "min-max"
    np.testing.assert_array_equal(raster.pixels, dcm.pixels)


def test_16_bit_png_keeps_full_depth():
    values = np.array([[0, 256, 257, 65535]], dtype=np.uint16)  # 256 and 257 collapse at 8 bits
    pixels = read_image(encode(Image.fromarray(values))).pixels[0, :, 0]
    assert pixels[1] < pixels[2]
    np.testing.assert_allclose(pixels, values[0] / 65535, atol=1e-7)


def test_8_bit_png_and_8_bit_dicom_read_the_same():
    values = anatomy(peak=200)
    png = read_image(encode(Image.fromarray(values.astype(np.uint8))))
    dcm = read_image(make_dicom(values, bits_stored=8))
    np.testing.assert_array_equal(png.pixels, dcm.pixels)
    np.testing.assert_allclose(png.pixels[:, :, 0], values / 255, atol=1e-7)


def test_rgba_is_composited_on_black():
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 102]]], dtype=np.uint8)
    pixels = read_image(encode(Image.fromarray(rgba, "RGBA"))).pixels
    assert pixels.shape == (1, 3, 3)
    np.testing.assert_allclose(pixels[0, 0], np.array([200, 100, 50]) / 255, atol=1e-6)
    np.testing.assert_allclose(pixels[0, 1], 0.0)
    np.testing.assert_allclose(pixels[0, 2], np.array([200, 100, 50]) / 255 * 0.4, atol=1e-6)


def test_la_is_grey_composited_on_black():
    la = np.array([[[180, 255], [180, 0], [180, 51]]], dtype=np.uint8)
    pixels = read_image(encode(Image.fromarray(la, "LA"))).pixels
    assert pixels.shape == (1, 3, 1)
    np.testing.assert_allclose(pixels[0, :, 0], [180 / 255, 0.0, 180 / 255 * 0.2], atol=1e-6)


def palette_image() -> Image.Image:
    img = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    img.putpalette([10, 20, 30, 250, 0, 0, 0, 128, 255] + [0] * (3 * 253))
    return img


def test_palette_without_transparency_gives_the_palette_colours():
    pixels = read_image(encode(palette_image())).pixels
    np.testing.assert_allclose(pixels[0] * 255, [[10, 20, 30], [250, 0, 0], [0, 128, 255]], atol=1e-4)


def test_palette_with_transparency_makes_the_transparent_index_background():
    pixels = read_image(encode(palette_image(), transparency=1)).pixels
    np.testing.assert_allclose(pixels[0] * 255, [[10, 20, 30], [0, 0, 0], [0, 128, 255]], atol=1e-4)


def test_cmyk_is_converted_to_rgb():
    cmyk = np.array([[[255, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8)  # cyan, white, black
    pixels = read_image(encode(Image.fromarray(cmyk, "CMYK"), "TIFF")).pixels
    np.testing.assert_allclose(pixels[0], [[0, 1, 1], [1, 1, 1], [0, 0, 0]], atol=1e-6)


def test_one_bit_image_reads_as_zero_and_one():
    img = Image.fromarray(np.array([[True, False, True]]))
    assert img.mode == "1"
    image = read_image(encode(img))
    assert image.bit_depth == 1
    np.testing.assert_array_equal(image.pixels[0, :, 0], [1, 0, 1])


def test_i16_mode_is_min_max_scaled_not_clipped():
    img = Image.frombytes("I;16", (3, 1), np.array([1000, 3000, 5000], dtype="<u2").tobytes())
    np.testing.assert_allclose(read_image(encode(img, "TIFF")).pixels[0, :, 0], [0, 0.5, 1], atol=1e-7)


def test_exif_orientation_is_applied_to_jpeg():
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:, :16] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    pixels = read_image(encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95)).pixels
    assert pixels.shape == (32, 16, 3)
    assert pixels[:14].mean() > 0.9 and pixels[18:].mean() < 0.1  # the stored left side is now the top


def test_pixel_limit_is_checked_before_decoding():
    header = struct.pack(">IIBBBBB", 5000, 4000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 10))
    with pytest.raises(ImageTooLargeError, match="limit is 1000000"):
        read_image(data, max_pixels=1_000_000)
    with pytest.raises(ImageError) as excinfo:  # decoding would fail: the limit came first
        read_image(data)
    assert type(excinfo.value) is ImageError
    assert image_size(data) == (4000, 5000)


def test_header_beyond_pils_own_bomb_limit_is_too_large_not_a_crash():
    # PIL refuses to open headers above twice Image.MAX_IMAGE_PIXELS (about 179 M pixels) whatever our limit.
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 10))
    with pytest.raises(ImageTooLargeError):
        image_size(data)
    with pytest.raises(ImageTooLargeError):
        read_image(data)


def tiff_with_damaged_second_page() -> bytes:
    """A 2x2 grey TIFF whose next-page pointer leads to a page without ImageWidth/ImageLength."""
    pixels = bytes([0, 85, 170, 255])

    def ifd(entries: list[tuple[int, int, int, int]], next_offset: int) -> bytes:
        out = struct.pack("<H", len(entries))
        for tag, kind, count, value in entries:
            out += struct.pack("<HHII", tag, kind, count, value)
        return out + struct.pack("<I", next_offset)

    first_at = 8 + len(pixels)
    # width, length, bits, no compression, min-is-black, strip offset, 1 sample, rows per strip, strip bytes
    first = [(256, 4, 1, 2), (257, 4, 1, 2), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1)]
    first += [(273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, 2), (279, 4, 1, 4)]
    second_at = first_at + 2 + 12 * len(first) + 4
    return (
        b"II*\x00" + struct.pack("<I", first_at) + pixels + ifd(first, second_at) + ifd([(259, 3, 1, 1)], 0)
    )


def test_damaged_tiff_page_table_is_a_client_error():
    # PIL raises TypeError("Missing dimensions") for such a page; the reader must answer 400, not crash.
    with pytest.raises(ImageError) as excinfo:
        read_image(tiff_with_damaged_second_page())
    assert type(excinfo.value) is ImageError


def test_multi_page_tiff_is_unprocessable():
    pages = [Image.fromarray(np.full((4, 4), v, dtype=np.uint8)) for v in (0, 255)]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    with pytest.raises(UnprocessableImageError):
        read_image(buffer.getvalue())


@pytest.mark.parametrize("data", [b"", b"not an image", encode(Image.new("L", (8, 8)))[:40]])
def test_unreadable_data_is_a_client_error(data: bytes):
    with pytest.raises(ImageError) as excinfo:
        read_image(data)
    assert type(excinfo.value) is ImageError


def test_read_image_file_reads_dicom_by_content(tmp_path: Path):
    path = tmp_path / "scan"  # PACS exports often have no suffix
    path.write_bytes(make_dicom(anatomy(8, 8)))
    assert read_image_file(path).format == "dicom"
    (tmp_path / "fake.dcm").write_bytes(encode(Image.new("L", (8, 8))))
    with pytest.raises(ImageError):
        read_image_file(tmp_path / "fake.dcm")


def test_read_mask_file_keeps_labels(tmp_path: Path):
    labels = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    Image.fromarray(labels).save(tmp_path / "grey.png")
    palette = Image.fromarray(labels, "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (3 * 253))
    palette.save(tmp_path / "palette.png")
    Image.fromarray(np.stack([labels] * 3, axis=2)).save(tmp_path / "rgb.png")
    Image.fromarray(labels.astype(np.uint16) * 300).save(tmp_path / "wide.png")
    for name in ("grey", "palette", "rgb"):
        mask = read_mask_file(tmp_path / f"{name}.png")
        assert mask.dtype == np.int64
        np.testing.assert_array_equal(mask, labels)
    np.testing.assert_array_equal(read_mask_file(tmp_path / "wide.png"), labels.astype(np.int64) * 300)


def test_read_mask_file_rejects_colour_masks(tmp_path: Path):
    Image.fromarray(np.array([[[255, 0, 0], [0, 0, 0]]], dtype=np.uint8)).save(tmp_path / "red.png")
    with pytest.raises(ImageError, match=r"red\.png"):
        read_mask_file(tmp_path / "red.png")


def test_intensity_policies_resolve_and_unknown_ones_are_refused():
    assert resolve_intensity(None) == DEFAULT_INTENSITY
    assert resolve_intensity("ignore-window") == "ignore-window"
    assert set(INTENSITY_POLICIES) == {"dicom-window", "ignore-window"}
    # Checkpoints carrying the old free-text description keep the default pipeline.
    assert resolve_intensity(Preprocessing.model_fields["intensity"].default) == DEFAULT_INTENSITY
    with pytest.raises(ValueError, match="unknown intensity policy"):
        read_image(encode(Image.new("L", (2, 2))), intensity="z-score")
