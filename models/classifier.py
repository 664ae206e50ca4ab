"""Image classifiers built by transfer learning on torchvision backbones.

A ``Classifier`` is a torchvision backbone cut into five stages (``features``, strides growing towards 32) and
one of three heads:

* ``fc``: adaptive average pooling to ``fc_pool`` x ``fc_pool``, then a stack of fully connected layers
  (``fc_hidden``) with ReLU and dropout, then the class layer; trained with cross-entropy (softmax).
* ``gap``: global average pooling straight into the class layer (softmax); trained with cross-entropy.
* ``svm``: global average pooling into a linear layer trained with the multi-class hinge loss
  (``torch.nn.MultiMarginLoss``), i.e. a linear SVM on the backbone's features. Its outputs are margins, not
  log-probabilities; probabilities come from temperature scaling (below).

The forward pass always returns raw scores (B, K). Probabilities for the API are
``softmax(logits / temperature)``, with ``temperature`` fitted on validation data after training
(``fit_temperature``) and stored in the checkpoint's ``extra["temperature"]`` (1.0 when not fitted).

Fine-tuning strategies (``Classifier.set_strategy``): ``full`` trains everything, ``partial`` freezes the
first ``freeze_stages`` of the five backbone stages, ``frozen`` freezes the whole convolutional base so only the
head trains. Frozen stages also keep their batch-norm statistics fixed (they stay in eval mode during training).

Grayscale input: the first convolution is replaced by one taking ``in_channels`` channels whose weights are the
pretrained RGB weights summed over the RGB channels (for ``in_channels`` other than 1 and 3: the sum divided by
``in_channels`` in every input channel). A gray image therefore produces the same first-layer response as the
same image repeated into RGB, at a third of the cost.

Pretrained weights (``pretrained``): ``"imagenet"`` loads torchvision's ImageNet weights (torchvision downloads
them to ``<torch hub dir>/checkpoints/`` on first use), a path loads a local state dict in torchvision's format,
``"none"`` starts from random weights. Pretrained weights are only used when training starts: checkpoints store
``architecture_args()``, which never include them, so a model is rebuilt at load time without any download.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision
from scipy.optimize import minimize_scalar
from torch import nn

# backbone name -> family (decides how the torchvision model is cut into stages)
BACKBONES: dict[str, str] = {
    "resnet18": "resnet",
    "resnet34": "resnet",
    "resnet50": "resnet",
    "vgg16": "vgg",
    "vgg19": "vgg",
    "densenet121": "densenet",
    "mobilenet_v3_small": "sequential",
    "mobilenet_v3_large": "sequential",
    "efficientnet_b0": "sequential",
}
STRATEGIES = ("full", "partial", "frozen")
HEADS = ("fc", "gap", "svm")
NUM_STAGES = 5

# For backbones whose ``features`` is one nn.Sequential: exclusive end index of each stage. Each stage ends where
# the next block halves the resolution, so stage outputs have strides 2, 4, 8, 16, 32.
_SEQUENTIAL_STAGE_ENDS: dict[str, tuple[int, ...]] = {
    "mobilenet_v3_small": (1, 2, 4, 9, 13),
    "mobilenet_v3_large": (2, 4, 7, 13, 17),
    "efficientnet_b0": (2, 3, 4, 6, 9),
}

# ImageNet statistics; for gray input the channel means (the summed first convolution sees one channel).
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be obtained or do not fit the backbone; the message says what to do."""


def normalization_stats(in_channels: int) -> tuple[list[float], list[float]]:
    """ImageNet mean/std for ``in_channels`` (gray: the average over RGB)."""
    if in_channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [round(float(np.mean(IMAGENET_MEAN)), 4)], [round(float(np.mean(IMAGENET_STD)), 4)]


