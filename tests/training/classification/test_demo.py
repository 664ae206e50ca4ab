"""The demo classifier: trained on the lesion phantom when the model folder has no classifier, reused otherwise."""

from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoint import Architecture, CheckpointMetadata, load_model, save_checkpoint
from models.preprocessing import Preprocessing
from models.unet import UNet
from training.classification.demo import build_demo_classifier, find_classification_checkpoint


def test_builds_a_loadable_lesion_classifier(tmp_path: Path) -> None:
    # A segmentation checkpoint in the folder does not count as a classifier.
    seg = UNet(1, 2, channels=(4, 8))
    seg_meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(
            name="unet", args={"in_channels": 1, "out_channels": 2, "channels": [4, 8]}
        ),
        classes=["background", "tooth"],
        preprocessing=Preprocessing(in_channels=1, img_size=(32, 32)),
    )
    save_checkpoint(tmp_path / "teeth.pt", seg, seg_meta)
    path = build_demo_classifier(tmp_path, n_per_class=12, size=32, epochs=1)
    assert path == tmp_path / "lesions.pt"
    model, meta = load_model(path)
    assert meta.task == "classification" and meta.classes == ["benign", "malignant"]
    assert meta.preprocessing.resize == "resize" and meta.extra["temperature"] > 0
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 2)
    assert (tmp_path / "demo-data" / "lesions" / "benign").is_dir()

    # Second call: the existing classifier is returned, nothing is retrained.
    before = path.stat().st_mtime_ns
    assert build_demo_classifier(tmp_path) == path
    assert path.stat().st_mtime_ns == before
    assert find_classification_checkpoint(tmp_path) == path
