"""Every code-shape variant of the attention kernel (``KernelConfig.pv_check`` x ``tile_loads``) against
the float64 reference: the same outputs, the same stage-2 decisions (exact skip counts), for odd
lengths, GQA, head dims 64/96/128, causal or not, sliding windows, empty maps and non-finite inputs."""

import itertools

import pytest
import torch

from helpers import assert_within_lowp_rule, rand_qkv, random_block_mask
from sparge_core.ops import attention as A
from sparge_core.ops import reference as R

VARIANTS = [pytest.param(A.KernelConfig(4, 1, pv, tl), id=f"{pv}-{tl}")
            for pv, tl in itertools.product(A.PV_CHECKS, A.TILE_LOADS)]


def _skip_friendly(b, hq, hkv, nq, nk, d, device, seed):
    """Logits that fall with key position plus two strong key blocks: stage 2 skips many blocks with
    wide margins (so float rounding cannot flip a decision) and keeps some."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    q = u * 6.0 + 0.1 * torch.randn(b, hq, nq, d, generator=g)
    slope = torch.linspace(3.0, -3.0, nk)[None, None, :, None]
    k = u * slope + 0.1 * torch.randn(b, hkv, nk, d, generator=g)
    k[:, :, :64] += u * 6.0  # block 0 dominates every row that sees it
    k[:, :, nk // 2: nk // 2 + 40] += u * 5.0  # a later block close to it: computed
    v = torch.randn(b, hkv, nk, d, generator=g)
    return tuple(t.to(device, torch.float16) for t in (q, k, v))


def _run(q, k, v, mask, cfg, *, causal, pv=None, window=None, quant="none"):
    pvt = None if pv is None else torch.as_tensor(pv, dtype=torch.float32, device=q.device)
    return A.block_sparse_attn(q, k, v, mask, is_causal=causal, scale=q.shape[-1] ** -0.5, pvthreshd=pvt,
                               quant=quant, config=cfg, window=window)


CASES = [
    # b, hq, hkv, nq, nk, d, causal, window
    pytest.param(1, 2, 1, 700, 700, 64, False, None, id="N700-D64-g2"),
    pytest.param(1, 2, 2, 333, 520, 128, True, None, id="Nq333-Nk520-D128-causal"),
    pytest.param(2, 2, 1, 300, 300, 96, True, 150, id="B2-N300-D96-window150"),
]


@pytest.mark.parametrize("cfg", VARIANTS)
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,window", CASES)
def test_variant_matches_reference_and_its_skip_counts(device, cfg, b, hq, hkv, nq, nk, d, causal, window):
    q, k, v = _skip_friendly(b, hq, hkv, nq, nk, d, device, seed=nq + d)
    mask = random_block_mask(b, hq, nq, nk, 0.8, seed=d, device=device)
    pv = [2.0, 60.0]  # head 0 skips, head 1 (almost) never does
    out, counts = _run(q, k, v, mask, cfg, causal=causal, pv=pv, window=window)
    pvt = torch.tensor(pv, device=device)
    _, ref = R.masked_attention(q, k, v, mask, is_causal=causal, scale=d ** -0.5, pvthreshd=pvt,
                                window=window)
    assert int(ref.pv_skipped[:, 0].sum()) > 0, "the inputs were built so that stage 2 skips blocks"
    assert torch.equal(counts.pv_skipped.cpu(), ref.pv_skipped.cpu())
    assert torch.equal(counts.computed.cpu(), ref.computed.cpu())
    assert_within_lowp_rule(out, q, k, v, mask, is_causal=causal, scale=d ** -0.5, pvthreshd=pvt,
                            window=window)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_all_variants_compute_the_same_numbers(device, causal):
    """Skipping by branch, by a zeroed block or through descriptors changes no arithmetic of the kept
    blocks: on CPU the outputs agree bit for bit (on GPU within rounding: the compiler may contract
    differently), and with stage 2 off every variant is the plain kernel."""
    q, k, v = _skip_friendly(1, 2, 1, 450, 450, 64, device, seed=5)
    mask = random_block_mask(1, 2, 450, 450, 0.7, seed=5, device=device)
    for pv in (None, [3.0, 3.0]):
        outs = [_run(q, k, v, mask, p.values[0], causal=causal, pv=pv)[0] for p in VARIANTS]
        for other in outs[1:]:
            if device.type == "cpu":
                assert torch.equal(other, outs[0])
            else:
                torch.testing.assert_close(other, outs[0], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("cfg", VARIANTS)
def test_empty_and_full_maps(device, cfg):
    q, k, v = rand_qkv(1, 2, 1, 200, 200, 64, device=device, seed=3)
    nqb, nkb = R.num_blocks(200, 128), R.num_blocks(200, 64)
    empty = torch.zeros(1, 2, nqb, nkb, dtype=torch.bool, device=device)
    out, counts = _run(q, k, v, empty, cfg, causal=True, pv=[1.0, 1.0])
    assert (out == 0).all() and int(counts.computed.sum()) == 0 and int(counts.pv_skipped.sum()) == 0
    full = ~empty
    out, _ = _run(q, k, v, full, cfg, causal=False, pv=[1.0, 1.0])
    assert_within_lowp_rule(out, q, k, v, full, is_causal=False, scale=0.125,
                            pvthreshd=torch.tensor([1.0, 1.0], device=device))


@pytest.mark.parametrize("cfg", VARIANTS)
def test_non_finite_inputs_propagate_as_in_dense_attention(device, cfg):
    """A NaN in one query row poisons that row only; an inf in one key's value poisons every row that
    attends to it (here: all, full map), as in SDPA. Stage 2 is on but far from skipping."""
    q, k, v = rand_qkv(1, 2, 1, 300, 300, 64, device=device, seed=8)
    full = torch.ones(1, 2, R.num_blocks(300, 128), R.num_blocks(300, 64), dtype=torch.bool, device=device)
    qn = q.clone()
    qn[0, 1, 77] = float("nan")
    out, _ = _run(qn, k, v, full, cfg, causal=False, pv=[60.0, 60.0])
    sdpa = torch.nn.functional.scaled_dot_product_attention(qn.float(), k.float().expand(-1, 2, -1, -1),
                                                            v.float().expand(-1, 2, -1, -1))
    assert torch.equal(torch.isnan(out), torch.isnan(sdpa))
    vn = v.clone()
    vn[0, 0, 150, 3] = float("inf")
    out, _ = _run(q, k, vn, full, cfg, causal=False, pv=[60.0, 60.0])
    assert not torch.isfinite(out[..., 3]).any()
    assert torch.isfinite(out[..., :3]).all()


@pytest.mark.parametrize("pv_check", A.PV_CHECKS)
def test_int8_variants_match_the_quantized_reference(device, pv_check):
    from sparge_core import block_sparse_attn

    q, k, v = _skip_friendly(1, 2, 2, 300, 300, 96, device, seed=4)
    mask = random_block_mask(1, 2, 300, 300, 0.8, seed=4, device=device)
    pv = [2.0, 2.0]
    sim, st = block_sparse_attn(q, k, v, mask, is_causal=True, pvthreshd=pv, quant="int8",
                                backend="reference", return_stats=True)
    for tile_loads in A.TILE_LOADS:
        out, counts = _run(q, k, v, mask, A.KernelConfig(4, 1, pv_check, tile_loads), causal=True, pv=pv,
                           quant="int8")
        assert torch.equal(counts.pv_skipped.cpu(), st.pv_skipped_blocks.cpu())
        rel = ((out.double() - sim.double()).abs().sum() / sim.double().abs().sum()).item()
        assert rel < 5e-3


def test_kernel_config_rejects_unknown_variants():
    with pytest.raises(ValueError, match="pv_check must be one of"):
        A.KernelConfig(4, 2, pv_check="hoist")
    with pytest.raises(ValueError, match="tile_loads must be one of"):
        A.KernelConfig(4, 2, tile_loads="tma")
    with pytest.raises(ValueError, match="num_warps"):
        A.KernelConfig(3, 2)
    with pytest.raises(ValueError, match="num_stages"):
        A.KernelConfig(4, 0)
    cfg = A.KernelConfig(8, 3, "prefetch", "descriptor")
    assert cfg.name == "w8s3-prefetch-descriptor" and A.KernelConfig.from_name(cfg.name) == cfg
    with pytest.raises(ValueError, match="looks like 'w8s2-select-pointer'"):
        A.KernelConfig.from_name("fast")
    with pytest.raises(ValueError, match="pv_check must be one of"):
        A.KernelConfig.from_name("w8s2-hoist-pointer")


def test_descriptor_loads_refuse_misaligned_layouts(device):
    # head dim 60 in fp16: a 120-byte row stride is not 16-byte aligned, so no tensor descriptor
    q, k, v = rand_qkv(1, 2, 1, 100, 100, 60, device=device, seed=1)
    mask = torch.ones(1, 2, 1, 2, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="tile_loads='pointer'"):
        _run(q, k, v, mask, A.KernelConfig(4, 1, "select", "descriptor"), causal=False)
    assert not A.descriptor_ready(k) and A.descriptor_ready(rand_qkv(1, 1, 1, 8, 8, 64, seed=0)[0])


def test_the_shipped_descriptor_choice_falls_back_to_pointer_loads_on_a_misaligned_layout(monkeypatch, device):
    # the shipped config of a head dim may ask for descriptors; a layout they cannot read runs with
    # pointer loads and gives the same output as an explicit pointer config (an explicit descriptor
    # config still refuses: test above)
    q, k, v = rand_qkv(1, 2, 1, 300, 300, 60, device=device, seed=4)
    mask = random_block_mask(1, 2, 300, 300, 0.6, seed=4, device=device)
    monkeypatch.setattr(A, "default_kernel_config", lambda *a, **kw: A.KernelConfig(4, 1, "select", "descriptor"))
    out, _ = _run(q, k, v, mask, None, causal=True, pv=[30.0, 30.0])
    want, _ = _run(q, k, v, mask, A.KernelConfig(4, 1, "select", "pointer"), causal=True, pv=[30.0, 30.0])
    assert not A.descriptor_ready(k) and torch.isfinite(out).all()
    assert torch.equal(out, want)


def test_default_kernel_configs_cover_every_quantized_variant():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for d, quant, stage2 in itertools.product((64, 128), ("int8", "int8-fp8"), (False, True)):
        cfg = A.default_kernel_config(d, cuda, quant, stage2)
        assert isinstance(cfg, A.KernelConfig) and cfg.name == A._QUANT_CONFIGS[(d > 64, quant, stage2)]
    assert A.default_kernel_config(128, cpu, "int8", True) == A.KernelConfig(4, 1)
    assert A.default_kernel_config(128, cuda, "none", True) == A.default_kernel_config(128, cuda, "none", False)
