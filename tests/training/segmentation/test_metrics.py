import numpy as np
import pytest

from training.segmentation.metrics import aggregate, dice_per_class, hd95, iou_per_class, score_image


def _square(top, left, size=10, shape=(40, 40)):
    m = np.zeros(shape, dtype=bool)
    m[top : top + size, left : left + size] = True
    return m


def test_dice_and_iou_of_overlapping_squares():
    a, b = _square(5, 5), _square(5, 10)  # 10x10 squares sharing a 10x5 strip
    pred, target = a.astype(int), b.astype(int)
    dice = dice_per_class(pred, target, 2)
    iou = iou_per_class(pred, target, 2)
    assert dice[1] == pytest.approx(2 * 50 / 200)
    assert iou[1] == pytest.approx(50 / 150)
    # Background: 1600 - 100 pixels each, overlap 1600 - 150.
    assert dice[0] == pytest.approx(2 * 1450 / 3000)
    assert iou[0] == pytest.approx(1450 / 1550)


def test_perfect_and_disjoint_predictions():
    m = _square(3, 3).astype(int)
    assert dice_per_class(m, m, 2).tolist() == [1.0, 1.0]
    assert dice_per_class(m, 1 - m, 2).tolist() == [0.0, 0.0]
    assert hd95(m.astype(bool), m.astype(bool)) == 0.0


def test_hd95_of_a_shifted_square_is_the_shift():
    assert hd95(_square(10, 10), _square(10, 13)) == pytest.approx(3.0)
    assert hd95(_square(10, 10), _square(14, 10)) == pytest.approx(4.0)


def test_hd95_ignores_a_few_outliers_unlike_the_maximum():
    target = _square(0, 0, size=30, shape=(60, 60))
    pred = target.copy()
    pred[55, 55] = True  # one far-away false positive pixel among ~116 boundary pixels
    assert hd95(pred, target) < 2.0


def test_empty_conventions():
    empty = np.zeros((20, 30), dtype=bool)
    assert hd95(empty, empty) == 0.0
    assert hd95(empty, _square(0, 0, shape=(20, 30))) == pytest.approx(np.hypot(20, 30))
    zeros = np.zeros((4, 4), dtype=int)
    assert dice_per_class(zeros, zeros, 3).tolist() == [1.0, 1.0, 1.0]  # absent classes: nothing missed


def test_score_image_and_aggregate():
    target = np.zeros((40, 40), dtype=int)
    target[_square(5, 5)] = 1
    target[_square(20, 20)] = 2
    pred = target.copy()
    pred[_square(20, 20)] = 0  # class 2 missed entirely
    s = score_image(pred, target, 3)
    assert s["per_class_dice"][1] == 1.0 and s["per_class_dice"][2] == 0.0
    assert s["dice"] == pytest.approx(0.5)  # mean over foreground classes 1 and 2
    assert s["hd95"] == pytest.approx(np.hypot(40, 40) / 2)
    perfect = score_image(target, target, 3)
    summary = aggregate([s, perfect], ["bg", "a", "b"])
    assert summary["dice"] == pytest.approx(0.75)
    assert summary["per_class_dice"] == pytest.approx(
        {"bg": (s["per_class_dice"][0] + 1) / 2, "a": 1.0, "b": 0.5}
    )
    with pytest.raises(ValueError):
        score_image(pred[:10], target, 3)