def _check_backbone(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def imagenet_weights_file(backbone: str) -> Path:
    """Where torchvision looks for (and downloads) the ImageNet weights of ``backbone``."""
    _check_backbone(backbone)
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _imagenet_model(backbone: str) -> nn.Module:
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    try:
        return torchvision.models.get_model(backbone, weights=weights)
    except (OSError, RuntimeError, ValueError) as exc:
        target = imagenet_weights_file(backbone)
        raise PretrainedWeightsError(
            f"could not load ImageNet weights for {backbone} ({type(exc).__name__}: {exc}). "
            f"torchvision downloads them from {weights.url}; on a machine without internet access, copy that "
            f"file to {target} (the torch hub cache; TORCH_HOME moves it), or pass --pretrained PATH with a "
            "local state dict, or --pretrained none to train from scratch"
        ) from exc


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for foreign or unsafe files
        raise PretrainedWeightsError(
            f"{path}: not a readable state dict ({type(exc).__name__}); expected a torchvision-format "
            "state dict saved with torch.save(model.state_dict(), path)"
        ) from exc
    # Training scripts often wrap the weights: {"state_dict": ...} or {"model": ...}.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path}: does not hold a state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


# torchvision's published DenseNet files use old key names ("norm.1"); torchvision renames them the same way.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _is_head_key(family: str, key: str) -> bool:
    return key.startswith("fc." if family == "resnet" else "classifier.")


def _local_model(backbone: str, path: Path) -> nn.Module:
    family = BACKBONES[backbone]
    model = torchvision.models.get_model(backbone, weights=None)
    state = _read_state_dict(path)
    if family == "densenet":
        state = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    # The original classification layer is discarded anyway, so any class count is accepted there.
    backbone_state = {k: v for k, v in state.items() if not _is_head_key(family, k)}
    try:
        result = model.load_state_dict(backbone_state, strict=False)
    except RuntimeError as exc:
        raise PretrainedWeightsError(f"{path}: weights do not fit {backbone}: {exc}") from exc
    missing = [k for k in result.missing_keys if not _is_head_key(family, k)]
    if missing or result.unexpected_keys:
        raise PretrainedWeightsError(
            f"{path}: not a {backbone} state dict (missing {len(missing)} keys, e.g. {missing[:3]}; "
            f"unexpected {len(result.unexpected_keys)}, e.g. {result.unexpected_keys[:3]})"
        )
    return model


def torchvision_backbone(backbone: str, pretrained: str | Path | None = "none") -> nn.Module:
    """The full torchvision model for ``backbone`` with the requested weights (RGB input, 1000 classes).

    Args:
        backbone: a name in ``BACKBONES``.
        pretrained: ``"imagenet"``, ``"none"``/``None``, or a path to a local torchvision-format state dict.

    Raises:
        ValueError: unknown backbone.
        PretrainedWeightsError: weights cannot be downloaded or read, or do not fit the backbone.
    """
    _check_backbone(backbone)
    if pretrained is None or str(pretrained) == "none":
        return torchvision.models.get_model(backbone, weights=None)
    if str(pretrained) == "imagenet":
        return _imagenet_model(backbone)
    return _local_model(backbone, Path(pretrained))


def _stages(backbone: str, model: nn.Module) -> tuple[list[nn.Module], int]:
    """Cuts a torchvision model into ``NUM_STAGES`` feature stages; returns them and the feature width."""
    family = BACKBONES[backbone]
    m: Any = model
    if family == "resnet":
        stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
        return [stem, m.layer1, m.layer2, m.layer3, m.layer4], int(m.fc.in_features)
    if family == "vgg":
        stages: list[nn.Module] = []
        block: list[nn.Module] = []
        for layer in m.features:
            block.append(layer)
            if isinstance(layer, nn.MaxPool2d):
                stages.append(nn.Sequential(*block))
                block = []
        width = [layer for layer in m.features if isinstance(layer, nn.Conv2d)][-1].out_channels
        return stages, int(width)
    if family == "densenet":
        f = m.features
        return [
            nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0),
            nn.Sequential(f.denseblock1, f.transition1),
            nn.Sequential(f.denseblock2, f.transition2),
            nn.Sequential(f.denseblock3, f.transition3),
            # torchvision applies a ReLU after norm5 in forward(); here it is part of the stage.
            nn.Sequential(f.denseblock4, f.norm5, nn.ReLU(inplace=True)),
        ], int(m.classifier.in_features)
    ends = _SEQUENTIAL_STAGE_ENDS[backbone]
    layers = list(m.features)
    starts = (0, *ends[:-1])
    stages = [nn.Sequential(*layers[a:b]) for a, b in zip(starts, ends, strict=True)]
    last = [layer for layer in m.features.modules() if isinstance(layer, nn.Conv2d)][-1]
    return stages, int(last.out_channels)


def adapt_first_conv(stage: nn.Module, in_channels: int) -> None:
    """Replaces the first Conv2d in ``stage`` by one with ``in_channels`` inputs (RGB weights summed)."""
    for parent in stage.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    kernel_size=child.kernel_size,  # type: ignore[arg-type]
                    stride=child.stride,  # type: ignore[arg-type]
                    padding=child.padding,  # type: ignore[arg-type]
                    dilation=child.dilation,  # type: ignore[arg-type]
                    groups=child.groups,
                    bias=child.bias is not None,
                )
                with torch.no_grad():
                    summed = child.weight.sum(dim=1, keepdim=True)
                    new.weight.copy_(
                        summed.expand(-1, in_channels, -1, -1) / (1 if in_channels == 1 else in_channels)
                    )
                    if child.bias is not None and new.bias is not None:
                        new.bias.copy_(child.bias)
                setattr(parent, child_name, new)
                return
    raise ValueError("no convolution found in the first stage")


