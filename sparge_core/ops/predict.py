"""Triton stage-1 predictor in three launches, with no host synchronisation.

Algorithm (SpargeAttn, arXiv 2502.18137, section 3.3), and how the work is split:

1. ``_q_stats_k_sums_kernel`` (one launch, a 1-D grid of two kinds of programs):
   - the K-sum programs (first in the grid: they run longest) each add up the rows of a contiguous run
     of K blocks of one (batch, KV head) into a float32 partial sum; at most ``MAX_K_PARTS`` partial sums
     per head. They exist because K smoothing (subtracting K's per-head token mean before anything else)
     needs every token of the head before any K block can be processed;
   - the Q programs each read one BLOCK_Q block of Q once and write its mean token, its
     self-similarity and, optionally, its symmetric INT8 copy of ``q * multiplier`` and scale.
2. ``_block_stats_kernel`` (one launch): each program reads one BLOCK_K block of K, subtracts the mean
   (the sum of the head's partial sums over Nk) and writes the same three things for the smoothed K.
3. ``_score_select_kernel`` (one launch): each program takes ROWS consecutive rows of the block map of
   one (batch, KV head) (the rows of all its query heads: GQA shares the pooled K), forms their scores
   against every key block the rows may see (causal/window: only those) into float32 scratch rows,
   then selects the blocks of ``SEL_ROWS`` rows at a time (a 2-D tile sorted along the key axis, at
   most ``SELECT_ELEMENTS`` entries, below). For ``sparge_attn`` (``predict_and_prepare``) the same
   tile also writes the rows' ascending index lists, counts and window/causal edge counts (the
   ``BlockLUT`` that ``attention.build_block_lut`` would make from the map), so the attention launch
   follows directly: a whole call is four launches.

Self-similarity: the mean pairwise cosine of a block's rows, from the identity
``mean_ij <x_i/|x_i|, x_j/|x_j|> = |mean_i x_i/|x_i||^2`` (one pass, no Gram matrix; an all-zero row
is a zero vector). A block with a non-finite value has a NaN self-similarity, so it is never
self-similar: its row or column is always kept, and NaN/inf inputs reach the attention kernel and
propagate as in dense attention.

Scores (step 3): ``estimator="pooled"`` (the paper): pooled query . pooled (smoothed) key, a float32
``tl.dot`` in IEEE precision. ``estimator="keys"`` (beyond the paper): the pooled query against every
key of each block with the log-sum-exp per key block kept in registers (the ``rows x Nk`` score matrix
is never written), i.e. ``reference.key_resolved_scores``; on CUDA the dot takes the pooled query in
the inputs' 16-bit type (float32 accumulation), elsewhere float32. K smoothing shifts every score of a
row by one constant, so both estimators may use the raw or the smoothed K.

Selection (``reference.select_blocks``): non-self-similar K columns and blocks the causal mask (and a
sliding window) forbids get -inf; top-k keeps ``max(1, floor(topk * nkb))`` blocks by score (the count
computed in float64); top-CDF keeps the most probable blocks of the row softmax whose cumulative sum is
``<= cdfthreshd`` (at least one); ties at the cut go to the lower block index (the reference's stable
sort), so the map equals the reference's exactly whenever the float32 values equal its float64 ones.
Then the fix rows/columns of non-self-similar blocks, and under causal masking the diagonal blocks,
block 0 (the attention sink) and the ``local_blocks`` key blocks just before the diagonal, restricted
to the allowed blocks (``reference.causal_forced_block_mask``, the same formula).

``local_blocks`` (beyond the paper; default 0, the map is then exactly the one without the option):
for query block ``i`` (rows ``[i*BLOCK_Q, min((i+1)*BLOCK_Q, Nq))``, row ``r`` at key position
``r + Nk - Nq``: the bottom-right alignment the diagonal uses), its diagonal key blocks are ``lo..hi``
with ``lo = max(first position, 0) // BLOCK_K`` and ``hi = last position // BLOCK_K``; the forced band becomes
``lo - local_blocks..hi``, then intersected with the causal (and sliding-window) block mask, so a local
block is never kept where the mask forbids it. It is defined for causal attention only: non-causal
selection forces no block at all (no sink, no diagonal; with ``Nq != Nk`` there is no natural
diagonal either), so ``local_blocks > 0`` with ``is_causal=False`` is a ValueError (raised by the public
API, ``validation.check_local_blocks``).

Deviations: the float32 K mean is a sum of partial sums (a different order from ``torch.mean``), so
values can differ from the float64 reference in the last bits; masks then differ only where a
threshold sits within that rounding of a value.

Limits: head dim up to 256 (tiles padded to a power of two); the scratch scores take
``4 * B * Hq * nqb * nkb`` bytes (268 MB at 128K tokens and 32 heads).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._triton_util import check_runnable, interpreter_enabled, lut_row_edges, padded_head_dim
from .blocks import BLOCK_K, BLOCK_Q, BlockLUT, PooledBlocks, num_blocks

#: the K mean is reduced from at most this many partial sums per (batch, KV head)
MAX_K_PARTS = 32
#: key blocks per pooled-score tile
POOLED_CHUNK = 64
#: block-map entries selected together (rows x padded key blocks of one selection tile)
SELECT_ELEMENTS = 4096


# --------------------------------------------------------------------------------------------
# launches 1 and 2: block statistics
# --------------------------------------------------------------------------------------------
@triton.jit
def _store_block_stats(
    b_x, m_n, m_d, n_real, out_row, o_n, o_d, POOLED, SIM, XQ, XSCALE, xq_base, multiplier,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, QUANT: tl.constexpr,
):
    """Mean token, self-similarity and (QUANT) the INT8 copy of one block ``b_x`` [BLOCK, D_PAD]
    whose padding rows/columns are zero."""
    b_pooled = tl.sum(b_x, axis=0) / n_real  # [D_PAD]
    tl.store(POOLED + out_row * HEAD_DIM + o_d, b_pooled, mask=m_d)
    b_norm = tl.sqrt(tl.sum(b_x * b_x, axis=1))  # [BLOCK]
    b_unit = b_x / tl.where(b_norm > 0, b_norm, 1.0)[:, None]
    b_mean_unit = tl.sum(b_unit, axis=0) / n_real
    tl.store(SIM + out_row, tl.sum(b_mean_unit * b_mean_unit, axis=0))
    if QUANT:  # scale = max|x| / 127 + 1e-7, round half away from zero
        b_s = b_x * multiplier
        b_scale = tl.max(tl.max(tl.abs(b_s), axis=1), axis=0) / 127.0 + 1e-7
        b_y = b_s / b_scale
        b_y = b_y + tl.where(b_y >= 0, 0.5, -0.5)
        b_y = tl.minimum(tl.maximum(b_y, -127.0), 127.0)
        tl.store(XQ + xq_base + o_n[:, None] * D_PAD + o_d[None, :], b_y.to(tl.int8), mask=m_n[:, None])
        tl.store(XSCALE + out_row, b_scale)


@triton.jit
def _q_stats_k_sums_kernel(
    Q, POOLED_Q, SIM_Q, QI8, QSCALE, K, KSUM,  #
    stride_qb, stride_qh, stride_qn, stride_qd,  #
    stride_kb, stride_kh, stride_kn, stride_kd,  #
    n_q, n_qblocks, n_q_heads, n_k, n_kblocks, n_kv_heads, n_parts, blocks_per_part, n_sum_programs,  #
    q_multiplier,  #
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,  #
    QUANT: tl.constexpr,  #
):
    pid = tl.program_id(0)
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < HEAD_DIM
    if pid < n_sum_programs:
        # -- a partial sum of K's rows over blocks [kb0, kb1) of one (batch, KV head). The two branches
        # use distinct names: compiled Triton merges a name bound in both, and their shapes differ.
        i_part = pid % n_parts
        i_kbh = pid // n_parts
        i_kb = i_kbh // n_kv_heads
        i_kh = i_kbh % n_kv_heads
        k_base = K + i_kb.to(tl.int64) * stride_kb + i_kh.to(tl.int64) * stride_kh
        o_kr = tl.arange(0, BLOCK_K)
        acc = tl.zeros([D_PAD], dtype=tl.float32)
        kb0 = i_part * blocks_per_part
        kb1 = tl.minimum(kb0 + blocks_per_part, n_kblocks)
        for kb in range(kb0, kb1):
            rows = kb * BLOCK_K + o_kr
            b_k = tl.load(k_base + rows[:, None] * stride_kn + o_d[None, :] * stride_kd,
                          mask=(rows < n_k)[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(b_k, axis=0)
        tl.store(KSUM + (i_kbh.to(tl.int64) * n_parts + i_part) * D_PAD + o_d, acc)
    else:
        # -- one block of Q
        p = pid - n_sum_programs
        i_blk = p % n_qblocks
        i_bh = p // n_qblocks
        i_b = i_bh // n_q_heads
        i_h = i_bh % n_q_heads
        o_n = i_blk * BLOCK_Q + tl.arange(0, BLOCK_Q)
        m_n = o_n < n_q
        base = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
        b_x = tl.load(base + o_n[:, None] * stride_qn + o_d[None, :] * stride_qd,
                      mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        n_real = tl.minimum(n_q - i_blk * BLOCK_Q, BLOCK_Q).to(tl.float32)
        out_row = i_bh.to(tl.int64) * n_qblocks + i_blk
        _store_block_stats(b_x, m_n, m_d, n_real, out_row, o_n, o_d, POOLED_Q, SIM_Q, QI8, QSCALE,
                           i_bh.to(tl.int64) * n_q * D_PAD, q_multiplier, HEAD_DIM, D_PAD, QUANT)


@triton.jit
def _block_stats_kernel(
    X, XSUM, POOLED, SIM, XQ, XSCALE,  #
    stride_xb, stride_xh, stride_xn, stride_xd,  #
    n_tokens, n_blocks, n_heads, n_parts, multiplier,  #
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
    b_x = tl.load(base + o_n[:, None] * stride_xn + o_d[None, :] * stride_xd, mask=m_x, other=0.0)
    b_x = b_x.to(tl.float32)
    if SMOOTH:  # subtract the head's token mean, reduced from the partial sums of launch 1
        total = tl.zeros([D_PAD], dtype=tl.float32)
        for i_part in range(0, n_parts):
            total += tl.load(XSUM + (i_bh.to(tl.int64) * n_parts + i_part) * D_PAD + o_d)
        b_x = tl.where(m_x, b_x - (total / n_tokens)[None, :], 0.0)
    n_real = tl.minimum(n_tokens - i_blk * BLOCK, BLOCK).to(tl.float32)
    out_row = i_bh.to(tl.int64) * n_blocks + i_blk
    _store_block_stats(b_x, m_n, m_d, n_real, out_row, o_n, o_d, POOLED, SIM, XQ, XSCALE,
                       i_bh.to(tl.int64) * n_tokens * D_PAD, multiplier, HEAD_DIM, D_PAD, QUANT)


def _stat_buffers(x: torch.Tensor, nb: int, quant: bool):
    bsz, heads, n, head_dim = x.shape
    pooled = torch.empty(bsz, heads, nb, head_dim, device=x.device, dtype=torch.float32)
    sim = torch.empty(bsz, heads, nb, device=x.device, dtype=torch.float32)
    if quant:
        xq = torch.empty(bsz, heads, n, padded_head_dim(head_dim), device=x.device, dtype=torch.int8)
        xscale = torch.empty(bsz, heads, nb, device=x.device, dtype=torch.float32)
    else:
        xq = xscale = torch.empty(1, device=x.device, dtype=torch.float32)
    return pooled, sim, xq, xscale


def _k_parts(nkb: int) -> tuple[int, int]:
    """(number of partial sums per head, key blocks per partial sum)."""
    per_part = num_blocks(nkb, min(nkb, MAX_K_PARTS))
    return num_blocks(nkb, per_part), per_part


def _warps(block: int, d_pad: int) -> int:
    return 4 if block * d_pad <= 128 * 64 else 8


def _q_pass_and_k_sums(q: torch.Tensor | None, k: torch.Tensor, q_multiplier: float | None):
    """Launch 1: Q's block statistics (if ``q`` is given) and K's partial sums. Returns
    ``(q_blocks, q_i8, q_scale, k_sums, n_parts)`` (the Q entries None without ``q``)."""
    bsz, num_kv_heads, nk, head_dim = k.shape
    d_pad = padded_head_dim(head_dim)
    nkb = num_blocks(nk, BLOCK_K)
    n_parts, per_part = _k_parts(nkb)
    k_sums = torch.empty(bsz, num_kv_heads, n_parts, d_pad, device=k.device, dtype=torch.float32)
    n_sum_programs = bsz * num_kv_heads * n_parts
    quant = q_multiplier is not None
    if q is not None:
        num_q_heads, nq = q.shape[1], q.shape[2]
        nqb = num_blocks(nq, BLOCK_Q)
        pooled, sim, qi8, qscale = _stat_buffers(q, nqb, quant)
        q_arg, q_strides = q, q.stride()
    else:
        num_q_heads = nq = nqb = 0
        pooled = sim = qi8 = qscale = k_sums
        q_arg, q_strides = k, k.stride()
    _q_stats_k_sums_kernel[(n_sum_programs + bsz * num_q_heads * nqb,)](
        q_arg, pooled, sim, qi8, qscale, k, k_sums,
        *q_strides, *k.stride(),
        nq, max(nqb, 1), max(num_q_heads, 1), nk, nkb, num_kv_heads, n_parts, per_part, n_sum_programs,
        float(q_multiplier or 1.0),
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K, QUANT=quant,
        num_warps=_warps(BLOCK_Q, d_pad),
    )
    if q is None:
        return None, None, None, k_sums, n_parts
    return PooledBlocks(pooled, sim), (qi8 if quant else None), (qscale if quant else None), k_sums, n_parts


def _block_stats(x: torch.Tensor, block: int, sums: torch.Tensor | None, n_parts: int,
                 multiplier: float | None):
    """Launch 2 (or the Q pass alone): block statistics of ``x``; smoothed when ``sums`` is given."""
    check_runnable(x)
    bsz, heads, n, head_dim = x.shape
    nb = num_blocks(n, block)
    d_pad = padded_head_dim(head_dim)
    quant = multiplier is not None
    pooled, sim, xq, xscale = _stat_buffers(x, nb, quant)
    _block_stats_kernel[(nb, bsz * heads)](
        x, sums if sums is not None else sim, pooled, sim, xq, xscale,
        *x.stride(),
        n, nb, heads, n_parts, float(multiplier or 1.0),
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK=block, SMOOTH=sums is not None, QUANT=quant,
        num_warps=_warps(block, d_pad),
    )
    blocks = PooledBlocks(pooled, sim)
    return (blocks, xq, xscale) if quant else (blocks, None, None)


def pool_and_similarity(
    x: torch.Tensor, block: int, *, smooth: bool, quant_multiplier: float | None = None
) -> tuple[PooledBlocks, torch.Tensor | None, torch.Tensor | None]:
    """The block statistics of one tensor ``x`` ``(B, H, N, D)`` (smoothed first if ``smooth``).

    Returns ``PooledBlocks`` (float32), and when ``quant_multiplier`` is given the INT8 tensor
    ``(B, H, N, D_PAD)`` (channels beyond D are zero; contiguous, ready for the attention kernel) and its
    float32 per-block scales ``(B, H, nb)``; otherwise ``None, None``. Two launches when smoothing (the
    partial sums, then the pass), one otherwise. ``predict_block_mask`` does Q and K in three.
    """
    check_runnable(x)
    if not smooth:
        return _block_stats(x, block, None, 0, quant_multiplier)
    if block != BLOCK_K:
        raise ValueError(f"smoothing is the K pass: block must be BLOCK_K ({BLOCK_K}), got {block}")
    _, _, _, sums, n_parts = _q_pass_and_k_sums(None, x, None)
    return _block_stats(x, block, sums, n_parts, quant_multiplier)


# --------------------------------------------------------------------------------------------
# launch 3: scores and selection
# --------------------------------------------------------------------------------------------
@triton.jit
def _score_select_kernel(
    POOLED_Q, POOLED_K, K, SIM_Q, SIM_K, THETA, BUDGET, SCORES, MASK,  #
    LUT, COUNT, NLOW, NFULL,  #
    stride_kb, stride_kh, stride_kn, stride_kd,  #
    n_q_heads, group, n_qblocks, n_kblocks, n_q, n_k, scale, window, local_blocks,  #
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr, NK_PAD: tl.constexpr,  #
    SEL_ROWS: tl.constexpr, CHUNK: tl.constexpr,  #
    KEYS: tl.constexpr, HALF_DOT: tl.constexpr, TOPK_MODE: tl.constexpr,  #
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,  #
    WRITE_LUT: tl.constexpr,  #
):
    i_t = tl.program_id(0)
    i_bhk = tl.program_id(1)  # (batch, KV head)
    n_kv_heads = n_q_heads // group
    i_b = i_bhk // n_kv_heads
    i_hk = i_bhk % n_kv_heads
    n_rows = group * n_qblocks  # rows of this KV head's query heads, in (head, query block) order
    row0 = (i_b.to(tl.int64) * n_q_heads + i_hk * group) * n_qblocks  # flat index of its first row
    o_r = i_t * ROWS + tl.arange(0, ROWS)
    m_r = o_r < n_rows
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < HEAD_DIM
    offset = n_k - n_q

    # -- the key blocks any row of the tile may see
    kb_lo = 0
    kb_hi = n_kblocks
    if IS_CAUSAL:
        r_qb = o_r % n_qblocks
        r_first = r_qb * BLOCK_Q + offset
        r_last = tl.minimum((r_qb + 1) * BLOCK_Q, n_q) - 1 + offset
        r_hi = tl.where(r_last < 0, 0, tl.minimum(tl.maximum(r_last, 0) // BLOCK_K + 1, n_kblocks))
        kb_hi = tl.max(tl.where(m_r, r_hi, 0), axis=0)
        if HAS_WINDOW:
            r_lo = tl.maximum(r_first - window + 1, 0) // BLOCK_K
            kb_lo = tl.min(tl.where(m_r, r_lo, n_kblocks), axis=0)

    # -- scores of the tile's rows into the scratch rows (before the softmax scale)
    b_pq = tl.load(POOLED_Q + (row0 + o_r)[:, None] * HEAD_DIM + o_d[None, :],
                   mask=m_r[:, None] & m_d[None, :], other=0.0)  # [ROWS, D_PAD] float32
    s_rows = SCORES + (row0 + o_r) * n_kblocks  # [ROWS] pointers
    if KEYS:
        if HALF_DOT:
            b_pq = b_pq.to(K.dtype.element_ty)
        k_base = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
        o_n = tl.arange(0, BLOCK_K)
        for kb in range(kb_lo, kb_hi):
            o_k = kb * BLOCK_K + o_n
            m_k = o_k < n_k
            b_k = tl.load(k_base + o_k[None, :] * stride_kn + o_d[:, None] * stride_kd,
                          mask=m_d[:, None] & m_k[None, :], other=0.0)  # [D_PAD, BLOCK_K]
            if HALF_DOT:
                b_s = tl.dot(b_pq, b_k)
            else:
                b_s = tl.dot(b_pq, b_k.to(tl.float32), input_precision="ieee")
            b_s = tl.where(m_k[None, :], b_s * scale, float("-inf"))  # [ROWS, BLOCK_K]
            b_m = tl.max(b_s, axis=1)
            b_m = tl.where(b_m == float("-inf"), 0.0, b_m)
            b_l = tl.log(tl.sum(tl.exp(b_s - b_m[:, None]), axis=1)) + b_m
            tl.store(s_rows + kb, b_l / scale, mask=m_r)
    else:
        pk_base = POOLED_K + i_bhk.to(tl.int64) * n_kblocks * HEAD_DIM
        o_c = tl.arange(0, CHUNK)
        for c0 in range(kb_lo, kb_hi, CHUNK):
            o_j = c0 + o_c
            m_j = o_j < kb_hi
            b_pk = tl.load(pk_base + o_j[None, :] * HEAD_DIM + o_d[:, None],
                           mask=m_d[:, None] & m_j[None, :], other=0.0)  # [D_PAD, CHUNK]
            b_s = tl.dot(b_pq, b_pk, input_precision="ieee")  # [ROWS, CHUNK]
            tl.store(s_rows[:, None] + o_j[None, :], b_s, mask=m_r[:, None] & m_j[None, :])
    tl.debug_barrier()  # the scratch rows are read back below by other threads of this program

    # -- selection, SEL_ROWS rows at a time (a [SEL_ROWS, NK_PAD] tile, sorted along the key axis)
    o_j = tl.arange(0, NK_PAD)
    m_j = o_j < n_kblocks
    sim_k = tl.load(SIM_K + i_bhk.to(tl.int64) * n_kblocks + o_j, mask=m_j, other=0.0)
    for r0 in range(0, ROWS, SEL_ROWS):
        o_s = i_t * ROWS + r0 + tl.arange(0, SEL_ROWS)  # rows of this KV head's group
        m_s = o_s < n_rows
        i_h = i_hk * group + o_s // n_qblocks
        i_qb = o_s % n_qblocks
        rows = row0 + o_s
        theta = tl.load(THETA + i_h, mask=m_s, other=0.0)[:, None]
        budget = tl.load(BUDGET + i_h, mask=m_s, other=1.0)[:, None]  # float64: cdfthreshd or topk
        m_sj = m_s[:, None] & m_j[None, :]
        k_similar = (sim_k[None, :] > theta) & m_sj
        q_similar = tl.load(SIM_Q + rows, mask=m_s, other=0.0)[:, None] > theta
        s = tl.load(SCORES + rows[:, None] * n_kblocks + o_j[None, :], mask=m_sj, other=float("-inf"))
        s = s * scale
        s = tl.where(k_similar, s, float("-inf"))
        if IS_CAUSAL:
            q_first = (i_qb * BLOCK_Q + offset)[:, None]
            q_last = (tl.minimum((i_qb + 1) * BLOCK_Q, n_q) - 1 + offset)[:, None]
            allowed = (o_j[None, :] * BLOCK_K <= q_last) & m_sj
            if HAS_WINDOW:  # blocks wholly before the window of the block's first row
                k_last = tl.minimum(o_j * BLOCK_K + BLOCK_K, n_k) - 1
                allowed = allowed & (k_last[None, :] > q_first - window)
            s = tl.where(allowed, s, float("-inf"))  # (never-written scratch entries drop out here)
        if TOPK_MODE:
            n_keep = tl.maximum(tl.floor(budget * n_kblocks).to(tl.int32), 1)
            values = s
            ordered = tl.sort(values, dim=1, descending=True)
        else:
            s_max = tl.max(s, axis=1)[:, None]
            s_max = tl.where(s_max == float("-inf"), 0.0, s_max)
            w = tl.exp(s - s_max)
            total = tl.sum(w, axis=1)[:, None]
            # (padding sorts last)
            values = tl.where(m_j[None, :], w / tl.where(total > 0, total, 1.0), -1.0)
            ordered = tl.sort(values, dim=1, descending=True)
            cdf = tl.cumsum(ordered, axis=1)
            within = (cdf <= budget.to(tl.float32)) & m_j[None, :]
            n_keep = tl.maximum(tl.sum(within.to(tl.int32), axis=1)[:, None], 1)
        n_keep = tl.where(budget >= 1.0, n_kblocks, n_keep)
        # the first n_keep of a stable descending sort: everything above the cut value, then the
        # entries equal to it in index order
        cut = tl.sum(tl.where(o_j[None, :] == n_keep - 1, ordered, 0.0), axis=1)[:, None]
        above = values > cut
        at_cut = values == cut
        need = n_keep - tl.sum(above.to(tl.int32), axis=1)[:, None]
        top = above | (at_cut & (tl.cumsum(at_cut.to(tl.int32), axis=1) <= need))
        keep = top | ~q_similar | ~k_similar
        if IS_CAUSAL:
            # the diagonal key blocks and the local_blocks key blocks before them
            diagonal = ((o_j[None, :] >= tl.maximum(q_first, 0) // BLOCK_K - local_blocks)
                        & (o_j[None, :] * BLOCK_K <= q_last))
            keep = (keep | diagonal | (o_j[None, :] == 0)) & allowed  # block 0: the attention sink
        tl.store(MASK + rows[:, None] * n_kblocks + o_j[None, :], keep.to(tl.int8), mask=m_sj)
        if WRITE_LUT:  # the rows' index lists, as attention._mask_to_lut_kernel writes them from MASK
            keep_i = (keep & m_sj).to(tl.int32)  # (causal: keep is already inside the allowed blocks)
            position = tl.cumsum(keep_i, axis=1) - 1
            tl.store(LUT + rows[:, None] * n_kblocks + position, o_j[None, :] + 0 * position, mask=keep_i != 0)
            tl.store(COUNT + rows, tl.sum(keep_i, axis=1), mask=m_s)
            low, limit = lut_row_edges(i_qb, n_q, n_k, window, IS_CAUSAL, HAS_WINDOW, BLOCK_Q, BLOCK_K)
            tl.store(NLOW + rows, tl.sum(tl.where(o_j[None, :] < low[:, None], keep_i, 0), axis=1), mask=m_s)
            unmasked = (o_j[None, :] >= low[:, None]) & (o_j[None, :] < limit[:, None])
            tl.store(NFULL + rows, tl.sum(tl.where(unmasked, keep_i, 0), axis=1), mask=m_s)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _rows_per_program(device: torch.device, tiles_of: callable) -> int:
    """The largest row tile (64, 32, 16) that still gives two waves of programs on a GPU."""
    if device.type != "cuda":
        return 16
    waves = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    for rows in (64, 32):
        if tiles_of(rows) >= waves:
            return rows
    return 16


def score_and_select(
    q_blocks: PooledBlocks,
    k_blocks: PooledBlocks,
    k: torch.Tensor,
    *,
    nq: int,
    is_causal: bool,
    scale: float,
    simthreshd1: torch.Tensor,
    budget: torch.Tensor,
    topk_mode: bool,
    estimator: str = "pooled",
    window: int | None = None,
    rows_per_program: int | None = None,
    return_scores: bool = False,
    local_blocks: int = 0,
    with_lut: bool = False,
):
    """Launch 3: the block map from the block statistics (``k``: the raw keys, read by the ``"keys"``
    estimator). ``simthreshd1`` float32 and ``budget`` float64 ``(Hq,)`` on the device; ``local_blocks``
    (causal only) a validated integer >= 0. ``with_lut``: also the map's ``BlockLUT`` (what
    ``attention.build_block_lut`` would make of it), written by the same launch: ``(mask, lut)``."""
    if with_lut and return_scores:
        raise ValueError("return_scores and with_lut are separate uses; ask for one")
    if local_blocks and not is_causal:
        raise ValueError("local_blocks is a causal-attention rule; non-causal selection forces no block")
    bsz, num_q_heads, nqb, head_dim = q_blocks.pooled.shape
    num_kv_heads, nkb = k_blocks.pooled.shape[1], k_blocks.pooled.shape[2]
    group = num_q_heads // num_kv_heads
    nk = k.shape[2]
    n_rows = group * nqb
    rows = rows_per_program or _rows_per_program(
        k.device, lambda r: bsz * num_kv_heads * num_blocks(n_rows, r))
    scores = torch.empty(bsz, num_q_heads, nqb, nkb, device=k.device, dtype=torch.float32)
    mask = torch.empty(bsz, num_q_heads, nqb, nkb, device=k.device, dtype=torch.bool)
    lut = BlockLUT.empty(bsz, num_q_heads, nqb, nkb, k.device) if with_lut else None
    lut_args = (lut.indices, lut.count, lut.n_low, lut.n_unmasked) if with_lut else (scores,) * 4
    nk_pad = max(16, triton.next_power_of_2(nkb))
    keys = estimator == "keys"
    half = keys and k.is_cuda and k.dtype in (torch.float16, torch.bfloat16) and not interpreter_enabled()
    if simthreshd1.dtype != torch.float32:
        simthreshd1 = simthreshd1.float()
    if budget.dtype != torch.float64:
        budget = budget.double()
    _score_select_kernel[(num_blocks(n_rows, rows), bsz * num_kv_heads)](
        q_blocks.pooled, k_blocks.pooled, k, q_blocks.sim, k_blocks.sim, simthreshd1, budget, scores,
        mask.view(torch.int8), *lut_args,
        *k.stride(),
        num_q_heads, group, nqb, nkb, nq, nk, float(scale), window or 0, int(local_blocks),
        HEAD_DIM=head_dim, D_PAD=padded_head_dim(head_dim), ROWS=rows, NK_PAD=nk_pad,
        SEL_ROWS=max(1, min(rows, SELECT_ELEMENTS // nk_pad)), CHUNK=POOLED_CHUNK,
        KEYS=keys, HALF_DOT=half, TOPK_MODE=topk_mode, IS_CAUSAL=is_causal, HAS_WINDOW=window is not None,
        BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K, WRITE_LUT=with_lut, num_warps=4 if nk_pad <= 1024 else 8,
    )
    if with_lut:
        return mask, lut
    return (mask, scores) if return_scores else mask


# --------------------------------------------------------------------------------------------
# the predictor
# --------------------------------------------------------------------------------------------
def _budget(cdfthreshd, topk) -> tuple[torch.Tensor, bool]:
    if (cdfthreshd is None) == (topk is None):
        raise ValueError("the predictor needs exactly one of cdfthreshd and topk")
    return (topk, True) if topk is not None else (cdfthreshd, False)


class PreparedCall(NamedTuple):
    """What the predictor's launches hand to the attention launch of the same call: the INT8 Q
    (times the multiplier) and smoothed K with their scales (None without quantization), and the
    map's ``BlockLUT``."""

    quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    lut: BlockLUT


