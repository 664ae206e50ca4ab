"""The shared training step: the same update as a hand-written fp32 step, and the scheduler advances."""

from __future__ import annotations

import torch
from torch import nn

from training.common.engine import to_device, train_step
from training.common.precision import MixedPrecision


def setup() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)


def test_train_step_matches_a_plain_step() -> None:
    images = to_device(torch.rand(4, 1, 8, 8), torch.device("cpu"))
    labels = torch.tensor([0, 1, 2, 1])
    criterion = nn.CrossEntropyLoss()

    model, optimizer, scheduler = setup()
    logits, loss = train_step(model, criterion, optimizer, scheduler, images, labels, MixedPrecision())

    reference, ref_optimizer, _ = setup()
    ref_loss = criterion(reference(images), labels)
    ref_loss.backward()
    ref_optimizer.step()
    assert logits.shape == (4, 3) and loss.dtype == torch.float32
    assert torch.equal(loss.detach(), ref_loss.detach())
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    assert scheduler.last_epoch == 1 and optimizer.param_groups[0]["lr"] == 0.05
