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

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch

from sparge_core import block_sparse_attn, predict_block_mask, sparge_attn
from sparge_core.ops import reference
from sparge_core.ops.blocks import BLOCK_Q, ESTIMATORS
from sparge_core.params import LayerConfig
from sparge_core.validation import check_choice, check_local_blocks

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
    #: key blocks the predictor forces before each query block's diagonal (causal only; 0: none)
    local_blocks: int = 0

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
        check_local_blocks(self.local_blocks, self.is_causal)


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
    density: tuple[float, ...] | None = None  # computed / allowed block pairs, mean over the samples
    pv_skip: tuple[float, ...] | None = None  # P.V-skipped / computed pairs, mean over the samples
    quant: str = "none"  # the executor the point ran (set by the caller's search)
    estimator: str = ""
    value: float | None = None  # the objective's value of this point (None: mean sparsity)


@dataclass(frozen=True)
class HeadResult:
    simthreshd1: float
    budget: float
    pvthreshd: float
    sparsity: float
    l1: float
    density: float | None = None
    pv_skip: float | None = None

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
    #: the layer's executor, ``sparge_core.params.LayerVariant.to_dict()`` (None: not chosen, version 1)
    variant: dict | None = None
    estimator: str | None = None
    #: ``{"ms", "dense_ms"}`` of the cost model at the calibration shape (None without a cost model)
    predicted: dict | None = None
    #: what the search of this layer cost: seconds, peak memory (filled in by the worker)
    cost: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return sum(h.sparsity for h in self.heads) / len(self.heads)

    @property
    def l1(self) -> float:
        return max(h.l1 for h in self.heads)


class Outcome(NamedTuple):
    """Per-head outcome of one evaluated point, float64 ``(Hq,)`` tensors on the CPU."""

    l1: torch.Tensor  # worst relative L1 over the samples
    sparsity: torch.Tensor  # paper sparsity, mean over the samples
    density: torch.Tensor  # computed / allowed block pairs, mean over the samples
    pv_skip: torch.Tensor  # P.V-skipped / computed pairs, mean over the samples


@dataclass(frozen=True)
class QueryChunk:
    """Query rows ``[start, start + length)`` of the sequence, stored at ``offset`` in the captured q."""

    offset: int
    start: int
    length: int


def query_chunk_list(query_chunks, q_len: int) -> list[QueryChunk]:
    """The chunks of a capture's ``query_chunks`` (``[(start, length)]``; empty: every row)."""
    if not query_chunks:
        return [QueryChunk(0, 0, q_len)]
    out, offset = [], 0
    for start, length in query_chunks:
        out.append(QueryChunk(offset, int(start), int(length)))
        offset += int(length)
    if offset != q_len:
        raise ValueError(f"the query chunks cover {offset} rows but the captured q has {q_len}")
    return out


