"""sparge_core.export: a block map as a FlexAttention BlockMask computes what the block-sparse
kernel computes on the same map (flex's eager path on CPU, which evaluates the mask_mod), and its
block lists are exactly the kept pairs the kernel visits (what flex's compiled kernels walk)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from helpers import rand_qkv, random_block_mask, rel_l1
from sparge_core import block_sparse_attn
from sparge_core.export import predicted_flex_block_mask, to_flex_block_mask
from sparge_core.methods import get_method
from sparge_core.ops import reference as R
from sparge_core.params import LayerConfig

# flex's eager path (the only one on CPU) warns that it is unfused: that is what these tests want
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CASES = [  # (hq, hkv, nq, nk, d, causal)
    (2, 2, 200, 200, 64, False),
    (2, 2, 200, 200, 64, True),
    (4, 2, 131, 300, 64, True),  # Nq != Nk: bottom-right aligned, GQA
    (4, 2, 300, 131, 128, False),
    (2, 1, 77, 77, 128, True),  # one partial block each way
]


def _flex(q, k, v, bm, scale):
    return flex_attention(
        q.float(), k.float(), v.float(), block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


@pytest.mark.parametrize("hq,hkv,nq,nk,d,causal", CASES)
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
def test_flex_equals_the_kernel_on_the_same_map(hq, hkv, nq, nk, d, causal, density):
    q, k, v = rand_qkv(1, hq, hkv, nq, nk, d, dtype=torch.float16, seed=nq + nk + d)
    scale = d**-0.5
    mask = random_block_mask(1, hq, nq, nk, density, seed=hq + nq)
    if density > 0:  # keep every row's own block so most rows see something (empty rows: see below)
        mask |= R.causal_diagonal_block_mask(nq, nk, R.BLOCK_Q, R.BLOCK_K)
    bm = to_flex_block_mask(mask, nq, nk, is_causal=causal)
    flex = _flex(q, k, v, bm, scale)
    ref = block_sparse_attn(
        q.float(),
        k.float(),
        v.float(),
        mask,
        is_causal=causal,
        scale=scale,
        pvthreshd=None,
        backend="reference",
    )
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled Triton on a GPU, the interpreter on CPU
    kernel = block_sparse_attn(
        q.to(dev), k.to(dev), v.to(dev), mask.to(dev), is_causal=causal, scale=scale, pvthreshd=None,
        quant="none", backend="triton",
    ).cpu()
    torch.testing.assert_close(flex, ref, atol=2e-6, rtol=1e-5)
    assert rel_l1(kernel.float(), flex) < 2e-3 if flex.abs().sum() else kernel.abs().sum() == 0
    # the block lists are the kept pairs the kernel visits
    allowed = R.allowed_block_mask(nq, nk, causal)
    assert torch.equal(bm.to_dense().bool(), mask & allowed)


def test_rows_without_a_kept_key_are_zero_in_both():
    q, k, v = rand_qkv(1, 2, 2, 256, 256, 64, dtype=torch.float32, seed=5)
    mask = torch.ones(1, 2, 2, 4, dtype=torch.bool)
    mask[0, 1, 1] = False  # query block 1 of head 1 keeps nothing
    bm = to_flex_block_mask(mask, 256, 256)
    flex = _flex(q, k, v, bm, None)
    ref = block_sparse_attn(q, k, v, mask, pvthreshd=None, backend="reference")
    assert flex[0, 1, 128:].abs().max() == 0 and ref[0, 1, 128:].abs().max() == 0
    torch.testing.assert_close(flex, ref, atol=2e-6, rtol=1e-5)


def test_broadcast_map_and_non_finite_inputs_propagate():
    q, k, v = rand_qkv(2, 4, 2, 150, 150, 64, dtype=torch.float32, seed=9)
    v[1, 0, 3] = float("nan")  # key 3 of batch 1 (KV head 0: query heads 0-1) is NaN
    mask = random_block_mask(1, 1, 150, 150, 0.5, seed=2) | R.causal_diagonal_block_mask(150, 150, 128, 64)
    bm = to_flex_block_mask(mask, 150, 150, is_causal=True)
    flex = _flex(q, k, v, bm, None)
    ref = block_sparse_attn(
        q, k, v, mask.expand(2, 4, -1, -1), is_causal=True, pvthreshd=None, backend="reference"
    )
    # the kernel (and the reference) spread a NaN of V to the query blocks that compute its key block;
    # flex's eager path multiplies the whole masked score matrix with V (0 x NaN), so it spreads it to
    # every row of that head, as dense SDPA does; its compiled kernels walk the block lists like ours
    assert torch.isnan(ref[1, :2]).any() and not torch.isnan(ref[0]).any()
    assert torch.isnan(flex[torch.isnan(ref)]).all()
    assert not torch.isnan(flex[0]).any() and not torch.isnan(flex[1, 2:]).any()
    finite = ~torch.isnan(flex)
    torch.testing.assert_close(flex[finite], ref[finite], atol=2e-6, rtol=1e-5)


def test_predicted_map_of_a_method_and_a_layer_config():
    q, k, v = rand_qkv(1, 2, 2, 300, 300, 64, dtype=torch.float32, seed=11)
    method = get_method("sparge-topk", topk=0.3, simthreshd1=-1.0)
    bm = predicted_flex_block_mask(q, k, method, is_causal=True)
    mask = method.block_mask(q, k, is_causal=True)
    assert 0 < mask.float().mean() < 1
    ref = block_sparse_attn(q, k, v, mask, is_causal=True, pvthreshd=None, backend="reference")
    torch.testing.assert_close(_flex(q, k, v, bm, None), ref, atol=2e-6, rtol=1e-5)
    lc = LayerConfig(0, (0.2, 0.5), (50.0, 50.0), cdfthreshd=(0.6, 0.9))
    bm = predicted_flex_block_mask(q, k, lc)
    assert torch.equal(
        bm.to_dense().bool(),
        get_method("sparge", simthreshd1=[0.2, 0.5], cdfthreshd=[0.6, 0.9]).block_mask(q, k, is_causal=False),
    )
    with pytest.raises(ValueError, match="3 heads"):
        predicted_flex_block_mask(q, k, LayerConfig(0, (0.2,) * 3, (50.0,) * 3, cdfthreshd=(0.5,) * 3))


def test_bad_maps_are_refused():
    with pytest.raises(ValueError, match="bool tensor"):
        to_flex_block_mask(torch.ones(1, 1, 2, 4), 256, 256)
    with pytest.raises(ValueError, match=r"need \(2, 4\) blocks"):
        to_flex_block_mask(torch.ones(1, 1, 2, 3, dtype=torch.bool), 256, 256)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_flex_walks_the_same_blocks_on_gpu(causal):
    """flex's compiled kernel uses the block lists (not only mask_mod): same output as the kernel."""
    q, k, v = rand_qkv(1, 4, 2, 1000, 1300, 64, dtype=torch.float16, device="cuda", seed=21)
    mask = random_block_mask(1, 4, 1000, 1300, 0.4, seed=4, device="cuda")
    mask |= R.causal_diagonal_block_mask(1000, 1300, R.BLOCK_Q, R.BLOCK_K, device="cuda")
    bm = to_flex_block_mask(mask, 1000, 1300, is_causal=causal)
    flex = torch.compile(flex_attention, dynamic=False)(
        q, k, v, block_mask=bm, enable_gqa=True, kernel_options={"BLOCK_M": 128, "BLOCK_N": 64}
    )
    kernel = block_sparse_attn(
        q, k, v, mask, is_causal=causal, pvthreshd=None, quant="none", backend="triton"
    )
    assert rel_l1(flex.float(), kernel.float()) < 2e-3


@pytest.mark.parametrize("hq,hkv,nq,nk,d,causal", CASES)
def test_block_lists_only_export_has_the_same_blocks(hq, hkv, nq, nk, d, causal):
    """token_mask=False (for compiled flex in benchmarks) keeps exactly the same block lists; its
    mask_mod is the causal rule alone (the same function for every map when Nq == Nk)."""
    mask = random_block_mask(1, hq, nq, nk, 0.5, seed=nq + nk)
    full = to_flex_block_mask(mask, nq, nk, is_causal=causal)
    lists = to_flex_block_mask(mask, nq, nk, is_causal=causal, token_mask=False)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(full, name), getattr(lists, name)), name
    other = to_flex_block_mask(random_block_mask(1, hq, nq, nk, 0.5, seed=1), nq, nk, is_causal=causal,
                               token_mask=False)
    if causal and nq == nk:
        assert lists.mask_mod is other.mask_mod
    if causal:  # inside a partial block the mask_mod applies the bottom-right causal rule
        qi, kj = torch.tensor(5), torch.tensor(5 + nk - nq + 1)
        assert not bool(lists.mask_mod(0, 0, qi, kj)) and bool(lists.mask_mod(0, 0, qi, kj - 1))
