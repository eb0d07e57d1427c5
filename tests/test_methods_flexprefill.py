"""``flexprefill`` method: hand-checked vertical-slash and query-aware masks, the Jensen-Shannon
decision, budgets, dense fallback for short inputs, full coverage = dense, batch > 1 equal to
per-sample runs, and parameter errors."""

import math

import pytest
import torch

from helpers import rand_qkv, rel_l1
from sparge_core import block_sparse_attn
from sparge_core.methods import _blockmaps as bm
from sparge_core.methods import get_method, method_names
from sparge_core.methods.flexprefill import FlexPrefill, js_distance
from sparge_core.ops import reference as R
from sparge_core.synthetic import structured_qkv


def rows128_to_mask(rows, nkb128):
    """Hand-written {query block: 128-key blocks} -> bool mask on the 128 x 64 grid."""
    mask = torch.zeros(len(rows), 2 * nkb128, dtype=torch.bool)
    for r, cols in enumerate(rows):
        for c in cols:
            mask[r, 2 * c : 2 * c + 2] = True
    return mask


def _direction(d, seed):
    u = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return u / u.norm()


def test_vertical_slash_hand_checked():
    """tau=0 forces vertical-slash. The last 128 queries look at key 400 (128-key block 3); their
    distances to it (496..623) fall mostly in slash group 4. Budget 2 blocks each: vertical {0 (sink,
    forced), 3}, slash groups {0 (diagonal, forced), 4}."""
    n, d = 1024, 32
    g = torch.Generator().manual_seed(31)
    u = _direction(d, 32)
    q = 5.0 * u + 0.1 * torch.randn(1, 1, n, d, generator=g)
    k = 0.1 * torch.randn(1, 1, n, d, generator=g)
    k[0, 0, 400] += 5.0 * u
    m = get_method("flexprefill", gamma=0.5, tau=0.0, min_budget=256)
    plan = m.plan(q, k, is_causal=True, scale=1.0)
    assert not plan.dense and not plan.query_aware.any()
    assert plan.vertical_blocks.item() == 2 and plan.slash_blocks.item() == 2
    want = rows128_to_mask([[0], [0, 1], [0, 2], [0, 3], [0, 3, 4], [0, 1, 3, 5], [0, 2, 3, 6], [0, 3, 7]], 8)
    assert torch.equal(plan.mask[0, 0], want)


def test_query_aware_hand_checked():
    """tau=1 forces query-aware (sqrt(JSD) <= sqrt(ln 2) < 1). Pooled K: block 2 has mean 6u, the others
    exactly 0; pooled Q = u in every block, scale 1. Pooled rows: r0 [1], r1 [.5, .5], r2 [.0025, .0025,
    .9951], r3 [.0025 x3, .9926]. Flattened and sorted, cumulative <= gamma * 4 = 3.2 keeps (0,0),
    (2,2), (3,2). Plus the minimum vertical-slash budget (1 block each: the sink and the diagonal)."""
    n, d = 512, 32
    g = torch.Generator().manual_seed(41)
    u = _direction(d, 42)
    k = torch.randn(1, 1, n, d, generator=g)
    k = k - R.block_mean_pool(k, 128).repeat_interleave(128, dim=2)
    k[0, 0, 256:384] += 6.0 * u
    q = torch.randn(1, 1, n, d, generator=g)
    q = q - R.block_mean_pool(q, 128).repeat_interleave(128, dim=2) + u
    m = get_method("flexprefill", gamma=0.8, tau=1.0, min_budget=None)
    plan = m.plan(q, k, is_causal=True, scale=1.0)
    assert plan.query_aware.all()
    assert plan.vertical_blocks.item() == 1 and plan.slash_blocks.item() == 1
    want = rows128_to_mask([[0], [0, 1], [0, 2], [0, 2, 3]], 4)
    assert torch.equal(plan.mask[0, 0], want)
    # gamma * 4 = 3.996 also takes (1, 0), (1, 1), (2, 0), (2, 1) [cumulative 3.9926], (3, 0) [3.9951],
    # not (3, 1) [3.9975]; of these only (2, 1) is new
    plan9 = get_method("flexprefill", gamma=0.999, tau=1.0, min_budget=None).plan(
        q, k, is_causal=True, scale=1.0
    )
    assert torch.equal(plan9.mask[0, 0], rows128_to_mask([[0], [0, 1], [0, 1, 2], [0, 2, 3]], 4))