def _make_head(
    head: str, width: int, num_classes: int, fc_hidden: Sequence[int], dropout: float, fc_pool: int
) -> nn.Sequential:
    if head == "fc":
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(fc_pool), nn.Flatten()]
        n_in = width * fc_pool * fc_pool
        for n_out in fc_hidden:
            layers += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            n_in = n_out
        layers.append(nn.Linear(n_in, num_classes))
        return nn.Sequential(*layers)
    # gap and svm: one linear layer on globally pooled features; they differ in the training loss.
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class Classifier(nn.Module):
    """A torchvision backbone (five stages) with an ``fc``, ``gap`` or ``svm`` head.

    Args:
        backbone: a name in ``BACKBONES``.
        num_classes: K, the number of classes (>= 2).
        in_channels: input channels; 1 adapts the first convolution (pretrained RGB weights summed).
        head: ``fc``, ``gap`` or ``svm`` (see the module docstring).
        fc_hidden: widths of the hidden fully connected layers of the ``fc`` head.
        dropout: dropout probability after each hidden layer of the ``fc`` head.
        fc_pool: the ``fc`` head flattens an ``fc_pool`` x ``fc_pool`` average-pooled feature map.
        pretrained: ``"imagenet"``, ``"none"`` or a local state dict path; used only at construction and never
            stored in ``architecture_args()``.

    Shapes:
        input (B, in_channels, H, W) normalised images; output (B, K) logits (margins for ``svm``).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 2,
        in_channels: int = 3,
        head: str = "fc",
        fc_hidden: Sequence[int] = (256,),
        dropout: float = 0.5,
        fc_pool: int = 1,
        pretrained: str | Path | None = "none",
    ) -> None:
        super().__init__()
        _check_backbone(backbone)
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if not 1 <= in_channels <= 4:
            raise ValueError(f"in_channels must be between 1 and 4, got {in_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if fc_pool < 1 or any(int(h) < 1 for h in fc_hidden):
            raise ValueError("fc_pool and every fc_hidden width must be positive")
        self.backbone_name = backbone
        self.head_name = head
        self._args: dict[str, Any] = {
            "backbone": backbone,
            "num_classes": int(num_classes),
            "in_channels": int(in_channels),
            "head": head,
            "fc_hidden": [int(h) for h in fc_hidden],
            "dropout": float(dropout),
            "fc_pool": int(fc_pool),
        }
        stages, width = _stages(backbone, torchvision_backbone(backbone, pretrained))
        adapt_first_conv(stages[0], in_channels)
        self.num_features = width
        self.features = nn.Sequential(*stages)
        self.head = _make_head(head, width, num_classes, fc_hidden, dropout, fc_pool)
        self.strategy = "full"
        self.frozen_stages = 0

    def architecture_args(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this network (without pretrained weights) for checkpoints."""
        return dict(self._args)

    def set_strategy(self, strategy: str, freeze_stages: int = 2) -> None:
        """Chooses which parameters train.

        Args:
            strategy: ``full`` (everything trains), ``partial`` (the first ``freeze_stages`` backbone stages are
                frozen) or ``frozen`` (the whole backbone is frozen; only the head trains).
            freeze_stages: for ``partial``, how many of the ``NUM_STAGES`` stages to freeze (1 to 4).
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if strategy == "partial" and not 1 <= freeze_stages < NUM_STAGES:
            raise ValueError(
                f"partial fine-tuning freezes 1 to {NUM_STAGES - 1} of the {NUM_STAGES} stages, "
                f"got freeze_stages={freeze_stages} (use --strategy frozen to freeze all)"
            )
        n_frozen = {"full": 0, "partial": freeze_stages, "frozen": NUM_STAGES}[strategy]
        for index, stage in enumerate(self.features):
            for param in stage.parameters():
                param.requires_grad_(index >= n_frozen)
        for param in self.head.parameters():
            param.requires_grad_(True)
        self.strategy = strategy
        self.frozen_stages = n_frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        # Frozen stages keep their batch-norm running statistics (and dropout) in inference behaviour.
        for stage in list(self.features)[: self.frozen_stages]:
            stage.eval()
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled backbone features (B, F) of a (B, C, H, W) batch."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature T minimising the negative log-likelihood of ``softmax(logits / T)``.

    Args:
        logits: (N, K) raw model outputs (margins for the svm head) on held-out data.
        labels: (N,) class indices.

    Returns:
        T in [exp(-4), exp(4)]; 1.0 when there is nothing to fit on.
    """
    if logits.numel() == 0:
        return 1.0
    z = logits.detach().double().cpu()
    y = labels.detach().long().cpu()

    def nll(log_t: float) -> float:
        return float(nn.functional.cross_entropy(z / np.exp(log_t), y))

    result = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded")
    return float(np.exp(result.x))


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, K) class probabilities: ``softmax(logits / temperature)`` (what the service returns)."""
    return torch.softmax(logits.float() / temperature, dim=-1)
