"""Architecture names stored in checkpoints, mapped to the code that builds them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from models.unet import UNet


def _build_unet(**kwargs: Any) -> nn.Module:
    return UNet(**kwargs)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"unet": _build_unet}


def register_architecture(name: str, builder: Callable[..., nn.Module]) -> None:
    """Makes ``name`` loadable from checkpoints; ``builder(**args)`` returns the network."""
    _BUILDERS[name] = builder


def build_architecture(name: str, args: dict[str, Any]) -> nn.Module:
    if name not in _BUILDERS and name == "classifier":
        # Imported lazily: the torchvision backbones are only needed for classification checkpoints.
        import models.classifier  # noqa: F401
    if name not in _BUILDERS:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(_BUILDERS)}")
    return _BUILDERS[name](**args)
