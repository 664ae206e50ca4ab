"""Inference runtimes of a MedServe network: PyTorch eager, ONNX Runtime and OpenVINO, and the ONNX artefact cache.

Every runtime is built into an ``Engine``: a callable from the normalised batch (B, C, H, W) float32 that
``models.preprocessing.prepare`` produces to the network's logits, float32 on the CPU, exactly what
``models.inference.forward`` returns for the PyTorch model. Which engine serves a model, and whether its outputs
are close enough to PyTorch's, is decided by the service (``app.runtimes``); this module only builds them.

* ``torch_engine``: PyTorch eager, channels_last (the service's default layout) or contiguous.
* ``onnxruntime_engine``: ONNX Runtime on the model's ONNX export: ``CPUExecutionProvider`` (intra-op threads =
  the model's thread count, graph optimisation level "all"), or ``CUDAExecutionProvider`` /
  ``TensorrtExecutionProvider`` when the installed ONNX Runtime has them.
* ``openvino_engine``: OpenVINO's CPU plugin on the same export, at fp32 precision (``INFERENCE_PRECISION_HINT``
  f32, which also keeps it from running bf16 on CPUs that have AMX), with H and W fixed at the model's input
  size and the batch dynamic. OpenVINO is an optional dependency (``pip install 'medserve[openvino]'``).

ONNX exports are cached (``onnx_artefact``): ``<cache>/<name>-<version>.onnx`` with the export's JSON beside
it. The checkpoint version is a content hash of weights and metadata, so an entry can only belong to the same
model; an entry is reused when its JSON names that version and its SHA-256 matches the file, and rebuilt
otherwise (missing, truncated or corrupt).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.checkpoint import CheckpointMetadata
from models.export import (
    EXPORT_SCHEMA,
    INPUT_NAME,
    OUTPUT_NAME,
    ExportError,
    export_model,
    file_sha256,
)
from models.inference import Precision, autocast_context, forward

logger = logging.getLogger("medserve.runtimes")

Engine = Callable[[torch.Tensor], torch.Tensor]
"""Normalised batch (B, C, H, W) float32 -> logits float32 on the CPU."""

# The MEDSERVE_RUNTIME values that name one runtime (``auto`` picks among them).
RUNTIMES = ("torch", "onnxruntime", "openvino")
# ONNX Runtime's execution providers for CUDA, by candidate name, fastest first as NVIDIA documents them.
ORT_CUDA_PROVIDERS = {
    "onnxruntime-tensorrt": "TensorrtExecutionProvider",
    "onnxruntime-cuda": "CUDAExecutionProvider",
}
# ONNX Runtime's intra-op threads spin between runs by default; on a CPU shared with the decode threads that
# takes their cores, as OpenMP's active wait does for PyTorch (the service sets OMP_WAIT_POLICY=PASSIVE).
ORT_ALLOW_SPINNING = "0"
CACHE_SUFFIX = ".onnx"


class RuntimeUnavailable(Exception):
    """A runtime that cannot be built here: not installed, no such provider, or the export failed."""


def torch_engine(
    model: nn.Module, device: torch.device, precision: Precision = "fp32", *, channels_last: bool = True
) -> Engine:
    """PyTorch eager on ``device`` (``precision``: autocast on CUDA). ``channels_last=False`` runs a contiguous
    copy of the model, contiguous inputs too (the model passed in is left as it is)."""
    if channels_last:
        return lambda batch: forward(model, batch, device, precision)
    contiguous = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()

    def run(batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(device, non_blocking=True).contiguous()
        with torch.inference_mode(), autocast_context(device, precision):
            out = contiguous(x)
        return out.float().cpu()

    return run


def onnxruntime_engine(
    path: Path, *, threads: int, provider: str = "CPUExecutionProvider", device_id: int = 0
) -> Engine:
    """An ONNX Runtime session of the export at ``path`` with ``provider``.

    Raises:
        RuntimeUnavailable: the provider is not in this ONNX Runtime, or the session fell back to another.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        raise RuntimeUnavailable(
            f"this ONNX Runtime ({ort.__version__}) has no {provider} (available: {', '.join(available)}); "
            "CUDA and TensorRT need the onnxruntime-gpu package"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", ORT_ALLOW_SPINNING)
    providers: list[Any] = [provider]
    if provider != "CPUExecutionProvider":
        providers = [(provider, {"device_id": device_id})]
        if provider == "TensorrtExecutionProvider":  # nodes TensorRT cannot take run on CUDA
            providers.append(("CUDAExecutionProvider", {"device_id": device_id}))
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for invalid models and providers
        raise RuntimeUnavailable(f"ONNX Runtime cannot load the export: {type(exc).__name__}: {exc}") from exc
    if provider not in session.get_providers():
        raise RuntimeUnavailable(f"ONNX Runtime fell back to {session.get_providers()} instead of {provider}")

    def run(batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))

    return run