def _three_passes(q, k, *, is_causal, scale, simthreshd1, cdfthreshd, topk, estimator, window,
                  quant_multiplier, rows_per_program, local_blocks, with_lut):
    """The predictor's three launches: ``(mask or (mask, lut), (q_i8, q_scale, k_i8, k_scale) or None)``."""
    check_runnable(q)
    budget, topk_mode = _budget(cdfthreshd, topk)
    q_blocks, q_i8, q_s, k_sums, n_parts = _q_pass_and_k_sums(q, k, quant_multiplier)
    k_blocks, k_i8, k_s = _block_stats(k, BLOCK_K, k_sums, n_parts, None if quant_multiplier is None else 1.0)
    selected = score_and_select(q_blocks, k_blocks, k, nq=q.shape[2], is_causal=is_causal, scale=scale,
                                simthreshd1=simthreshd1, budget=budget, topk_mode=topk_mode, estimator=estimator,
                                window=window, rows_per_program=rows_per_program, local_blocks=local_blocks,
                                with_lut=with_lut)
    return selected, (None if quant_multiplier is None else (q_i8, q_s, k_i8, k_s))


def predict_and_prepare(
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
    quant_multiplier: float | None = None,
    rows_per_program: int | None = None,
    local_blocks: int = 0,
) -> tuple[torch.Tensor, PreparedCall]:
    """The block map in three launches (inputs already validated, hyperparameters per query head on
    the device) with what ``attention.block_sparse_attn`` would otherwise compute again: the map's
    index lists (written by the selection launch) and, with ``quant_multiplier``, the INT8 Q (times
    the multiplier) and smoothed K from the same passes over Q and K."""
    (mask, lut), quantized = _three_passes(
        q, k, is_causal=is_causal, scale=scale, simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk,
        estimator=estimator, window=window, quant_multiplier=quant_multiplier, rows_per_program=rows_per_program,
        local_blocks=local_blocks, with_lut=True)
    return mask, PreparedCall(quantized, lut)


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
    rows_per_program: int | None = None,
    local_blocks: int = 0,
) -> torch.Tensor:
    """Stage-1 block map with the Triton passes (inputs already validated, params per query head;
    ``local_blocks``: see the module docstring)."""
    mask, _ = _three_passes(q, k, is_causal=is_causal, scale=scale, simthreshd1=simthreshd1, cdfthreshd=cdfthreshd,
                            topk=topk, estimator=estimator, window=window, quant_multiplier=None,
                            rows_per_program=rows_per_program, local_blocks=local_blocks, with_lut=False)
    return mask
