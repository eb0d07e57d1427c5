"""The FlashAttention-4 executor backend: the block-map conversion (CPU: against a plain-torch
conversion and the reference's allowed blocks), how ``backend="auto"`` chooses and what the backend
refuses; on a GPU with FA4 installed, its output against the float64 reference on the same map."""

import importlib.util

import pytest
import torch

from helpers import assert_within_lowp_rule, rand_qkv, random_block_mask
from sparge_core import block_sparse_attn
from sparge_core.api import BACKENDS, resolve_backend
from sparge_core.ops import fa4
from sparge_core.ops import reference as R

HAS_FA4 = importlib.util.find_spec("cutlass") is not None and fa4.installed()


@pytest.mark.parametrize("nq,nk,causal,window", [
    (1000, 1000, False, None), (1000, 1000, True, None), (333, 700, True, None), (700, 333, True, None),
    (900, 900, True, 200), (129, 500, True, 97), (64, 64, True, 1),
])
@pytest.mark.parametrize("split_full", [True, False], ids=["split", "mask-only"])
def test_block_lists_match_the_plain_torch_conversion(device, nq, nk, causal, window, split_full):
    mask = random_block_mask(2, 3, nq, nk, 0.4, seed=nq + nk, device=device)
    got = fa4.block_lists(mask, nq, nk, causal, window, split_full=split_full)
    ref = fa4.block_lists_reference(mask, nq, nk, causal, window, split_full=split_full)
    seen = torch.zeros(mask.shape, dtype=torch.int32, device=device)
    for cnt, idx, ref_cnt, ref_idx in ((got.mask_cnt, got.mask_idx, ref.mask_cnt, ref.mask_idx),
                                       (got.full_cnt, got.full_idx, ref.full_cnt, ref.full_idx)):
        assert cnt.dtype == idx.dtype == torch.int32 and cnt.shape == mask.shape[:3]
        assert torch.equal(cnt.cpu(), ref_cnt.cpu())
        used = torch.arange(idx.shape[-1], device=device) < cnt[..., None]
        assert torch.equal(torch.where(used, idx, -1).cpu(), ref_idx[..., :idx.shape[-1]].cpu())
        assert (torch.diff(idx.float(), dim=-1)[used[..., 1:]] > 0).all()  # ascending
        seen.scatter_add_(-1, torch.where(used, idx, 0).long(), used.to(torch.int32))
    # together the lists hold exactly the kept blocks that attention may touch, each once
    kept = mask & R.allowed_block_mask(nq, nk, causal, device=device, window=window)
    assert torch.equal(seen.cpu(), kept.to(torch.int32).cpu())
    # a full block needs no token mask: every real query row sees every key of it
    full_used = torch.arange(got.full_idx.shape[-1], device=device) < got.full_cnt[..., None]
    full = torch.zeros(mask.shape, dtype=torch.int32, device=device).scatter_add_(
        -1, torch.where(full_used, got.full_idx, 0).long(), full_used.to(torch.int32)) > 0
    unmasked = fa4.unmasked_block_mask_reference(nq, nk, causal, window, device=device)
    assert not (full & ~unmasked).any()
    if split_full:
        assert torch.equal(full.cpu(), (kept & unmasked).cpu())
        if not causal and nk % 64 == 0:
            assert got.mask_cnt.eq(0).all()
    else:
        assert not full.any()


def test_unmasked_blocks_by_hand():
    # causal 256 x 256: row 0 sees key 0 only, so query block 0 has no whole key block; query block 1
    # (rows 128..255) sees keys 0..127 from its first row on: key blocks 0 and 1 are whole, 2 is not
    um = fa4.unmasked_block_mask_reference(256, 256, True)
    assert um.tolist() == [[False, False, False, False], [True, True, False, False]]
    # non-causal, K ends inside block 1: only block 0 is whole
    assert fa4.unmasked_block_mask_reference(100, 100, False).tolist() == [[True, False]]


def test_block_lists_broadcast_map_and_empty_rows(device):
    mask = torch.zeros(1, 1, 4, 8, dtype=torch.bool, device=device)
    mask[..., 1, :] = True
    lists = fa4.block_lists(mask.expand(2, 3, -1, -1), 512, 512, False)
    assert lists.full_cnt.shape == (2, 3, 4)
    assert lists.full_cnt[..., 0].eq(0).all() and lists.full_cnt[..., 1].eq(8).all()
    assert lists.mask_cnt.eq(0).all()  # non-causal, K a whole number of blocks: nothing needs a mask
    assert torch.equal(lists.full_idx[0, 0, 1].cpu(), torch.arange(8, dtype=torch.int32))


def test_registry_and_auto_choice():
    assert "fa4" in BACKENDS.names()
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, fa4_ok=True).name == "reference"  # auto never leaves the CPU for FA4
    q = torch.randn(1, 2, 256, 64)
    assert not fa4.auto_eligible(q, pvthreshd=None, quant="none", window=None)  # CPU tensors
    assert fa4.supported(cpu, 64, torch.bfloat16).startswith("backend 'fa4' runs on CUDA")


def test_auto_hands_fa4_only_large_calls():
    q = torch.empty(1, 32, 32768, 128, device="meta")
    assert fa4.dense_work(q, 32768, False) == 2 * fa4.dense_work(q, 32768, True) == 2 ** 42
    assert fa4.dense_work(q, 32768, True) >= fa4.AUTO_MIN_WORK  # the 8B shape at 32K, causal
    assert fa4.dense_work(q[:, :, :8192], 8192, False) < fa4.AUTO_MIN_WORK  # 8K: the Triton kernel
    assert fa4.dense_work(q[..., :64], 32768, True) < fa4.AUTO_MIN_WORK  # D=64 causal 32K: Triton


