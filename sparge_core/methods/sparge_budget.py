"""``sparge-budget``: SpargeAttn's block estimate with one block budget per layer (beyond the paper).

The paper's predictor keeps, in every query-block row, the leading key blocks of the row's estimated
attention distribution up to a cumulative probability ``cdfthreshd`` (per head), and keeps whole rows
and columns of blocks that are not self-similar. At a fixed density that spends the budget evenly
over rows (every row gets its CDF share, however flat or peaked it is) and on the forced rows and
columns. This method spends a density budget where the estimate says the mass is:

1. Block probabilities: the row softmax of the estimator's block scores (``estimator="keys"``: the
   pooled query against every key of a block, ``reference.key_resolved_scores``; ``"pooled"``: the
   paper's pooled query . pooled smoothed key), causal fully-future blocks excluded.
2. Causal: the sink column (key block 0) and the diagonal key blocks are always kept, as in sparge,
   and so are the ``local_blocks`` key blocks just before each query block's diagonal (a local
   window: without it the first rows of a 128-row query block see only the keys of their own block,
   while a "sink + local" head puts most of its mass on the keys just before them).
3. The other allowed block pairs are ranked by probability across the whole layer (``alloc="layer"``:
   all query heads of a batch element together) or within each head (``alloc="head"``), and the best
   are kept until ``density`` of the allowed pairs is reached (forced blocks count toward it; when
   they alone exceed it, only they are kept). Ties go to whichever pair ``torch.topk`` returns first.

``density`` is the budget knob (``match_density`` and ``--density matched`` set it per layer); no
self-similarity test is applied. The block map is computed in PyTorch (float32) on the device of q,
with no host synchronisation. Measured on SmolLM2 against the calibrated config and the rivals at the
same per-layer density: see ``results/studies/rivals-cpu/README.md``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from .. import validation
from ..ops import reference as R
from . import register_method
from .base import AttentionMethod

ALLOCATIONS = ("layer", "head")


def block_probabilities(
    q: torch.Tensor, k: torch.Tensor, *, is_causal: bool, scale: float, estimator: str, window: int | None = None
) -> torch.Tensor:
    """Row-softmax block probabilities of an estimator, float32 ``(B, Hq, nqb, nkb)``; pairs a causal
    mask forbids are 0."""
    pooled_q = R.block_mean_pool(q.float(), R.BLOCK_Q)
    if estimator == "keys":
        scores = R.key_resolved_scores(pooled_q, k, scale=scale, dtype=torch.float32)
    else:
        pooled_k = R._expand_kv_heads(R.block_mean_pool(R.smooth_k(k.float()), R.BLOCK_K), q.shape[1])
        scores = pooled_q @ pooled_k.transpose(-1, -2)
    scores = scores.float() * scale
    if is_causal:
        allowed = R.causal_block_mask(q.shape[2], k.shape[2], R.BLOCK_Q, R.BLOCK_K, device=q.device, window=window)
        scores = scores.masked_fill(~allowed, -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(denom > 0, denom, torch.ones_like(denom))


def forced_blocks(nq: int, nk: int, local_blocks: int = 0, device=None, window: int | None = None) -> torch.Tensor:
    """``(nqb, nkb)``: the sink column, the diagonal blocks and ``local_blocks`` key blocks before each
    query block's first diagonal block, within the causal triangle: the sparge predictor's forced set
    (``reference.causal_forced_block_mask``, one definition for both)."""
    return R.causal_forced_block_mask(nq, nk, R.BLOCK_Q, R.BLOCK_K, local_blocks=local_blocks, device=device,
                                      window=window)


def budget_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    density: float,
    estimator: str = "keys",
    alloc: str = "layer",
    local_blocks: int = 0,
    window: int | None = None,
) -> torch.Tensor:
    """The block map described in the module docstring (inputs already validated; ``window``: a causal
    sliding window, whose block band bounds every choice)."""
    b, hq, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    allowed = R.allowed_block_mask(nq, nk, is_causal, device=q.device, window=window)  # (nqb, nkb)
    nqb, nkb = allowed.shape
    probs = block_probabilities(q, k, is_causal=is_causal, scale=scale, estimator=estimator, window=window)
    # non-finite inputs make non-finite probabilities; rank them last (dense attention propagates them)
    probs = torch.nan_to_num(probs, nan=-1.0, posinf=-1.0, neginf=-1.0)
    score = probs.masked_fill(~allowed, -math.inf)
    if is_causal:
        score = score.masked_fill(forced_blocks(nq, nk, local_blocks, device=q.device, window=window), math.inf)
    per_head_allowed, per_head_forced = _counts(nq, nk, is_causal, local_blocks, window)  # host: no device sync
    heads = hq if alloc == "layer" else 1
    flat = score.reshape(b, hq * nqb * nkb) if alloc == "layer" else score.reshape(b * hq, nqb * nkb)
    keep = min(
        per_head_allowed * heads, max(1, per_head_forced * heads, round(density * per_head_allowed * heads))
    )
    idx = torch.topk(flat, keep, dim=-1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.view(b, hq, nqb, nkb) & allowed


def _counts(nq: int, nk: int, is_causal: bool, local_blocks: int, window: int | None = None) -> tuple[int, int]:
    """Allowed and forced block pairs of one head, counted on the host from the shapes."""
    allowed = R.allowed_block_count(nq, nk, is_causal, window)
    if not is_causal:
        return allowed, 0
    return allowed, int(forced_blocks(nq, nk, local_blocks, window=window).sum())


@register_method("sparge-budget")
class SpargeBudget(AttentionMethod):
    """sparge's block estimate with a layer-wide (or per-head) block budget; see the module docstring."""

    budget_param = "density"
    budget_range: ClassVar[tuple[float, float | None]] = (0.0, 1.0)

    def __init__(
        self, density: float = 0.5, estimator: str = "keys", alloc: str = "layer", local_blocks: int = 0
    ):
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
            raise ValueError(f"sparge-budget: density must be a number in [0, 1], got {density!r}")
        self.density = float(density)
        self.estimator = validation.check_choice("estimator", estimator, R.ESTIMATORS)
        self.alloc = validation.check_choice("alloc", alloc, ALLOCATIONS)
        if isinstance(local_blocks, bool) or not isinstance(local_blocks, int) or local_blocks < 0:
            raise ValueError(f"sparge-budget: local_blocks must be an integer >= 0, got {local_blocks!r}")
        self.local_blocks = local_blocks

    def params(self) -> dict[str, Any]:
        return {
            "density": self.density,
            "estimator": self.estimator,
            "alloc": self.alloc,
            "local_blocks": self.local_blocks,
        }

    def block_mask(self, q, k, *, is_causal, scale=None, window=None) -> torch.Tensor:
        validation.check_qk(q, k)
        scale = validation.resolve_scale(scale, q.shape[-1])
        window = validation.check_window(window, is_causal)
        if self.density >= 1.0:
            allowed = R.allowed_block_mask(q.shape[2], k.shape[2], is_causal, device=q.device, window=window)
            return allowed.expand(q.shape[0], q.shape[1], -1, -1).clone()
        return budget_block_mask(
            q,
            k,
            is_causal=is_causal,
            scale=scale,
            density=self.density,
            estimator=self.estimator,
            alloc=self.alloc,
            local_blocks=self.local_blocks,
            window=window,
        )
