"""models.ood: Mahalanobis statistics, threshold, features from the forward pass, and their checkpoint storage."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from torch import nn

from models.checkpoint import (
    Architecture,
    CheckpointError,
    CheckpointMetadata,
    content_hash,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from models.inference import split_tiles
from models.ood import (
    RIDGE,
    FeatureTap,
    OODStatistics,
    conformal_threshold,
    default_feature_source,
    extract_blocks,
    extract_features,
    feature_layer,
    feature_source,
    fit_gaussian,
    fit_statistics,
    mahalanobis_scores,
    window_count,
)
from models.ood import (
    tolerance_threshold as tolerance_threshold_of,
)
from models.preprocessing import Preprocessing
from models.unet import UNet
from tests.training.helpers import tolerance_threshold


def clouds(seed: int = 0, n: int = 400, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian classes (means 0 and 2 along the first axis, correlated noise) and their labels."""
    rng = np.random.default_rng(seed)
    mixing = np.eye(dim) + 0.3 * np.random.default_rng(99).normal(size=(dim, dim))
    labels = np.repeat([0, 1], n // 2)
    x = rng.normal(size=(n, dim)) @ mixing
    x[:, 0] += 2.0 * labels
    return x, labels


def test_shifted_cloud_is_told_apart_and_threshold_is_the_percentile() -> None:
    fit_x, fit_y = clouds(0)
    calibration, _ = clouds(1)
    stats = fit_statistics(fit_x, fit_y, ["a", "b"], calibration, features="test", percentile=95.0)
    # The tolerance limit: at most 5 % flagged with confidence 0.9, of 400 scores the 386th smallest.
    expected, rule = tolerance_threshold(stats.scores(calibration), 95.0, 0.9)
    assert stats.threshold == pytest.approx(expected, rel=1e-12) == np.sort(stats.scores(calibration))[385]
    assert stats.threshold_rule == rule == "tolerance" and stats.confidence == 0.9
    # Without a confidence, the conformal rule: the ceil(401 * 0.95) = 381st smallest.
    mean_only = fit_statistics(fit_x, fit_y, ["a", "b"], calibration, features="test", confidence=None)
    assert mean_only.threshold == pytest.approx(np.sort(stats.scores(calibration))[380], rel=1e-12)
    assert mean_only.threshold_rule == "conformal" and mean_only.confidence is None
    assert stats.n_fit == 400 and stats.n_calibration == 400 and stats.calibrated_on == "validation images"

    inside, _ = clouds(2)
    outside = inside + 4.0  # the same cloud shifted in every feature
    scores_in, scores_out = stats.scores(inside), stats.scores(outside)
    auroc = roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[scores_in, scores_out])
    assert auroc > 0.99
    flagged_in = float(np.mean(scores_in > stats.threshold))
    assert 0.01 <= flagged_in <= 0.10  # about 5 % by design
    assert np.mean(scores_out > stats.threshold) > 0.95

    strict = fit_statistics(
        fit_x, fit_y, ["a", "b"], calibration, features="test", percentile=99.0, confidence=None
    )
    assert strict.threshold == pytest.approx(
        np.sort(strict.scores(calibration))[396]
    )  # ceil(401 * 0.99) = 397
    assert strict.threshold > stats.threshold


def test_score_is_the_smallest_mahalanobis_distance_under_the_shrunk_shared_covariance() -> None:
    x, y = clouds(3, n=60, dim=8)
    means, precision = fit_gaussian(x, y, 2)
    np.testing.assert_allclose(means[0], x[y == 0].mean(axis=0))
    np.testing.assert_allclose(means[1], x[y == 1].mean(axis=0))
    covariance = LedoitWolf(assume_centered=True).fit(x - means[y]).covariance_
    covariance += np.eye(8) * RIDGE * np.trace(covariance) / 8
    np.testing.assert_allclose(precision, np.linalg.inv(covariance), rtol=1e-8)
    probe = np.random.default_rng(4).normal(size=(5, 8))
    expected = [min(mahalanobis(p, means[g], precision) for g in range(2)) for p in probe]
    np.testing.assert_allclose(mahalanobis_scores(probe, means, precision), expected, rtol=1e-8)


def test_more_features_than_images_and_a_single_image_still_fit() -> None:
    x = np.random.default_rng(0).normal(size=(5, 64))
    means, precision = fit_gaussian(x, [0] * 5, 1)
    np.testing.assert_allclose(means[0], x.mean(axis=0))
    assert np.all(np.isfinite(precision)) and precision.shape == (64, 64)
    stats = fit_statistics(x[:1], [0], ["all"], None, features="test")
    assert stats.calibrated_on == "training images (no validation set)"
    assert np.isfinite(stats.threshold)


