import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.preprocessing import Preprocessing
from models.unet import UNet
from tests.training.helpers import tiny_unet_args

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import label_width

SIZE = 48


def _strips(*widths: int) -> np.ndarray:
    """Horizontal strips of the given widths across a SIZE x SIZE image, 10 pixels apart."""
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    top = 5
    for width in widths:
        mask[top : top + width, :] = True
        top += width + 10
    return mask


@pytest.mark.parametrize("width", [1, 3, 6])
def test_a_straight_strip_measures_its_width(width):
    assert label_width.structure_width(_strips(width)) == pytest.approx(width)


def test_strips_of_equal_length_average_their_widths():
    assert label_width.structure_width(_strips(2, 6)) == pytest.approx(4.0)


def test_a_mask_without_boundary_has_no_width():
    assert label_width.structure_width(np.zeros((8, 8), bool)) == 0.0
    assert label_width.structure_width(np.ones((8, 8), bool)) == 0.0


def _write_set(root: Path, widths: dict[str, int]) -> None:
    """Membranes as mask value 0 (class 0) on 255, like the ISBI masks; images dark where the membranes are."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem, width in widths.items():
        membrane = _strips(width)
        Image.fromarray(np.where(membrane, 0, 255).astype(np.uint8)).save(root / "masks" / f"{stem}.png")
        Image.fromarray(np.where(membrane, 60, 200).astype(np.uint8)).save(root / "images" / f"{stem}.png")


def test_report_lists_the_label_width_of_every_image(tmp_path, capsys):
    _write_set(tmp_path / "data", {"a": 4, "b": 2})
    out = tmp_path / "report.json"
    assert label_width.main(["--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    widths = {row["image"]: row["width"] for row in report["per_image"]}
    assert widths == pytest.approx({"a": 4.0, "b": 2.0})
    assert report["summary"]["width"] == pytest.approx({"mean": 3.0, "min": 2.0, "max": 4.0})
    assert report["model"] is None
    assert "pred width" not in capsys.readouterr().out


def test_a_model_that_draws_thicker_structures_is_reported_as_such(tmp_path, monkeypatch):
    _write_set(tmp_path / "data", {"a": 4, "b": 2})
    torch.manual_seed(0)
    args = tiny_unet_args()
    checkpoint = tmp_path / "m.pt"
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="unet", args=args),
        classes=["membrane", "cell"],
        preprocessing=Preprocessing(in_channels=1, img_size=(32, 32), mean=[0.5], std=[0.2]),
        extra={"mask_mode": "binary", "mask_values": [0, 255]},
    )
    save_checkpoint(checkpoint, UNet(**args).eval(), meta)

    # Stand-in for the network's output: every membrane one pixel thicker on each side.
    def thicker(model, meta, images, device):
        assert len(images) == 2 and meta.classes == ["membrane", "cell"]
        membranes = [ndimage.binary_dilation(_strips(w), np.ones((3, 1), bool)) for w in (4, 2)]
        return [torch.from_numpy(np.stack([m, ~m]).astype(np.float32)) for m in membranes]

    monkeypatch.setattr(label_width, "evaluation_probabilities", thicker)
    out = tmp_path / "report.json"
    code = label_width.main(
        ["--data", str(tmp_path / "data"), "--model", str(checkpoint), "--device", "cpu", "--out", str(out)]
    )
    assert code == 0
    rows = {row["image"]: row for row in json.loads(out.read_text())["per_image"]}
    for stem, width in (("a", 4), ("b", 2)):
        assert rows[stem]["width"] == pytest.approx(width)
        assert rows[stem]["predicted_width"] == pytest.approx(width + 2)
        assert rows[stem]["false_positive"] == 2 * SIZE
        assert rows[stem]["false_negative"] == 0
        assert rows[stem]["dice"] == pytest.approx(2 * width / (2 * width + 2))
