"""The output-format registry: one ``register_output_format`` call makes a format an answer of its endpoint,
validated, decoded for and documented without touching the routes; the runner contract's decode flags."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch

from app.contract import ImageUpload, OutputFormat, Prediction, ResponseOptions, RunnerT
from app.outputs import (
    check_input,
    output_formats,
    register_output_format,
    spoken_list,
    unregister_output_format,
)
from app.runners import ClassificationRunner, SegmentationRunner, load_runner
from models.imageio import UnsupportedImageError
from tests.app.helpers import (
    PNG,
    assert_problem,
    encode_image,
    expected_binary_mask,
    random_image,
    save_mean_classifier,
    save_pixel_model,
    serve,
    settings,
)
from tests.app.pacs.helpers import instance
from tests.models.test_dicom import to_bytes

pytestmark = pytest.mark.anyio


def encode_mask_sum(
    runner: SegmentationRunner, predictions: Sequence[Prediction[Any]], options: ResponseOptions
) -> bytes:
    """Test-only format: the number of foreground pixels and the mean of the kept pixels, as text."""
    (prediction,) = predictions
    mask = runner.mask(prediction.input, prediction.output)
    assert prediction.input.pixels is not None  # needs_pixels=True made decode keep them
    return f"{int((mask > 0).sum())} {prediction.input.pixels.mean():.4f}".encode()


def encode_labels(
    runner: ClassificationRunner, predictions: Sequence[Prediction[Any]], options: ResponseOptions
) -> bytes:
    """Test-only classification format: one label per line, in upload order."""
    return "".join(runner.classes[int(np.argmax(p.output))] + "\n" for p in predictions).encode()


@contextlib.contextmanager
def registered(output_format: OutputFormat[RunnerT]) -> Iterator[OutputFormat[RunnerT]]:
    """Registers ``output_format`` for the test and removes it afterwards, whatever the test did."""
    register_output_format(output_format)
    try:
        yield output_format
    finally:
        unregister_output_format(output_format.task, output_format.name)


@contextlib.contextmanager
def unregistered(task: str, name: str) -> Iterator[None]:
    """Removes a built-in format for the test and registers it again afterwards, whatever the test did."""
    output_format = output_formats(task)[name]
    unregister_output_format(task, name)
    try:
        yield
    finally:
        register_output_format(output_format)


@pytest.fixture
def mask_sum() -> Iterator[OutputFormat[SegmentationRunner]]:
    with registered(
        OutputFormat(
            task="segmentation",
            name="mask-sum",
            media_type="text/plain",
            encoder=encode_mask_sum,
            description="the number of foreground pixels and the mean intensity, as text.",
            needs_pixels=True,
            openapi={"schema": {"type": "string"}},
        )
    ) as output_format:
        yield output_format


@pytest.fixture
def labels() -> Iterator[OutputFormat[ClassificationRunner]]:
    with registered(
        OutputFormat(
            task="classification",
            name="labels",
            media_type="text/plain",
            encoder=encode_labels,
            description="one label per line.",
            openapi={"schema": {"type": "string"}},
        )
    ) as output_format:
        yield output_format


async def test_a_registered_format_is_served_and_documented_by_the_real_route(
    tmp_path: Path, mask_sum: OutputFormat[SegmentationRunner]
) -> None:
    save_pixel_model(tmp_path / "pixel.pt")
    array = random_image(12, 20, seed=4)
    async with serve(settings(tmp_path)) as (_, client):
        response = await client.post("/segment?format=mask-sum", content=encode_image(array), headers=PNG)
        png = await client.post("/segment", content=encode_image(array), headers=PNG)
        schema = (await client.get("/openapi.json")).json()
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert response.headers["x-model-name"] == "pixel"
    foreground, mean = response.text.split()
    assert int(foreground) == int((expected_binary_mask(array) > 0).sum()) > 0
    assert float(mean) == pytest.approx(array.mean() / 255, abs=1e-4)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"  # the default is unchanged
    segment = schema["paths"]["/segment"]["post"]
    parameter = next(p for p in segment["parameters"] if p["name"] == "format")
    assert parameter["schema"]["enum"] == ["png", "overlay", "json", "dicom-seg", "probability", "mask-sum"]
    assert "mask-sum" in parameter["description"]
    assert "`format=mask-sum`: the number of foreground pixels" in segment["description"]
    assert segment["responses"]["200"]["content"]["text/plain"] == {"schema": {"type": "string"}}


async def test_an_unregistered_format_is_refused_again(tmp_path: Path) -> None:
    """After the fixture's clean-up the name is unknown: a 422 like any other, and undocumented."""
    save_pixel_model(tmp_path / "pixel.pt")
    assert "mask-sum" not in output_formats("segmentation")
    async with serve(settings(tmp_path)) as (_, client):
        response = await client.post(
            "/segment?format=mask-sum", content=encode_image(random_image(8, 8, 0)), headers=PNG
        )
        schema = (await client.get("/openapi.json")).json()
    body = assert_problem(response, 422, "invalid-request")
    assert body["errors"] == [
        {
            "loc": ["query", "format"],
            "msg": "Input should be 'png', 'overlay', 'json', 'dicom-seg' or 'probability'",
        }
    ]
    assert "text/plain" not in schema["paths"]["/segment"]["post"]["responses"]["200"]["content"]


