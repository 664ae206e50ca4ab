"""Architecture names stored in checkpoints, mapped to the code that builds them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from models.unet import UNet


def _build_unet(**kwargs: Any) -> nn.Module:
    return UNet(**kwargs)


def _build_classifier(**kwargs: Any) -> nn.Module:
    # Imported here: the torchvision backbones are only needed for classification checkpoints.
    from models.classifier import Classifier

    kwargs.pop("pretrained", None)  # checkpoints never need pretrained weights to be rebuilt
    return Classifier(**kwargs)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"unet": _build_unet, "classifier": _build_classifier}


def register_architecture(name: str, builder: Callable[..., nn.Module]) -> None:
    """Makes ``name`` loadable from checkpoints; ``builder(**args)`` returns the network."""
    _BUILDERS[name] = builder


def build_architecture(name: str, args: dict[str, Any]) -> nn.Module:
    if name not in _BUILDERS:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(_BUILDERS)}")
    return _BUILDERS[name](**args)
