import pickle
from typing import Any

import pytest
import torch

from models.checkpoint import (
    FORMAT_NAME,
    Architecture,
    CheckpointError,
    CheckpointMetadata,
    content_hash,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from models.preprocessing import Preprocessing
from models.unet import UNet

ARCH: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 3,
    "channels": [4, 8, 16],
    "norm": "batch",
    "dropout": 0.0,
}


def _metadata() -> CheckpointMetadata:
    return CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="unet", args=ARCH),
        classes=["background", "tooth", "filling"],
        preprocessing=Preprocessing(
            in_channels=1, img_size=(64, 48), mean=[0.4], std=[0.2], tile_overlap=0.3
        ),
        training={"epochs": 3, "lr": 0.001, "data": "/some/dir"},
        metrics={"dice": 0.91, "per_class_dice": {"background": 0.99, "tooth": 0.9, "filling": 0.92}},
        data_fingerprint="abc123",
        extra={"mask_mode": "index", "mask_values": [0, 1, 2]},
    )


def _trained_model() -> UNet:
    torch.manual_seed(0)
    model = UNet(**ARCH)
    model.train()
    model(torch.randn(2, 1, 16, 16))  # updates BatchNorm running statistics (buffers must survive too)
    return model.eval()


def test_round_trip_gives_identical_outputs_and_metadata(tmp_path):
    model = _trained_model()
    path = tmp_path / "teeth.pt"
    saved = save_checkpoint(path, model, _metadata())
    loaded, meta = load_model(path)
    x = torch.randn(1, 1, 37, 29)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not loaded.training
    assert meta == saved
    assert meta.classes == ["background", "tooth", "filling"]
    assert meta.preprocessing.img_size == (64, 48)
    assert meta.preprocessing.mean == [0.4]
    assert meta.training["lr"] == 0.001
    assert meta.metrics["per_class_dice"]["filling"] == 0.92
    assert meta.extra["mask_values"] == [0, 1, 2]
    assert meta.data_fingerprint == "abc123"
    assert meta.versions["torch"] == torch.__version__
    assert meta.created_at


def test_version_is_a_content_hash(tmp_path):
    model = _trained_model()
    a = save_checkpoint(tmp_path / "a.pt", model, _metadata())
    b = save_checkpoint(tmp_path / "b.pt", model, _metadata().model_copy(update={"created_at": a.created_at}))
    assert a.version == b.version and len(a.version) == 16
    meta, state = load_checkpoint(tmp_path / "a.pt")
    assert content_hash(state, meta) == meta.version
    assert model.head.bias is not None
    with torch.no_grad():
        model.head.bias.add_(1e-3)
    c = save_checkpoint(tmp_path / "c.pt", model, _metadata().model_copy(update={"created_at": a.created_at}))
    assert c.version != a.version


class _Payload:
    """Unpickling this object would call exec and create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_crafted_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save(
        {"medserve_format": FORMAT_NAME, "format_version": 1, "metadata": _Payload(marker), "state_dict": {}},
        path,
    )
    # Sanity: the payload is live (plain pickle would run it).
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_Payload(tmp_path / "control.txt")))
    pickle.loads(plain.read_bytes())
    assert (tmp_path / "control.txt").exists()

    with pytest.raises(CheckpointError, match=r"evil\.pt") as info:
        load_checkpoint(path)
    assert "refused" in str(info.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()


def test_newer_format_version_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "future.pt"
    model = _trained_model()
    torch.save(
        {
            "medserve_format": FORMAT_NAME,
            "format_version": 99,
            "metadata": _metadata().model_dump_json(),
            "state_dict": model.state_dict(),
        },
        path,
    )
    with pytest.raises(CheckpointError, match=r"future\.pt.*newer"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.pt", b"this is not a checkpoint"),
        ("empty.pt", b""),
        ("image.pt", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
    ],
)
def test_non_checkpoint_files_give_an_error_naming_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(path)


def test_plain_torch_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r"weights\.pt.*not a MedServe checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_format_version_1_unet_loads_with_nearest_upsampling_and_same_outputs(tmp_path):
    # Files written before format version 2 do not name ``upsample``; their U-Nets all used nearest + 2x2 conv.
    torch.manual_seed(0)
    old = UNet(**ARCH, upsample="nearest").eval()
    metadata = save_checkpoint(tmp_path / "tmp.pt", old, _metadata())
    path = tmp_path / "v1.pt"
    torch.save(
        {
            "medserve_format": FORMAT_NAME,
            "format_version": 1,
            "metadata": metadata.model_dump_json(),
            "state_dict": old.state_dict(),
        },
        path,
    )
    loaded, meta = load_model(path)
    assert meta.architecture.args["upsample"] == "nearest"
    assert meta.version == metadata.version  # the model keeps its version
    x = torch.randn(1, 1, 37, 29)
    with torch.no_grad():
        assert torch.equal(old(x), loaded(x))


def test_current_format_without_upsample_builds_the_default_deconv(tmp_path):
    model = _trained_model()
    assert "upsample" not in ARCH
    save_checkpoint(tmp_path / "new.pt", model, _metadata())
    loaded, meta = load_model(tmp_path / "new.pt")
    assert "upsample" not in meta.architecture.args
    assert isinstance(loaded, UNet)
    assert isinstance(loaded.up[0].reduce, torch.nn.ConvTranspose2d)
