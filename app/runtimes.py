"""The fastest verified runtime per model (``MEDSERVE_RUNTIME``): candidates, building, verification and timing.

At load, after the checkpoint is read and before the warm-up batch-size tuning, ``select_runtime`` runs in the
model's own worker thread:

1. **Candidates** (``MEDSERVE_RUNTIME=auto``): on the CPU, PyTorch eager in channels_last (the service's
   default) and contiguous layout, ONNX Runtime (``CPUExecutionProvider``) and OpenVINO when installed; on CUDA,
   PyTorch with ``MEDSERVE_PRECISION`` (plus fp32 when that is reduced) and ONNX Runtime's CUDA and TensorRT
   providers when the installed ONNX Runtime has them. ``onnxruntime`` or ``openvino`` keeps that runtime's
   candidates only; ``torch`` skips all of this (the service as before: PyTorch eager, channels_last).
2. **Build**: ONNX candidates share one export, cached by model version (``models.runtimes.onnx_artefact``,
   in ``MEDSERVE_RUNTIME_CACHE``).
3. **Verify** against fp32 PyTorch eager on the warm-up batches (the model's input shape, at every batch size
   timed: the warm-up image and seeded N(0, 1) noise in normalised units): segmentation masks (arg-max of the
   logits) must agree on at least ``MASK_AGREEMENT`` of the pixels; classification probabilities (softmax of
   logits / temperature) within ``PROBABILITY_ATOL``; other tasks' logits within ``LOGITS_ATOL`` +
   ``LOGITS_RTOL`` x |reference|. A candidate that fails is never used, and the log and ``GET /models`` say why.
4. **Time** each verified candidate at the batch sizes the warm-up autotune tries (the best of
   ``TIMED_RUNS`` runs after an untimed one) and serve the fastest at each size (``RuntimeDispatch``).

An explicit runtime that cannot be built, or fails verification, fails the model's load (status ``failed``
with the reason in ``/models``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from app.contract import Runner
from app.settings import Settings, env_name
from models.classifier import probabilities
from models.runtimes import (
    ORT_CUDA_PROVIDERS,
    Engine,
    OnnxArtefact,
    RuntimeUnavailable,
    onnx_artefact,
    onnxruntime_engine,
    openvino_available,
    openvino_engine,
    torch_engine,
)

logger = logging.getLogger("medserve.runtimes")

MASK_AGREEMENT = 0.999
PROBABILITY_ATOL = 1e-3
LOGITS_ATOL = 1e-4
LOGITS_RTOL = 1e-3
TIMED_RUNS = 2
# Larger batches stop being timed once the best runtime's throughput falls below this fraction of the best so
# far at STOP_PATIENCE sizes in a row (one slow size can be a moment's load on a shared machine).
STOP_FRACTION = 0.9
STOP_PATIENCE = 2
CACHE_DIR_NAME = ".medserve-cache"

Status = Literal["pending", "unavailable", "rejected", "verified"]
ModelCall = Callable[..., Awaitable[Any]]


class RuntimeSelectionError(Exception):
    """The runtime ``MEDSERVE_RUNTIME`` names cannot serve this model (message in words, for ``/models``).

    ``selection``: the candidates tried and why each was not used (None when none was tried).
    """

    def __init__(self, message: str, selection: RuntimeSelection | None = None) -> None:
        super().__init__(message)
        self.selection = selection


@dataclass
class Candidate:
    """One way to run the model, and what became of it."""

    name: str
    runtime: str  # the MEDSERVE_RUNTIME value it belongs to
    description: str
    build: Callable[[], Engine] | None
    unavailable: str | None = None  # why it cannot be built here (build is None)
    same_as_reference: bool = False  # the reference computation itself: its outputs are the reference
    export: SharedExport | None = None  # the ONNX export it is built on
    status: Status = "pending"
    reason: str | None = None
    engine: Engine | None = None
    verification: dict[str, Any] = field(default_factory=dict)
    ms: dict[int, float] = field(default_factory=dict)
    build_seconds: float | None = None
    artefact: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.name,
            "runtime": self.runtime,
            "description": self.description,
            "status": self.status,
        }
        if self.reason is not None:
            info["reason"] = self.reason
        if self.verification:
            info["verification"] = self.verification
        info["ms_per_batch"] = {str(size): round(ms, 3) for size, ms in sorted(self.ms.items())}
        if self.build_seconds is not None:
            info["build_seconds"] = round(self.build_seconds, 3)
        if self.artefact is not None:
            info["artefact"] = self.artefact
        return info


@dataclass
class RuntimeSelection:
    """Which runtime serves a model at each batch size, and every candidate's verification and timings."""

    setting: str
    chosen: dict[int, str]
    candidates: list[Candidate] = field(default_factory=list)
    note: str | None = None
    cache_dir: Path | None = None

    def describe(self) -> dict[str, Any]:
        """What ``GET /models`` shows under ``runtime``."""
        info: dict[str, Any] = {
            "setting": self.setting,
            "chosen": {str(size): name for size, name in sorted(self.chosen.items())},
            "serves": sorted(set(self.chosen.values())),
        }
        if self.note is not None:
            info["note"] = self.note
        if self.candidates:
            info["tolerance"] = TOLERANCE
            info["candidates"] = [c.describe() for c in self.candidates]
            info["timings_ms"] = {c.name: c.describe()["ms_per_batch"] for c in self.candidates if c.ms}
        return info


