"""Confidence intervals and tests, one convention for every experiment.

- a share of independent items (k of n): the Wilson score interval (`share_ci`);
- a mean of numbers, one per item (problem, question): a percentile bootstrap over the items (`mean_ci`);
  when the items show no spread at all the bootstrap would give a zero-width interval, so values in [0, 1] get
  the Wilson interval of their mean with the items as the units (a Bernoulli variable has the largest variance
  a [0, 1] variable with that mean can have, so this interval is conservative), and other values get none;
- a share of samples that nest in problems (several samples per problem): a cluster bootstrap that resamples
  problems with all their samples (`cluster_share_ci`), with the same fallback when problems do not differ;
- paired designs (two conditions on the same problems): the interval of the mean per-problem difference and a
  paired test (`paired_diff`, `mcnemar`);
- two groups of replicates (training seeds) on the same items: the difference of the group means with a
  two-way bootstrap over the items and over each group's replicates (`did_ci`);
- the difference of two shares from independent samples: Newcombe's hybrid score interval (`share_diff_ci`);
- many cells flagged at once: Holm's step-down correction of the family (`holm`).

Every interval dictionary carries a "method" string that says which of these produced it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest, bootstrap, fisher_exact, norm, wilcoxon

WILSON = "Wilson 95% over {n} {unit}"


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (scipy's implementation); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def wilson_mean(mean: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for the mean of n values in [0, 1] (k = n * mean need not be an integer)."""
    if n == 0:
        return 0.0, 1.0
    z = float(norm.ppf(0.5 + confidence / 2))
    p = min(max(mean, 0.0), 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # the interval holds p exactly (rounding put 1.4e-17 above a mean of 0, and plots drew negative bars)
    return min(max(0.0, centre - half), p), max(min(1.0, centre + half), p)


def share_ci(flags: Sequence[bool | None], unit: str = "items", confidence: float = 0.95) -> dict[str, Any]:
    """k/n of the non-missing flags with a Wilson interval: {"k", "n", "rate", "ci95", "method"}."""
    data = [bool(f) for f in flags if f is not None]
    k, n = sum(data), len(data)
    lo, hi = wilson(k, n, confidence)
    return {
        "k": k,
        "n": n,
        "rate": k / n if n else None,
        "ci95": [lo, hi],
        "method": WILSON.format(n=n, unit=unit),
    }


def mean_ci(
    values: Sequence[float | None],
    *,
    seed: int = 0,
    resamples: int = 2000,
    confidence: float = 0.95,
    unit: str = "items",
) -> dict[str, Any]:
    """Mean of the non-missing values with a 95% interval over the items: {"mean", "ci95", "n", "method"}.

    0/1 values are a share (Wilson); other values a percentile bootstrap over the items. Never a zero-width
    interval: with no spread, values in [0, 1] get the Wilson interval of their mean, others none."""
    data = np.array([v for v in values if v is not None], dtype=float)
    n = int(data.size)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0, "method": "no values"}
    mean = float(data.mean())
    if np.all((data == 0) | (data == 1)):
        lo, hi = wilson(int(data.sum()), n, confidence)
        return {"mean": mean, "ci95": [lo, hi], "n": n, "method": WILSON.format(n=n, unit=unit)}
    bounded = bool(np.all((data >= 0) & (data <= 1)))
    if n < 2 or np.all(data == data[0]):
        if bounded:
            lo, hi = wilson_mean(mean, n, confidence)
            method = f"Wilson 95% bound for a [0, 1] mean over {n} {unit} (no spread to resample)"
            return {"mean": mean, "ci95": [lo, hi], "n": n, "method": method}
        return {"mean": mean, "ci95": None, "n": n, "method": f"none: the {n} {unit} do not vary"}
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
        "method": f"percentile bootstrap 95% over {n} {unit}",
    }


