"""Response models and OpenAPI descriptions of the service (what ``/docs`` shows)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.errors import PROBLEM_JSON, PROBLEM_TYPES
from app.uploads import RAW_IMAGE_TYPES


class ProblemDetails(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field(examples=["/problems/invalid-image"])
    title: str = Field(examples=["Unreadable image"])
    status: int = Field(examples=[400])
    detail: str = Field(examples=["the data is not a readable image (corrupt or truncated file)"])
    instance: str = Field(examples=["urn:uuid:0b6c4a1e-3f0e-4a8e-9a53-1c2d3e4f5a6b"])


class BoundingBox(BaseModel):
    x: int
    y: int
    width: int
    height: int


class ClassArea(BaseModel):
    index: int = Field(description="class index (the value in the PNG mask of a multi-class model)")
    name: str
    pixels: int = Field(description="area in pixels")
    fraction: float = Field(description="area as a fraction of the image")
    bbox: BoundingBox | None = Field(description="bounding box of the class; null when absent")
    components: int = Field(description="connected components (8-connectivity)")


class DicomIdentifiers(BaseModel):
    """The identifiers of a DICOM input that answers echo: these three UIDs only (each present when the input
    carried it as a valid UID), never the patient's name or any other tag."""

    StudyInstanceUID: str | None = Field(default=None, examples=["1.2.826.0.1.3680043.8.498.1"])
    SeriesInstanceUID: str | None = Field(default=None, examples=["1.2.826.0.1.3680043.8.498.2"])
    SOPInstanceUID: str | None = Field(default=None, examples=["1.2.826.0.1.3680043.8.498.3"])


class OODResult(BaseModel):
    """How unlike the model's training data the image is (``models.ood``)."""

    score: float = Field(description="Mahalanobis distance of the image's features to the training features")
    threshold: float = Field(description="the model's threshold (a percentile of validation images' scores)")
    flagged: bool = Field(description="score > threshold: the image is unlike the training data")


class SegmentSummary(BaseModel):
    """``/segment?format=json``."""

    model: str
    version: str
    width: int
    height: int
    classes: list[ClassArea]
    dicom: DicomIdentifiers | None = Field(
        default=None, description="the request's Study/Series/SOP Instance UIDs; only for DICOM input"
    )
    ood: OODResult | None = Field(
        default=None, description="out-of-distribution flag; null when the model has no OOD statistics"
    )


class VersionInfo(BaseModel):
    """One loaded version of a model."""

    version: str = Field(description="content hash of the checkpoint; the value of ?version=")
    state: str = Field(description="serving (takes requests without ?version=), previous (kept) or draining")
    loaded_at: str = Field(description="when it was loaded (UTC, ISO 8601)")
    load_seconds: float = Field(description="time to load and warm it up")
    requests: int = Field(description="requests it has run")
    queue_depth: int
    announced: int


class DrainingVersion(VersionInfo):
    """A version taken out of service (replaced beyond KEEP_VERSIONS, or its file removed): it runs the
    requests it admitted, then stops and releases its memory."""

    name: str


class ExplainInfo(BaseModel):
    """How a classifier's answers are explained (``?explain=``)."""

    methods: list[str] = Field(examples=[["gradcam"]])
    target_layer: str = Field(
        description="the module Grad-CAM explains, its path in the network", examples=["features.4"]
    )
    layer: str = Field(
        description="that module in words", examples=["resnet18 layer4 (stage 5 of 5, stride 32)"]
    )
    stats: dict[str, Any] | None = Field(
        default=None,
        description="the explanation worker's counters (requests, queue depth, time in queue and running, "
        "images explained), once the model has explained something",
    )


class ModelInfo(BaseModel):
    """One checkpoint of the model directory."""

    name: str = Field(description="checkpoint file stem; the value of ?model=")
    file: str
    status: str = Field(description="loading, ready or failed")
    error: str | None = Field(default=None, description="why the checkpoint failed to load")
    task: str | None = None
    version: str | None = None
    architecture: str | None = None
    classes: list[str] | None = None
    input_size: list[int] | None = Field(default=None, description="(height, width) the model was trained on")
    in_channels: int | None = None
    resize: str | None = Field(
        default=None,
        description="tile (native scale, sliding window), fit (fitted into working_size, aspect kept) or resize",
    )
    working_size: list[int] | None = Field(
        default=None, description="(height, width) every image is fitted into when resize is fit"
    )
    plan: dict[str, Any] | None = Field(
        default=None,
        description="how training chose the working resolution from the data set's fingerprint (segmentation)",
    )
    intensity: str | None = Field(
        default=None, description="intensity policy images are read with (dicom-window or ignore-window)"
    )
    metrics: dict[str, Any] | None = Field(default=None, description="validation metrics from training")
    created_at: str | None = None
    device: str | None = None
    precision: str | None = None
    load_seconds: float | None = None
    batch_autotune: dict[str, Any] | None = Field(
        default=None, description="throughput by batch size measured at warm-up and the size chosen"
    )
    stats: dict[str, Any] | None = Field(
        default=None,
        description="batching counters: batch sizes, queue depth, time in queue and in the model",
    )
    versions: list[VersionInfo] = Field(
        default_factory=list,
        description="loaded versions: the serving one first, then the previous ones kept",
    )
    reloading: bool | None = Field(
        default=None, description="true while a new file loads and warms up (the serving version answers)"
    )
    explain: ExplainInfo | None = Field(
        default=None,
        description="classifiers: the explanation methods of POST /classify?explain= and the layer Grad-CAM "
        "explains; null when the network cannot be explained (or for other tasks)",
    )
    ood: dict[str, Any] | None = Field(
        default=None,
        description="out-of-distribution statistics: threshold, percentile, features, images fitted and "
        "calibrated on; null when the model has none (answers then carry ood null)",
    )
    runtime: dict[str, Any] | None = Field(
        default=None,
        description="MEDSERVE_RUNTIME: the runtime chosen per batch size, and every candidate's verification "
        "against fp32 PyTorch and ms per batch (see docs/runtimes.md)",
    )


