"""Export sparge block maps to PyTorch FlexAttention (``torch.nn.attention.flex_attention.BlockMask``).

``to_flex_block_mask(block_map, q_len, kv_len, is_causal=...)`` turns a sparge block map (bool
``(B, Hq, ceil(Nq/128), ceil(Nk/64))``, True = compute, the format of ``predict_block_mask`` and
``block_sparse_attn``) into a ``BlockMask`` with the same 128 x 64 blocks, so that
``flex_attention(q, k, v, block_mask=..., enable_gqa=...)`` computes exactly the attention that
``block_sparse_attn(q, k, v, block_map, pvthreshd=None)`` computes:

- a kept block pair that the causal mask allows entirely is a *full* block (flex skips its
  ``mask_mod``); one that the causal diagonal cuts is a *partial* block; blocks that causal
  attention cannot touch are dropped even when the map keeps them (the kernel never computes them);
- the ``mask_mod`` repeats the map at token level (and the bottom-right aligned causal rule, query
  ``i`` sees keys ``j <= i + Nk - Nq``), so flex's eager path, which evaluates only ``mask_mod``,
  and its compiled kernels, which walk the block lists, agree;
- a map with batch or head size 1 is broadcast over the batch / query heads.

``predicted_flex_block_mask(q, k, method)`` predicts the map of a method (or of one layer of a
calibrated config: ``LayerConfig``) on given Q/K and exports it.

Limits: flex has no stage-2 (PV) skip, so ``pvthreshd`` is not exported (compare with
``block_sparse_attn(..., pvthreshd=None)``); a query row with no kept key gets zeros in both. For
compiled flex kernels pass tile sizes that divide the blocks, e.g.
``kernel_options={"BLOCK_M": 128, "BLOCK_N": 64}`` (``scripts/bench_kernel.py`` does).
Imports only torch.
"""

from __future__ import annotations

import torch

from .ops.blocks import BLOCK_K, BLOCK_Q, num_blocks


def _full_and_allowed(
    nqb: int, nkb: int, q_len: int, kv_len: int, is_causal: bool, device
) -> tuple[torch.Tensor, ...]:
    """``(allowed, full)`` ``(nqb, nkb)``: block pairs holding at least one / only allowed pairs."""
    if not is_causal:
        ones = torch.ones(nqb, nkb, dtype=torch.bool, device=device)
        return ones, ones
    offset = kv_len - q_len
    q_first = torch.arange(nqb, device=device) * BLOCK_Q
    q_last = torch.clamp(q_first + BLOCK_Q, max=q_len) - 1
    k_first = torch.arange(nkb, device=device) * BLOCK_K
    k_last = torch.clamp(k_first + BLOCK_K, max=kv_len) - 1
    allowed = k_first[None, :] <= (q_last + offset)[:, None]
    full = k_last[None, :] <= (q_first + offset)[:, None]
    return allowed, full


def _block_lists(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flex's ``(num_blocks, indices)``: per query block, how many key blocks and which (kept first)."""
    counts = m.sum(-1, dtype=torch.int32)
    order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts, order


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def to_flex_block_mask(block_map: torch.Tensor, q_len: int, kv_len: int, *, is_causal: bool = False,
                       token_mask: bool = True):
    """A FlexAttention ``BlockMask`` (128 x 64 blocks) computing what ``block_sparse_attn`` computes
    on ``block_map`` (see the module docstring).

    Args:
        block_map: bool ``(B, H, ceil(q_len/128), ceil(kv_len/64))``; B and H may be 1 (broadcast).
        q_len, kv_len: the query and key lengths the map was made for.
        is_causal: bottom-right aligned causal attention (``j <= i + kv_len - q_len``).
        token_mask: repeat the map in the ``mask_mod`` (needed by flex's eager path). False keeps the
            sparsity in the block lists only, with a ``mask_mod`` of the causal rule alone (none when not
            causal; one module-level function when ``q_len == kv_len``), which is what flex's compiled
            kernels read: a new map then never recompiles them (benchmarks). Not for eager flex.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(block_map, torch.Tensor) or block_map.dtype != torch.bool or block_map.ndim != 4:
        got = (
            f"{block_map.dtype} {tuple(block_map.shape)}"
            if isinstance(block_map, torch.Tensor)
            else type(block_map)
        )
        raise ValueError(f"block_map must be a bool tensor (B, H, q_blocks, kv_blocks), got {got}")
    if q_len < 1 or kv_len < 1:
        raise ValueError(f"q_len and kv_len must be >= 1, got {q_len} and {kv_len}")
    nqb, nkb = num_blocks(q_len, BLOCK_Q), num_blocks(kv_len, BLOCK_K)
    if tuple(block_map.shape[2:]) != (nqb, nkb):
        raise ValueError(
            f"block_map has {tuple(block_map.shape[2:])} blocks but q_len {q_len} / kv_len {kv_len} need "
            f"({nqb}, {nkb}) blocks of {BLOCK_Q} x {BLOCK_K}"
        )
    allowed, full_region = _full_and_allowed(nqb, nkb, q_len, kv_len, is_causal, block_map.device)
    kept = block_map & allowed
    full = kept & full_region
    partial = kept & ~full_region
    kv_num, kv_idx = _block_lists(partial)
    full_num, full_idx = _block_lists(full)
    offset = kv_len - q_len
    if not token_mask:
        if not is_causal:
            mod = None
        elif offset == 0:
            mod = _causal_mask_mod
        else:
            def mod(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx + offset
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(BLOCK_Q, BLOCK_K),
                                        mask_mod=mod, seq_lengths=(q_len, kv_len))
    token_map = kept.contiguous()
    one_batch, one_head = token_map.shape[0] == 1, token_map.shape[1] == 1

    def mask_mod(b, h, q_idx, kv_idx):
        keep = token_map[0 if one_batch else b, 0 if one_head else h, q_idx // BLOCK_Q, kv_idx // BLOCK_K]
        return keep & (kv_idx <= q_idx + offset) if is_causal else keep

    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(BLOCK_Q, BLOCK_K),
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )


def predicted_flex_block_mask(
    q: torch.Tensor, k: torch.Tensor, method, *, is_causal: bool = False, scale: float | None = None
):
    """Predict ``method``'s block map on ``q`` ``(B, Hq, Nq, D)`` / ``k`` ``(B, Hkv, Nk, D)`` and export
    it with ``to_flex_block_mask``. ``method``: an ``AttentionMethod`` (e.g.
    ``sparge_core.methods.get_method("sparge-topk", topk=0.5)``) or a calibrated ``LayerConfig``."""
    from .methods.base import AttentionMethod
    from .params import LayerConfig

    if isinstance(method, LayerConfig):
        from .methods.sparge import Sparge

        if method.num_heads != q.shape[1]:
            raise ValueError(f"the layer config has {method.num_heads} heads but q has {q.shape[1]}")
        method = Sparge.from_layer_config(method)
    if not isinstance(method, AttentionMethod):
        raise TypeError(f"method must be an AttentionMethod or a LayerConfig, got {type(method).__name__}")
    block_map = method.block_mask(q, k, is_causal=is_causal, scale=scale)
    return to_flex_block_mask(block_map, q.shape[2], k.shape[2], is_causal=is_causal)


__all__ = ["predicted_flex_block_mask", "to_flex_block_mask"]
