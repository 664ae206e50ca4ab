"""Reduced precision and torch.compile on CUDA stay within the documented tolerance of fp32.

Tolerance (docs/reliability.md), per image, for the served probabilities of a U-Net (segmentation, 96x80
input, tiled at 64x64) and a ResNet-18 classifier (random weights, batch norm in eval mode):

* fp16: max |p - p_fp32| <= 0.02, mean <= 1e-3; masks agree on >= 99.5% of pixels; same label.
* bf16: max |p - p_fp32| <= 0.05, mean <= 5e-3; masks agree on >= 99% of pixels; same label.
* ``MEDSERVE_COMPILE=true`` (fp32, through the service's model loading): max |p - p_eager| <= 1e-4.

These need a CUDA GPU: on the CPU the service always runs fp32 (autocast to fp16/bf16 is slower there), so the
tests skip with that reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.contract import ImageUpload, Runner
from app.runners import load_runner
from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.inference import Precision
from models.preprocessing import Preprocessing
from tests.app.helpers import encode_image, random_image, serve, settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU: fp16/bf16 autocast and its tolerance apply on CUDA only (the CPU serves fp32)",
    ),
]

TOLERANCE = {"fp16": (0.02, 1e-3, 0.995), "bf16": (0.05, 5e-3, 0.99)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from models.classifier import Classifier
    from models.unet import UNet

    folder = tmp_path_factory.mktemp("gpu-models")
    torch.manual_seed(0)
    unet_args: dict[str, Any] = {"in_channels": 1, "out_channels": 3, "channels": [16, 32, 64, 128]}
    save_checkpoint(
        folder / "unet.pt",
        UNet(**unet_args).eval(),
        CheckpointMetadata(
            task="segmentation",
            architecture=Architecture(name="unet", args=unet_args),
            classes=["background", "a", "b"],
            preprocessing=Preprocessing(in_channels=1, img_size=(64, 64)),
        ),
    )
    net = Classifier(backbone="resnet18", num_classes=4, in_channels=1, head="gap", pretrained="none")
    save_checkpoint(
        folder / "resnet.pt",
        net.eval(),
        CheckpointMetadata(
            task="classification",
            architecture=Architecture(name="classifier", args=net.architecture_args()),
            classes=["w", "x", "y", "z"],
            preprocessing=Preprocessing(in_channels=1, img_size=(96, 96), resize="resize"),
        ),
    )
    return {"unet": folder / "unet.pt", "resnet": folder / "resnet.pt"}


def probabilities_of(runner: Runner[Any]) -> list[np.ndarray]:
    uploads = [ImageUpload(encode_image(random_image(96, 80, seed=s)), "image/png") for s in range(6)]
    inputs = [runner.decode(u, max_pixels=None) for u in uploads]
    return [np.asarray(torch.as_tensor(p).float().cpu()) for p in runner.run_batch(inputs)]


def served_probabilities(path: Path, precision: Precision) -> list[np.ndarray]:
    runner = load_runner(
        path.stem, path, device=torch.device("cuda"), precision=precision, forward_batch_size=8
    )
    return probabilities_of(runner)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("model", ["unet", "resnet"])
def test_reduced_precision_is_within_the_documented_tolerance(
    checkpoints: dict[str, Path], model: str, precision: Precision
) -> None:
    reference = served_probabilities(checkpoints[model], "fp32")
    reduced = served_probabilities(checkpoints[model], precision)
    max_tol, mean_tol, agreement = TOLERANCE[precision]
    for ref, low in zip(reference, reduced, strict=True):
        assert ref.shape == low.shape
        diff = np.abs(ref - low)
        assert diff.max() <= max_tol and diff.mean() <= mean_tol, (diff.max(), diff.mean())
        if model == "unet":
            assert (ref.argmax(0) == low.argmax(0)).mean() >= agreement
        else:
            assert ref.argmax() == low.argmax()


@pytest.mark.anyio
async def test_the_compile_setting_serves_the_same_probabilities(checkpoints: dict[str, Path]) -> None:
    model_dir = checkpoints["unet"].parent
    config = settings(model_dir, device="cuda", compile=True, max_batch_size=8)
    async with serve(config) as (app, _):
        runner = app.state.registry.models["unet"].runner
        assert isinstance(runner.model, torch._dynamo.eval_frame.OptimizedModule)  # the setting took effect
        compiled = probabilities_of(runner)
    eager = served_probabilities(checkpoints["unet"], "fp32")
    for a, b in zip(eager, compiled, strict=True):
        assert np.abs(a - b).max() <= 1e-4