TOLERANCE = {
    "segmentation": {"mask_agreement_at_least": MASK_AGREEMENT},
    "classification": {"probability_max_abs_diff": PROBABILITY_ATOL},
    "other": {"logits_atol": LOGITS_ATOL, "logits_rtol": LOGITS_RTOL},
}


class RuntimeDispatch:
    """The engine a runner calls: the runtime chosen for the batch size, PyTorch for any other input shape.

    A batch of ``n`` runs on the choice for the smallest timed size >= ``n`` (the largest beyond them). Inputs
    of another (C, H, W) than the one verified (e.g. a tensor sent by a client) run on ``fallback``.
    """

    def __init__(self, engines: dict[int, Engine], shape: tuple[int, int, int], fallback: Engine) -> None:
        if not engines:
            raise ValueError("no engine to dispatch to")
        self.sizes = sorted(engines)
        self.engines = engines
        self.shape = shape
        self.fallback = fallback

    def engine_for(self, batch_size: int) -> Engine:
        for size in self.sizes:
            if batch_size <= size:
                return self.engines[size]
        return self.engines[self.sizes[-1]]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if tuple(batch.shape[1:]) != self.shape:
            return self.fallback(batch)
        return self.engine_for(int(batch.shape[0]))(batch)


def resolve_cache_dir(settings: Settings) -> Path:
    """Where built artefacts go: ``MEDSERVE_RUNTIME_CACHE``, else ``<MODEL_DIR>/.medserve-cache``, else (a
    read-only model directory, as the image mounts it) ``$XDG_CACHE_HOME/medserve/runtimes``, else a temporary
    directory (nothing cached across starts; logged)."""
    tried = []
    if settings.runtime_cache is not None:
        tried.append(settings.runtime_cache)
    else:
        tried.append(settings.model_dir / CACHE_DIR_NAME)
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        tried.append(Path(xdg) / "medserve" / "runtimes")
    for directory in tried:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            if directory != tried[0]:
                logger.info("runtime cache in %s (%s is not writable)", directory, tried[0])
            return directory
    fallback = Path(tempfile.mkdtemp(prefix="medserve-runtimes-"))
    logger.warning(
        "no writable runtime cache (%s): exports go to %s and are redone at every start",
        ", ".join(str(d) for d in tried),
        fallback,
    )
    return fallback


class SharedExport:
    """The one ONNX export every ONNX candidate of a model is built on: made (or read from the cache) on first
    use; a failure is remembered and raised for each."""

    def __init__(self, runner: Runner[Any], cache_dir: Path, source: Path | None) -> None:
        self.runner = runner
        self.cache_dir = cache_dir
        self.source = source
        self.artefact: OnnxArtefact | None = None
        self.error: str | None = None

    def get(self) -> OnnxArtefact:
        if self.error is not None:
            raise RuntimeUnavailable(self.error)
        if self.artefact is None:
            try:
                self.artefact = onnx_artefact(
                    self.runner.model,
                    self.runner.metadata,
                    self.cache_dir,
                    self.runner.name,
                    source=self.source,
                )
            except RuntimeUnavailable as exc:
                self.error = str(exc)
                raise
        return self.artefact

    def describe(self) -> dict[str, Any] | None:
        if self.artefact is None:
            return None
        info: dict[str, Any] = {
            "file": self.artefact.path.name,
            "cached": self.artefact.cached,
            "export_seconds": round(self.artefact.seconds, 3),
        }
        if self.artefact.rebuilt is not None:
            info["rebuilt_because"] = self.artefact.rebuilt
        return info


