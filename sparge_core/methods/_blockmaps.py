"""Block-map building blocks shared by the rival methods (``minference``, ``flexprefill``) and by
density matching.

Everything here works on whole ``(B, H, ...)`` tensors, without Python loops over batch or heads.

Coordinates. Causal attention with ``Nq != Nk`` is bottom-right aligned (docs/design.md, "Public API"): query
row ``i`` sits at key position ``p(i) = i + Nk - Nq``. A *vertical* line is a key column ``j``; a
*slash* line is a fixed distance ``d = p(i) - j`` between a query's position and a key (``d = 0`` is
the main diagonal, ``d > 0`` the past). Distances range over ``[1 - Nq, Nk - 1]`` and are stored on an
axis of length ``Nq + Nk - 1`` at index ``d + Nq - 1`` (``distance_index``).

``line_block_cover`` turns token-level vertical and slash selections into the smallest block map of
the kernel's ``BLOCK_Q x BLOCK_K`` grid that contains every selected (query, key) pair: a block is kept
iff at least one selected line passes through it (and, if causal, through its allowed part). It uses
prefix sums over the selected columns and distances, so its cost does not depend on how many lines
are selected.

Density (``mask_density``): kept block pairs over the block pairs a causal mask allows (all pairs
when not causal), counted over every batch element and query head; ``1 - qk_sparsity`` of
``SparsityStats``.
"""

from __future__ import annotations

import math

import torch

from ..ops import reference
from ..ops.blocks import BLOCK_K, BLOCK_Q, num_blocks


