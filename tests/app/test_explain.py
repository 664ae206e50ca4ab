"""POST /classify?explain=gradcam: explanation maps, their target, their own bounded worker, and /models."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

from app.explain import ModelExplainer
from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.classifier import Classifier
from models.preprocessing import Preprocessing
from models.registry import register_architecture
from tests.app.helpers import (
    PNG,
    SAFETY_S,
    assert_problem,
    encode_image,
    random_image,
    save_mean_classifier,
    serve,
    settings,
    wait_until,
)
from training.classification.lesions import render_lesion_with_mask

pytestmark = pytest.mark.anyio

CLASSES = ["clear", "lesion"]
PHANTOM_SIZE = 128
PAD = (20, 28)  # columns added left and right: the images are 128 x 176, not the model's square
DILATION_PX = 10


class LesionEvidenceNet(nn.Module):
    """A tiny deterministic classifier whose ``lesion`` logit is driven by the lesion.

    The image minus its mean, smoothed by a 5x5 mean filter, above ``threshold`` (normalised units; the phantom
    lesions stand out from their background by 0.7 to 1.4) is the evidence map (``features``, whose last
    convolution Grad-CAM explains); its mean, times ``scale``, raises the ``lesion`` logit and lowers ``clear``.
    """

    def __init__(self, threshold: float = 0.5, scale: float = 50.0) -> None:
        super().__init__()
        smooth = nn.Conv2d(1, 1, 5, padding=2)
        identity = nn.Conv2d(1, 1, 1, bias=False)
        smooth.weight = nn.Parameter(torch.full_like(smooth.weight, 1 / 25))
        smooth.bias = nn.Parameter(torch.tensor([-threshold]))
        identity.weight = nn.Parameter(torch.ones_like(identity.weight))
        self.features = nn.Sequential(smooth, nn.ReLU(), identity)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = self.features(x - x.mean(dim=(2, 3), keepdim=True)).mean(dim=(1, 2, 3))
        return torch.stack([0.5 - self.scale * evidence, self.scale * evidence - 0.5], dim=1)


register_architecture("test-lesion-evidence", lambda **kw: LesionEvidenceNet(**kw))


def save_lesion_model(path: Path) -> None:
    meta = CheckpointMetadata(
        task="classification",
        architecture=Architecture(name="test-lesion-evidence", args={}),
        classes=CLASSES,
        preprocessing=Preprocessing(
            in_channels=1, img_size=(64, 64), resize="resize", mean=[0.5], std=[0.25]
        ),
    )
    save_checkpoint(path, LesionEvidenceNet(), meta)


def save_resnet(path: Path, size: int = 64) -> Classifier:
    """A random-weight ResNet-18 (gray) whose ``malignant`` weights are made positive: its class score then
    grows with every feature of the last stage, so Grad-CAM there has heat to show."""
    torch.manual_seed(0)
    net = Classifier("resnet18", num_classes=2, in_channels=1, head="gap", pretrained="none").eval()
    with torch.no_grad():
        linear = net.head[-1]
        assert isinstance(linear, nn.Linear)
        linear.weight[1].abs_()
    meta = CheckpointMetadata(
        task="classification",
        architecture=Architecture(name="classifier", args=net.architecture_args()),
        classes=["benign", "malignant"],
        preprocessing=Preprocessing(in_channels=1, img_size=(size, size), resize="resize"),
    )
    save_checkpoint(path, net, meta)
    return net


def phantom(index: int) -> tuple[np.ndarray, np.ndarray]:
    """A lesion phantom (benign for even, malignant for odd ``index``) widened to 128 x 176 with its own
    background level, and its lesion mask."""
    image, mask = render_lesion_with_mask(
        np.random.default_rng([19, index % 2, index]), PHANTOM_SIZE, index % 2 == 1
    )
    level = int(np.median(image[0]))
    return np.pad(image, ((0, 0), PAD), constant_values=level), np.pad(mask, ((0, 0), PAD))


def decode_base64_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    image.load()
    assert image.format == "PNG"
    return image


def heat_fraction(heat: np.ndarray, region: np.ndarray) -> float:
    total = float(heat.sum())
    assert total > 0, "no heat at all"
    return float(heat[region].sum()) / total


@pytest.fixture
def lesion_dir(tmp_path: Path) -> Path:
    save_lesion_model(tmp_path / "lesion.pt")
    return tmp_path


async def test_gradcam_heat_lies_on_the_lesion_and_not_beside_it(lesion_dir: Path) -> None:
    """On 16 lesion phantoms (8 benign, 8 malignant), more than half of each map's heat lies inside the lesion's
    mask dilated by 10 px, and less than half inside the same mask moved 88 px aside (the test can fail)."""
    phantoms = [phantom(i) for i in range(16)]
    files = [
        ("file", (f"p{i}.png", encode_image(image), "image/png")) for i, (image, _) in enumerate(phantoms)
    ]
    async with serve(settings(lesion_dir)) as (_, client):
        response = await client.post("/classify?explain=gradcam&target=lesion", files=files)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == [f"p{i}.png" for i in range(16)]
    for prediction, (image, mask) in zip(predictions, phantoms, strict=True):
        explanation = prediction["explanation"]
        assert set(explanation) == {"method", "target", "heatmap_png", "overlay_png"}
        assert explanation["method"] == "gradcam" and explanation["target"] == "lesion"
        heatmap = decode_base64_png(explanation["heatmap_png"])
        assert heatmap.mode == "L" and heatmap.size == (image.shape[1], image.shape[0])
        heat = np.asarray(heatmap).astype(np.float64)
        assert heat.max() >= 240  # the map is scaled to its maximum (then resampled to the image)
        region = ndimage.binary_dilation(mask, iterations=DILATION_PX)
        assert heat_fraction(heat, region) > 0.5, prediction["filename"]
        aside = np.roll(region, 88, axis=1)
        assert not (aside & region).any()
        assert heat_fraction(heat, aside) < 0.5, prediction["filename"]
        overlay = decode_base64_png(explanation["overlay_png"])
        assert overlay.mode == "RGB" and overlay.size == heatmap.size
        # Jet colours over the gray image: blue where there is no heat, red where it is strongest.
        rgb = np.asarray(overlay).astype(np.int64)
        cold, hot = heat == 0, heat >= 230
        assert (rgb[cold][:, 2] > rgb[cold][:, 0]).all() and (rgb[hot][:, 0] > rgb[hot][:, 2]).all()


async def test_the_default_target_is_the_label_and_target_explains_another_class(lesion_dir: Path) -> None:
    image, _ = phantom(3)
    async with serve(settings(lesion_dir)) as (_, client):
        default = await client.post("/classify?explain=gradcam", content=encode_image(image), headers=PNG)
        other = await client.post(
            "/classify?explain=gradcam&target=clear", content=encode_image(image), headers=PNG
        )
        plain = await client.post("/classify", content=encode_image(image), headers=PNG)
    assert default.status_code == other.status_code == plain.status_code == 200
    (explained,) = default.json()["predictions"]
    assert explained["label"] == "lesion" and explained["explanation"]["target"] == "lesion"
    (unexplained,) = plain.json()["predictions"]
    assert "explanation" not in unexplained
    assert unexplained["probabilities"] == explained["probabilities"]
    (clear,) = other.json()["predictions"]
    assert clear["label"] == "lesion" and clear["explanation"]["target"] == "clear"
    # Nothing in the layer raises the score of "clear": its map is empty; the label's map is not.
    assert np.asarray(decode_base64_png(clear["explanation"]["heatmap_png"])).max() == 0
    assert np.asarray(decode_base64_png(explained["explanation"]["heatmap_png"])).max() >= 240


async def test_bad_explanation_parameters_are_problems(lesion_dir: Path) -> None:
    save_mean_classifier(lesion_dir / "mean.pt")  # no convolution: nothing for Grad-CAM to explain
    body = encode_image(random_image(16, 16, seed=1))
    async with serve(settings(lesion_dir)) as (_, client):
        unknown_target = await client.post(
            "/classify?model=lesion&explain=gradcam&target=tumour", content=body, headers=PNG
        )
        target_alone = await client.post("/classify?model=lesion&target=lesion", content=body, headers=PNG)
        unknown_method = await client.post("/classify?model=lesion&explain=lime", content=body, headers=PNG)
        unexplainable = await client.post("/classify?model=mean&explain=gradcam", content=body, headers=PNG)
        mean_plain = await client.post("/classify?model=mean", content=body, headers=PNG)
    problem = assert_problem(unknown_target, 422, "invalid-request")
    assert problem["errors"][0]["loc"] == ["query", "target"] and "tumour" in problem["detail"]
    assert "'clear', 'lesion'" in problem["detail"]
    problem = assert_problem(target_alone, 422, "invalid-request")
    assert problem["errors"][0]["loc"] == ["query", "target"]
    problem = assert_problem(unknown_method, 422, "invalid-request")
    assert problem["errors"][0]["loc"] == ["query", "explain"]
    problem = assert_problem(unexplainable, 422, "invalid-request")
    assert problem["errors"][0]["loc"] == ["query", "explain"] and "'mean'" in problem["detail"]
    assert mean_plain.status_code == 200


async def test_models_names_the_layer_each_classifier_is_explained_at(tmp_path: Path) -> None:
    save_lesion_model(tmp_path / "lesion.pt")
    save_resnet(tmp_path / "resnet.pt")
    save_mean_classifier(tmp_path / "mean.pt")
    async with serve(settings(tmp_path, warmup=False)) as (_, client):
        models = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
        schema = (await client.get("/openapi.json")).json()
    assert models["lesion"]["explain"] == {
        "methods": ["gradcam"],
        "target_layer": "features.2",
        "layer": "the last convolution (features.2)",
        "stats": None,  # no explainer until something is explained
    }
    # A 64x64 ResNet-18: layer4 would be 2x2 cells; layer2 is the deepest stage with 8x8.
    assert models["resnet"]["explain"] == {
        "methods": ["gradcam"],
        "target_layer": "features.2",
        "layer": "resnet18 layer2 (stage 3 of 5, stride 8)",
        "stats": None,
    }
    assert models["mean"]["explain"] is None
    parameters = schema["paths"]["/classify"]["post"]["parameters"]
    explain = next(p for p in parameters if p["name"] == "explain")
    assert explain["schema"]["anyOf"][0] == {"const": "gradcam", "type": "string"}
    assert any(p["name"] == "target" for p in parameters)


async def test_a_resnet_is_explained_as_pytorch_grad_cam_explains_it_at_the_image_size(
    tmp_path: Path,
) -> None:
    """At 224x224 the layer is layer4 (``features.4``); the served map equals pytorch-grad-cam's own GradCAM on
    the checkpoint's network (the usual way: all gradients on), and other sizes get a map of their size."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net = save_resnet(tmp_path / "resnet.pt", size=224)
    square, wide = random_image(224, 224, seed=3), random_image(50, 90, seed=4)
    async with serve(settings(tmp_path)) as (_, client):
        models = (await client.get("/models")).json()["models"]
        answers = [
            await client.post(
                "/classify?explain=gradcam&target=malignant", content=encode_image(image), headers=PNG
            )
            for image in (square, wide)
        ]
    assert models[0]["explain"]["target_layer"] == "features.4"
    assert models[0]["explain"]["layer"] == "resnet18 layer4 (stage 5 of 5, stride 32)"
    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    maps = [
        np.asarray(decode_base64_png(a.json()["predictions"][0]["explanation"]["heatmap_png"]))
        for a in answers
    ]
    assert maps[0].shape == (224, 224) and maps[1].shape == (50, 90)
    x = (torch.from_numpy(square).float() / 255 - 0.5) / 0.25
    with GradCAM(model=net, target_layers=[net.features[4]]) as cam:
        expected = cam(input_tensor=x[None, None], targets=[ClassifierOutputTarget(1)])[0]
    assert expected.max() > 0.99
    assert np.abs(maps[0].astype(np.float64) - 255 * expected).max() <= 1.0


