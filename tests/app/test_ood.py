"""The out-of-distribution flag in the service's answers: JSON field, headers, /metrics and /models."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from models.checkpoint import Architecture, CheckpointMetadata, save_checkpoint
from models.imageio import read_image
from models.ood import (
    OODStatistics,
    default_feature_source,
    extract_blocks,
    extract_features,
    fit_statistics,
)
from models.preprocessing import Preprocessing, prepare
from models.registry import register_architecture
from models.unet import UNet
from tests.app.helpers import PNG, encode_image, save_pixel_model, serve, settings

pytestmark = pytest.mark.anyio

FORWARD_CALLS: list[int] = []  # batch size of every forward pass of the test models


class FeaturePixelNet(nn.Module):
    """Per-pixel threshold segmenter (class 1 where the pixel is >= 128) whose OOD feature is its input, pooled:
    the mean of the normalised image."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.conv = nn.Conv2d(1, 2, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1))
            assert self.conv.bias is not None
            self.conv.bias.zero_()

    def ood_feature_layer(self) -> nn.Module:
        return self.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        FORWARD_CALLS.append(x.shape[0])
        return self.conv(self.features(x))


class FeatureMeanClassifier(nn.Module):
    """Logits (-4m, 4m) of the mean m of the normalised image; OOD feature: the image, pooled (m)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.scale = nn.Parameter(torch.tensor(4.0))

    def ood_feature_layer(self) -> nn.Module:
        return self.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        FORWARD_CALLS.append(x.shape[0])
        m = self.features(x).mean(dim=(1, 2, 3))
        return torch.stack([-self.scale * m, self.scale * m], dim=1)


register_architecture("test-ood-pixel", lambda **kw: FeaturePixelNet(**kw))
register_architecture("test-ood-mean", lambda **kw: FeatureMeanClassifier(**kw))

SPEC: dict[str, Any] = {"in_channels": 1, "mean": [0.5], "std": [0.25]}


def statistics(means: Sequence[float], groups: Sequence[str], sd: float = 0.1) -> OODStatistics:
    """One-feature statistics: score = min over groups of |m - mean| / sd; threshold 3."""
    return OODStatistics(
        features="the normalised image's mean",
        groups=list(groups),
        dim=1,
        threshold=3.0,
        percentile=95.0,
        n_fit=100,
        n_calibration=20,
        means=torch.tensor([[float(v)] for v in means], dtype=torch.float64),
        precision=torch.tensor([[1.0 / sd**2]], dtype=torch.float64),
    )


def normalised_mean(value: int) -> float:
    return (value / 255 - 0.5) / 0.25


def save_segmenter(path: Path) -> CheckpointMetadata:
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="test-ood-pixel"),
        classes=["background", "lesion"],
        preprocessing=Preprocessing(img_size=(32, 32), **SPEC),
        ood=statistics([0.0], ["all"]),
    )
    return save_checkpoint(path, FeaturePixelNet(), meta)


def save_classifier(path: Path) -> CheckpointMetadata:
    meta = CheckpointMetadata(
        task="classification",
        architecture=Architecture(name="test-ood-mean"),
        classes=["dark", "bright"],
        preprocessing=Preprocessing(img_size=(16, 16), resize="resize", **SPEC),
        ood=statistics([-1.0, 1.0], ["dark", "bright"]),
    )
    return save_checkpoint(path, FeatureMeanClassifier(), meta)


def uniform(value: int, size: tuple[int, int] = (20, 24)) -> bytes:
    return encode_image(np.full(size, value, dtype=np.uint8))


def counters(text: str) -> dict[tuple[str, str], float]:
    """(sample name, model label) -> value of the OOD counters in a /metrics text."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("medserve_ood_"):
                found[(sample.name, sample.labels.get("model", ""))] = sample.value
    return found


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    save_segmenter(tmp_path / "seg.pt")
    save_classifier(tmp_path / "cls.pt")
    save_pixel_model(tmp_path / "plain.pt")  # no statistics
    return tmp_path


async def test_segment_answers_carry_the_flag_in_headers_and_json(model_dir: Path) -> None:
    async with serve(settings(model_dir)) as (_, client):
        ok = await client.post("/segment?model=seg", content=uniform(128), headers=PNG)
        flagged = await client.post("/segment?model=seg&format=overlay", content=uniform(250), headers=PNG)
        summary = await client.post("/segment?model=seg&format=json", content=uniform(110), headers=PNG)
    assert ok.status_code == flagged.status_code == summary.status_code == 200
    assert ok.headers["x-medserve-ood"] == "ok"
    assert float(ok.headers["x-medserve-ood-score"]) == pytest.approx(
        abs(normalised_mean(128)) / 0.1, rel=1e-4
    )
    assert flagged.headers["x-medserve-ood"] == "flagged"
    assert float(flagged.headers["x-medserve-ood-score"]) == pytest.approx(
        normalised_mean(250) / 0.1, rel=1e-4
    )
    body = summary.json()
    assert body["ood"] == {
        "score": pytest.approx(abs(normalised_mean(110)) / 0.1, rel=1e-4),  # 2.75: just inside
        "threshold": 3.0,
        "flagged": False,
    }
    assert summary.headers["x-medserve-ood"] == "ok"
    assert float(summary.headers["x-medserve-ood-score"]) == pytest.approx(body["ood"]["score"], rel=1e-4)


