"""Pure search functions: the sparsest per-head hyperparameters whose attention error stays bounded.

Problem (SpargeAttn paper section 3.6): for one attention layer with captured samples
``(q, k, v)``, choose per query head ``(simthreshd1, cdfthreshd | topk)`` that maximise block sparsity
subject to the worst relative L1 error over all samples ``<= l1`` (stage 1), then lower ``pvthreshd``
as far as possible subject to ``<= pv_l1`` (stage 2). Heads whose best sparsity is ``<= 0.1`` run dense.

How we use the structure (the official tuner sweeps 32 simthreshd1 values x bisection, per head,
sequentially, for hours):
- every evaluation runs **all heads of the layer at once** (per-head hyperparameter vectors in one
  ``sparge_attn`` call per sample), each head following its own bisection;
- for fixed simthreshd1, error falls and density rises monotonically in cdfthreshd (and in topk,
  and in pvthreshd), so **bisection** on them is exact up to its resolution. cdfthreshd is bisected on
  ``u = -log10(1 - cdfthreshd)`` in [0, 4] so the resolution is finest near 1, where it matters;
- the block self-similarity is a mean of cosines of unit vectors' mean, hence in [0, 1]: every
  simthreshd1 < 0 behaves the same. The outer grid over simthreshd1 is therefore a short list
  (``DEFAULT_THETAS``): -1 (every block may be skipped) and a few values in (0, 1).
- ``granularity="layer"`` shares one value per layer (worst head decides feasibility).

Every evaluation is reported to an ``on_evaluation`` callback (the Optuna study records them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from sparge_core import sparge_attn
from sparge_core.ops import reference
from sparge_core.ops.blocks import ESTIMATORS
from sparge_core.params import LayerConfig
from sparge_core.validation import check_choice

DEFAULT_THETAS: tuple[float, ...] = (-1.0, 0.2, 0.4, 0.55, 0.7, 0.85)
CDF_U_MAX = 4.0  # cdfthreshd = 1 - 10^-u: u = 4 is 0.9999
PV_MAX = 50.0
DENSE_BELOW = 0.1  # heads whose best sparsity is <= this run dense


@dataclass(frozen=True)
class SearchSettings:
    """What stage 1 and stage 2 search, and how finely."""

    l1: float = 0.08
    pv_l1: float = 0.09
    mode: str = "cdf"  # "cdf" or "topk"
    granularity: str = "head"  # "head" or "layer"
    thetas: tuple[float, ...] = DEFAULT_THETAS
    bisect_steps: int = 8
    pv_steps: int = 7
    tune_pv: bool = True
    backend: str = "auto"
    is_causal: bool = True
    estimator: str = "keys"  # the predictor's block-score estimator ("pooled": the paper's)

    def __post_init__(self):
        if not (self.l1 > 0 and math.isfinite(self.l1)):
            raise ValueError(f"l1 must be a positive number, got {self.l1}")
        if not (self.pv_l1 >= self.l1 and math.isfinite(self.pv_l1)):
            raise ValueError(f"pv_l1 ({self.pv_l1}) must be >= l1 ({self.l1})")
        if self.mode not in ("cdf", "topk"):
            raise ValueError(f"mode must be 'cdf' or 'topk', got {self.mode!r}")
        if self.granularity not in ("head", "layer"):
            raise ValueError(f"granularity must be 'head' or 'layer', got {self.granularity!r}")
        if not self.thetas or any(not -1.0 <= t <= 1.0 for t in self.thetas):
            raise ValueError(f"thetas must be values in [-1, 1], got {self.thetas}")
        check_choice("estimator", self.estimator, ESTIMATORS)


@dataclass(frozen=True)
class Evaluation:
    """One evaluated point: per-head hyperparameters and the per-head outcome."""

    simthreshd1: tuple[float, ...]
    budget: tuple[float, ...]  # cdfthreshd or topk
    pvthreshd: tuple[float, ...] | None
    l1: tuple[float, ...]  # worst relative L1 over the samples
    sparsity: tuple[float, ...]  # paper sparsity (QK and PV skips), mean over the samples
    stage: str
    step: int


@dataclass(frozen=True)
class HeadResult:
    simthreshd1: float
    budget: float
    pvthreshd: float
    sparsity: float
    l1: float

    @property
    def dense(self) -> bool:
        return self.budget >= 1.0


@dataclass
class LayerResult:
    """The chosen per-head hyperparameters of a layer, and what the search cost."""

    heads: list[HeadResult]
    evaluations: int
    mode: str
    history: list[Evaluation] = field(default_factory=list, repr=False)

    @property
    def sparsity(self) -> float:
        return sum(h.sparsity for h in self.heads) / len(self.heads)

    @property
    def l1(self) -> float:
        return max(h.l1 for h in self.heads)


class LayerEvaluator:
    """Evaluate per-head hyperparameters on a layer's samples: worst L1 and mean sparsity per head.

    ``samples`` are ``(q, k, v)`` tuples ``(1, Hq, N, D)``/``(1, Hkv, N, D)``; dense outputs are computed
    once (SDPA in float32) and cached.
    """

    def __init__(self, samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *, is_causal: bool,
                 backend: str = "auto", device: torch.device | str | None = None, quant: str = "none",
                 estimator: str = "keys"):
        if not samples:
            raise ValueError("a layer needs at least one captured sample")
        dev = torch.device(device) if device is not None else samples[0][0].device
        self.samples = [tuple(t.to(dev) for t in s) for s in samples]
        self.is_causal = is_causal
        self.backend = backend
        self.quant = quant
        self.estimator = estimator
        self.num_heads = self.samples[0][0].shape[1]
        self.calls = 0
        self.dense = [self._dense(q, k, v) for q, k, v in self.samples]

    def _dense(self, q, k, v) -> torch.Tensor:
        group = q.shape[1] // k.shape[1]
        mask = reference.causal_token_mask(q.shape[2], k.shape[2], device=q.device) if self.is_causal else None
        return torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1), attn_mask=mask)

    def _run(self, theta, budget, pv, mode):
        """Per sample: ``(abs-error sums (Hq,), reference abs sums (Hq,), per-head sparsity (Hq,))``."""
        sel = dict(cdfthreshd=budget, topk=None) if mode == "cdf" else dict(cdfthreshd=None, topk=budget)
        for (q, k, v), ref in zip(self.samples, self.dense):
            out, stats = sparge_attn(q, k, v, is_causal=self.is_causal, simthreshd1=theta, pvthreshd=pv,
                                     backend=self.backend, quant=self.quant, return_stats=True,
                                     estimator=self.estimator, **sel)
            yield ((out.float() - ref).abs().sum(dim=(0, 2, 3)), ref.abs().sum(dim=(0, 2, 3)),
                   stats.per_head_sparsity())

    def __call__(self, theta: torch.Tensor, budget: torch.Tensor, pv: torch.Tensor | None, mode: str):
        """Returns ``(worst_l1, mean_sparsity)`` as float64 ``(Hq,)`` tensors on the CPU."""
        self.calls += 1
        worst = torch.zeros(self.num_heads, dtype=torch.float64)
        spars = torch.zeros(self.num_heads, dtype=torch.float64)
        for diff, ref, sp in self._run(theta, budget, pv, mode):
            worst = torch.maximum(worst, (diff / ref.clamp(min=1e-30)).double().cpu())
            spars += sp.cpu()
        return worst, spars / len(self.samples)

    def window_errors(self, theta: torch.Tensor, budget: torch.Tensor, pv: torch.Tensor | None,
                      mode: str) -> tuple[list[float], list[list[float]]]:
        """Per sample: the layer's relative L1 (all heads' outputs together, the paper's measure of a
        layer) and each head's relative L1."""
        self.calls += 1
        layer, heads = [], []
        for diff, ref, _sp in self._run(theta, budget, pv, mode):
            layer.append(float(diff.sum() / ref.sum().clamp(min=1e-30)))
            heads.append((diff / ref.clamp(min=1e-30)).double().cpu().tolist())
        return layer, heads


