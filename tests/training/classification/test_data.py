"""Classification data: folder layouts, splits, channels, class balance."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.preprocessing import Preprocessing, prepare
from training.classification.data import (
    ClassificationDataset,
    balanced_sampler,
    class_weights,
    detect_channels,
    discover,
    list_samples,
)


def _write(folder: Path, n: int, value: int = 128, rgb: bool = False, size: int = 20) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    for i in range(n):
        arr = rng.integers(0, 255, size=(size, size, 3) if rgb else (size, size), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")


def test_class_folders_with_stratified_seeded_validation_split(tmp_path: Path) -> None:
    _write(tmp_path / "normal", 20)
    _write(tmp_path / "pneumonia", 60)
    (tmp_path / "notes").mkdir()  # folders without images are not classes
    data = discover(tmp_path, val_split=0.25, seed=1)
    assert data.classes == ["normal", "pneumonia"]
    assert (data.layout, data.val_source) == ("class-folders", "split")
    assert len(data.train) + len(data.val) == 80
    assert Counter(s.label for s in data.val) == {0: 5, 1: 15}
    assert not {s.path for s in data.train} & {s.path for s in data.val}
    again = discover(tmp_path, val_split=0.25, seed=1)
    assert [s.path for s in again.val] == [s.path for s in data.val]


def test_train_and_val_folders(tmp_path: Path) -> None:
    _write(tmp_path / "train" / "a", 4)
    _write(tmp_path / "train" / "b", 4)
    _write(tmp_path / "val" / "b", 2)
    data = discover(tmp_path, val_split=0.5)
    assert (data.layout, data.val_source) == ("train-folder", "folder")
    assert data.classes == ["a", "b"]
    assert len(data.train) == 8 and [s.label for s in data.val] == [1, 1]

    (tmp_path / "val").rename(tmp_path / "holdout")
    data = discover(tmp_path, val_split=0.5)
    assert data.val_source == "split" and len(data.val) == 4


def test_layout_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        discover(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class folders"):
        discover(tmp_path)
    _write(tmp_path / "only", 3)
    with pytest.raises(ValueError, match="need at least 2"):
        discover(tmp_path)
    _write(tmp_path / "other", 1)
    with pytest.raises(ValueError, match="at least 2 images"):
        discover(tmp_path, val_split=0.3)
    with pytest.raises(ValueError, match="not among the model's classes"):
        list_samples(tmp_path, classes=["only"])


def test_channels_are_detected_from_the_images(tmp_path: Path) -> None:
    _write(tmp_path / "gray" / "a", 2)
    _write(tmp_path / "gray" / "b", 2)
    gray = Image.fromarray(np.full((8, 8), 90, np.uint8)).convert("RGB")  # RGB file with gray content
    gray.save(tmp_path / "gray" / "a" / "rgbgray.png")
    _write(tmp_path / "colour" / "a", 2, rgb=True)
    _write(tmp_path / "colour" / "b", 2, rgb=True)
    assert detect_channels(list_samples(tmp_path / "gray")[1]) == 1
    assert detect_channels(list_samples(tmp_path / "colour")[1]) == 3


def test_dataset_uses_the_shared_preprocessing(tmp_path: Path) -> None:
    _write(tmp_path / "a", 2, size=40)
    _write(tmp_path / "b", 1, size=40)
    _, samples = list_samples(tmp_path)
    spec = Preprocessing(in_channels=1, img_size=(16, 24), resize="resize", mean=[0.4], std=[0.2])
    for cache in (False, True):
        ds = ClassificationDataset(samples, spec, cache=cache)
        image, label = ds[2]
        assert image.shape == (1, 16, 24) and label == 1
        pixels = np.asarray(Image.open(samples[2].path), dtype=np.float32)[:, :, None] / 255
        torch.testing.assert_close(image, prepare(pixels, spec))


def test_class_weights_and_sampler_balance_the_classes() -> None:
    labels = [0] * 30 + [1] * 10
    weights = class_weights(labels, 3)
    torch.testing.assert_close(weights, torch.tensor([40 / 60, 40 / 20, 0.0]))
    drawn = list(balanced_sampler(labels, 2, seed=0))
    share_minority = sum(labels[i] == 1 for i in drawn) / len(drawn)
    assert 0.3 < share_minority < 0.7  # 25% in the data, about half in the draws


PNEUMONIA = Path(__file__).resolve().parents[3].parent / "shared" / "datasets" / "pneumonia-cxr"


@pytest.mark.realdata
@pytest.mark.skipif(not PNEUMONIA.is_dir(), reason="../shared/datasets/pneumonia-cxr is not present")
def test_pneumonia_official_split_is_found() -> None:
    data = discover(PNEUMONIA / "train", val_split=0.1, seed=0)
    assert data.classes == ["NORMAL", "PNEUMONIA"]
    assert len(data.train) + len(data.val) == 1341 + 3875
    _, test = list_samples(PNEUMONIA / "test", data.classes)
    assert Counter(s.label for s in test) == {0: 234, 1: 390}
    assert detect_channels(test) == 1  # RGB JPEGs with gray content are trained as 1 channel
