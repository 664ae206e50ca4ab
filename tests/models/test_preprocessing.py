import numpy as np
import pytest
import torch
from pydantic import ValidationError

from models.preprocessing import Preprocessing, fit_image, fit_mask, letterbox, prepare, to_original_size


def _fit_spec(working: tuple[int, int] = (64, 64)) -> Preprocessing:
    return Preprocessing(in_channels=1, img_size=working, resize="fit", working_size=working)


def test_letterbox_keeps_the_aspect_ratio_and_centres_the_image():
    box = letterbox(300, 600, (64, 64))
    assert box.scaled == (32, 64) and (box.top, box.left) == (16, 0) and box.canvas == (64, 64)
    tall = letterbox(1000, 250, (128, 128))
    assert tall.scaled == (128, 32) and tall.left == 48


def test_fit_requires_a_working_size_and_only_fit_takes_one():
    with pytest.raises(ValidationError, match="working_size"):
        Preprocessing(in_channels=1, img_size=(64, 64), resize="fit")
    with pytest.raises(ValidationError, match="working_size"):
        Preprocessing(in_channels=1, img_size=(64, 64), working_size=(64, 64))
    assert Preprocessing(in_channels=1, img_size=(64, 64)).resize == "tile"  # old checkpoints: native scale


def test_prepare_fits_any_image_into_the_working_size_with_zero_padding():
    pixels = np.ones((300, 600, 1), np.float32)
    spec = _fit_spec()
    tensor = prepare(pixels, spec)
    assert tensor.shape == (1, 64, 64)
    raw = fit_image(torch.ones(1, 300, 600), (64, 64))
    assert raw[:, 16:48].min() > 0.999 and raw[:, :16].abs().max() == 0.0 and raw[:, 48:].abs().max() == 0.0


def test_fit_mask_keeps_thin_structures_that_nearest_sampling_would_lose():
    mask = np.zeros((400, 400), np.int64)
    mask[:, 200:204] = 1  # a 4-pixel line, 1 pixel wide after a 4x reduction
    fitted = fit_mask(mask, (100, 100))
    assert fitted.shape == (100, 100)
    assert fitted[:, 50].all() and fitted.sum() == 100


def test_scores_map_back_to_the_original_size_without_the_padding():
    spec = _fit_spec()
    height, width = 300, 600
    pixels = np.zeros((height, width, 1), np.float32)
    pixels[:, :300] = 1.0  # left half bright
    tensor = fit_image(torch.from_numpy(pixels.transpose(2, 0, 1).copy()), spec.working_size or (0, 0))
    scores = torch.cat([1 - tensor, tensor])  # class 1 where bright
    back = to_original_size(scores, height, width, spec)
    assert back.shape == (2, height, width)
    labels = back.argmax(0)
    assert (labels[:, :290] == 1).all() and (labels[:, 310:] == 0).all()


def test_tile_scores_are_returned_unchanged():
    spec = Preprocessing(in_channels=1, img_size=(32, 32))
    scores = torch.rand(2, 50, 70)
    assert torch.equal(to_original_size(scores, 50, 70, spec), scores)
