import numpy as np
import pytest
import torch
from torch import nn

from models.inference import merge_tiles, resolve_device, segment_probabilities, split_tiles, tile_starts
from models.unet import UNet


@pytest.mark.parametrize("length", [1, 63, 64, 65, 100, 255, 512, 513])
@pytest.mark.parametrize("tile", [32, 64])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_tiles_cover_every_pixel_and_stay_inside(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = np.zeros(max(length, tile), dtype=int)
    for s in starts:
        assert s >= 0 and s + tile <= max(length, tile)
        covered[s : s + tile] += 1
    assert (covered[:length] > 0).all()
    assert starts == sorted(set(starts))


@pytest.mark.parametrize("size", [(10, 7), (64, 64), (100, 37), (130, 129)])
def test_merge_of_split_reproduces_the_image_at_its_size(size):
    image = torch.rand(3, *size)
    tiles, tiling = split_tiles(image, (32, 48), overlap=0.25)
    assert tiles.shape[1:] == (3, 32, 48)
    merged = merge_tiles(tiles, tiling)
    assert merged.shape == image.shape
    assert torch.allclose(merged, image, atol=1e-6)


@pytest.mark.parametrize("tta", [False, True])
def test_probabilities_have_the_input_size_and_sum_to_one(tta):
    model = UNet(1, 3, channels=(4, 8), norm="none").eval()
    images = [torch.randn(1, 45, 70), torch.randn(1, 20, 21), torch.randn(1, 96, 64)]
    probs = segment_probabilities(model, images, (32, 32), overlap=0.25, batch_size=5, tta=tta)
    for p, image in zip(probs, images, strict=True):
        assert p.shape == (3, *image.shape[-2:])
        assert torch.allclose(p.sum(0), torch.ones(image.shape[-2:]), atol=1e-5)


def test_tta_averages_the_identity_and_only_the_requested_flips():
    torch.manual_seed(0)
    model = nn.Conv2d(1, 2, 3, padding=1).eval()  # a random kernel: not symmetric under any flip
    image = torch.randn(1, 32, 32)

    def direct(flip_dims=()):
        with torch.no_grad():
            x = image.flip(flip_dims) if flip_dims else image
            p = torch.softmax(model(x[None]), dim=1)[0]
            return p.flip(flip_dims) if flip_dims else p

    def tta(flips, enabled=True):
        return segment_probabilities(model, [image], (32, 32), tta=enabled, flips=flips)[0]

    plain, mirrored_x, mirrored_y = direct(), direct((-1,)), direct((-2,))
    assert not torch.allclose(plain, mirrored_x, atol=1e-3)
    assert not torch.allclose(plain, mirrored_y, atol=1e-3)
    assert torch.allclose(tta([]), plain, atol=1e-5)
    assert torch.allclose(tta(["horizontal"]), (plain + mirrored_x) / 2, atol=1e-5)
    assert torch.allclose(tta(["vertical"]), (plain + mirrored_y) / 2, atol=1e-5)
    assert torch.allclose(tta(["horizontal", "vertical"]), (plain + mirrored_x + mirrored_y) / 3, atol=1e-5)
    assert torch.allclose(tta(["horizontal", "vertical"], enabled=False), plain, atol=1e-5)
    with pytest.raises(ValueError, match="diagonal"):
        tta(["diagonal"])


def test_tiled_prediction_of_a_large_image_matches_full_image_prediction():
    torch.manual_seed(0)
    # A fully convolutional net with a small receptive field (5x5): tiling only changes pixels whose
    # receptive field crosses a window edge, and blending gives those little weight.
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1)).eval()
    image = torch.randn(1, 300, 260)
    with torch.no_grad():
        full = torch.softmax(model(image[None]), dim=1)[0]
    tiled = segment_probabilities(model, [image], (64, 64), overlap=0.25, batch_size=16)[0]
    diff = (tiled - full).abs()
    assert diff.mean() < 2e-3
    # Pixels farther than the receptive-field radius (2) from every window edge are predicted exactly.
    near_edge = []
    for length in image.shape[1:]:
        near = np.zeros(length, dtype=bool)
        for s in tile_starts(length, 64, 0.25):
            for edge in (s, s + 64):
                near[max(0, edge - 2) : edge + 2] = True
        near[:2] = near[-2:] = False  # the image border is zero-padded in both predictions
        near_edge.append(torch.from_numpy(near))
    far = ~(near_edge[0][:, None] | near_edge[1][None, :])
    assert diff[:, far].max() < 1e-5


def test_tiled_unet_prediction_is_close_to_full_image_prediction():
    torch.manual_seed(0)
    model = UNet(1, 2, channels=(4, 8, 16), norm="none").eval()
    image = torch.randn(1, 192, 160)
    with torch.no_grad():
        full = torch.softmax(model(image[None]), dim=1)[0]
    tiled = segment_probabilities(model, [image], (96, 96), overlap=0.5, batch_size=16)[0]
    assert (tiled.argmax(0) == full.argmax(0)).float().mean() > 0.97
    assert (tiled - full).abs().mean() < 0.02


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            resolve_device("cuda")


@pytest.mark.parametrize("batch", [1, 3])
def test_served_layout_changes_no_answer(batch):
    # The service runs models in channels_last (faster on CPU and GPU); the answers must be those of the
    # model as trained, for the U-Net and a classifier.
    from models.classifier import Classifier
    from models.inference import forward, prepare_for_device

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    for make, shape in (
        (lambda: UNet(in_channels=1, out_channels=3, channels=[8, 16, 32]), (batch, 1, 40, 56)),
        (lambda: Classifier("resnet18", num_classes=3, in_channels=1, head="gap"), (batch, 1, 64, 64)),
    ):
        trained = make().eval()
        served: nn.Module = make()
        served.load_state_dict(trained.state_dict())
        served = prepare_for_device(served, cpu)
        x = torch.randn(*shape)
        with torch.inference_mode():
            expected = trained(x)
        got = forward(served, x, cpu)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1))
