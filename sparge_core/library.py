"""The public functions as ``torch.library`` custom ops, so ``torch.compile`` sees each call as one node.

``torch.ops.sparge.sparge_attn``, ``torch.ops.sparge.predict_block_mask`` and
``torch.ops.sparge.block_sparse_attn`` wrap the validated implementations of ``sparge_core.api`` (any
backend: Triton or the reference). Their fake implementations give the output shapes, so
``torch.compile(model, fullgraph=True)`` traces a model whose attention calls sparge without a graph
break, and inside the op the Triton launches run as they do eagerly (no host synchronisation, so a
compiled or eager prefill can be captured in a CUDA graph).

The public functions call these ops only while ``torch.compile`` traces (``torch.compiler.is_compiling``);
eager calls go straight to the implementations and skip the dispatcher's overhead. Hyperparameters
travel as float lists (validated before the op is reached); block counts come back as three
``(B, Hq)`` int64 tensors (allowed, computed, PV-skipped).

The ops have no autograd formula: sparge is an inference (forward-only) kernel.
"""

from __future__ import annotations

import torch

from . import api


def _count_like(q: torch.Tensor) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[1]), dtype=torch.long)


@torch.library.custom_op("sparge::sparge_attn", mutates_args=())
def sparge_attn_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool, scale: float,
    simthreshd1: list[float], budget: list[float], topk_mode: bool, pvthreshd: list[float] | None, quant: str, estimator: str,
    window: int | None, backend: str, local_blocks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, counts = api._sparge_attn_impl(
        q, k, v, is_causal=is_causal, scale=scale, simthreshd1=tuple(simthreshd1), budget=tuple(budget),
        topk_mode=topk_mode, pvthreshd=None if pvthreshd is None else tuple(pvthreshd), quant=quant,
        estimator=estimator, window=window, backend=backend, local_blocks=local_blocks)
    return out, counts.allowed, counts.computed, counts.pv_skipped


@sparge_attn_op.register_fake
def _(q, k, v, **_kw):
    out = q.new_empty((*q.shape[:3], v.shape[-1]), dtype=v.dtype)
    return out, _count_like(q), _count_like(q), _count_like(q)


@torch.library.custom_op("sparge::predict_block_mask", mutates_args=())
def predict_block_mask_op(
    q: torch.Tensor, k: torch.Tensor, *, is_causal: bool, scale: float, simthreshd1: list[float],
    budget: list[float], topk_mode: bool, estimator: str, window: int | None, backend: str,
    local_blocks: int = 0,
) -> torch.Tensor:
    return api._predict_impl(q, k, is_causal=is_causal, scale=scale, simthreshd1=tuple(simthreshd1),
                             budget=tuple(budget), topk_mode=topk_mode, estimator=estimator, window=window,
                             backend=backend, local_blocks=local_blocks)


@predict_block_mask_op.register_fake
def _(q, k, **_kw):
    nqb = api.reference.num_blocks(q.shape[2], api.BLOCK_Q)
    nkb = api.reference.num_blocks(k.shape[2], api.BLOCK_K)
    return q.new_empty((q.shape[0], q.shape[1], nqb, nkb), dtype=torch.bool)


@torch.library.custom_op("sparge::block_sparse_attn", mutates_args=())
def block_sparse_attn_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, is_causal: bool, scale: float,
    pvthreshd: list[float] | None, quant: str, window: int | None, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, counts = api._attend_impl(q, k, v, mask, is_causal=is_causal, scale=scale,
                                   pvthreshd=None if pvthreshd is None else tuple(pvthreshd), quant=quant,
                                   window=window, backend=backend)
    return out, counts.allowed, counts.computed, counts.pv_skipped


@block_sparse_attn_op.register_fake
def _(q, k, v, mask, **_kw):
    out = q.new_empty((*q.shape[:3], v.shape[-1]), dtype=v.dtype)
    return out, _count_like(q), _count_like(q), _count_like(q)