class LayerEvaluator:
    """Evaluate per-head hyperparameters on a layer's samples: worst L1, mean sparsity, density and
    P.V-skip fraction per head.

    ``samples`` are ``(q, k, v)`` tuples ``(1, Hq, M, D)``/``(1, Hkv, N, D)``. Samples of one shape
    are stacked and run as one batch (every (batch, head) is independent in the kernels). By default
    each evaluation is one ``sparge_attn`` call per batch: the path inference runs. ``query_chunks``
    (a capture that stored only some query rows, ``[(start, length)]`` in sequence positions, rows of
    ``q`` in that order): the stored rows are placed at their positions in a zero ``(B, Hq, N, D)``
    query, ``predict_block_mask`` runs on it with all of K (a query block's selection depends only
    on its own rows and K, so it is exact for the stored blocks), the rows of the other blocks are
    cleared from the map, and ``block_sparse_attn`` computes the stored blocks only: the same
    computation as ``sparge_attn`` for those rows (INT8 scales are per block too), at a fraction of
    the kernel's work. Errors, densities and skips then cover the stored rows. Dense outputs are
    computed once (SDPA in float32) and cached. ``quant``/``estimator`` pick the executor;
    ``variant`` makes a sibling sharing the data. ``local_blocks`` is the predictor's (causal only):
    every evaluation runs with those forced key blocks, so the bound accounts for them.
    """

    def __init__(self, samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *, is_causal: bool,
                 backend: str = "auto", device: torch.device | str | None = None, quant: str = "none",
                 estimator: str = "keys", query_chunks: Sequence[tuple[int, int]] | None = None,
                 local_blocks: int = 0):
        if not samples:
            raise ValueError("a layer needs at least one captured sample")
        dev = torch.device(device) if device is not None else samples[0][0].device
        self.is_causal = is_causal
        self.local_blocks = check_local_blocks(local_blocks, is_causal)
        self.backend = backend
        self.quant = quant
        self.estimator = estimator
        self.num_heads = samples[0][0].shape[1]
        self.num_samples = len(samples)
        self.chunks = query_chunk_list(query_chunks, samples[0][0].shape[2])
        self.subset = bool(query_chunks)
        self.calls = 0
        self._counter = [0]  # shared with siblings (``variant``): evaluations of the layer
        self.groups = _stack_by_shape(samples, dev)  # [(sample indices, q, k, v)]
        self.dense = [torch.cat([self._dense(*self._chunk(q, k, v, c)) for c in self.chunks], dim=2)
                      for _, q, k, v in self.groups]
        self._placed = [self._place(q, k) for _, q, k, _v in self.groups] if self.subset else None

    def variant(self, *, quant: str, estimator: str) -> LayerEvaluator:
        """The same samples and dense outputs, evaluated with another executor."""
        sibling = copy.copy(self)
        sibling.quant, sibling.estimator = quant, estimator
        return sibling

    def _chunk(self, q, k, v, c: QueryChunk):
        """The stored rows of one chunk with the keys a dense reference of them needs."""
        qc = q[:, :, c.offset:c.offset + c.length]
        if not self.is_causal:
            return qc, k, v
        end = c.start + c.length
        return qc, k[:, :, :end], v[:, :, :end]

    def _place(self, q, k):
        """For a query subset: the zero full-length query with the stored rows in place, the kept
        query blocks, the stored rows' positions, and the allowed block pairs of those blocks."""
        n = k.shape[2]
        full = q.new_zeros(q.shape[0], q.shape[1], n, q.shape[3])
        rows = torch.cat([torch.arange(c.start, c.start + c.length) for c in self.chunks]).to(q.device)
        full[:, :, rows] = q
        keep = torch.zeros(reference.num_blocks(n, BLOCK_Q), dtype=torch.bool)
        for c in self.chunks:
            keep[c.start // BLOCK_Q: -(-(c.start + c.length) // BLOCK_Q)] = True
        allowed = int(reference.allowed_block_mask(n, n, self.is_causal)[keep].sum())
        return full, keep.to(q.device), rows, allowed

    def _dense(self, q, k, v) -> torch.Tensor:
        """Dense attention in float32, one sample at a time (bounded memory: the repeated K/V of one
        sample in float32 at most)."""
        group = q.shape[1] // k.shape[1]
        mask = reference.causal_token_mask(q.shape[2], k.shape[2], device=q.device) if self.is_causal else None
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1].float(), k[b:b + 1].float().repeat_interleave(group, 1),
            v[b:b + 1].float().repeat_interleave(group, 1), attn_mask=mask) for b in range(q.shape[0])], dim=0)

    def _attend(self, g: int, q, k, v, theta, pv, sel):
        """``(out rows, allowed, computed, skipped)`` of one batch for the stored rows."""
        if not self.subset:
            out, stats = sparge_attn(q, k, v, is_causal=self.is_causal, simthreshd1=theta, pvthreshd=pv,
                                     backend=self.backend, quant=self.quant, return_stats=True,
                                     estimator=self.estimator, local_blocks=self.local_blocks, **sel)
            return out, stats.allowed_blocks, stats.computed_blocks, stats.pv_skipped_blocks
        full, keep, rows, allowed = self._placed[g]
        mask = predict_block_mask(full, k, is_causal=self.is_causal, simthreshd1=theta, backend=self.backend,
                                  estimator=self.estimator, local_blocks=self.local_blocks, **sel)
        mask = mask & keep[None, None, :, None]
        out, stats = block_sparse_attn(full, k, v, mask, is_causal=self.is_causal, pvthreshd=pv, quant=self.quant,
                                       backend=self.backend, return_stats=True)
        return (out[:, :, rows], torch.full_like(stats.allowed_blocks, allowed), stats.computed_blocks,
                stats.pv_skipped_blocks)

    def _run(self, theta, budget, pv, mode):
        """Per sample (in sample order): abs-error sums, reference abs sums, allowed, computed and
        P.V-skipped block counts, each ``(Hq,)``."""
        sel = dict(cdfthreshd=budget, topk=None) if mode == "cdf" else dict(cdfthreshd=None, topk=budget)
        per_sample: dict[int, tuple] = {}
        for g, ((indices, q, k, v), ref) in enumerate(zip(self.groups, self.dense)):
            out, allowed, computed, skipped = self._attend(g, q, k, v, theta, pv, sel)
            acc = ((out.float() - ref).abs().sum(dim=(2, 3)), ref.abs().sum(dim=(2, 3)), allowed, computed, skipped)
            acc = torch.stack([t.double() for t in acc]).cpu()  # one copy to the host (one sync) per batch
            for row, index in enumerate(indices):
                per_sample[index] = tuple(t[row] for t in acc)
        for index in range(self.num_samples):
            yield per_sample[index]

    def evaluate(self, theta: torch.Tensor, budget: torch.Tensor, pv: torch.Tensor | None, mode: str) -> Outcome:
        """The per-head ``Outcome`` of one point (all samples, all heads in one go)."""
        self.calls += 1
        self._counter[0] += 1
        worst = torch.zeros(self.num_heads, dtype=torch.float64)
        spars = torch.zeros(self.num_heads, dtype=torch.float64)
        dens = torch.zeros(self.num_heads, dtype=torch.float64)
        skip = torch.zeros(self.num_heads, dtype=torch.float64)
        for diff, ref, allowed, computed, skipped in self._run(theta, budget, pv, mode):
            worst = torch.maximum(worst, diff / ref.clamp(min=1e-30))
            allowed = allowed.clamp(min=1)
            spars += (2 * (allowed - computed) + skipped) / (2 * allowed)
            dens += computed / allowed
            skip += skipped / computed.clamp(min=1)
        n = self.num_samples
        return Outcome(worst, spars / n, dens / n, skip / n)

    def __call__(self, theta: torch.Tensor, budget: torch.Tensor, pv: torch.Tensor | None, mode: str):
        """Returns ``(worst_l1, mean_sparsity)`` as float64 ``(Hq,)`` tensors on the CPU."""
        out = self.evaluate(theta, budget, pv, mode)
        return out.l1, out.sparsity

    @property
    def evaluations(self) -> int:
        """Evaluations of this layer by this evaluator and its siblings."""
        return self._counter[0]

    def window_errors(self, theta: torch.Tensor, budget: torch.Tensor, pv: torch.Tensor | None,
                      mode: str) -> tuple[list[float], list[list[float]]]:
        """Per sample: the layer's relative L1 (all heads' outputs together, the paper's measure of a
        layer) and each head's relative L1."""
        self.calls += 1
        layer, heads = [], []
        for diff, ref, *_counts in self._run(theta, budget, pv, mode):
            layer.append(float(diff.sum() / ref.sum().clamp(min=1e-30)))
            heads.append((diff / ref.clamp(min=1e-30)).tolist())
        return layer, heads


