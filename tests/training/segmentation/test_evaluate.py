import json

import pytest
import torch

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.preprocessing import Preprocessing
from models.unet import UNet
from tests.training.helpers import eval_argv, tiny_unet_args
from training.cli import main as cli_main
from training.segmentation import baselines
from training.segmentation.synthetic import generate_dental

# The original three keep their keys; the report holds every baseline of the module.
METHODS = {"unet", "otsu", "kmeans", "region_growing", *baselines.METHODS}


pytestmark = pytest.mark.usefixtures("single_thread")


def _checkpoint(path, task="segmentation", tta_flips=None):
    torch.manual_seed(0)
    args = tiny_unet_args()
    model = UNet(**args).eval()
    meta = CheckpointMetadata(
        task=task,
        architecture=Architecture(name="unet", args=args),
        classes=["background", "tooth"],
        preprocessing=Preprocessing(in_channels=1, img_size=(48, 48), mean=[0.3], std=[0.2]),
        extra={"mask_mode": "binary", "mask_values": [0, 255]}
        | ({} if tta_flips is None else {"tta_flips": tta_flips}),
    )
    save_checkpoint(path, model, meta)
    return path


def test_report_has_every_method_and_field_and_overlays(tmp_path):
    generate_dental(tmp_path / "data", 4, 64, seed=3)
    model = _checkpoint(tmp_path / "m.pt")
    out = tmp_path / "report"
    code = cli_main(eval_argv("segment", model, tmp_path / "data", out, "--device", "cpu", "--overlays", "1"))
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"n_images", "methods"}
    assert report["n_images"] == 4
    assert set(report["methods"]) == METHODS
    for name, scores in report["methods"].items():
        ranking = {"rank"} | ({"beaten_by_unet"} if name != "unet" else set())
        assert set(scores) == {"dice", "iou", "hd95", "per_class_dice", "seconds_per_image"} | ranking
        assert 0 <= scores["dice"] <= 1 and 0 <= scores["iou"] <= 1 and scores["hd95"] >= 0
        assert set(scores["per_class_dice"]) == {"background", "tooth"}
    # The baselines do well on the phantom; an untrained U-Net cannot, and the report says so.
    assert report["methods"]["region_growing"]["dice"] > report["methods"]["unet"]["dice"]
    markdown = (out / "report.md").read_text()
    for label in ("Otsu", "k-means", "region growing"):
        assert f"U-Net does not beat {label}" in markdown
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert len(overlays) == 2 and overlays[0].startswith("best_1_") and overlays[1].startswith("worst_1_")
    assert len((out / "per_image.csv").read_text().splitlines()) == 1 + 4 * len(METHODS)
    # A checkpoint that does not record its training flips predates optional vertical flips: both were used.
    assert "flip TTA over horizontal and vertical flips" in markdown


def test_tta_uses_only_the_flips_the_model_was_trained_with(tmp_path):
    generate_dental(tmp_path / "data", 1, 64, seed=6)
    model = _checkpoint(tmp_path / "m.pt", tta_flips=["horizontal"])
    code = cli_main(eval_argv("segment", model, tmp_path / "data", tmp_path / "h", "--device", "cpu"))
    assert code == 0
    assert "flip TTA over horizontal flips (those of training)" in (tmp_path / "h" / "report.md").read_text()
    model = _checkpoint(tmp_path / "n.pt", tta_flips=[])
    assert cli_main(eval_argv("segment", model, tmp_path / "data", tmp_path / "n", "--device", "cpu")) == 0
    assert "trained without flips" in (tmp_path / "n" / "report.md").read_text()


def test_full_resolution_prediction_without_tta(tmp_path):
    generate_dental(tmp_path / "data", 2, 100, seed=4)  # larger than the 48x48 tiles, not a multiple of them
    model = _checkpoint(tmp_path / "m.pt")
    out = tmp_path / "r"
    code = cli_main(eval_argv("segment", model, tmp_path / "data", out, "--no-tta", "--device", "cpu"))
    assert code == 0
    assert "TTA off" in (out / "report.md").read_text()
    from PIL import Image

    overlay = Image.open(next((out / "overlays").glob("best_*.png")))
    assert overlay.width == 100 and overlay.height > 100  # full resolution plus a caption strip


def test_wrong_task_or_mask_values_are_clear_errors(tmp_path, caplog):
    generate_dental(tmp_path / "data", 1, 64, seed=5)
    model = _checkpoint(tmp_path / "c.pt", task="classification")
    code = cli_main(eval_argv("segment", model, tmp_path / "data", tmp_path / "o"))
    assert code == 2 and "not a segmentation model" in caplog.text
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(tmp_path / "data" / "masks" / "dental_0000.png")
    model = _checkpoint(tmp_path / "s.pt")
    code = cli_main(eval_argv("segment", model, tmp_path / "data", tmp_path / "o"))
    assert code == 2 and "binary" in caplog.text
