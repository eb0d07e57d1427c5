"""Small helpers shared by the Triton launchers and kernels: where a kernel can run, constexpr sizes, and
the index-list edges both writers of a ``BlockLUT`` use."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreter_enabled() -> bool:
    """True when Triton was imported in interpreter mode (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_runnable(x: torch.Tensor) -> None:
    """Raise a clear error when a Triton kernel cannot run on ``x``'s device."""
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu":
        if interpreter_enabled():
            return
        raise RuntimeError(
            "backend='triton' got CPU tensors, but Triton runs on CPU only through its interpreter: "
            "set TRITON_INTERPRET=1 in the environment before Python imports triton, or use "
            "backend='reference' (the default 'auto' picks it on CPU)."
        )
    raise RuntimeError(f"backend='triton' supports CUDA tensors (and CPU under TRITON_INTERPRET=1), got {x.device}")


def padded_head_dim(head_dim: int) -> int:
    """The power-of-two tile width (at least 16) that holds ``head_dim`` channels."""
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def lut_row_edges(i_qb, n_q, n_k, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(low, limit)`` of query block ``i_qb`` (a scalar or a vector of blocks): key blocks ``j < limit``
    end before the causal diagonal and before the end of K; with a sliding window, blocks ``j >= low``
    start inside the window of the block's last row, so ``[low, limit)`` needs no token mask (causal is
    bottom-right aligned: offset ``n_k - n_q``)."""
    limit = i_qb * 0 + n_k // BLOCK_K
    low = i_qb * 0
    if IS_CAUSAL:
        offset = n_k - n_q
        limit = tl.minimum(limit, tl.maximum(i_qb * BLOCK_Q + offset + 1, 0) // BLOCK_K)
        if HAS_WINDOW:
            q_last = tl.minimum((i_qb + 1) * BLOCK_Q, n_q) - 1 + offset
            low = tl.maximum(q_last - window + 1 + BLOCK_K - 1, 0) // BLOCK_K  # first block fully inside
    return low, limit
