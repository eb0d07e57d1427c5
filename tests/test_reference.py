"""The plain-PyTorch reference against hand-checked cases and against SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import rand_qkv, rel_l1
from sparge_core.ops import reference as R


def test_block_mean_pool_divides_partial_block_by_true_length():
    x = torch.randn(1, 1, 130, 8, dtype=torch.float64)
    pooled = R.block_mean_pool(x, 64)
    assert pooled.shape == (1, 1, 3, 8)
    torch.testing.assert_close(pooled[0, 0, 0], x[0, 0, :64].mean(0))
    torch.testing.assert_close(pooled[0, 0, 2], x[0, 0, 128:].mean(0))


def test_self_similarity_matches_pairwise_cosine_loop():
    x = torch.randn(2, 3, 100, 16, dtype=torch.float64)
    sim = R.block_self_similarity(x, 64)
    for b in range(2):
        for h in range(3):
            for blk, (s, e) in enumerate([(0, 64), (64, 100)]):
                rows = x[b, h, s:e]
                cos = F.cosine_similarity(rows[:, None, :], rows[None, :, :], dim=-1)
                assert math.isclose(sim[b, h, blk].item(), cos.mean().item(), rel_tol=1e-9)


def test_self_similarity_extremes():
    same = torch.randn(1, 1, 1, 8, dtype=torch.float64).expand(1, 1, 64, 8)
    assert math.isclose(R.block_self_similarity(same, 64).item(), 1.0, rel_tol=1e-12)
    eye = torch.eye(64, dtype=torch.float64)[None, None]  # orthogonal rows: only the diagonal counts
    assert math.isclose(R.block_self_similarity(eye, 64).item(), 1 / 64, rel_tol=1e-12)
    # an all-zero row stays zero and does not produce NaN
    z = torch.randn(1, 1, 64, 8, dtype=torch.float64)
    z[0, 0, 5] = 0
    assert torch.isfinite(R.block_self_similarity(z, 64)).all()


def test_smooth_k_removes_token_mean():
    k = torch.randn(2, 2, 50, 8, dtype=torch.float64) + 3.0
    assert R.smooth_k(k).mean(dim=2).abs().max() < 1e-12


def test_causal_block_mask_bottom_right():
    # Nq = Nk = 256: q block 0 (rows 0..127) sees k blocks 0, 1; q block 1 sees all 4
    m = R.causal_block_mask(256, 256, 128, 64)
    assert m.tolist() == [[True, True, False, False], [True, True, True, True]]
    # Nq = 128 < Nk = 320: offset 192, the only q block sees keys <= 127 + 192 = 319: all 5 blocks
    assert R.causal_block_mask(128, 320, 128, 64).all()
    # Nq = 300 > Nk = 64: offset -236; q block 0 (rows 0..127) sees nothing, block 1 (last row 255) sees
    # keys <= 19, block 2 keys <= 63
    m = R.causal_block_mask(300, 64, 128, 64)
    assert m[:, 0].tolist() == [False, True, True]


def test_causal_diagonal_blocks():
    d = R.causal_diagonal_block_mask(256, 256, 128, 64)
    assert d.tolist() == [[True, True, False, False], [False, False, True, True]]
    d = R.causal_diagonal_block_mask(128, 200, 128, 64)  # offset 72: positions 72..199 -> blocks 1..3
    assert d.tolist() == [[False, True, True, True]]


def _blocks(pooled, sim):
    return R.PooledBlocks(torch.tensor(pooled, dtype=torch.float64)[None, None],
                          torch.tensor(sim, dtype=torch.float64)[None, None])


def test_select_blocks_cdf_hand_case():
    # one query block, four key blocks; scores = pooled_q . pooled_k = log of the wanted probabilities
    probs = torch.tensor([0.1, 0.6, 0.25, 0.05], dtype=torch.float64)
    qb = _blocks([[1.0]], [1.0])
    kb = _blocks(probs.log()[:, None].tolist(), [1.0] * 4)
    theta = torch.tensor([0.5])
    sel = lambda tau: R.select_blocks(qb, kb, nq=128, nk=256, is_causal=False, scale=1.0,  # noqa: E731
                                      simthreshd1=theta, cdfthreshd=torch.tensor([tau]))[0, 0, 0].tolist()
    # sorted: 0.6 (blk1), 0.25 (blk2), 0.1 (blk0), 0.05 (blk3); cdf 0.6, 0.85, 0.95, 1.0
    assert sel(0.5) == [False, True, False, False]  # at least one
    assert sel(0.6) == [False, True, False, False]  # cdf <= tau, inclusive
    assert sel(0.9) == [False, True, True, False]
    assert sel(0.96) == [True, True, True, False]
    assert sel(1.0) == [True, True, True, True]


def test_select_blocks_topk_and_fix_rules():
    qb = _blocks([[1.0], [1.0]], [0.9, 0.2])  # q block 1 is not self-similar -> full row
    kb = _blocks([[0.1], [0.9], [0.5], [0.3], [0.2]], [0.9, 0.9, 0.9, 0.1, 0.9])  # k block 3 not similar
    m = R.select_blocks(qb, kb, nq=256, nk=320, is_causal=False, scale=1.0,
                        simthreshd1=torch.tensor([0.5]), topk=torch.tensor([0.4]))[0, 0]
    # floor(0.4 * 5) = 2 blocks by score among the similar ones: 1 (0.9), 2 (0.5); column 3 fixed
    assert m[0].tolist() == [False, True, True, True, False]
    assert m[1].all()
    # topk small still keeps one block
    m = R.select_blocks(qb, kb, nq=256, nk=320, is_causal=False, scale=1.0,
                        simthreshd1=torch.tensor([0.5]), topk=torch.tensor([0.01]))[0, 0]
    assert m[0].tolist() == [False, True, False, True, False]


def test_select_blocks_strict_similarity_threshold():
    qb = _blocks([[1.0]], [0.5])
    kb = _blocks([[1.0], [2.0]], [0.5, 0.9])
    m = R.select_blocks(qb, kb, nq=128, nk=128, is_causal=False, scale=1.0,
                        simthreshd1=torch.tensor([0.5]), cdfthreshd=torch.tensor([0.1]))[0, 0]
    assert m.all()  # sim == threshold is NOT self-similar: q row and k column 0 are fix blocks


def test_select_blocks_causal_never_keeps_future_and_keeps_diagonal():
    g = torch.Generator().manual_seed(3)
    q, k, _ = rand_qkv(1, 2, 1, 512, 512, 16, dtype=torch.float64, seed=3)
    m = R.predict_block_mask(q, k, is_causal=True, scale=0.25, simthreshd1=torch.tensor([-1.0, -1.0]),
                             cdfthreshd=torch.tensor([0.01, 0.01]))
    allowed = R.causal_block_mask(512, 512, 128, 64)
    assert not (m & ~allowed).any()
    assert (m | ~R.causal_diagonal_block_mask(512, 512, 128, 64)).all()
    assert m[..., 0].all()  # the sink block
    del g


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(200, 200), (100, 333), (1, 70)])
def test_masked_attention_full_mask_equals_sdpa(causal, nq, nk):
    q, k, v = rand_qkv(2, 4, 2, nq, nk, 32, dtype=torch.float64, seed=nq + nk)
    full = torch.ones(2, 4, R.num_blocks(nq, 128), R.num_blocks(nk, 64), dtype=torch.bool)
    out, counts = R.masked_attention(q, k, v, full, is_causal=causal, scale=0.2)
    attn_mask = R.causal_token_mask(nq, nk) if causal else None
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=attn_mask, scale=0.2)
    assert rel_l1(out, ref) < 1e-12
    assert counts.pv_skipped.sum() == 0


def test_masked_attention_matches_token_masked_softmax_and_empty_rows_are_zero():
    q, k, v = rand_qkv(1, 2, 2, 260, 200, 16, dtype=torch.float64, seed=7)
    mask = torch.rand(1, 2, 3, 4, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[0, 0, 1] = False  # an empty row of blocks
    out, counts = R.masked_attention(q, k, v, mask, is_causal=False, scale=0.3)
    tok = mask.repeat_interleave(128, 2).repeat_interleave(64, 3)[:, :, :260, :200]
    s = (q @ k.transpose(-1, -2)) * 0.3
    p = torch.softmax(s.masked_fill(~tok, -math.inf), dim=-1).nan_to_num(0.0)
    assert rel_l1(out, p @ v) < 1e-12
    assert (out[0, 0, 128:256] == 0).all()
    assert counts.computed.tolist() == [mask[0].sum(dim=(1, 2)).tolist()]


def test_pv_skip_simulation_hand_case():
    """Key block 0 has huge logits for every query, key blocks 1 and 2 small ones: with pvthreshd
    below the gap both later blocks are skipped; above the gap neither is."""
    d = 16
    q = torch.zeros(1, 1, 128, d, dtype=torch.float64)
    q[..., 0] = 1.0
    q += 0.01 * torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = 0.1 * torch.randn(1, 1, 192, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    k[0, 0, :64, 0] = 20.0  # block 0: logit about 20 * scale * log2(e) = 28.9 (scale 1)
    v = torch.randn(1, 1, 192, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    out_skip, c = R.masked_attention(q, k, v, mask, is_causal=False, scale=1.0, pvthreshd=torch.tensor([10.0]))
    assert c.pv_skipped.item() == 2
    torch.testing.assert_close(out_skip, (torch.softmax(q @ k[:, :, :64].transpose(-1, -2), -1) @ v[:, :, :64]))
    _, c = R.masked_attention(q, k, v, mask, is_causal=False, scale=1.0, pvthreshd=torch.tensor([40.0]))
    assert c.pv_skipped.item() == 0
    # order matters: if the big block comes last nothing before it can be skipped
    k2, v2 = k.flip(2), v.flip(2)
    _, c = R.masked_attention(q, k2, v2, mask, is_causal=False, scale=1.0, pvthreshd=torch.tensor([10.0]))
    assert c.pv_skipped.item() == 0


def test_pv_skip_ignores_padding_rows():
    """A partial last query block: padding rows must not veto a skip."""
    d = 16
    q = torch.zeros(1, 1, 10, d, dtype=torch.float64)
    q[..., 0] = 1.0
    k = 0.1 * torch.randn(1, 1, 128, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    k[0, 0, :64, 0] = 20.0
    v = torch.randn(1, 1, 128, d, dtype=torch.float64)
    mask = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    _, c = R.masked_attention(q, k, v, mask, is_causal=False, scale=1.0, pvthreshd=torch.tensor([10.0]))
    assert c.pv_skipped.item() == 1


def test_quantize_per_block_rounds_half_away_and_bounds_error():
    x = torch.randn(1, 2, 150, 32, generator=torch.Generator().manual_seed(0))
    xq, sc = R.quantize_per_block(x, 64, multiplier=2.0)
    assert xq.dtype == torch.int8 and sc.shape == (1, 2, 3)
    assert xq.abs().max() <= 127
    back = R.dequantize_per_block(xq, sc, 64)
    assert ((back - 2 * x).abs() <= sc.repeat_interleave(64, -1)[..., :150, None] * 0.5 + 1e-6).all()
    # symmetric rounding: negating the input negates the codes
    xq_neg, sc_neg = R.quantize_per_block(-x, 64, multiplier=2.0)
    assert torch.equal(xq_neg, -xq) and torch.equal(sc_neg, sc)
    # nearest code: 0.6 and 1.4 (in units of the scale) go to 1, 1.6 to 2
    y = torch.zeros(1, 1, 64, 1)
    y[0, 0, :4, 0] = torch.tensor([127.0, 0.6, 1.4, -1.6])
    yq, _ = R.quantize_per_block(y, 64)
    assert yq[0, 0, :4, 0].tolist() == [127, 1, 1, -2]
