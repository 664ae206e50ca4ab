"""The Open Inference Protocol (KServe v2, the HTTP/REST API Triton speaks) on the served models.

Endpoints (``/v2`` prefix): server metadata, liveness and readiness, per-model metadata and readiness, and
``infer``, with JSON tensors and the binary tensor data extension (a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw tensors, as ``tritonclient[http]`` sends by default).

What a model takes and gives:
    * input ``input``: the normalised tensor the exported network takes, FP32, shape ``[-1, C, H, W]`` with
      ``(H, W)`` the checkpoint's ``img_size``: the image already read with the checkpoint's intensity policy,
      resized or tiled as the checkpoint's ``resize`` says, and normalised with its ``mean`` / ``std``. The
      metadata's ``parameters`` carry that preprocessing, so a client can reproduce it.
    * output ``logits``: the network's raw output, ``[-1, K]`` (classification) or ``[-1, K, H, W]``
      (segmentation); classifiers also give ``probabilities`` (softmax with the checkpoint's temperature, as
      ``/classify`` reports them).

Every row of a request becomes one request of the model's batcher, so tensors from KServe clients, images from
``/segment`` and ``/classify`` share batches and the same queue limits. Errors are the service's problem+json
bodies with the protocol's ``error`` member added (``app.errors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.contract import ModelInput, Runner
from app.errors import BadRequest, InvalidRequest, Problem
from app.registry import ModelRegistry, ModelVersion
from app.routes import RegistryDep, first_failure_raised, until_disconnected
from app.schemas import problem_responses
from models import __version__
from models.classifier import probabilities

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_EXTENSION = "binary_tensor_data"
INPUT_NAME = "input"
LOGITS = "logits"
PROBABILITIES = "probabilities"
# Most rows in one infer request (each is one image of the model's batcher).
MAX_ROWS = 64

# The protocol's data types that a model input may arrive in, as numpy types; the network takes float32.
DATATYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
}


class TensorParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    binary_data_size: int | None = Field(default=None, ge=0)
    binary_data: bool | None = None


class RequestInput(BaseModel):
    """One input tensor of an infer request (JSON ``data`` row-major, or binary when ``binary_data_size``)."""

    name: str
    shape: list[int]
    datatype: str
    parameters: TensorParameters | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: TensorParameters | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


def _served_version(registry: ModelRegistry, name: str, version: str | None) -> ModelVersion:
    """The loaded version of model ``name`` (the serving one when ``version`` is None), whatever its task.

    Raises:
        NotReady: models are still loading.
        ModelNotFound, ModelUnavailable, VersionNotFound: no such model, a model that failed, no such version.
    """
    return registry.resolve(None, name, version)


def _loaded_versions(registry: ModelRegistry, name: str) -> list[str]:
    handle = registry.models.get(name)
    return [v.version for v in handle.versions] if handle is not None else []


def _input_shape(runner: Runner[Any]) -> list[int]:
    height, width = runner.spec.img_size
    return [-1, runner.spec.in_channels, height, width]


def _output_shapes(runner: Runner[Any]) -> dict[str, list[int]]:
    classes = len(runner.classes)
    if runner.task == "segmentation":
        return {LOGITS: [-1, classes, *runner.spec.img_size]}
    return {LOGITS: [-1, classes], PROBABILITIES: [-1, classes]}


def model_metadata(served: ModelVersion, versions: list[str]) -> dict[str, Any]:
    """The protocol's model metadata, with MedServe's preprocessing and classes as parameters.

    ``versions``: every loaded version of the model, the serving one first (``MEDSERVE_KEEP_VERSIONS``).
    """
    runner = served.runner
    spec = runner.spec
    return {
        "name": served.name,
        "versions": versions,
        "platform": "pytorch",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": _input_shape(runner)}],
        "outputs": [
            {"name": name, "datatype": "FP32", "shape": shape}
            for name, shape in _output_shapes(runner).items()
        ],
        "parameters": {
            "task": runner.task,
            "classes": runner.classes,
            "preprocessing": {
                "intensity": runner.intensity,
                "resize": spec.resize,
                "img_size": list(spec.img_size),
                "working_size": list(spec.working_size) if spec.working_size else None,
                "in_channels": spec.in_channels,
                "mean": spec.mean,
                "std": spec.std,
                "formula": "(pixel in [0, 1] - mean[c]) / std[c]",
            },
        },
    }


# -- request and response bodies -------------------------------------------------------------------------


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError as exc:
        raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from exc
    if not 0 <= length <= len(body):
        raise BadRequest(f"{HEADER_LENGTH}={length} does not fit the {len(body)}-byte body")
    return body[:length], body[length:]


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """The JSON part of an infer request, validated, and the binary tensor data that follows it.

    Raises:
        BadRequest: not JSON, or a header length that does not fit.
        InvalidRequest: JSON that is not an infer request (the errors listed).
    """
    header, binary = _split_body(body, header_length)
    try:
        return InferRequest.model_validate_json(header), binary
    except ValidationError as exc:
        if any(error["type"] == "json_invalid" for error in exc.errors()):
            raise BadRequest("the infer request is not valid JSON") from exc
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'body'}: {error['msg']}" for error in exc.errors()
        )
        raise InvalidRequest(f"not an infer request: {problems}") from exc


def input_tensor(request: InferRequest, binary: bytes, expected: Sequence[int]) -> np.ndarray:
    """The request's one input as float32 (N, C, H, W), checked against the model's ``expected`` shape.

    Raises:
        InvalidRequest: a missing or unknown input, a wrong data type, shape or size.
    """
    tensors = {item.name: item for item in request.inputs}
    unknown = sorted(set(tensors) - {INPUT_NAME})
    if unknown or INPUT_NAME not in tensors:
        raise InvalidRequest(f"the model takes one input named {INPUT_NAME!r}; got {sorted(tensors)}")
    item = tensors[INPUT_NAME]
    dtype = DATATYPES.get(item.datatype)
    if dtype is None:
        raise InvalidRequest(f"input datatype must be one of {sorted(DATATYPES)}, got {item.datatype!r}")
    shape = tuple(item.shape)
    if len(shape) != len(expected) or any(e != -1 and s != e for s, e in zip(shape, expected, strict=True)):
        raise InvalidRequest(f"input shape must be {list(expected)} (-1: any), got {list(shape)}")
    if not 1 <= shape[0] <= MAX_ROWS:
        raise InvalidRequest(f"an infer request takes 1 to {MAX_ROWS} rows, got {shape[0]}")
    count = int(np.prod(shape))
    size = item.parameters.binary_data_size if item.parameters is not None else None
    if size is not None:
        if size != count * dtype.itemsize or size != len(binary):
            raise InvalidRequest(
                f"binary input of {size} bytes (body has {len(binary)}) does not hold {list(shape)} "
                f"{item.datatype} values ({count * dtype.itemsize} bytes)"
            )
        values = np.frombuffer(binary, dtype=dtype)
    else:
        if binary:
            raise InvalidRequest("binary data follows the header but no input declares binary_data_size")
        if item.data is None:
            raise InvalidRequest(f"input {INPUT_NAME!r} has neither data nor binary_data_size")
        try:
            values = np.asarray(item.data, dtype=dtype).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"input {INPUT_NAME!r}: data must be numbers") from exc
        if values.size != count:
            raise InvalidRequest(f"input {INPUT_NAME!r} has {values.size} values for shape {list(shape)}")
    array = values.reshape(shape).astype(np.float32)
    if not np.isfinite(array).all():
        raise InvalidRequest(f"input {INPUT_NAME!r} holds NaN or infinite values")
    return array


def requested_outputs(request: InferRequest, available: Sequence[str]) -> list[tuple[str, bool]]:
    """(name, as binary) of each output to return; all outputs as JSON when the request names none.

    Raises:
        InvalidRequest: an output the model does not have.
    """
    binary_default = bool((request.parameters or {}).get("binary_data_output", False))
    if not request.outputs:
        return [(name, binary_default) for name in available]
    chosen = []
    for output in request.outputs:
        if output.name not in available:
            raise InvalidRequest(f"unknown output {output.name!r}; the model has {list(available)}")
        binary = (
            output.parameters.binary_data if output.parameters and output.parameters.binary_data else False
        )
        chosen.append((output.name, bool(binary) or binary_default))
    return chosen


def infer_response(
    served: ModelVersion,
    request_id: str | None,
    tensors: dict[str, np.ndarray],
    outputs: list[tuple[str, bool]],
) -> Response:
    """The infer answer: JSON, or the JSON header followed by the binary outputs asked for as binary."""
    runner = served.runner
    entries = []
    chunks = []
    for name, binary in outputs:
        array = np.ascontiguousarray(tensors[name], dtype="<f4")
        entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if binary:
            data = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    body: dict[str, Any] = {"model_name": served.name, "model_version": runner.version, "outputs": entries}
    if request_id is not None:
        body["id"] = request_id
    headers = {"X-Model-Name": served.name, "X-Model-Version": runner.version}
    if not chunks:
        return JSONResponse(body, headers=headers)
    header = json.dumps(body, separators=(",", ":")).encode()
    headers[HEADER_LENGTH] = str(len(header))
    return Response(header + b"".join(chunks), media_type="application/octet-stream", headers=headers)


# -- routes ------------------------------------------------------------------------------------------------

READINESS = {"type": "object", "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}}
READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "not ready, or no such model or version",
        "content": {"application/json": {"schema": READINESS}},
    }
}
METADATA_RESPONSES = problem_responses(404, 503)
INFER_RESPONSES = problem_responses(400, 404, 413, 422, 500, 503, 504)

NamePath = Annotated[str, Path(description="model name (checkpoint file stem)")]
VersionPath = Annotated[str, Path(description="model version (content hash, see GET /models)")]


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "medserve", "version": __version__, "extensions": [BINARY_EXTENSION]}


@router.get("/health/live", summary="Server liveness")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server readiness", responses={503: {"description": "not ready"}})
async def server_ready(request: Request) -> JSONResponse:
    registry: ModelRegistry | None = getattr(request.app.state, "registry", None)
    ready = registry is not None and registry.ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


async def _model_ready(registry: ModelRegistry, name: str, version: str | None) -> JSONResponse:
    try:
        _served_version(registry, name, version)
    except Problem:
        return JSONResponse({"name": name, "ready": False}, status_code=400)
    return JSONResponse({"name": name, "ready": True})


@router.get("/models/{name}/ready", summary="Model readiness", responses=READY_RESPONSES)
async def model_ready(name: NamePath, registry: RegistryDep) -> JSONResponse:
    return await _model_ready(registry, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready", summary="Model version readiness", responses=READY_RESPONSES
)
async def model_version_ready(name: NamePath, version: VersionPath, registry: RegistryDep) -> JSONResponse:
    return await _model_ready(registry, name, version)


@router.get("/models/{name}", summary="Model metadata", responses=METADATA_RESPONSES)
async def get_model_metadata(name: NamePath, registry: RegistryDep) -> dict[str, Any]:
    return model_metadata(_served_version(registry, name, None), _loaded_versions(registry, name))


@router.get(
    "/models/{name}/versions/{version}", summary="Model version metadata", responses=METADATA_RESPONSES
)
async def get_model_version_metadata(
    name: NamePath, version: VersionPath, registry: RegistryDep
) -> dict[str, Any]:
    return model_metadata(_served_version(registry, name, version), _loaded_versions(registry, name))


async def _infer(request: Request, registry: ModelRegistry, name: str, version: str | None) -> Response:
    served = _served_version(registry, name, version)
    runner, batcher = served.runner, served.batcher
    with contextlib.ExitStack() as places:
        # One place before the body is read (refused at once, 503, when the queue is full), one more per row.
        reservations = [places.enter_context(batcher.reserve())]
        body = await request.body()
        infer, binary = parse_infer_request(body, request.headers.get(HEADER_LENGTH))
        outputs = requested_outputs(infer, list(_output_shapes(runner)))
        array = input_tensor(infer, binary, _input_shape(runner))
        rows = [ModelInput.network_input(torch.from_numpy(row)) for row in array]
        reservations += [places.enter_context(batcher.reserve()) for _ in rows[1:]]
        submitted = asyncio.gather(
            *(reservation.submit(row) for reservation, row in zip(reservations, rows, strict=True)),
            return_exceptions=True,
        )
        logits = np.stack(first_failure_raised(await until_disconnected(request, submitted)))
    tensors = {LOGITS: logits}
    if runner.task == "classification":
        temperature = float(getattr(runner, "temperature", 1.0))
        tensors[PROBABILITIES] = probabilities(torch.from_numpy(logits), temperature).numpy()
    return infer_response(served, infer.id, tensors, outputs)


INFER_DOC = """Runs the model on normalised input tensors (see the model's metadata for the preprocessing).
JSON tensors, or the binary tensor data extension (`Inference-Header-Content-Length`)."""


@router.post("/models/{name}/infer", summary="Inference", description=INFER_DOC, responses=INFER_RESPONSES)
async def infer(name: NamePath, request: Request, registry: RegistryDep) -> Response:
    return await _infer(request, registry, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference on a version",
    description=INFER_DOC,
    responses=INFER_RESPONSES,
)
async def infer_version(
    name: NamePath, version: VersionPath, request: Request, registry: RegistryDep
) -> Response:
    return await _infer(request, registry, name, version)