def plan_candidates(
    runner: Runner[Any],
    settings: Settings,
    device: torch.device,
    threads: int,
    cache_dir: Path,
    source: Path | None = None,
) -> list[Candidate]:
    """The candidates of ``MEDSERVE_RUNTIME`` (``auto``: all) on ``device``, not built yet."""
    export = SharedExport(runner, cache_dir, source)
    shape = input_shape(runner)
    model = runner.model
    candidates: list[Candidate] = []
    if device.type == "cuda":
        precision = settings.precision
        candidates.append(
            Candidate(
                "torch",
                "torch",
                f"PyTorch eager on {device}, {precision}, channels_last",
                lambda: torch_engine(model, device, precision),
                same_as_reference=precision == "fp32" and not settings.compile,
            )
        )
        if precision != "fp32":
            candidates.append(
                Candidate(
                    "torch-fp32",
                    "torch",
                    f"PyTorch eager on {device}, fp32, channels_last",
                    lambda: torch_engine(model, device, "fp32"),
                    same_as_reference=not settings.compile,
                )
            )
        for name, provider in ORT_CUDA_PROVIDERS.items():
            candidates.append(
                Candidate(
                    name,
                    "onnxruntime",
                    f"ONNX Runtime, {provider}, device {device.index or 0}",
                    _ort_build(export, threads, provider, device.index or 0),
                    export=export,
                )
            )
        if settings.runtime == "openvino":
            raise RuntimeSelectionError(
                f"{runner.name}: {env_name('runtime')}=openvino runs on the CPU, but "
                f"{env_name('device')} is {device}; use {env_name('device')}=cpu or another runtime"
            )
    else:
        candidates.append(
            Candidate(
                "torch",
                "torch",
                "PyTorch eager on the CPU, fp32, channels_last",
                lambda: torch_engine(model, device),
                same_as_reference=not settings.compile,
            )
        )
        candidates.append(
            Candidate(
                "torch-contiguous",
                "torch",
                "PyTorch eager on the CPU, fp32, contiguous (NCHW)",
                lambda: torch_engine(getattr(model, "_orig_mod", model), device, channels_last=False),
            )
        )
        candidates.append(
            Candidate(
                "onnxruntime",
                "onnxruntime",
                f"ONNX Runtime, CPUExecutionProvider, {threads} intra-op threads, graph optimisation all",
                _ort_build(export, threads, "CPUExecutionProvider", 0),
                export=export,
            )
        )
        version = openvino_available()
        openvino = Candidate(
            "openvino",
            "openvino",
            f"OpenVINO {version or ''} CPU plugin, fp32, {threads} threads".replace("  ", " "),
            _openvino_build(export, threads, shape, cache_dir / "openvino") if version else None,
            unavailable=None if version else "OpenVINO is not installed (pip install 'medserve[openvino]')",
            export=export,
        )
        candidates.append(openvino)
    if settings.runtime != "auto":
        candidates = [c for c in candidates if c.runtime == settings.runtime]
    return candidates


def _ort_build(export: SharedExport, threads: int, provider: str, device_id: int) -> Callable[[], Engine]:
    return lambda: onnxruntime_engine(
        export.get().path, threads=threads, provider=provider, device_id=device_id
    )


def _openvino_build(
    export: SharedExport, threads: int, shape: tuple[int, int, int], blobs: Path
) -> Callable[[], Engine]:
    return lambda: openvino_engine(export.get().path, threads=threads, input_shape=shape, cache_dir=blobs)


def input_shape(runner: Runner[Any]) -> tuple[int, int, int]:
    """(C, H, W) of every forward pass the runner makes: windows of the training size (tile / fit), or images
    resized to it."""
    height, width = (int(v) for v in runner.spec.img_size)
    return runner.spec.in_channels, height, width


def verification_batch(runner: Runner[Any], size: int) -> torch.Tensor:
    """The warm-up batch of ``size``: seeded N(0, 1) noise (normalised units: the spread of real images), the
    last of two or more being the warm-up image itself (zeros once normalised: flat, so it only catches gross
    errors, and a batch of one is noise)."""
    channels, height, width = input_shape(runner)
    generator = torch.Generator().manual_seed(1000 + size)
    batch = torch.randn((size, channels, height, width), generator=generator)
    if size > 1:
        batch[-1] = 0.0
    return batch


