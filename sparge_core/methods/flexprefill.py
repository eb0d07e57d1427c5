"""``flexprefill``: FlexPrefill (arXiv 2502.20766, ICLR'25), context-aware sparse prefill, as block
maps for the shared block-sparse kernel.

Sources: the FlexPrefill paper (section 3: query-aware pattern determination, cumulative-attention
index selection) and the FlexPrefill op as shipped in the ``minference`` 0.1.6.0 sdist
(``modules/flexprefill.py``, ``get_active_blocks`` / ``flex_prefill_attention``), with that code's
defaults. A re-implementation, not a copy.

Algorithm, per (batch, head), with FlexPrefill's block size ``b = 128``:

1. The last ``b`` queries attend to every key (scaled, causal, float32 softmax). Their mean row gives
   per-key vertical scores; their mean along each diagonal gives per-distance slash scores.
2. Pattern decision: the estimated block distribution ``softmax(mean(q_last) . mean_pool(K)^T)`` vs
   the true one (the vertical scores summed per key block). If the Jensen-Shannon distance
   ``sqrt(JSD)`` (natural log) is below ``tau`` (default 0.1) the head is *query-aware*, otherwise
   *vertical-slash*.
3. Vertical-slash budgets: the fewest columns (distances) whose sorted scores cover ``gamma`` of the
   mass, converted to blocks as ``count // 128 + 1`` and clamped to ``[ceil(min_budget / b),
   ceil(max_budget / b)]``; query-aware heads get the minimum budget. The best vertical blocks and
   slash blocks (token scores summed per block) are kept; key block 0 (sink) and the diagonal are
   always kept.
4. Query-aware heads additionally keep, from the pooled block attention ``softmax(mean_pool(Q) .
   mean_pool(K)^T)`` over *all* query blocks (causal, row softmax), the globally largest blocks
   (flattened over rows) whose cumulative mass stays within ``gamma * number_of_query_blocks``.
5. Inputs with ``Nk <= max(2 b, ceil(min_budget / b) b)`` (and single-query decode) run dense.

Defaults: ``gamma = 0.95`` (FlexPrefill's setting for Llama-3.1 and GLM-4; 0.9 for Yi and Qwen2),
``tau = 0.1``, ``min_budget = 1024`` tokens (the FlexPrefill experiment scripts; the MInference module
default is None, i.e. one block), ``max_budget = None``, ``block_size = 128``.

Mapping onto the 128 x 64 kernel grid: FlexPrefill's blocks are 128 x 128. Query blocks are the
same 128 rows; a selected 128-key block ``c`` becomes our key blocks ``2c`` and ``2c + 1``. With
``Nq == Nk`` this is exact (same computed (query, key) pairs, same density). Slash block ``g`` of
query block ``r`` is the 128-key block ``diag(r) - g``, ``diag(r)`` the block holding the query block's
last position.

Deviations:

- Batch size > 1 (the original asserts 1) and no Python loop over heads: the query-aware selection is
  computed for every head and applied where the decision says so.
- Slash scores are grouped by ``floor(distance / 128)``; the original sum-pools its diagonal axis from
  the far end, which matches this grouping only when ``N`` is a multiple of 128.
- ``gamma >= 1`` means dense (the original's float cumulative sums make that case run-dependent).
- ``Nq != Nk`` (chunked prefill, bottom-right aligned) and non-causal attention are extensions; the
  diagonal block is always the key blocks holding the query block's own positions.
- GQA follows the kernel's convention (query head ``h`` reads KV head ``h // (Hq // Hkv)``), i.e. the
  original's ``gqa_interleave=False``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import validation
from ..ops import reference
from ..ops.blocks import BLOCK_K, BLOCK_Q, num_blocks
from . import _blockmaps as bm
from . import register_method
from .base import AttentionMethod

DEFAULT_GAMMA = 0.95
DEFAULT_TAU = 0.1
DEFAULT_MIN_BUDGET = 1024
BLOCK = 128  # FlexPrefill's block size; equals BLOCK_Q and 2 * BLOCK_K
# FlexPrefill converts a token count to blocks with this constant (hard-coded in the original too)
COUNT_TO_BLOCKS = 128


def _check_number(name: str, value: Any, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"flexprefill: {name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"flexprefill: {name} must be a finite number in {span}, got {value}")
    return float(value)


def _check_budget(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"flexprefill: {name} must be an int (tokens) or None, got {value!r} ({type(value).__name__})"
        )
    if value < 1:
        raise ValueError(f"flexprefill: {name} must be >= 1 token (or None), got {value}")
    return value


@dataclass(frozen=True)
class FlexPrefillPlan:
    """What FlexPrefill decided for one input. Per-(batch, head) tensors are ``(B, Hq)``; they are
    empty-shaped placeholders (zeros / False / NaN) when ``dense`` is True."""

    mask: torch.Tensor  # bool (B, Hq, nqb, nkb) on the 128 x 64 grid
    dense: bool  # short input (or gamma >= 1): every allowed block
    js_distance: torch.Tensor  # float (B, Hq)
    query_aware: torch.Tensor  # bool (B, Hq)
    vertical_blocks: torch.Tensor  # long (B, Hq), budget in 128-key blocks
    slash_blocks: torch.Tensor  # long (B, Hq)


def _cover_count(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """FlexPrefill's coverage count: 1 + the number of sorted-descending scores whose cumulative sum
    is <= gamma."""
    cumulative = torch.cumsum(torch.sort(scores, dim=-1, descending=True).values, dim=-1)
    return (cumulative <= gamma).sum(dim=-1) + 1


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Square root of the Jensen-Shannon divergence (natural log) along the last axis."""
    m = 0.5 * (p + q)
    jsd = 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1) + 0.5 * (
        torch.xlogy(q, q) - torch.xlogy(q, m)
    ).sum(-1)
    return jsd.clamp(min=0).sqrt()


