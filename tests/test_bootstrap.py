"""evals.bootstrap: percentile intervals that are seeded, cover what they should and refuse too few items."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evals.bootstrap import accuracy_ci, bootstrap_ci, paired_ppl_ratio_ci, perplexity_ci, speedup_ci


def test_seeded_and_contains_the_estimate():
    x = np.random.default_rng(3).normal(10.0, 2.0, size=40)
    a, b = bootstrap_ci(x, seed=1), bootstrap_ci(x, seed=1)
    assert a == b and a.n == (40,) and a.low < a.estimate < a.high
    assert a.estimate == pytest.approx(float(np.mean(x)))
    assert bootstrap_ci(x, seed=2) != a


def test_interval_matches_the_normal_approximation_for_the_mean():
    x = np.random.default_rng(0).normal(0.0, 1.0, size=400)
    ci = bootstrap_ci(x, resamples=4000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert ci.high - ci.low == pytest.approx(2 * half, rel=0.1)
    assert ci.contains(0.0)


def test_coverage_of_a_known_mean_is_near_nominal():
    rng = np.random.default_rng(11)
    hits = sum(
        bootstrap_ci(rng.normal(5.0, 1.0, size=30), resamples=400, seed=i).contains(5.0) for i in range(150)
    )
    assert 0.85 <= hits / 150 <= 0.99


def test_constant_data_gives_a_zero_width_interval():
    ci = bootstrap_ci([2.5, 2.5, 2.5])
    assert ci.low == ci.high == ci.estimate == 2.5


def test_too_few_items_gives_no_interval_and_bad_input_is_named():
    assert bootstrap_ci([1.0]) is None
    assert bootstrap_ci([1.0, 2.0, 3.0], min_items=4) is None
    with pytest.raises(ValueError, match="NaN or inf"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=1.5)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ci([1.0, 2.0], resamples=10)


def test_perplexity_accuracy_and_speedup_helpers():
    nll = [2.0, 2.2, 2.4, 2.6]
    ppl = perplexity_ci(nll)
    assert ppl.estimate == pytest.approx(math.exp(2.3))
    assert math.exp(2.0) <= ppl.low < ppl.estimate < ppl.high <= math.exp(2.6)
    acc = accuracy_ci([1, 1, 0, 1, 0, 1, 1, 1, 1, 0])
    assert acc.estimate == pytest.approx(0.7) and 0.3 <= acc.low < 0.7 < acc.high <= 1.0
    sp = speedup_ci([10.0, 11.0, 10.5, 10.2, 10.8], [5.0, 5.2, 5.1, 4.9, 5.3])
    assert sp.estimate == pytest.approx(10.5 / 5.1) and sp.n == (5, 5)
    assert 1.8 < sp.low <= sp.estimate <= sp.high < 2.3


def test_paired_ppl_ratio_cancels_the_spread_between_windows():
    dense = [1.5, 2.0, 2.5, 3.0, 3.5]  # windows of very different difficulty
    method = [d + delta for d, delta in zip(dense, [0.010, 0.012, 0.011, 0.009, 0.013])]
    r = paired_ppl_ratio_ci(method, dense)
    assert r.estimate == pytest.approx(math.exp(0.011))
    assert math.exp(0.009) <= r.low < r.estimate < r.high <= math.exp(0.013)
    unpaired = bootstrap_ci([method, dense], lambda a, b: math.exp(float(np.mean(a) - np.mean(b))))
    assert unpaired.high - unpaired.low > 10 * (r.high - r.low)
    with pytest.raises(ValueError, match="paired windows"):
        paired_ppl_ratio_ci(method[:3], dense)
