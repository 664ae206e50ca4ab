"""The transfer-learning classifier: backbones, strategies, heads, pretrained weights, calibration."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from models.checkpoint import Architecture, CheckpointMetadata, load_model, save_checkpoint
from models.classifier import (
    BACKBONES,
    HEADS,
    NUM_STAGES,
    Classifier,
    PretrainedWeightsError,
    fit_temperature,
    imagenet_weights_file,
    probabilities,
)
from models.preprocessing import Preprocessing

REQUIRED = {"resnet18", "resnet50", "vgg16", "vgg19", "densenet121", "mobilenet_v3_large", "efficientnet_b0"}


def _trainable(module: torch.nn.Module) -> list[bool]:
    return [p.requires_grad for p in module.parameters()]


def test_the_issue_backbones_are_offered() -> None:
    assert set(BACKBONES) >= REQUIRED


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_every_backbone_builds_with_every_strategy(backbone: str) -> None:
    model = Classifier(backbone, num_classes=3, in_channels=1, head="gap", pretrained="none")
    assert len(model.features) == NUM_STAGES
    x = torch.rand(2, 1, 32, 32)

    model.set_strategy("full")
    assert all(_trainable(model))

    model.set_strategy("partial", freeze_stages=2)
    for index, stage in enumerate(model.features):
        assert all(not t for t in _trainable(stage)) if index < 2 else all(_trainable(stage))
    assert all(_trainable(model.head))

    model.set_strategy("frozen")
    assert not any(_trainable(model.features))
    assert all(_trainable(model.head))

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(("strategy", "n_frozen"), [("partial", 3), ("frozen", NUM_STAGES)])
def test_a_training_step_changes_only_trainable_parameters(strategy: str, n_frozen: int) -> None:
    torch.manual_seed(0)
    model = Classifier("resnet18", num_classes=2, in_channels=1, head="fc", pretrained="none")
    model.set_strategy(strategy, freeze_stages=3)
    model.train()
    before = _state(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    after = model.state_dict()

    frozen_prefixes = tuple(f"features.{i}." for i in range(n_frozen))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Frozen stages: weights AND batch-norm running statistics stay exactly as they were.
    assert not [k for k in changed if k.startswith(frozen_prefixes)]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n in changed for n in trainable)
    assert all(not n.startswith(frozen_prefixes) for n in trainable)


@pytest.mark.parametrize("head", HEADS)
def test_each_head_gives_valid_probabilities(head: str) -> None:
    torch.manual_seed(0)
    model = Classifier(
        "mobilenet_v3_small", num_classes=4, in_channels=3, head=head, pretrained="none"
    ).eval()
    with torch.no_grad():
        logits = model(torch.rand(5, 3, 32, 32))
    assert logits.shape == (5, 4)
    for temperature in (0.5, 1.0, 3.0):
        p = probabilities(logits, temperature)
        assert torch.all((p >= 0) & (p <= 1))
        torch.testing.assert_close(p.sum(dim=1), torch.ones(5))
        assert torch.equal(p.argmax(1), logits.argmax(1))


def test_fc_head_is_a_hidden_stack_with_dropout() -> None:
    model = Classifier(
        "resnet18", num_classes=2, head="fc", fc_hidden=(64, 32), dropout=0.3, pretrained="none"
    )
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 64), (64, 32), (32, 2)]
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.head) == 2
    gap = Classifier("resnet18", num_classes=2, head="gap", pretrained="none")
    assert [type(m) for m in gap.head][-1] is torch.nn.Linear
    assert sum(isinstance(m, torch.nn.Linear) for m in gap.head) == 1


def _save_torchvision_weights(
    path: Path, backbone: str = "resnet18", seed: int = 1
) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = torchvision.models.get_model(backbone, weights=None).state_dict()
    torch.save(state, path)
    return state


def test_local_pretrained_file_is_loaded_and_summed_for_gray(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    saved = _save_torchvision_weights(path)

    rgb = Classifier("resnet18", in_channels=3, pretrained=path).eval()
    # features.<stage>: 0 = stem (conv1, bn1, relu, maxpool), 1..4 = layer1..layer4
    state = rgb.state_dict()
    torch.testing.assert_close(state["features.0.0.weight"], saved["conv1.weight"])
    torch.testing.assert_close(state["features.4.1.conv2.weight"], saved["layer4.1.conv2.weight"])
    torch.testing.assert_close(state["features.1.0.bn1.running_var"], saved["layer1.0.bn1.running_var"])

    gray = Classifier("resnet18", in_channels=1, pretrained=path).eval()
    gray_conv = gray.state_dict()["features.0.0.weight"]
    torch.testing.assert_close(gray_conv, saved["conv1.weight"].sum(dim=1, keepdim=True))
    # A gray image through the adapted network == the same image repeated into RGB through the original.
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gray.embed(x), rgb.embed(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


def test_pretrained_file_of_another_backbone_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    _save_torchvision_weights(path)
    with pytest.raises(PretrainedWeightsError, match="resnet34"):
        Classifier("resnet34", pretrained=path)
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        Classifier("resnet18", pretrained=tmp_path / "missing.pth")


def _no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_imagenet_without_network_says_where_to_put_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_network(monkeypatch, tmp_path)
    expected = tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_weights_file("resnet18") == expected
    with pytest.raises(PretrainedWeightsError) as info:
        Classifier("resnet18", pretrained="imagenet")
    message = str(info.value)
    assert str(expected) in message
    assert "--pretrained PATH" in message and "--pretrained none" in message


def test_imagenet_file_placed_in_the_hub_cache_is_used_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _no_network(monkeypatch, tmp_path)
    target = imagenet_weights_file("resnet18")
    target.parent.mkdir(parents=True)
    saved = _save_torchvision_weights(target, seed=3)
    model = Classifier("resnet18", in_channels=3, pretrained="imagenet")
    torch.testing.assert_close(
        model.state_dict()["features.3.0.conv1.weight"], saved["layer3.0.conv1.weight"]
    )


def test_checkpoint_round_trip_needs_no_pretrained_weights(tmp_path: Path) -> None:
    weights = tmp_path / "resnet18.pth"
    _save_torchvision_weights(weights)
    model = Classifier("resnet18", num_classes=3, in_channels=1, head="svm", pretrained=weights).eval()
    args = model.architecture_args()
    assert "pretrained" not in args
    meta = CheckpointMetadata(
        task="classification",
        architecture=Architecture(name="classifier", args=args),
        classes=["a", "b", "c"],
        preprocessing=Preprocessing(in_channels=1, img_size=(32, 32), resize="resize"),
        extra={"temperature": 2.0},
    )
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, meta)
    weights.unlink()  # the pretrained file is not needed to load the checkpoint
    loaded, loaded_meta = load_model(path)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded_meta.architecture.args["head"] == "svm"


def test_fit_temperature_recovers_overconfidence() -> None:
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 3) * 2
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1).squeeze(1)
    temperature = fit_temperature(true_logits * 4.0, labels)
    assert 3.4 < temperature < 4.6
    assert fit_temperature(torch.zeros((0, 3)), torch.zeros(0, dtype=torch.long)) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "alexnet"}, "unknown backbone"),
        ({"head": "rbf"}, "unknown head"),
        ({"num_classes": 1}, "at least 2"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Classifier(**{"backbone": "mobilenet_v3_small", **kwargs})  # type: ignore[arg-type]


def test_bad_strategy_is_a_clear_error() -> None:
    model = Classifier("mobilenet_v3_small")
    with pytest.raises(ValueError, match="unknown strategy"):
        model.set_strategy("half")
    with pytest.raises(ValueError, match="freezes 1 to 4"):
        model.set_strategy("partial", freeze_stages=NUM_STAGES)
