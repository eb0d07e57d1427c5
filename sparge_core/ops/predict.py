"""Triton stage-1 predictor: one fused pass per tensor for smoothing, pooling and self-similarity.

Algorithm (SpargeAttn, arXiv 2502.18137, section 3.3): each program reads one block of tokens of Q
(BLOCK_Q rows) or K (BLOCK_K rows) once and produces
- the block's mean token (a partial last block divides by its true length),
- its self-similarity, the mean pairwise cosine of its rows. Instead of forming the block's Gram
  matrix (as the official kernel does with a ``tl.dot``), we use the identity
  ``mean_ij <x_i/|x_i|, x_j/|x_j|> = |mean_i x_i/|x_i||^2``: one pass, no matmul, exact in real
  arithmetic, with an all-zero row contributing a zero vector;
- optionally (``quant=True``) the block's symmetric INT8 copy and scale (scale = max|x| / 127 + 1e-7,
  round half away from zero) of ``x * multiplier``, so the quantized attention path reads Q and K once
  for prediction and quantization together, as the paper's fused kernel does.
K is smoothed (its per-head token mean subtracted) inside the pass; the mean itself is one torch
reduction before it (it needs every token of the head, a second read of K).

The pooled score map is one batched torch matmul; the selection (non-self-similar and fully-future
columns to -inf, the row softmax, a descending sort, the cumulative sum and its cut, the fix rows and
columns, causal diagonal and future blocks) is one Triton program per row of the block map
(``_select_kernel``). It keeps the blocks whose value is at least the value at the cut, so it can keep
more blocks than the reference only where values tie exactly at the cut.

Beyond the paper: ``estimator="keys"`` replaces the pooled score map by
``reference.key_resolved_scores`` (the pooled query against every key, log-sum-exp per key block; a
torch matmul over row chunks, in the inputs' half dtype on CUDA), so one dominant key inside a block
is not averaged away. The selection kernel is the same; it takes either score map.

Limits: head dim up to 256 (tiles padded to a power of two); pooled values are float32, so the mask
can differ from the float64 reference only where pooled probabilities or similarities tie within
float32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_util import check_runnable, padded_head_dim
from .blocks import BLOCK_K, BLOCK_Q, PooledBlocks, num_blocks


@triton.jit
def _pool_sim_kernel(
    X, MEAN, POOLED, SIM, XQ, XSCALE,  #
    stride_xb, stride_xh, stride_xn, stride_xd,  #
    n_tokens, n_blocks, n_heads, multiplier,  #
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,  #
    SMOOTH: tl.constexpr, QUANT: tl.constexpr,  #
):
    i_blk = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // n_heads
    i_h = i_bh % n_heads
    o_n = i_blk * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, D_PAD)
    m_n = o_n < n_tokens
    m_d = o_d < HEAD_DIM
    m_x = m_n[:, None] & m_d[None, :]
    base = X + i_b.to(tl.int64) * stride_xb + i_h.to(tl.int64) * stride_xh
    b_x = tl.load(base + o_n[:, None] * stride_xn + o_d[None, :] * stride_xd, mask=m_x, other=0.0).to(tl.float32)
    if SMOOTH:
        b_mean = tl.load(MEAN + i_bh * HEAD_DIM + o_d, mask=m_d, other=0.0)
        b_x = tl.where(m_x, b_x - b_mean[None, :], 0.0)  # [BLOCK, D_PAD]
    n_real = tl.minimum(n_tokens - i_blk * BLOCK, BLOCK).to(tl.float32)

    # -- mean token of the block
    b_pooled = tl.sum(b_x, axis=0) / n_real  # [D_PAD]
    out_row = i_bh.to(tl.int64) * n_blocks + i_blk
    tl.store(POOLED + out_row * HEAD_DIM + o_d, b_pooled, mask=m_d)

    # -- mean pairwise cosine = squared norm of the mean unit row
    b_norm = tl.sqrt(tl.sum(b_x * b_x, axis=1))  # [BLOCK]
    b_unit = b_x / tl.where(b_norm > 0, b_norm, 1.0)[:, None]
    b_mean_unit = tl.sum(b_unit, axis=0) / n_real
    tl.store(SIM + out_row, tl.sum(b_mean_unit * b_mean_unit, axis=0))

    # -- optional per-block INT8 copy of x * multiplier
    if QUANT:
        b_s = b_x * multiplier
        b_scale = tl.max(tl.max(tl.abs(b_s), axis=1), axis=0) / 127.0 + 1e-7
        b_y = b_s / b_scale
        b_y = b_y + tl.where(b_y >= 0, 0.5, -0.5)
        b_y = tl.minimum(tl.maximum(b_y, -127.0), 127.0)
        q_base = XQ + i_bh.to(tl.int64) * n_tokens * D_PAD
        tl.store(q_base + o_n[:, None] * D_PAD + o_d[None, :], b_y.to(tl.int8), mask=m_n[:, None])
        tl.store(XSCALE + out_row, b_scale)


def pool_and_similarity(
    x: torch.Tensor, block: int, *, smooth: bool, quant_multiplier: float | None = None
) -> tuple[PooledBlocks, torch.Tensor | None, torch.Tensor | None]:
    """Fused pass over ``x`` ``(B, H, N, D)``.

    Returns ``PooledBlocks`` (float32), and when ``quant_multiplier`` is given the INT8 tensor
    ``(B, H, N, D_PAD)`` (channels beyond D are zero; contiguous, ready for the attention kernel) and its
    float32 per-block scales ``(B, H, nb)``; otherwise ``None, None``.
    """
    check_runnable(x)
    bsz, heads, n, head_dim = x.shape
    nb = num_blocks(n, block)
    d_pad = padded_head_dim(head_dim)
    mean = x.mean(dim=2, dtype=torch.float32).contiguous() if smooth else x.new_empty(1, dtype=torch.float32)
    pooled = torch.empty(bsz, heads, nb, head_dim, device=x.device, dtype=torch.float32)
    sim = torch.empty(bsz, heads, nb, device=x.device, dtype=torch.float32)
    quant = quant_multiplier is not None
    if quant:
        xq = torch.empty(bsz, heads, n, d_pad, device=x.device, dtype=torch.int8)  # every element written
        xscale = torch.empty(bsz, heads, nb, device=x.device, dtype=torch.float32)
    else:
        xq = xscale = x.new_empty(1, dtype=torch.float32)
    _pool_sim_kernel[(nb, bsz * heads)](
        x, mean, pooled, sim, xq, xscale,
        *x.stride(),
        n, nb, heads, float(quant_multiplier or 1.0),
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK=block, SMOOTH=smooth, QUANT=quant,
        num_warps=4 if block * d_pad <= 128 * 64 else 8,
    )
    blocks = PooledBlocks(pooled, sim)
    return (blocks, xq, xscale) if quant else (blocks, None, None)


@triton.jit
def _select_kernel(
    SCORES, SIM_Q, SIM_K, THETA, BUDGET, MASK,  #
    n_q_heads, group, n_qblocks, n_kblocks, n_q, n_k, scale, window,  #
    NK_PAD: tl.constexpr, TOPK_MODE: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,  #
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,  #
):
    i_qb = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // n_q_heads
    i_h = i_bh % n_q_heads
    i_hk = i_h // group
    o_j = tl.arange(0, NK_PAD)
    m_j = o_j < n_kblocks
    row = i_bh.to(tl.int64) * n_qblocks + i_qb
    theta = tl.load(THETA + i_h)
    budget = tl.load(BUDGET + i_h)  # cdfthreshd, or topk in top-k mode

    # -- self-similarity: fix rows (query block) and columns (key blocks)
    sim_k = tl.load(SIM_K + (i_b.to(tl.int64) * (n_q_heads // group) + i_hk) * n_kblocks + o_j, mask=m_j, other=0.0)
    k_similar = sim_k > theta
    q_similar = (tl.load(SIM_Q + row) + 0.0 * o_j) > theta  # (a vector: see attention.py on interpreter masks)
    s = tl.load(SCORES + row * n_kblocks + o_j, mask=m_j, other=float("-inf")) * scale
    s = tl.where(k_similar, s, float("-inf"))
    if IS_CAUSAL:
        offset = n_k - n_q
        q_first = i_qb * BLOCK_Q + offset
        q_last = tl.minimum((i_qb + 1) * BLOCK_Q, n_q) - 1 + offset
        allowed = o_j * BLOCK_K <= q_last
        if HAS_WINDOW:  # blocks wholly before the window of the block's first row are never allowed
            allowed = allowed & (tl.minimum(o_j * BLOCK_K + BLOCK_K, n_k) - 1 > q_first - window)
        s = tl.where(allowed, s, float("-inf"))

    # -- top-CDF or top-k: the value at the cut of the descending order
    if TOPK_MODE:
        n_keep = tl.maximum(tl.floor(budget * n_kblocks).to(tl.int32), 1)
        n_keep = tl.where(budget >= 1.0, n_kblocks, n_keep)
        values = s
    else:
        s_max = tl.max(s, axis=0)
        s_max = tl.where(s_max == float("-inf"), 0.0, s_max)
        w = tl.exp(s - s_max)
        total = tl.sum(w, axis=0)
        values = w / tl.where(total > 0, total, 1.0)
        cdf = tl.cumsum(tl.sort(values, descending=True), axis=0)
        n_keep = tl.maximum(tl.sum((cdf <= budget).to(tl.int32), axis=0), 1)
        n_keep = tl.where(budget >= 1.0, n_kblocks, n_keep)
    ordered = tl.sort(values, descending=True)
    cut = tl.min(tl.where(o_j < n_keep, ordered, float("inf")), axis=0)
    keep = (values >= cut) | ~q_similar | ~k_similar
    if IS_CAUSAL:
        diagonal = (o_j >= tl.maximum(q_first, 0) // BLOCK_K) & (o_j * BLOCK_K <= q_last)
        keep = (keep | diagonal | (o_j == 0)) & allowed  # block 0: the attention sink
    tl.store(MASK + row * n_kblocks + o_j, keep.to(tl.int8), mask=m_j)


def select_blocks(
    q_blocks: PooledBlocks,
    k_blocks: PooledBlocks,
    *,
    nq: int,
    nk: int,
    is_causal: bool,
    scale: float,
    simthreshd1: torch.Tensor,
    cdfthreshd: torch.Tensor | None = None,
    topk: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Triton version of ``reference.select_blocks`` (same arguments, same block map up to ties)."""
    if (cdfthreshd is None) == (topk is None):
        raise ValueError("select_blocks needs exactly one of cdfthreshd and topk")
    pooled_q, pooled_k = q_blocks.pooled, k_blocks.pooled
    bsz, num_q_heads, nqb, head_dim = pooled_q.shape
    num_kv_heads, nkb = pooled_k.shape[1], pooled_k.shape[2]
    group = num_q_heads // num_kv_heads
    if scores is None:  # pooled scores of all query heads of a KV head in one batched matmul
        scores = pooled_q.reshape(bsz, num_kv_heads, group * nqb, head_dim) @ pooled_k.transpose(-1, -2)
    else:  # (B, Hq, nqb, nkb): the same memory order as the grouped matmul's result
        scores = scores.to(torch.float32).contiguous()
    mask = torch.empty(bsz, num_q_heads, nqb, nkb, device=pooled_q.device, dtype=torch.bool)
    budget = (topk if topk is not None else cdfthreshd).to(device=pooled_q.device, dtype=torch.float32)
    _select_kernel[(nqb, bsz * num_q_heads)](
        scores, q_blocks.sim, k_blocks.sim.contiguous(), simthreshd1.to(device=pooled_q.device, dtype=torch.float32),
        budget.contiguous(), mask.view(torch.int8),
        num_q_heads, group, nqb, nkb, nq, nk, float(scale), window or 0,
        NK_PAD=max(16, triton.next_power_of_2(nkb)), TOPK_MODE=topk is not None, IS_CAUSAL=is_causal,
        HAS_WINDOW=window is not None,
        BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K, num_warps=4 if nkb <= 1024 else 8,
    )
    return mask


