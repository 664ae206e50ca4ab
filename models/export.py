"""Export of a checkpoint to ONNX or TorchScript, for sites that serve with Triton, ONNX Runtime or LibTorch.

An exported file holds the network only: its input is the *normalised* image batch (B, C, H, W) float32 that
``models.preprocessing.prepare`` produces, and its output the raw logits: (B, K, H, W) for segmentation,
(B, K) for classification. Everything needed to feed it correctly (classes, preprocessing spec, version) is
written beside it as JSON (``<file>.json``): the checkpoint's metadata, readable with
``CheckpointMetadata.model_validate_json``, plus an ``export`` block describing the file, its tensors and the
check against PyTorch. The same JSON is embedded in the file itself (ONNX ``metadata_props`` / TorchScript
extra file ``medserve.json``).

Axes:
    * batch is always dynamic;
    * U-Net segmentation models (``resize="tile"``) also take any H, W >= 2**depth: the export wraps the network
      in ``PadToMultiple``, which pads with shape arithmetic the exporters record instead of a Python branch
      they would freeze at the example size;
    * classification models (``resize="resize"``) take the training size ``img_size`` only.

Every export is checked before it is moved into place: it is run (ONNX Runtime on CPU, or ``torch.jit.load``)
on random inputs of two shapes and compared with the PyTorch model; a mismatch raises ``ExportError`` and leaves
no file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import CheckpointMetadata, load_model

log = logging.getLogger(__name__)

ExportFormat = Literal["onnx", "torchscript"]
FORMATS: tuple[ExportFormat, ...] = ("onnx", "torchscript")
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
EXPORT_SCHEMA = 1
# ONNX protobufs cannot exceed 2 GiB; above this the weights go to an external ``<file>.data``.
_EXTERNAL_DATA_BYTES = 1_500_000_000


class ExportError(Exception):
    """An export that cannot be produced or whose outputs differ from the PyTorch model."""


class PadToMultiple(nn.Module):
    """Reflect-pads H and W up to a multiple of ``multiple``, runs ``model`` and crops the logits back.

    The U-Net already does this internally, but with a Python ``if`` that exporters evaluate once at the
    example size. Here the padding is always applied, its amount computed from the (symbolic) input size, so a
    single exported graph serves every size; the inner network then always sees a multiple and its own branch
    is constant. Reflect padding matches the U-Net's own choice for every H, W >= ``multiple``.

    Args:
        model: network mapping (B, C, H', W') -> (B, K, H', W') for H', W' multiples of ``multiple``.
        multiple: 2**depth of the U-Net.

    Shapes:
        (B, C, H, W) -> (B, K, H, W) for H, W >= ``multiple``.
    """

    def __init__(self, model: nn.Module, multiple: int) -> None:
        super().__init__()
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        self.model = model
        self.multiple = multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        padded_h = (h + self.multiple - 1) // self.multiple * self.multiple
        padded_w = (w + self.multiple - 1) // self.multiple * self.multiple
        x = F.pad(x, (0, padded_w - w, 0, padded_h - h), mode="reflect")
        return self.model(x)[..., :h, :w]


@dataclass(frozen=True)
class InputSpec:
    """What the exported graph accepts: channels, example size, and whether H/W are dynamic."""

    channels: int
    height: int
    width: int
    dynamic_hw: bool
    min_size: int = 1

    def shape(self) -> list[int | str]:
        """The input shape with symbolic names for dynamic axes, as written in the JSON."""
        if self.dynamic_hw:
            return ["batch", self.channels, "height", "width"]
        return ["batch", self.channels, self.height, self.width]

    def check_shapes(self) -> list[tuple[int, int, int, int]]:
        """Two input shapes to compare on: the example batch, and batch 1 at another size when H/W are dynamic.

        The second size is deliberately not a multiple of the U-Net's 2**depth, so the padding path is checked.
        """
        first = (2, self.channels, self.height, self.width)
        if not self.dynamic_hw:
            return [first, (1, self.channels, self.height, self.width)]
        return [first, (1, self.channels, self.height + 1, self.width + 3)]


@dataclass
class ExportResult:
    """Where an export went and how closely it matches the PyTorch model."""

    path: Path
    metadata_path: Path
    format: ExportFormat
    max_abs_diff: float | None
    sidecar: dict[str, Any] = field(repr=False)


def exportable(model: nn.Module, metadata: CheckpointMetadata) -> tuple[nn.Module, InputSpec]:
    """The module to export and its input spec.

    U-Net-like segmentation models (an integer ``depth`` attribute, tiled preprocessing) get dynamic H/W through
    ``PadToMultiple``; anything else is exported at its training size with a dynamic batch only.
    """
    spec = metadata.preprocessing
    height, width = (int(v) for v in spec.img_size)
    depth = getattr(model, "depth", None)
    if metadata.task == "segmentation" and spec.resize == "tile" and isinstance(depth, int):
        multiple = 2**depth
        wrapped = PadToMultiple(model, multiple).eval()
        size = InputSpec(
            spec.in_channels, max(height, multiple), max(width, multiple), dynamic_hw=True, min_size=multiple
        )
        return wrapped, size
    return model.eval(), InputSpec(spec.in_channels, height, width, dynamic_hw=False)


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    fmt: ExportFormat,
    *,
    opset: int | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> ExportResult:
    """Loads a MedServe checkpoint on the CPU and exports it; see ``export_model``.

    Raises:
        CheckpointError: the checkpoint cannot be loaded.
        ExportError: the export failed or does not match the PyTorch model.
        ValueError: an unknown format.
    """
    checkpoint = Path(checkpoint)
    model, metadata = load_model(checkpoint, "cpu")
    return export_model(
        model, metadata, out, fmt, opset=opset, verify=verify, atol=atol, rtol=rtol, source=checkpoint
    )


def export_model(
    model: nn.Module,
    metadata: CheckpointMetadata,
    out: str | Path,
    fmt: ExportFormat,
    *,
    opset: int | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    source: Path | None = None,
) -> ExportResult:
    """Exports ``model`` to ``out`` and writes ``<out>.json`` beside it.

    Args:
        model: the network, as built from ``metadata``; exported on the CPU in eval mode.
        metadata: the checkpoint metadata (classes, preprocessing, version) written beside the export.
        out: the file to write (e.g. ``lung.onnx``, or ``model.pt`` for Triton's PyTorch backend).
        fmt: ``"onnx"`` or ``"torchscript"``.
        opset: ONNX opset; ``None`` takes the exporter's default.
        verify: run the exported file and compare with PyTorch (ONNX with ONNX Runtime, a MedServe
            dependency: an installation without it fails the export instead of skipping the check).
        atol: absolute tolerance on logits.
        rtol: relative tolerance on logits.
        source: the checkpoint file, recorded in the JSON.

    Raises:
        ExportError: the exporter failed, or outputs differ beyond ``atol + rtol * |reference|``.
        ValueError: an unknown format or a non-positive tolerance.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if atol < 0 or rtol < 0:
        raise ValueError(f"tolerances must be >= 0, got atol={atol}, rtol={rtol}")
    out = Path(out)
    model = model.to("cpu").eval()
    module, spec = exportable(model, metadata)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=generator) for shape in spec.check_shapes()]
    with torch.inference_mode():
        # The reference is the plain model (not the wrapper): the export must reproduce what serving runs.
        references = [model(x).numpy() for x in inputs]

    export_info: dict[str, Any] = {
        "schema": EXPORT_SCHEMA,
        "format": fmt,
        "file": out.name,
        "source_checkpoint": source.name if source else None,
        "model_name": source.stem if source else None,
        "inputs": [
            {
                "name": INPUT_NAME,
                "dtype": "float32",
                "shape": spec.shape(),
                "layout": "NCHW",
                "min_size": spec.min_size if spec.dynamic_hw else None,
                "description": "images after `preprocessing` (channels, resize policy, mean/std normalisation)",
            }
        ],
        "outputs": [
            {
                "name": OUTPUT_NAME,
                "dtype": "float32",
                "shape": _output_shape(metadata, spec),
                "description": "raw logits; softmax over axis 1 gives class probabilities",
            }
        ],
        "exported_with": {"torch": torch.__version__},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        embedded = _sidecar(metadata, export_info)
        if fmt == "onnx":
            export_info.update(_export_onnx(module, inputs[0], spec, staged, opset, embedded))
            run = _onnx_runner(staged) if verify else None
        else:
            _export_torchscript(module, inputs[0], staged, embedded)
            run = _torchscript_runner(staged) if verify else None
        export_info["verification"] = _verify(run, inputs, references, atol, rtol, verify)
        export_info["sha256"] = file_sha256(staged)
        sidecar = _sidecar(metadata, export_info)
        (Path(tmp) / (out.name + ".json")).write_text(json.dumps(sidecar, indent=2) + "\n")
        # Move the file(s) into place only after they passed the check.
        for item in sorted(Path(tmp).iterdir()):
            target = out.parent / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
    diff = export_info["verification"].get("max_abs_diff")
    return ExportResult(out, out.with_name(out.name + ".json"), fmt, diff, sidecar)


def read_export_metadata(path: str | Path) -> tuple[CheckpointMetadata, dict[str, Any]]:
    """Reads ``<export>.json`` (or the JSON itself) back into checkpoint metadata and the export block."""
    path = Path(path)
    if path.suffix != ".json":
        path = path.with_name(path.name + ".json")
    data = json.loads(path.read_text())
    return CheckpointMetadata.model_validate(data), dict(data.get("export", {}))


def _sidecar(metadata: CheckpointMetadata, export_info: dict[str, Any]) -> dict[str, Any]:
    return {**metadata.model_dump(mode="json"), "export": dict(export_info)}


def _output_shape(metadata: CheckpointMetadata, spec: InputSpec) -> list[int | str]:
    k = len(metadata.classes)
    if metadata.task == "classification":
        return ["batch", k]
    if spec.dynamic_hw:
        return ["batch", k, "height", "width"]
    return ["batch", k, spec.height, spec.width]


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    # Tracer/deprecation warnings and the optimiser's per-pass INFO lines are expected here: every export is
    # checked numerically instead.
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    spec: InputSpec,
    path: Path,
    opset: int | None,
    embedded: dict[str, Any],
) -> dict[str, Any]:
    try:
        import onnx  # noqa: F401  (the exporter needs onnx and onnxscript; fail with a clear message)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the packages onnx and onnxscript ({exc})") from exc
    dims: dict[int, Any] = {0: torch.export.Dim.DYNAMIC}
    if spec.dynamic_hw:
        dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    try:
        with _quiet_exporters():
            # torch.export with DYNAMIC dims records the shape arithmetic symbolically; the result is checked
            # numerically at a second, non-multiple size below.
            program = torch.export.export(module, (example,), dynamic_shapes=(dims,), strict=False)
            onnx_program = torch.onnx.export(
                program,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:  # the exporters raise many unrelated types; report them as one error
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    if onnx_program is None:
        raise ExportError("ONNX export returned no program")
    # The exporter names dynamic axes after its symbols (s0, s77, ...); give them the names users expect.
    input_shape = onnx_program.model.graph.inputs[0].shape
    names = {0: "batch", 2: "height", 3: "width"} if spec.dynamic_hw else {0: "batch"}
    rename: dict[Any, str] = {}
    for axis, name in names.items():
        dim = input_shape[axis] if input_shape is not None else None
        if dim is not None and not isinstance(dim, int) and getattr(dim, "value", None) is not None:
            rename[dim] = name
    onnx_program.model.metadata_props["medserve"] = json.dumps(embedded)
    onnx_program.model.doc_string = f"MedServe {embedded['task']} model, version {embedded['version']}"
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with _quiet_exporters():
        onnx_program.rename_axes(rename)
        onnx_program.save(path, external_data=n_bytes > _EXTERNAL_DATA_BYTES)
    return {"opset": int(onnx_program.model.opset_imports.get("", 0)) or None}


def _export_torchscript(
    module: nn.Module, example: torch.Tensor, path: Path, embedded: dict[str, Any]
) -> None:
    try:
        with _quiet_exporters(), torch.no_grad():
            # Tracing records the size arithmetic of PadToMultiple as graph ops, so H/W stay dynamic.
            traced = torch.jit.trace(module, (example,), check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={"medserve.json": json.dumps(embedded)})
    except Exception as exc:  # tracing errors come in many types; report them as one error
        raise ExportError(f"TorchScript export failed: {type(exc).__name__}: {exc}") from exc


Runner = Callable[[np.ndarray], np.ndarray]


def _onnx_runner(path: Path) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # a MedServe dependency: only a broken installation lacks it
        raise ExportError(
            f"checking the ONNX export needs onnxruntime, a MedServe dependency ({exc})"
        ) from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])

    return run


