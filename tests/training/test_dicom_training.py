"""Training and evaluating on a folder of DICOM files, and serving the checkpoint with the same intensity policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.runners import ImageUpload, SegmentationRunner, load_runner
from models.checkpoint import load_checkpoint
from models.imageio import read_image_file
from models.preprocessing import Preprocessing, prepare
from tests.models.test_dicom import make_dicom
from tests.training.helpers import eval_argv, train_argv
from training.classification.data import load_image
from training.cli import build_parser
from training.cli import main as cli_main
from training.segmentation.train import prepare_data

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:pydicom"),
    pytest.mark.usefixtures("single_thread"),
]

SIZE = 40
TINY = ["--img-size", "32", "--channels", "4,8", "--batch-size", "2", "--device", "cpu", "--augment", "none"]


def phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """12-bit values (H, W) of a dim gradient with a bright disc, and its 0/255 mask (the disc)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    cy, cx = rng.integers(12, SIZE - 12, size=2)
    disc = (y - cy) ** 2 + (x - cx) ** 2 < int(rng.integers(5, 9)) ** 2
    values = 300 + 900 * x / (SIZE - 1) + rng.normal(0, 30, size=(SIZE, SIZE))
    values[disc] = 3000 + rng.normal(0, 60, size=int(disc.sum()))
    return np.clip(np.rint(values), 0, 4095).astype(np.int64), np.where(disc, 255, 0).astype(np.uint8)


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """images/*.dcm (12-bit, half of them MONOCHROME1) + masks/*.png.

    Every file carries a window far above its values (a preset that misses the anatomy), so under the default
    policy "dicom-window" the images read blank and only "ignore-window" shows the disc.
    """
    root = tmp_path_factory.mktemp("dicom-set")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(4):
        values, mask = phantom(i)
        # MONOCHROME1 stores the inverted values: read back, it must be the same anatomy.
        kwargs = {"photometric": "MONOCHROME1"} if i % 2 else {}
        stored = 4095 - values if i % 2 else values
        (root / "images" / f"case{i}.dcm").write_bytes(
            make_dicom(stored, bits_stored=12, WindowCenter=6000, WindowWidth=100, **kwargs)
        )
        Image.fromarray(mask).save(root / "masks" / f"case{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(dicom_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny U-Net trained for two steps on the DICOM folder with ``--intensity ignore-window``."""
    out = tmp_path_factory.mktemp("dicom-model") / "dcm.pt"
    argv = train_argv("segment", dicom_folder, out, "--epochs", "1")
    code = cli_main(
        [*argv, "--samples-per-epoch", "4", "--val-split", "0.25", "--intensity", "ignore-window", *TINY]
    )
    assert code == 0
    return out


def test_training_on_dicom_records_the_policy_it_read_with(dicom_folder: Path, trained: Path) -> None:
    meta, _ = load_checkpoint(trained)
    spec = meta.preprocessing
    assert spec.intensity == "ignore-window" and meta.training["intensity"] == "ignore-window"
    assert meta.classes == ["background", "foreground"]
    assert meta.training["train_images"] + meta.training["val_images"] == 4

    # The training images were read with that policy: the stored mean is theirs, not the (blank) window's.
    train_paths = [dicom_folder / "images" / f"{stem}.dcm" for stem in meta.extra["split"]["train"]]
    ignored = np.concatenate(
        [read_image_file(p, intensity="ignore-window").pixels.ravel() for p in train_paths]
    )
    assert spec.mean[0] == pytest.approx(ignored.mean(), abs=1e-5)
    assert 0.1 < ignored.mean() < 0.6


def test_default_policy_is_recorded_and_reads_the_window(dicom_folder: Path) -> None:
    argv = train_argv("segment", dicom_folder, Path("x.pt"))
    prepared = prepare_data(build_parser(argv).parse_args(argv))
    assert prepared.spec.intensity == "dicom-window"
    for image in prepared.train.images + prepared.val.images:
        assert np.ptp(image) == 0  # the window misses the anatomy: blank, as the default policy says


def test_the_trained_checkpoint_serves_dicom_with_its_policy(dicom_folder: Path, trained: Path) -> None:
    runner = load_runner("dcm", trained, device=torch.device("cpu"), precision="fp32", forward_batch_size=4)
    assert isinstance(runner, SegmentationRunner)
    path = dicom_folder / "images" / "case1.dcm"
    item = runner.decode(ImageUpload(path.read_bytes(), "application/dicom", None), max_pixels=None)
    expected = prepare(read_image_file(path, intensity="ignore-window").pixels, runner.spec)
    assert torch.equal(item.image, expected)
    (scores,) = runner.run_batch([item])
    assert runner.mask(item, scores).shape == (SIZE, SIZE)


def test_eval_reads_the_dicom_folder_with_the_checkpoints_policy(
    dicom_folder: Path, trained: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    assert cli_main(eval_argv("segment", trained, dicom_folder, out, "--device", "cpu", "--no-tta")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_images"] == 4
    # Read with ignore-window the disc stands out and Otsu finds it; read through the window it would be blank.
    assert report["methods"]["otsu"]["dice"] > 0.95


def test_classification_data_reads_dicom_with_the_specs_policy(dicom_folder: Path) -> None:
    path = dicom_folder / "images" / "case0.dcm"
    spec = Preprocessing(in_channels=1, img_size=(16, 16), resize="resize", intensity="ignore-window")
    shown = load_image(path, spec)
    assert shown.shape == (1, 16, 16) and float(shown.max() - shown.min()) > 0.5
    blank = load_image(path, spec.model_copy(update={"intensity": "dicom-window"}))
    assert float(blank.max() - blank.min()) == 0.0