def predict_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    simthreshd1: torch.Tensor,
    cdfthreshd: torch.Tensor | None = None,
    topk: torch.Tensor | None = None,
    estimator: str = "pooled",
    window: int | None = None,
) -> torch.Tensor:
    """Stage-1 block map with the Triton pass (inputs already validated, params per query head)."""
    q_blocks, _, _ = pool_and_similarity(q, BLOCK_Q, smooth=False)
    k_blocks, _, _ = pool_and_similarity(k, BLOCK_K, smooth=True)
    return select_blocks(
        q_blocks, k_blocks, nq=q.shape[-2], nk=k.shape[-2], is_causal=is_causal, scale=scale,
        simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk,
        scores=estimator_scores(estimator, q_blocks, k, scale), window=window,
    )


def estimator_scores(estimator: str, q_blocks: PooledBlocks, k: torch.Tensor, scale: float) -> torch.Tensor | None:
    """``reference.estimator_scores`` with the matmul in the inputs' half dtype on CUDA, float32
    otherwise."""
    from . import reference  # the keys estimator is still the reference's torch computation

    half = k.dtype in (torch.float16, torch.bfloat16) and k.is_cuda
    return reference.estimator_scores(estimator, q_blocks.pooled, k, scale=scale,
                                      dtype=k.dtype if half else torch.float32)
