"""FlashAttention-4 (the CuTe-DSL kernels of the ``flash-attn-4`` package) as a block-sparse executor.

Optional: ``pip install 'sparge[fa4]'`` (``flash-attn-4`` and ``nvidia-cutlass-dsl`` with its CUDA 13
libraries). Nothing here imports it at module level; ``attend`` imports it on first use.

What it runs: exact softmax attention restricted to the kept blocks of a BLOCK_Q x BLOCK_K (128 x 64)
map, with FA4's ``flash_attn_func(..., block_sparse_tensors=BlockSparseTensorsTorch(...))``. The map is
handed over as FA4's two block lists per (batch, query head, query block), built from the index list
the Triton kernel reads (``build_block_lut``: causal fully-future blocks and blocks wholly before a
sliding window are dropped first): the "full" blocks, wholly inside the causal triangle / window and
inside K, which FA4 computes without a token mask, and the "mask" blocks (diagonal, window edge, the
partial last key block), on which FA4 applies the causal / window / end-of-K mask itself. FA4 4.0.0b36
on sm90 needs the full lists even when nothing is full (it traces their loads): ``split_full=False``
passes empty ones.

Block geometry (read from FA4 4.0.0b36's ``interface.py`` / ``block_sparsity.py``): on sm90 (Hopper)
FA4 shrinks its tiles to the sparse block (tile 128 x 64 for a (128, 64) block size, any head dim up to
256 divisible by 8), so a 128 x 64 map runs exactly. On sm100/sm110 (Blackwell) its forward uses
``q_stage = 2`` query tiles of 128 rows and 128-key tiles, so sparse blocks must be multiples of
256 x 128: a 128 x 64 map would have to be widened, which this backend never does silently. It refuses
those GPUs (``supported`` says why); the predictor would have to produce 256 x 128 maps first.

Not supported here, refused with a message: the stage-2 PV skip (FA4 is exact: pass
``pvthreshd=None``), quantized operands (``quant`` must be "none"), CPU tensors. float32 inputs are
computed with bf16 operands and returned in float32, as on the Triton path. The stage-2 statistic is
reported as zero skipped blocks.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

from .blocks import BLOCK_K, BLOCK_Q, BlockCounts, allowed_block_count, num_blocks

#: The block sizes FA4 can run exactly, per compute-capability major version.
FA4_BLOCK_GEOMETRY = {9: (BLOCK_Q, BLOCK_K)}
#: FA4 needs 16-byte aligned head dims: 8 elements of a 16-bit type.
HEAD_DIM_ALIGNMENT = 8


@functools.lru_cache(maxsize=1)
def _find_fa4() -> bool:
    try:
        return (importlib.util.find_spec("flash_attn.cute") is not None
                and importlib.util.find_spec("cutlass") is not None)
    except (ImportError, ValueError):  # a regular `flash_attn` (FA2) package without the cute part
        return False


# Both lookups run on the host once; under torch.compile they are constants of the graph (dynamo
# cannot trace importlib's finder, and a graph break would forbid fullgraph compiles of a model).
@torch.compiler.assume_constant_result
def installed() -> bool:
    """Whether ``flash-attn-4`` (``flash_attn.cute``) and the CuTe DSL (``cutlass``) can be imported
    (looked up without importing them)."""
    return _find_fa4()


@functools.lru_cache(maxsize=16)
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@torch.compiler.assume_constant_result
def _capability(index: int) -> tuple[int, int]:
    return _device_capability(index)


def supported(device: torch.device, head_dim: int, dtype: torch.dtype) -> str | None:
    """None when FA4 can run a BLOCK_Q x BLOCK_K map exactly on ``device`` for this head dim and dtype,
    otherwise the reason it cannot (host-side checks only, cached: no device work)."""
    if device.type != "cuda":
        return f"backend 'fa4' runs on CUDA GPUs only, got {device}"
    major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if major not in FA4_BLOCK_GEOMETRY:
        return (f"backend 'fa4' runs 128x64 block maps exactly only on sm90 (Hopper); this GPU is "
                f"sm{major}{minor}, where FA4's block-sparse forward needs 256x128 blocks (a 128x64 map is "
                f"never widened)")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"backend 'fa4' takes float16/bfloat16 (or float32, computed in bfloat16), got {dtype}"
    if head_dim % HEAD_DIM_ALIGNMENT or not 8 <= head_dim <= 256:
        return f"backend 'fa4' needs a head dim in 8..256 divisible by {HEAD_DIM_ALIGNMENT}, got {head_dim}"
    return None


#: ``backend="auto"`` hands a call to FA4 only from this much dense work on (B * Hq * Nq * Nk * D
#: multiply-adds, halved under causal masking: 2**41 is B=1, 32 heads, 32K x 32K, D=128, causal). Below
#: it FA4's per-call host cost (~0.6-0.9 ms through its Python interface on an H200) exceeds the kernel
#: time at low density: at N=8K (32 heads) the H200 measured FA4 at 0.7-3.2x cuDNN at densities 0.2 / 0.1
#: where the Triton kernel reached 1.3-5.6x; at 32K, D=128 FA4 was the faster exact kernel at every
#: density (0.92-8.3x against 0.80-7.6x; at D=64, causal, 32K it was not at densities <= 0.5, hence the
#: halving under causal masking). Measured in two runs on one card: results/kernel/h200-fa4.csv and
#: results/kernel/h200.csv (one run with every peer, sixth session) of the repository.
AUTO_MIN_WORK = 2 ** 41


def dense_work(q: torch.Tensor, nk: int, is_causal: bool) -> int:
    """Multiply-adds of dense attention for this call's shape (host arithmetic on sizes only)."""
    bsz, heads, nq, d = q.shape
    work = bsz * heads * nq * nk * d
    return work // 2 if is_causal else work