def _stack_by_shape(samples, device) -> list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Samples of equal shapes as one batch each: ``[(sample indices, q, k, v)]``."""
    by_shape: dict[tuple, list[int]] = {}
    for i, (q, k, v) in enumerate(samples):
        by_shape.setdefault((tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype), []).append(i)
    groups = []
    for indices in by_shape.values():
        parts = [[t.to(device) for t in samples[i]] for i in indices]
        if len(parts) == 1:
            groups.append((indices, *parts[0]))
        else:
            groups.append((indices, *(torch.cat([p[j] for p in parts], dim=0) for j in range(3))))
    return groups


def config_window_errors(samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], lc: LayerConfig, *,
                         is_causal: bool, device: torch.device | str | None = None,
                         query_chunks: Sequence[tuple[int, int]] | None = None
                         ) -> tuple[list[float], list[list[float]]]:
    """``LayerEvaluator.window_errors`` of a calibrated layer (its own hyperparameters, estimator,
    ``local_blocks`` and, version 2, quantization and stage 2 on or off) on ``samples``: per sample, the
    whole layer's relative L1 and each head's."""
    ev = LayerEvaluator(samples, is_causal=is_causal, device=device, estimator=lc.estimator,
                        quant=lc.quant or "none", query_chunks=query_chunks, local_blocks=lc.local_blocks)
    topk = lc.topk is not None
    return ev.window_errors(torch.tensor(lc.simthreshd1), torch.tensor(lc.topk if topk else lc.cdfthreshd),
                            torch.tensor(lc.pvthreshd) if lc.stage2 else None, "topk" if topk else "cdf")


def _budget_from_u(u: torch.Tensor, mode: str) -> torch.Tensor:
    return 1.0 - torch.pow(10.0, -u) if mode == "cdf" else u


def _reduce(values: torch.Tensor, granularity: str, how: str) -> torch.Tensor:
    if granularity == "head":
        return values
    agg = values.max() if how == "max" else values.mean()
    return agg.expand_as(values).clone()


class PointStats(NamedTuple):
    """Per-head values at the chosen points of a bisection (float64 ``(Hq,)``)."""

    value: torch.Tensor  # the bisected knob: budget (stage 1) or pvthreshd (stage 2)
    l1: torch.Tensor
    sparsity: torch.Tensor
    density: torch.Tensor
    pv_skip: torch.Tensor


def _measure(evaluate: Callable, theta, budget, pv, settings: SearchSettings):
    """``(l1, sparsity, density, pv_skip)`` of one point, reduced for ``granularity="layer"``. An
    evaluator returning only ``(l1, sparsity)`` gets density ``1 - sparsity`` (exact with stage 2
    off) and no skips."""
    out = evaluate(theta, budget, pv, settings.mode)
    l1, sp = out[0], out[1]
    density = out[2] if len(out) > 2 else 1.0 - sp
    skip = out[3] if len(out) > 3 else torch.zeros_like(sp)
    g = settings.granularity
    return _reduce(l1, g, "max"), _reduce(sp, g, "mean"), _reduce(density, g, "mean"), _reduce(skip, g, "mean")


def _tuple(t: torch.Tensor) -> tuple[float, ...]:
    return tuple(float(x) for x in t.tolist())


def bisect_budget_stats(evaluate: Callable, theta: torch.Tensor, settings: SearchSettings, *, bound: float | None = None,
                        on_evaluation: Callable[[Evaluation], None] | None = None) -> PointStats:
    """Stage 1 for one simthreshd1 vector: per head, the smallest cdfthreshd (or topk) whose L1 stays
    <= ``bound`` (default ``settings.l1``), with its outcome. A head infeasible even at the top of the
    range gets budget 1 (keep every block: dense), l1 0, sparsity 0, density 1."""
    bound = settings.l1 if bound is None else bound
    h = theta.numel()
    hi_u = torch.full((h,), CDF_U_MAX if settings.mode == "cdf" else 1.0, dtype=torch.float64)
    lo_u = torch.zeros(h, dtype=torch.float64)

    def run(u: torch.Tensor, step: int):
        budget = _budget_from_u(u, settings.mode).float()
        l1, sp, dens, skip = _measure(evaluate, theta, budget, None, settings)
        if on_evaluation is not None:
            on_evaluation(Evaluation(_tuple(theta), _tuple(budget), None, _tuple(l1), _tuple(sp), "stage1", step,
                                     _tuple(dens), _tuple(skip)))
        return l1, sp, dens

    l1_hi, sp_hi, dens_hi = run(hi_u, 0)
    best_l1, best_sp, best_dens = l1_hi.clone(), sp_hi.clone(), dens_hi.clone()
    feasible_top = l1_hi <= bound
    for step in range(1, settings.bisect_steps + 1):
        mid = (lo_u + hi_u) / 2
        l1, sp, dens = run(mid, step)
        ok = l1 <= bound
        hi_u = torch.where(ok, mid, hi_u)
        lo_u = torch.where(ok, lo_u, mid)
        best_l1 = torch.where(ok, l1, best_l1)
        best_sp = torch.where(ok, sp, best_sp)
        best_dens = torch.where(ok, dens, best_dens)
    budget = _budget_from_u(hi_u, settings.mode)
    budget = torch.where(feasible_top, budget, torch.ones_like(budget))
    best_l1 = torch.where(feasible_top, best_l1, torch.zeros_like(best_l1))
    best_sp = torch.where(feasible_top, best_sp, torch.zeros_like(best_sp))
    best_dens = torch.where(feasible_top, best_dens, torch.ones_like(best_dens))
    return PointStats(budget, best_l1, best_sp, best_dens, torch.zeros_like(best_dens))


def bisect_budget(evaluate: Callable, theta: torch.Tensor, settings: SearchSettings, *,
                  on_evaluation: Callable[[Evaluation], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bisect_budget_stats`` as ``(budget, l1, sparsity)`` per head."""
    st = bisect_budget_stats(evaluate, theta, settings, on_evaluation=on_evaluation)
    return st.value, st.l1, st.sparsity


