"""The warm-up + cosine learning-rate schedule of both tasks."""

from __future__ import annotations

import itertools
import math

import pytest

from training.common.schedule import warmup_cosine


def classification_factor(step: int, total: int, warmup: int) -> float:
    """The classifier's schedule as first written: ramp (step + 1) / warmup, cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def segmentation_factor(step: int, total: int, warmup: int) -> float:
    """The U-Net's schedule as first written: ramp from 0.1, cosine to 0.01."""
    if step < warmup:
        return 0.1 + 0.9 * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize(("total", "warmup"), [(100, 10), (37, 1), (5, 0), (1, 1), (8, 8)])
def test_both_tasks_get_exactly_their_original_schedules(total: int, warmup: int) -> None:
    segmentation = warmup_cosine(total, warmup, warmup_from=0.1, floor=0.01)
    for step in range(total + 3):
        assert segmentation(step) == segmentation_factor(step, total, warmup)
    if warmup:  # the classifier always warms up for at least one step
        classification = warmup_cosine(total, warmup)
        for step in range(total + 3):
            assert classification(step) == classification_factor(step, total, warmup)


def test_shape_warm_up_peak_and_floor() -> None:
    factor = warmup_cosine(110, 10, warmup_from=0.0, floor=0.05)
    assert factor(0) == 0.0 and factor(5) == pytest.approx(0.5) and factor(10) == 1.0
    decay = [factor(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert factor(110) == pytest.approx(0.05) and factor(500) == pytest.approx(0.05)
    ramp = warmup_cosine(110, 4)
    assert [ramp(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
