"""schemathesis against the service's own OpenAPI description: no 500s, and every response matches it.

Cases are generated from the OpenAPI description of the app (a segmentation and a classification model, API
keys on) and sent to it in-process; each response is checked for: no server error, a documented status code,
content type and headers, a body that validates against the documented schema, and that operations which
declare a security scheme refuse requests without the key (``ignored_auth``).

The schema is loaded eagerly at collection (``schemathesis.pytest.from_fixture`` needs a pytest internal that
pytest 9 removed); the models are written and the app started by a module fixture, before the first case.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi

from app.main import create_app
from tests.app.helpers import encode_image, random_image, save_mean_classifier, save_pixel_model
from tests.app.helpers import settings as service_settings

KEY = "st-9Kd3Lf5Gh7Jk1Zx3Cv5B"
SAFETY_S = 60.0
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    ignored_auth,
]

# Raw image bodies are bytes, like application/octet-stream (which schemathesis knows).
schemathesis.serializer.alias(
    ["application/dicom", "image/bmp", "image/jpg", "image/tiff", "image/x-ms-bmp"],
    "application/octet-stream",
)

MODEL_DIR = Path(tempfile.mkdtemp(prefix="medserve-schemathesis-"))
APP = create_app(service_settings(MODEL_DIR, warmup=False, api_keys=KEY, max_pixels=1_000_000))
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP


@pytest.fixture(scope="module", autouse=True)
def model_dir() -> Iterator[Path]:
    save_pixel_model(MODEL_DIR / "pixel.pt")
    save_mean_classifier(MODEL_DIR / "mean.pt")
    yield MODEL_DIR
    shutil.rmtree(MODEL_DIR, ignore_errors=True)


def ensure_ready() -> None:
    """Starts the app's lifespan if needed and waits for its models (schemathesis ends it after each test)."""
    with asgi.get_client(cast(Any, APP)) as client:
        deadline = time.monotonic() + SAFETY_S
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the models never loaded"
            time.sleep(0.01)


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_the_service_keeps_its_openapi_contract(case: schemathesis.Case) -> None:
    ensure_ready()
    case.call_and_validate(headers={"X-API-Key": KEY}, checks=CHECKS)


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/segment", {}),
        ("/segment", {"format": "json"}),
        ("/segment", {"format": "overlay"}),
        ("/classify", {"top_k": 1}),
    ],
)
def test_successful_answers_match_the_schema_too(path: str, query: dict[str, object]) -> None:
    """Random bytes are rarely an image: the 200 answers are checked with a real PNG, raw and multipart."""
    ensure_ready()
    png = encode_image(random_image(10, 14, seed=5))
    operation = schema[path]["POST"]
    for case in (
        operation.Case(body=png, media_type="image/png", query=query),
        operation.Case(
            body=cast(Any, {"file": [png] if path == "/classify" else png}),  # /classify takes several files
            media_type="multipart/form-data",
            multipart_content_types={"file": "image/png"},
            query=query,
        ),
    ):
        response = case.call_and_validate(headers={"X-API-Key": KEY}, checks=CHECKS)
        assert response.status_code == 200, response.text