def auto_eligible(q: torch.Tensor, *, pvthreshd, quant: str, window: int | None, nk: int | None = None,
                  is_causal: bool = False) -> bool:
    """Whether ``backend="auto"`` may pick FA4 for this call: installed, a GPU where the map fits
    (sm90), exact attention asked for (``pvthreshd=None``, ``quant`` resolved to "none"), no sliding
    window (FA4's block-sparse local mode is not part of what auto relies on) and at least
    ``AUTO_MIN_WORK`` of dense work (``nk``: the key length, default ``q``'s)."""
    if pvthreshd is not None or quant != "none" or window is not None or q.device.type != "cuda":
        return False
    if dense_work(q, q.shape[2] if nk is None else nk, is_causal) < AUTO_MIN_WORK:
        return False
    return installed() and supported(q.device, q.shape[-1], q.dtype) is None


@dataclass(frozen=True)
class FA4BlockLists:
    """A block map as FA4 reads it, per (batch, query head, query block): the "mask" blocks (FA4 applies
    the causal / window / end-of-K token mask on them) and the "full" blocks (no token mask), each as
    ascending key-block indices (``*_idx[..., :*_cnt]``; the tail is unspecified) and a count."""

    mask_cnt: torch.Tensor  # (B, Hq, nqb) int32
    mask_idx: torch.Tensor  # (B, Hq, nqb, nkb) int32
    full_cnt: torch.Tensor  # (B, Hq, nqb) int32
    full_idx: torch.Tensor  # (B, Hq, nqb, nkb) int32, or (B, Hq, nqb, 1) when nothing is listed full


def block_lists(mask: torch.Tensor, nq: int, nk: int, is_causal: bool, window: int | None = None,
                split_full: bool = True) -> FA4BlockLists:
    """FA4's block lists for a bool block map ``(B, Hq, nqb, nkb)``. Causal fully-future blocks and
    blocks wholly before a window are dropped. With ``split_full`` the kept blocks that need no token
    mask (wholly inside the causal triangle / the window and inside K) go to the full lists, the rest
    to the mask lists; without it every kept block is a mask block and the full lists are empty (FA4
    4.0.0b36 on sm90 needs the full lists present: it traces their loads even when they are empty).
    One small Triton kernel (the index list the Triton executor reads) and two gathers; no host sync."""
    from .attention import build_block_lut

    lut = build_block_lut(mask, nq, nk, is_causal, window)
    if not split_full:
        zeros = torch.zeros_like(lut.count)
        return FA4BlockLists(lut.count, lut.indices, zeros, torch.zeros_like(lut.indices[..., :1]))
    # the Triton LUT is ordered [n_low window-edge blocks | n_unmasked blocks | the rest (masked)]
    last = lut.indices.shape[-1] - 1
    pos = torch.arange(last + 1, device=mask.device, dtype=torch.int32)
    n_low, n_full = lut.n_low[..., None], lut.n_unmasked[..., None]
    full_idx = torch.gather(lut.indices, -1, (pos + n_low).clamp_(max=last).long())
    mask_src = torch.where(pos < n_low, pos, pos + n_full).clamp_(max=last)
    mask_idx = torch.gather(lut.indices, -1, mask_src.long())
    return FA4BlockLists(lut.count - lut.n_unmasked, mask_idx, lut.n_unmasked, full_idx)