def test_fa4_backend_refuses_what_it_cannot_run_exactly():
    q, k, v = rand_qkv(1, 2, 1, 256, 256, 64, seed=1)
    mask = torch.ones(1, 2, 2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="no stage-2 PV skip: pass pvthreshd=None"):
        block_sparse_attn(q, k, v, mask, backend="fa4", pvthreshd=50.0)  # stage 2 asked for
    with pytest.raises(ValueError, match="quant must be 'none'"):
        block_sparse_attn(q, k, v, mask, backend="fa4", pvthreshd=None, quant="int8")
    with pytest.raises(ValueError, match="runs on CUDA GPUs only"):
        block_sparse_attn(q, k, v, mask, backend="fa4", pvthreshd=None)


@pytest.mark.gpu
def test_auto_prefers_fa4_only_for_exact_calls_on_sm90():
    q = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    sm90 = torch.cuda.get_device_capability()[0] == 9
    assert not fa4.auto_eligible(q, pvthreshd=None, quant="none", window=None)  # too little work for FA4
    big = torch.empty(1, 32, 32768, 128, device="cuda", dtype=torch.bfloat16)
    assert fa4.auto_eligible(big, pvthreshd=None, quant="none", window=None, is_causal=True) == (HAS_FA4 and sm90)
    assert not fa4.auto_eligible(big[:, :, :8192], pvthreshd=None, quant="none", window=None, nk=8192)
    assert not fa4.auto_eligible(q, pvthreshd=torch.full((2,), 50.0), quant="none", window=None)
    assert not fa4.auto_eligible(q, pvthreshd=None, quant="int8", window=None)
    assert not fa4.auto_eligible(q, pvthreshd=None, quant="none", window=128)
    if torch.cuda.get_device_capability()[0] >= 10:
        assert "256x128" in fa4.supported(q.device, 64, torch.bfloat16)


needs_fa4 = pytest.mark.skipif(not HAS_FA4, reason="needs flash-attn-4 and nvidia-cutlass-dsl (sparge[fa4])")

GPU_CASES = [
    # b, hq, hkv, nq, nk, d, causal, window
    pytest.param(1, 4, 4, 4096, 4096, 128, False, None, id="N4096-D128"),
    pytest.param(1, 8, 2, 4096, 4096, 64, True, None, id="N4096-D64-g4-causal"),
    pytest.param(2, 4, 4, 3000, 3000, 128, True, None, id="B2-N3000-causal"),
    pytest.param(1, 4, 2, 1000, 3000, 128, True, None, id="Nq1000-Nk3000-causal"),
    pytest.param(1, 4, 4, 3000, 1000, 64, True, None, id="Nq3000-Nk1000-causal-empty-rows"),
    pytest.param(1, 4, 4, 2000, 2000, 96, False, None, id="N2000-D96"),
    pytest.param(1, 4, 4, 4096, 4096, 128, True, 1000, id="window1000"),
]


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,window", GPU_CASES)
def test_fa4_matches_the_reference_on_the_same_map(b, hq, hkv, nq, nk, d, causal, window, dtype):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("FA4 runs 128x64 maps on sm90 only")
    q, k, v = rand_qkv(b, hq, hkv, nq, nk, d, dtype=dtype, device="cuda", seed=nq + d)
    mask = random_block_mask(b, hq, nq, nk, 0.4, seed=nk, device="cuda")
    out, stats = block_sparse_attn(q, k, v, mask, is_causal=causal, window=window, pvthreshd=None,
                                   backend="fa4", return_stats=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_within_lowp_rule(out, q, k, v, mask, is_causal=causal, scale=d ** -0.5, window=window)
    _, counts = R.masked_attention(q, k, v, mask, is_causal=causal, scale=d ** -0.5, window=window)
    assert torch.equal(stats.computed_blocks, counts.computed) and stats.pv_skip == 0.0
    tri = block_sparse_attn(q, k, v, mask, is_causal=causal, window=window, pvthreshd=None, backend="triton")
    assert ((out.double() - tri.double()).abs().sum() / tri.double().abs().sum()).item() < 5e-3


@pytest.mark.gpu
@needs_fa4
def test_fa4_empty_map_gives_zeros_and_fp32_inputs_come_back_fp32():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("FA4 runs 128x64 maps on sm90 only")
    q, k, v = rand_qkv(1, 2, 2, 1024, 1024, 64, dtype=torch.float32, device="cuda", seed=3)
    empty = torch.zeros(1, 2, 8, 16, dtype=torch.bool, device="cuda")
    out = block_sparse_attn(q, k, v, empty, pvthreshd=None, backend="fa4")
    assert out.dtype == torch.float32 and (out == 0).all()


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("split_full", [True, False], ids=["split", "mask-only"])
@pytest.mark.parametrize("nq,nk,causal", [(3000, 3000, True), (1000, 3000, True), (2000, 2000, False)])
def test_fa4_both_list_layouts_agree_with_the_reference(nq, nk, causal, split_full):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("FA4 runs 128x64 maps on sm90 only")
    q, k, v = rand_qkv(1, 4, 2, nq, nk, 128, dtype=torch.bfloat16, device="cuda", seed=nq)
    mask = random_block_mask(1, 4, nq, nk, 0.5, seed=nk, device="cuda")
    out, counts = fa4.attend(q, k, v.contiguous(), mask, is_causal=causal, scale=128 ** -0.5, pvthreshd=None,
                             quant="none", split_full=split_full)
    assert_within_lowp_rule(out, q, k, v, mask, is_causal=causal, scale=128 ** -0.5)
    _, ref_counts = R.masked_attention(q, k, v, mask, is_causal=causal, scale=128 ** -0.5)
    assert torch.equal(counts.computed, ref_counts.computed)
