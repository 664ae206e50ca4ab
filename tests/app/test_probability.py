"""POST /segment?format=probability: one class's probability as an 8-bit PNG at the image's original size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.outputs import output_formats, probability_png
from tests.app.helpers import (
    PNG,
    SEEN,
    assert_problem,
    decode_png,
    encode_image,
    random_image,
    save_pixel_model,
    serve,
    settings,
)

pytestmark = pytest.mark.anyio


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=0))
    return shifted / shifted.sum(axis=0)


def pixel_logits(image: np.ndarray, weights: list[float], biases: list[float]) -> np.ndarray:
    """PixelNet's logits (K, H, W) of a gray uint8 image (mean 0.5, std 0.25 preprocessing)."""
    x = (image.astype(np.float64) / 255 - 0.5) / 0.25
    return np.stack([w * x + b for w, b in zip(weights, biases, strict=True)])


async def test_the_probability_of_the_first_foreground_class_by_default_and_of_any_class_by_name(
    tmp_path: Path,
) -> None:
    """Three classes; an image larger than the 16x16 window (blended windows) and one smaller (a single one)."""
    weights, biases = [-1.0, 1.0, 0.3], [0.0, 0.2, 0.4]
    save_pixel_model(
        tmp_path / "three.pt", classes=("background", "bone", "cyst"), weights=weights, biases=biases
    )
    images = [random_image(37, 23, seed=5), random_image(9, 12, seed=6)]
    async with serve(settings(tmp_path)) as (_, client):
        answers = {
            (index, name): await client.post(
                "/segment?format=probability" + (f"&class={name}" if name else ""),
                content=encode_image(image),
                headers=PNG,
            )
            for index, image in enumerate(images)
            for name in (None, "background", "bone", "cyst")
        }
    for (index, name), response in answers.items():
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-model-name"] == "three"
        png = decode_png(response.content)
        image = images[index]
        assert png.shape == image.shape and png.dtype == np.uint8
        expected = softmax(pixel_logits(image, weights, biases))[
            ["background", "bone", "cyst"].index(name or "bone")
        ]
        assert np.abs(png.astype(np.int64) - probability_png(expected).astype(np.int64)).max() <= 1
    # The classes' maps add up to 255 (up to rounding): they are the probabilities of one softmax.
    total = sum(
        decode_png(answers[(0, name)].content).astype(np.int64) for name in ("background", "bone", "cyst")
    )
    assert np.abs(total - 255).max() <= 2


async def test_a_fitted_model_answers_at_the_original_size(tmp_path: Path) -> None:
    save_pixel_model(tmp_path / "fit.pt", working_size=(16, 16))
    image = np.zeros((30, 60), dtype=np.uint8)
    image[:, 30:] = 255  # right half bright: the lesion's probability is high there, low on the left
    async with serve(settings(tmp_path)) as (_, client):
        response = await client.post("/segment?format=probability", content=encode_image(image), headers=PNG)
    assert response.status_code == 200, response.text
    png = decode_png(response.content)
    assert png.shape == (30, 60)
    p_bright = 1 / (1 + np.exp(-2 * 2.0))  # PixelNet (-1, 1): logits -+2 at 255, softmax -> sigmoid(4)
    assert np.abs(png[:, 38:].astype(np.int64) - round(255 * p_bright)).max() <= 1
    assert np.abs(png[:, :22].astype(np.int64) - round(255 * (1 - p_bright))).max() <= 1


async def test_an_unknown_class_is_refused_before_the_model_runs(tmp_path: Path) -> None:
    save_pixel_model(tmp_path / "watched.pt", record="probability-class")
    SEEN.pop("probability-class", None)
    body = encode_image(random_image(8, 8, seed=1))
    async with serve(settings(tmp_path, warmup=False)) as (_, client):
        refused = await client.post("/segment?format=probability&class=tumour", content=body, headers=PNG)
        ran_before = len(SEEN.get("probability-class", []))
        accepted = await client.post("/segment?format=probability&class=lesion", content=body, headers=PNG)
        mask = await client.post(
            "/segment?class=lesion", content=body, headers=PNG
        )  # other formats ignore it
    problem = assert_problem(refused, 422, "invalid-request")
    assert problem["errors"] == [
        {
            "loc": ["query", "class"],
            "msg": "class must be one of the model's classes ['background', 'lesion'], not 'tumour'",
        }
    ]
    assert ran_before == 0
    assert accepted.status_code == 200 and mask.status_code == 200
    assert len(SEEN["probability-class"]) == 2


async def test_probability_is_documented_on_segment_and_not_offered_by_interactive_corrections(
    pixel_dir: Path,
) -> None:
    assert "probability" in output_formats("segmentation")
    body = encode_image(random_image(8, 8, seed=2))
    async with serve(settings(pixel_dir)) as (_, client):
        schema = (await client.get("/openapi.json")).json()
        interactive = await client.post(
            "/segment/interactive?format=probability",
            files={"file": ("a.png", body, "image/png")},
            data={"hints": '{"points": [{"x": 2, "y": 2, "label": "foreground"}]}'},
        )
    segment = schema["paths"]["/segment"]["post"]
    assert (
        next(p for p in segment["parameters"] if p["name"] == "format")["schema"]["enum"][-1] == "probability"
    )
    assert "`format=probability`" in segment["description"]
    assert any(p["name"] == "class" for p in segment["parameters"])
    corrections = schema["paths"]["/segment/interactive"]["post"]
    enum = next(p for p in corrections["parameters"] if p["name"] == "format")["schema"]["enum"]
    assert enum == ["png", "overlay", "json", "dicom-seg"]
    problem = assert_problem(interactive, 422, "invalid-request")
    assert problem["errors"][0]["loc"] == ["query", "format"]