def config_window_errors(samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], lc: LayerConfig, *,
                         is_causal: bool, device: torch.device | str | None = None
                         ) -> tuple[list[float], list[list[float]]]:
    """``LayerEvaluator.window_errors`` of a calibrated layer (its own hyperparameters and estimator)
    on ``samples``: per sample, the whole layer's relative L1 and each head's."""
    ev = LayerEvaluator(samples, is_causal=is_causal, device=device, estimator=lc.estimator)
    topk = lc.topk is not None
    return ev.window_errors(torch.tensor(lc.simthreshd1), torch.tensor(lc.topk if topk else lc.cdfthreshd),
                            torch.tensor(lc.pvthreshd), "topk" if topk else "cdf")


def _budget_from_u(u: torch.Tensor, mode: str) -> torch.Tensor:
    return 1.0 - torch.pow(10.0, -u) if mode == "cdf" else u


def _reduce(values: torch.Tensor, granularity: str, how: str) -> torch.Tensor:
    if granularity == "head":
        return values
    agg = values.max() if how == "max" else values.mean()
    return agg.expand_as(values).clone()


def bisect_budget(evaluate: Callable, theta: torch.Tensor, settings: SearchSettings, *,
                  on_evaluation: Callable[[Evaluation], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1 for one simthreshd1 vector: per head, the smallest feasible cdfthreshd (or topk).

    Returns ``(budget, l1, sparsity)`` per head; a head infeasible even at the top of the range gets
    budget 1 (dense), l1 0 and sparsity 0.
    """
    h = theta.numel()
    hi_u = torch.full((h,), CDF_U_MAX if settings.mode == "cdf" else 1.0, dtype=torch.float64)
    lo_u = torch.zeros(h, dtype=torch.float64)

    def run(u: torch.Tensor, step: int):
        budget = _budget_from_u(u, settings.mode).float()
        l1, sp = evaluate(theta, budget, None, settings.mode)
        l1, sp = _reduce(l1, settings.granularity, "max"), _reduce(sp, settings.granularity, "mean")
        if on_evaluation is not None:
            on_evaluation(Evaluation(tuple(theta.tolist()), tuple(budget.tolist()), None, tuple(l1.tolist()),
                                     tuple(sp.tolist()), "stage1", step))
        return l1, sp

    l1_hi, sp_hi = run(hi_u, 0)
    best_l1, best_sp = l1_hi.clone(), sp_hi.clone()
    feasible_top = l1_hi <= settings.l1
    for step in range(1, settings.bisect_steps + 1):
        mid = (lo_u + hi_u) / 2
        l1, sp = run(mid, step)
        ok = l1 <= settings.l1
        hi_u = torch.where(ok, mid, hi_u)
        lo_u = torch.where(ok, lo_u, mid)
        best_l1 = torch.where(ok, l1, best_l1)
        best_sp = torch.where(ok, sp, best_sp)
    budget = _budget_from_u(hi_u, settings.mode)
    budget = torch.where(feasible_top, budget, torch.ones_like(budget))
    best_l1 = torch.where(feasible_top, best_l1, torch.zeros_like(best_l1))
    best_sp = torch.where(feasible_top, best_sp, torch.zeros_like(best_sp))
    return budget, best_l1, best_sp


def bisect_pv(evaluate: Callable, theta: torch.Tensor, budget: torch.Tensor, settings: SearchSettings, *,
              on_evaluation: Callable[[Evaluation], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 2: per head, the lowest pvthreshd in [0, 50] whose L1 stays <= pv_l1 (at fixed stage-1
    hyperparameters). Returns ``(pvthreshd, l1, sparsity)``."""
    h = theta.numel()
    hi = torch.full((h,), PV_MAX, dtype=torch.float64)
    lo = torch.zeros(h, dtype=torch.float64)
    best_l1 = torch.full((h,), math.nan, dtype=torch.float64)
    best_sp = torch.full((h,), math.nan, dtype=torch.float64)
    for step in range(settings.pv_steps + 1):
        pv = hi if step == 0 else (lo + hi) / 2
        l1, sp = evaluate(theta, budget.float(), pv.float(), settings.mode)
        l1, sp = _reduce(l1, settings.granularity, "max"), _reduce(sp, settings.granularity, "mean")
        if on_evaluation is not None:
            on_evaluation(Evaluation(tuple(theta.tolist()), tuple(budget.tolist()), tuple(pv.tolist()),
                                     tuple(l1.tolist()), tuple(sp.tolist()), "stage2", step))
        ok = l1 <= settings.pv_l1
        if step == 0:
            best_l1, best_sp = l1, sp
            continue
        hi = torch.where(ok, pv, hi)
        lo = torch.where(ok, lo, pv)
        best_l1 = torch.where(ok, l1, best_l1)
        best_sp = torch.where(ok, sp, best_sp)
    return hi, best_l1, best_sp


def search_layer(evaluate: Callable, num_heads: int, settings: SearchSettings, *,
                 on_evaluation: Callable[[Evaluation], None] | None = None,
                 done_thetas: dict[float, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
                 on_theta_done: Callable[[float, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                 ) -> LayerResult:
    """Both stages for one layer. ``done_thetas`` (simthreshd1 -> stage-1 result) lets an interrupted
    search resume without re-evaluating finished simthreshd1 values."""
    history: list[Evaluation] = []
    calls = [0]

    def record(ev: Evaluation) -> None:
        calls[0] += 1
        history.append(ev)
        if on_evaluation is not None:
            on_evaluation(ev)

    best_theta = torch.full((num_heads,), 1.0, dtype=torch.float64)
    best_budget = torch.ones(num_heads, dtype=torch.float64)
    best_l1 = torch.zeros(num_heads, dtype=torch.float64)
    best_sp = torch.full((num_heads,), -1.0, dtype=torch.float64)
    for theta_value in settings.thetas:
        if done_thetas and theta_value in done_thetas:
            budget, l1, sp = done_thetas[theta_value]
        else:
            theta = torch.full((num_heads,), float(theta_value), dtype=torch.float32)
            budget, l1, sp = bisect_budget(evaluate, theta, settings, on_evaluation=record)
            if on_theta_done is not None:
                on_theta_done(theta_value, budget, l1, sp)
        better = sp > best_sp  # strict: ties keep the earlier theta (uniform across heads for "layer")
        best_theta = torch.where(better, torch.full_like(best_theta, theta_value), best_theta)
        best_budget = torch.where(better, budget, best_budget)
        best_l1 = torch.where(better, l1, best_l1)
        best_sp = torch.where(better, sp, best_sp)

    dense = best_sp <= DENSE_BELOW
    best_theta = torch.where(dense, torch.ones_like(best_theta), best_theta)
    best_budget = torch.where(dense, torch.ones_like(best_budget), best_budget)
    best_sp = torch.where(dense, torch.zeros_like(best_sp), best_sp)
    best_l1 = torch.where(dense, torch.zeros_like(best_l1), best_l1)
    pv = torch.full((num_heads,), PV_MAX, dtype=torch.float64)
    if settings.tune_pv and not bool(dense.all()):
        pv_found, l1_pv, sp_pv = bisect_pv(evaluate, best_theta.float(), best_budget, settings, on_evaluation=record)
        pv = torch.where(dense, pv, pv_found)
        best_l1 = torch.where(dense, best_l1, l1_pv)
        best_sp = torch.where(dense, best_sp, sp_pv)
    heads = [HeadResult(float(best_theta[i]), float(best_budget[i]), float(pv[i]), float(best_sp[i]), float(best_l1[i]))
             for i in range(num_heads)]
    return LayerResult(heads, calls[0], settings.mode, history)


def exhaustive_reference_sweep(evaluate: Callable, num_heads: int, settings: SearchSettings) -> tuple[torch.Tensor, int]:
    """The official tuner's stage-1 procedure, as a yardstick: 32 simthreshd1 values in [-1, 1) (step
    1/16) x a bisection on cdfthreshd over [0, 1] to 0.001 (10 steps). Returns the best per-head
    stage-1 sparsity and the number of evaluations it took."""
    calls = [0]

    def counted(*a):
        calls[0] += 1
        return evaluate(*a)

    best = torch.zeros(num_heads, dtype=torch.float64)
    for i in range(32):
        theta = torch.full((num_heads,), -1.0 + i / 16, dtype=torch.float32)
        lo, hi = torch.zeros(num_heads, dtype=torch.float64), torch.ones(num_heads, dtype=torch.float64)
        l1, sp = counted(theta, hi.float(), None, settings.mode)
        feasible = l1 <= settings.l1
        found = torch.where(feasible, sp, torch.zeros_like(sp))
        for _ in range(10):
            mid = (lo + hi) / 2
            l1, sp = counted(theta, mid.float(), None, settings.mode)
            ok = l1 <= settings.l1
            found = torch.where(ok, torch.maximum(found, sp), found)
            hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
        best = torch.maximum(best, torch.where(feasible, found, best))
    return best, calls[0]
