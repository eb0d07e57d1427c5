"""Block geometry and the small value types every executor shares.

The reference (``reference.py``) and the Triton files (``predict.py``, ``attention.py``) both import
from here, so the fast paths never depend on the reference for constants.

- ``BLOCK_Q`` x ``BLOCK_K`` (128 x 64) is the geometry of every block map: ``(B, Hq, ceil(Nq/128),
  ceil(Nk/64))`` bool, True = compute that block pair.
- Causal attention with ``Nq != Nk`` is bottom-right aligned: query ``i`` sees keys ``j <= i + Nk - Nq``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

BLOCK_Q = 128
BLOCK_K = 64
LOG2E = 1.4426950408889634
#: Added to a block's INT8 scale so an all-zero block does not divide by zero.
QUANT_SCALE_EPS = 1e-7
#: How a block's score is estimated from the pooled query: "pooled" (the paper: pooled query .
#: pooled key) or "keys" (pooled query against every key of the block, log-sum-exp per block).
ESTIMATORS = ("pooled", "keys")


def num_blocks(n: int, block: int) -> int:
    """Number of blocks of ``block`` tokens that cover ``n`` tokens."""
    return (n + block - 1) // block


@functools.lru_cache(maxsize=1024)
def allowed_block_count(nq: int, nk: int, is_causal: bool, window: int | None = None) -> int:
    """Number of (BLOCK_Q x BLOCK_K) block pairs that attention may touch at all, computed on the host
    (no device work): every pair, or under bottom-right causal masking those with at least one allowed
    (query, key) pair (with a sliding ``window``: query at position p sees keys p - window < j <= p).
    Cached: every attention call of a forward asks for the same shapes."""
    nqb, nkb = num_blocks(nq, BLOCK_Q), num_blocks(nk, BLOCK_K)
    if not is_causal:
        return nqb * nkb
    total = 0
    for i in range(nqb):
        last = min((i + 1) * BLOCK_Q, nq) - 1 + (nk - nq)  # last key position the block's last row sees
        hi = 0 if last < 0 else min(nkb, last // BLOCK_K + 1)  # key blocks [0, hi) start at or before it
        lo = 0
        if window is not None:  # blocks whose last key is before the window of the block's first row
            first = i * BLOCK_Q + (nk - nq) - window + 1  # smallest key the first row sees
            lo = max(0, first // BLOCK_K)
        total += max(0, hi - lo)
    return total


@dataclass(frozen=True)
class PooledBlocks:
    """What the predictor's pass over Q or K produces: mean token and self-similarity per block."""

    pooled: torch.Tensor  # (B, H, nb, D)
    sim: torch.Tensor  # (B, H, nb)


@dataclass(frozen=True)
class BlockLUT:
    """The block map as the kernel reads it: per (b, h, query block) the ascending kept key-block
    indices (``indices[..., :count]``; the tail is unspecified), how many there are, how many of the
    first ones cross the lower edge of a sliding window (``n_low``, token mask; zero without a window)
    and how many of those after them need no token mask (``n_unmasked``)."""

    indices: torch.Tensor  # (B, Hq, nqb, nkb) int32
    count: torch.Tensor  # (B, Hq, nqb) int32
    n_unmasked: torch.Tensor  # (B, Hq, nqb) int32
    n_low: torch.Tensor  # (B, Hq, nqb) int32

    @classmethod
    def empty(cls, bsz: int, heads: int, nqb: int, nkb: int, device) -> BlockLUT:
        """Uninitialised buffers for a kernel to fill."""
        count = torch.empty(bsz, heads, nqb, device=device, dtype=torch.int32)
        return cls(torch.empty(bsz, heads, nqb, nkb, device=device, dtype=torch.int32), count,
                   torch.empty_like(count), torch.empty_like(count))



class BlockCounts:
    """Per (batch, query head) block counts of one attention call, as ``(B, Hq)`` int64 tensors:

    - ``allowed``: block pairs the causal mask allows (all pairs when not causal);
    - ``computed``: kept block pairs that were computed (kept and allowed);
    - ``pv_skipped``: computed block pairs whose P.V was skipped by stage 2.

    Either given as tensors, or ``BlockCounts.lazy(make)``: ``make()`` returns the three tensors and
    runs when a count is first read, so a caller that drops the counts (a call without
    ``return_stats``) launches none of the reductions behind them. ``make`` must read only buffers
    that the call owns (nothing a later call overwrites before the counts are read).
    """

    __slots__ = ("_values", "_make")

    def __init__(self, allowed: torch.Tensor, computed: torch.Tensor, pv_skipped: torch.Tensor):
        self._values = (allowed, computed, pv_skipped)
        self._make = None

    @classmethod
    def lazy(cls, make) -> BlockCounts:
        counts = cls.__new__(cls)
        counts._values, counts._make = None, make
        return counts

    @classmethod
    def from_rows(cls, allowed: int, computed_rows: tuple[torch.Tensor, ...],
                  pv_skipped_rows: torch.Tensor | None = None) -> BlockCounts:
        """Lazy counts of an executor that keeps per-row counts ``(B, Hq, nqb)``: ``allowed`` block pairs
        per (batch, head), the computed pairs as the sum of ``computed_rows`` over their rows, the
        P.V-skipped ones from ``pv_skipped_rows`` (None: stage 2 off, none skipped)."""
        def make():
            computed = sum(r.sum(dim=-1, dtype=torch.long) for r in computed_rows)
            skipped = (torch.zeros_like(computed) if pv_skipped_rows is None
                       else pv_skipped_rows.sum(dim=-1, dtype=torch.long))
            return torch.full_like(computed, allowed), computed, skipped

        return cls.lazy(make)

    def _get(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._values is None:
            self._values, self._make = tuple(self._make()), None
        return self._values

    @property
    def allowed(self) -> torch.Tensor:
        return self._get()[0]

    @property
    def computed(self) -> torch.Tensor:
        return self._get()[1]

    @property
    def pv_skipped(self) -> torch.Tensor:
        return self._get()[2]

    def __repr__(self) -> str:
        if self._values is None:
            return "BlockCounts(<not computed yet>)"
        return f"BlockCounts(allowed={self.allowed}, computed={self.computed}, pv_skipped={self.pv_skipped})"
