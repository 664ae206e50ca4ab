"""The helpers the data-analysis benchmarks share (``benchmarks/bench_layout.py``)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.preprocessing import Preprocessing
from models.unet import UNet
from tests.models.test_dicom import anatomy, make_dicom
from tests.training.helpers import tiny_unet_args

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_layout

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")


def test_a_checkpoints_images_are_read_with_its_intensity_policy(tmp_path):
    """A window far above the stored values reads blank by default; "ignore-window", the checkpoint's, does not."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    values = anatomy()
    (data / "images" / "case.dcm").write_bytes(
        make_dicom(values, bits_stored=12, WindowCenter=6000, WindowWidth=100)
    )
    Image.fromarray(np.where(values == values.max(), 255, 0).astype(np.uint8)).save(
        data / "masks" / "case.png"
    )
    args = tiny_unet_args()
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="unet", args=args),
        classes=["background", "disc"],
        preprocessing=Preprocessing(
            in_channels=1, img_size=(16, 16), mean=[0.5], std=[0.2], intensity="ignore-window"
        ),
        extra={"mask_mode": "binary", "mask_values": [0, 255]},
    )
    checkpoint = tmp_path / "m.pt"
    save_checkpoint(checkpoint, UNet(**args).eval(), meta)
    cpu = torch.device("cpu")

    default, none = bench_layout.load_labelled_set(data, None, cpu)
    assert none is None
    assert default.images[0].std() < 0.01

    windowless, loaded = bench_layout.load_labelled_set(data, checkpoint, cpu)
    assert loaded is not None and loaded[1].preprocessing.intensity == "ignore-window"
    assert windowless.images[0].std() > 0.2
    assert windowless.stems == default.stems == ["case"]
