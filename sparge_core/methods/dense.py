"""``dense``: every block kept (the kernel then computes exact softmax attention)."""

from __future__ import annotations

import torch

from ..ops import reference
from . import register_method
from .base import AttentionMethod


@register_method("dense")
class Dense(AttentionMethod):
    def block_mask(self, q, k, *, is_causal, scale=None) -> torch.Tensor:
        nq, nk = q.shape[2], k.shape[2]
        allowed = reference.allowed_block_mask(nq, nk, is_causal, device=q.device)
        return allowed.expand(q.shape[0], q.shape[1], -1, -1)
