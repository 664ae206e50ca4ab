from pathlib import Path

import numpy as np
import pytest

from training.segmentation import baselines
from training.segmentation.data import encode_mask, load_set, mask_mode
from training.segmentation.metrics import dice_per_class


def _disk_image(bright_foreground=True, seed=0, size=96):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = ((yy - 40) ** 2 + (xx - 50) ** 2 <= 20**2).astype(np.int64)
    fg, bg = (0.75, 0.25) if bright_foreground else (0.25, 0.75)
    image = np.where(mask == 1, fg, bg) + rng.normal(0, 0.05, mask.shape)
    return np.clip(image, 0, 1).astype(np.float32)[:, :, None], mask


@pytest.mark.parametrize("bright", [True, False])
@pytest.mark.parametrize("method", baselines.METHODS)
def test_baselines_segment_a_clear_disk_with_either_polarity(method, bright):
    image, mask = _disk_image(bright)
    order = baselines.class_intensity_order([image], [mask], 2)
    assert order == ([0, 1] if bright else [1, 0])
    pred = baselines.predict(method, image, order)
    assert pred.shape == mask.shape and pred.dtype == np.int64
    assert dice_per_class(pred, mask, 2)[1] > 0.9


def test_polarity_is_chosen_once_on_the_data():
    # Training-style data where the foreground is darker: the order is learned from the masks, not per image.
    images, masks = zip(*(_disk_image(False, seed=s) for s in range(3)), strict=True)
    order = baselines.class_intensity_order(list(images), list(masks), 2)
    assert order == [1, 0]
    wrong = baselines.predict("otsu", images[0], [0, 1])
    right = baselines.predict("otsu", images[0], order)
    assert dice_per_class(right, masks[0], 2)[1] > 0.9 > dice_per_class(wrong, masks[0], 2)[1]


def test_multilevel_otsu_separates_three_levels():
    rng = np.random.default_rng(0)
    levels = np.concatenate([rng.normal(m, 0.03, 2000) for m in (0.2, 0.5, 0.8)])
    t = baselines.otsu_thresholds(levels, 3)
    assert len(t) == 2 and 0.25 < t[0] < 0.45 and 0.55 < t[1] < 0.75
    t2 = baselines.otsu_thresholds(levels[:4000], 2)
    assert 0.25 < t2[0] < 0.45


@pytest.mark.parametrize("method", baselines.METHODS)
def test_three_classes(method):
    rng = np.random.default_rng(1)
    mask = np.zeros((80, 80), dtype=np.int64)
    mask[10:40, 10:40] = 2  # brightest
    mask[45:75, 40:75] = 1  # darkest
    noisy = np.choose(mask, [0.5, 0.15, 0.85]) + rng.normal(0, 0.03, mask.shape)
    image = noisy.astype(np.float32)[:, :, None]
    order = baselines.class_intensity_order([image], [mask], 3)
    assert order == [1, 0, 2]
    pred = baselines.predict(method, image, order)
    assert dice_per_class(pred, mask, 3).min() > 0.85


