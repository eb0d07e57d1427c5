"""Contract 1: the Triton predictor against the float64 reference."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import rand_qkv
from sparge_core import block_sparse_attn, predict_block_mask, sparge_attn
from sparge_core.ops import predict as P
from sparge_core.ops import reference as R
from sparge_core.synthetic import structured_qkv

CASES = [
    # b, hq, hkv, nq, nk, d, causal
    pytest.param(1, 2, 2, 1000, 1000, 64, False, id="B1-H2-N1000-D64"),
    pytest.param(2, 4, 2, 300, 300, 128, True, id="B2-H4g2-N300-D128-causal"),
    pytest.param(1, 3, 1, 63, 200, 96, True, id="B1-H3g3-Nq63-Nk200-D96-causal"),
    pytest.param(1, 2, 1, 1, 129, 64, False, id="B1-H2g2-Nq1-Nk129-D64"),
]


@pytest.mark.parametrize("smooth,block", [(False, 128), (True, 64)])
@pytest.mark.parametrize("n,d", [(1000, 64), (63, 96), (1, 128)])
def test_pool_and_similarity_match_reference(device, smooth, block, n, d):
    x = torch.randn(2, 3, n, d, generator=torch.Generator().manual_seed(n + d)).to(device, torch.float16)
    got, _, _ = P.pool_and_similarity(x, block, smooth=smooth)
    ref = R.pool_and_similarity(x, block, smooth=smooth)
    torch.testing.assert_close(got.pooled.double(), ref.pooled.to(device), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.sim.double(), ref.sim.to(device), atol=2e-5, rtol=1e-4)


def test_fused_quantization_matches_reference(device):
    x = torch.randn(1, 2, 200, 96, generator=torch.Generator().manual_seed(5)).to(device, torch.float16)
    _, xq, xs = P.pool_and_similarity(x, 64, smooth=True, quant_multiplier=0.7)
    ref_q, ref_s = R.quantize_per_block(R.smooth_k(x.float()), 64, multiplier=0.7)
    assert xq.shape == (1, 2, 200, 128) and (xq[..., 96:] == 0).all()
    torch.testing.assert_close(xs, ref_s.to(device), rtol=1e-5, atol=1e-7)
    # codes may differ by one where x / scale sits on a rounding boundary (float32 vs float32 ops order)
    diff = (xq[..., :96].int() - ref_q.to(device).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def _stable_reference_rows(q, k, causal, scale, theta, tau=None, topk=None, delta=1e-4, estimator="pooled",
                           window=None, local_blocks=0):
    """The float64 reference mask, and which block rows keep the same mask when the thresholds move
    by +-delta (rows whose selection sits on a float32 rounding tie are excluded from equality)."""
    def run(dt, dc):
        if tau is not None:
            cdf = tau + dc if isinstance(tau, torch.Tensor) else torch.full_like(theta, tau + dc)
            kw = dict(cdfthreshd=cdf)
        else:
            kw = dict(topk=topk)
        return R.predict_block_mask(q, k, is_causal=causal, scale=scale, simthreshd1=theta + dt, estimator=estimator,
                                    window=window, local_blocks=local_blocks, **kw)
    base = run(0.0, 0.0)
    stable = torch.ones(base.shape[:-1], dtype=torch.bool, device=base.device)
    for dt, dc in [(delta, 0), (-delta, 0), (0, delta), (0, -delta)]:
        if tau is None and dc:
            continue
        stable &= (run(dt, dc) == base).all(dim=-1)
    return base, stable


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "gaussian"])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal", CASES)
def test_triton_mask_equals_reference(device, structured, b, hq, hkv, nq, nk, d, causal):
    if structured:
        q, k, _ = structured_qkv(b, hq, hkv, nq, d, nk=nk, dtype=torch.float16, device=device, seed=nq + d)
    else:
        q, k, _ = rand_qkv(b, hq, hkv, nq, nk, d, device=device, seed=nq + d)
    scale = d ** -0.5
    theta = torch.linspace(-0.2, 0.5, hq, device=device)
    for tau in (0.5, 0.9):
        got = predict_block_mask(q, k, is_causal=causal, simthreshd1=theta, cdfthreshd=tau, backend="triton")
        ref, stable = _stable_reference_rows(q, k, causal, scale, theta, tau=tau)
        assert stable.float().mean() > 0.8
        assert torch.equal(got[stable], ref[stable])
    top = torch.full((hq,), 0.3, device=device)
    got = predict_block_mask(q, k, is_causal=causal, simthreshd1=theta, topk=top, cdfthreshd=None, backend="triton")
    ref, stable = _stable_reference_rows(q, k, causal, scale, theta, topk=top)
    assert torch.equal(got[stable], ref[stable])


def test_api_reference_backend_matches_float64(device):
    q, k, _ = structured_qkv(1, 4, 2, 700, 64, dtype=torch.float32, device=device, seed=1)
    got = predict_block_mask(q, k, is_causal=True, simthreshd1=0.3, cdfthreshd=0.8, backend="reference")
    ref, stable = _stable_reference_rows(q, k, True, 64 ** -0.5, torch.full((4,), 0.3, device=device), tau=0.8)
    assert torch.equal(got[stable], ref[stable])


# ----------------------------------------------------------------------------------------------
# the "keys" estimator: the pooled query against every key, log-sum-exp per key block
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hq,hkv,n,d", [(4, 2, 700, 64), (3, 1, 129, 128), (2, 2, 65, 64)])
def test_key_resolved_scores_equal_a_direct_sum_per_block(hq, hkv, n, d):
    g = torch.Generator().manual_seed(n + d)
    pooled_q = torch.randn(2, hq, 3, d, generator=g, dtype=torch.float64)
    k = torch.randn(2, hkv, n, d, generator=g, dtype=torch.float64)
    scale = d ** -0.5
    got = R.key_resolved_scores(pooled_q, k, scale=scale, max_elements=1000)  # forces several row chunks
    keys = k.repeat_interleave(hq // hkv, dim=1)
    for kb in range(R.num_blocks(n, 64)):
        block = keys[:, :, kb * 64:(kb + 1) * 64]  # a partial last block has only its real keys
        mass = torch.exp(pooled_q @ block.transpose(-1, -2) * scale).sum(-1)
        torch.testing.assert_close(got[..., kb], torch.log(mass) / scale)


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal", CASES[:3])
def test_triton_mask_with_keys_estimator_equals_reference(device, b, hq, hkv, nq, nk, d, causal):
    q, k, _ = structured_qkv(b, hq, hkv, nq, d, nk=nk, dtype=torch.float16, device=device, seed=nq + d + 1)
    theta = torch.linspace(-0.2, 0.5, hq, device=device)
    for tau in (0.5, 0.9):
        got = predict_block_mask(q, k, is_causal=causal, simthreshd1=theta, cdfthreshd=tau, backend="triton",
                                 estimator="keys")
        ref, stable = _stable_reference_rows(q, k, causal, d ** -0.5, theta, tau=tau, estimator="keys")
        assert stable.float().mean() > 0.8
        assert torch.equal(got[stable], ref[stable])


def test_keys_estimator_keeps_a_block_whose_single_key_dominates(device):
    """One key that every query attends to strongly, inside an otherwise unremarkable block: mean
    pooling dilutes it 64x and the pooled predictor drops the block; the keys estimator keeps it."""
    g = torch.Generator().manual_seed(3)
    n, d, sink_block = 1024, 64, 9
    q = torch.randn(1, 1, n, d, generator=g)
    k = torch.randn(1, 1, n, d, generator=g) * 0.5
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    q += 2.0 * direction  # every query leans towards one direction ...
    k[0, 0, sink_block * 64:(sink_block + 1) * 64] -= direction  # the block's other keys lean away,
    k[0, 0, sink_block * 64 + 17] = 30.0 * direction  # ... but one key has it strongly
    q, k = q.to(device, torch.float16), k.to(device, torch.float16)
    kw = dict(is_causal=False, simthreshd1=-1.0, cdfthreshd=0.9, backend="reference")
    pooled = predict_block_mask(q, k, estimator="pooled", **kw)
    keys = predict_block_mask(q, k, estimator="keys", **kw)
    true_mass = torch.softmax(q.float() @ k.float().transpose(-1, -2) * d ** -0.5, dim=-1)
    share = true_mass[0, 0].reshape(n, n // 64, 64).sum(-1).mean(0)[sink_block]
    assert share > 0.3  # the block really matters
    assert not pooled[0, 0, :, sink_block].any()
    assert keys[0, 0, :, sink_block].all()


def test_unknown_estimator_is_an_error_naming_it():
    q, k, _ = rand_qkv(1, 2, 2, 64, 64, 64, device="cpu", seed=0)
    with pytest.raises(ValueError, match="estimator must be one of"):
        predict_block_mask(q, k, estimator="max")


# ----------------------------------------------------------------------------------------------
# the three-launch predictor: every path against the reference
# ----------------------------------------------------------------------------------------------
FUSED_CASES = [
    # b, hq, hkv, nq, nk, d, causal, window
    pytest.param(1, 4, 1, 700, 700, 64, True, None, id="g4-N700-D64-causal-two-row-tiles"),
    pytest.param(2, 2, 2, 333, 333, 128, False, None, id="B2-N333-D128"),
    pytest.param(1, 4, 2, 900, 900, 64, True, 200, id="GQA-N900-W200"),
    pytest.param(1, 2, 1, 129, 517, 128, True, 300, id="Nq129-Nk517-D128-W300"),
    pytest.param(1, 3, 3, 65, 1000, 64, False, None, id="Nq65-Nk1000"),
]


@pytest.mark.parametrize("estimator", ["pooled", "keys"])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,window", FUSED_CASES)
def test_fused_predictor_equals_reference_per_head(device, estimator, b, hq, hkv, nq, nk, d, causal, window):
    q, k, _ = structured_qkv(b, hq, hkv, nq, d, nk=nk, dtype=torch.float16, device=device, seed=nq + nk + d)
    scale = d ** -0.5
    theta = torch.linspace(-0.3, 0.6, hq, device=device)
    taus = torch.linspace(0.5, 0.95, hq, device=device, dtype=torch.float64)
    tops = torch.linspace(0.1, 0.6, hq, device=device, dtype=torch.float64)
    for mode, budget in (("cdf", taus), ("topk", tops)):
        kw = dict(cdfthreshd=budget) if mode == "cdf" else dict(topk=budget)
        got = P.predict_block_mask(q, k, is_causal=causal, scale=scale, simthreshd1=theta,
                                   estimator=estimator, window=window, **kw)
        ref, stable = _stable_reference_rows(q, k, causal, scale, theta,
                                             tau=budget if mode == "cdf" else None,
                                             topk=budget if mode == "topk" else None, estimator=estimator,
                                             window=window)
        assert stable.float().mean() > 0.8
        assert torch.equal(got[stable], ref[stable]), (mode, (got != ref).sum().item())


def test_fused_predictor_row_tiles_do_not_change_the_map(device, monkeypatch):
    q, k, _ = structured_qkv(1, 6, 2, 520, 64, dtype=torch.float16, device=device, seed=8)
    kw = dict(is_causal=True, scale=0.125, simthreshd1=torch.full((6,), 0.2, device=device),
              topk=torch.full((6,), 0.4, device=device, dtype=torch.float64))
    masks = [P.predict_block_mask(q, k, rows_per_program=r, **kw) for r in (16, 32, 64)]
    for elements in (16, 64):  # selection sub-tiles of 1 and 4 rows
        monkeypatch.setattr(P, "SELECT_ELEMENTS", elements)
        masks.append(P.predict_block_mask(q, k, rows_per_program=16, **kw))
    assert all(torch.equal(masks[0], m) for m in masks[1:])


@pytest.mark.parametrize("causal", [False, True])
def test_ties_go_to_the_lower_block_index_exactly(device, causal):
    """Every key block a copy of one block, small-integer entries (so every sum, mean and dot product is
    exact in float32 and float64): all scores tie, and the kept blocks must be exactly the first ones
    (the reference's stable sort), n_keep of them in top-k mode."""
    g = torch.Generator().manual_seed(1)
    n, d, h = 1024, 64, 2
    q = torch.randint(-2, 3, (1, h, n, d), generator=g).float()
    block = torch.randint(-2, 3, (1, 1, 64, d), generator=g).float()
    k = block.repeat(1, 1, n // 64, 1)
    q, k = q.to(device, torch.float16), k.to(device, torch.float16)
    theta = torch.full((h,), -1.0, device=device)
    nkb = n // 64
    for kw in (dict(topk=torch.tensor([0.3, 0.55], device=device, dtype=torch.float64)),
               dict(cdfthreshd=torch.tensor([0.33, 0.71], device=device, dtype=torch.float64))):
        got = P.predict_block_mask(q, k, is_causal=causal, scale=d ** -0.5, simthreshd1=theta, **kw)
        ref = R.predict_block_mask(q, k, is_causal=causal, scale=d ** -0.5, simthreshd1=theta, **kw)
        assert torch.equal(got.cpu(), ref.cpu())
        if not causal:
            want = [int(0.3 * nkb), int(0.55 * nkb)] if "topk" in kw else [5, 11]
            for head, count in enumerate(want):
                assert got[0, head].sum(-1).eq(count).all() and got[0, head, :, :count].all()


def test_topk_count_uses_the_exact_fraction(device):
    """topk=0.7 of 10 key blocks keeps 7 (a float32 budget would give floor(6.99999988) = 6)."""
    q, k, _ = rand_qkv(1, 1, 1, 128, 640, 64, device=device, seed=2)
    for backend in ("triton", "reference"):
        mask = predict_block_mask(q, k, simthreshd1=-1.0, topk=0.7, cdfthreshd=None, backend=backend)
        assert mask.sum().item() == 7, backend


@pytest.mark.parametrize("where", ["key", "query"])
def test_non_finite_inputs_propagate_as_in_dense_attention(device, where):
    from sparge_core import sparge_attn

    q, k, v = structured_qkv(1, 2, 1, 600, 64, dtype=torch.float16, device=device, seed=4)
    if where == "key":
        k[0, 0, 333] = float("nan")
    else:
        q[0, 1, 257] = float("inf")
    for backend in ("triton", "reference"):
        # (stage 2 off: it may skip a block whose maximum is NaN, an executor matter, not the predictor's)
        out = sparge_attn(q, k, v, is_causal=True, simthreshd1=0.3, cdfthreshd=0.9, pvthreshd=None,
                          backend=backend)
        dense = R.dense_attention(q, k, v, is_causal=True, scale=0.125, dtype=torch.float32)
        assert torch.equal(out.isnan().any(-1).cpu(), dense.isnan().any(-1).cpu()), backend
        assert dense.isnan().any()


def test_predictor_is_three_launches_and_allocations_only(device, monkeypatch):
    """No torch computation besides allocating outputs: everything happens in three Triton launches
    (ops inside a launch are the interpreter's copies to and from the host and are not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    launches = []
    inside = [False]
    for name in ("_q_stats_k_sums_kernel", "_block_stats_kernel", "_score_select_kernel"):
        kernel = getattr(P, name)

        class Counted:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launches.append(self.name)

                def launch(*args, **kwargs):
                    inside[0] = True
                    try:
                        return self.kernel[grid](*args, **kwargs)
                    finally:
                        inside[0] = False

                return launch

        monkeypatch.setattr(P, name, Counted(kernel, name))

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0]:
                self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    q, k, _ = rand_qkv(1, 4, 2, 300, 300, 64, device=device, seed=0)
    theta = torch.zeros(4, device=device)
    budget = torch.full((4,), 0.5, device=device, dtype=torch.float64)
    for estimator in ("pooled", "keys"):
        launches.clear()
        with Ops() as mode:
            P.predict_and_prepare(q, k, is_causal=True, scale=0.125, simthreshd1=theta, topk=budget,
                                  estimator=estimator, quant_multiplier=0.18)
        assert launches == ["_q_stats_k_sums_kernel", "_block_stats_kernel", "_score_select_kernel"]
        assert set(mode.ops) <= {"aten.empty", "aten.empty_like", "aten.view", "aten.detach"}, mode.ops


# ----------------------------------------------------------------------------------------------
# local_blocks: key blocks forced just before each query block's causal diagonal
# ----------------------------------------------------------------------------------------------
#: (b, hq, hkv, nq, nk, d, causal, window, mode, estimator) of the maps in
#: fixtures/predictor_maps_before_local_blocks.json, written by the code before local_blocks existed
LEGACY_CASES = {
    "causal-g4-N700-D64-cdf-pooled": (1, 4, 1, 700, 700, 64, True, None, "cdf", "pooled"),
    "causal-g2-N900-D64-W200-topk-keys": (1, 4, 2, 900, 900, 64, True, 200, "topk", "keys"),
    "causal-Nq129-Nk517-D128-cdf-keys": (1, 2, 1, 129, 517, 128, True, None, "cdf", "keys"),
    "noncausal-N333-D128-topk-pooled": (2, 2, 2, 333, 333, 128, False, None, "topk", "pooled"),
}
LEGACY_FIXTURE = Path(__file__).parent / "fixtures" / "predictor_maps_before_local_blocks.json"


def _legacy_case_mask(name: str, backend: str, **extra) -> torch.Tensor:
    b, hq, hkv, nq, nk, d, causal, window, mode, estimator = LEGACY_CASES[name]
    q, k, _ = structured_qkv(b, hq, hkv, nq, d, nk=nk, dtype=torch.float16, seed=nq + nk + d + 7)
    theta = torch.linspace(-0.3, 0.6, hq)
    budget = (torch.linspace(0.5, 0.95, hq, dtype=torch.float64) if mode == "cdf"
              else torch.linspace(0.1, 0.5, hq, dtype=torch.float64))
    kw = dict(cdfthreshd=budget) if mode == "cdf" else dict(topk=budget)
    fn = R.predict_block_mask if backend == "reference" else P.predict_block_mask
    return fn(q, k, is_causal=causal, scale=d ** -0.5, simthreshd1=theta, estimator=estimator, window=window,
              **kw, **extra)


@pytest.mark.parametrize("name", list(LEGACY_CASES))
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_local_blocks_zero_is_the_old_map_bit_for_bit(name, backend):
    """local_blocks=0 (given or left out) reproduces the maps the predictor made before the option
    existed (the fixture was written by that code, on CPU: the Triton maps by its interpreter)."""
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("the fixture's Triton maps are the CPU interpreter's (compiled float32 may differ at ties)")
    want = json.loads(LEGACY_FIXTURE.read_text())["cases"][f"{name}/{backend}"]
    for extra in ({}, {"local_blocks": 0}):
        got = _legacy_case_mask(name, backend, **extra)
        assert list(got.shape) == want["shape"]
        bits = np.packbits(got.cpu().numpy().reshape(-1)).tobytes().hex()
        assert bits == want["bits"], (name, backend, extra)
    if LEGACY_CASES[name][6]:  # causal: the option does change the map (the comparison can fail)
        assert not torch.equal(_legacy_case_mask(name, backend, local_blocks=1), got)


LOCAL_CASES = [
    # b, hq, hkv, nq, nk, d, causal, window, dtype
    pytest.param(1, 4, 2, 700, 700, 64, None, torch.float16, id="GQA-N700-D64-fp16"),
    pytest.param(1, 2, 1, 333, 333, 128, None, torch.float32, id="g2-N333-D128-fp32"),
    pytest.param(2, 3, 3, 200, 650, 64, None, torch.float16, id="B2-Nq200-Nk650-D64-fp16"),
    pytest.param(1, 2, 2, 129, 517, 128, 300, torch.float32, id="Nq129-Nk517-D128-W300-fp32"),
    pytest.param(1, 4, 1, 900, 900, 64, 200, torch.float16, id="g4-N900-W200-fp16"),
]


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,window,dtype", LOCAL_CASES)
def test_triton_local_blocks_equal_the_reference(device, b, hq, hkv, nq, nk, d, window, dtype):
    g = torch.Generator().manual_seed(nq * 7 + nk + d)
    seed = int(torch.randint(0, 10_000, (1,), generator=g))
    q, k, _ = structured_qkv(b, hq, hkv, nq, d, nk=nk, dtype=dtype, device=device, seed=seed)
    scale = d ** -0.5
    theta = torch.linspace(-0.3, 0.6, hq, device=device)
    taus = torch.linspace(0.4, 0.9, hq, device=device, dtype=torch.float64)
    tops = torch.linspace(0.05, 0.4, hq, device=device, dtype=torch.float64)
    maps = {}
    for local in (0, 1, 2):
        for mode, budget in (("cdf", taus), ("topk", tops)):
            estimator = "keys" if local == 1 else "pooled"
            kw = dict(cdfthreshd=budget) if mode == "cdf" else dict(topk=budget)
            got = P.predict_block_mask(q, k, is_causal=True, scale=scale, simthreshd1=theta, estimator=estimator,
                                       window=window, local_blocks=local, **kw)
            ref, stable = _stable_reference_rows(q, k, True, scale, theta, tau=budget if mode == "cdf" else None,
                                                 topk=budget if mode == "topk" else None, estimator=estimator,
                                                 window=window, local_blocks=local)
            assert stable.float().mean() > 0.8
            assert torch.equal(got[stable], ref[stable]), (local, mode, (got != ref).sum().item())
            maps[local, mode] = got
    for mode in ("cdf", "topk"):  # more local blocks keep a superset, and really more
        if estimator == "pooled":
            assert (maps[2, mode] | ~maps[0, mode]).all()
            assert maps[2, mode].sum() > maps[0, mode].sum()


@pytest.mark.parametrize("nq,nk,window", [(1000, 1000, None), (200, 600, None), (777, 777, 150), (300, 1000, 400)])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_local_blocks_are_kept_and_never_outside_the_causal_mask(device, backend, nq, nk, window):
    """At the smallest budget (top-k keeps one block; every block self-similar, so no fix rows or
    columns) the map is the forced set plus one block a row: the local blocks must all be there,
    exactly where ``lo - local_blocks .. lo - 1`` says (lo: the first diagonal key block), and no kept
    block may lie outside the causal (and window) block mask."""
    q, k, _ = rand_qkv(1, 2, 1, nq, nk, 64, device=device, seed=nq + nk)
    allowed = R.causal_block_mask(nq, nk, R.BLOCK_Q, R.BLOCK_K, device=device, window=window)
    offset = nk - nq
    for local in (1, 2, 3):
        mask = predict_block_mask(q, k, is_causal=True, simthreshd1=-1.0, topk=1e-6, cdfthreshd=None,
                                  backend=backend, window=window, local_blocks=local)
        assert not (mask & ~allowed).any(), "a kept block outside the causal/window mask"
        for i in range(R.num_blocks(nq, R.BLOCK_Q)):
            lo = max(i * R.BLOCK_Q + offset, 0) // R.BLOCK_K
            for j in range(lo - local, lo):
                if j >= 0:
                    assert bool(mask[0, 0, i, j]) == bool(allowed[i, j]), (local, i, j)
            assert mask[0, :, i].sum(-1).max() <= 1 + local + 3 + 1  # sink, local, <= 3 diagonal, top 1
        forced = R.causal_forced_block_mask(nq, nk, R.BLOCK_Q, R.BLOCK_K, local_blocks=local, device=device,
                                            window=window)
        assert (mask | ~forced).all()


def test_local_blocks_bad_values_and_non_causal_are_errors():
    q, k, v = rand_qkv(1, 2, 2, 300, 300, 64, seed=11)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="local_blocks must be an integer >= 0"):
            predict_block_mask(q, k, is_causal=True, local_blocks=bad)
    for fn in (lambda **kw: predict_block_mask(q, k, **kw), lambda **kw: sparge_attn(q, k, v, **kw)):
        with pytest.raises(ValueError, match="needs is_causal=True"):
            fn(is_causal=False, local_blocks=1)
        fn(is_causal=False, local_blocks=0)  # fine: nothing is forced without causal masking
    with pytest.raises(ValueError, match="causal-attention rule"):
        R.predict_block_mask(q, k, is_causal=False, scale=0.125, simthreshd1=torch.zeros(2),
                             cdfthreshd=torch.full((2,), 0.9), local_blocks=1)


def test_local_blocks_through_sparge_attn_and_the_custom_op(device):
    """sparge_attn runs the map predict_block_mask gives with the same local_blocks (fused path), and
    the torch.ops custom ops (what torch.compile traces) take the argument too."""
    q, k, v = structured_qkv(1, 4, 2, 700, 64, dtype=torch.float16, device=device, seed=21)
    kw = dict(is_causal=True, simthreshd1=0.2, cdfthreshd=0.6, backend="triton")
    counts = {}
    for local in (0, 2):
        mask = predict_block_mask(q, k, local_blocks=local, **kw)
        out, st = sparge_attn(q, k, v, local_blocks=local, pvthreshd=None, return_stats=True, **kw)
        ref, st_ref = block_sparse_attn(q, k, v, mask, is_causal=True, backend="triton", return_stats=True)
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
        assert torch.equal(st.computed_blocks, st_ref.computed_blocks)
        counts[local] = int(st.computed_blocks.sum())
        op = torch.ops.sparge.predict_block_mask(q, k, is_causal=True, scale=0.125, simthreshd1=[0.2] * 4,
                                                 budget=[0.6] * 4, topk_mode=False, estimator="pooled", window=None,
                                                 backend="triton", local_blocks=local)
        assert torch.equal(op, mask)
        o2, *_ = torch.ops.sparge.sparge_attn(q, k, v, is_causal=True, scale=0.125, simthreshd1=[0.2] * 4,
                                              budget=[0.6] * 4, topk_mode=False, pvthreshd=None, quant="none",
                                              estimator="pooled", window=None, backend="triton", local_blocks=local)
        torch.testing.assert_close(o2, out, atol=0, rtol=0)
    assert counts[2] > counts[0]


@pytest.mark.gpu
@pytest.mark.parametrize("estimator", ["pooled", "keys"])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_predictor_bf16_gpu(estimator, causal):
    q, k, _ = structured_qkv(1, 8, 2, 8191, 128, dtype=torch.bfloat16, device="cuda", seed=3)
    theta = torch.linspace(-0.2, 0.5, 8, device="cuda")
    for kw in (dict(cdfthreshd=0.9), dict(topk=0.3, cdfthreshd=None)):
        got = predict_block_mask(q, k, is_causal=causal, simthreshd1=theta, backend="triton",
                                 estimator=estimator, **kw)
        budget = torch.full((8,), kw.get("topk") or kw["cdfthreshd"], device="cuda", dtype=torch.float64)
        ref, stable = _stable_reference_rows(q, k, causal, 128 ** -0.5, theta,
                                             tau=budget if "topk" not in kw else None,
                                             topk=budget if "topk" in kw else None, estimator=estimator)
        assert stable.float().mean() > 0.8
        # the keys estimator rounds the pooled query to bf16 for its dots with the keys (a 2^-8 relative
        # change of every score, far above the +-1e-4 threshold moves that define "stable"), so some
        # stable rows flip one block on a near-tie: 1.8% of them on an H200 (2026-12-02); pooled: none
        flipped = (got[stable] != ref[stable]).any(-1).float().mean()
        assert flipped < (0.03 if estimator == "keys" else 0.01)


# ----------------------------------------------------------------------------------------------
# the index lists written by the selection launch (predict_and_prepare) equal build_block_lut's
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,window,local,mode", [
    pytest.param(1, 2, 2, 1000, 1000, 64, False, None, 0, "cdf", id="N1000-D64"),
    pytest.param(2, 4, 2, 300, 300, 128, True, None, 0, "topk", id="B2-GQA-causal-D128"),
    pytest.param(1, 3, 1, 63, 700, 64, True, None, 2, "cdf", id="Nq63-Nk700-causal-local2"),
    pytest.param(1, 2, 1, 900, 900, 64, True, 200, 0, "cdf", id="causal-window200"),
    pytest.param(1, 2, 2, 517, 517, 128, True, 77, 1, "topk", id="causal-window77-local1"),
])
def test_the_selection_launch_writes_the_maps_index_lists(device, b, hq, hkv, nq, nk, d, causal, window, local, mode):
    from sparge_core.ops.attention import build_block_lut

    q, k, _ = rand_qkv(b, hq, hkv, nq, nk, d, device=device, seed=nq + nk + d)
    gen = torch.Generator().manual_seed(hq * 7 + nq)
    theta = torch.full((hq,), -1.0, device=device)  # random blocks are not self-similar: every block may go
    theta[0] = 0.5  # but one head keeps the rows and columns of its non-self-similar blocks
    budget = (torch.rand(hq, generator=gen) * 0.6 + 0.2).double().to(device)
    sel = dict(topk=budget) if mode == "topk" else dict(cdfthreshd=budget)
    mask, prepared = P.predict_and_prepare(q, k, is_causal=causal, scale=d ** -0.5, simthreshd1=theta,
                                           window=window, local_blocks=local, **sel)
    assert prepared.quantized is None
    assert torch.equal(mask, P.predict_block_mask(q, k, is_causal=causal, scale=d ** -0.5, simthreshd1=theta,
                                                  window=window, local_blocks=local, **sel))
    want = build_block_lut(mask, nq, nk, causal, window)
    got = prepared.lut
    assert torch.equal(got.count, want.count)
    assert torch.equal(got.n_low, want.n_low) and torch.equal(got.n_unmasked, want.n_unmasked)
    width = torch.arange(mask.shape[-1], device=mask.device) < want.count[..., None]
    assert torch.equal(got.indices[width], want.indices[width])
    assert 0 < int(want.count[:, 1:].sum()) < mask[:, 1:].numel()  # neither empty nor full: the test can tell


def test_a_sparge_call_with_the_predictors_index_lists_equals_one_from_the_mask(device):
    """sparge_attn hands the selection launch's index lists to the attention launch; the output equals
    block_sparse_attn on the same map (which builds its own lists)."""
    q, k, v = rand_qkv(1, 4, 2, 700, 700, 64, device=device, seed=3)
    kw = dict(is_causal=True, simthreshd1=-1.0, cdfthreshd=0.7, backend="triton")
    out, stats = sparge_attn(q, k, v, return_stats=True, **kw)
    mask = predict_block_mask(q, k, **kw)
    ref, ref_stats = block_sparse_attn(q, k, v, mask, is_causal=True, backend="triton", return_stats=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.equal(stats.computed_blocks, ref_stats.computed_blocks)
    assert 0.05 < stats.qk_sparsity < 0.95
