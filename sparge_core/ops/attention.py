"""Triton block-sparse FlashAttention forward with the SpargeAttn stage-2 PV skip.

Algorithm: FlashAttention-2 forward (online softmax in base 2: ``sm_scale * log2(e)`` is folded into
the logits so the kernel uses ``exp2``). One program handles a BLOCK_Q(=128)-row block of queries of
one (batch, query head) and visits **only the kept key blocks**, read from a compacted, ascending
index list (``BlockLUT``), never testing every block. The list comes from the block map through a
small Triton kernel (``build_block_lut``), or, inside ``sparge_attn``, from the predictor's selection
launch, which writes it beside the map (``attend(..., prepared=...)``). Per kept block:

1. ``s = q k^T`` (fp16/bf16 operands, or INT8 with per-block scales, fp32 accumulate);
2. only on blocks that cross the causal diagonal or the end of K, a token mask (causal is
   bottom-right aligned when Nq != Nk: query i sees keys j <= i + Nk - Nq);
3. stage 2 (``pvthreshd``): the block's row maxima are compared with the running maxima; if
   ``max over the block's real query rows of (rowmax_block - rowmax_running) <= -pvthreshd`` the
   block's exp, row-sum update and P.V are skipped (every P entry is below 2^-pvthreshd of its row's
   running max). Decided per 128-row block of queries, as the official CUDA kernel's per-CTA mode;
4. otherwise the usual rescale, ``exp2`` (of ``s * scale - m``: one FMA per score), row sum and
   ``acc += P V``.

How stage 2 is applied is a code-shape variant (``KernelConfig.pv_check``), because in Triton a
data-dependent branch around the V load and the P.V dot takes both out of the software pipeline (the
load is no longer prefetched, the tensor-core op no longer kept in flight; that, not the decision,
is what made stage 2 cost 1.35-1.6x on an H200 when nothing was skipped): ``"branch"`` (the V load
inside the branch), ``"prefetch"`` (the next kept block's V tile loaded one iteration ahead, exp and
P.V inside the branch) and ``"select"`` (no branch: a skipped block's probabilities are exactly zero
through its row maxima; the loop keeps the stage-2-off shape plus one cross-warp max per block, and a
skip saves nothing). The official sm90 kernel decides the same way per CTA (one 64-row warpgroup: a
warp-shuffle max, then a shared-memory exchange and a barrier) but its V tile arrives by an
asynchronous bulk copy issued before the decision, so its branch costs nothing. All variants make the
same decisions, so the reference (``reference.masked_attention``) simulates every one of them.

K/V tiles are read through pointers or, with ``KernelConfig.tile_loads="descriptor"``, through tensor
descriptors (TMA bulk copies on sm90; out-of-bounds rows and channels arrive as zeros). The shipped
choice (``default_kernel_config``, measured per head dim, quantization and stage 2) may pick
descriptors; on a layout they cannot read (rows not 16-byte aligned, an offset view) it falls back to
pointer loads, while an explicit descriptor config refuses such a layout.

The causal mask (and a sliding window) is applied to the block map before the index list is built
(fully-future blocks and blocks wholly before the window are dropped), so only blocks on an edge pay
for the token mask: the ascending loop runs in three stages, the blocks crossing the window's lower
edge (with a window), the unmasked blocks (their counts per row are precomputed), then the diagonal
and partial blocks.

Sliding window (``window``, causal only): query i at key position p = i + Nk - Nq sees keys
p - window < j <= p, as transformers' sliding-window layers (Mistral, Gemma3 local layers).

GQA: query head h reads K/V head h // (Hq / Hkv) through strides; K/V are never repeated.

Quantized variants (``quant``): ``int8`` = per-block symmetric INT8 Q (BLOCK_Q rows, with sm_scale *
log2(e) folded in before quantization) and K (BLOCK_K rows, smoothed: minus its token mean, which
changes no softmax); ``QK^T`` in INT8 with int32 accumulate, dequantized by the two block scales.
``int8-fp8`` additionally runs P.V in FP8 e4m3: V per-channel scaled to the e4m3 range (per batch,
KV head and channel), P scaled by 448 before its cast; the row sum stays fp32 and unscaled.

Deviations from the paper / official kernel:
- The PV skip test applies to every kept block after a row's first; the official CUDA kernel always
  computes the last two kept blocks. Ours skips more, and the reference simulates ours exactly.

- Stage 2 is decided per 128-row query block (the official released build's per-CTA mode), not per
  warp as the paper describes.
- Query rows that see no key (causal with Nq > Nk, or an empty row of the block map) get zeros; the
  official kernel leaves them uninitialised.

Measured alternative, not kept: gathering two kept 64-key blocks into one 128-key tile (to feed
Hopper's tensor cores larger tiles) ran slower on an H100 (bf16 438 vs 448, INT8 549 vs 600 dense-
equivalent TFLOPS at N=32K, D=128), see results/kernel/NOTES.md.

Limits: head dim up to 256 (64 and 128 native; others are zero-padded inside the tile to the next
power of two); fp16/bf16 in and out; fp32 inputs are computed with bf16 operands on GPU (fp32 under
the CPU interpreter). Under the Triton interpreter a bf16 ``tl.dot`` is wrong (triton 3.9), so the
interpreter path upcasts bf16 tiles to fp32 before its dots; FP8 P.V needs sm89+ and is never used
under the interpreter.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton_util import check_runnable, interpreter_enabled, lut_row_edges, padded_head_dim
from .blocks import BLOCK_K, BLOCK_Q, LOG2E, BlockCounts, BlockLUT, allowed_block_count, num_blocks

FP8_E4M3_MAX = 448.0

#: How the stage-2 decision is applied (see ``KernelConfig``): a branch around the V load, exp and P.V;
#: a branch around exp and P.V with the next block's V tile loaded one iteration ahead; or no branch.
PV_CHECKS = ("branch", "prefetch", "select")
#: How the main loop reads K and V tiles: pointer arithmetic with masks, or tensor descriptors (TMA
#: bulk copies on sm90+, zero-filled out of bounds).
TILE_LOADS = ("pointer", "descriptor")


@dataclass(frozen=True)
class KernelConfig:
    """Launch geometry and code-shape variant of the attention kernel (BLOCK_M x BLOCK_N always equals
    the predictor's BLOCK_Q x BLOCK_K, so every variant runs the same block map exactly).

    - ``num_warps``, ``num_stages``: Triton's launch width and software-pipelining depth.
    - ``pv_check``: how the stage-2 decision is applied (only matters when ``pvthreshd`` is given):
      ``"branch"`` (the V load, exp and P.V inside a data-dependent branch: Triton's software pipeline
      then neither prefetches V nor keeps the P.V tensor-core op in flight), ``"prefetch"`` (exp and
      P.V inside the branch, the next kept block's V tile loaded into registers one iteration ahead
      with plain loads, so its latency hides behind the current block) or ``"select"`` (no branch: a
      skipped block's probabilities are zeroed through its row maxima, so the loop keeps the exact
      shape of the stage-2-off kernel and costs one cross-warp max per block, but a skip saves
      nothing). All three make the same decisions, produce the same output and count the same
      skipped blocks. (Hoisting the V load above the branch is not a fourth variant: Triton 3.6 only
      pipelines loads that feed a dot outside any branch, so a hoisted load stays synchronous.)
    - ``tile_loads``: ``"pointer"`` or ``"descriptor"`` (K/V tiles through tensor descriptors; needs
      16-byte aligned strides and base pointers; on CPU the interpreter emulates them).
    """

    num_warps: int
    num_stages: int
    pv_check: str = "select"
    tile_loads: str = "pointer"

    def __post_init__(self):
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"KernelConfig.num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or isinstance(self.num_stages, bool) or self.num_stages < 1:
            raise ValueError(f"KernelConfig.num_stages must be an integer >= 1, got {self.num_stages!r}")
        if self.pv_check not in PV_CHECKS:
            raise ValueError(f"KernelConfig.pv_check must be one of {PV_CHECKS}, got {self.pv_check!r}")
        if self.tile_loads not in TILE_LOADS:
            raise ValueError(f"KernelConfig.tile_loads must be one of {TILE_LOADS}, got {self.tile_loads!r}")

    @property
    def name(self) -> str:
        """Short label, e.g. ``w4s2-select-descriptor`` (tuning tables, benchmark rows)."""
        return f"w{self.num_warps}s{self.num_stages}-{self.pv_check}-{self.tile_loads}"

    @classmethod
    def from_name(cls, name: str) -> KernelConfig:
        """Inverse of ``name``: ``"w8s2-select-pointer"`` -> ``KernelConfig(8, 2, "select", "pointer")``."""
        m = re.fullmatch(r"w(\d+)s(\d+)-([a-z]+)-([a-z]+)", name)
        if m is None:
            raise ValueError(f"a kernel config name looks like 'w8s2-select-pointer' "
                             f"(w<warps>s<stages>-<{'|'.join(PV_CHECKS)}>-<{'|'.join(TILE_LOADS)}>), got {name!r}")
        return cls(int(m.group(1)), int(m.group(2)), m.group(3), m.group(4))


#: INT8 QK^T (and FP8 P.V) launch configs per (head_dim > 64, quant, stage 2 on), measured on an H200 by
#: ``scripts/tune_kernel.py --n 32768 --quant int8 int8-fp8`` (results/kernel/tune-quant-h200.csv: the
#: lowest total over density 1 and 0.5, causal and not)
_QUANT_CONFIGS = {
    (True, "int8", False): "w4s2-select-descriptor", (True, "int8", True): "w8s2-branch-descriptor",
    (True, "int8-fp8", False): "w8s2-select-descriptor", (True, "int8-fp8", True): "w4s2-branch-pointer",
    (False, "int8", False): "w4s3-select-pointer", (False, "int8", True): "w8s3-branch-pointer",
    (False, "int8-fp8", False): "w4s3-select-descriptor", (False, "int8-fp8", True): "w8s3-branch-pointer",
}


def default_kernel_config(head_dim: int, device: torch.device, quant: str = "none",
                          stage2: bool = False) -> KernelConfig:
    """Launch config chosen by measurement: ``scripts/tune_kernel.py`` at N=32K, dense and 0.5 density,
    causal or not. bf16 (stage 2 on or off: the "select" check keeps the stage-2-off loop): the H200
    sweep over every variant (results/kernel/tune-h200.csv): D=128 runs fastest with tensor-descriptor
    loads, D=64 with pointer loads. INT8 QK^T and FP8 P.V: the H200 sweep of those variants
    (results/kernel/tune-quant-h200.csv), one config with stage 2 off and one with it on (there the
    "branch" check, which saves work on the blocks it skips, was the fastest)."""
    if device.type != "cuda":
        return KernelConfig(num_warps=4, num_stages=1)
    if quant != "none":
        return KernelConfig.from_name(_QUANT_CONFIGS[(head_dim > 64, quant, bool(stage2))])
    if head_dim > 64:
        return KernelConfig(num_warps=4, num_stages=2, tile_loads="descriptor")
    return KernelConfig(num_warps=8, num_stages=3)


@triton.jit
def _softmax_pv_update(acc, l_i, m_i, m_new, b_s, s_scale, b_v, keep,  #
                       FP8_PV: tl.constexpr, UPCAST_PV: tl.constexpr, SELECT: tl.constexpr):
    """One online-softmax step: rescale by the new row maxima, ``p = exp2(s * s_scale - m)``, row sums
    and ``acc += p v``. ``b_s`` holds raw (unscaled) scores. With ``SELECT`` and ``keep`` false every p is
    exactly 0 (the block contributes nothing; the caller guarantees ``m_new == m_i`` on real rows, so
    the rescale factors are exactly 1)."""
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    m_exp = m_safe
    if SELECT:
        m_exp = tl.where(keep, m_safe, float("inf"))
    b_p = tl.math.exp2(b_s * s_scale - m_exp[:, None])  # one FMA per score before the exp
    l_i = l_i * alpha + tl.sum(b_p, axis=1)
    acc = acc * alpha[:, None]
    if FP8_PV:
        acc += tl.dot((b_p * 448.0).to(tl.float8e4nv), b_v)
    elif UPCAST_PV:
        acc += tl.dot(b_p, b_v.to(tl.float32))
    else:
        acc += tl.dot(b_p.to(b_v.dtype), b_v)
    return acc, l_i, m_new


@triton.jit
def _load_v_tile(V, v_base, i_b, i_hk, kb, o_k, m_k, o_d, m_vd, stride_vn, stride_vd,  #
                 MASKED: tl.constexpr, DESC: tl.constexpr, FP8_PV: tl.constexpr,  #
                 BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """The V tile ``[BLOCK_N, D_PAD]`` of key block ``kb`` (a descriptor load zero-fills out of bounds)."""
    if DESC:
        if FP8_PV:  # channel-major storage
            b_v = tl.trans(V.load([i_b, i_hk, 0, kb * BLOCK_N]).reshape(D_PAD, BLOCK_N))
        else:
            b_v = V.load([i_b, i_hk, kb * BLOCK_N, 0]).reshape(BLOCK_N, D_PAD)
    else:
        v_ptrs = v_base + o_k[:, None] * stride_vn + o_d[None, :] * stride_vd
        if MASKED:
            b_v = tl.load(v_ptrs, mask=m_k[:, None] & m_vd[None, :], other=0.0)
        else:
            b_v = tl.load(v_ptrs)
    return b_v


@triton.jit
def _sparge_attn_fwd_kernel(
    Q, K, V, OUT, Q_SCALE, K_SCALE, V_SCALE,  #
    LUT, COUNT, NLOW, NFULL, PV_THRESH, PV_COUNT,  #
    stride_qb, stride_qh, stride_qn, stride_qd,  #
    stride_kb, stride_kh, stride_kn, stride_kd,  #
    stride_vb, stride_vh, stride_vn, stride_vd,  #
    stride_ob, stride_oh, stride_on, stride_od,  #
    n_q_heads, group, n_q, n_k, causal_offset, n_qblocks, n_kblocks, window,  #
    qk_scale,  #
    HEAD_DIM: tl.constexpr, QK_DIM: tl.constexpr, D_PAD: tl.constexpr,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, PV_SKIP: tl.constexpr, PV_CHECK: tl.constexpr,  #
    QUANT_QK: tl.constexpr, FP8_PV: tl.constexpr, UPCAST_QK: tl.constexpr, UPCAST_PV: tl.constexpr,  #
    EVEN_QK: tl.constexpr, EVEN_V: tl.constexpr, DESC: tl.constexpr, V_DESC: tl.constexpr,  #
):
    # PV_CHECK: 0 = "branch", 1 = "prefetch", 2 = "select" (see KernelConfig). DESC: K is a tensor
    # descriptor ([B, Hkv, Nk, QK_DIM] in blocks of [1, 1, BLOCK_N, D_PAD]); V_DESC: V too ([B, Hkv, Nk, D]
    # in the same blocks, or for FP8 P.V the channel-major [B, Hkv, D_PAD, Nk_pad] in blocks of
    # [1, 1, D_PAD, BLOCK_N]); the prefetch variant reads V through pointers (a descriptor load waits
    # for its copy where it is issued, so it cannot run one iteration ahead).
    i_m = tl.program_id(0)
    if IS_CAUSAL:
        i_m = n_qblocks - 1 - i_m  # heaviest query blocks first
    i_bh = tl.program_id(1)
    i_b = i_bh // n_q_heads
    i_h = i_bh % n_q_heads
    i_hk = i_h // group
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, D_PAD)
    m_m = o_m < n_q
    m_qkd = o_d < QK_DIM
    m_vd = o_d < HEAD_DIM

    # -- load the query tile once
    q_base = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
    b_q = tl.load(q_base + o_m[:, None] * stride_qn + o_d[None, :] * stride_qd,
                  mask=m_m[:, None] & m_qkd[None, :], other=0.0)  # [BLOCK_M, D_PAD]
    if UPCAST_QK:
        b_q = b_q.to(tl.float32)
    k_base = K  # descriptors carry their own geometry
    v_base = V
    if not DESC:
        k_base = K + i_b.to(tl.int64) * stride_kb + i_hk.to(tl.int64) * stride_kh
    if not V_DESC:
        v_base = V + i_b.to(tl.int64) * stride_vb + i_hk.to(tl.int64) * stride_vh
    row = i_bh.to(tl.int64) * n_qblocks + i_m
    lut_row = LUT + row * n_kblocks
    n_kept = tl.load(COUNT + row)
    n_full = tl.load(NFULL + row)
    n_low = 0
    if HAS_WINDOW:
        n_low = tl.load(NLOW + row)
    s_scale = qk_scale
    if QUANT_QK:
        q_scale = tl.load(Q_SCALE + row)
        k_scale_row = K_SCALE + (i_b.to(tl.int64) * (n_q_heads // group) + i_hk) * n_kblocks
    if PV_SKIP:
        neg_lambda = -tl.load(PV_THRESH + i_h)
    n_skipped = 0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    # The index list is ascending and falls into three runs: stage 0, blocks crossing the lower edge of
    # a sliding window (token mask; only with a window); stage 1, blocks fully inside the causal
    # triangle, the window and K (no token mask); stage 2, the rest (diagonal blocks, the partial last
    # block of K; token mask).
    for stage in tl.static_range(3):
        if stage == 0:
            lo = 0
            hi = n_low
        elif stage == 1:
            lo = n_low
            hi = n_low + n_full
        else:
            lo = n_low + n_full
            hi = n_kept
        masked = stage != 1
        if PV_SKIP and PV_CHECK == 1:
            # the first V tile of the run (zeros when the run is empty; the LUT read stays in bounds)
            kb0 = tl.load(lut_row + tl.minimum(lo, n_kblocks - 1))
            o_k0 = kb0 * BLOCK_N + o_n
            m_k0 = (o_k0 < n_k) & (tl.full([BLOCK_N], lo, tl.int32) < hi)
            b_v_next = tl.load(v_base + o_k0[:, None] * stride_vn + o_d[None, :] * stride_vd,
                               mask=m_k0[:, None] & m_vd[None, :], other=0.0)
        for it in range(lo, hi):
            kb = tl.load(lut_row + it)
            o_k = kb * BLOCK_N + o_n
            m_k = o_k < n_k
            if PV_SKIP and PV_CHECK == 1:
                # V of this block arrived during the previous one; ask for the next one's now (the
                # last block of a run reloads itself: an in-bounds, unmasked-safe read)
                b_v = b_v_next
                kb_n = tl.load(lut_row + tl.minimum(it + 1, hi - 1))
                o_kn = kb_n * BLOCK_N + o_n
                b_v_next = _load_v_tile(V, v_base, i_b, i_hk, kb_n, o_kn, o_kn < n_k, o_d, m_vd, stride_vn,
                                        stride_vd, masked or not EVEN_V, False, False, BLOCK_N, D_PAD)
            # -- K tile [D_PAD, BLOCK_N]
            if DESC:
                b_k = tl.trans(K.load([i_b, i_hk, kb * BLOCK_N, 0]).reshape(BLOCK_N, D_PAD))
            else:
                k_ptrs = k_base + o_k[None, :] * stride_kn + o_d[:, None] * stride_kd
                if not masked and EVEN_QK:
                    b_k = tl.load(k_ptrs)
                else:
                    b_k = tl.load(k_ptrs, mask=m_qkd[:, None] & m_k[None, :], other=0.0)
            # -- V tile [BLOCK_N, D_PAD], loaded before the decision unless the branch variant defers it
            if not (PV_SKIP and PV_CHECK != 2):
                b_v = _load_v_tile(V, v_base, i_b, i_hk, kb, o_k, m_k, o_d, m_vd, stride_vn, stride_vd,
                                   masked or not EVEN_V, V_DESC, FP8_PV, BLOCK_N, D_PAD)
            # -- raw scores; base-2 logits are b_s * s_scale
            if QUANT_QK:
                s_scale = q_scale * tl.load(k_scale_row + kb)
                b_s = tl.dot(b_q, b_k, out_dtype=tl.int32).to(tl.float32)
            else:
                if UPCAST_QK:
                    b_k = b_k.to(tl.float32)
                b_s = tl.dot(b_q, b_k)  # [BLOCK_M, BLOCK_N]
            if masked:
                m_s = m_k[None, :]
                if IS_CAUSAL:
                    m_s = m_s & (o_k[None, :] <= o_m[:, None] + causal_offset)
                if HAS_WINDOW:
                    m_s = m_s & (o_k[None, :] > o_m[:, None] + causal_offset - window)
                b_s = tl.where(m_s, b_s, float("-inf"))
            m_local = tl.max(b_s, axis=1) * s_scale  # max commutes with the positive scale
            m_new = tl.maximum(m_i, m_local)
            if PV_SKIP:
                # -- stage 2: skip P.V when every real row's block max is far below its running max
                diff = tl.where(m_m & (m_local > float("-inf")), m_local - m_i, float("-inf"))
                # non-finite inputs (reference.masked_attention): a NaN logit must reach its row, so the
                # block is computed; a row whose sum is already NaN no longer votes
                row_nan = tl.max((b_s != b_s).to(tl.int32), axis=1) > 0
                diff = tl.where(m_m & row_nan, float("inf"), diff)
                diff = tl.where((l_i != l_i) | (diff != diff), float("-inf"), diff)
                do_pv = tl.max(diff, axis=0) > neg_lambda
                n_skipped += 1 - do_pv.to(tl.int32)
                if PV_CHECK == 2:
                    # no branch: a skipped block's p are exactly 0 (its real rows' maxima do not move)
                    acc, l_i, m_i = _softmax_pv_update(acc, l_i, m_i, m_new, b_s, s_scale, b_v, do_pv,
                                                       FP8_PV, UPCAST_PV, True)
                elif do_pv:
                    if PV_CHECK == 0:
                        b_v = _load_v_tile(V, v_base, i_b, i_hk, kb, o_k, m_k, o_d, m_vd, stride_vn,
                                           stride_vd, masked or not EVEN_V, V_DESC, FP8_PV, BLOCK_N, D_PAD)
                    acc, l_i, m_i = _softmax_pv_update(acc, l_i, m_i, m_new, b_s, s_scale, b_v, True,
                                                       FP8_PV, UPCAST_PV, False)
            else:
                acc, l_i, m_i = _softmax_pv_update(acc, l_i, m_i, m_new, b_s, s_scale, b_v, True,
                                                   FP8_PV, UPCAST_PV, False)

    # -- epilogue: normalise; rows that saw no key stay zero
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    if FP8_PV:
        b_vscale = tl.load(V_SCALE + i_b.to(tl.int64) * (n_q_heads // group) * D_PAD + i_hk * D_PAD + o_d)
        b_o = acc * (b_vscale[None, :] / 448.0) / l_safe[:, None]
    else:
        b_o = acc / l_safe[:, None]
    o_base = OUT + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
    tl.store(o_base + o_m[:, None] * stride_on + o_d[None, :] * stride_od, b_o.to(OUT.dtype.element_ty),
             mask=m_m[:, None] & m_vd[None, :])
    if PV_SKIP:
        tl.store(PV_COUNT + row, n_skipped)


@triton.jit
def _mask_to_lut_kernel(
    MASK, LUT, COUNT, NLOW, NFULL,  #
    stride_mb, stride_mh, stride_mq, stride_mk,  #
    n_q_heads, n_qblocks, n_kblocks, n_q, n_k, window,  #
    NK_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,  #
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,  #
):
    i_qb = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // n_q_heads
    i_h = i_bh % n_q_heads
    o_j = tl.arange(0, NK_PAD)
    m_j = o_j < n_kblocks
    b_m = tl.load(MASK + i_b.to(tl.int64) * stride_mb + i_h.to(tl.int64) * stride_mh + i_qb * stride_mq
                  + o_j * stride_mk, mask=m_j, other=0)
    keep = (b_m != 0) & m_j
    if IS_CAUSAL:
        offset = n_k - n_q
        q_last = tl.minimum((i_qb + 1) * BLOCK_Q, n_q) - 1 + offset
        keep = keep & (o_j * BLOCK_K <= q_last)  # drop fully-future blocks
        if HAS_WINDOW:
            k_last = tl.minimum(o_j * BLOCK_K + BLOCK_K, n_k) - 1
            keep = keep & (k_last > i_qb * BLOCK_Q + offset - window)  # drop blocks before the window
    low, limit = lut_row_edges(i_qb, n_q, n_k, window, IS_CAUSAL, HAS_WINDOW, BLOCK_Q, BLOCK_K)
    keep_i = keep.to(tl.int32)
    row = i_bh.to(tl.int64) * n_qblocks + i_qb
    position = tl.cumsum(keep_i, axis=0) - 1
    tl.store(LUT + row * n_kblocks + position, o_j, mask=keep)
    tl.store(COUNT + row, tl.sum(keep_i, axis=0))
    n_low = tl.sum(tl.where(o_j < low, keep_i, 0), axis=0)
    tl.store(NLOW + row, n_low)
    tl.store(NFULL + row, tl.sum(tl.where((o_j >= low) & (o_j < limit), keep_i, 0), axis=0))


def build_block_lut(mask: torch.Tensor, nq: int, nk: int, is_causal: bool, window: int | None = None) -> BlockLUT:
    """Compact a bool block map ``(B, Hq, nqb, nkb)`` (any strides, e.g. an expanded one) into ascending
    index lists, dropping causal fully-future blocks (and, with a sliding ``window``, blocks wholly
    before it)."""
    bsz, num_q_heads, nqb, nkb = mask.shape
    lut = BlockLUT.empty(bsz, num_q_heads, nqb, nkb, mask.device)
    indices, count, n_low, n_unmasked = lut.indices, lut.count, lut.n_low, lut.n_unmasked
    m8 = mask.view(torch.int8)
    _mask_to_lut_kernel[(nqb, bsz * num_q_heads)](
        m8, indices, count, n_low, n_unmasked, *m8.stride(),
        num_q_heads, nqb, nkb, nq, nk, window or 0,
        NK_PAD=max(16, triton.next_power_of_2(nkb)), IS_CAUSAL=is_causal, HAS_WINDOW=window is not None,
        BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K, num_warps=4 if nkb <= 1024 else 8,
    )
    return lut


def attend(q, k, v, mask, *, is_causal, scale, pvthreshd, quant, window=None, prepared=None):
    """The registry's ``attend`` for Triton: ``prepared`` is the predictor's ``PreparedCall`` of the
    same call (INT8 operands, index lists) or None."""
    quantized, lut = (None, None) if prepared is None else prepared
    return block_sparse_attn(q, k, v, mask, is_causal=is_causal, scale=scale, pvthreshd=pvthreshd, quant=quant,
                             quantized=quantized if quant != "none" else None, window=window, lut=lut)


def compute_dtype_for(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The operand dtype the kernel computes in for an input dtype (see module docstring)."""
    if dtype in (torch.float16, torch.bfloat16):
        return dtype
    if dtype == torch.float32:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    raise TypeError(f"attention inputs must be float16, bfloat16 or float32, got {dtype}")


def quantize_v_fp8(v: torch.Tensor, block_n: int = BLOCK_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel FP8 e4m3 of V ``(B, Hkv, N, D)`` -> (fp8 ``(B, Hkv, N_pad, D_PAD)`` viewed through
    strides so that tokens are contiguous per channel, scales ``(B, Hkv, D_PAD)`` float32)."""
    bsz, heads, n, head_dim = v.shape
    d_pad = padded_head_dim(head_dim)
    n_pad = num_blocks(n, block_n) * block_n
    vf = v.float()
    scale = vf.abs().amax(dim=2) / FP8_E4M3_MAX + 1e-12  # (B, Hkv, D)
    vt = torch.zeros(bsz, heads, d_pad, n_pad, device=v.device, dtype=torch.float8_e4m3fn)
    vt[:, :, :head_dim, :n] = (vf / scale[:, :, None, :]).transpose(-1, -2).to(torch.float8_e4m3fn)
    scale_pad = torch.ones(bsz, heads, d_pad, device=v.device, dtype=torch.float32)
    scale_pad[:, :, :head_dim] = scale
    return vt.transpose(-1, -2), scale_pad  # (B, Hkv, N_pad, D_PAD) with stride 1 along tokens


def descriptor_ready(t: torch.Tensor) -> bool:
    """Whether ``t`` (4-D) can be read through a tensor descriptor: last dim contiguous, the other strides
    and the base address 16-byte aligned (the TMA rules)."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((st * size) % 16 == 0 for st in t.stride()[:-1]))


def _tile_descriptor(t: torch.Tensor, block_shape: list[int], name: str):
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not descriptor_ready(t):
        raise ValueError(
            f"KernelConfig(tile_loads='descriptor') needs {name} with a contiguous last dimension and "
            f"16-byte aligned strides and base pointer (got strides {tuple(t.stride())}, dtype {t.dtype}); "
            f"use tile_loads='pointer' for this layout"
        )
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block_shape)


def block_sparse_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    pvthreshd: torch.Tensor | None,
    quant: str = "none",
    quantized: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    config: KernelConfig | None = None,
    window: int | None = None,
    lut: BlockLUT | None = None,
) -> tuple[torch.Tensor, BlockCounts]:
    """Launch the kernel (inputs already validated; ``pvthreshd`` per query head or None; ``window``: a
    causal sliding window or None; ``lut``: the map's index lists when the predictor already wrote
    them, else ``build_block_lut`` makes them from ``mask``).

    ``quant``: "none", "int8" (INT8 QK, fp16/bf16 PV) or "int8-fp8" (INT8 QK, FP8 PV).
    ``quantized``: optional precomputed ``(q_int8, q_scale, k_int8, k_scale)`` from the predictor's
    fused pass (Q multiplied by scale*log2(e) before quantization, K smoothed), to avoid a re-read.
    """
    check_runnable(q)
    bsz, num_q_heads, nq, head_dim = q.shape
    num_kv_heads, nk = k.shape[1], k.shape[2]
    nqb, nkb = num_blocks(nq, BLOCK_Q), num_blocks(nk, BLOCK_K)
    interp = interpreter_enabled() and q.device.type == "cpu"
    cdtype = compute_dtype_for(q.dtype, q.device)
    out = torch.empty(bsz, num_q_heads, nq, head_dim, device=q.device, dtype=q.dtype)
    if lut is None:
        lut = build_block_lut(mask, nq, nk, is_causal, window)
    d_pad = padded_head_dim(head_dim)
    if quant not in ("none", "int8", "int8-fp8"):
        raise ValueError(f"quant must be 'none', 'int8' or 'int8-fp8', got {quant!r}")
    if quant == "int8-fp8" and interp:
        raise ValueError("quant='int8-fp8' needs a GPU with FP8 (sm89+); the Triton interpreter has no FP8 dot")

    qk_scale = scale * LOG2E
    dummy = torch.empty(1, device=q.device, dtype=torch.float32)
    q_scale = k_scale = v_scale = dummy
    qk_dim = head_dim
    if quant == "none":
        q_in, k_in = q.to(cdtype), k.to(cdtype)
    else:
        if quantized is None:
            from .predict import pool_and_similarity  # local: predict imports this module's peers

            _, q_in, q_scale = pool_and_similarity(q, BLOCK_Q, smooth=False, quant_multiplier=qk_scale)
            _, k_in, k_scale = pool_and_similarity(k, BLOCK_K, smooth=True, quant_multiplier=1.0)
        else:
            q_in, q_scale, k_in, k_scale = quantized
        qk_dim = d_pad
    if quant == "int8-fp8":
        v_in, v_scale = quantize_v_fp8(v)
    else:
        v_in = v.to(cdtype)
    pv_on = pvthreshd is not None
    pv_thresh = pvthreshd.to(device=q.device, dtype=torch.float32).contiguous() if pv_on else dummy
    pv_count = torch.zeros(bsz, num_q_heads, nqb, device=q.device, dtype=torch.int32) if pv_on else dummy
    # the V tensor the descriptor reads: FP8 V is stored channel-major (tokens contiguous per channel)
    v_tiles = v_in.transpose(-1, -2) if quant == "int8-fp8" else v_in
    cfg = config or default_kernel_config(head_dim, q.device, quant, pv_on)
    if (config is None and cfg.tile_loads == "descriptor"
            and not (descriptor_ready(k_in) and descriptor_ready(v_tiles))):
        # the shipped choice reads K/V through tensor descriptors; a layout they cannot read (a head dim
        # whose rows are not 16-byte aligned, an offset view) takes the pointer loads instead
        cfg = dataclasses.replace(cfg, tile_loads="pointer")
    upcast = interp and (cdtype == torch.bfloat16)
    k_arg, v_arg = k_in, v_in
    use_desc = cfg.tile_loads == "descriptor"
    v_desc = use_desc and not (pv_on and cfg.pv_check == "prefetch")
    if use_desc:
        k_arg = _tile_descriptor(k_in, [1, 1, BLOCK_K, d_pad], "K")
    if v_desc:
        v_block = [1, 1, d_pad, BLOCK_K] if quant == "int8-fp8" else [1, 1, BLOCK_K, d_pad]
        v_arg = _tile_descriptor(v_tiles, v_block, "V")

    _sparge_attn_fwd_kernel[(nqb, bsz * num_q_heads)](
        q_in, k_arg, v_arg, out, q_scale, k_scale, v_scale,
        lut.indices, lut.count, lut.n_low, lut.n_unmasked, pv_thresh, pv_count,
        *q_in.stride(), *k_in.stride(), *v_in.stride(), *out.stride(),
        num_q_heads, num_q_heads // num_kv_heads, nq, nk, nk - nq, nqb, nkb, window or 0,
        qk_scale,
        HEAD_DIM=head_dim, QK_DIM=qk_dim, D_PAD=d_pad, BLOCK_M=BLOCK_Q, BLOCK_N=BLOCK_K,
        IS_CAUSAL=is_causal, HAS_WINDOW=window is not None, PV_SKIP=pv_on,
        PV_CHECK=PV_CHECKS.index(cfg.pv_check), QUANT_QK=quant != "none", FP8_PV=quant == "int8-fp8",
        UPCAST_QK=upcast and quant == "none", UPCAST_PV=upcast,
        EVEN_QK=qk_dim == d_pad, EVEN_V=head_dim == d_pad, DESC=use_desc, V_DESC=v_desc,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    # the reductions run only when a count is read (the LUT's buffers are this call's)
    counts = BlockCounts.from_rows(allowed_block_count(nq, nk, is_causal, window), (lut.count,),
                                   pv_count if pv_on else None)
    return out, counts
