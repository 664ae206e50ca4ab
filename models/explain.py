"""Grad-CAM explanations of classifiers, computed with pytorch-grad-cam (the ``grad-cam`` package).

Grad-CAM (Selvaraju et al., 2017) weighs the feature maps of one convolutional layer by the gradient of the
target class's score with respect to them (averaged over the map), sums them and keeps the positive part: where
the features that raise the class's score are. The map has the layer's resolution and is scaled up to the input.

The layer (``gradcam_layer``):
    * a ``models.classifier.Classifier``: one of its five backbone stages (``features.0`` ... ``features.4``),
      chosen from the backbone's stage strides (``STAGE_STRIDES``) and the model's input size: the deepest stage
      whose map has at least ``MIN_CAM_SIDE`` cells on its shorter side. At 224x224 that is the last stage
      (ResNet ``layer4``, DenseNet ``denseblock4``, VGG's last block, the last MobileNet/EfficientNet block,
      the layer pytorch-grad-cam recommends), a 7x7 map; a 64x64 model (the demo lesion classifier) would get a
      2x2 map there, so an earlier stage with 8x8 cells is used instead.
    * any other network: its last ``nn.Conv2d``; a network without one cannot be explained (None).

``GradCam`` runs on its own copy of the network (deep-copied, gradients only from the target layer up), so the
module serving plain predictions is never touched by hooks or gradients; one thread uses one ``GradCam``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.classifier import BACKBONES, NUM_STAGES, Classifier
from models.preprocessing import Preprocessing, to_original_size

GRADCAM = "gradcam"
EXPLAIN_METHODS = (GRADCAM,)

# Fewest cells on the shorter side of a Grad-CAM map: the last stage's map of a 224x224 input (stride 32).
MIN_CAM_SIDE = 7

# Output stride of each of the five stages of ``Classifier`` by backbone family (``models.classifier.BACKBONES``).
STAGE_STRIDES: dict[str, tuple[int, ...]] = {
    "resnet": (4, 4, 8, 16, 32),  # stem (conv1 + max-pool), layer1 ... layer4
    "vgg": (2, 4, 8, 16, 32),  # conv blocks, each ending in a max-pool
    "densenet": (4, 8, 16, 32, 32),  # stem, denseblock1-3 with their transitions, denseblock4 + norm5
    "sequential": (2, 4, 8, 16, 32),  # MobileNetV3 / EfficientNet feature blocks cut where resolution halves
}
# What each stage is called in torchvision's model of the family.
STAGE_NAMES: dict[str, tuple[str, ...]] = {
    "resnet": ("stem", "layer1", "layer2", "layer3", "layer4"),
    "vgg": ("block1", "block2", "block3", "block4", "block5"),
    "densenet": ("stem", "denseblock1", "denseblock2", "denseblock3", "denseblock4"),
    "sequential": ("stage1", "stage2", "stage3", "stage4", "stage5"),
}


@dataclass(frozen=True)
class TargetLayer:
    """The layer Grad-CAM explains a network at.

    Attributes:
        name: the module's path in the network (``dict(model.named_modules())[name]``), e.g. ``features.4``.
        description: in words, e.g. ``resnet18 layer4 (stage 5 of 5, stride 32)``.
    """

    name: str
    description: str

    def describe(self) -> dict[str, Any]:
        """What ``GET /models`` shows under ``explain``."""
        return {
            "methods": list(EXPLAIN_METHODS),
            "target_layer": self.name,
            "layer": self.description,
        }


def classifier_stage(backbone: str, input_size: Sequence[int]) -> int:
    """The index of the stage Grad-CAM explains a ``Classifier`` of ``backbone`` at, for ``input_size``
    (height, width): the deepest with at least ``MIN_CAM_SIDE`` cells (``side // stride``, a lower bound of the
    map's size whatever the layers' rounding) on the shorter side, else the first."""
    strides = STAGE_STRIDES[BACKBONES[backbone]]
    shorter = min(int(input_size[0]), int(input_size[1]))
    fitting = [index for index, stride in enumerate(strides) if shorter // stride >= MIN_CAM_SIDE]
    return fitting[-1] if fitting else 0


def unwrap(model: nn.Module) -> nn.Module:
    """The network ``torch.compile`` wrapped (the only child of its ``OptimizedModule``), or ``model`` itself."""
    if type(model).__name__ == "OptimizedModule":
        children = list(model.children())
        if len(children) == 1:
            return children[0]
    return model


def gradcam_layer(model: nn.Module, input_size: Sequence[int]) -> TargetLayer | None:
    """The layer ``model`` is explained at for inputs of ``input_size`` (height, width); None: no convolution.

    See the module docstring for the choice.
    """
    model = unwrap(model)
    if isinstance(model, Classifier):
        family = BACKBONES[model.backbone_name]
        index = classifier_stage(model.backbone_name, input_size)
        description = (
            f"{model.backbone_name} {STAGE_NAMES[family][index]} (stage {index + 1} of {NUM_STAGES}, "
            f"stride {STAGE_STRIDES[family][index]})"
        )
        return TargetLayer(f"features.{index}", description)
    convolutions = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not convolutions:
        return None
    return TargetLayer(convolutions[-1], f"the last convolution ({convolutions[-1]})")


def cam_to_original(cam: np.ndarray, height: int, width: int, spec: Preprocessing) -> np.ndarray:
    """A (h, w) map over the model's input -> (height, width) over the original image, in [0, 1].

    The inverse of the classifier's preprocessing: a plain resize, except under ``fit``, where the map is first
    brought to the working canvas and its padding cut off (``to_original_size``).
    """
    tensor = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None]
    if spec.resize == "fit" and spec.working_size is not None:
        if tuple(tensor.shape[-2:]) != tuple(spec.working_size):
            tensor = F.interpolate(
                tensor[None], size=tuple(spec.working_size), mode="bilinear", align_corners=False
            )[0]
        tensor = to_original_size(tensor, height, width, spec)
    elif tuple(tensor.shape[-2:]) != (height, width):
        tensor = F.interpolate(tensor[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return np.clip(tensor[0].numpy(), 0.0, 1.0)


class GradCam:
    """Grad-CAM of one network, on a private copy of it.

    Args:
        model: the served network (eval mode, on its device); it is deep-copied, never modified.
        layer: where to explain it (``gradcam_layer``).

    The copy's parameters need no gradient: the graph starts at the target layer's output, so a backward pass
    costs only the layers above it. Not thread-safe: one thread uses one instance.
    """

    def __init__(self, model: nn.Module, layer: TargetLayer) -> None:
        # Imported here: pytorch-grad-cam pulls in OpenCV and matplotlib, needed only once something is explained.
        from pytorch_grad_cam import GradCAM

        self.layer = layer
        self.model = copy.deepcopy(unwrap(model)).float().eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        modules = dict(self.model.named_modules())
        if layer.name not in modules:
            raise ValueError(f"the network has no module {layer.name!r}")
        target = modules[layer.name]
        # Registered before Grad-CAM's own hooks, which therefore see the output that requires a gradient.
        target.register_forward_hook(_start_graph)
        self.device = next(self.model.parameters()).device
        self.cam = GradCAM(model=self.model, target_layers=[target])

    def explain(self, image: torch.Tensor, target: int) -> np.ndarray:
        """The Grad-CAM map (H', W') in [0, 1] of one normalised (C, H', W') model input for class ``target``
        (0 everywhere when nothing in the layer raises that class's score)."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        batch = image[None].to(self.device).float().contiguous(memory_format=torch.channels_last)
        with torch.enable_grad():
            cams = self.cam(input_tensor=batch, targets=[ClassifierOutputTarget(int(target))])
        return np.asarray(cams[0], dtype=np.float32)


def _start_graph(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the target layer's output as a leaf that requires a gradient (the graph starts here)."""
    return output.detach().requires_grad_(True)


def heat_overlay(pixels: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The image (H, W, C) in [0, 1] with the map (H, W) in [0, 1] drawn over it in the jet colour map, half and
    half (pytorch-grad-cam's ``show_cam_on_image``) -> (H, W, 3) uint8 RGB."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = pixels[:, :, :3] if pixels.shape[2] >= 3 else np.repeat(pixels[:, :, :1], 3, axis=2)
    rgb = np.clip(rgb.astype(np.float32), 0.0, 1.0)
    return np.asarray(show_cam_on_image(rgb, heat.astype(np.float32), use_rgb=True, image_weight=0.5))


def heat_to_uint8(heat: np.ndarray) -> np.ndarray:
    """A map in [0, 1] -> 8-bit gray (0..255)."""
    return np.clip(np.rint(heat * 255.0), 0, 255).astype(np.uint8)
