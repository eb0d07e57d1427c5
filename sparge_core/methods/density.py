"""Density matching: configure any registered method so that its block map keeps a target fraction of
the block pairs, by bisection on the method's own budget knob.

Density = kept block pairs / block pairs the causal mask allows (all pairs when not causal), counted
over every batch element and query head, i.e. ``1 - qk_sparsity`` of ``SparsityStats``. The paper's
tables compare methods at equal sparsity (e.g. 0.5 and 0.3, densities 0.5 and 0.7); this is how we
put every method at the same density on the same kernel.

Knobs (``budget_knob``): ``sparge`` -> ``cdfthreshd`` in [0, 1]; ``sparge-topk`` -> ``topk`` in [0, 1];
``minference`` -> ``budget_ratio`` in [0, inf) (scales every head's budgets); ``flexprefill`` -> ``gamma``
in [0, 1]; ``dense`` has none (density 1). A method registered later declares ``budget_param`` and a
``budget_range`` class attribute ``(low, high or None)``.

Every knob is assumed to make the density non-decreasing as it grows (true of all the methods
here). The density is a step function of the knob, so the result is the closest step to the
target seen; bisection stops at a density within ``tol / 4`` of the target, when the knob interval
is below ``1e-6`` (relative), or after ``max_iter`` mask evaluations. Where a method cannot reach
the target (its floors, e.g. sink/local lines, ``min_budget`` or non-self-similar blocks that sparge
always keeps, or a step wider than ``2 tol``), the closest reachable density is returned and a
warning says so; ``strict=True`` raises ``DensityNotReachable`` instead.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import validation
from . import _blockmaps as bm
from . import get_method, method_class
from .base import AttentionMethod

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.02
# methods defined elsewhere whose knob range is not declared on the class
_KNOWN_RANGES: dict[str, tuple[float, float | None]] = {"sparge": (0.0, 1.0), "sparge-topk": (0.0, 1.0)}
_MAX_UNBOUNDED = float(2**24)


class DensityNotReachable(ValueError):
    """The method's budget knob cannot bring its density within the tolerance of the target."""


@dataclass(frozen=True)
class Knob:
    """A method's budget parameter and its range (``high`` None: unbounded above)."""

    name: str
    low: float
    high: float | None


def budget_knob(method_name: str) -> Knob | None:
    """The knob density matching turns for ``method_name`` (None: the method has no budget)."""
    cls = method_class(method_name)
    param = getattr(cls, "budget_param", None)
    if param is None:
        return None
    span = getattr(cls, "budget_range", None) or _KNOWN_RANGES.get(method_name)
    if span is None:
        raise ValueError(
            f"method {method_name!r} has budget_param {param!r} but no budget_range; "
            "declare budget_range = (low, high or None) on the class"
        )
    return Knob(param, float(span[0]), None if span[1] is None else float(span[1]))


def method_density(
    method: AttentionMethod, q: torch.Tensor, k: torch.Tensor, *, is_causal: bool, scale: float | None = None
) -> float:
    """The density of ``method``'s block map on (q, k)."""
    mask = method.block_mask(q, k, is_causal=is_causal, scale=scale)
    return bm.mask_density(mask, q.shape[2], k.shape[2], is_causal)