def cluster_share_ci(
    groups: Sequence[Sequence[bool]],
    *,
    seed: int = 0,
    resamples: int = 2000,
    confidence: float = 0.95,
    unit: str = "problems",
) -> dict[str, Any]:
    """Share of flags over all samples, where each group holds the samples of one problem.

    {"k", "n", "rate", "ci95", "clusters", "method"}: Wilson when every group holds one sample; otherwise a
    percentile cluster bootstrap (problems resampled with all their samples, the share recomputed); when the
    problems' shares do not differ, the Wilson interval of the share with the problems as the units."""
    groups = [[bool(f) for f in g] for g in groups if len(g)]
    k_g = np.array([sum(g) for g in groups], dtype=float)
    n_g = np.array([len(g) for g in groups], dtype=float)
    k, n, c = int(k_g.sum()), int(n_g.sum()), len(groups)
    out: dict[str, Any] = {"k": k, "n": n, "rate": k / n if n else None, "clusters": c}
    if n == 0:
        return {**out, "ci95": [0.0, 1.0], "method": "no samples"}
    if np.all(n_g == 1):
        lo, hi = wilson(k, n, confidence)
        return {**out, "ci95": [lo, hi], "method": WILSON.format(n=n, unit=unit)}
    shares = k_g / n_g
    if c < 2 or np.all(shares == shares[0]):
        lo, hi = wilson_mean(k / n, c, confidence)
        method = f"Wilson 95% with the {c} {unit} as units (their shares do not differ)"
        return {**out, "ci95": [lo, hi], "method": method}
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, c, size=(resamples, c))
    boot = k_g[picks].sum(axis=1) / n_g[picks].sum(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    method = f"cluster bootstrap 95% over {c} {unit} ({n} samples; problems resampled with their samples)"
    return {**out, "ci95": [float(lo), float(hi)], "method": method}


def share_diff_ci(k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95) -> dict[str, Any]:
    """Difference k1/n1 - k2/n2 of two shares from independent samples, with Newcombe's hybrid score interval
    (his method 10, built from the two Wilson intervals): {"diff", "ci95", "method"}; diff None when either
    sample is empty. Written here because scipy has no interval for a difference of two proportions."""
    if n1 == 0 or n2 == 0:
        return {"diff": None, "ci95": [-1.0, 1.0], "method": "no samples on one side"}
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, confidence)
    l2, u2 = wilson(k2, n2, confidence)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    method = f"Newcombe hybrid score 95% (from the Wilson intervals of {n1} and {n2} independent samples)"
    return {"diff": d, "ci95": [max(-1.0, lo), min(1.0, hi)], "method": method}


