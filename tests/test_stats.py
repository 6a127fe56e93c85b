"""Intervals and tests (maskscope.stats): never a zero-width interval from a handful of items, the cluster
bootstrap for samples nested in problems, paired tests, and Holm's correction."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binom, hypergeom

from maskscope.stats import (
    binomial_below,
    cluster_share_ci,
    fisher_2x2,
    holm,
    mcnemar,
    mean_ci,
    paired_diff,
    share_ci,
    wilson,
    wilson_mean,
)


def wilson_by_hand(k: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_no_zero_width_interval_from_a_handful_of_equal_items():
    """Twelve questions that all score 0 (or all 1) are a share: the Wilson interval, not [0, 0]."""
    for v in (0.0, 1.0):
        out = mean_ci([v] * 12)
        assert out["mean"] == v
        lo, hi = out["ci95"]
        assert hi - lo > 0.15
        np.testing.assert_allclose([lo, hi], np.clip(wilson_by_hand(12 * v, 12), 0, 1), atol=1e-9)
        assert "Wilson" in out["method"] and "12" in out["method"]
    # probabilities in [0, 1] without spread: the Wilson interval of their mean, items as units
    out = mean_ci([0.3] * 5)
    np.testing.assert_allclose(out["ci95"], wilson_by_hand(1.5, 5), atol=1e-9)
    assert out["ci95"][0] < 0.3 < out["ci95"][1]
    # unbounded values without spread: no interval rather than a false one
    assert mean_ci([7.0, 7.0, 7.0])["ci95"] is None
    # values with spread: a bootstrap interval that contains the mean, reproducible by seed
    data = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3]
    out = mean_ci(data, seed=3)
    assert out["ci95"][0] < np.mean(data) < out["ci95"][1] and "bootstrap" in out["method"]
    assert out == mean_ci(data, seed=3)


def test_wilson_mean_equals_the_wilson_interval_at_integer_counts():
    for k, n in [(0, 7), (3, 7), (7, 7), (13, 40)]:
        np.testing.assert_allclose(wilson_mean(k / n, n), wilson(k, n), atol=1e-9)
    assert share_ci([True, False, None, True]) == {
        "k": 2,
        "n": 3,
        "rate": 2 / 3,
        "ci95": list(wilson(2, 3)),
        "method": "Wilson 95% over 3 items",
    }


def test_cluster_bootstrap_keeps_the_samples_of_a_problem_together():
    """Ten problems, twenty samples each, every sample of a problem alike: the information is in ten
    problems, not 200 samples, so the interval is much wider than Wilson over 200 samples would claim."""
    groups = [[True] * 20 if i < 4 else [False] * 20 for i in range(10)]
    out = cluster_share_ci(groups, seed=0)
    assert out["rate"] == 0.4 and out["n"] == 200 and out["clusters"] == 10
    naive = wilson(80, 200)
    assert out["ci95"][1] - out["ci95"][0] > 2 * (naive[1] - naive[0])
    # the bootstrap distribution is that of 20 * Binomial(10, 0.4) / 200: its quantiles are known exactly
    lo, hi = binom.ppf([0.025, 0.975], 10, 0.4) / 10
    assert out["ci95"][0] == pytest.approx(lo, abs=0.1001) and out["ci95"][1] == pytest.approx(hi, abs=0.1001)
    assert "cluster bootstrap" in out["method"]
    # one sample per problem: plain Wilson; problems that do not differ: Wilson with problems as units
    assert cluster_share_ci([[True], [False], [False]])["ci95"] == list(wilson(1, 3))
    flat = cluster_share_ci([[False] * 20] * 6)
    np.testing.assert_allclose(flat["ci95"], wilson(0, 6), atol=1e-9)
    assert flat["ci95"][1] > 0.3


def test_paired_difference_and_mcnemar_by_hand():
    a = [0.5, 0.65, 0.7, 0.9, 0.43, 0.8]
    b = [0.4, 0.4, 0.6, 0.35, 0.5, 0.5]
    out = paired_diff(a, b, seed=0)
    assert out["mean"] == pytest.approx(np.mean(np.subtract(a, b)))
    # the exact signed-rank p-value by enumerating the 2^6 sign patterns
    d = np.subtract(a, b)
    ranks = np.argsort(np.argsort(np.abs(d))) + 1.0
    observed = ranks[d > 0].sum()
    stats = [
        sum(r for r, s in zip(ranks, signs, strict=True) if s)
        for signs in itertools.product([0, 1], repeat=6)
    ]
    tail = min(np.mean([s >= observed for s in stats]), np.mean([s <= observed for s in stats]))
    assert out["p_value"] == pytest.approx(min(1.0, 2 * tail))
    same = paired_diff(a, a)
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0] and same["p_value"] == 1.0
    # McNemar: 7 pairs where only b is right, 1 where only a is: binomial(1 of 8, 1/2) one-sided
    x = [True] * 5 + [False] * 7 + [True] + [False] * 3
    y = [True] * 5 + [True] * 7 + [False] + [False] * 3
    m = mcnemar(x, y, alternative="less")
    assert (m["a_only"], m["b_only"]) == (1, 7)
    assert m["p_value"] == pytest.approx(binom.cdf(1, 8, 0.5))


def test_fisher_and_binomial_tests_by_hand():
    table = [[1, 9], [8, 2]]
    # one-sided "less": P(X <= 1) for the hypergeometric count in the top-left cell
    expected = hypergeom.cdf(1, 20, 10, 9)
    assert fisher_2x2(table, alternative="less") == pytest.approx(expected)
    assert binomial_below(2, 24, 1 / 3) == pytest.approx(binom.cdf(2, 24, 1 / 3))
    assert binomial_below(0, 0, 0.5) == 1.0


def test_holm_controls_the_family():
    """Holm by hand: sorted p-values compared with alpha / (m - rank), stopping at the first failure."""
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005 <= 0.05/4, 0.01 <= 0.05/3, 0.03 > 0.05/2 -> stop
    assert holm(p) == [True, False, False, True]
    # 30 cells each at p = 0.02 would each be flagged at 5% uncorrected; Holm flags none
    assert not any(holm([0.02] * 30))
    assert holm([0.001] * 30) == [True] * 30


def test_intervals_hold_their_estimate_exactly():
    """A share of 0 (or 1) from items that do not differ: the bound at the estimate is the estimate itself,
    not a rounding error beside it (which made a plot refuse a negative error bar)."""
    from maskscope.stats import wilson_mean

    for n in (3, 24, 240):
        assert wilson_mean(0.0, n)[0] == 0.0 and wilson_mean(1.0, n)[1] == 1.0
        lo, hi = wilson_mean(0.25, n)
        assert lo <= 0.25 <= hi
