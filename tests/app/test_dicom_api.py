"""DICOM through the API: reading (MONOCHROME1, 16-bit, errors), DICOM SEG output, identifiers, privacy."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate

from models import dicom
from models.checkpoint import load_model, save_checkpoint
from tests.app.helpers import (
    PNG,
    assert_problem,
    decode_png,
    encode_image,
    random_image,
    save_mean_classifier,
    save_pixel_model,
    serve,
    settings,
)
from tests.models.test_dicom import MPEG4_AVC, PATIENT_NAME, make_dataset, to_bytes

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings("ignore::UserWarning:pydicom", "ignore::UserWarning:highdicom"),
]

DICOM = {"content-type": "application/dicom"}
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
THREE = ("background", "tissue", "bone")
PATIENT_ID = "MRN-0042"  # make_dataset's PatientID
CLIENT_FILE = "ward7-bed3-scan.dcm"  # a client file name: may be echoed in /classify, never logged


def values_12bit(height: int, width: int, seed: int) -> np.ndarray:
    """12-bit values spanning exactly [0, 4095] (so min-max is v / 4095), none near the middle (no ties)."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 3800, size=(height, width))
    values = np.where(values >= 1900, values + 295, values)  # nothing in [1900, 2195): far from 2047.5
    values[0, 0], values[-1, -1] = 0, 4095
    return values


def binary_mask_of(values: np.ndarray, peak: int) -> np.ndarray:
    """What the threshold PixelNet answers for min-max read values spanning [0, peak]: 255 above the middle."""
    return np.where(values > peak / 2, 255, 0).astype(np.uint8)


def png16(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def seg_of(data: bytes, source: Dataset) -> tuple[Dataset, np.ndarray]:
    """The SEG as a plain dataset, and its label map for the source image (decoded by highdicom)."""
    seg = hd.seg.segread(io.BytesIO(data))
    labels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=True)[0]
    return pydicom.dcmread(io.BytesIO(data)), labels


@pytest.fixture
def three_class_dir(tmp_path: Path) -> Path:
    # logits (-z, 1, z) for the normalised value z = (x - 0.5) / 0.25: "tissue" for x in (0.25, 0.75), below
    # "background", above "bone".
    save_pixel_model(tmp_path / "three.pt", classes=THREE, weights=(-1.0, 0.0, 1.0), biases=(0.0, 1.0, 0.0))
    return tmp_path


async def test_monochrome1_and_monochrome2_of_the_same_anatomy_give_the_same_mask(pixel_dir: Path) -> None:
    values = values_12bit(29, 41, seed=3)
    mono2 = to_bytes(make_dataset(values, bits_stored=12))
    # The same anatomy stored inverted, as MONOCHROME1 (bright = low value), sent as a multipart .dcm file.
    mono1 = to_bytes(make_dataset(4095 - values, bits_stored=12, photometric="MONOCHROME1"))
    async with serve(settings(pixel_dir)) as (_, client):
        raw = await client.post("/segment", content=mono2, headers=DICOM)
        part = await client.post("/segment", files={"file": ("scan.dcm", mono1, "application/octet-stream")})
    assert raw.status_code == 200 and part.status_code == 200, (raw.text, part.text)
    expected = binary_mask_of(values, 4095)
    assert 0 < expected.mean() < 255  # both classes present
    np.testing.assert_array_equal(decode_png(raw.content), expected)
    np.testing.assert_array_equal(decode_png(part.content), expected)


async def test_16_bit_png_and_the_same_image_as_dicom_give_the_same_mask(pixel_dir: Path) -> None:
    rng = np.random.default_rng(5)
    values = rng.integers(0, 60000, size=(33, 27))
    values = np.where(values >= 29000, values + 5535, values)
    values[0, 0], values[-1, -1] = 0, 65535
    async with serve(settings(pixel_dir)) as (_, client):
        from_png = await client.post("/segment", content=png16(values), headers=PNG)
        from_dicom = await client.post("/segment", content=to_bytes(make_dataset(values)), headers=DICOM)
    assert from_png.status_code == 200 and from_dicom.status_code == 200
    np.testing.assert_array_equal(decode_png(from_png.content), decode_png(from_dicom.content))
    np.testing.assert_array_equal(decode_png(from_dicom.content), binary_mask_of(values, 65535))


