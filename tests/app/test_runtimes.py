"""MEDSERVE_RUNTIME: every runtime is verified against PyTorch, the fastest verified one serves, artefacts are cached.

The models are the tiny deterministic ones of ``tests.app.helpers`` (and a tiny U-Net), exported to ONNX at load
as the service does for any checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import app.runtimes as runtimes
import models.runtimes as model_runtimes
from app.runtimes import (
    MASK_AGREEMENT,
    PROBABILITY_ATOL,
    RuntimeDispatch,
    RuntimeSelection,
    compare,
    resolve_cache_dir,
)
from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.export import file_sha256
from models.preprocessing import Preprocessing
from models.registry import register_architecture
from models.runtimes import cache_path
from tests.app.helpers import (
    PNG,
    decode_png,
    encode_image,
    expected_binary_mask,
    random_image,
    save_mean_classifier,
    save_pixel_model,
    save_unet,
    serve,
    settings,
)
from tests.components import require_module

pytestmark = pytest.mark.anyio

CPU_CANDIDATES = ["torch", "torch-contiguous", "onnxruntime", "openvino"]
# OpenVINO is an optional extra: without it, auto lists it as unavailable and serves the others.
OPENVINO = model_runtimes.openvino_available() is not None
ONNX_CANDIDATES = ("onnxruntime", "openvino") if OPENVINO else ("onnxruntime",)
OPENVINO_INSTALL = "pip install 'medserve[openvino]'"


class ExportDivergentNet(nn.Module):
    """A per-pixel threshold model (as ``PixelNet``) that computes the opposite while it is being exported.

    Models with export-only code paths exist (``torch.compiler.is_exporting`` and its ancestors); the exported
    graph then differs from what PyTorch runs, which only running both shows.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.conv(x)
        if torch.compiler.is_exporting():
            return -logits
        return logits


register_architecture("test-export-divergent", lambda **kw: ExportDivergentNet())


def save_divergent_model(path: Path) -> CheckpointMetadata:
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="test-export-divergent"),
        classes=["background", "lesion"],
        preprocessing=Preprocessing(in_channels=1, img_size=(16, 16), mean=[0.5], std=[0.25]),
    )
    return save_checkpoint(path, ExportDivergentNet(), meta)