def compare(runner: Runner[Any], reference: torch.Tensor, got: torch.Tensor) -> tuple[bool, float, str]:
    """Whether ``got`` passes for ``reference`` under the task's tolerance: (passed, the figure, its name)."""
    if tuple(got.shape) != tuple(reference.shape):
        raise ValueError(f"output shape {list(got.shape)}, PyTorch {list(reference.shape)}")
    if not bool(torch.isfinite(got).all()):
        raise ValueError("non-finite outputs")
    if runner.task == "segmentation":
        agreement = float((got.argmax(dim=1) == reference.argmax(dim=1)).float().mean())
        return agreement >= MASK_AGREEMENT, agreement, "mask_agreement"
    if runner.task == "classification":
        temperature = float(getattr(runner, "temperature", 1.0))
        diff = float((probabilities(got, temperature) - probabilities(reference, temperature)).abs().max())
        return diff <= PROBABILITY_ATOL, diff, "probability_max_abs_diff"
    excess = (got - reference).abs() - LOGITS_RTOL * reference.abs()
    worst = float((got - reference).abs().max())
    return bool((excess <= LOGITS_ATOL).all()), worst, "logits_max_abs_diff"


def _timed(engine: Engine, batch: torch.Tensor) -> float:
    with torch.inference_mode():
        started = time.perf_counter()
        engine(batch)
        return time.perf_counter() - started


def _build(candidate: Candidate) -> Engine:
    assert candidate.build is not None
    with torch.inference_mode():
        return candidate.build()