def bisect_pv_stats(evaluate: Callable, theta: torch.Tensor, budget: torch.Tensor, settings: SearchSettings, *,
                    on_evaluation: Callable[[Evaluation], None] | None = None) -> PointStats:
    """Stage 2: per head, the lowest pvthreshd in [0, 50] whose L1 stays <= pv_l1 (at fixed stage-1
    hyperparameters), with its outcome."""
    h = theta.numel()
    hi = torch.full((h,), PV_MAX, dtype=torch.float64)
    lo = torch.zeros(h, dtype=torch.float64)
    best = None
    for step in range(settings.pv_steps + 1):
        pv = hi if step == 0 else (lo + hi) / 2
        l1, sp, dens, skip = _measure(evaluate, theta, budget.float(), pv.float(), settings)
        if on_evaluation is not None:
            on_evaluation(Evaluation(_tuple(theta), _tuple(budget), _tuple(pv), _tuple(l1), _tuple(sp), "stage2", step,
                                     _tuple(dens), _tuple(skip)))
        ok = l1 <= settings.pv_l1
        if step == 0:
            best = [l1, sp, dens, skip]
            continue
        hi = torch.where(ok, pv, hi)
        lo = torch.where(ok, lo, pv)
        best = [torch.where(ok, new, old) for new, old in zip((l1, sp, dens, skip), best)]
    return PointStats(hi, *best)


