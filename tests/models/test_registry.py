"""Architecture names in checkpoints -> the code that builds them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from models.registry import build_architecture


def test_classifier_builds_without_importing_models_classifier_first() -> None:
    # The registry names the classifier itself (it used to be registered as a side effect of importing
    # models.classifier); torchvision is still imported only when a classifier is built.
    code = (
        "import sys\n"
        "from models.registry import build_architecture\n"
        "assert 'models.classifier' not in sys.modules and 'torchvision' not in sys.modules\n"
        "net = build_architecture('classifier', {'backbone': 'resnet18', 'num_classes': 2, 'in_channels': 1,"
        " 'head': 'gap', 'pretrained': 'imagenet'})\n"
        "print(type(net).__module__, type(net).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["models.classifier", "Classifier"]


def test_unknown_architecture_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match=r"unknown architecture 'nope'; known: \[.*'classifier'.*'unet'.*\]"):
        build_architecture("nope", {})