async def test_a_second_classification_format_gives_classify_a_format_parameter(
    tmp_path: Path, labels: OutputFormat[ClassificationRunner]
) -> None:
    save_mean_classifier(tmp_path / "mean.pt")
    dark, bright = (encode_image(np.full((16, 16), v, dtype=np.uint8)) for v in (10, 240))
    files = [("file", ("a.png", dark, "image/png")), ("file", ("b.png", bright, "image/png"))]
    async with serve(settings(tmp_path)) as (_, client):
        text = await client.post("/classify?format=labels", files=files)
        default = await client.post("/classify", files=files)
        schema = (await client.get("/openapi.json")).json()
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert text.text == "dark\nbright\n"
    assert [p["label"] for p in default.json()["predictions"]] == ["dark", "bright"]
    parameters = schema["paths"]["/classify"]["post"]["parameters"]
    enum = next(p for p in parameters if p["name"] == "format")["schema"]["enum"]
    assert enum == ["json", "dicom-sr", "labels"]


async def test_classify_has_no_format_parameter_with_one_format(tmp_path: Path) -> None:
    save_mean_classifier(tmp_path / "mean.pt")
    with unregistered("classification", "dicom-sr"):  # json alone, as before dicom-sr was built in
        async with serve(settings(tmp_path)) as (_, client):
            schema = (await client.get("/openapi.json")).json()
    assert [p["name"] for p in schema["paths"]["/classify"]["post"]["parameters"]] == [
        "model",
        "version",
        "top_k",
        "explain",
        "target",
    ]
    assert list(output_formats("classification")) == ["json", "dicom-sr"]


def test_a_format_needs_a_served_task_and_a_new_name() -> None:
    png = output_formats("segmentation")["png"]
    with pytest.raises(ValueError, match="already"):
        register_output_format(png)
    with pytest.raises(ValueError, match="no runner serves task 'detection'"):
        register_output_format(replace(png, task="detection"))
    assert list(output_formats("segmentation")) == ["png", "overlay", "json", "dicom-seg", "probability"]


def test_spoken_list() -> None:
    assert [spoken_list(words) for words in ([], ["a"], ["a", "b"], ["a", "b", "c"])] == [
        "",
        "a",
        "a or b",
        "a, b or c",
    ]


def test_decode_keeps_what_the_format_needs_for_every_task(tmp_path: Path) -> None:
    """The decode flags are honoured by both runners (the registry's needs_pixels / needs_source drive them)."""
    save_pixel_model(tmp_path / "pixel.pt")
    save_mean_classifier(tmp_path / "mean.pt")
    upload = ImageUpload(encode_image(random_image(10, 12, seed=1)), "image/png", "scan.png")
    for name in ("pixel", "mean"):
        runner = load_runner(
            name, tmp_path / f"{name}.pt", device=torch.device("cpu"), precision="fp32", forward_batch_size=2
        )
        plain = runner.decode(upload, max_pixels=None)
        kept = runner.decode(upload, max_pixels=None, keep_pixels=True, keep_source=True)
        assert plain.pixels is None and plain.source is None
        assert kept.pixels is not None and kept.pixels.shape == (10, 12, 1)
        assert kept.source is None  # a PNG has no DICOM source to keep
        assert (kept.height, kept.width, kept.filename, kept.source_format) == (10, 12, "scan.png", "png")
        assert torch.equal(plain.image, kept.image)
    with pytest.raises(
        UnsupportedImageError, match="format=dicom-seg must reference a DICOM source"
    ) as refused:
        check_input(output_formats("segmentation")["dicom-seg"], kept)
    assert "a png image" in str(refused.value) and "format=png, overlay, json or probability" in str(
        refused.value
    )


def test_the_dicom_result_formats_write_the_uids_the_options_give(tmp_path: Path) -> None:
    """PACS jobs pass their deterministic UIDs in ResponseOptions; without them the writers make new ones."""
    save_pixel_model(tmp_path / "pixel.pt")
    save_mean_classifier(tmp_path / "mean.pt")
    source = instance(1)
    upload = ImageUpload(to_bytes(source), "application/dicom")
    for name, format_name in (("pixel", "dicom-seg"), ("mean", "dicom-sr")):
        runner = load_runner(
            name, tmp_path / f"{name}.pt", device=torch.device("cpu"), precision="fp32", forward_batch_size=2
        )
        output_format = output_formats(runner.task)[format_name]
        item = runner.decode(
            upload, max_pixels=None, keep_pixels=output_format.needs_pixels, keep_source=True
        )
        (output,) = runner.predict([item])
        prediction = Prediction(item, output)
        given = ResponseOptions(series_instance_uid="2.25.11", sop_instance_uid="2.25.22")
        written = pydicom.dcmread(io.BytesIO(runner.encode([prediction], output_format, given).body))
        assert (written.SeriesInstanceUID, written.SOPInstanceUID) == ("2.25.11", "2.25.22")
        assert written.file_meta.MediaStorageSOPInstanceUID == "2.25.22"
        fresh = pydicom.dcmread(
            io.BytesIO(runner.encode([prediction], output_format, ResponseOptions()).body)
        )
        assert fresh.SOPInstanceUID not in ("2.25.22", source.SOPInstanceUID)
        assert fresh.SeriesInstanceUID not in ("2.25.11", source.SeriesInstanceUID)
