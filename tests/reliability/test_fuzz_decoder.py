"""The decoder against damaged and hostile bytes: it either returns a sane image or raises ``ImageError``.

Anything else (a ``struct.error``, an ``IndexError``, a crash, a hang, a huge allocation) would be a 500 or an
outage in the service. Bombs declared in the header must be refused as too large before any pixel is decoded.

The random inputs go through the service's decode step (``Runner.decode``: ``models.imageio.read_image``, then
the model's preprocessing), which is what a request reaches. The typed outcomes (too large, no pixels, every
truncation of a valid file) are checked on ``read_image`` itself.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.contract import ImageUpload, ModelInput
from app.runners import SegmentationRunner, load_runner
from models.imageio import DecodedImage, ImageError, ImageTooLargeError, read_image
from tests.app.helpers import save_pixel_model
from tests.reliability.corpus import any_bytes, lying_files, valid_files, zero_size_files

MAX_PIXELS = 1_000_000
# A safety net, not a performance limit: a decoder stuck in a loop fails the test instead of the suite.
HANG_S = 60.0
CONTENT_TYPES = [None, "image/png", "image/jpeg", "application/dicom", "application/octet-stream"]

# Damaged files make PIL warn (corrupt EXIF, possible bomb): expected here, and the service ignores them.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")

_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuzz-decoder")


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> SegmentationRunner:
    path = tmp_path_factory.mktemp("fuzz") / "pixel.pt"
    save_pixel_model(path)
    loaded = load_runner("pixel", path, device=torch.device("cpu"), precision="fp32", forward_batch_size=4)
    assert isinstance(loaded, SegmentationRunner)
    return loaded


def decode(data: bytes, content_type: str | None = None) -> DecodedImage:
    return _pool.submit(read_image, data, content_type=content_type, max_pixels=MAX_PIXELS).result(HANG_S)


def check_sane(image: DecodedImage) -> None:
    pixels = image.pixels
    assert pixels.dtype == np.float32 and pixels.ndim == 3 and pixels.shape[2] in (1, 3)
    assert 0 < pixels.shape[0] * pixels.shape[1] <= MAX_PIXELS
    assert np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0


@given(data=any_bytes, content_type=st.sampled_from(CONTENT_TYPES))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_bytes_decode_to_a_model_input_or_an_image_error(
    runner: SegmentationRunner, data: bytes, content_type: str | None
) -> None:
    upload = ImageUpload(data, content_type, None)
    try:
        item = _pool.submit(runner.decode, upload, max_pixels=MAX_PIXELS).result(HANG_S)
    except ImageError:
        return
    assert isinstance(item, ModelInput)
    assert 0 < item.height * item.width <= MAX_PIXELS
    assert item.image.shape[0] == 1 and bool(torch.isfinite(item.image).all())


@pytest.mark.parametrize(("name", "data"), sorted(lying_files().items()))
def test_a_bomb_declared_in_the_header_is_refused_as_too_large(name: str, data: bytes) -> None:
    with pytest.raises(ImageTooLargeError):
        decode(data)


@pytest.mark.parametrize(("name", "data"), sorted(zero_size_files().items()))
def test_an_image_without_pixels_is_unreadable_not_too_large(name: str, data: bytes) -> None:
    with pytest.raises(ImageError) as raised:
        decode(data)
    assert not isinstance(raised.value, ImageTooLargeError)


@pytest.mark.parametrize(("name", "data"), sorted(valid_files().items()))
def test_every_truncation_of_a_valid_file_is_handled(name: str, data: bytes) -> None:
    """Exhaustive over cut points near the start, where headers live, then every 7th byte."""
    cuts = sorted({*range(0, min(len(data), 160)), *range(160, len(data), 7)})
    for cut in cuts:
        try:
            image = decode(data[:cut])
        except ImageError:
            continue
        check_sane(image)


def test_the_corpus_is_valid_where_it_should_be() -> None:
    """The fuzz starts from real files: each must decode, or the mutations would prove nothing."""
    for data in valid_files().values():
        check_sane(decode(data))