def test_js_distance_values():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    q = torch.tensor([[0.5, 0.5], [0.0, 1.0], [0.75, 0.25]])
    got = js_distance(p, q)
    assert got[0].item() == pytest.approx(0.0, abs=1e-7)
    assert got[1].item() == pytest.approx(math.sqrt(math.log(2)), rel=1e-6)  # disjoint supports
    m = [0.5, 0.5]
    want = math.sqrt(
        0.5 * sum(a * math.log(a / b) for a, b in zip([0.25, 0.75], m))
        + 0.5 * sum(a * math.log(a / b) for a, b in zip([0.75, 0.25], m))
    )
    assert got[2].item() == pytest.approx(want, rel=1e-6)


def test_decision_follows_tau():
    q, k, _ = structured_qkv(1, 4, 2, 1024, 32, dtype=torch.float32, seed=2)
    base = FlexPrefill(min_budget=None).plan(q, k, is_causal=True)
    dist = base.js_distance
    assert torch.isfinite(dist).all() and (dist >= 0).all()
    tau = float(dist.median())
    plan = FlexPrefill(tau=tau, min_budget=None).plan(q, k, is_causal=True)
    assert torch.equal(plan.query_aware, dist < tau)
    assert plan.query_aware.any() and not plan.query_aware.all()


def test_budget_clamps():
    q, k, _ = structured_qkv(1, 2, 1, 2048, 32, dtype=torch.float32, seed=3)
    plan = FlexPrefill(gamma=0.99, tau=0.0, min_budget=512, max_budget=768).plan(q, k, is_causal=True)
    assert (plan.vertical_blocks >= 4).all() and (plan.vertical_blocks <= 6).all()
    assert (plan.slash_blocks >= 4).all() and (plan.slash_blocks <= 6).all()
    small = FlexPrefill(gamma=0.0, tau=0.0, min_budget=None).plan(q, k, is_causal=True)
    assert (small.vertical_blocks == 1).all() and (small.slash_blocks == 1).all()


def test_sink_and_diagonal_always_kept():
    q, k, _ = rand_qkv(2, 4, 2, 1100, 1100, 32, dtype=torch.float32, seed=6)
    for tau in (0.0, 1.0):
        mask = FlexPrefill(gamma=0.0, tau=tau, min_budget=None).block_mask(q, k, is_causal=True)
        assert mask[..., 0].all(), "sink key block"
        diag = R.causal_diagonal_block_mask(1100, 1100, R.BLOCK_Q, R.BLOCK_K)
        assert (mask | ~diag).all(), "diagonal blocks"
        assert bm.mask_density(mask, 1100, 1100, True) < 0.5


def test_density_grows_with_gamma():
    q, k, _ = structured_qkv(1, 4, 2, 2048, 32, dtype=torch.float32, seed=5)
    densities = [
        bm.mask_density(
            FlexPrefill(gamma=gm, min_budget=None).block_mask(q, k, is_causal=True), 2048, 2048, True
        )
        for gm in (0.0, 0.5, 0.9, 0.99)
    ]
    assert densities == sorted(densities) and densities[-1] > densities[0]


@pytest.mark.parametrize(
    "n,min_budget,dense", [(256, None, True), (257, None, False), (1024, 1024, True), (1025, 1024, False)]
)
def test_dense_for_short_inputs(n, min_budget, dense):
    q, k, _ = rand_qkv(1, 2, 1, n, n, 16, dtype=torch.float32, seed=n)
    plan = FlexPrefill(gamma=0.0, min_budget=min_budget).plan(q, k, is_causal=True)
    assert plan.dense == dense
    if dense:
        assert torch.equal(plan.mask, bm.full_mask(q, k, True)) and plan.js_distance.isnan().all()
    else:
        assert torch.isfinite(plan.js_distance).all()