def paired_diff(
    a: Sequence[float],
    b: Sequence[float],
    *,
    seed: int = 0,
    resamples: int = 2000,
    confidence: float = 0.95,
    unit: str = "problems",
) -> dict[str, Any]:
    """Mean of a_i - b_i over items measured under both conditions, with a percentile bootstrap interval over
    the items and the two-sided Wilcoxon signed-rank p-value (exact for small n, zero differences dropped).

    {"mean", "ci95", "n", "p_value", "method"}; with no spread among the differences the interval is None
    unless they are all 0, where it is [0, 0] only if the two conditions are the same numbers (p-value 1)."""
    x = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0, "p_value": None, "method": "no pairs"}
    mean = float(x.mean())
    nonzero = x[x != 0]
    p_value = 1.0 if nonzero.size == 0 else float(wilcoxon(nonzero).pvalue)
    method = f"paired: percentile bootstrap 95% over {n} {unit} of the differences; Wilcoxon signed-rank test"
    if np.all(x == x[0]):
        ci = [mean, mean] if mean == 0 else None
        return {"mean": mean, "ci95": ci, "n": n, "p_value": p_value, "method": method + " (no spread)"}
    res = bootstrap(
        (x,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci95 = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    return {"mean": mean, "ci95": ci95, "n": n, "p_value": p_value, "method": method}


def did_ci(
    treated: Sequence[Sequence[float]],
    control: Sequence[Sequence[float]],
    *,
    seed: int = 0,
    resamples: int = 2000,
    confidence: float = 0.95,
    unit: str = "questions",
) -> dict[str, Any]:
    """Difference between two groups of replicates (e.g. training seeds) measured on the same items: the
    mean over items of (mean over the treated replicates - mean over the control replicates). `treated` and
    `control` are [replicates x items]. The interval is a two-way percentile bootstrap: each resample draws
    the items with replacement and, independently, each group's replicates with replacement.

    {"mean", "ci95", "n", "replicates", "method"}; with no spread the interval is [0, 0] when every
    difference is exactly 0 (the two groups give the same numbers), else None."""
    t = np.atleast_2d(np.asarray(treated, dtype=float))
    c = np.atleast_2d(np.asarray(control, dtype=float))
    if t.shape[1] != c.shape[1]:
        raise ValueError(f"both groups must be measured on the same items ({t.shape[1]} vs {c.shape[1]})")
    n, st, sc = int(t.shape[1]), int(t.shape[0]), int(c.shape[0])
    method = (
        f"two-way percentile bootstrap 95% over {n} {unit} and over each group's replicates "
        f"({st} treated, {sc} control, resampled within their group)"
    )
    if st == 1 or sc == 1:
        method += "; a group with one replicate adds no replicate variation"
    out: dict[str, Any] = {"n": n, "replicates": [st, sc], "method": method}
    if n == 0 or st == 0 or sc == 0:
        return {**out, "mean": None, "ci95": None}
    per_item = t.mean(axis=0) - c.mean(axis=0)
    mean = float(per_item.mean())
    if np.all(t == t[0, 0]) and np.all(c == c[0, 0]) or np.array_equal(t, c):
        return {**out, "mean": mean, "ci95": [mean, mean] if mean == 0 else None}
    rng = np.random.default_rng(seed)
    items = rng.integers(0, n, size=(resamples, n))
    t_bar = t[rng.integers(0, st, size=(resamples, st))].mean(axis=1)  # [resamples, items]
    c_bar = c[rng.integers(0, sc, size=(resamples, sc))].mean(axis=1)
    boot = np.take_along_axis(t_bar - c_bar, items, axis=1).mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    if lo == hi:
        return {**out, "mean": mean, "ci95": [mean, mean] if mean == 0 and np.all(per_item == 0) else None}
    return {**out, "mean": mean, "ci95": [float(lo), float(hi)]}


def mcnemar(a: Sequence[bool], b: Sequence[bool], alternative: str = "two-sided") -> dict[str, Any]:
    """Exact McNemar test of paired flags (the same items under two conditions): a binomial test of the
    discordant pairs. {"a_only", "b_only", "n", "p_value", "alternative", "method"}; "less" tests whether a
    is right less often than b."""
    a_only = sum(bool(x) and not bool(y) for x, y in zip(a, b, strict=True))
    b_only = sum(bool(y) and not bool(x) for x, y in zip(a, b, strict=True))
    d = a_only + b_only
    p = 1.0 if d == 0 else float(binomtest(a_only, d, 0.5, alternative=alternative).pvalue)
    return {
        "a_only": a_only,
        "b_only": b_only,
        "n": len(a),
        "p_value": p,
        "alternative": alternative,
        "method": "exact McNemar (binomial test of the discordant pairs)",
    }


def fisher_2x2(table: Sequence[Sequence[int]], alternative: str = "two-sided") -> float:
    """p-value of Fisher's exact test of a 2 x 2 table (scipy)."""
    return float(fisher_exact(np.asarray(table, dtype=int), alternative=alternative).pvalue)


def binomial_below(k: int, n: int, p0: float) -> float:
    """One-sided exact binomial p-value that the rate behind k of n is below p0 (1.0 when n is 0)."""
    return 1.0 if n == 0 else float(binomtest(k, n, p0, alternative="less").pvalue)


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down rejections at family-wise error rate alpha, in the order of the p-values given."""
    order = np.argsort(np.asarray(p_values, dtype=float), kind="stable")
    m = len(order)
    reject = [False] * m
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (m - rank):
            break
        reject[int(i)] = True
    return reject


def binomial_two_sided(k: int, n: int, p0: float) -> float:
    """Two-sided exact binomial p-value of k of n against the probability p0 (1.0 when n is 0)."""
    if n == 0:
        return 1.0
    return float(binomtest(k, n, min(max(p0, 0.0), 1.0)).pvalue)