@pytest.fixture
def gated_explanations(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Holds every explanation until the returned gate opens; ``entered`` is set when one is being made."""
    gate, entered = threading.Event(), threading.Event()
    render = ModelExplainer.render

    def gated(self: ModelExplainer, item: Any, target: int) -> dict[str, Any]:
        entered.set()
        gate.wait(SAFETY_S)
        return render(self, item, target)

    monkeypatch.setattr(ModelExplainer, "render", gated)
    try:
        yield gate, entered
    finally:
        gate.set()


async def test_explanations_have_their_own_bounded_worker_and_never_hold_plain_requests(
    lesion_dir: Path, gated_explanations: tuple[threading.Event, threading.Event]
) -> None:
    """While the explainer is held busy, plain /classify requests are all answered; the explainer's queue
    (MEDSERVE_EXPLAIN_MAX_QUEUE=2) fills and the next explanation request is refused at once with a 503 and
    Retry-After; once the explainer goes on, the held requests get their explanations."""
    gate, entered = gated_explanations
    gate.clear()
    image, _ = phantom(1)
    body = encode_image(image)
    async with serve(settings(lesion_dir, explain_max_queue=2)) as (app, client):

        async def classify(query: str = "") -> Any:
            return await client.post(f"/classify{query}", content=body, headers=PNG)

        running = asyncio.create_task(classify("?explain=gradcam"))
        await wait_until(entered.is_set, "an explanation started")
        explainer = app.state.explanations.explainers["lesion"]
        waiting = [asyncio.create_task(classify("?explain=gradcam")) for _ in range(2)]
        await wait_until(lambda: explainer.batcher.queue_depth == 2, "two explanations queued")
        refused = await classify("?explain=gradcam")
        plain = await asyncio.gather(*(classify() for _ in range(12)))
        held = [task.done() for task in (running, *waiting)]
        gate.set()
        explained = await asyncio.gather(running, *waiting)
        models = (await client.get("/models")).json()["models"]
    problem = assert_problem(refused, 503, "queue-full")
    assert int(refused.headers["retry-after"]) >= 1 and "explanation" in problem["detail"]
    assert [r.status_code for r in plain] == [200] * 12
    assert all("explanation" not in r.json()["predictions"][0] for r in plain)
    assert held == [False, False, False]  # the plain requests were answered while all three were held
    assert [r.status_code for r in explained] == [200] * 3
    for answer in explained:
        (prediction,) = answer.json()["predictions"]
        assert prediction["explanation"]["target"] == prediction["label"]
    # The model's batcher never ran an explanation: 12 + 3 images, in batches of plain inference.
    assert models[0]["stats"]["requests"] == 15
    stats = models[0]["explain"]["stats"]
    assert (stats["images_explained"], stats["requests"], stats["rejected_queue_full"]) == (3, 3, 1)
    assert stats["max_queue"] == 2 and stats["max_batch_size"] == 1


async def test_an_explanation_request_with_more_images_than_the_queue_limit_is_served(
    lesion_dir: Path,
) -> None:
    """The explainer's limit counts requests, not images: 3 images pass a limit of 1."""
    files = [("file", (f"p{i}.png", encode_image(phantom(i)[0]), "image/png")) for i in range(3)]
    async with serve(settings(lesion_dir, explain_max_queue=1)) as (_, client):
        response = await client.post("/classify?explain=gradcam", files=files)
    assert response.status_code == 200, response.text
    assert len([p["explanation"] for p in response.json()["predictions"]]) == 3
