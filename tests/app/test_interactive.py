"""POST /segment/interactive: the graph cut from hints alone or refining a served model, in every /segment format."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch

from app.contract import ImageUpload
from app.outputs import output_formats
from app.runners import SegmentationRunner, load_runner
from models.interactive import BACKGROUND, FOREGROUND, GRAPH_CUT_VERSION
from tests.app.helpers import (
    assert_problem,
    decode_png,
    encode_image,
    save_pixel_model,
    serve,
    settings,
)
from tests.models.test_dicom import make_dataset, to_bytes

pytestmark = pytest.mark.anyio

SIZE = 48
DISC = (20, 26, 12)  # row, column, radius of the object
BLOB = (38, 8, 5)  # a second bright region: the threshold model's false positive


def disc(row: int, column: int, radius: int) -> np.ndarray:
    yy, xx = np.ogrid[:SIZE, :SIZE]
    return (yy - row) ** 2 + (xx - column) ** 2 <= radius**2


def scene(
    with_blob: bool = False, seed: int = 0, levels: tuple[int, int] = (60, 200)
) -> tuple[np.ndarray, np.ndarray]:
    """A gray uint8 image of a bright disc (and, ``with_blob``, a bright blob) on a dark background, both
    ``levels`` +- 15 (noise), and the disc."""
    rng = np.random.default_rng(seed)
    bright = disc(*DISC) | (disc(*BLOB) if with_blob else False)
    values = np.where(bright, levels[1], levels[0]) + rng.integers(-15, 16, size=(SIZE, SIZE))
    return values.astype(np.uint8), disc(*DISC)


def points(*clicks: tuple[int, int, str], radius: int = 2) -> str:
    return json.dumps(
        {"points": [{"x": x, "y": y, "label": label} for x, y, label in clicks], "radius": radius}
    )


OBJECT_AND_OUTSIDE = points((26, 20, "foreground"), (3, 3, "background"))


def form(image: bytes, hints: str | bytes | None, filename: str = "scan.png") -> dict[str, Any]:
    """The multipart fields: ``files`` for httpx (the image, and a scribble as a file part), ``data`` text."""
    files: dict[str, Any] = {"file": (filename, image, "application/octet-stream")}
    data: dict[str, str] = {}
    if isinstance(hints, bytes):
        files["hints"] = ("scribble.png", hints, "image/png")
    elif hints is not None:
        data["hints"] = hints
    return {"files": files, "data": data}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


async def test_the_graph_cut_alone_needs_no_model_and_finds_the_object(tmp_path: Path) -> None:
    image, truth = scene()
    async with serve(settings(tmp_path)) as (_, client):  # no checkpoint at all
        response = await client.post("/segment/interactive", **form(encode_image(image), OBJECT_AND_OUTSIDE))
        # The JSON may come as a file part too (curl -F hints=@hints.json).
        as_file = await client.post(
            "/segment/interactive", **form(encode_image(image), OBJECT_AND_OUTSIDE.encode())
        )
    assert response.status_code == as_file.status_code == 200, response.text
    assert response.content == as_file.content
    assert response.headers["x-model-name"] == "graph-cut"
    assert response.headers["x-model-version"] == GRAPH_CUT_VERSION
    mask = decode_png(response.content)
    assert mask.shape == image.shape and set(np.unique(mask)) == {0, 255}
    assert dice(mask == 255, truth) > 0.95


async def test_a_scribble_png_drives_the_same_cut(tmp_path: Path) -> None:
    image, truth = scene(seed=1)
    scribble = np.zeros(image.shape, dtype=np.uint8)
    scribble[18:23, 24:29] = FOREGROUND
    scribble[0:3, :] = BACKGROUND
    async with serve(settings(tmp_path)) as (_, client):
        response = await client.post(
            "/segment/interactive", **form(encode_image(image), encode_image(scribble))
        )
    assert response.status_code == 200, response.text
    mask = decode_png(response.content) == 255
    assert dice(mask, truth) > 0.95
    assert mask[scribble == FOREGROUND].all() and not mask[scribble == BACKGROUND].any()


async def test_a_background_click_removes_the_models_false_positive(pixel_dir: Path) -> None:
    image, truth = scene(with_blob=True)
    upload = encode_image(image)
    async with serve(settings(pixel_dir)) as (_, client):
        plain = await client.post("/segment", files={"file": ("scan.png", upload)})
        corrected = await client.post(
            "/segment/interactive?model=pixel", **form(upload, points((8, 38, "background")))
        )
    assert plain.status_code == corrected.status_code == 200, corrected.text
    assert corrected.headers["x-model-name"] == "pixel" == plain.headers["x-model-name"]
    assert corrected.headers["x-model-version"] == plain.headers["x-model-version"]
    before, after = decode_png(plain.content) == 255, decode_png(corrected.content) == 255
    assert before[disc(*BLOB)].all()  # the model took the blob
    assert not after[disc(*BLOB)].any()  # one click removed it all, beyond the click's disk
    assert dice(after, truth) > 0.95 > dice(before, truth)


async def test_the_refinement_corrects_the_chosen_class_of_a_multi_class_model(tmp_path: Path) -> None:
    # logits (-z, 1, z): "tissue" for mid intensities, "bone" for bright ones (above 191).
    save_pixel_model(
        tmp_path / "three.pt", classes=("background", "tissue", "bone"), weights=(-1, 0, 1), biases=(0, 1, 0)
    )
    image, _ = scene(with_blob=True, levels=(60, 230))
    upload = encode_image(image)
    async with serve(settings(tmp_path)) as (_, client):
        plain = await client.post("/segment", files={"file": ("scan.png", upload)})
        tissue = await client.post(
            "/segment/interactive?model=three&format=json", **form(upload, points((26, 20, "foreground")))
        )
        bone = await client.post(
            "/segment/interactive?model=three&class=bone", **form(upload, points((8, 38, "background")))
        )
        background = await client.post(
            "/segment/interactive?model=three&class=background", **form(upload, points((8, 38, "background")))
        )
        unknown = await client.post(
            "/segment/interactive?model=three&class=enamel", **form(upload, points((8, 38, "background")))
        )
    assert plain.status_code == tissue.status_code == bone.status_code == 200, bone.text
    before, after = decode_png(plain.content), decode_png(bone.content)
    assert (before[disc(*BLOB)] == 2).all()
    assert not (after[disc(*BLOB)] == 2).any()  # no longer bone ...
    # ... but the most probable other class, and the other regions keep the model's classes.
    assert set(np.unique(after[disc(*BLOB)])) <= {0, 1}
    assert (after[disc(*DISC)] == 2).mean() > 0.95
    summary = tissue.json()
    assert summary["model"] == "three" and [c["name"] for c in summary["classes"]] == [
        "background",
        "tissue",
        "bone",
    ]
    for response in (background, unknown):
        body = assert_problem(response, 422, "invalid-request")
        assert body["errors"][0]["loc"] == ["query", "class"]


@pytest.mark.parametrize("model", [None, "pixel"])
async def test_every_segment_format_is_answered(pixel_dir: Path, model: str | None) -> None:
    values = np.where(disc(*DISC), 3000, 400).astype(np.uint16)
    dicom = make_dataset(values, bits_stored=12)
    image, _ = scene()
    query = f"model={model}&" if model else ""
    # Every format but probability, which renders the model's scores (``needs_scores``), not a mask.
    formats = {name: f for name, f in output_formats(SegmentationRunner.task).items() if not f.needs_scores}
    assert set(formats) == {"png", "overlay", "json", "dicom-seg"}
    async with serve(settings(pixel_dir)) as (_, client):
        answers = {
            name: await client.post(
                f"/segment/interactive?{query}format={name}",
                **form(to_bytes(dicom) if name == "dicom-seg" else encode_image(image), OBJECT_AND_OUTSIDE),
            )
            for name in formats
        }
        from_png = await client.post(
            f"/segment/interactive?{query}format=dicom-seg", **form(encode_image(image), OBJECT_AND_OUTSIDE)
        )
    for name, response in answers.items():
        assert response.status_code == 200, (name, response.text)
        assert response.headers["content-type"] == formats[name].media_type
        assert response.headers["x-model-name"] == (model or "graph-cut")
    png = decode_png(answers["png"].content) == 255
    assert dice(png, disc(*DISC)) > 0.95
    assert decode_png(answers["overlay"].content).shape == (SIZE, SIZE, 3)
    summary = answers["json"].json()
    assert summary["model"] == (model or "graph-cut")
    assert [c["name"] for c in summary["classes"]] == [
        "background",
        "foreground" if model is None else "lesion",
    ]
    assert summary["classes"][1]["pixels"] == int(png.sum())
    seg = pydicom.dcmread(io.BytesIO(answers["dicom-seg"].content))
    assert seg.StudyInstanceUID == dicom.StudyInstanceUID
    assert_problem(from_png, 415, "unsupported-media-type")


@pytest.mark.parametrize(
    ("hints", "words"),
    [
        (points((48, 20, "foreground")), "outside the 48x48 image"),
        (points((5, -1, "foreground")), "outside"),
        (points((3, 3, "background")), "foreground hint"),
        ('{"points": [{"x": 1, "y": 1}]}', "points.0.label"),
        ("{not json", "not valid JSON"),
        (encode_image(np.zeros((SIZE, SIZE + 1), dtype=np.uint8)), "the scribble is 49x48"),
        (encode_image(np.full((SIZE, SIZE), 7, dtype=np.uint8)), "values [7]"),
        (None, "no hints"),
    ],
)
async def test_unusable_hints_are_422_invalid_hints(
    tmp_path: Path, hints: str | bytes | None, words: str
) -> None:
    image, _ = scene()
    async with serve(settings(tmp_path)) as (_, client):
        response = await client.post("/segment/interactive", **form(encode_image(image), hints))
        explained = await client.get("/problems/invalid-hints")
    body = assert_problem(response, 422, "invalid-hints")
    assert words in body["detail"]
    assert explained.status_code == 200 and explained.json()["status"] == 422


async def test_requests_without_hints_or_with_a_wrong_model_are_refused(pixel_dir: Path) -> None:
    image = encode_image(scene()[0])
    async with serve(settings(pixel_dir)) as (_, client):
        raw = await client.post("/segment/interactive", content=image, headers={"content-type": "image/png"})
        unknown = await client.post("/segment/interactive?model=nope", **form(image, OBJECT_AND_OUTSIDE))
        class_alone = await client.post(
            "/segment/interactive?class=lesion", **form(image, OBJECT_AND_OUTSIDE)
        )
        no_file = await client.post(
            "/segment/interactive", data={"hints": OBJECT_AND_OUTSIDE}, files={"x": b""}
        )
        # With a model a background hint alone is a correction: accepted.
        background_only = await client.post(
            "/segment/interactive?model=pixel", **form(image, points((3, 3, "background")))
        )
    assert_problem(raw, 422, "invalid-hints")
    assert_problem(unknown, 404, "model-not-found")
    assert assert_problem(class_alone, 422, "invalid-request")["errors"][0]["loc"] == ["query", "class"]
    assert_problem(no_file, 422, "missing-file")
    assert background_only.status_code == 200


async def test_the_endpoint_needs_a_key_when_keys_are_configured(tmp_path: Path) -> None:
    upload = form(encode_image(scene()[0]), OBJECT_AND_OUTSIDE)
    async with serve(settings(tmp_path, api_keys="interactive-test-key-0123")) as (_, client):
        refused = await client.post("/segment/interactive", **upload)
        accepted = await client.post(
            "/segment/interactive", headers={"X-API-Key": "interactive-test-key-0123"}, **upload
        )
    assert_problem(refused, 401, "unauthorized")
    assert accepted.status_code == 200


async def test_the_endpoint_is_documented_with_its_fields(tmp_path: Path) -> None:
    async with serve(settings(tmp_path)) as (_, client):
        schema = (await client.get("/openapi.json")).json()
    operation = schema["paths"]["/segment/interactive"]["post"]
    fields = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert fields["required"] == ["file", "hints"]
    assert {p["name"] for p in operation["parameters"]} == {"model", "version", "format", "class"}
    assert set(operation["responses"]["200"]["content"]) == {
        "image/png",
        "application/json",
        "application/dicom",
    }
    assert "invalid-hints" in operation["responses"]["422"]["description"]


@pytest.mark.parametrize("size", [(12, 10), (40, 37)])  # one window of the 16x16 tiles, and several
def test_runner_probabilities_sum_to_one_at_the_original_size(pixel_dir: Path, size: tuple[int, int]) -> None:
    runner = load_runner(
        "pixel", pixel_dir / "pixel.pt", device=torch.device("cpu"), precision="fp32", forward_batch_size=4
    )
    assert isinstance(runner, SegmentationRunner)
    image = scene()[0][: size[0], : size[1]]
    item = runner.decode(ImageUpload(encode_image(image)), max_pixels=None)
    (scores,) = runner.run_batch([item])
    probabilities = runner.probabilities(item, scores)
    assert probabilities.shape == (2, *size)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(axis=0), runner.mask(item, scores))
