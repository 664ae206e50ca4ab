"""The endpoints against damaged and hostile uploads: never a 500, never a hang, always problem+json.

One service (a segmentation and a classification model) serves every example of a test; each answer must be
200 or a 4xx problem of the right type, and the service must still answer a good request afterwards.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.app.helpers import save_mean_classifier, save_pixel_model
from tests.app.helpers import settings as service_settings
from tests.reliability.corpus import any_bytes, lying_files, valid_files, zero_size_files
from tests.reliability.helpers import BlockingClient, running_service

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")

MAX_PIXELS = 1_000_000
# Status -> problem types a bad upload may get: unreadable, too large, unsupported, unprocessable, missing.
CLIENT_ERRORS = {
    400: {"invalid-image", "bad-request"},
    413: {"payload-too-large"},
    415: {"unsupported-media-type"},
    422: {"unprocessable-image", "missing-file"},
}
RAW_TYPES = [
    "image/png",
    "image/jpeg",
    "image/tiff",
    "image/bmp",
    "application/dicom",
    "application/octet-stream",
]
ENDPOINTS = ["/segment", "/segment?format=json", "/segment?format=overlay", "/classify"]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlockingClient]:
    model_dir: Path = tmp_path_factory.mktemp("fuzz-models")
    save_pixel_model(model_dir / "pixel.pt")
    save_mean_classifier(model_dir / "mean.pt")
    config = service_settings(model_dir, max_pixels=MAX_PIXELS, warmup=False, max_upload_bytes=1 << 20)
    with running_service(config) as test_client:
        assert test_client.get("/health/ready").status_code == 200
        yield test_client


def good_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(buffer, format="PNG")
    return buffer.getvalue()


def check_answer(response: httpx.Response) -> None:
    status = response.status_code
    if status == 200:
        return
    assert status in CLIENT_ERRORS, f"status {status}: {response.text[:300]}"
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert body["type"].removeprefix("/problems/") in CLIENT_ERRORS[status], body
    assert "Traceback" not in response.text


@given(
    data=any_bytes,
    endpoint=st.sampled_from(ENDPOINTS),
    content_type=st.sampled_from(RAW_TYPES),
    multipart=st.booleans(),
)
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_any_upload_gets_an_answer_or_a_client_error(
    client: BlockingClient, data: bytes, endpoint: str, content_type: str, multipart: bool
) -> None:
    if multipart:
        response = client.post(endpoint, files={"file": ("scan.bin", data, content_type)})
    else:
        response = client.post(endpoint, content=data, headers={"content-type": content_type})
    check_answer(response)


@given(
    body=st.binary(max_size=600),
    content_type=st.one_of(
        st.just("multipart/form-data; boundary=xyz"),
        st.just("multipart/form-data"),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    ),
)
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_malformed_bodies_and_content_types_are_client_errors(
    client: BlockingClient, body: bytes, content_type: str
) -> None:
    for endpoint in ("/segment", "/classify"):
        check_answer(client.post(endpoint, content=body, headers={"content-type": content_type}))


@pytest.mark.parametrize(("name", "data"), sorted(lying_files().items()))
def test_a_bomb_in_the_header_is_413_on_every_endpoint(
    client: BlockingClient, name: str, data: bytes
) -> None:
    for endpoint in ("/segment", "/classify"):
        response = client.post(endpoint, files={"file": (f"{name}.bin", data, "application/octet-stream")})
        check_answer(response)
        assert response.status_code == 413, response.text


@pytest.mark.parametrize(("name", "data"), sorted(zero_size_files().items()))
def test_an_image_without_pixels_is_400(client: BlockingClient, name: str, data: bytes) -> None:
    response = client.post("/segment", files={"file": (f"{name}.bin", data, "application/octet-stream")})
    check_answer(response)
    assert response.status_code == 400, response.text


def test_every_valid_format_is_served_and_the_service_survived_the_fuzz(client: BlockingClient) -> None:
    for name, data in valid_files().items():
        response = client.post("/segment", files={"file": (name, data, "application/octet-stream")})
        assert response.status_code == 200, (name, response.text)
    assert (
        client.post("/classify", content=good_png(), headers={"content-type": "image/png"}).status_code == 200
    )
    models = client.get("/models").json()["models"]
    assert all(m["status"] == "ready" for m in models)
    assert sum(m["stats"]["failed"] for m in models) == 0  # no fuzz input ever broke a model
