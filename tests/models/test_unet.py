import pytest
import torch

from models.unet import UNet


@pytest.mark.parametrize(
    ("channels", "size"),
    [
        ((4, 8), (1, 1)),
        ((4, 8), (7, 5)),
        ((4, 8, 16), (37, 53)),
        ((4, 8, 16, 32), (64, 33)),
        ((2, 4, 8, 16, 32), (31, 17)),
    ],
)
@pytest.mark.parametrize("upsample", ["deconv", "nearest"])
def test_output_has_input_size_for_any_size_and_depth(channels, size, upsample):
    model = UNet(in_channels=3, out_channels=5, channels=channels, upsample=upsample).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5, *size)
    assert torch.isfinite(out).all()


def test_depth_follows_channels():
    assert UNet(1, 2, channels=(4, 8, 16)).depth == 2
    assert len(UNet(1, 2, channels=(4, 8, 16, 32, 64)).down) == 5


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_norms_train_and_backpropagate(norm):
    model = UNet(1, 2, channels=(4, 8), norm=norm, dropout=0.2)
    out = model(torch.randn(2, 1, 20, 12))
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_padding_is_cropped_back_not_leaking_size_dependence():
    # The prediction for a 16x16 input must not depend on extra rows appended below (beyond receptive
    # field effects of padding), i.e. the output is cropped from the top-left, not resized.
    torch.manual_seed(0)
    model = UNet(1, 2, channels=(4, 8), norm="none").eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        small = model(x)
        padded = model(torch.cat([x, x.flip(2)[:, :, :3]], dim=2))
    assert padded.shape[-2:] == (19, 16)
    assert torch.allclose(small[..., :4, :], padded[..., :4, :], atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channels": (8,)},
        {"channels": (8, 0)},
        {"channels": ()},
        {"norm": "group"},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"in_channels": 0},
        {"out_channels": 0},
        {"upsample": "bilinear"},
    ],
)
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        UNet(**kwargs)


def test_wrong_input_channels_raise_value_error():
    model = UNet(1, 2, channels=(4, 8))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 3, 8, 8))


def test_upsample_kinds_are_different_layers_with_a_deconv_default():
    deconv, nearest = UNet(1, 2, channels=(4, 8)), UNet(1, 2, channels=(4, 8), upsample="nearest")
    assert isinstance(deconv.up[0].reduce, torch.nn.ConvTranspose2d)
    assert type(nearest.up[0].reduce) is torch.nn.Conv2d
    # Same parameter names (old and new checkpoints share a layout), different weight shapes (in/out swapped),
    # so weights of one kind can never be loaded silently into the other.
    assert deconv.state_dict().keys() == nearest.state_dict().keys()
    with pytest.raises(RuntimeError, match="size mismatch"):
        deconv.load_state_dict(nearest.state_dict())
