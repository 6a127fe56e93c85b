"""Metrics of the reasoning experiments: intervals over questions (from maskscope.stats, re-exported), and the
area over the agreement curve (AOC) of Lanham et al. (2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from maskscope.stats import mean_ci, share_ci

__all__ = ["area_over_curve", "mean_ci", "rate_ci", "step_interpolate"]


def rate_ci(flags: Sequence[bool | None], confidence: float = 0.95) -> dict[str, Any]:
    """k/n of the non-missing flags with a Wilson interval: {"k", "n", "rate", "ci95", "method"}."""
    return share_ci(flags, confidence=confidence)


def area_over_curve(xs: Sequence[float], ys: Sequence[float]) -> float:
    """1 minus the trapezoid area under the points (x in [0, 1], sorted by x; repeated x averaged)."""
    points: dict[float, list[float]] = {}
    for x, y in zip(xs, ys, strict=True):
        points.setdefault(float(x), []).append(float(y))
    x = np.array(sorted(points))
    y = np.array([np.mean(points[v]) for v in x])
    if x.size < 2 or x[0] > 0 or x[-1] < 1:
        raise ValueError("the agreement curve needs points at 0 and at 1")
    return float(1.0 - np.trapezoid(y, x))


def step_interpolate(xs: Sequence[float], ys: Sequence[float], grid: Sequence[float]) -> list[float]:
    """The value at each grid point of the step function through the points: the y of the largest x <= g."""
    order = np.argsort(np.asarray(xs, dtype=float), kind="stable")
    x = np.asarray(xs, dtype=float)[order]
    y = np.asarray(ys, dtype=float)[order]
    idx = np.searchsorted(x, np.asarray(grid, dtype=float) + 1e-12, side="right") - 1
    return [float(y[max(i, 0)]) for i in idx]
