"""Learning curves, written by the training of both tasks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def plot_history(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    loss_keys: Sequence[str] | None = None,
    metric_keys: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Writes a two-panel PNG of learning curves: losses (left) and metrics (right) against ``epoch``.

    Args:
        history: one mapping per epoch with an ``epoch`` key and numeric values.
        path: output PNG.
        loss_keys: series for the left panel; default every numeric key containing ``loss``.
        metric_keys: series for the right panel; default every other numeric key except ``epoch``, ``lr``
            and keys ending in ``_s`` (durations) or ``hd95`` (a different scale).
        title: figure title.
    """
    path = Path(path)
    keys: list[str] = []
    for row in history:
        keys += [k for k, v in row.items() if _is_number(v) and k not in keys]
    if loss_keys is None:
        loss_keys = [k for k in keys if "loss" in k]
    if metric_keys is None:
        skip = {"epoch", "lr", *loss_keys}
        metric_keys = [k for k in keys if k not in skip and not k.endswith(("_s", "hd95"))]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, series, label in ((ax_loss, loss_keys, "loss"), (ax_metric, metric_keys, "metric")):
        for key in series:
            points = [
                (r.get("epoch", i + 1), r[key]) for i, r in enumerate(history) if _is_number(r.get(key))
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
