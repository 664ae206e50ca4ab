"""POST /segment end to end through the ASGI app, with the lifespan run and tiny checkpoints."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.app.helpers import (
    PNG,
    assert_problem,
    decode_png,
    encode_image,
    expected_binary_mask,
    random_image,
    save_pixel_model,
    save_unet,
    serve,
    settings,
)

pytestmark = pytest.mark.anyio


async def test_mask_has_the_input_size_for_odd_sizes(tmp_path: Path) -> None:
    save_unet(tmp_path / "unet.pt", tile=(32, 32))
    async with serve(settings(tmp_path)) as (_, client):
        # Smaller than a window, exactly one, and larger than several (tiled), all with odd sides.
        for height, width in [(7, 13), (31, 33), (45, 77)]:
            response = await client.post(
                "/segment", content=encode_image(random_image(height, width, seed=height)), headers=PNG
            )
            assert response.status_code == 200, response.text
            mask = decode_png(response.content)
            assert mask.shape == (height, width)
            assert mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255}
            assert response.headers["x-model-name"] == "unet"


async def test_mask_is_the_models_answer_at_full_resolution(pixel_dir: Path) -> None:
    image = random_image(37, 53, seed=1)
    async with serve(settings(pixel_dir)) as (_, client):
        response = await client.post(
            "/segment", files={"file": ("scan.png", encode_image(image), "image/png")}
        )
    assert response.status_code == 200
    np.testing.assert_array_equal(decode_png(response.content), expected_binary_mask(image))


async def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(pixel_dir: Path) -> None:
    # A long delay: the requests announced while the first are decoded must end up in shared batches.
    images = [random_image(20 + i % 7, 30 + i % 5, seed=i) for i in range(32)]
    async with serve(settings(pixel_dir, max_batch_size=16, max_batch_delay_ms=500)) as (_, client):
        alone = []
        for image in images:
            response = await client.post("/segment", content=encode_image(image), headers=PNG)
            assert response.status_code == 200
            alone.append(decode_png(response.content))
        stats_before = (await client.get("/models")).json()["models"][0]["stats"]
        assert set(stats_before["batch_sizes"]) == {"1"}  # sent one at a time: nothing to batch

        responses = await asyncio.gather(
            *(client.post("/segment", content=encode_image(image), headers=PNG) for image in images)
        )
        stats = (await client.get("/models")).json()["models"][0]["stats"]
    for image, single, response in zip(images, alone, responses, strict=True):
        assert response.status_code == 200
        np.testing.assert_array_equal(decode_png(response.content), single)
        np.testing.assert_array_equal(single, expected_binary_mask(image))
    new_batches = stats["batches"] - stats_before["batches"]
    assert stats["requests"] - stats_before["requests"] == 32
    assert new_batches < 32  # observed batching: fewer forward batches than requests
    assert any(int(size) > 1 for size in stats["batch_sizes"])


async def test_one_corrupt_file_among_good_ones_fails_alone(pixel_dir: Path) -> None:
    images = [random_image(24, 24, seed=i) for i in range(8)]
    bodies = [encode_image(image) for image in images]
    bodies.insert(3, encode_image(random_image(24, 24, seed=99))[:60])  # truncated PNG
    async with serve(settings(pixel_dir, max_batch_delay_ms=200)) as (_, client):
        responses = await asyncio.gather(*(client.post("/segment", content=b, headers=PNG) for b in bodies))
    assert_problem(responses[3], 400, "invalid-image")
    good = responses[:3] + responses[4:]
    for image, response in zip(images, good, strict=True):
        assert response.status_code == 200
        np.testing.assert_array_equal(decode_png(response.content), expected_binary_mask(image))


async def test_an_input_that_breaks_the_model_fails_alone(tmp_path: Path) -> None:
    save_pixel_model(tmp_path / "fragile.pt", poison=True)
    images = [random_image(16, 16, seed=i) for i in range(6)]
    black = np.zeros((16, 16), dtype=np.uint8)  # uniform: the model raises on it
    async with serve(settings(tmp_path, max_batch_delay_ms=200, warmup=False)) as (_, client):
        responses = await asyncio.gather(
            *(client.post("/segment", content=encode_image(a), headers=PNG) for a in [*images, black])
        )
        stats = (await client.get("/models")).json()["models"][0]["stats"]
    assert_problem(responses[-1], 500, "inference-failed")
    for image, response in zip(images, responses[:-1], strict=True):
        assert response.status_code == 200
        np.testing.assert_array_equal(decode_png(response.content), expected_binary_mask(image))
    assert stats["failed"] == 1


async def test_raw_body_and_multipart_give_the_same_mask(pixel_dir: Path) -> None:
    image = random_image(29, 41, seed=5)
    data = encode_image(image, "JPEG")
    async with serve(settings(pixel_dir)) as (_, client):
        raw = await client.post("/segment", content=data, headers={"content-type": "image/jpeg"})
        multipart = await client.post("/segment", files={"file": ("scan.jpg", data, "image/jpeg")})
    assert raw.status_code == multipart.status_code == 200
    assert raw.content == multipart.content
    assert decode_png(raw.content).shape == (29, 41)


async def test_multiclass_mask_holds_class_indices(tmp_path: Path) -> None:
    # Thresholds at normalised -1 and 1, i.e. 8-bit 64 and 191: dark 0, middle 1, bright 2.
    save_pixel_model(
        tmp_path / "three.pt",
        classes=("bg", "soft", "bone"),
        weights=(-2.0, 0.0, 2.0),
        biases=(-2.0, 0.0, -2.0),
    )
    image = np.array([[10, 100, 250], [30, 150, 200]], dtype=np.uint8)
    async with serve(settings(tmp_path)) as (_, client):
        response = await client.post("/segment", content=encode_image(image), headers=PNG)
    np.testing.assert_array_equal(decode_png(response.content), [[0, 1, 2], [0, 1, 2]])


async def test_json_format_reports_areas_boxes_and_components(pixel_dir: Path) -> None:
    image = np.zeros((20, 30), dtype=np.uint8) + 40
    image[2:5, 3:7] = 200  # a 3x4 blob
    image[10:18, 20:25] = 220  # an 8x5 blob
    async with serve(settings(pixel_dir)) as (_, client):
        response = await client.post("/segment?format=json", content=encode_image(image), headers=PNG)
        version = (await client.get("/models")).json()["models"][0]["version"]
    assert response.headers["content-type"] == "application/json"
    summary = response.json()
    assert summary["model"] == "pixel" and summary["version"] == version
    assert (summary["width"], summary["height"]) == (30, 20)
    background, lesion = summary["classes"]
    assert lesion["name"] == "lesion"
    assert lesion["pixels"] == 12 + 40
    assert lesion["fraction"] == pytest.approx(52 / 600)
    assert lesion["bbox"] == {"x": 3, "y": 2, "width": 22, "height": 16}
    assert lesion["components"] == 2
    assert background["pixels"] == 600 - 52 and background["components"] == 1


async def test_overlay_is_an_rgb_png_of_the_image_with_the_mask_in_colour(pixel_dir: Path) -> None:
    image = np.full((12, 10), 40, dtype=np.uint8)
    image[:, 5:] = 220
    async with serve(settings(pixel_dir)) as (_, client):
        response = await client.post("/segment?format=overlay", content=encode_image(image), headers=PNG)
    overlay = np.asarray(Image.open(io.BytesIO(response.content)))
    assert overlay.shape == (12, 10, 3)
    assert (overlay[:, :5] == 40).all()  # background untouched (gray)
    right = overlay[:, 5:].reshape(-1, 3)
    assert (right[:, 0] > right[:, 1]).all()  # lesion tinted (red first colour)


async def test_model_choice_by_name_and_headers(tmp_path: Path) -> None:
    first = save_pixel_model(tmp_path / "normal.pt")
    save_pixel_model(tmp_path / "inverted.pt", weights=(1.0, -1.0))
    image = random_image(16, 16, seed=3)
    async with serve(settings(tmp_path)) as (_, client):
        unnamed = await client.post("/segment", content=encode_image(image), headers=PNG)
        normal = await client.post("/segment?model=normal", content=encode_image(image), headers=PNG)
        inverted = await client.post("/segment?model=inverted", content=encode_image(image), headers=PNG)
    body = assert_problem(unnamed, 422, "model-required")
    assert "inverted" in body["detail"] and "normal" in body["detail"]
    assert normal.headers["x-model-name"] == "normal"
    assert normal.headers["x-model-version"] == first.version
    np.testing.assert_array_equal(decode_png(normal.content), expected_binary_mask(image))
    np.testing.assert_array_equal(decode_png(inverted.content), 255 - expected_binary_mask(image))


async def test_rgb_and_sixteen_bit_images_are_read(pixel_dir: Path) -> None:
    rgb = random_image(10, 12, seed=4, channels=3)
    deep = (np.arange(120, dtype=np.uint16).reshape(10, 12) * 500).astype(np.uint16)
    async with serve(settings(pixel_dir)) as (_, client):
        for array in (rgb, deep):
            response = await client.post("/segment", content=encode_image(array), headers=PNG)
            assert response.status_code == 200
            assert decode_png(response.content).shape == (10, 12)


async def test_dicom_json_summary_echoes_the_uids(pixel_dir: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.7")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "OT", 8, 6
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(48, dtype=np.uint8).tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    async with serve(settings(pixel_dir)) as (_, client):
        response = await client.post(
            "/segment?format=json", content=buffer.getvalue(), headers={"content-type": "application/dicom"}
        )
    assert response.status_code == 200, response.text
    summary = json.loads(response.content)
    assert (summary["width"], summary["height"]) == (6, 8)
    assert summary["dicom"]["SOPInstanceUID"] == str(ds.SOPInstanceUID)


def _halves(height: int, width: int) -> np.ndarray:
    """Bright (200) left half, dark (40) right half: a mask that survives down- and up-sampling."""
    image = np.full((height, width), 40, np.uint8)
    image[:, : width // 2] = 200
    return image


@pytest.mark.parametrize("tile", [(32, 32), (16, 16)])  # one window at the working size, or several
async def test_a_fit_model_answers_at_the_original_size_of_any_image(tmp_path: Path, tile) -> None:
    plan = {"scale": "fit", "working_size": [32, 32], "reasons": ["large images"]}
    save_pixel_model(tmp_path / "fit.pt", tile=tile, working_size=(32, 32), extra={"plan": plan})
    async with serve(settings(tmp_path)) as (_, client):
        described = (await client.get("/models")).json()["models"][0]
        assert described["resize"] == "fit" and described["working_size"] == [32, 32]
        assert described["plan"] == plan
        for height, width in [(300, 130), (64, 400), (20, 20)]:
            image = _halves(height, width)
            response = await client.post("/segment", content=encode_image(image), headers=PNG)
            assert response.status_code == 200, response.text
            mask = decode_png(response.content)
            assert mask.shape == (height, width)
            expected = expected_binary_mask(image)
            # Away from the edge between the halves (blurred by the resampling) the mask is exact.
            margin = max(2, width // 16)
            keep = np.abs(np.arange(width) - width // 2) > margin
            np.testing.assert_array_equal(mask[:, keep], expected[:, keep])