def test_absent_classes_go_last_and_unknown_method_raises():
    image, mask = _disk_image()
    assert baselines.class_intensity_order([image], [mask], 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines.predict("watershed", image, [0, 1])


def test_rgb_is_converted_to_gray():
    image, _mask = _disk_image()
    rgb = np.repeat(image, 3, axis=2)
    assert np.array_equal(baselines.predict("otsu", rgb, [0, 1]), baselines.predict("otsu", image, [0, 1]))


ISBI = Path(__file__).resolve().parents[3].parent / "shared" / "datasets" / "isbi2012-em-membrane"


@pytest.mark.realdata
@pytest.mark.skipif(not ISBI.is_dir(), reason="../shared/datasets/isbi2012-em-membrane is not present")
def test_otsu_on_isbi_membranes_matches_the_published_reference():
    # The data README: Otsu reaches Dice 0.57 on the membrane class (mask 0) over all 30 slices.
    data = load_set(ISBI)
    targets = [encode_mask(m, mask_mode(data.masks)) for m in data.masks]
    order = baselines.class_intensity_order(data.images, targets, 2)
    assert order == [0, 1]  # membranes are darker than cell interiors
    membrane = [
        dice_per_class(baselines.predict("otsu", im, order), t, 2)[0]
        for im, t in zip(data.images, targets, strict=True)
    ]
    assert len(data) == 30
    assert np.mean(membrane) == pytest.approx(0.57, abs=0.02)


SPATIAL = ("agglomerative", "region_merging", "active_contour", "graph_cut")


@pytest.mark.parametrize("method", baselines.METHODS)
def test_baselines_are_deterministic(method):
    image, _mask = _disk_image(seed=7)
    first = baselines.predict(method, image, [0, 1])
    assert np.array_equal(first, baselines.predict(method, image, [0, 1]))


@pytest.mark.parametrize("method", SPATIAL)
def test_large_images_are_segmented_at_the_working_size_and_labelled_at_full_size(method, monkeypatch):
    image, mask = _disk_image(size=96)
    seen: list[tuple[int, ...]] = []
    superpixels = baselines.superpixels
    monkeypatch.setattr(baselines, "MAX_WORK_PIXELS", 48 * 48)
    monkeypatch.setattr(baselines, "otsu_groups", _recording(baselines.otsu_groups, seen))
    monkeypatch.setattr(baselines, "superpixels", _recording(superpixels, seen))
    pred = baselines.predict(method, image, [0, 1])
    assert pred.shape == mask.shape
    assert seen and all(shape == (48, 48) for shape in seen)
    assert dice_per_class(pred, mask, 2)[1] > 0.85


def _recording(function, shapes):
    def wrapper(gray, *args):
        shapes.append(gray.shape)
        return function(gray, *args)

    return wrapper


@pytest.mark.parametrize("method", baselines.METHODS)
def test_a_constant_image_is_one_class(method):
    pred = baselines.predict(method, np.full((40, 40, 1), 0.5, np.float32), [0, 1])
    assert pred.shape == (40, 40) and len(np.unique(pred)) == 1


def test_graph_cut_smoothness_beats_pixelwise_thresholding_on_a_noisy_image():
    rng = np.random.default_rng(0)
    _image, mask = _disk_image()
    image = (np.where(mask == 1, 0.75, 0.25) + rng.normal(0, 0.15, mask.shape))[:, :, None]
    otsu = dice_per_class(baselines.predict("otsu", image, [0, 1]), mask, 2)[1]
    cut = dice_per_class(baselines.predict("graph_cut", image, [0, 1]), mask, 2)[1]
    assert cut > otsu + 0.1


def test_the_adjacency_graph_is_the_one_skimage_builds():
    from skimage import graph

    image, _mask = _disk_image(seed=2, size=40)
    gray = baselines.to_gray(image)
    labels = baselines.superpixels(gray)
    reference = graph.rag_mean_color(gray, labels)
    built = baselines.rag_mean_intensity(gray, labels)
    assert sorted(built.nodes) == sorted(reference.nodes)
    assert {frozenset(e) for e in built.edges} == {frozenset(e) for e in reference.edges}
    for u, v in reference.edges:
        assert built.edges[u, v]["weight"] == pytest.approx(reference.edges[u, v]["weight"] / np.sqrt(3))
    for n in reference.nodes:
        assert built.nodes[n]["pixel count"] == reference.nodes[n]["pixel count"]
        assert built.nodes[n]["mean color"][0] == pytest.approx(reference.nodes[n]["mean color"][0])


def test_method_lists_are_parsed_in_report_order_with_all_and_none():
    assert baselines.parse_methods("graph_cut, otsu") == ("otsu", "graph_cut")
    assert baselines.parse_methods("all") == baselines.METHODS
    assert baselines.parse_methods("none") == ()
    assert set(baselines.LABELS) == set(baselines.METHODS) == set(baselines.BASELINES)
    issue_22 = (
        "otsu kmeans fcm mean_shift agglomerative region_growing region_merging active_contour graph_cut"
    )
    assert tuple(issue_22.split()) == baselines.METHODS
    with pytest.raises(ValueError, match=r"unknown baseline\(s\) watershed; choose from otsu, kmeans, fcm"):
        baselines.parse_methods("otsu,watershed")
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines.parse_methods(" , ")


def test_baselines_leave_numpys_global_random_state_alone():
    image, _mask = _disk_image(seed=4)
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    for method in baselines.METHODS:
        baselines.predict(method, image, [0, 1])
    assert np.random.rand() == expected