async def test_the_service_reads_with_the_checkpoints_intensity_policy(tmp_path: Path) -> None:
    values = values_12bit(20, 24, seed=8)
    # A window far above every value: read through it the image is blank; ignoring it shows the anatomy.
    data = to_bytes(make_dataset(values, bits_stored=12, WindowCenter=9000, WindowWidth=10))
    save_pixel_model(tmp_path / "windowed.pt")
    save_pixel_model(tmp_path / "ignoring.pt")
    model, meta = load_model(tmp_path / "ignoring.pt")
    spec = meta.preprocessing.model_copy(update={"intensity": "ignore-window"})
    save_checkpoint(tmp_path / "ignoring.pt", model, meta.model_copy(update={"preprocessing": spec}))
    async with serve(settings(tmp_path)) as (_, client):
        windowed = await client.post("/segment?model=windowed", content=data, headers=DICOM)
        ignored = await client.post("/segment?model=ignoring", content=data, headers=DICOM)
        listed = (await client.get("/models")).json()["models"]
    assert windowed.status_code == 200 and ignored.status_code == 200
    assert {m["name"]: m["intensity"] for m in listed} == {
        "windowed": "dicom-window",
        "ignoring": "ignore-window",
    }
    assert not decode_png(windowed.content).any()
    np.testing.assert_array_equal(decode_png(ignored.content), binary_mask_of(values, 4095))


async def test_dicom_errors_map_to_their_status_codes(pixel_dir: Path) -> None:
    video = make_dataset(values_12bit(8, 8, seed=1), bits_stored=12, transfer_syntax=MPEG4_AVC)
    video.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    video["PixelData"].VR = "OB"
    frames = np.stack([values_12bit(8, 8, seed=i) for i in range(3)])
    volume = make_dataset(frames[0], bits_stored=12, NumberOfFrames=3)
    volume.PixelData = frames.astype(np.uint16).tobytes()
    png = encode_image(random_image(8, 8, seed=0))
    async with serve(settings(pixel_dir)) as (_, client):
        unsupported = await client.post("/segment", content=to_bytes(video), headers=DICOM)
        multi_frame = await client.post("/segment", content=to_bytes(volume), headers=DICOM)
        fake_raw = await client.post("/segment", content=png, headers=DICOM)
        fake_part = await client.post(
            "/segment", files={"file": ("scan.dcm", b"not DICOM at all" * 20, "x/y")}
        )
    detail = assert_problem(unsupported, 415, "unsupported-media-type")["detail"]
    assert str(MPEG4_AVC) in detail and MPEG4_AVC.name in detail
    assert "multi-frame" in assert_problem(multi_frame, 422, "unprocessable-image")["detail"]
    assert_problem(fake_raw, 400, "invalid-image")
    assert_problem(fake_part, 400, "invalid-image")


async def test_dicom_seg_references_the_source_and_equals_the_png_mask(three_class_dir: Path) -> None:
    source = make_dataset(values_12bit(26, 35, seed=11), bits_stored=12)
    data = to_bytes(source)
    async with serve(settings(three_class_dir)) as (_, client):
        png = await client.post("/segment", content=data, headers=DICOM)
        seg = await client.post(
            "/segment?format=dicom-seg", files={"file": ("scan.dcm", data, "application/dicom")}
        )
    assert png.status_code == 200 and seg.status_code == 200, seg.text
    assert seg.headers["content-type"] == "application/dicom"
    assert seg.headers["x-model-name"] == "three"
    plain, labels = seg_of(seg.content, source)
    assert plain.SOPClassUID == SEG_STORAGE and plain.Modality == "SEG"
    assert plain.StudyInstanceUID == source.StudyInstanceUID
    referenced = plain.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # One segment per foreground class, named after it, numbered by class index.
    assert [s.SegmentLabel for s in plain.SegmentSequence] == list(THREE[1:])
    assert [int(s.SegmentNumber) for s in plain.SegmentSequence] == [1, 2]
    assert plain.SegmentSequence[0].SegmentAlgorithmName == "three"
    mask = decode_png(png.content)
    assert set(np.unique(mask)) == {0, 1, 2}
    np.testing.assert_array_equal(labels, mask)


