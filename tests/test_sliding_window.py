"""Causal sliding windows: the reference against plain SDPA with the same window, the Triton kernel and
predictor against the reference, and the block counts on the host against the block mask."""

import pytest
import torch

from helpers import assert_within_lowp_rule, rand_qkv, random_block_mask
from sparge_core import block_sparse_attn, predict_block_mask, sparge_attn
from sparge_core.ops import blocks as B
from sparge_core.ops import reference as R

CASES = [
    # b, hq, hkv, nq, nk, d, window
    pytest.param(1, 2, 2, 700, 700, 64, 200, id="N700-W200"),
    pytest.param(2, 4, 2, 300, 300, 128, 64, id="GQA-N300-W64-D128"),
    pytest.param(1, 2, 1, 333, 333, 64, 1, id="W1-own-token-only"),
    pytest.param(1, 2, 1, 129, 500, 64, 97, id="Nq129-Nk500-W97"),
    pytest.param(1, 2, 2, 520, 520, 64, 5000, id="window-beyond-length"),
]


def _sdpa_window(q, k, v, window):
    group = q.shape[1] // k.shape[1]
    allowed = R.causal_token_mask(q.shape[2], k.shape[2], window=window)
    return torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1), attn_mask=allowed)


def test_token_mask_matches_transformers_convention():
    m = R.causal_token_mask(6, 6, window=3)
    # row 4 sees keys 2, 3, 4 (its own and the two before it)
    assert m[4].tolist() == [False, False, True, True, True, False]
    assert m[0].tolist() == [True, False, False, False, False, False]


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,window", CASES)
def test_reference_full_map_equals_sdpa_with_window(b, hq, hkv, nq, nk, d, window):
    q, k, v = rand_qkv(b, hq, hkv, nq, nk, d, dtype=torch.float64, seed=nq + window)
    full = torch.ones(b, hq, B.num_blocks(nq, B.BLOCK_Q), B.num_blocks(nk, B.BLOCK_K), dtype=torch.bool)
    out, counts = R.masked_attention(q, k, v, full, is_causal=True, scale=d ** -0.5, window=window)
    torch.testing.assert_close(out, _sdpa_window(q, k, v, window), rtol=1e-9, atol=1e-9)
    allowed = R.allowed_block_mask(nq, nk, True, window=window)
    assert int(counts.allowed[0, 0]) == int(allowed.sum()) == B.allowed_block_count(nq, nk, True, window)


@pytest.mark.parametrize("nq,nk", [(1000, 1000), (129, 700), (64, 64), (700, 129)])
@pytest.mark.parametrize("window", [1, 63, 64, 65, 128, 300, 4096])
def test_block_band_holds_exactly_the_pairs_with_an_allowed_token(nq, nk, window):
    tokens = R.causal_token_mask(nq, nk, window=window)
    pad_q, pad_k = B.num_blocks(nq, B.BLOCK_Q) * B.BLOCK_Q - nq, B.num_blocks(nk, B.BLOCK_K) * B.BLOCK_K - nk
    padded = torch.nn.functional.pad(tokens, (0, pad_k, 0, pad_q))
    by_block = padded.view(-1, B.BLOCK_Q, padded.shape[1] // B.BLOCK_K, B.BLOCK_K).any(dim=(1, 3))
    assert torch.equal(R.allowed_block_mask(nq, nk, True, window=window), by_block)
    assert B.allowed_block_count(nq, nk, True, window) == int(by_block.sum())


@pytest.mark.parametrize("density", [1.0, 0.5])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,window", CASES)
def test_triton_kernel_with_window_matches_reference(device, b, hq, hkv, nq, nk, d, window, density):
    q, k, v = rand_qkv(b, hq, hkv, nq, nk, d, device=device, seed=nk * 3 + window)
    mask = random_block_mask(b, hq, nq, nk, density, seed=window, device=device)
    out, stats = block_sparse_attn(q, k, v, mask, is_causal=True, window=window, pvthreshd=None,
                                   backend="triton", return_stats=True)
    _, counts = R.masked_attention(q, k, v, mask, is_causal=True, scale=d ** -0.5, window=window)
    assert torch.equal(stats.computed_blocks, counts.computed) and torch.equal(stats.allowed_blocks, counts.allowed)
    assert_within_lowp_rule(out, q, k, v, mask, is_causal=True, scale=d ** -0.5, window=window)


@pytest.mark.parametrize("window", [200, 320, 450])
def test_triton_kernel_window_stage2_counts_match_reference(device, window):
    # logits that fall with key position: inside each window the earliest kept block dominates, so
    # stage 2 skips later blocks (the counts must agree exactly with the reference's simulation)
    b, hq, hkv, n, d = 1, 2, 1, 700, 64
    g = torch.Generator().manual_seed(window)
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    q = (u * 8.0 + 0.1 * torch.randn(b, hq, n, d, generator=g))
    slope = torch.linspace(4.0, -4.0, n)[None, None, :, None]
    k = u * slope + 0.1 * torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    q, k, v = (t.to(device, torch.float16) for t in (q, k, v))
    mask = random_block_mask(b, hq, n, n, 0.8, seed=2, device=device)
    pv = [2.0] * hq
    out, stats = block_sparse_attn(q, k, v, mask, is_causal=True, window=window, pvthreshd=pv,
                                   backend="triton", return_stats=True)
    _, counts = R.masked_attention(q, k, v, mask, is_causal=True, scale=d ** -0.5, window=window,
                                   pvthreshd=torch.tensor(pv, device=q.device))
    assert int(counts.pv_skipped.sum()) > 0, "the input was built so that stage 2 skips blocks"
    assert torch.equal(stats.pv_skipped_blocks.cpu(), counts.pv_skipped.cpu())
    assert_within_lowp_rule(out, q, k, v, mask, is_causal=True, scale=d ** -0.5, window=window,
                            pvthreshd=torch.tensor(pv, device=q.device))


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("topk", [None, 0.3])
def test_predictor_never_keeps_blocks_outside_the_window(device, backend, topk):
    b, hq, hkv, n, d, window = 1, 4, 2, 900, 64, 256
    q, k, v = rand_qkv(b, hq, hkv, n, n, d, device=device, seed=3)
    sel = dict(topk=topk, cdfthreshd=None) if topk is not None else dict(cdfthreshd=0.9)
    mask = predict_block_mask(q, k, is_causal=True, window=window, simthreshd1=-1.0, backend=backend, **sel)
    band = R.allowed_block_mask(n, n, True, device=mask.device, window=window)
    assert not (mask & ~band).any()
    assert mask.any(dim=-1).all()  # every query block keeps its diagonal
    if backend == "triton":
        ref = predict_block_mask(q, k, is_causal=True, window=window, simthreshd1=-1.0, backend="reference", **sel)
        assert torch.equal(mask.cpu(), ref.cpu())


def test_sparge_attn_keep_everything_with_window_equals_sdpa():
    q, k, v = rand_qkv(1, 2, 1, 600, 600, 64, dtype=torch.float32, seed=9)
    out = sparge_attn(q, k, v, is_causal=True, window=150, cdfthreshd=1.0, backend="reference")
    torch.testing.assert_close(out.double(), _sdpa_window(q, k, v, 150), rtol=1e-4, atol=1e-5)


def test_window_needs_causal_and_a_positive_integer():
    q, k, v = rand_qkv(1, 2, 1, 200, 200, 64, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="is_causal=True only"):
        sparge_attn(q, k, v, is_causal=False, window=64, backend="reference")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window must be None or an integer >= 1"):
            sparge_attn(q, k, v, is_causal=True, window=bad, backend="reference")