def _check_target(target_density: Any, tol: Any) -> tuple[float, float]:
    if isinstance(target_density, bool) or not isinstance(target_density, (int, float)):
        raise TypeError(f"target_density must be a number, got {target_density!r}")
    if not (0.0 < target_density <= 1.0):
        raise ValueError(f"target_density must be in (0, 1], got {target_density}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < 1):
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    return float(target_density), float(tol)


class _Evaluator:
    """Builds the method at a knob value and measures its density, caching every evaluation."""

    def __init__(self, name: str, knob: Knob, fixed: dict, q, k, is_causal: bool, scale):
        self.name, self.knob, self.fixed = name, knob, fixed
        self.q, self.k, self.is_causal, self.scale = q, k, is_causal, scale
        self.seen: dict[float, float] = {}

    def method(self, value: float) -> AttentionMethod:
        return get_method(self.name, **self.fixed, **{self.knob.name: value})

    def __call__(self, value: float) -> float:
        if value not in self.seen:
            self.seen[value] = method_density(
                self.method(value), self.q, self.k, is_causal=self.is_causal, scale=self.scale
            )
        return self.seen[value]

    def closest(self, target: float) -> tuple[float, float]:
        value = min(self.seen, key=lambda x: (abs(self.seen[x] - target), x))
        return value, self.seen[value]


def _upper_end(evaluate: _Evaluator, target: float) -> float:
    """For an unbounded knob: double from 1 until the density reaches the target (or stops growing)."""
    high = max(1.0, evaluate.knob.low)
    while evaluate(high) < target and high < _MAX_UNBOUNDED:
        if evaluate(high) >= 1.0:
            break
        high *= 2.0
    return high


def _bisect(evaluate: _Evaluator, low: float, high: float, target: float, max_iter: int, tol: float) -> None:
    for _ in range(max_iter):
        if high - low <= 1e-6 * max(1.0, abs(high)):
            break
        mid = 0.5 * (low + high)
        density = evaluate(mid)
        if abs(density - target) <= tol / 4:
            break
        if density < target:
            low = mid
        else:
            high = mid


def match_density(
    method_name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    target_density: float,
    is_causal: bool,
    *,
    scale: float | None = None,
    tol: float = DEFAULT_TOLERANCE,
    max_iter: int = 40,
    strict: bool = False,
    **fixed: Any,
) -> tuple[AttentionMethod, float]:
    """Configure ``method_name`` (with its other parameters ``fixed``) to reach ``target_density`` on
    (q, k); returns ``(method, reached_density)``.

    The reached density is the closest one the method's knob can produce; if it is more than ``tol``
    from the target a warning is logged (``strict=True``: ``DensityNotReachable`` is raised).
    """
    target, tol = _check_target(target_density, tol)
    validation.check_qk(q, k)
    validation.check_flag("is_causal", is_causal)
    validation.check_flag("strict", strict)
    knob = budget_knob(method_name)
    if knob is None:
        method = get_method(method_name, **fixed)
        reached = method_density(method, q, k, is_causal=is_causal, scale=scale)
        _report(method_name, None, target, reached, tol, strict, f"{method_name!r} has no budget knob")
        return method, reached
    if knob.name in fixed:
        raise TypeError(
            f"match_density sets {method_name!r}'s budget parameter {knob.name!r} itself; "
            "do not pass it among the fixed parameters"
        )

    evaluate = _Evaluator(method_name, knob, fixed, q, k, is_causal, scale)
    low = knob.low
    high = knob.high if knob.high is not None else _upper_end(evaluate, target)
    d_low, d_high = evaluate(low), evaluate(high)
    if d_low < target < d_high:
        _bisect(evaluate, low, high, target, max_iter, tol)
    value, reached = evaluate.closest(target)
    reason = (
        f"{knob.name} in [{low:g}, {high:g}] gives densities in [{d_low:.4f}, {d_high:.4f}]"
        f" with {fixed or 'default parameters'}"
    )
    _report(method_name, knob.name, target, reached, tol, strict, reason)
    logger.info(
        "match_density: %s %s=%.6g -> density %.4f (target %.4f, %d evaluations)",
        method_name,
        knob.name,
        value,
        reached,
        target,
        len(evaluate.seen),
    )
    return evaluate.method(value), reached


def _report(
    name: str, knob: str | None, target: float, reached: float, tol: float, strict: bool, reason: str
) -> None:
    if abs(reached - target) <= tol or math.isclose(abs(reached - target), tol):
        return
    message = (
        f"{name}: density {target:.3f} is not reachable within {tol} "
        f"(closest {reached:.4f}{f' via {knob}' if knob else ''}); {reason}"
    )
    if strict:
        raise DensityNotReachable(message)
    logger.warning(message)