def counting(engine: Any, calls: list[int]) -> Any:
    """``engine``, recording the batch size of each call in ``calls``."""

    def run(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        result: torch.Tensor = engine(batch)
        return result

    return run


def runtime_of(models: list[dict[str, Any]], name: str) -> dict[str, Any]:
    info = next(m for m in models if m["name"] == name)
    runtime: dict[str, Any] = info["runtime"]
    return runtime


def candidate(runtime: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in runtime["candidates"] if c["name"] == name)
    return found


async def test_auto_verifies_and_times_every_cpu_runtime_and_serves_the_fastest_per_batch_size(
    tmp_path: Path,
) -> None:
    save_pixel_model(tmp_path / "pixel.pt")
    save_mean_classifier(tmp_path / "mean.pt")
    config = settings(tmp_path, runtime="auto", max_batch_size=4, batch_autotune=True)
    async with serve(config) as (_app, client):
        models = (await client.get("/models")).json()["models"]
        for name, metric in (("pixel", "mask_agreement"), ("mean", "probability_max_abs_diff")):
            runtime = runtime_of(models, name)
            assert runtime["setting"] == "auto"
            assert [c["name"] for c in runtime["candidates"]] == CPU_CANDIDATES
            for entry in runtime["candidates"]:
                if entry["name"] == "openvino" and not OPENVINO:
                    assert entry["status"] == "unavailable" and OPENVINO_INSTALL in entry["reason"]
                    continue
                assert entry["status"] == "verified", entry
                assert entry["verification"]["metric"] == metric
                assert entry["verification"]["passed"] is True
                assert entry["verification"]["batch_sizes"][0] == 1
            # The candidate x batch size table (ms per batch), and the fastest verified one at each size.
            table = runtime["timings_ms"]
            assert sorted(table) == sorted(CPU_CANDIDATES if OPENVINO else CPU_CANDIDATES[:3])
            assert list(runtime["chosen"]) == ["1", "2", "4"]
            for size, chosen in runtime["chosen"].items():
                timed = {name: row[size] for name, row in table.items() if size in row}
                assert chosen == min(timed, key=lambda n: timed[n])
            assert set(runtime["serves"]) == set(runtime["chosen"].values())
            artefact = candidate(runtime, "onnxruntime")["artefact"]
            assert artefact["file"].endswith(".onnx") and artefact["cached"] is False
        image = random_image(40, 50, 3)
        response = await client.post("/segment?model=pixel", content=encode_image(image), headers=PNG)
        assert response.status_code == 200
        np.testing.assert_array_equal(decode_png(response.content), expected_binary_mask(image))


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
async def test_each_runtime_answers_as_pytorch_within_the_tolerances(tmp_path: Path, runtime: str) -> None:
    if runtime == "openvino":
        require_module("openvino", OPENVINO_INSTALL)
    save_unet(tmp_path / "unet.pt")
    save_mean_classifier(tmp_path / "mean.pt")
    images = [random_image(48, 40, seed) for seed in range(4)]
    answers: dict[str, list[Any]] = {}
    for setting in ("torch", runtime):
        async with serve(settings(tmp_path, runtime=setting, max_batch_size=4)) as (app, client):
            models = (await client.get("/models")).json()["models"]
            assert runtime_of(models, "unet")["serves"] == [setting]
            if setting != "torch":
                # The runtime really runs the requests: count the calls of the engine it installed.
                engine = app.state.registry.models["unet"].runner.engine
                assert isinstance(engine, RuntimeDispatch)
                calls: list[int] = []
                for size, inner in list(engine.engines.items()):
                    engine.engines[size] = counting(inner, calls)
            masks = []
            for image in images:
                response = await client.post(
                    "/segment?model=unet&format=json", content=encode_image(image), headers=PNG
                )
                assert response.status_code == 200
                masks.append(response.json())
            files = [("file", (f"{i}.png", encode_image(im), "image/png")) for i, im in enumerate(images)]
            classified = (await client.post("/classify?model=mean", files=files)).json()
            if setting != "torch":
                assert len(calls) >= len(images)
            answers[setting] = [masks, classified]
    (torch_masks, torch_classes), (other_masks, other_classes) = answers["torch"], answers[runtime]
    assert torch_masks == other_masks  # tiny U-Net: every pixel the same (the tolerance allows 0.1% off)
    for mine, theirs in zip(torch_classes["predictions"], other_classes["predictions"], strict=True):
        assert mine["label"] == theirs["label"]
        for label, probability in mine["probabilities"].items():
            assert abs(probability - theirs["probabilities"][label]) <= PROBABILITY_ATOL


async def test_a_restart_reuses_the_cached_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meta = save_pixel_model(tmp_path / "pixel.pt")
    async with serve(settings(tmp_path, runtime="onnxruntime")) as (_app, client):
        first = runtime_of((await client.get("/models")).json()["models"], "pixel")
    cached = cache_path(tmp_path / ".medserve-cache", "pixel", meta.version)
    assert cached.is_file() and cached.with_name(cached.name + ".json").is_file()
    assert candidate(first, "onnxruntime")["artefact"]["cached"] is False
    stamp = cached.stat().st_mtime_ns

    def no_export(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(model_runtimes, "export_model", no_export)
    async with serve(settings(tmp_path, runtime="onnxruntime")) as (_app, client):
        models = (await client.get("/models")).json()["models"]
        second = runtime_of(models, "pixel")
        assert models[0]["status"] == "ready"
        image = random_image(20, 30, 5)
        response = await client.post("/segment", content=encode_image(image), headers=PNG)
        np.testing.assert_array_equal(decode_png(response.content), expected_binary_mask(image))
    assert candidate(second, "onnxruntime")["artefact"] == {
        "file": cached.name,
        "cached": True,
        "export_seconds": 0.0,
    }
    assert cached.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("damage", ["garbage", "missing-json", "truncated"])
async def test_a_corrupt_cache_entry_is_rebuilt(tmp_path: Path, damage: str) -> None:
    meta = save_pixel_model(tmp_path / "pixel.pt")
    async with serve(settings(tmp_path, runtime="onnxruntime")):
        pass
    cached = cache_path(tmp_path / ".medserve-cache", "pixel", meta.version)
    good = cached.read_bytes()
    if damage == "garbage":
        cached.write_bytes(b"not an onnx file")
    elif damage == "missing-json":
        cached.with_name(cached.name + ".json").unlink()
    else:
        cached.write_bytes(good[: len(good) // 2])
    async with serve(settings(tmp_path, runtime="onnxruntime")) as (_app, client):
        models = (await client.get("/models")).json()["models"]
    assert models[0]["status"] == "ready"
    entry = candidate(runtime_of(models, "pixel"), "onnxruntime")
    assert entry["status"] == "verified"
    assert entry["artefact"]["cached"] is False
    if damage != "missing-json":
        assert "SHA-256" in entry["artefact"]["rebuilt_because"]
    assert (
        file_sha256(cached)
        == json.loads(cached.with_name(cached.name + ".json").read_text())["export"]["sha256"]
    )


def tamper(cached: Path) -> None:
    """Flips the sign of the threshold model's weights in the cached ONNX file and re-signs its JSON, as a
    hand-edited (or wrongly produced) export would look: valid, loadable, and numerically different."""
    model = onnx.load(str(cached))
    for initializer in model.graph.initializer:
        values = numpy_helper.to_array(initializer)
        if values.size == 2 and values.dtype == np.float32 and np.any(values != 0):
            initializer.CopyFrom(numpy_helper.from_array(-values, initializer.name))
    onnx.save(model, str(cached))
    sidecar = cached.with_name(cached.name + ".json")
    data = json.loads(sidecar.read_text())
    data["export"]["sha256"] = file_sha256(cached)
    sidecar.write_text(json.dumps(data))


async def test_a_runtime_that_fails_verification_is_not_served_and_models_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    meta = save_pixel_model(tmp_path / "pixel.pt")
    async with serve(settings(tmp_path, runtime="onnxruntime")):
        pass
    tamper(cache_path(tmp_path / ".medserve-cache", "pixel", meta.version))
    caplog.set_level(logging.WARNING, logger="medserve.runtimes")
    async with serve(settings(tmp_path, runtime="auto")) as (_app, client):
        models = (await client.get("/models")).json()["models"]
        runtime = runtime_of(models, "pixel")
        for name in ONNX_CANDIDATES:
            entry = candidate(runtime, name)
            assert entry["status"] == "rejected"
            assert entry["verification"]["passed"] is False
            assert entry["verification"]["metric"] == "mask_agreement"
            assert entry["verification"]["worst"] < MASK_AGREEMENT
            assert "verification failed at batch 1: mask_agreement" in entry["reason"]
            assert entry["ms_per_batch"] == {}  # never timed, never chosen
            assert f"runtime {name} not used: verification failed" in caplog.text
        assert set(runtime["serves"]) <= {"torch", "torch-contiguous"}
        image = random_image(24, 24, 8)
        response = await client.post("/segment", content=encode_image(image), headers=PNG)
        np.testing.assert_array_equal(decode_png(response.content), expected_binary_mask(image))


async def test_a_model_whose_export_differs_from_pytorch_is_served_by_pytorch_only(tmp_path: Path) -> None:
    save_divergent_model(tmp_path / "divergent.pt")
    async with serve(settings(tmp_path, runtime="auto")) as (_app, client):
        models = (await client.get("/models")).json()["models"]
        runtime = runtime_of(models, "divergent")
        assert candidate(runtime, "torch")["status"] == "verified"
        for name in ONNX_CANDIDATES:
            entry = candidate(runtime, name)
            assert entry["status"] == "rejected", entry
            assert entry["verification"]["worst"] < 0.5  # the opposite class nearly everywhere
        assert set(runtime["serves"]) <= {"torch", "torch-contiguous"}
        image = random_image(16, 16, 2)
        response = await client.post("/segment", content=encode_image(image), headers=PNG)
        np.testing.assert_array_equal(decode_png(response.content), expected_binary_mask(image))


async def test_an_explicit_runtime_that_cannot_serve_a_model_fails_that_model_only(tmp_path: Path) -> None:
    save_divergent_model(tmp_path / "divergent.pt")
    save_pixel_model(tmp_path / "pixel.pt")
    async with serve(settings(tmp_path, runtime="onnxruntime")) as (_app, client):
        models = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
        ready = await client.get("/health/ready")
    assert models["pixel"]["status"] == "ready"
    failed = models["divergent"]
    assert failed["status"] == "failed"
    assert "MEDSERVE_RUNTIME=onnxruntime cannot serve it" in failed["error"]
    assert "verification failed" in failed["error"]
    assert [c["status"] for c in failed["runtime"]["candidates"]] == ["rejected"]
    assert ready.json()["models"] == {"divergent": "failed", "pixel": "ready"}


async def test_an_explicit_runtime_that_is_not_installed_fails_with_a_clear_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtimes, "openvino_available", lambda: None)
    save_pixel_model(tmp_path / "pixel.pt")
    async with serve(settings(tmp_path, runtime="openvino")) as (_app, client):
        failed = (await client.get("/models")).json()["models"][0]
    assert failed["status"] == "failed"
    assert "MEDSERVE_RUNTIME=openvino cannot serve it" in failed["error"]
    assert "OpenVINO is not installed (pip install 'medserve[openvino]')" in failed["error"]
    async with serve(settings(tmp_path, runtime="auto")) as (_app, client):
        runtime = runtime_of((await client.get("/models")).json()["models"], "pixel")
    assert candidate(runtime, "openvino")["status"] == "unavailable"
    assert "openvino" not in runtime["serves"]


async def test_runtime_torch_keeps_the_service_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_export(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("MEDSERVE_RUNTIME=torch must not export")

    monkeypatch.setattr(runtimes, "onnx_artefact", no_export)
    save_pixel_model(tmp_path / "pixel.pt")
    async with serve(settings(tmp_path, runtime="torch", max_batch_size=4)) as (app, client):
        runner = app.state.registry.models["pixel"].runner
        assert runner.engine is None  # the runners' own PyTorch path, models.inference.forward
        runtime = runtime_of((await client.get("/models")).json()["models"], "pixel")
        image = random_image(30, 20, 4)
        response = await client.post("/segment", content=encode_image(image), headers=PNG)
        np.testing.assert_array_equal(decode_png(response.content), expected_binary_mask(image))
    assert runtime == {"setting": "torch", "chosen": {"1": "torch", "4": "torch"}, "serves": ["torch"]}
    assert not (tmp_path / ".medserve-cache").exists()


async def test_auto_without_warm_up_serves_pytorch_and_says_so(tmp_path: Path) -> None:
    save_pixel_model(tmp_path / "pixel.pt")
    async with serve(settings(tmp_path, runtime="auto", warmup=False)) as (app, client):
        runtime = runtime_of((await client.get("/models")).json()["models"], "pixel")
        assert app.state.registry.models["pixel"].runner.engine is None
    assert runtime["serves"] == ["torch"]
    assert "MEDSERVE_WARMUP is off" in runtime["note"]


def test_the_cache_falls_back_when_the_model_directory_is_not_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / ".medserve-cache").write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir(settings(tmp_path / "models")) == tmp_path / "xdg" / "medserve" / "runtimes"
    chosen = tmp_path / "elsewhere"
    assert resolve_cache_dir(settings(tmp_path / "models", runtime_cache=chosen)) == chosen
    assert chosen.is_dir()


def test_dispatch_picks_the_engine_of_the_batch_size_and_pytorch_for_other_shapes() -> None:
    seen: list[tuple[str, int]] = []

    def engine(name: str) -> Any:
        def run(batch: torch.Tensor) -> torch.Tensor:
            seen.append((name, len(batch)))
            return torch.zeros(len(batch), 2)

        return run

    dispatch = RuntimeDispatch({1: engine("a"), 2: engine("b"), 8: engine("c")}, (1, 4, 4), engine("torch"))
    for size in (1, 2, 3, 8, 9):
        dispatch(torch.zeros(size, 1, 4, 4))
    dispatch(torch.zeros(2, 1, 5, 4))
    assert seen == [("a", 1), ("b", 2), ("c", 3), ("c", 8), ("c", 9), ("torch", 2)]


class _Runner:
    def __init__(self, task: str, temperature: float = 1.0) -> None:
        self.task = task
        self.temperature = temperature


def test_verification_tolerances() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 40, 50, generator=generator)
    segmentation: Any = _Runner("segmentation")
    assert compare(segmentation, logits, logits.clone()) == (True, 1.0, "mask_agreement")
    flipped = logits.clone()
    flipped[0, :, 0, :2] = -flipped[0, :, 0, :2]  # 2 of 4000 pixels may change class: within 0.1%
    passed, agreement, _ = compare(segmentation, logits, flipped)
    assert agreement == pytest.approx(1 - 2 / 4000) and passed
    flipped[0, :, :3] = -flipped[0, :, :3]  # arg-max becomes arg-min at 148 pixels: beyond it
    passed, agreement, _ = compare(segmentation, logits, flipped)
    assert agreement == pytest.approx(1 - 148 / 4000) and not passed
    classification: Any = _Runner("classification", temperature=2.0)
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    # Probability of softmax(l / 2) moves by about 0.25 * d / 2 = 0.125 * d for a small logit change d.
    assert compare(classification, logits, logits + torch.tensor([[0.0, 0.004], [0.0, 0.0]]))[0]
    assert not compare(classification, logits, logits + torch.tensor([[0.0, 0.02], [0.0, 0.0]]))[0]
    with pytest.raises(ValueError, match="non-finite"):
        compare(classification, logits, torch.full_like(logits, float("nan")))
    with pytest.raises(ValueError, match="shape"):
        compare(classification, logits, logits[:1])


def test_selection_describes_the_runtime_chosen_per_batch_size() -> None:
    selection = RuntimeSelection("torch", {1: "torch", 16: "torch"})
    assert selection.describe() == {
        "setting": "torch",
        "chosen": {"1": "torch", "16": "torch"},
        "serves": ["torch"],
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the CUDA candidates")
async def test_auto_on_cuda_verifies_pytorch_at_the_precision_and_the_cuda_providers(tmp_path: Path) -> None:
    save_unet(tmp_path / "unet.pt")
    config = settings(tmp_path, runtime="auto", device="cuda", precision="fp16", max_batch_size=4)
    async with serve(config) as (_app, client):
        models = (await client.get("/models")).json()["models"]
    assert models[0]["status"] == "ready"
    runtime = runtime_of(models, "unet")
    names = [c["name"] for c in runtime["candidates"]]
    assert names == ["torch", "torch-fp32", "onnxruntime-tensorrt", "onnxruntime-cuda"]
    assert candidate(runtime, "torch-fp32")["status"] == "verified"
    for name in ("onnxruntime-tensorrt", "onnxruntime-cuda"):
        entry = candidate(runtime, name)
        assert entry["status"] == "verified" or (
            entry["status"] == "unavailable" and "onnxruntime-gpu" in entry["reason"]
        ), entry
    assert set(runtime["serves"]) <= {c["name"] for c in runtime["candidates"] if c["status"] == "verified"}