def test_bad_percentile_and_group_labels_are_refused() -> None:
    x, y = clouds(0, n=20, dim=4)
    with pytest.raises(ValueError, match="percentile"):
        fit_statistics(x, y, ["a", "b"], x, features="test", percentile=0.0)
    with pytest.raises(ValueError, match="group"):
        fit_gaussian(x, y + 1, 2)


def sample_statistics(dim: int = 4, groups: tuple[str, ...] = ("a", "b")) -> OODStatistics:
    x = np.random.default_rng(5).normal(size=(30, dim))
    labels = [i % len(groups) for i in range(30)]
    return fit_statistics(x, labels, list(groups), x[:10], features="test features")


def tiny_unet_checkpoint(
    path: Path, ood: OODStatistics | None = None, unet: UNet | None = None
) -> CheckpointMetadata:
    """``unet`` (default: a seeded random one; channels 4, 8; 16 x 16 tiles) saved with ``ood``."""
    args: dict[str, Any] = {"in_channels": 1, "out_channels": 2, "channels": [4, 8]}
    if unet is None:
        torch.manual_seed(0)
        unet = UNet(**args)
    meta = CheckpointMetadata(
        task="segmentation",
        architecture=Architecture(name="unet", args=args),
        classes=["background", "lesion"],
        preprocessing=Preprocessing(in_channels=1, img_size=(16, 16)),
        ood=ood,
    )
    return save_checkpoint(path, unet.eval(), meta)


def test_checkpoint_round_trip_keeps_the_statistics_and_changes_the_version(tmp_path: Path) -> None:
    stats = sample_statistics(dim=8, groups=("all",))
    plain = tiny_unet_checkpoint(tmp_path / "plain.pt")
    with_ood = tiny_unet_checkpoint(tmp_path / "ood.pt", stats)
    assert plain.ood is None and with_ood.version != plain.version
    meta, state = load_checkpoint(tmp_path / "ood.pt")
    assert meta.ood is not None and meta.version == with_ood.version
    torch.testing.assert_close(meta.ood.means, stats.means)
    torch.testing.assert_close(meta.ood.precision, stats.precision)
    assert meta.ood.summary() == stats.summary()
    assert content_hash(state, meta) == meta.version  # the stored version is the hash of what was read
    # Another threshold is another version.
    other = tiny_unet_checkpoint(tmp_path / "other.pt", stats.model_copy(update={"threshold": 1.0}))
    assert other.version not in (plain.version, with_ood.version)
    # The tensors are stored beside the metadata, not as JSON text.
    payload = torch.load(tmp_path / "ood.pt", weights_only=True)
    assert set(payload["ood"]) == {"means", "precision"}
    assert "means" not in json.loads(payload["metadata"])["ood"]


def test_checkpoints_without_statistics_load_with_ood_none_and_hash_as_before(tmp_path: Path) -> None:
    meta = tiny_unet_checkpoint(tmp_path / "plain.pt")
    payload = torch.load(tmp_path / "plain.pt", weights_only=True)
    stored = json.loads(payload["metadata"])
    assert "ood" not in stored and "ood" not in payload  # the file is what MedServe wrote before
    loaded, state = load_checkpoint(tmp_path / "plain.pt")
    assert loaded.ood is None
    # The version formula of files without statistics is unchanged: weights, then the metadata JSON.
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    stored.pop("version")
    digest.update(json.dumps(stored, sort_keys=True).encode())
    assert digest.hexdigest()[:16] == meta.version


def test_statistics_without_their_tensors_or_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    tiny_unet_checkpoint(tmp_path / "ood.pt", sample_statistics(dim=8, groups=("all",)))
    payload = torch.load(tmp_path / "ood.pt", weights_only=True)
    missing = dict(payload)
    del missing["ood"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="tensors"):
        load_checkpoint(tmp_path / "missing.pt")
    wrong = dict(payload, ood={"means": torch.zeros(1, 3, dtype=torch.float64), "precision": torch.eye(8)})
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path / "wrong.pt")


@pytest.mark.parametrize(
    ("n", "percentile", "rank", "rule"),
    [(19, 95.0, 19, "conformal"), (18, 95.0, None, "maximum"), (20, 95.0, 20, "conformal"),
     (99, 95.0, 95, "conformal"), (7, 95.0, None, "maximum"), (4, 80.0, 4, "conformal"), (1, 50.0, 1, "conformal")],
)  # fmt: skip
def test_conformal_threshold_is_the_smallest_rank_with_the_guarantee(
    n: int, percentile: float, rank: int | None, rule: str
) -> None:
    scores = np.random.default_rng(n).permutation(np.arange(1.0, n + 1.0))  # ranks 1..n, shuffled
    threshold, got_rule = conformal_threshold(scores, percentile)
    assert got_rule == rule
    assert threshold == (float(rank) if rank is not None else float(n))


