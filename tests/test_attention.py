"""Contract 2: the Triton block-sparse kernel against the masked float64 reference, for any mask."""

import pytest
import torch

from helpers import assert_within_lowp_rule, rand_qkv, random_block_mask, rel_l1
from sparge_core import block_sparse_attn
from sparge_core.ops import reference as R

SHAPES = [
    # b, hq, hkv, nq, nk, d
    pytest.param(1, 2, 2, 1000, 1000, 64, id="B1-H2-N1000-D64"),
    pytest.param(2, 4, 2, 300, 300, 128, id="B2-H4g2-N300-D128"),
    pytest.param(1, 3, 1, 63, 63, 96, id="B1-H3g3-N63-D96"),
    pytest.param(1, 2, 1, 1, 1, 64, id="B1-H2g2-N1-D64"),
    pytest.param(1, 2, 2, 100, 333, 64, id="B1-H2-Nq100-Nk333-D64"),
    pytest.param(1, 2, 1, 333, 100, 64, id="B1-H2g2-Nq333-Nk100-D64"),
]


def _run(q, k, v, mask, causal, pv=None, quant="none"):
    return block_sparse_attn(q, k, v, mask, is_causal=causal, pvthreshd=pv, quant=quant, backend="triton",
                             return_stats=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d", SHAPES)
def test_random_masks(device, b, hq, hkv, nq, nk, d, causal):
    q, k, v = rand_qkv(b, hq, hkv, nq, nk, d, device=device, seed=nq * 7 + nk + d)
    mask = random_block_mask(b, hq, nq, nk, 0.5, seed=nq + d, device=device)
    out, stats = _run(q, k, v, mask, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_within_lowp_rule(out, q, k, v, mask, is_causal=causal, scale=d ** -0.5)
    _, counts = R.masked_attention(q, k, v, mask, is_causal=causal, scale=d ** -0.5)
    assert torch.equal(stats.computed_blocks, counts.computed) and torch.equal(stats.allowed_blocks, counts.allowed)


@pytest.mark.parametrize("pattern", ["all", "none", "single_column", "empty_rows", "diagonal"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_structured_masks(device, pattern, causal):
    b, hq, hkv, n, d = 1, 2, 1, 700, 64
    q, k, v = rand_qkv(b, hq, hkv, n, n, d, device=device, seed=11)
    nqb, nkb = R.num_blocks(n, 128), R.num_blocks(n, 64)
    mask = torch.zeros(b, hq, nqb, nkb, dtype=torch.bool, device=device)
    if pattern == "all":
        mask[:] = True
    elif pattern == "single_column":
        mask[..., 3] = True
    elif pattern == "empty_rows":
        mask[:] = True
        mask[:, :, 2] = False
        mask[:, 1, 4] = False
    elif pattern == "diagonal":
        mask |= R.causal_diagonal_block_mask(n, n, 128, 64, device=device)
    # poison: the output must be written everywhere, also for rows with nothing to attend to
    out, stats = _run(q, k, v, mask, causal)
    assert torch.isfinite(out).all()
    assert_within_lowp_rule(out, q, k, v, mask, is_causal=causal, scale=d ** -0.5)
    if pattern == "none":
        assert (out == 0).all() and stats.qk_sparsity == 1.0
    if pattern == "all":
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1), is_causal=causal)
        assert rel_l1(out, ref) < 2e-3
        assert stats.qk_sparsity == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_dtypes(device, dtype):
    q, k, v = rand_qkv(1, 2, 1, 257, 257, 64, dtype=dtype, device=device, seed=3)
    mask = random_block_mask(1, 2, 257, 257, 0.6, seed=3, device=device)
    out, _ = _run(q, k, v, mask, True)
    assert out.dtype == dtype
    if dtype == torch.float32 and device.type == "cuda":
        # computed with bf16 operands on GPU: compare against the bf16 rule
        qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
        assert_within_lowp_rule(out, qb, kb, vb, mask, is_causal=True, scale=0.125)
    else:
        assert_within_lowp_rule(out, q, k, v, mask, is_causal=True, scale=0.125, floor=1e-5)


def test_non_contiguous_inputs(device):
    # (B, N, H, D) storage seen as (B, H, N, D), as transformers hands attention its tensors
    q, k, v = rand_qkv(1, 2, 2, 300, 300, 64, device=device, seed=5)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    mask = random_block_mask(1, 2, 300, 300, 0.5, seed=5, device=device)
    out_nc, _ = _run(qt, kt, vt, mask, False)
    out_c, _ = _run(q, k, v, mask, False)
    torch.testing.assert_close(out_nc, out_c)


def test_broadcast_mask_batch_and_heads(device):
    q, k, v = rand_qkv(2, 2, 1, 200, 200, 64, device=device, seed=8)
    mask = random_block_mask(1, 1, 200, 200, 0.5, seed=8, device=device)
    out, _ = _run(q, k, v, mask, False)
    assert_within_lowp_rule(out, q, k, v, mask.expand(2, 2, -1, -1), is_causal=False, scale=0.125)


def _skip_friendly_inputs(device, n=640, d=64, heads=2, seed=0):
    """Inputs where the stage-2 decisions have wide margins: a few key blocks carry logits far above
    the rest, so most later blocks sit >> pvthreshd below the running max and a few do not."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, n, d, generator=g) * 0.3
    q[..., 0] += 4.0
    k = torch.randn(1, heads, n, d, generator=g) * 0.3
    k[:, :, :64, 0] += 40.0  # block 0: logit ~29 (base 2) for every query
    k[:, :, 320:384, 0] += 36.0  # block 5: ~3 below block 0 -> computed
    v = torch.randn(1, heads, n, d, generator=g)
    return q.to(device, torch.float16), k.to(device, torch.float16), v.to(device, torch.float16)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_pv_skip_statistics_and_output_match_reference_simulation(device, causal):
    q, k, v = _skip_friendly_inputs(device)
    mask = torch.ones(1, 2, 5, 10, dtype=torch.bool, device=device)
    pv = torch.tensor([12.0, 200.0], device=device)  # head 1 never skips
    out, stats = _run(q, k, v, mask, causal, pv=pv)
    ref, counts = R.masked_attention(q, k, v, mask, is_causal=causal, scale=0.125, pvthreshd=pv, dtype=torch.float64)
    assert torch.equal(stats.pv_skipped_blocks, counts.pv_skipped)
    assert counts.pv_skipped[0, 0] > 5 and counts.pv_skipped[0, 1] == 0
    assert 0 < stats.pv_skip < 1
    expected_sparsity = counts.pv_skipped.sum().item() / (2 * counts.allowed.sum().item())
    assert abs(stats.sparsity - expected_sparsity) < 1e-12
    assert_within_lowp_rule(out, q, k, v, mask, is_causal=causal, scale=0.125, pvthreshd=pv)
    # skipping changes the output only a little here (each skipped P entry is < 2^-12 of its row max)
    dense, _ = _run(q, k, v, mask, causal)
    assert rel_l1(out, dense) < 0.02


def test_int8_qk_path_matches_quantized_reference(device):
    q, k, v = rand_qkv(1, 4, 2, 300, 300, 96, device=device, seed=9)
    mask = random_block_mask(1, 4, 300, 300, 0.6, seed=9, device=device)
    out, _ = _run(q, k, v, mask, True, quant="int8")
    sim, _ = block_sparse_attn(q, k, v, mask, is_causal=True, pvthreshd=None, quant="int8", backend="reference",
                               return_stats=True)
    exact, _ = R.masked_attention(q, k, v, mask, is_causal=True, scale=96 ** -0.5)
    # the kernel computes exactly the de-quantized problem (up to fp16 P rounding) ...
    assert rel_l1(out, sim) < 5e-3
    # ... whose error against exact attention is the INT8 error, small for Gaussian inputs
    assert rel_l1(out, exact) < 0.05
