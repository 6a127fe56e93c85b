"""Metrics of the reasoning experiments: bootstrap intervals over questions, and the area over the agreement
curve (AOC) of Lanham et al. (2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import bootstrap

from maskscope.stats import wilson


def mean_ci(
    values: Sequence[float | None], *, seed: int = 0, resamples: int = 2000, confidence: float = 0.95
) -> dict[str, Any]:
    """Mean of the non-missing values with a percentile bootstrap interval (resampling the values, i.e. the
    questions). {"mean", "ci95", "n"}; the interval is [v, v] when every value is v, None when n < 2."""
    data = np.array([v for v in values if v is not None], dtype=float)
    n = int(data.size)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = float(data.mean())
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    if np.all(data == data[0]):
        return {"mean": mean, "ci95": [mean, mean], "n": n}
    res = bootstrap(
        (data,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return {
        "mean": mean,
        "ci95": [float(res.confidence_interval.low), float(res.confidence_interval.high)],
        "n": n,
    }


def rate_ci(flags: Sequence[bool | None], confidence: float = 0.95) -> dict[str, Any]:
    """k/n of the non-missing flags with a Wilson interval: {"k", "n", "rate", "ci95"}."""
    data = [bool(f) for f in flags if f is not None]
    k, n = sum(data), len(data)
    lo, hi = wilson(k, n, confidence)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci95": [lo, hi]}


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
