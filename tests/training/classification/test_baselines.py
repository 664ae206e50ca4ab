"""The baselines of `medserve eval classify`: hand-crafted features and the classical classifiers."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.svm import LinearSVC

from models.preprocessing import Preprocessing
from training.classification.baselines import (
    BASELINE_NAMES,
    class_scores,
    fit_baselines,
    parse_feature_kinds,
)
from training.classification.data import list_samples
from training.classification.handcrafted import (
    FEATURE_GROUPS,
    N_FEATURES,
    TEXTURE_SIZE,
    extract_handcrafted,
    image_features,
)

SPEC = Preprocessing(in_channels=1, img_size=(32, 32), resize="resize")


def texture_image(rng: np.random.Generator, size: int, textured: bool) -> np.ndarray:
    """A gentle intensity ramp in a random direction around a random mean level, with fine grain (smoothed
    noise) on top when ``textured``: the mean intensity says nothing about the class, the texture does."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    image = 0.1 * (np.cos(angle) * xx + np.sin(angle) * yy)
    if textured:
        grain = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=1.0)
        image += 0.08 * grain / grain.std()
    return np.clip(rng.uniform(0.35, 0.65) + image, 0.0, 1.0)


def write_texture_set(root: Path, n_per_class: int, size: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name, textured in (("smooth", False), ("textured", True)):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = np.round(texture_image(rng, size, textured) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:03d}.png")
    return root


def test_image_features_have_a_fixed_length_and_are_deterministic() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((2, TEXTURE_SIZE, TEXTURE_SIZE)).astype(np.float32)
    fa = image_features(a)
    assert fa.shape == (N_FEATURES,) and fa.dtype == np.float32
    # 32 histogram bins; mean and range over 4 angles of 6 GLCM properties at 3 distances; uniform LBP codes
    # of (8, 1) and (16, 2); HOG of 3x3 blocks of 2x2 cells x 9 orientations.
    assert FEATURE_GROUPS == {"histogram": 32, "glcm": 36, "lbp": 10 + 18, "hog": 3 * 3 * 4 * 9}
    np.testing.assert_array_equal(fa, image_features(a.copy()))
    assert not np.array_equal(fa, image_features(b))
    # The histogram part is the fraction of pixels per bin; a constant image has no NaN (GLCM correlation).
    assert fa[: FEATURE_GROUPS["histogram"]].sum() == pytest.approx(1.0)
    assert np.isfinite(image_features(np.full((TEXTURE_SIZE, TEXTURE_SIZE), 0.5, np.float32))).all()
    with pytest.raises(ValueError, match="gray image"):
        image_features(np.zeros((32, 32), np.float32))


def test_extract_handcrafted_reads_files_like_the_network_at_a_fixed_size(tmp_path: Path) -> None:
    root = write_texture_set(tmp_path / "data", 3, size=40, seed=0)
    _, samples = list_samples(root)
    x, y = extract_handcrafted(samples, SPEC)
    assert x.shape == (6, N_FEATURES) and y.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(x, extract_handcrafted(samples, SPEC)[0])
    # The network's input size does not matter: the images are read at the texture size.
    bigger = SPEC.model_copy(update={"img_size": (96, 96)})
    np.testing.assert_allclose(x, extract_handcrafted(samples, bigger)[0])
    # An RGB copy of a gray image gives the same features (gray = luma, the network's channel conversion; the
    # rounding of the luma weights may move a pixel or two between histogram bins).
    gray = np.asarray(Image.open(samples[0].path))
    Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2)).save(tmp_path / "rgb.png")
    rgb_samples = [type(samples[0])(tmp_path / "rgb.png", 0)]
    np.testing.assert_allclose(extract_handcrafted(rgb_samples, SPEC)[0][0], x[0], atol=1e-3)
    assert extract_handcrafted([], SPEC)[0].shape == (0, N_FEATURES)


def test_handcrafted_baselines_separate_textured_from_smooth_images(tmp_path: Path) -> None:
    train = write_texture_set(tmp_path / "train", 30, size=64, seed=1)
    test = write_texture_set(tmp_path / "test", 15, size=64, seed=2)
    train_x, train_y = extract_handcrafted(list_samples(train)[1], SPEC)
    test_x, test_y = extract_handcrafted(list_samples(test)[1], SPEC)
    results = fit_baselines(train_x, train_y, test_x, test_y, seed=0)
    assert tuple(results) == BASELINE_NAMES
    for name, scores in results.items():
        assert scores["balanced_accuracy"] >= 0.8, name
        assert scores["auc"] is not None and scores["auc"] >= 0.8, name
        assert scores["seconds"] >= 0.0
    # The mean intensity says nothing about the class: texture is what separates them.
    means = test_x[:, : FEATURE_GROUPS["histogram"]] @ (np.arange(32) + 0.5) / 32
    assert abs(means[test_y == 0].mean() - means[test_y == 1].mean()) < 0.05


def test_baselines_are_seeded() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6))
    y = (x[:, 0] + 0.5 * rng.normal(size=80) > 0).astype(int)
    first = fit_baselines(x[:60], y[:60], x[60:], y[60:], seed=3)
    second = fit_baselines(x[:60], y[:60], x[60:], y[60:], seed=3)
    for name in BASELINE_NAMES:
        for key in ("accuracy", "balanced_accuracy", "auc"):
            assert first[name][key] == second[name][key], (name, key)
    with pytest.raises(ValueError, match="two classes"):
        fit_baselines(x, np.zeros(80, int), x, y)


def test_class_scores_rank_by_decision_values_and_cover_unseen_classes() -> None:
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    svm = LinearSVC().fit(x, np.array([0, 0, 2, 2]))
    scores = class_scores(svm, np.array([[-3.0], [3.0]]), n_classes=3)
    assert scores.shape == (2, 3)
    assert scores[1, 2] > scores[0, 2] and scores[0, 0] > scores[1, 0]
    # Class 1 was never seen: one constant score, below every other.
    assert scores[0, 1] == scores[1, 1] < scores[:, [0, 2]].min()


def test_parse_feature_kinds() -> None:
    assert parse_feature_kinds("handcrafted,cnn") == ("cnn", "handcrafted")
    assert parse_feature_kinds(" handcrafted ") == ("handcrafted",)
    for bad in ("", "cnn,sift", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_feature_kinds(bad)
