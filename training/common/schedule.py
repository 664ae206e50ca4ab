"""The learning-rate schedule of both tasks: linear warm-up, then cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(
    total_steps: int, warmup_steps: int, *, warmup_from: float | None = None, floor: float = 0.0
) -> Callable[[int], float]:
    """LR factor per step (for ``LambdaLR``), computed from the step alone so that resumed runs continue it.

    Args:
        total_steps: steps of the whole run.
        warmup_steps: steps of linear warm-up (0: none).
        warmup_from: factor at step 0, rising linearly to 1 at step ``warmup_steps``. None: the ramp
            ``(step + 1) / warmup_steps``, which reaches 1 on the last warm-up step.
        floor: the factor the cosine decays to at ``total_steps``.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            if warmup_from is None:
                return (step + 1) / warmup_steps
            return warmup_from + (1 - warmup_from) * step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
