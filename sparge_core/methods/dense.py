"""``dense``: every allowed block kept (the kernel then computes exact softmax attention; with a sliding
window, exact sliding-window attention)."""

from __future__ import annotations

from typing import Any

import torch

from ..ops import reference
from . import register_method
from .base import AttentionMethod


@register_method("dense")
class Dense(AttentionMethod):
    def block_mask(self, q, k, *, is_causal, scale=None, window=None) -> torch.Tensor:
        nq, nk = q.shape[2], k.shape[2]
        allowed = reference.allowed_block_mask(nq, nk, is_causal, device=q.device, window=window)
        return allowed.expand(q.shape[0], q.shape[1], -1, -1)

    def pipeline_kwargs(self) -> dict[str, Any]:
        # budget 1 keeps every block; stage 2 off: the same computation as block_mask + the kernel
        return dict(simthreshd1=-1.0, cdfthreshd=1.0, topk=None, pvthreshd=None, estimator="pooled")