@pytest.mark.parametrize(("n", "rank"), [(44, None), (45, 45), (60, 60), (100, 99), (522, 503)])
def test_tolerance_limit_bounds_the_flag_rate_with_the_confidence(n: int, rank: int | None) -> None:
    scores = np.random.default_rng(n).permutation(np.arange(1.0, n + 1.0))
    threshold, rule = tolerance_threshold_of(scores, 95.0, 0.9)
    assert (threshold, rule) == ((float(rank), "tolerance") if rank else (float(n), "maximum"))
    assert (threshold, rule) == tolerance_threshold(scores, 95.0, 0.9)  # the test's own derivation agrees
    if rank is None:
        return
    # Simulated: uniform scores, so the flagged fraction of the population is 1 - U_(rank).
    uniform = np.sort(np.random.default_rng(0).random((4000, n)), axis=1)
    flagged = 1.0 - uniform[:, rank - 1]
    assert np.mean(flagged > 0.05) <= 0.1 + 0.015  # at most 5 % flagged, in 90 % of draws
    assert np.mean(1.0 - uniform[:, rank - 2] > 0.05) > 0.1  # the rank below would not do


def test_block_scores_add_the_blocks_squared_distances_and_take_the_nearest_group_jointly() -> None:
    rng = np.random.default_rng(7)
    x, y = clouds(8, n=80, dim=6)
    widths = [2, 4]
    stats = fit_statistics(x, y, ["a", "b"], x[:20], features="test", blocks=widths)
    assert stats.blocks == widths and tuple(stats.precision.shape) == (6, 4)
    probe = rng.normal(size=(7, 6))
    first_means, first_precision = fit_gaussian(x[:, :2], y, 2)
    last_means, last_precision = fit_gaussian(x[:, 2:], y, 2)
    np.testing.assert_allclose(stats.block_precisions()[0], first_precision, rtol=1e-10)
    np.testing.assert_allclose(stats.block_precisions()[1], last_precision, rtol=1e-10)
    expected = [
        min(
            np.sqrt(
                mahalanobis(p[:2], first_means[g], first_precision) ** 2
                + mahalanobis(p[2:], last_means[g], last_precision) ** 2
            )
            for g in range(2)
        )
        for p in probe
    ]
    np.testing.assert_allclose(stats.scores(probe), expected, rtol=1e-8)
    # One block is the plain Mahalanobis distance (statistics from before the blocks).
    single = fit_statistics(x, y, ["a", "b"], x[:20], features="test")
    assert single.blocks == [] and tuple(single.precision.shape) == (6, 6)
    np.testing.assert_allclose(
        single.scores(probe), mahalanobis_scores(probe, single.means.numpy(), single.precision.numpy())
    )
    with pytest.raises(ValueError, match="blocks"):
        fit_statistics(x, y, ["a", "b"], x[:20], features="test", blocks=[2, 3])


def test_default_sources_are_the_first_and_last_stage_and_legacy_statistics_keep_the_last(
    tmp_path: Path,
) -> None:
    from models.classifier import Classifier

    classifier = Classifier("resnet18", num_classes=2, in_channels=1)
    source = default_feature_source(classifier)
    assert source is not None and source.names == ("features.0", "features.4")
    assert source.modules == (classifier.features[0], classifier.features[4]) and source.pooling == "mean+std"
    unet = UNet(in_channels=1, out_channels=2, channels=[4, 8, 16]).eval()
    source = default_feature_source(unet)
    assert source is not None and source.modules == (unet.down[0], unet.down[2])
    assert default_feature_source(nn.Conv2d(1, 1, 1)) is None

    class OwnLayer(UNet):  # a network that names its own feature layer keeps it, mean-pooled
        def ood_feature_layer(self) -> nn.Module:
            return self.down[1]

    own = OwnLayer(in_channels=1, out_channels=2, channels=[4, 8, 16])
    source = default_feature_source(own)
    assert source is not None and source.names == ("down.1",) and source.pooling == "mean"
    # Statistics without layers (written before them): the last stage's pooled mean, as they were fitted on.
    legacy = sample_statistics(dim=16, groups=("all",))
    source = feature_source(unet, legacy)
    assert source.modules == (unet.down[-1],) and source.pooling == "mean"
    with pytest.raises(ValueError, match="not in"):
        feature_source(unet, legacy.model_copy(update={"layers": ["down.7"]}))


def test_mean_and_std_pooling_of_several_layers() -> None:
    unet = UNet(in_channels=1, out_channels=2, channels=[4, 8]).eval()
    x = torch.rand(3, 1, 16, 16)
    with torch.inference_mode(), FeatureTap([unet.down[0], unet.down[1]], "mean+std") as tap:
        unet(x)
        unet(x[:1])
    assert tap.widths() == [4, 4, 8, 8] and tap.features().shape == (4, 24)
    with torch.inference_mode():
        first = unet.down[0](x)
        last = unet.down[1](unet.pool(first))
    expected = torch.cat(
        [first.mean(dim=(2, 3)), first.std(dim=(2, 3), correction=0), last.mean(dim=(2, 3)),
         last.std(dim=(2, 3), correction=0)], dim=1,
    )  # fmt: skip
    torch.testing.assert_close(tap.features()[:3], expected)
    torch.testing.assert_close(tap.features()[3], expected[0])