@register_method("flexprefill")
class FlexPrefill(AttentionMethod):
    """FlexPrefill on the shared kernel (see the module docstring)."""

    budget_param = "gamma"
    budget_range: ClassVar[tuple[float, float | None]] = (0.0, 1.0)

    def __init__(
        self,
        gamma: float = DEFAULT_GAMMA,
        tau: float = DEFAULT_TAU,
        min_budget: int | None = DEFAULT_MIN_BUDGET,
        max_budget: int | None = None,
        block_size: int = BLOCK,
    ):
        self.gamma = _check_number("gamma", gamma, 0.0, 1.0)
        self.tau = _check_number("tau", tau, 0.0)
        self.min_budget = _check_budget("min_budget", min_budget)
        self.max_budget = _check_budget("max_budget", max_budget)
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"flexprefill: block_size must be an int, got {block_size!r}")
        if block_size != BLOCK:
            raise ValueError(
                f"flexprefill: block_size must be {BLOCK} (the kernel's {BLOCK_Q}-query block, two "
                f"{BLOCK_K}-key blocks); got {block_size}"
            )
        self.block_size = block_size

    def params(self) -> dict[str, Any]:
        return {
            "gamma": self.gamma,
            "tau": self.tau,
            "min_budget": self.min_budget,
            "max_budget": self.max_budget,
            "block_size": self.block_size,
        }

    # ---------------------------------------------------------------------------------------
    def _min_blocks(self) -> int:
        return 1 if self.min_budget is None else math.ceil(self.min_budget / BLOCK)

    def _runs_dense(self, nq: int, nk: int) -> bool:
        min_tokens = self._min_blocks() * BLOCK
        return self.gamma >= 1.0 or nq == 1 or nk <= max(2 * BLOCK, min_tokens)

    def plan(
        self, q: torch.Tensor, k: torch.Tensor, *, is_causal: bool, scale: float | None = None,
        window: int | None = None,
    ) -> FlexPrefillPlan:
        """The block map and the per-head decisions behind it (``window``: a causal sliding window; the
        estimate sees only the keys inside it and the map is cut to its block band)."""
        validation.check_qk(q, k)
        validation.check_flag("is_causal", is_causal)
        window = validation.check_window(window, is_causal)
        sm_scale = validation.resolve_scale(scale, q.shape[-1])
        bsz, num_heads, nq = q.shape[:3]
        nk = k.shape[2]
        if self._runs_dense(nq, nk):
            zeros = torch.zeros(bsz, num_heads, dtype=torch.long, device=q.device)
            return FlexPrefillPlan(
                bm.full_mask(q, k, is_causal, window),
                True,
                torch.full((bsz, num_heads), math.nan, device=q.device),
                torch.zeros(bsz, num_heads, dtype=torch.bool, device=q.device),
                zeros,
                zeros,
            )

        probs, positions = bm.last_rows_probs(q, k, BLOCK, sm_scale, is_causal, window)
        rows = probs.shape[-2]
        vertical = probs.mean(dim=-2)  # (B, H, Nk)
        slash = bm.diagonal_sums(probs, positions, nq) / rows  # (B, H, Nq + Nk - 1)
        del probs

        nkb = num_blocks(nk, BLOCK)
        min_blocks = min(self._min_blocks(), nkb)
        max_blocks = nkb if self.max_budget is None else min(math.ceil(self.max_budget / BLOCK), nkb)
        v_count = (
            (_cover_count(vertical, self.gamma) // COUNT_TO_BLOCKS + 1)
            .clamp(min=min_blocks)
            .clamp(max=max_blocks)
        )
        s_count = (
            (_cover_count(slash, self.gamma) // COUNT_TO_BLOCKS + 1)
            .clamp(min=min_blocks)
            .clamp(max=max_blocks)
        )

        vertical_blocks = self._sum_pool(vertical, nkb)  # (B, H, nkb)
        slash_groups, group_of_offset = self._slash_groups(slash, nq, nk, is_causal, window)

        pooled_k = bm.expand_kv(reference.block_mean_pool(k.float(), BLOCK), num_heads)  # (B, H, nkb, D)
        q_last_mean = q[:, :, nq - rows :].float().mean(dim=-2, keepdim=True) * sm_scale  # (B, H, 1, D)
        estimate = torch.softmax((q_last_mean @ pooled_k.transpose(-1, -2)).squeeze(-2), dim=-1)
        distance = js_distance(estimate, vertical_blocks)
        query_aware = distance < self.tau
        v_count = torch.where(query_aware, torch.full_like(v_count, min_blocks), v_count)
        s_count = torch.where(query_aware, torch.full_like(s_count, min_blocks), s_count)

        vs128 = self._vertical_slash_blocks(
            vertical_blocks, slash_groups, group_of_offset, v_count, s_count, nq, nk
        )
        qa128 = self._query_aware_blocks(q, pooled_k, nq, nk, is_causal, sm_scale)
        mask128 = vs128 | (qa128 & query_aware[..., None, None])
        mask = mask128.repeat_interleave(BLOCK // BLOCK_K, dim=-1)[..., : num_blocks(nk, BLOCK_K)]
        mask = (mask | bm.diagonal_blocks(nq, nk, q.device)) & reference.allowed_block_mask(
            nq, nk, is_causal, device=q.device, window=window
        )
        return FlexPrefillPlan(mask, False, distance, query_aware, v_count, s_count)

    def block_mask(
        self, q: torch.Tensor, k: torch.Tensor, *, is_causal: bool, scale: float | None = None,
        window: int | None = None,
    ) -> torch.Tensor:
        return self.plan(q, k, is_causal=is_causal, scale=scale, window=window).mask

    # ---------------------------------------------------------------------------------------
    @staticmethod
    def _sum_pool(x: torch.Tensor, nb: int) -> torch.Tensor:
        pad = nb * BLOCK - x.shape[-1]
        return torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], nb, BLOCK).sum(-1)

    @staticmethod
    def _slash_groups(slash: torch.Tensor, nq: int, nk: int, is_causal: bool,
                      window: int | None = None) -> tuple[torch.Tensor, int]:
        """Slash scores summed per ``floor(distance / 128)`` group: ``(B, H, G)``, and the index of group 0.

        Group 0 (the diagonal) is ranked first; groups that hold no candidate distance are -inf (with a
        sliding ``window``, also the groups wholly at distances the window never allows)."""
        dist = torch.arange(1 - nq, nk, device=slash.device)
        group = torch.div(dist, BLOCK, rounding_mode="floor")
        g_min = int(group[0])
        index = (group - g_min).expand_as(slash)
        groups = torch.zeros(
            *slash.shape[:-1], int(group[-1]) - g_min + 1, dtype=slash.dtype, device=slash.device
        )
        groups.scatter_add_(-1, index, slash)
        values = torch.arange(g_min, g_min + groups.shape[-1], device=slash.device)
        if is_causal:
            groups = groups.masked_fill(values < 0, -math.inf)
            if window is not None:
                groups = groups.masked_fill(values * BLOCK >= window, -math.inf)
        groups = groups.masked_fill(values == 0, math.inf)
        return groups, -g_min

    @staticmethod
    def _diag_block(nq: int, nk: int, device) -> torch.Tensor:
        """The 128-key block holding each query block's last position, ``(nqb,)``."""
        _, p_last = bm.query_block_positions(nq, nk, device)
        return torch.div(p_last, BLOCK, rounding_mode="floor")

    def _vertical_slash_blocks(
        self, vertical_blocks, slash_groups, group_zero: int, v_count, s_count, nq: int, nk: int
    ) -> torch.Tensor:
        """``(B, H, nqb, nkb128)``: the selected vertical and slash blocks."""
        device = vertical_blocks.device
        vertical_blocks = vertical_blocks.clone()
        vertical_blocks[..., 0] = math.inf
        v_sel = bm.top_count_select(vertical_blocks, v_count)  # (B, H, nkb)
        s_sel = bm.top_count_select(slash_groups, s_count)  # (B, H, G)
        nkb = vertical_blocks.shape[-1]
        diag = self._diag_block(nq, nk, device)
        offsets = diag[:, None] - torch.arange(nkb, device=device)[None, :]  # (nqb, nkb): the slash group
        index = offsets + group_zero
        valid = (index >= 0) & (index < slash_groups.shape[-1])
        flat = index.clamp(0, slash_groups.shape[-1] - 1).reshape(1, 1, -1).expand(*s_sel.shape[:2], -1)
        slash_mask = s_sel.gather(-1, flat).reshape(*s_sel.shape[:2], *index.shape) & valid
        return slash_mask | v_sel[..., None, :]

    def _query_aware_blocks(
        self, q, pooled_k, nq: int, nk: int, is_causal: bool, scale: float
    ) -> torch.Tensor:
        """``(B, H, nqb, nkb128)``: the globally selected blocks of the pooled block attention."""
        pooled_q = reference.block_mean_pool(q.float(), BLOCK) * scale
        scores = pooled_q @ pooled_k.transpose(-1, -2)  # (B, H, nqb, nkb)
        if is_causal:
            _, p_last = bm.query_block_positions(nq, nk, q.device)
            k_first = torch.arange(scores.shape[-1], device=q.device) * BLOCK
            scores = scores.masked_fill(k_first[None, :] > p_last[:, None], -math.inf)
        probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
        flat = probs.flatten(-2)
        values, order = torch.sort(flat, dim=-1, descending=True, stable=True)
        keep_sorted = torch.cumsum(values, dim=-1) <= self.gamma * scores.shape[-2]
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        return keep.reshape(scores.shape)