def expand_kv(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Repeat a per-KV-head tensor ``(B, Hkv, ...)`` to ``(B, Hq, ...)`` (query head h reads KV head
    ``h // (Hq // Hkv)``, as the kernel does)."""
    return x.repeat_interleave(num_q_heads // x.shape[1], dim=1)


def mask_density(mask: torch.Tensor, nq: int, nk: int, is_causal: bool, window: int | None = None) -> float:
    """Kept block pairs over the pairs the causal mask (and sliding ``window``) allows, over all (batch,
    head)."""
    allowed = reference.allowed_block_mask(nq, nk, is_causal, device=mask.device, window=window)
    kept = (mask & allowed).sum().item()
    total = allowed.sum().item() * mask.shape[0] * mask.shape[1]
    return kept / total if total else 1.0


def full_mask(q: torch.Tensor, k: torch.Tensor, is_causal: bool, window: int | None = None) -> torch.Tensor:
    """Every allowed block pair, ``(B, Hq, nqb, nkb)``."""
    allowed = reference.allowed_block_mask(q.shape[2], k.shape[2], is_causal, device=q.device, window=window)
    return allowed.expand(q.shape[0], q.shape[1], -1, -1).clone()


def diagonal_blocks(nq: int, nk: int, device) -> torch.Tensor:
    """``(nqb, nkb)``: the key blocks that hold each query block's own positions."""
    return reference.causal_diagonal_block_mask(nq, nk, BLOCK_Q, BLOCK_K, device=device)


def distance_index(distance: torch.Tensor | int, nq: int):
    """Index of a slash distance on the distance axis (length ``Nq + Nk - 1``)."""
    return distance + nq - 1


def last_rows_probs(
    q: torch.Tensor, k: torch.Tensor, rows: int, scale: float, is_causal: bool, window: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention rows of the last ``rows`` queries against every key (with a causal sliding
    ``window``: the keys inside it), in float32.

    GQA without repeating K: query heads are grouped over their KV head. Returns ``probs``
    ``(B, Hq, R, Nk)`` (a row that sees no key is all zero) and the rows' key positions ``(R,)``.
    """
    bsz, num_q_heads, nq, head_dim = q.shape
    num_kv_heads, nk = k.shape[1], k.shape[2]
    rows = min(rows, nq)
    group = num_q_heads // num_kv_heads
    q_last = q[:, :, nq - rows :].float().reshape(bsz, num_kv_heads, group, rows, head_dim)
    logits = (q_last @ k.float()[:, :, None].transpose(-1, -2)) * scale  # (B, Hkv, g, R, Nk)
    logits = logits.reshape(bsz, num_q_heads, rows, nk)
    positions = torch.arange(nq - rows, nq, device=q.device) + (nk - nq)
    if is_causal:
        keys = torch.arange(nk, device=q.device)[None, :]
        future = keys > positions[:, None]
        if window is not None:
            future |= keys <= positions[:, None] - window
        logits = logits.masked_fill(future, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if is_causal and int(positions[0]) < 0:  # rows before the first key (Nq > Nk) see nothing: NaN -> 0
        probs = torch.nan_to_num(probs, nan=0.0)
    return probs, positions


def diagonal_sums(probs: torch.Tensor, positions: torch.Tensor, nq: int) -> torch.Tensor:
    """Sum of ``probs`` ``(B, H, R, Nk)`` along each slash distance: ``(B, H, Nq + Nk - 1)``."""
    bsz, heads, rows, nk = probs.shape
    dist = positions[:, None] - torch.arange(nk, device=probs.device)[None, :]  # (R, Nk)
    index = distance_index(dist, nq).reshape(1, 1, rows * nk).expand(bsz, heads, -1)
    out = torch.zeros(bsz, heads, nq + nk - 1, dtype=probs.dtype, device=probs.device)
    return out.scatter_add_(-1, index, probs.reshape(bsz, heads, rows * nk))


def top_count_select(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask of the ``counts`` highest finite entries along the last axis.

    ``counts``: integer tensor broadcastable to ``scores.shape[:-1]`` (a different count per row is
    fine). Ties keep the lower index first (stable sort). ``+inf`` entries (forced lines) rank first;
    ``-inf`` entries (non-candidates) and NaN are never selected.
    """
    _, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.arange(scores.shape[-1], device=scores.device)
    keep_sorted = ranks < counts.to(scores.device)[..., None]
    keep = torch.zeros_like(keep_sorted.expand(scores.shape)).scatter(
        -1, order, keep_sorted.expand(scores.shape)
    )
    return keep & (scores > -math.inf)


def query_block_positions(nq: int, nk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions of the first and last row of every query block, ``(nqb,)`` each."""
    starts = torch.arange(num_blocks(nq, BLOCK_Q), device=device) * BLOCK_Q
    ends = torch.clamp(starts + BLOCK_Q, max=nq) - 1
    return starts + (nk - nq), ends + (nk - nq)


def _range_count(prefix: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """How many selected entries lie in ``[lo, hi]`` for every block pair.

    ``prefix``: ``(B, H, L + 1)`` with ``prefix[x]`` = number selected below x; ``lo``/``hi``:
    ``(nqb, nkb)`` indices (``hi < lo`` means an empty range). Returns ``(B, H, nqb, nkb)``.
    """
    length = prefix.shape[-1] - 1
    empty = hi < lo
    lo_c = lo.clamp(0, length)
    hi_c = (hi + 1).clamp(0, length)
    bsz, heads = prefix.shape[:2]
    flat_hi = hi_c.reshape(1, 1, -1).expand(bsz, heads, -1)
    flat_lo = lo_c.reshape(1, 1, -1).expand(bsz, heads, -1)
    count = prefix.gather(-1, flat_hi) - prefix.gather(-1, flat_lo)
    count = count.reshape(bsz, heads, *lo.shape)
    return count.masked_fill(empty, 0)


def line_block_cover(
    columns: torch.Tensor, distances: torch.Tensor, nq: int, nk: int, is_causal: bool
) -> torch.Tensor:
    """Block map covering token-level vertical and slash lines.

    Args:
        columns: bool ``(B, H, Nk)``, the selected key columns.
        distances: bool ``(B, H, Nq + Nk - 1)``, the selected slash distances (``distance_index``).
    Returns:
        bool ``(B, H, nqb, nkb)``: True where a selected line meets an allowed (query, key) pair of the
        block pair.
    """
    device = columns.device
    p_first, p_last = query_block_positions(nq, nk, device)
    k_first = torch.arange(num_blocks(nk, BLOCK_K), device=device) * BLOCK_K
    k_last = torch.clamp(k_first + BLOCK_K, max=nk) - 1

    zeros = torch.zeros(*columns.shape[:2], 1, dtype=torch.long, device=device)
    col_prefix = torch.cat([zeros, columns.long().cumsum(-1)], dim=-1)
    dist_prefix = torch.cat([zeros, distances.long().cumsum(-1)], dim=-1)

    # vertical: a selected column inside the key block (and, if causal, seen by the block's last row)
    col_lo = k_first[None, :].expand(p_first.shape[0], -1)
    col_hi = k_last[None, :].expand(p_first.shape[0], -1)
    if is_causal:
        col_hi = torch.minimum(col_hi, p_last[:, None])
    vertical = _range_count(col_prefix, col_lo, col_hi) > 0

    # slash: the block's (query, key) pairs span every distance in [p_first - k_last, p_last - k_first]
    d_lo = p_first[:, None] - k_last[None, :]
    d_hi = p_last[:, None] - k_first[None, :]
    if is_causal:
        d_lo = d_lo.clamp(min=0)
    slash = _range_count(dist_prefix, distance_index(d_lo, nq), distance_index(d_hi, nq)) > 0

    allowed = reference.allowed_block_mask(nq, nk, is_causal, device=device)
    return (vertical | slash) & allowed