async def test_dicom_seg_of_a_binary_model_has_one_segment(pixel_dir: Path) -> None:
    values = values_12bit(16, 18, seed=4)
    source = make_dataset(values, bits_stored=12)
    async with serve(settings(pixel_dir)) as (_, client):
        seg = await client.post("/segment?format=dicom-seg", content=to_bytes(source), headers=DICOM)
    assert seg.status_code == 200
    plain, labels = seg_of(seg.content, source)
    assert [s.SegmentLabel for s in plain.SegmentSequence] == ["lesion"]
    np.testing.assert_array_equal(labels, binary_mask_of(values, 4095) // 255)


async def test_dicom_seg_needs_dicom_input_and_a_known_sop_class(pixel_dir: Path) -> None:
    unknown_class = make_dataset(
        values_12bit(8, 8, seed=2), bits_stored=12, SOPClassUID="1.2.826.0.1.3680043.9.9999.1"
    )
    async with serve(settings(pixel_dir)) as (_, client):
        from_png = await client.post(
            "/segment?format=dicom-seg", content=encode_image(random_image(8, 8, seed=0)), headers=PNG
        )
        refused = await client.post(
            "/segment?format=dicom-seg", content=to_bytes(unknown_class), headers=DICOM
        )
        bad_format = await client.post(
            "/segment?format=dicom", content=to_bytes(unknown_class), headers=DICOM
        )
        crafted = await client.post(
            "/segment?format=dicom-seg", content=to_bytes(_crafted(values_12bit(8, 8, seed=2))), headers=DICOM
        )
    detail = assert_problem(from_png, 415, "unsupported-media-type")["detail"]
    assert "dicom-seg" in detail and "DICOM" in detail and "png" in detail
    detail = assert_problem(refused, 422, "unprocessable-image")["detail"]
    assert "1.2.826.0.1.3680043.9.9999.1" in detail
    assert_problem(bad_format, 422, "invalid-request")
    detail = assert_problem(crafted, 422, "unprocessable-image")["detail"]
    assert "SeriesInstanceUID, SOPInstanceUID" in detail and "Doe" not in detail


async def test_json_formats_carry_only_the_three_uids(pixel_dir: Path) -> None:
    save_mean_classifier(pixel_dir / "classifier.pt")
    source = make_dataset(values_12bit(12, 12, seed=6), bits_stored=12)
    uids = {key: str(source.get(key)) for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    png = encode_image(random_image(12, 12, seed=6))
    async with serve(settings(pixel_dir)) as (_, client):
        summary = await client.post("/segment?format=json", content=to_bytes(source), headers=DICOM)
        plain = await client.post("/segment?format=json", content=png, headers=PNG)
        classified = await client.post(
            "/classify",
            files=[
                ("file", ("a.png", png, "image/png")),
                ("file", ("b.dcm", to_bytes(source), "application/dicom")),
            ],
        )
    assert summary.status_code == 200 and plain.status_code == 200 and classified.status_code == 200
    assert summary.json()["dicom"] == uids
    assert "dicom" not in plain.json() or plain.json()["dicom"] is None
    first, second = classified.json()["predictions"]
    assert first.get("dicom") is None
    assert second["dicom"] == uids
    for response in (summary, classified):
        assert PATIENT_NAME.split("^")[0] not in response.text and PATIENT_ID not in response.text


def _malformed(values: np.ndarray) -> Dataset:
    """A DICOM whose patient name breaks the VR rules, so pydicom's validation quotes it when it is read."""
    ds = make_dataset(values, bits_stored=12)
    ds.PatientName = PATIENT_NAME * 8  # over-long person name component
    ds.StudyDescription = f"{PATIENT_NAME} {PATIENT_ID}"
    return ds


def _crafted(values: np.ndarray) -> Dataset:
    """A DICOM whose "UIDs" hold the patient's name: they must be neither echoed nor logged."""
    ds = make_dataset(values, bits_stored=12)
    ds.SeriesInstanceUID = PATIENT_NAME
    ds.SOPInstanceUID = f"{PATIENT_NAME}^{PATIENT_ID}"
    return ds


async def test_patient_data_never_reaches_logs_or_responses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    save_pixel_model(tmp_path / "pixel.pt")
    save_mean_classifier(tmp_path / "classifier.pt")
    values = values_12bit(14, 15, seed=9)
    good = to_bytes(make_dataset(values, bits_stored=12))
    malformed = to_bytes(_malformed(values))
    crafted = to_bytes(_crafted(values))
    crafted_class = to_bytes(make_dataset(values, bits_stored=12, SOPClassUID=PATIENT_NAME))
    truncated = good[: len(good) - 50]  # pixel data cut short: a 400 after the header was parsed
    frames = make_dataset(values, bits_stored=12, NumberOfFrames=2)
    frames.PixelData = np.stack([values, values]).astype(np.uint16).tobytes()
    video = make_dataset(values, bits_stored=12, transfer_syntax=MPEG4_AVC)
    video.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    video["PixelData"].VR = "OB"
    bodies = [good, malformed, crafted, crafted_class, truncated, to_bytes(frames), to_bytes(video)]

    dicom.install_privacy_guards()  # pytest resets warning filters per test; the service installs them once
    for name in ("", "pydicom", "highdicom", "medserve", "app", "uvicorn", "httpx", "PIL"):
        caplog.set_level(logging.DEBUG, logger=name)
    responses: list[Any] = []
    segs: list[bytes] = []
    with warnings.catch_warnings(record=True) as caught:
        async with serve(settings(tmp_path)) as (_, client):
            for body in bodies:
                for fmt in ("png", "json", "overlay"):
                    responses.append(await client.post(f"/segment?format={fmt}", content=body, headers=DICOM))
                responses.append(
                    await client.post("/segment", files={"file": (CLIENT_FILE, body, "application/dicom")})
                )
                responses.append(
                    await client.post("/classify", files={"file": (CLIENT_FILE, body, "application/dicom")})
                )
                seg = await client.post("/segment?format=dicom-seg", content=body, headers=DICOM)
                if seg.status_code == 200:
                    segs.append(
                        seg.content
                    )  # the SEG carries the patient module by the standard; checked below
                else:
                    responses.append(seg)
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and {400, 415, 422} <= set(statuses)  # both the answer and the error paths ran
    assert len(segs) == 2  # good and malformed; crafted UIDs cannot be referenced (422)
    captured = capfd.readouterr()
    logged = caplog.text + "\n".join(
        f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records
    )
    assert caplog.records  # the service did log (requests, errors)
    secrets = ["Doe", "Jane", "Quincy", PATIENT_ID]
    for secret in secrets:
        assert secret not in logged, secret
        assert secret not in captured.out and secret not in captured.err, secret
        assert not any(secret in str(w.message) for w in caught), secret
        for response in responses:
            assert secret.encode() not in response.content, (secret, response.request.url)
    for text in (logged, captured.out, captured.err):
        assert CLIENT_FILE not in text
    # The SEG is a clinical object for the archive: it keeps the source's patient, as the IOD requires.
    assert str(pydicom.dcmread(io.BytesIO(segs[0])).PatientName) == PATIENT_NAME
