"""Sparsity statistics of one sparse-attention call."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops.blocks import BlockCounts


@dataclass(frozen=True)
class SparsityStats:
    """Block counts per (batch, query head) and the three sparsity figures derived from them.

    - ``qk_sparsity``: fraction of block pairs skipped, over the pairs a causal mask allows.
    - ``pv_skip``: fraction of computed blocks whose P.V was skipped by stage 2.
    - ``sparsity``: the paper's definition, skipped (QK^T + P.V) block matmuls over those of dense
      attention (a PV-only skip counts half a block).
    ``density`` is ``1 - qk_sparsity``.

    The counts stay where the kernels wrote them (on the GPU): building a ``SparsityStats`` reads
    nothing on the host; reading one of the figures does (one synchronisation).
    """

    allowed_blocks: torch.Tensor  # (B, Hq) int64
    computed_blocks: torch.Tensor  # (B, Hq) int64
    pv_skipped_blocks: torch.Tensor  # (B, Hq) int64

    @classmethod
    def from_counts(cls, counts: BlockCounts) -> SparsityStats:
        return cls(counts.allowed, counts.computed, counts.pv_skipped)

    @staticmethod
    def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
        den_total = int(den.sum())
        return float(num.sum()) / den_total if den_total else 0.0

    @property
    def qk_sparsity(self) -> float:
        return self._ratio(self.allowed_blocks - self.computed_blocks, self.allowed_blocks)

    @property
    def density(self) -> float:
        return 1.0 - self.qk_sparsity

    @property
    def pv_skip(self) -> float:
        return self._ratio(self.pv_skipped_blocks, self.computed_blocks)

    @property
    def sparsity(self) -> float:
        skipped = 2 * (self.allowed_blocks - self.computed_blocks) + self.pv_skipped_blocks
        return self._ratio(skipped, 2 * self.allowed_blocks)

    def per_head_sparsity(self) -> torch.Tensor:
        """Paper sparsity per query head, summed over the batch: float64 ``(Hq,)``."""
        skipped = (2 * (self.allowed_blocks - self.computed_blocks) + self.pv_skipped_blocks).sum(0)
        return skipped.double() / (2 * self.allowed_blocks.sum(0)).clamp(min=1).double()

    def per_head_qk_sparsity(self) -> torch.Tensor:
        """Block-map sparsity per query head, summed over the batch: float64 ``(Hq,)``."""
        skipped = (self.allowed_blocks - self.computed_blocks).sum(0)
        return skipped.double() / self.allowed_blocks.sum(0).clamp(min=1).double()

    def __repr__(self) -> str:
        return (f"SparsityStats(qk_sparsity={self.qk_sparsity:.4f}, pv_skip={self.pv_skip:.4f}, "
                f"sparsity={self.sparsity:.4f})")
