"""Contract 3 and the public API: sparge_attn end to end, per-head hyperparameters, bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import rand_qkv, rel_l1
from sparge_core import BLOCK_K, BLOCK_Q, block_sparse_attn, predict_block_mask, sparge_attn
from sparge_core.ops import reference as R
from sparge_core.synthetic import structured_qkv

BACKENDS = ["triton", "reference"]


def _sdpa(q, k, v, causal):
    g = q.shape[1] // k.shape[1]
    nq, nk = q.shape[2], k.shape[2]
    mask = R.causal_token_mask(nq, nk, device=q.device) if causal else None
    return F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(g, 1),
                                          v.float().repeat_interleave(g, 1), attn_mask=mask)


def test_public_constants():
    assert (BLOCK_Q, BLOCK_K) == (128, 64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("nq,nk,d,hq,hkv", [(1000, 1000, 64, 4, 2), (63, 63, 96, 2, 1), (100, 400, 128, 2, 2)])
def test_keep_everything_equals_sdpa(device, backend, causal, nq, nk, d, hq, hkv):
    q, k, v = rand_qkv(1, hq, hkv, nq, nk, d, device=device, seed=nq + d)
    for kw in (dict(cdfthreshd=1.0), dict(topk=1.0, cdfthreshd=None)):
        out, stats = sparge_attn(q, k, v, is_causal=causal, pvthreshd=None, backend=backend, return_stats=True, **kw)
        assert rel_l1(out, _sdpa(q, k, v, causal)) < 2e-3
        assert stats.qk_sparsity == 0.0 and stats.sparsity == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_structured_inputs_are_sparse_and_close(device, backend, causal):
    q, k, v = structured_qkv(1, 4, 2, 2048, 64, device=device, seed=2)
    out, stats = sparge_attn(q, k, v, is_causal=causal, simthreshd1=0.3, cdfthreshd=0.995, backend=backend,
                             return_stats=True)
    assert stats.qk_sparsity > 0.2
    assert rel_l1(out, _sdpa(q, k, v, causal)) < 0.1
    # the sparse output is exactly masked attention with the predicted mask
    mask = predict_block_mask(q, k, is_causal=causal, simthreshd1=0.3, cdfthreshd=0.995, backend=backend)
    again = block_sparse_attn(q, k, v, mask, is_causal=causal, backend=backend)
    assert rel_l1(out, again) < 1e-6


def test_triton_and_reference_backends_agree(device):
    q, k, v = structured_qkv(2, 4, 2, 900, 64, device=device, seed=4)
    kw = dict(is_causal=True, simthreshd1=0.2, cdfthreshd=0.9, pvthreshd=6.0, return_stats=True)
    out_t, st_t = sparge_attn(q, k, v, backend="triton", **kw)
    out_r, st_r = sparge_attn(q, k, v, backend="reference", **kw)
    assert abs(st_t.qk_sparsity - st_r.qk_sparsity) < 0.02
    assert abs(st_t.pv_skip - st_r.pv_skip) < 0.02
    assert rel_l1(out_t, out_r) < 0.01


def test_per_head_hyperparameters_act_per_head(device):
    q, k, v = structured_qkv(1, 4, 2, 1024, 64, device=device, seed=6)
    theta = [-1.0, -1.0, 1.0, -1.0]
    _, st_a = sparge_attn(q, k, v, simthreshd1=theta, cdfthreshd=torch.tensor([0.5, 1.0, 0.5, 0.9]),
                          return_stats=True, pvthreshd=[50.0] * 4)
    _, st_b = sparge_attn(q, k, v, simthreshd1=theta, cdfthreshd=(0.9, 1.0, 0.5, 0.5), return_stats=True)
    a, b = st_a.per_head_qk_sparsity(), st_b.per_head_qk_sparsity()
    # cdf 1 keeps everything; simthreshd1 1 makes every block a fix block
    assert a[1] == 0 and a[2] == 0 and b[1] == 0 and b[2] == 0
    assert a[0] > b[0] > 0 and b[3] > a[3] > 0  # each head follows its own cdfthreshd


def test_stats_definitions(device):
    q, k, v = rand_qkv(1, 2, 2, 256, 256, 64, device=device)
    mask = torch.zeros(1, 2, 2, 4, dtype=torch.bool, device=device)
    mask[:, :, :, 0] = True
    _, st = block_sparse_attn(q, k, v, mask, is_causal=True, return_stats=True)
    # causal allows 2 + 4 = 6 of 8 pairs per head; one column kept -> 2 computed
    assert st.allowed_blocks.tolist() == [[6, 6]] and st.computed_blocks.tolist() == [[2, 2]]
    assert math.isclose(st.qk_sparsity, 4 / 6) and math.isclose(st.sparsity, 4 / 6) and st.pv_skip == 0


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
def _good():
    return rand_qkv(1, 4, 2, 100, 100, 64)


@pytest.mark.parametrize(
    "mutate,exc,fragment",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
        (lambda q, k, v: (q, k[:, :1].expand(1, 3, 100, 64).contiguous()[:, :3], v[:, :1].expand(1, 3, 100, 64)),
         ValueError, "multiple of the number of key/value heads"),
        (lambda q, k, v: (q, k[:, :, :50], v), ValueError, "k and v must have the same shape"),
        (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "batch size"),
        (lambda q, k, v: (q, k[..., :32], v[..., :32]), ValueError, "head_dim"),
        (lambda q, k, v: (q.float(), k, v), TypeError, "share a dtype"),
        (lambda q, k, v: (q.to(torch.int32), k, v), TypeError, "float16, bfloat16 or float32"),
        (lambda q, k, v: (q[:, :, :0], k, v), ValueError, "q is empty"),
        (lambda q, k, v: (torch.randn(1, 4, 10, 300).half(), torch.randn(1, 2, 10, 300).half(),
                          torch.randn(1, 2, 10, 300).half()), ValueError, "head_dim must be <= 256"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_tensors(mutate, exc, fragment):
    q, k, v = mutate(*_good())
    with pytest.raises(exc, match=fragment):
        sparge_attn(q, k, v)


@pytest.mark.parametrize(
    "kwargs,exc,fragment",
    [
        (dict(simthreshd1=[0.1, 0.2]), ValueError, "simthreshd1 must be a number or hold one value per query head"),
        (dict(cdfthreshd=float("nan")), ValueError, "cdfthreshd must be finite"),
        (dict(pvthreshd=float("inf")), ValueError, "pvthreshd must be finite"),
        (dict(cdfthreshd=1.5), ValueError, r"cdfthreshd must be in \[0.0, 1.0\]"),
        (dict(simthreshd1=-2.0), ValueError, "simthreshd1 must be in"),
        (dict(pvthreshd=-1.0), ValueError, "pvthreshd must be in"),
        (dict(topk=0.5, cdfthreshd=0.9), ValueError, "not both"),
        (dict(topk=None, cdfthreshd=None), ValueError, "both are None"),
        (dict(topk=1.2), ValueError, "topk must be in"),
        (dict(simthreshd1="high"), TypeError, "simthreshd1 must hold numbers"),
        (dict(simthreshd1=True), TypeError, "simthreshd1 must be a number"),
        (dict(scale=-1.0), ValueError, "scale must be a finite positive"),
        (dict(is_causal=1), TypeError, "is_causal must be True or False"),
        (dict(backend="cuda"), ValueError, "unknown backend 'cuda'"),
        (dict(quant="fp4"), ValueError, "quant must be one of"),
    ],
)
def test_bad_hyperparameters(kwargs, exc, fragment):
    q, k, v = _good()
    with pytest.raises(exc, match=fragment):
        sparge_attn(q, k, v, **kwargs)


def test_topk_with_default_cdf_is_topk_mode():
    q, k, v = _good()
    sparge_attn(q, k, v, topk=0.5)  # cdfthreshd left at its default: fine


@pytest.mark.parametrize(
    "mask,exc,fragment",
    [
        (torch.ones(1, 4, 1, 2, dtype=torch.int32), TypeError, "dtype torch.bool"),
        (torch.ones(1, 4, 2, 2, dtype=torch.bool), ValueError, r"mask must have shape"),
        (torch.ones(1, 3, 1, 2, dtype=torch.bool), ValueError, r"mask must have shape"),
        ([[True]], TypeError, "mask must be a bool torch.Tensor"),
    ],
)
def test_bad_masks(mask, exc, fragment):
    q, k, v = _good()
    with pytest.raises(exc, match=fragment):
        block_sparse_attn(q, k, v, mask)
