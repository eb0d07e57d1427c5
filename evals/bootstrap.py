"""Percentile bootstrap confidence intervals for the few-item numbers of the result tables.

``bootstrap_ci(samples, statistic)`` resamples each sample independently with replacement
(``resamples`` times, seeded) and returns the central ``confidence`` interval of the statistic over
the resamples, by percentiles. Several samples are for statistics of independent groups, e.g. the
ratio of dense to sparse median prefill times. Fewer than ``min_items`` items in any sample: no
interval (None), never a made-up one. With 2-8 items the percentile interval is known to be too
narrow; the tables print the item count beside every interval for that reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval and the item counts behind it."""

    estimate: float
    low: float
    high: float
    n: tuple[int, ...]
    confidence: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def _as_samples(samples) -> list[np.ndarray]:
    if isinstance(samples, np.ndarray) or (len(samples) and not hasattr(samples[0], "__len__")):
        samples = [samples]
    out = [np.asarray(s, dtype=np.float64).ravel() for s in samples]
    if not out:
        raise ValueError("bootstrap_ci needs at least one sample")
    for s in out:
        if not np.all(np.isfinite(s)):
            raise ValueError("bootstrap_ci: a sample holds NaN or inf; drop or fix those items first")
    return out


def bootstrap_ci(
    samples: Sequence[float] | Sequence[Sequence[float]],
    statistic: Callable[..., float] = np.mean,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    min_items: int = 2,
) -> Interval | None:
    """The statistic on the samples and its percentile bootstrap interval (None: too few items).

    ``samples`` is one sequence of numbers, or a sequence of sequences (independent groups; the
    statistic then takes one array per group). ``statistic`` maps array(s) to a float.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 100:
        raise ValueError(f"resamples must be at least 100, got {resamples}")
    groups = _as_samples(samples)
    sizes = tuple(int(s.size) for s in groups)
    if min(sizes) < max(1, min_items):
        return None
    estimate = float(statistic(*groups))
    rng = np.random.default_rng(seed)
    picks = [s[rng.integers(0, s.size, size=(resamples, s.size))] for s in groups]
    values = np.array([float(statistic(*(p[i] for p in picks))) for i in range(resamples)])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return Interval(estimate, float(low), float(high), sizes, confidence)


def perplexity_ci(window_nll: Sequence[float], **kw) -> Interval | None:
    """Perplexity ``exp(mean NLL)`` over equal-length windows, with the windows resampled."""
    return bootstrap_ci(window_nll, lambda x: math.exp(float(np.mean(x))), **kw)


def paired_ppl_ratio_ci(method_nll: Sequence[float], dense_nll: Sequence[float], **kw) -> Interval | None:
    """``ppl(method) / ppl(dense)`` over the same equal-length windows, ``exp(mean(method - dense))``,
    with the windows resampled in pairs (the window-to-window spread of the text cancels)."""
    if len(method_nll) != len(dense_nll):
        raise ValueError(f"paired windows: {len(method_nll)} method NLLs but {len(dense_nll)} dense NLLs")
    diffs = np.asarray(method_nll, dtype=np.float64) - np.asarray(dense_nll, dtype=np.float64)
    return bootstrap_ci(diffs, lambda d: math.exp(float(np.mean(d))), **kw)


def accuracy_ci(scores: Sequence[float], **kw) -> Interval | None:
    """Mean item score (e.g. NIAH exact match in {0, 1}) with the items resampled."""
    return bootstrap_ci(scores, np.mean, **kw)


def speedup_ci(baseline_ms: Sequence[float], method_ms: Sequence[float], **kw) -> Interval | None:
    """``median(baseline) / median(method)`` (a speed-up > 1 is faster), the two timing runs resampled
    independently."""
    return bootstrap_ci([baseline_ms, method_ms], lambda a, b: float(np.median(a) / np.median(b)), **kw)