async def test_classify_carries_the_flag_per_prediction(model_dir: Path) -> None:
    files = [("file", ("a.png", uniform(191), "image/png")), ("file", ("b.png", uniform(250), "image/png"))]
    async with serve(settings(model_dir)) as (_, client):
        both = await client.post("/classify?model=cls", files=files)
        one = await client.post("/classify?model=cls", content=uniform(250), headers=PNG)
    assert both.status_code == one.status_code == 200
    first, second = both.json()["predictions"]
    assert first["ood"] == {
        "score": pytest.approx(abs(normalised_mean(191) - 1.0) / 0.1, rel=1e-4),
        "threshold": 3.0,
        "flagged": False,
    }
    assert second["ood"] == {
        "score": pytest.approx((normalised_mean(250) - 1.0) / 0.1, rel=1e-4),
        "threshold": 3.0,
        "flagged": True,
    }
    assert "x-medserve-ood" not in both.headers  # an answer about two images: see each prediction
    assert one.headers["x-medserve-ood"] == "flagged"
    assert one.json()["predictions"][0]["ood"]["flagged"] is True


async def test_a_model_without_statistics_answers_ood_null_and_unknown(model_dir: Path) -> None:
    async with serve(settings(model_dir)) as (_, client):
        png = await client.post("/segment?model=plain", content=uniform(250), headers=PNG)
        summary = await client.post("/segment?model=plain&format=json", content=uniform(250), headers=PNG)
        models = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
        metrics = counters((await client.get("/metrics")).text)
    assert png.status_code == summary.status_code == 200
    assert png.headers["x-medserve-ood"] == "unknown"
    assert "x-medserve-ood-score" not in png.headers
    assert summary.json()["ood"] is None
    assert models["plain"]["ood"] is None
    assert ("medserve_ood_scored_total", "plain") not in metrics


async def test_models_lists_the_statistics_and_metrics_count_flagged_answers(model_dir: Path) -> None:
    async with serve(settings(model_dir)) as (_, client):
        answers = await asyncio.gather(
            *(client.post("/segment?model=seg", content=uniform(v), headers=PNG) for v in (120, 128, 250, 10))
        )
        files = [("file", (f"{v}.png", uniform(v), "image/png")) for v in (191, 250, 64)]
        classified = await client.post("/classify?model=cls", files=files)
        models = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
        metrics = counters((await client.get("/metrics")).text)
    assert {a.status_code for a in answers} == {200} and classified.status_code == 200
    assert [a.headers["x-medserve-ood"] for a in answers] == ["ok", "ok", "flagged", "flagged"]
    flags = [p["ood"]["flagged"] for p in classified.json()["predictions"]]
    assert flags == [False, True, False]  # 64: m = -0.996, near the "dark" mean
    assert metrics[("medserve_ood_scored_total", "seg")] == 4
    assert metrics[("medserve_ood_flagged_total", "seg")] == 2
    assert metrics[("medserve_ood_scored_total", "cls")] == 3
    assert metrics[("medserve_ood_flagged_total", "cls")] == 1
    seg = models["seg"]["ood"]
    assert seg["threshold"] == 3.0 and seg["percentile"] == 95.0 and seg["groups"] == ["all"]
    assert seg["method"] == "mahalanobis" and seg["covariance"] == "ledoit-wolf"
    assert "means" not in seg and "precision" not in seg
    assert models["cls"]["ood"]["groups"] == ["dark", "bright"]


async def test_the_flag_comes_from_the_predictions_own_forward_pass(model_dir: Path) -> None:
    async with serve(settings(model_dir)) as (_, client):
        FORWARD_CALLS.clear()
        response = await client.post("/segment?model=seg", content=uniform(250), headers=PNG)
        calls = list(FORWARD_CALLS)
    assert response.status_code == 200 and response.headers["x-medserve-ood"] == "flagged"
    assert calls == [1]  # one image, one window: one forward pass for the mask and the score


async def test_a_tiled_unet_scores_as_calibration_computes_it(tmp_path: Path) -> None:
    """Several windows per image: the service's score equals the one ``extract_features`` (calibration) gives."""
    torch.manual_seed(0)
    args: dict[str, Any] = {"in_channels": 1, "out_channels": 2, "channels": [4, 8]}
    unet = UNet(**args).eval()
    spec = Preprocessing(img_size=(16, 16), **SPEC)
    rng = np.random.default_rng(0)
    fit_images = [torch.from_numpy(rng.random((1, 16, 16), dtype=np.float32)) for _ in range(20)]
    source = default_feature_source(unet)
    assert source is not None and source.names == ("down.0", "down.1") and source.pooling == "mean+std"
    fit = extract_blocks(unet, fit_images, source=source, tile=spec.img_size)
    stats = fit_statistics(
        fit.values,
        [0] * 20,
        ["all"],
        fit.values[:5],
        features=source.description,
        blocks=fit.widths,
        layers=source.names,
        pooling=source.pooling,
    )
    assert stats.blocks == [4, 4, 8, 8]
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="unet", args=args),
        classes=["background", "lesion"],
        preprocessing=spec,
        ood=stats,
    )
    save_checkpoint(tmp_path / "unet.pt", unet, meta)
    image = encode_image(rng.integers(0, 256, size=(40, 28), dtype=np.uint8))
    async with serve(settings(tmp_path)) as (_, client):
        response = await client.post("/segment?format=json", content=image, headers=PNG)
    assert response.status_code == 200
    pixels = read_image(image, content_type="image/png").pixels
    expected = stats.scores(extract_features(unet, [prepare(pixels, spec)], tile=spec.img_size))[0]
    score = response.json()["ood"]["score"]
    assert math.isfinite(score)
    assert score == pytest.approx(float(expected), rel=1e-4)