def _torchscript_runner(path: Path) -> Runner:
    with _quiet_exporters():
        loaded = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return loaded(torch.from_numpy(x)).numpy()

    return run


def _verify(
    run: Runner | None,
    inputs: list[torch.Tensor],
    references: list[np.ndarray],
    atol: float,
    rtol: float,
    requested: bool,
) -> dict[str, Any]:
    shapes = [list(x.shape) for x in inputs]
    if not requested:
        return {"checked": False, "reason": "verification disabled"}
    if run is None:
        raise ExportError("no runtime to check the export with")
    worst = 0.0
    for x, expected in zip(inputs, references, strict=True):
        try:
            got = run(x.numpy())
        except Exception as exc:  # a runtime that rejects the file: report which shape
            raise ExportError(f"the exported model failed on input shape {list(x.shape)}: {exc}") from exc
        if got.shape != expected.shape:
            raise ExportError(
                f"the exported model returned shape {list(got.shape)} for input {list(x.shape)}, "
                f"PyTorch {list(expected.shape)}"
            )
        diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        worst = max(worst, float(diff.max(initial=0.0)))
        if not np.all(diff <= atol + rtol * np.abs(expected)):
            raise ExportError(
                f"the exported model differs from PyTorch on input shape {list(x.shape)}: "
                f"max |diff| = {float(diff.max()):.3g} > atol {atol} + rtol {rtol} * |reference|"
            )
    return {"checked": True, "shapes": shapes, "max_abs_diff": worst, "atol": atol, "rtol": rtol}


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, hex (as recorded in the export JSON)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
