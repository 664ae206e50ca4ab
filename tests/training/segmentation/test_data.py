import argparse

import numpy as np
import pytest
from PIL import Image

from training.cli import main as cli_main
from training.segmentation import data as D
from training.segmentation.train import prepare_data


def _write(root, stem, size=(20, 24), mask_size=None, values=(0, 255), suffix=".png"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([ord(c) for c in stem])
    Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(root / "images" / f"{stem}{suffix}")
    h, w = mask_size or size
    mask = np.full((h, w), values[0], dtype=np.uint8)
    mask[h // 4 : h // 2, w // 4 : w // 2] = values[-1]
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def test_matched_pairs_in_several_formats(tmp_path):
    _write(tmp_path, "a")
    _write(tmp_path, "b", suffix=".tif")
    _write(tmp_path, "c", suffix=".jpg")
    data = D.load_set(tmp_path)
    assert data.stems == ["a", "b", "c"]
    assert all(im.shape == (20, 24, 1) and im.dtype == np.float32 for im in data.images)
    assert all(m.shape == (20, 24) for m in data.masks)


def test_missing_masks_folder_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(D.DataLayoutError, match="masks"):
        D.load_set(tmp_path)


def test_unmatched_stems_are_listed_in_one_error(tmp_path):
    for stem in ["ok1", "ok2"]:
        _write(tmp_path, stem)
    for i in range(7):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / f"lonely{i}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "orphan.png")
    with pytest.raises(D.DataLayoutError) as info:
        D.load_set(tmp_path)
    message = str(info.value)
    assert "7 image(s) without a mask" in message and "lonely0" in message
    assert "(and 2 more)" in message  # lists a few, not all
    assert "1 mask(s) without an image" in message and "orphan" in message


def test_unreadable_files_and_size_mismatches_are_listed_together(tmp_path):
    _write(tmp_path, "good")
    _write(tmp_path, "small", mask_size=(10, 24))
    _write(tmp_path, "broken")
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(D.DataLayoutError) as info:
        D.load_set(tmp_path)
    message = str(info.value)
    assert "unreadable" in message and "broken.png" in message
    assert "size mismatch" in message and "small" in message and "mask 24x10" in message
    assert "good" not in message


def test_training_stops_before_starting_when_the_layout_is_wrong(tmp_path, caplog):
    _write(tmp_path / "data", "a")
    _write(tmp_path / "data", "b", mask_size=(5, 5))
    out = tmp_path / "model.pt"
    code = cli_main(
        ["train", "segment", "--data", str(tmp_path / "data"), "--out", str(out), "--epochs", "1"]
    )
    assert code == 2
    assert "size mismatch" in caplog.text and "b (image" in caplog.text
    assert not out.exists() and not (tmp_path / "history.json").exists()


def test_binary_and_index_masks():
    binary = [np.array([[0, 255], [255, 0]])]
    assert D.resolve_classes(binary, None) == ("binary", ["background", "foreground"])
    assert D.resolve_classes(binary, ["membrane", "cell"]) == ("binary", ["membrane", "cell"])
    assert D.encode_mask(binary[0], "binary").tolist() == [[0, 1], [1, 0]]
    index = [np.array([[0, 1], [2, 0]])]
    assert D.resolve_classes(index, None) == ("index", ["background", "class_1", "class_2"])
    assert D.resolve_classes(index, ["bg", "tooth", "filling", "crown"])[1] == [
        "bg",
        "tooth",
        "filling",
        "crown",
    ]
    with pytest.raises(D.DataLayoutError, match="only 2 classes"):
        D.resolve_classes(index, ["bg", "tooth"])
    with pytest.raises(D.DataLayoutError, match="binary"):
        D.resolve_classes(binary, ["a", "b", "c"])
    with pytest.raises(D.DataLayoutError, match="not binary"):
        D.resolve_classes([np.array([[0, 128]])], None)


def _args(root, **kw):
    base = {
        "data": root,
        "val_split": 0.25,
        "seed": 0,
        "classes": None,
        "img_size": (16, 16),
        "tile_overlap": 0.25,
    }
    base.update(kw)
    return argparse.Namespace(**base)


def test_val_folder_overrides_the_random_split_and_classes_option(tmp_path):
    for stem in "abcd":
        _write(tmp_path, stem)
    _write(tmp_path / "val", "v1")
    prepared = prepare_data(_args(tmp_path, classes=["membrane,cell"]))
    assert prepared.train.stems == ["a", "b", "c", "d"]
    assert prepared.val.stems == ["v1"]
    assert prepared.classes == ["membrane", "cell"]
    assert prepared.mode == "binary"
    assert set(np.unique(prepared.train_targets[0])) == {0, 1}


def test_random_split_is_seeded_and_stats_come_from_training_images(tmp_path):
    for stem in "abcdefgh":
        _write(tmp_path, stem)
    a = prepare_data(_args(tmp_path))
    b = prepare_data(_args(tmp_path))
    c = prepare_data(_args(tmp_path, seed=5))
    assert a.val.stems == b.val.stems and len(a.val) == 2 and len(a.train) == 6
    assert a.val.stems != c.val.stems or a.train.stems != c.train.stems
    pixels = np.concatenate([im.ravel() for im in a.train.images])
    assert a.spec.mean[0] == pytest.approx(pixels.mean(), abs=1e-4)
    assert a.spec.std[0] == pytest.approx(pixels.std(), abs=1e-4)
    assert a.spec.resize == "tile" and a.spec.in_channels == 1


def test_fingerprint_follows_content_not_order(tmp_path):
    for stem in "abc":
        _write(tmp_path, stem)
    paths = sorted((tmp_path / "images").iterdir())
    assert D.fingerprint(paths) == D.fingerprint(list(reversed(paths)))
    before = D.fingerprint(paths)
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(paths[0])
    assert D.fingerprint(paths) != before
