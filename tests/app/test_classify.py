"""POST /classify end to end: one and several images, top_k, batching, and per-file errors."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.preprocessing import Preprocessing
from tests.app.helpers import (
    PNG,
    assert_problem,
    encode_image,
    random_image,
    save_mean_classifier,
    save_pixel_model,
    serve,
    settings,
)

pytestmark = pytest.mark.anyio


def expected_bright(image: np.ndarray, scale: float = 4.0, temperature: float = 2.0) -> float:
    """P(bright) of MeanClassifier on a gray uint8 image resized to 16x16 (a uniform image stays uniform)."""
    m = (image.mean() / 255 - 0.5) / 0.25
    return 1 / (1 + math.exp(-2 * scale * m / temperature))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    save_mean_classifier(tmp_path / "mean.pt")
    return tmp_path


async def test_one_image_as_raw_body(model_dir: Path) -> None:
    image = np.full((20, 30), 200, dtype=np.uint8)
    async with serve(settings(model_dir)) as (_, client):
        response = await client.post("/classify", content=encode_image(image), headers=PNG)
        version = (await client.get("/models")).json()["models"][0]["version"]
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "mean" and body["version"] == version
    assert response.headers["x-model-name"] == "mean"
    (prediction,) = body["predictions"]
    assert prediction["filename"] is None
    assert prediction["label"] == "bright"
    probs = prediction["probabilities"]
    assert list(probs) == ["bright", "dark"]  # best first
    assert sum(probs.values()) == pytest.approx(1.0)
    # The checkpoint's temperature (2.0) is applied: softmax(logits / T).
    assert probs["bright"] == pytest.approx(expected_bright(image), rel=1e-5)


async def test_several_images_keep_their_order_and_names(model_dir: Path) -> None:
    values = [30, 220, 90, 180]
    files = [
        ("file", (f"img{v}.png", encode_image(np.full((9, 11), v, dtype=np.uint8)), "image/png"))
        for v in values
    ]
    async with serve(settings(model_dir)) as (_, client):
        response = await client.post("/classify", files=files)
        top1 = await client.post("/classify?top_k=1", files=files[:1])
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == [f"img{v}.png" for v in values]
    assert [p["label"] for p in predictions] == ["dark", "bright", "dark", "bright"]
    for value, prediction in zip(values, predictions, strict=True):
        expected = expected_bright(np.full((9, 11), value, dtype=np.uint8))
        assert prediction["probabilities"]["bright"] == pytest.approx(expected, rel=1e-5)
    assert top1.json()["predictions"][0]["probabilities"].keys() == {"dark"}


async def test_a_bad_file_among_several_fails_the_request_naming_it_and_nothing_else(model_dir: Path) -> None:
    good = encode_image(np.full((8, 8), 220, dtype=np.uint8))
    files = [
        ("file", ("first.png", good, "image/png")),
        ("file", ("broken.png", good[:40], "image/png")),
        ("file", ("third.png", good, "image/png")),
    ]
    async with serve(settings(model_dir, max_batch_delay_ms=100)) as (app, client):
        bad, other = await asyncio.gather(
            client.post("/classify", files=files), client.post("/classify", content=good, headers=PNG)
        )
        batcher = app.state.registry.models["mean"].batcher
        assert batcher.queue_depth == 0 and batcher.announced == 0  # the bad request's places were given back
    body = assert_problem(bad, 400, "invalid-image")
    assert "file 2" in body["detail"] and "broken.png" in body["detail"]
    assert other.status_code == 200 and other.json()["predictions"][0]["label"] == "bright"


async def test_concurrent_requests_are_batched_and_equal_to_alone(model_dir: Path) -> None:
    images = [random_image(12, 12, seed=i) for i in range(24)]
    async with serve(settings(model_dir, max_batch_delay_ms=500)) as (app, client):
        alone = [
            (await client.post("/classify", content=encode_image(a), headers=PNG)).json() for a in images
        ]
        before = app.state.registry.models["mean"].batcher.stats.batches
        together = await asyncio.gather(
            *(client.post("/classify", content=encode_image(a), headers=PNG) for a in images)
        )
        stats = app.state.registry.models["mean"].batcher.stats
    assert [r.json() for r in together] == alone
    assert stats.batches - before < len(images)
    assert max(stats.batch_sizes) > 1


async def test_classify_errors_are_problems(model_dir: Path) -> None:
    save_pixel_model(model_dir / "pixel.pt")
    image = encode_image(np.full((8, 8), 200, dtype=np.uint8))
    async with serve(settings(model_dir, max_files=2)) as (_, client):
        assert_problem(
            await client.post("/classify?model=pixel", content=image, headers=PNG), 404, "model-not-found"
        )
        assert_problem(
            await client.post("/segment?model=mean", content=image, headers=PNG), 404, "model-not-found"
        )
        assert_problem(await client.post("/classify", files={"x": ("a.png", image)}), 422, "missing-file")
        too_many = [("file", (f"{i}.png", image, "image/png")) for i in range(3)]
        assert_problem(await client.post("/classify", files=too_many), 413, "payload-too-large")
        assert_problem(
            await client.post("/classify?top_k=0", content=image, headers=PNG), 422, "invalid-request"
        )
        ok = await client.post("/segment", content=image, headers=PNG)  # the only segmentation model
        assert ok.status_code == 200


async def test_a_transfer_learning_classifier_checkpoint_is_served(tmp_path: Path) -> None:
    from models.classifier import Classifier

    net = Classifier(backbone="resnet18", num_classes=3, in_channels=1, head="gap", pretrained="none")
    meta = CheckpointMetadata(
        task="classification",
        architecture=Architecture(name="classifier", args=net.architecture_args()),
        classes=["normal", "benign", "malignant"],
        preprocessing=Preprocessing(in_channels=1, img_size=(32, 32), resize="resize"),
    )
    save_checkpoint(tmp_path / "resnet.pt", net.eval(), meta)
    async with serve(settings(tmp_path, max_batch_size=2)) as (_, client):
        response = await client.post(
            "/classify", content=encode_image(random_image(40, 50, seed=1)), headers=PNG
        )
    assert response.status_code == 200, response.text
    probs = response.json()["predictions"][0]["probabilities"]
    assert set(probs) == {"normal", "benign", "malignant"}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
