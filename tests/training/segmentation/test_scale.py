"""``--scale native|fit|auto``: fitted training, masks back at each image's size, old checkpoints as native."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import load_model
from models.preprocessing import prepare
from tests.training.helpers import eval_argv, save_tiny_unet, train_argv
from training.cli import build_parser
from training.cli import main as cli_main
from training.segmentation import data as D
from training.segmentation.engine import predict_labels
from training.segmentation.synthetic import chest_phantom, generate_chest, generate_dental
from training.segmentation.train import parse_target_size, run

TINY = ["--channels", "4,8", "--epochs", "1", "--device", "cpu", "--augment", "flips"]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def chests(tmp_path_factory):
    root = tmp_path_factory.mktemp("chests")
    generate_chest(root / "train", 6, 200, seed=0)  # long sides 40-200 px: mixed sizes
    generate_chest(root / "test", 3, 200, seed=1)
    return root


def _args(argv):
    return build_parser(argv).parse_args(argv)


def test_synth_chest_writes_mixed_sizes_with_binary_lung_masks(tmp_path, capsys):
    assert (
        cli_main(["synth", "chest", "--out", str(tmp_path), "--n", "5", "--size", "300", "--seed", "2"]) == 0
    )
    assert "long side up to 300" in capsys.readouterr().out
    sizes = set()
    for image_path in sorted((tmp_path / "images").glob("*.png")):
        image = np.asarray(Image.open(image_path))
        mask = np.asarray(Image.open(tmp_path / "masks" / image_path.name))
        assert image.shape == mask.shape and image.dtype == np.uint8 and max(image.shape) <= 300
        assert set(np.unique(mask)) == {0, 255}
        assert image[mask == 255].mean() < image[mask == 0].mean()  # lungs are darker
        sizes.add(image.shape)
    assert len(sizes) == 5
    a, b = chest_phantom(np.random.default_rng(3), 64, 80), chest_phantom(np.random.default_rng(3), 64, 80)
    assert np.array_equal(a[0], b[0]) and a[0].shape == (64, 80)
    with pytest.raises(ValueError):
        chest_phantom(np.random.default_rng(0), 16, 80)


def test_fit_training_stores_the_policy_and_plan_and_masks_come_back_at_each_size(chests, tmp_path, capsys):
    out = tmp_path / "fit.pt"
    result = run(
        _args(train_argv("segment", chests / "train", out, "--scale", "fit", "--target-size", "64", *TINY))
    )
    model, meta = load_model(out)
    spec = meta.preprocessing
    assert spec.resize == "fit" and spec.working_size is not None and max(spec.working_size) == 64
    assert spec.img_size == spec.working_size  # small enough to train whole: one window at inference
    plan = meta.extra["plan"]
    assert plan["scale"] == "fit" and plan["requested"] == "fit" and plan["tiles"] is False
    assert plan["working_size"] == list(spec.working_size) and plan["reasons"]
    # 5 training images, one sample each, 4 per step: one step per epoch.
    assert plan["samples_per_epoch"] == 5 and plan["steps_per_epoch"] == 1 and len(result.history) == 1
    assert plan["fingerprint"]["n_images"] == 6
    assert meta.training["scale"] == "fit" and meta.training["target_size"] == [64]
    assert meta.training["img_size"] == list(spec.img_size) and meta.training["batch_size"] == 4

    test = D.load_set(chests / "test")
    labels = predict_labels(
        model,
        [prepare(im, spec) for im in test.images],
        spec.img_size,
        overlap=spec.tile_overlap,
        tta=False,
        device=torch.device("cpu"),
        spec=spec,
        original_sizes=[im.shape[:2] for im in test.images],
    )
    assert [lab.shape for lab in labels] == [m.shape for m in test.masks]
    assert len({m.shape for m in test.masks}) == 3

    report_dir = tmp_path / "eval"
    assert cli_main(eval_argv("segment", out, chests / "test", report_dir, "--device", "cpu")) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["n_images"] == 3
    assert "working size" in (report_dir / "report.md").read_text()

    capsys.readouterr()
    assert cli_main(["info", str(out), "--plan"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("scale fit (asked: fit") and "- --scale fit was asked for" in printed
    assert cli_main(["info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["extra"]["plan"] == plan


def test_auto_is_native_on_small_uniform_images_and_equals_scale_native(tmp_path):
    generate_dental(tmp_path / "data", 6, 96, seed=0)
    common = ["--img-size", "48", "--samples-per-epoch", "8", *TINY]
    auto = run(_args(train_argv("segment", tmp_path / "data", tmp_path / "a" / "m.pt", *common)))
    native = run(
        _args(train_argv("segment", tmp_path / "data", tmp_path / "n" / "m.pt", "--scale", "native", *common))
    )
    for (name, x), y in zip(auto.model.state_dict().items(), native.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert auto.metadata is not None and native.metadata is not None
    for meta in (auto.metadata, native.metadata):
        assert meta.preprocessing.resize == "tile" and meta.preprocessing.working_size is None
        assert meta.preprocessing.img_size == (48, 48) and meta.extra["plan"]["scale"] == "native"
        assert meta.training["samples_per_epoch"] == 8 and meta.extra["plan"]["tiles"] is True
    assert auto.metadata.extra["plan"]["requested"] == "auto"
    # Without --img-size and --batch-size, native scale trains as before: 256 crops, 4 per step, and every
    # 96 x 96 image is one crop per epoch.
    default = run(
        _args(train_argv("segment", tmp_path / "data", tmp_path / "d" / "m.pt", "--scale", "native", *TINY))
    )
    assert default.metadata is not None
    assert default.metadata.preprocessing.img_size == (256, 256)
    assert (
        default.metadata.training["batch_size"] == 4 and default.metadata.training["samples_per_epoch"] == 5
    )


def test_old_checkpoints_without_a_plan_evaluate_at_native_scale(tmp_path, capsys):
    generate_dental(tmp_path / "data", 2, 40, seed=1)
    save_tiny_unet(tmp_path / "old.pt")
    assert (
        cli_main(
            eval_argv("segment", tmp_path / "old.pt", tmp_path / "data", tmp_path / "eval", "--device", "cpu")
        )
        == 0
    )
    assert "full resolution with 32x32 tiles" in (tmp_path / "eval" / "report.md").read_text()
    capsys.readouterr()
    assert cli_main(["info", str(tmp_path / "old.pt"), "--plan"]) == 0
    assert (
        "has no plan" in capsys.readouterr().out
        and "native scale" in capsys.readouterr().out + "native scale"
    )


def test_target_size_is_a_long_side_or_height_by_width():
    assert parse_target_size("384") == (384,)
    assert parse_target_size("320x384") == (320, 384) and parse_target_size("320,384") == (320, 384)


def test_bad_target_sizes_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        cli_main(train_argv("segment", tmp_path, tmp_path / "m.pt", "--target-size", "8"))
    with pytest.raises(SystemExit):
        cli_main(train_argv("segment", tmp_path, tmp_path / "m.pt", "--scale", "huge"))
