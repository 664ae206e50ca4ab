"""models.explain: the Grad-CAM layer of each backbone, the map's way back to the image, its private copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.classifier import BACKBONES, Classifier
from models.explain import (
    MIN_CAM_SIDE,
    GradCam,
    cam_to_original,
    classifier_stage,
    gradcam_layer,
    heat_overlay,
    heat_to_uint8,
)
from models.preprocessing import Preprocessing


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_the_layer_is_the_deepest_stage_with_enough_cells(backbone: str) -> None:
    """Checked against the stages' real output sizes: the chosen stage has at least MIN_CAM_SIDE cells, the
    next one fewer (at 112, where the last stage of every backbone is too coarse, and at 64)."""
    model = Classifier(backbone, num_classes=2, in_channels=1, head="gap").eval()
    for size in (64, 112):
        sides = []
        x = torch.zeros(1, 1, size, size)
        with torch.no_grad():
            for stage in model.features:
                x = stage(x)
                sides.append(min(x.shape[-2:]))
        index = classifier_stage(backbone, (size, size))
        assert sides[index] >= MIN_CAM_SIDE
        assert index == len(sides) - 1 or sides[index + 1] < MIN_CAM_SIDE, (size, sides)
        layer = gradcam_layer(model, (size, size))
        assert layer is not None and layer.name == f"features.{index}"
        assert dict(model.named_modules())[layer.name] is model.features[index]
    assert classifier_stage(backbone, (224, 224)) == 4  # the layer pytorch-grad-cam recommends


def test_other_networks_are_explained_at_their_last_convolution() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    layer = gradcam_layer(net, (16, 16))
    assert layer is not None and layer.name == "2"
    assert gradcam_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), (2, 2)) is None


def test_a_compiled_model_is_explained_like_the_module_it_wraps() -> None:
    model = Classifier("resnet18", num_classes=2, in_channels=1, head="gap").eval()
    compiled = torch.compile(model)
    assert isinstance(compiled, nn.Module)
    assert gradcam_layer(compiled, (224, 224)) == gradcam_layer(model, (224, 224))


def test_gradcam_runs_on_a_private_copy_and_leaves_the_served_model_alone() -> None:
    torch.manual_seed(0)
    model = Classifier("resnet18", num_classes=2, in_channels=1, head="gap").eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    layer = gradcam_layer(model, (64, 64))
    assert layer is not None
    cam = GradCam(model, layer)
    heat = cam.explain(torch.randn(1, 64, 64), 1)
    assert heat.shape == (64, 64) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    seen = len(cam.cam.activations_and_grads.activations)
    with torch.no_grad():
        model(torch.randn(2, 1, 64, 64))
    assert len(cam.cam.activations_and_grads.activations) == seen  # no hook on the served model
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert cam.model is not model and not any(p.requires_grad for p in cam.model.parameters())


def test_the_map_goes_back_to_the_original_image() -> None:
    # resize: the whole map is resampled to the image's size.
    spec = Preprocessing(in_channels=1, img_size=(8, 8), resize="resize")
    cam = np.zeros((8, 8), dtype=np.float32)
    cam[:, :4] = 1.0
    back = cam_to_original(cam, 10, 30, spec)
    assert back.shape == (10, 30)
    assert back[:, :13].min() > 0.99 and back[:, 17:].max() < 0.01
    # fit: the 20x40 image was fitted into 32x32 as 16x32 at row 8; the padding is cut off first.
    fit = Preprocessing(in_channels=1, img_size=(32, 32), resize="fit", working_size=(32, 32))
    cam = np.zeros((32, 32), dtype=np.float32)
    cam[8:24, :16] = 1.0  # the image's left half, inside the letterbox
    back = cam_to_original(cam, 20, 40, fit)
    assert back.shape == (20, 40)
    assert back[:, :18].min() > 0.99 and back[:, 22:].max() < 0.01


def test_heat_is_rendered_as_gray_and_over_the_image() -> None:
    heat = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    gray = heat_to_uint8(heat)
    assert gray.dtype == np.uint8 and gray[0, 0] == 0 and gray[-1, -1] == 255
    for channels in (1, 3, 4):
        overlay = heat_overlay(np.full((3, 4, channels), 0.5, dtype=np.float32), heat)
        assert overlay.shape == (3, 4, 3) and overlay.dtype == np.uint8
        assert overlay[0, 0, 2] > overlay[0, 0, 0] and overlay[-1, -1, 0] > overlay[-1, -1, 2]