def _run(engine: Engine, batch: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return engine(batch)


async def select_runtime(
    runner: Runner[Any],
    call: ModelCall,
    settings: Settings,
    device: torch.device,
    sizes: Sequence[int],
    *,
    source: Path | None = None,
) -> RuntimeSelection:
    """Builds, verifies and times the candidates of ``settings.runtime`` in the model's thread (``call``),
    installs the fastest verified one per batch size on ``runner`` (``runner.engine``) and returns the record.

    Raises:
        RuntimeSelectionError: an explicit runtime that cannot be built or fails verification.
    """
    setting = settings.runtime
    if setting == "torch":
        return RuntimeSelection(setting, dict.fromkeys(sizes, "torch"))
    if runner.ood_source is not None:
        # The out-of-distribution features are read by a forward hook on the PyTorch module (models.ood):
        # another runtime would answer without them.
        note = "the model has out-of-distribution statistics, read from PyTorch's forward pass: PyTorch eager serves"
        logger.info("model %s: %s", runner.name, note)
        return RuntimeSelection(setting, dict.fromkeys(sizes, "torch"), note=note)
    if setting == "auto" and not settings.warmup:
        note = f"{env_name('warmup')} is off: no runtime was verified or timed, PyTorch eager serves"
        logger.info("model %s: %s", runner.name, note)
        return RuntimeSelection(setting, dict.fromkeys(sizes, "torch"), note=note)
    cache_dir = await call(resolve_cache_dir, settings)
    threads = int(await call(torch.get_num_threads))
    candidates = plan_candidates(runner, settings, device, threads, cache_dir, source)
    if not candidates:
        raise RuntimeSelectionError(f"{runner.name}: no {setting} runtime exists on {device}")
    selection = RuntimeSelection(setting, {}, candidates, cache_dir=cache_dir)
    for candidate in candidates:
        await _build_candidate(runner, call, candidate)
    reference_engine = torch_engine(getattr(runner.model, "_orig_mod", runner.model), device, "fp32")
    best_rate = 0.0
    slower = 0
    timed_sizes = sizes if settings.warmup else sizes[:1]
    for size in timed_sizes:
        alive = [c for c in candidates if c.status == "pending" or c.status == "verified"]
        if not alive:
            break
        batch = verification_batch(runner, size)
        reference = await call(_run, reference_engine, batch)
        passed = [c for c in alive if await _verify(runner, call, c, batch, reference)]
        if not passed:
            continue
        # Timed in rounds, each candidate once per round: a load change on a shared machine then affects
        # every candidate alike instead of whichever happened to be timed during it.
        seconds: dict[str, list[float]] = {c.name: [] for c in passed}
        for _ in range(TIMED_RUNS):
            for candidate in passed:
                seconds[candidate.name].append(await call(_timed, candidate.engine, batch))
        for candidate in passed:
            candidate.ms[size] = 1000 * min(seconds[candidate.name])
        best_here = max(size / max(min(seconds[c.name]), 1e-9) for c in passed)
        slower = slower + 1 if best_here < best_rate * STOP_FRACTION else 0
        if slower >= STOP_PATIENCE:
            break  # clearly slower than a smaller batch, twice: larger batches will not pay either
        best_rate = max(best_rate, best_here)
    verified = [c for c in candidates if c.status == "verified"]
    for candidate in candidates:
        if candidate.status == "pending":  # verified at no size (e.g. all its runs stopped): not served
            candidate.status = "rejected"
            candidate.reason = candidate.reason or "not verified"
    if not verified:
        reasons = "; ".join(f"{c.name}: {c.reason}" for c in candidates)
        raise RuntimeSelectionError(
            f"{runner.name}: {env_name('runtime')}={setting} cannot serve it ({reasons})", selection
        )
    timed = sorted({size for c in verified for size in c.ms})
    for size in sizes:
        at = max([s for s in timed if s <= size], default=timed[0])
        fastest = min((c for c in verified if at in c.ms), key=lambda c: c.ms[at])
        selection.chosen[size] = fastest.name
    _install(runner, selection, device)
    logger.info(
        "model %s: runtime by batch size %s; ms per batch %s",
        runner.name,
        selection.describe()["chosen"],
        {c.name: c.describe()["ms_per_batch"] for c in verified},
    )
    return selection


async def _build_candidate(runner: Runner[Any], call: ModelCall, candidate: Candidate) -> None:
    if candidate.build is None:
        candidate.status, candidate.reason = "unavailable", candidate.unavailable
        logger.info("model %s: runtime %s unavailable: %s", runner.name, candidate.name, candidate.reason)
        return
    started = time.perf_counter()
    try:
        candidate.engine = await call(_build, candidate)
    except RuntimeUnavailable as exc:
        candidate.status, candidate.reason = "unavailable", str(exc)
        logger.warning("model %s: runtime %s unavailable: %s", runner.name, candidate.name, exc)
    except Exception as exc:  # a runtime's own failure while building: not served, reported
        candidate.status, candidate.reason = "unavailable", f"{type(exc).__name__}: {exc}"
        logger.warning("model %s: runtime %s cannot be built", runner.name, candidate.name, exc_info=exc)
    candidate.build_seconds = time.perf_counter() - started
    if candidate.export is not None:
        candidate.artefact = candidate.export.describe()


async def _verify(
    runner: Runner[Any], call: ModelCall, candidate: Candidate, batch: torch.Tensor, reference: torch.Tensor
) -> bool:
    """Runs ``candidate`` on ``batch`` (untimed: it also builds its kernels for the size) and compares with
    ``reference``; a candidate that fails is rejected for good."""
    assert candidate.engine is not None
    size = int(batch.shape[0])
    try:
        got = reference if candidate.same_as_reference else await call(_run, candidate.engine, batch)
        passed, figure, metric = compare(runner, reference, got)
    except Exception as exc:  # a runtime that fails on the batch is rejected like one that differs
        passed, figure, metric = False, float("nan"), "error"
        candidate.reason = f"batch {size}: {type(exc).__name__}: {exc}"
    worst = candidate.verification.get("worst")
    if metric != "error":
        worse = worst is None or (figure < worst if metric == "mask_agreement" else figure > worst)
        candidate.verification = {
            "metric": metric,
            "worst": figure if worse else worst,
            "threshold": MASK_AGREEMENT
            if metric == "mask_agreement"
            else PROBABILITY_ATOL
            if metric == "probability_max_abs_diff"
            else LOGITS_ATOL,
            "batch_sizes": [*candidate.verification.get("batch_sizes", []), size],
        }
    if not passed:
        if candidate.reason is None:
            candidate.reason = (
                f"verification failed at batch {size}: {metric} {figure:.6g} "
                f"(needs {'>=' if metric == 'mask_agreement' else '<='} "
                f"{candidate.verification['threshold']})"
            )
        candidate.status, candidate.engine = "rejected", None
        candidate.verification["passed"] = False
        logger.warning("model %s: runtime %s not used: %s", runner.name, candidate.name, candidate.reason)
        return False
    candidate.status = "verified"
    candidate.verification["passed"] = True
    return True


def _install(runner: Runner[Any], selection: RuntimeSelection, device: torch.device) -> None:
    """Puts the chosen engines on the runner and drops the others (their memory goes)."""
    by_name = {c.name: c for c in selection.candidates}
    chosen = set(selection.chosen.values())
    for candidate in selection.candidates:
        if candidate.name not in chosen:
            candidate.engine = None
    if chosen == {"torch"} and by_name["torch"].same_as_reference:
        runner.engine = None  # PyTorch eager as the runner runs it without a runtime: nothing to dispatch
        return
    engines = {size: by_name[name].engine for size, name in selection.chosen.items()}
    fallback = by_name["torch"].engine if "torch" in chosen else None
    runner.engine = RuntimeDispatch(
        {size: engine for size, engine in engines.items() if engine is not None},
        input_shape(runner),
        fallback or torch_engine(runner.model, device, runner.precision),
    )
