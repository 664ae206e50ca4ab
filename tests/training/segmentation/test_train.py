import json
from typing import cast

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint, load_model
from models.preprocessing import prepare
from models.unet import UNet
from tests.training.helpers import train_argv
from training.cli import build_parser
from training.cli import main as cli_main
from training.segmentation import baselines
from training.segmentation import data as D
from training.segmentation.engine import evaluate
from training.segmentation.metrics import aggregate, score_image
from training.segmentation.synthetic import generate_dental
from training.segmentation.train import build_augment, run, state_path

TINY = ["--img-size", "64", "--channels", "8,16,32", "--batch-size", "8", "--lr", "3e-3", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    generate_dental(root / "train", 16, 96, seed=0)
    generate_dental(root / "test", 6, 96, seed=1)  # held out: never seen in training
    return root


def _args(argv):
    return build_parser(argv).parse_args(argv)


def test_short_training_beats_otsu_on_held_out_phantoms(phantoms, tmp_path):
    out = tmp_path / "dental.pt"
    options = ["--epochs", "5", "--samples-per-epoch", "48", "--val-split", "0.25", *TINY]
    code = cli_main(train_argv("segment", phantoms / "train", out, *options))
    assert code == 0
    model, meta = load_model(out)
    test = D.load_set(phantoms / "test")
    targets = [D.encode_mask(m, "binary") for m in test.masks]
    unet = aggregate(
        evaluate(
            model,
            [prepare(im, meta.preprocessing) for im in test.images],
            targets,
            2,
            (64, 64),
            device=torch.device("cpu"),
        ),
        meta.classes,
    )
    order = baselines.class_intensity_order(test.images, targets, 2)
    otsu = aggregate(
        [
            score_image(baselines.predict("otsu", im, order), t, 2)
            for im, t in zip(test.images, targets, strict=True)
        ],
        meta.classes,
    )
    unet_dice, otsu_dice = cast(float, unet["dice"]), cast(float, otsu["dice"])
    assert unet_dice > otsu_dice + 0.05
    assert unet_dice > 0.8

    # The checkpoint describes itself.
    assert meta.task == "segmentation" and meta.classes == ["background", "foreground"]
    assert meta.architecture.name == "unet" and meta.architecture.args["channels"] == [8, 16, 32]
    assert meta.architecture.args["upsample"] == "deconv"
    # Horizontal flips only by default, and evaluation's TTA uses just those.
    assert meta.training["hflip"] is True and meta.training["vflip"] is False
    assert meta.extra["tta_flips"] == ["horizontal"] and meta.tta_flips == ["horizontal"]
    assert meta.preprocessing.img_size == (64, 64) and meta.preprocessing.resize == "tile"
    assert 0 < meta.preprocessing.mean[0] < 1
    assert meta.training["epochs"] == 5 and meta.training["lr"] == 3e-3
    assert len(meta.data_fingerprint) == 16 and meta.version
    assert meta.extra["mask_values"] == [0, 255] and len(meta.extra["split"]["val"]) == 4
    history = json.loads((tmp_path / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    best = max(history, key=lambda r: r["val_dice"])
    assert meta.metrics["dice"] == pytest.approx(best["val_dice"]) and meta.metrics["epoch"] == best["epoch"]
    assert {"train_loss", "val_dice", "val_iou", "val_hd95", "val_per_class_dice"} <= set(history[0])
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000


@pytest.mark.parametrize("ema", ["0", "0.9"])
def test_same_seed_gives_identical_weights_and_resume_continues_exactly(phantoms, tmp_path, ema):
    # With --ema the returned model is the weight average: resuming must restore it too.
    def train(out, *options):
        argv = train_argv(
            "segment", phantoms / "train", out, "--samples-per-epoch", "16", "--ema", ema, *TINY, *options
        )
        return run(_args(argv))

    a = train(tmp_path / "a" / "m.pt", "--epochs", "2")
    b = train(tmp_path / "b" / "m.pt", "--epochs", "2")
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    # Stopped after epoch 1 (by the time limit, like an interruption), then resumed: the same weights as the
    # uninterrupted run.
    first = tmp_path / "c" / "m.pt"
    stopped = train(first, "--epochs", "2", "--time-limit", "1e-6")
    assert len(stopped.history) == 1
    assert state_path(first).exists()
    resumed = train(first, "--epochs", "2", "--resume", str(state_path(first)))
    for (name, x), y in zip(a.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    other = train(tmp_path / "d" / "m.pt", "--epochs", "1", "--seed", "1")
    assert not torch.equal(other.model.head.weight, a.model.head.weight)


def test_bad_options_are_clear_errors(phantoms, tmp_path, caplog):
    base = ["train", "segment", "--data", str(phantoms / "train"), *TINY]
    assert cli_main([*base, "--out", str(tmp_path / "model.ckpt")]) == 2
    assert ".pt" in caplog.text
    assert cli_main([*base, "--out", str(tmp_path / "m.pt"), "--val-split", "1.5"]) == 2
    assert "--val-split" in caplog.text
    assert cli_main([*base, "--out", str(tmp_path / "m.pt"), "--resume", str(tmp_path / "nothing.pt")]) == 2
    assert "--resume" in caplog.text
    with pytest.raises(SystemExit):
        cli_main([*base, "--out", str(tmp_path / "m.pt"), "--img-size", "abc"])
    assert not list(tmp_path.glob("*.pt"))


def test_multiclass_index_masks_with_class_names(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("images", 6),):
        for i in range(n):
            mask = np.zeros((48, 48), np.uint8)
            mask[5:20, 5:20] = 1
            mask[25:45, 20:40] = 2
            image = np.choose(mask, [40, 200, 120]).astype(np.uint8) + rng.integers(
                0, 20, (48, 48), dtype=np.uint8
            )
            (tmp_path / "d" / split).mkdir(parents=True, exist_ok=True)
            (tmp_path / "d" / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(tmp_path / "d" / split / f"{i}.png")
            Image.fromarray(mask).save(tmp_path / "d" / "masks" / f"{i}.png")
    out = tmp_path / "m.pt"
    options = ["--epochs", "1", "--samples-per-epoch", "8", "--classes", "bg", "tooth", "filling", *TINY]
    options += ["--upsample", "nearest"]
    result = run(_args(train_argv("segment", tmp_path / "d", out, *options)))
    meta, _state = load_checkpoint(out)
    assert meta.classes == ["bg", "tooth", "filling"] and meta.extra["mask_mode"] == "index"
    assert meta.architecture.args["out_channels"] == 3 and meta.architecture.args["upsample"] == "nearest"
    model, _meta = load_model(out)
    assert isinstance(model, UNet)
    assert type(model.up[0].reduce) is torch.nn.Conv2d
    assert set(result.history[0]["val_per_class_dice"]) == {"bg", "tooth", "filling"}


def test_weight_average_follows_the_documented_decay():
    from torch import nn

    from training.segmentation.train import weight_average

    conv, norm = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)
    net = nn.Sequential(conv, norm)
    averaged = weight_average(net, 0.99)
    assert averaged is not None and weight_average(net, 0.0) is None
    assert norm.num_batches_tracked is not None
    with torch.no_grad():
        conv.weight.fill_(0.0)
    for _ in range(1000):  # long enough for the ramp (1 + n) / (10 + n) to pass 0.99 (at n = 891)
        averaged.update_parameters(net)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    norm.num_batches_tracked.fill_(7)
    for _ in range(10):
        averaged.update_parameters(net)
    # Ten steps at decay 0.99 move the average 1 - 0.99**10 of the way: a smoothed, lagging copy.
    averaged_conv, averaged_norm = cast(nn.Sequential, averaged.module)
    assert isinstance(averaged_conv, nn.Conv2d) and isinstance(averaged_norm, nn.BatchNorm2d)
    assert averaged_norm.num_batches_tracked is not None
    assert averaged_conv.weight.item() == pytest.approx(1 - 0.99**10, rel=1e-4)
    assert averaged_norm.num_batches_tracked.item() == 7  # integer buffers: the latest value


def test_checkpoint_holds_the_weight_average_unless_turned_off(phantoms, tmp_path):
    from training.segmentation.train import load_train_state

    def train(name, *options):
        out = tmp_path / name / "m.pt"
        argv = train_argv("segment", phantoms / "train", out, "--samples-per-epoch", "16", "--epochs", "2")
        run(_args([*argv, *TINY, "--val-split", "0", *options]))  # no validation: the last epoch is saved
        return load_checkpoint(out)[1], load_train_state(out)

    saved, state = train("ema", "--ema", "0.99")
    assert any(not torch.equal(saved[k], state["model"][k]) for k in saved)
    assert state["ema"] and "n_averaged" in state["ema"]
    plain_saved, plain_state = train("plain")  # the default: off
    for key, value in plain_saved.items():
        assert torch.equal(value, plain_state["model"][key]), key
    assert cli_main([*train_argv("segment", phantoms / "train", tmp_path / "x.pt"), "--ema", "1.5"]) == 2


@pytest.mark.parametrize(
    ("options", "flips"),
    [
        ([], ["horizontal"]),
        (["--vflip"], ["horizontal", "vertical"]),
        (["--no-hflip", "--vflip"], ["vertical"]),
        (["--no-hflip"], []),
        (["--vflip", "--augment", "none"], []),
        (["--vflip", "--augment", "flips"], ["horizontal", "vertical"]),
    ],
)
def test_flip_options_decide_the_flips_recorded_for_tta(options, flips):
    args = _args(["train", "segment", "--data", "d", "--out", "m.pt", *options])
    assert build_augment(args, (64, 64)).flips == flips