class ModelsResponse(BaseModel):
    ready: bool
    device: str
    models: list[ModelInfo]
    draining: list[DrainingVersion] = Field(
        default_factory=list, description="versions out of service still running the requests they admitted"
    )


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    models: dict[str, str] = Field(default_factory=dict, description="status of each model")


class Prediction(BaseModel):
    filename: str | None = Field(description="the uploaded file's name (null for a raw body)")
    label: str = Field(description="the most probable class")
    probabilities: dict[str, float] = Field(description="class -> probability, best first (top_k of them)")
    dicom: DicomIdentifiers | None = Field(
        default=None, description="the image's Study/Series/SOP Instance UIDs; only for DICOM input"
    )
    explanation: Explanation | None = Field(
        default=None, description="only with ?explain=gradcam: the Grad-CAM map of the image"
    )

    ood: OODResult | None = Field(
        default=None, description="out-of-distribution flag; null when the model has no OOD statistics"
    )


class Explanation(BaseModel):
    """``/classify?explain=gradcam``: where the evidence for ``target`` lies in the image."""

    method: str = Field(examples=["gradcam"])
    target: str = Field(description="the class explained: the predicted label, or the request's `target`")
    heatmap_png: str = Field(
        description="base64 of an 8-bit grayscale PNG of the image's size: the Grad-CAM map, 255 where the "
        "evidence is strongest, 0 where there is none"
    )
    overlay_png: str = Field(description="base64 of an RGB PNG: the map in the jet colour map over the image")


class ClassifyResponse(BaseModel):
    model: str
    version: str
    predictions: list[Prediction]


class ProblemType(BaseModel):
    type: str
    title: str
    status: int
    description: str


def image_request_body(multiple: bool) -> dict[str, Any]:
    """OpenAPI request body: multipart field ``file`` (repeatable when ``multiple``) or a raw image body."""
    file_schema: dict[str, Any] = {"type": "string", "format": "binary"}
    field = {"type": "array", "items": file_schema} if multiple else file_schema
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {"file": {**field, "description": "the image (PNG, JPEG, TIFF, BMP or DICOM)"}},
            }
        }
    }
    for ctype in sorted(RAW_IMAGE_TYPES):
        content[ctype] = {"schema": file_schema}
    return {"requestBody": {"required": True, "content": content}}


def interactive_request_body() -> dict[str, Any]:
    """OpenAPI request body of ``POST /segment/interactive``: multipart fields ``file`` and ``hints``."""
    binary: dict[str, Any] = {"type": "string", "format": "binary"}
    hints_json = '{"points": [{"x": 120, "y": 80, "label": "foreground"}], "radius": 5}'
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "hints"],
                        "properties": {
                            "file": {**binary, "description": "the image (PNG, JPEG, TIFF, BMP or DICOM)"},
                            "hints": {
                                "description": "JSON points (x column, y row, label foreground|background; "
                                "radius in pixels, default 5) or a scribble PNG of the image's size "
                                "(0 none, 1 foreground, 2 background)",
                                "oneOf": [{"type": "string", "example": hints_json}, binary],
                            },
                        },
                    }
                }
            },
        }
    }


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses, listing the problem types each status can carry."""
    schema = ProblemDetails.model_json_schema()
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        kinds = [cls for cls in PROBLEM_TYPES.values() if cls.status == status]
        example = kinds[0] if kinds else None
        entry: dict[str, Any] = {
            "description": "; ".join(f"{k.title} ({k.slug})" for k in kinds) or "error",
            "content": {PROBLEM_JSON: {"schema": schema}},
        }
        if example is not None:
            entry["content"][PROBLEM_JSON]["example"] = {
                "type": "/problems/" + example.slug,
                "title": example.title,
                "status": status,
                "detail": example.description,
                "instance": "urn:uuid:0b6c4a1e-3f0e-4a8e-9a53-1c2d3e4f5a6b",
            }
        if status == 503:
            entry["headers"] = {
                "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}
            }
        responses[status] = entry
    return responses