def bisect_pv(evaluate: Callable, theta: torch.Tensor, budget: torch.Tensor, settings: SearchSettings, *,
              on_evaluation: Callable[[Evaluation], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bisect_pv_stats`` as ``(pvthreshd, l1, sparsity)`` per head."""
    st = bisect_pv_stats(evaluate, theta, budget, settings, on_evaluation=on_evaluation)
    return st.value, st.l1, st.sparsity


class Stage1Best(NamedTuple):
    """Per head, the best stage-1 point over the simthreshd1 grid (float64 ``(Hq,)``)."""

    theta: torch.Tensor
    budget: torch.Tensor
    l1: torch.Tensor
    sparsity: torch.Tensor
    density: torch.Tensor


def stage1_over_thetas(evaluate: Callable, num_heads: int, settings: SearchSettings, *,
                       on_evaluation: Callable[[Evaluation], None] | None = None,
                       done_thetas: dict[float, tuple] | None = None,
                       on_theta_done: Callable[..., None] | None = None) -> Stage1Best:
    """Stage 1 for every simthreshd1 of the grid; per head, the theta with the highest sparsity (at
    stage 1, stage 2 off: sparsity = 1 - density, so also the fewest computed pairs). ``done_thetas``
    maps a finished theta to ``(budget, l1, sparsity[, density])`` (resume)."""
    best_theta = torch.full((num_heads,), 1.0, dtype=torch.float64)
    best_budget = torch.ones(num_heads, dtype=torch.float64)
    best_l1 = torch.zeros(num_heads, dtype=torch.float64)
    best_sp = torch.full((num_heads,), -1.0, dtype=torch.float64)
    best_dens = torch.ones(num_heads, dtype=torch.float64)
    for theta_value in settings.thetas:
        if done_thetas and theta_value in done_thetas:
            done = done_thetas[theta_value]
            budget, l1, sp = (torch.as_tensor(x, dtype=torch.float64) for x in done[:3])
            dens = torch.as_tensor(done[3], dtype=torch.float64) if len(done) > 3 else 1.0 - sp
        else:
            theta = torch.full((num_heads,), float(theta_value), dtype=torch.float32)
            st = bisect_budget_stats(evaluate, theta, settings, on_evaluation=on_evaluation)
            budget, l1, sp, dens = st.value, st.l1, st.sparsity, st.density
            if on_theta_done is not None:
                on_theta_done(theta_value, budget, l1, sp, dens)
        better = sp > best_sp  # strict: ties keep the earlier theta (uniform across heads for "layer")
        best_theta = torch.where(better, torch.full_like(best_theta, theta_value), best_theta)
        best_budget = torch.where(better, budget, best_budget)
        best_l1 = torch.where(better, l1, best_l1)
        best_sp = torch.where(better, sp, best_sp)
        best_dens = torch.where(better, dens, best_dens)
    return Stage1Best(best_theta, best_budget, best_l1, best_sp, best_dens)


def search_layer(evaluate: Callable, num_heads: int, settings: SearchSettings, *,
                 on_evaluation: Callable[[Evaluation], None] | None = None,
                 done_thetas: dict[float, tuple] | None = None,
                 on_theta_done: Callable[..., None] | None = None,
                 ) -> LayerResult:
    """Both stages for one layer, maximising sparsity (the paper's objective). ``done_thetas``
    (simthreshd1 -> stage-1 result) lets an interrupted search resume without re-evaluating finished
    simthreshd1 values. Heads whose best sparsity is <= ``DENSE_BELOW`` keep every block."""
    history: list[Evaluation] = []
    calls = [0]

    def record(ev: Evaluation) -> None:
        calls[0] += 1
        history.append(ev)
        if on_evaluation is not None:
            on_evaluation(ev)

    best = stage1_over_thetas(evaluate, num_heads, settings, on_evaluation=record, done_thetas=done_thetas,
                              on_theta_done=on_theta_done)
    dense = best.sparsity <= DENSE_BELOW
    best_theta = torch.where(dense, torch.ones_like(best.theta), best.theta)
    best_budget = torch.where(dense, torch.ones_like(best.budget), best.budget)
    best_sp = torch.where(dense, torch.zeros_like(best.sparsity), best.sparsity)
    best_l1 = torch.where(dense, torch.zeros_like(best.l1), best.l1)
    best_dens = torch.where(dense, torch.ones_like(best.density), best.density)
    best_skip = torch.zeros_like(best_dens)
    pv = torch.full((num_heads,), PV_MAX, dtype=torch.float64)
    if settings.tune_pv and not bool(dense.all()):
        st = bisect_pv_stats(evaluate, best_theta.float(), best_budget, settings, on_evaluation=record)
        pv = torch.where(dense, pv, st.value)
        best_l1 = torch.where(dense, best_l1, st.l1)
        best_sp = torch.where(dense, best_sp, st.sparsity)
        best_dens = torch.where(dense, best_dens, st.density)
        best_skip = torch.where(dense, best_skip, st.pv_skip)
    heads = [HeadResult(float(best_theta[i]), float(best_budget[i]), float(pv[i]), float(best_sp[i]), float(best_l1[i]),
                        float(best_dens[i]), float(best_skip[i]))
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