def test_full_coverage_gives_dense_output():
    q, k, v = rand_qkv(1, 2, 1, 640, 640, 32, dtype=torch.float32, seed=7)
    m = get_method("flexprefill", gamma=1.0)
    assert torch.equal(m.block_mask(q, k, is_causal=True), bm.full_mask(q, k, True))
    out = m(q, k, v, is_causal=True, backend="reference")
    assert rel_l1(out, R.dense_attention(q, k, v, is_causal=True, scale=32**-0.5)) < 1e-5


def test_sparse_mask_runs_on_triton(device):
    q, k, v = structured_qkv(1, 2, 1, 640, 32, dtype=torch.float16, device=device, seed=8)
    m = FlexPrefill(gamma=0.5, min_budget=None)
    mask = m.block_mask(q, k, is_causal=True)
    assert bm.mask_density(mask, 640, 640, True) < 0.9
    out = block_sparse_attn(q, k, v, mask, is_causal=True, backend="triton")
    ref = block_sparse_attn(q, k, v, mask, is_causal=True, backend="reference")  # float32 math
    assert torch.isfinite(out).all() and rel_l1(out, ref) < 2e-3  # fp16 P.V in the kernel


@pytest.mark.parametrize("tau", [0.0, 0.12, 1.0])
def test_batch_matches_per_sample(tau):
    q, k, _ = structured_qkv(3, 4, 2, 1000, 32, dtype=torch.float32, seed=9)
    q = q + 0.5 * torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    m = FlexPrefill(gamma=0.9, tau=tau, min_budget=None)
    batched = m.plan(q, k, is_causal=True)
    for b in range(3):
        single = m.plan(q[b : b + 1], k[b : b + 1], is_causal=True)
        assert torch.equal(batched.mask[b : b + 1], single.mask)
        assert torch.equal(batched.query_aware[b : b + 1], single.query_aware)


def test_gqa_equals_repeated_kv():
    q, k, _ = structured_qkv(1, 4, 2, 900, 32, dtype=torch.float32, seed=10)
    m = FlexPrefill(gamma=0.9, min_budget=None)
    assert torch.equal(
        m.block_mask(q, k, is_causal=True), m.block_mask(q, k.repeat_interleave(2, dim=1), is_causal=True)
    )


def test_non_causal_and_chunked_prefill_are_well_formed():
    q, k, _ = rand_qkv(1, 2, 1, 400, 900, 32, dtype=torch.float32, seed=11)
    for causal in (True, False):
        mask = FlexPrefill(gamma=0.5, min_budget=None).block_mask(q, k, is_causal=causal)
        allowed = R.allowed_block_mask(400, 900, causal)
        assert not (mask & ~allowed).any()
        assert mask.any(-1).all(), "every query block keeps some key block"


def test_registered_and_unknown_names_list_known():
    assert "flexprefill" in method_names()
    with pytest.raises(ValueError, match="unknown attention method.*known: .*'flexprefill'"):
        get_method("flex-prefill")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(gamma=1.5), ValueError, "gamma must be a finite number in \\[0.0, 1.0\\]"),
        (dict(gamma="0.9"), TypeError, "gamma must be a number"),
        (dict(tau=-0.1), ValueError, "tau must be"),
        (dict(tau=float("inf")), ValueError, "tau"),
        (dict(min_budget=0), ValueError, "min_budget must be >= 1"),
        (dict(min_budget=1.5), TypeError, "min_budget must be an int"),
        (dict(max_budget=-3), ValueError, "max_budget"),
        (dict(block_size=64), ValueError, "block_size must be 128"),
        (dict(block_size="128"), TypeError, "block_size must be an int"),
        (dict(gama=0.9), TypeError, "gama"),
    ],
)
def test_bad_parameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        get_method("flexprefill", **kwargs)