def unmasked_block_mask_reference(nq: int, nk: int, is_causal: bool, window: int | None = None,
                                  device=None) -> torch.Tensor:
    """``(nqb, nkb)`` bool, plain torch at token level (for tests): the block pairs in which every real
    query row may attend every key of the block (and every key exists)."""
    from .reference import causal_token_mask

    nqb, nkb = num_blocks(nq, BLOCK_Q), num_blocks(nk, BLOCK_K)
    allowed = (causal_token_mask(nq, nk, device=device, window=window) if is_causal
               else torch.ones(nq, nk, dtype=torch.bool, device=device))
    padded = torch.zeros(nqb * BLOCK_Q, nkb * BLOCK_K, dtype=torch.bool, device=device)
    padded[:nq, :nk] = allowed
    padded[nq:, :nk] = True  # rows past the end of Q do not exist: they constrain nothing
    return padded.view(nqb, BLOCK_Q, nkb, BLOCK_K).all(dim=3).all(dim=1)


def block_lists_reference(mask: torch.Tensor, nq: int, nk: int, is_causal: bool, window: int | None = None,
                          split_full: bool = True) -> FA4BlockLists:
    """Plain-torch ``block_lists`` (for tests): each list's blocks in ascending order, then -1 padding."""
    from .reference import allowed_block_mask

    kept = mask & allowed_block_mask(nq, nk, is_causal, device=mask.device, window=window)
    full = kept & unmasked_block_mask_reference(nq, nk, is_causal, window, device=mask.device)
    if not split_full:
        full = torch.zeros_like(kept)

    def listed(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = sel.sum(dim=-1, dtype=torch.int32)
        cols = torch.arange(sel.shape[-1], device=mask.device, dtype=torch.int32).expand_as(sel)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)  # selected columns first, ascending
        indices = torch.gather(cols, -1, order)
        indices = torch.where(torch.arange(sel.shape[-1], device=mask.device) < count[..., None], indices, -1)
        return count, indices.to(torch.int32)

    mask_cnt, mask_idx = listed(kept & ~full)
    full_cnt, full_idx = listed(full)
    return FA4BlockLists(mask_cnt, mask_idx, full_cnt, full_idx)


def attend(q, k, v, mask, *, is_causal, scale, pvthreshd, quant, window=None, prepared=None, split_full=True):
    """The registry's ``attend`` for FA4 (inputs already validated; ``mask`` expanded to (B, Hq, ...)).
    Returns the output in ``q``'s layout (a (B, Hq, N, D) view of FA4's (B, N, Hq, D) result) and the
    block counts."""
    if pvthreshd is not None:
        raise ValueError("backend 'fa4' computes exact attention and has no stage-2 PV skip: pass "
                         "pvthreshd=None, or use backend='triton' for stage 2")
    if quant != "none" or prepared is not None:
        raise ValueError(f"backend 'fa4' computes with 16-bit operands; quant must be 'none', got {quant!r}")
    reason = supported(q.device, q.shape[-1], q.dtype)
    if reason is not None:
        raise ValueError(reason)
    if not installed():
        raise ImportError("backend 'fa4' needs FlashAttention-4: pip install 'sparge[fa4]' "
                          "(flash-attn-4, nvidia-cutlass-dsl and its CUDA 13 libraries)")
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from flash_attn.cute.interface import flash_attn_func

    bsz, num_q_heads, nq, _ = q.shape
    nk = k.shape[2]
    lists = block_lists(mask, nq, nk, is_causal, window, split_full=split_full)
    sparse = BlockSparseTensorsTorch(mask_block_cnt=lists.mask_cnt, mask_block_idx=lists.mask_idx,
                                     full_block_cnt=lists.full_cnt, full_block_idx=lists.full_idx,
                                     block_size=(BLOCK_Q, BLOCK_K))
    in_dtype = q.dtype
    if in_dtype == torch.float32:
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    window_size = (window - 1, 0) if window is not None else (None, None)
    out, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             softmax_scale=scale, causal=is_causal, window_size=window_size,
                             block_sparse_tensors=sparse)
    out = out.transpose(1, 2)
    if in_dtype == torch.float32:
        out = out.to(torch.float32)
    counts = BlockCounts.from_rows(allowed_block_count(nq, nk, is_causal, window),  # reduced when read
                                   (lists.mask_cnt, lists.full_cnt))
    return out, counts
