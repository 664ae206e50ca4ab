import io
import json

import numpy as np
import pytest
from PIL import Image

from models.interactive import (
    BACKGROUND,
    FOREGROUND,
    NO_HINT,
    HintError,
    check_hints,
    draw_points,
    graph_cut,
    parse_hints,
    parse_point_hints,
    read_scribble,
)
from tests.app.helpers import encode_image


def two_regions(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy bright disc on a darker background, and the disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:size, :size]
    disc = (yy - size * 0.45) ** 2 + (xx - size * 0.55) ** 2 < (size * 0.25) ** 2
    image = np.clip(np.where(disc, 0.65, 0.35) + rng.normal(0, 0.08, disc.shape), 0, 1)
    return image.astype(np.float32), disc


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_two_clicks_separate_two_regions():
    image, disc = two_regions()
    hints = draw_points([(53, 43, FOREGROUND), (8, 8, BACKGROUND)], 3, *disc.shape)
    mask = graph_cut(image, hints)
    assert dice(mask, disc) > 0.95


def test_one_foreground_click_is_enough_and_colour_images_are_cut_in_gray():
    image, disc = two_regions(seed=1)
    hints = draw_points([(53, 43, FOREGROUND)], 3, *disc.shape)
    assert dice(graph_cut(image, hints), disc) > 0.9
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    assert np.array_equal(graph_cut(rgb, hints), graph_cut(image, hints))


def test_hints_are_hard_constraints_even_against_a_confident_model():
    image, disc = two_regions()
    probability = np.where(disc, 0.99, 0.01)
    hints = draw_points([(53, 43, BACKGROUND), (5, 90, FOREGROUND)], 2, *disc.shape)
    mask = graph_cut(image, hints, probability)
    assert not mask[hints == BACKGROUND].any()
    assert mask[hints == FOREGROUND].all()


def test_a_background_click_in_a_false_positive_region_removes_the_region():
    image, disc = two_regions()
    yy, xx = np.ogrid[:96, :96]
    blob = (yy - 80) ** 2 + (xx - 15) ** 2 < 9**2  # the model also claims a dark blob
    probability = np.where(disc | blob, 0.8, 0.1)
    before = graph_cut(image, np.zeros_like(disc, dtype=np.uint8), probability)
    assert before[blob].mean() > 0.9
    after = graph_cut(image, draw_points([(15, 80, BACKGROUND)], 3, 96, 96), probability)
    assert after[blob].mean() < 0.05
    assert dice(after, disc) > 0.95 > dice(before, disc)


def test_points_are_drawn_as_disks_later_ones_on_top():
    hints = draw_points([(10, 10, FOREGROUND), (12, 10, BACKGROUND)], 2, 20, 30)
    assert hints.shape == (20, 30)
    assert hints[10, 8] == FOREGROUND and hints[10, 12] == BACKGROUND and hints[10, 10] == BACKGROUND
    disk_pixels = (draw_points([(10, 10, FOREGROUND)], 2, 20, 30) == FOREGROUND).sum()
    assert disk_pixels == 13  # the pixels at most 2 from the centre
    assert (hints != NO_HINT).sum() < 2 * disk_pixels  # the disks overlap
    assert hints[0, 0] == NO_HINT
    single = draw_points([(29, 19, FOREGROUND)], 0, 20, 30)
    assert single.sum() == FOREGROUND and single[19, 29] == FOREGROUND


def test_json_points_parse():
    text = json.dumps({"points": [{"x": 3, "y": 4.4, "label": "foreground"}], "radius": 1})
    hints = parse_point_hints(text, 10, 10)
    assert hints[4, 3] == FOREGROUND and (hints == FOREGROUND).sum() == 5
    assert np.array_equal(parse_hints(text.encode(), 10, 10), hints)
    default_radius = parse_point_hints('{"points": [{"x": 5, "y": 5, "label": "background"}]}', 20, 20)
    assert (default_radius == BACKGROUND).sum() > 60


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "not valid JSON"),
        ('{"points": [{"x": 10, "y": 2, "label": "foreground"}]}', "outside the 10x8 image"),
        ('{"points": [{"x": -1, "y": 2, "label": "foreground"}]}', "outside"),
        ('{"points": [{"x": 1, "y": 8, "label": "foreground"}]}', "outside"),
        ('{"points": [{"x": 1, "y": 2, "label": "tooth"}]}', "points.0.label"),
        ('{"points": [{"x": "a", "y": 2, "label": "foreground"}]}', "points.0.x"),
        ('{"points": [], "radius": -1}', "radius"),
        ('{"points": [], "radius": 257}', "radius"),
        ('{"points": [{"x": NaN, "y": 2, "label": "foreground"}]}', "points.0.x"),
        ('{"points": [{"x": 1, "y": Infinity, "label": "foreground"}]}', "points.0.y"),
        (json.dumps({"points": [{"x": 1, "y": 1, "label": "foreground"}] * 1001}), "points"),
        ('{"dots": []}', "points"),
        ("[1, 2]", "documented form"),
    ],
)
def test_bad_json_points_are_refused(text, words):
    with pytest.raises(HintError, match=words):
        parse_point_hints(text, 8, 10)


def test_scribbles_are_read_and_checked():
    scribble = np.zeros((8, 10), dtype=np.uint8)
    scribble[2, 3] = FOREGROUND
    scribble[6, 7] = BACKGROUND
    assert np.array_equal(read_scribble(encode_image(scribble), 8, 10), scribble)
    assert np.array_equal(parse_hints(encode_image(scribble), 8, 10), scribble)
    with pytest.raises(HintError, match="10x8, the image 10x9"):
        read_scribble(encode_image(scribble), 9, 10)
    with pytest.raises(HintError, match=r"values \[5\]"):
        read_scribble(encode_image(scribble + 3 * (scribble == BACKGROUND).astype(np.uint8)), 8, 10)
    with pytest.raises(HintError, match="one channel"):
        read_scribble(encode_image(np.zeros((8, 10, 3), dtype=np.uint8)), 8, 10)
    jpeg = io.BytesIO()
    Image.fromarray(scribble).save(jpeg, format="JPEG")
    with pytest.raises(HintError, match="must be a PNG"):
        read_scribble(jpeg.getvalue(), 8, 10)
    with pytest.raises(HintError, match="not a readable PNG"):
        read_scribble(encode_image(scribble)[:30], 8, 10)


def test_hints_without_foreground_drive_no_cut_alone():
    background_only = draw_points([(1, 1, BACKGROUND)], 1, 8, 8)
    with pytest.raises(HintError, match="foreground hint"):
        check_hints(background_only, need_foreground=True)
    check_hints(background_only, need_foreground=False)
    with pytest.raises(HintError, match="no pixel"):
        check_hints(np.zeros((8, 8), dtype=np.uint8), need_foreground=False)


def test_shapes_must_match():
    image, _ = two_regions(size=16)
    with pytest.raises(ValueError, match="hints of shape"):
        graph_cut(image, np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="probabilities of shape"):
        graph_cut(image, np.zeros((16, 16), dtype=np.uint8), np.zeros((8, 8)))