def openvino_available() -> str | None:
    """The installed OpenVINO's version, None when it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.get_version())


def openvino_engine(
    path: Path, *, threads: int, input_shape: tuple[int, int, int], cache_dir: Path | None = None
) -> Engine:
    """OpenVINO's CPU plugin on the export at ``path``, fp32, input (batch, C, H, W) with ``input_shape`` =
    (C, H, W) fixed and the batch dynamic; ``cache_dir`` keeps OpenVINO's compiled blobs between starts.

    Raises:
        RuntimeUnavailable: OpenVINO is not installed, or cannot read or compile the export.
    """
    try:
        import openvino as ov
    except ImportError as exc:
        raise RuntimeUnavailable("OpenVINO is not installed (pip install 'medserve[openvino]')") from exc
    core = ov.Core()
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": max(1, threads),
    }
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    try:
        model = core.read_model(str(path))
        channels, height, width = input_shape
        model.reshape([-1, channels, height, width])
        compiled = core.compile_model(model, "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
        raise RuntimeUnavailable(f"OpenVINO cannot compile the export: {type(exc).__name__}: {exc}") from exc
    request = compiled.create_infer_request()

    def run(batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        request.infer({0: x})
        # The output tensor is OpenVINO's buffer, reused by the next call: copy it out.
        return torch.from_numpy(np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True))

    return run


@dataclass(frozen=True)
class OnnxArtefact:
    """The ONNX export a runtime is built from.

    Attributes:
        path: the ``.onnx`` file.
        cached: reused from the cache (no export at this start).
        seconds: how long exporting took (0 when cached).
        rebuilt: why a cache entry was not reused (None: there was none, or it was reused).
    """

    path: Path
    cached: bool
    seconds: float
    rebuilt: str | None = None


def cache_path(cache_dir: Path, name: str, version: str) -> Path:
    """Where the ONNX export of model ``name`` at ``version`` is cached."""
    return cache_dir / f"{name}-{version}{CACHE_SUFFIX}"


def cached_entry_problem(path: Path, version: str) -> str | None:
    """Why the cache entry at ``path`` cannot be reused for ``version`` (None: it can)."""
    sidecar = path.with_name(path.name + ".json")
    if not path.is_file():
        return None if not sidecar.exists() else "the export file is missing"
    try:
        data = json.loads(sidecar.read_text())
        export = data["export"]
        expected_sha = str(export["sha256"])
        stored_version = str(data["version"])
        schema = int(export["schema"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its JSON is unreadable ({type(exc).__name__})"
    if stored_version != version:
        return f"it holds version {stored_version}, not {version}"
    if schema != EXPORT_SCHEMA:
        return f"export schema {schema}, not {EXPORT_SCHEMA}"
    if file_sha256(path) != expected_sha:
        return "its SHA-256 does not match its JSON (corrupt or changed)"
    return None


def onnx_artefact(
    model: nn.Module,
    metadata: CheckpointMetadata,
    cache_dir: Path,
    name: str,
    *,
    source: Path | None = None,
) -> OnnxArtefact:
    """The ONNX export of ``model``: the cache entry when it is valid, else a fresh export written there.

    The export is made from a contiguous CPU copy, so ``model`` (in use on its device) is not touched. It is
    not checked against PyTorch here: the service verifies every runtime built on it against the served
    tolerances.

    Raises:
        RuntimeUnavailable: the model cannot be exported to ONNX.
    """
    path = cache_path(cache_dir, name, metadata.version)
    problem = cached_entry_problem(path, metadata.version)
    if path.is_file() and problem is None:
        return OnnxArtefact(path, cached=True, seconds=0.0)
    if problem is not None:
        logger.warning("runtime cache entry %s is rebuilt: %s", path.name, problem)
    started = time.perf_counter()
    with _cpu_copy(model) as cpu_model:
        try:
            export_model(cpu_model, metadata, path, "onnx", verify=False, source=source)
        except ExportError as exc:
            raise RuntimeUnavailable(str(exc)) from exc
    return OnnxArtefact(path, cached=False, seconds=time.perf_counter() - started, rebuilt=problem)


@contextlib.contextmanager
def _cpu_copy(model: nn.Module) -> Iterator[nn.Module]:
    module = getattr(model, "_orig_mod", model)  # the eager module under torch.compile
    cpu_model = copy.deepcopy(module).to("cpu").to(memory_format=torch.contiguous_format).eval()
    try:
        yield cpu_model
    finally:
        del cpu_model