def test_blocked_statistics_survive_the_checkpoint_and_score_the_same(tmp_path: Path) -> None:
    unet = UNet(in_channels=1, out_channels=2, channels=[4, 8]).eval()
    source = default_feature_source(unet)
    assert source is not None
    fit = extract_blocks(unet, [torch.rand(1, 16, 16) for _ in range(24)], source=source, tile=(16, 16))
    stats = fit_statistics(
        fit.values, [0] * 24, ["all"], fit.values[:20], features=source.description, blocks=fit.widths,
        layers=source.names, pooling=source.pooling,
    )  # fmt: skip
    tiny_unet_checkpoint(tmp_path / "m.pt", stats, unet)
    model, loaded = load_model(tmp_path / "m.pt")
    assert loaded.ood is not None and loaded.ood.summary() == stats.summary()
    assert loaded.ood.layers == ["down.0", "down.1"] and loaded.ood.blocks == [4, 4, 8, 8]
    probe = [torch.rand(1, 40, 24)]
    served = extract_features(model, probe, source=feature_source(model, loaded.ood), tile=(16, 16))
    np.testing.assert_allclose(
        loaded.ood.scores(served), stats.scores(extract_features(unet, probe, tile=(16, 16))), rtol=1e-6
    )


def test_feature_layers_of_the_built_in_networks() -> None:
    unet = UNet(in_channels=1, out_channels=2, channels=[4, 8, 16])
    found = feature_layer(unet)
    assert found is not None and found[0] is unet.down[-1]
    from models.classifier import Classifier

    classifier = Classifier("resnet18", num_classes=2, in_channels=1)
    found = feature_layer(classifier)
    assert found is not None and found[0] is classifier.features
    assert feature_layer(nn.Conv2d(1, 1, 1)) is None


def test_the_tap_sees_the_forward_pass_of_its_own_thread_only_and_is_removed_after() -> None:
    unet = UNet(in_channels=1, out_channels=2, channels=[4, 8]).eval()
    x = torch.rand(3, 1, 16, 16)
    with torch.inference_mode(), FeatureTap(unet.down[-1]) as tap:
        unet(x)
        other = threading.Thread(target=lambda: unet(torch.rand(5, 1, 16, 16)))
        other.start()
        other.join()
    assert tap.features().shape == (3, 8)
    with torch.inference_mode():
        expected = unet.down[-1](unet.pool(unet.down[0](x))).mean(dim=(2, 3))
        unet(x)  # after the block: not collected
    torch.testing.assert_close(tap.features(), expected)


def test_tiled_features_are_the_mean_over_an_images_windows() -> None:
    unet = UNet(in_channels=1, out_channels=2, channels=[4, 8]).eval()
    images = [torch.rand(1, 40, 24), torch.rand(1, 16, 16)]
    legacy = feature_source(unet, sample_statistics(dim=8, groups=("all",)))  # the bottleneck's mean
    features = extract_features(unet, images, source=legacy, tile=(16, 16), overlap=0.25, batch_size=3)
    assert features.shape == (2, 8)
    for image, row in zip(images, features, strict=True):
        tiles, tiling = split_tiles(image, (16, 16), 0.25)
        assert window_count(image, (16, 16), 0.25) == len(tiling.positions) == tiles.shape[0]
        with torch.inference_mode():
            pooled = unet.down[-1](unet.pool(unet.down[0](tiles))).mean(dim=(2, 3))
        torch.testing.assert_close(row, pooled.mean(dim=0))


def test_a_loaded_model_scores_like_the_statistics_it_was_saved_with(tmp_path: Path) -> None:
    unet = UNet(in_channels=1, out_channels=2, channels=[4, 8]).eval()
    fit = extract_features(unet, [torch.rand(1, 16, 16) for _ in range(12)], tile=(16, 16))
    stats = fit_statistics(fit, [0] * 12, ["all"], fit[:4], features="bottleneck")
    tiny_unet_checkpoint(tmp_path / "m.pt", stats, unet)
    model, loaded = load_model(tmp_path / "m.pt")
    assert loaded.ood is not None
    probe = [torch.rand(1, 16, 16)]
    np.testing.assert_allclose(
        loaded.ood.scores(extract_features(model, probe, tile=(16, 16))),
        stats.scores(extract_features(unet, probe, tile=(16, 16))),
        rtol=1e-6,
    )
