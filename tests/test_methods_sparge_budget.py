"""sparge-budget: a layer-wide (or per-head) block budget on sparge's block estimate."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import rand_qkv
from sparge_core.methods import _blockmaps as bm
from sparge_core.methods import get_method
from sparge_core.methods.density import budget_knob, match_density
from sparge_core.methods.sparge_budget import block_probabilities, budget_block_mask
from sparge_core.ops import reference as R


def _forced(n):
    f = R.causal_diagonal_block_mask(n, n, R.BLOCK_Q, R.BLOCK_K).clone()
    f[:, 0] = True
    return f & R.causal_block_mask(n, n, R.BLOCK_Q, R.BLOCK_K)


@pytest.mark.parametrize("n", [700, 1024])
@pytest.mark.parametrize("alloc", ["layer", "head"])
@pytest.mark.parametrize("estimator", ["keys", "pooled"])
def test_density_is_the_budget_and_forced_blocks_are_kept(n, alloc, estimator):
    q, k, _ = rand_qkv(2, 4, 2, n, n, 64, dtype=torch.float32, seed=n)
    allowed = R.causal_block_mask(n, n, R.BLOCK_Q, R.BLOCK_K)
    for density in (0.3, 0.6, 0.9):
        mask = get_method("sparge-budget", density=density, estimator=estimator, alloc=alloc).block_mask(
            q, k, is_causal=True
        )
        assert mask.shape == (2, 4, R.num_blocks(n, R.BLOCK_Q), R.num_blocks(n, R.BLOCK_K))
        assert not (mask & ~allowed).any()
        assert (mask | ~_forced(n)).all()  # sink column and diagonal always kept
        per_head = int(allowed.sum())
        if alloc == "head":
            assert (mask.sum(dim=(2, 3)) == max(round(density * per_head), int(_forced(n).sum()))).all()
        else:
            assert (
                mask.sum(dim=(1, 2, 3)) == max(round(density * per_head * 4), 4 * int(_forced(n).sum()))
            ).all()


def test_keeps_the_highest_probability_blocks_layer_wide():
    q, k, _ = rand_qkv(1, 4, 2, 1024, 1024, 64, dtype=torch.float32, seed=3, scale=2.0)
    scale = 1 / 8
    mask = budget_block_mask(q, k, is_causal=True, scale=scale, density=0.4, estimator="keys", alloc="layer")
    probs = block_probabilities(q, k, is_causal=True, scale=scale, estimator="keys")
    free = R.causal_block_mask(1024, 1024, R.BLOCK_Q, R.BLOCK_K) & ~_forced(1024)
    kept, dropped = probs[mask & free], probs[~mask & free]
    assert kept.numel() and dropped.numel() and kept.min() >= dropped.max()
    # layer-wide: heads get different shares of the budget when their estimates differ
    assert len(set(mask.sum(dim=(2, 3)).flatten().tolist())) > 1


def test_probabilities_match_the_reference_predictor_scores():
    q, k, _ = rand_qkv(1, 4, 2, 512, 512, 64, dtype=torch.float32, seed=5)
    scale = 1 / 8
    probs = block_probabilities(q, k, is_causal=True, scale=scale, estimator="keys")
    pq = R.block_mean_pool(q.double(), R.BLOCK_Q)
    s = R.key_resolved_scores(pq, k, scale=scale) * scale
    s = s.masked_fill(~R.causal_block_mask(512, 512, R.BLOCK_Q, R.BLOCK_K), -math.inf)
    torch.testing.assert_close(probs, torch.softmax(s, dim=-1).float(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 4, 4))


def test_layer_budget_moves_blocks_from_a_peaked_head_to_a_flat_one():
    """Two heads, one peaked on two key blocks, one nearly uniform: at the same layer density the layer
    budget gives the peaked head fewer blocks and the flat one more; the per-row top-k cannot."""
    g = torch.Generator().manual_seed(0)
    n, d = 1024, 64
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    k = torch.randn(1, 1, n, d, generator=g)
    k[:, :, 3 * 64 : 4 * 64] += 8 * u  # two key blocks that head 0 looks for
    k[:, :, 7 * 64 : 8 * 64] += 8 * u
    q = torch.empty(1, 2, n, d)
    q[:, 0] = 6 * u + 0.3 * torch.randn(n, d, generator=g)  # peaked on those blocks
    q[:, 1] = 0.05 * torch.randn(n, d, generator=g)  # nearly uniform
    budget = get_method("sparge-budget", density=0.5).block_mask(q, k, is_causal=True)
    assert bm.mask_density(budget, n, n, True) == pytest.approx(0.5, abs=0.01)
    assert budget[0, 0].sum() < budget[0, 1].sum()
    assert budget[0, 0, 4:, 3].all() and budget[0, 0, 4:, 7].all()  # the blocks head 0 needs
    per_head = get_method("sparge-budget", density=0.5, alloc="head").block_mask(q, k, is_causal=True)
    assert per_head[0, 0].sum() == per_head[0, 1].sum()


def test_knob_density_matching_and_limits():
    assert budget_knob("sparge-budget").name == "density"
    q, k, _ = rand_qkv(1, 4, 2, 900, 900, 64, dtype=torch.float32, seed=9)
    method, reached = match_density("sparge-budget", q, k, 0.45, True)
    assert abs(reached - 0.45) < 0.01
    full = get_method("sparge-budget", density=1.0).block_mask(q, k, is_causal=True)
    assert bm.mask_density(full, 900, 900, True) == 1.0
    tiny = get_method("sparge-budget", density=0.0).block_mask(q, k, is_causal=True)
    assert (tiny == _forced(900)).all()  # forced blocks only
    nc = get_method("sparge-budget", density=0.5).block_mask(q, k, is_causal=False)
    assert bm.mask_density(nc, 900, 900, False) == pytest.approx(0.5, abs=0.01)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="density must be a number in"):
        get_method("sparge-budget", density=1.5)
    with pytest.raises(ValueError, match="density must be a number in"):
        get_method("sparge-budget", density=float("nan"))
    with pytest.raises(ValueError, match="estimator must be one of"):
        get_method("sparge-budget", estimator="mean")
    with pytest.raises(ValueError, match="alloc must be one of"):
        get_method("sparge-budget", alloc="row")


def test_runs_end_to_end_and_propagates_non_finite_inputs():
    q, k, v = rand_qkv(1, 4, 2, 300, 300, 64, dtype=torch.float16, seed=2)
    method = get_method("sparge-budget", density=0.6)
    out, stats = method.attend(q, k, v, is_causal=True, backend="reference")
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert stats.qk_sparsity == pytest.approx(
        1 - bm.mask_density(method.block_mask(q, k, is_causal=True), 300, 300, True)
    )
    q2 = q.clone()
    q2[0, 1, 5, 3] = float("nan")
    out2 = method(q2, k, v, is_causal=True, backend="reference")
    dense2 = R.dense_attention(q2, k, v, is_causal=True, scale=64**-0.5)
    assert torch.isnan(out2[0, 1, 5]).all() == torch.isnan(dense2[0, 1, 5]).all()


@pytest.mark.gpu
def test_cuda_mask_matches_cpu_and_runs_on_the_triton_kernel():
    q, k, v = rand_qkv(1, 8, 2, 4096 + 17, 4096 + 17, 128, dtype=torch.float16, seed=4)
    method = get_method("sparge-budget", density=0.3)
    cpu = method.block_mask(q.float(), k.float(), is_causal=True)
    gpu = method.block_mask(q.float().cuda(), k.float().cuda(), is_causal=True)
    assert (gpu.cpu() != cpu).float().mean() < 1e-3  # ties may order differently
    out = method(q.cuda(), k.cuda(), v.cuda(), is_causal=True, backend="triton")
    ref, _ = R.masked_attention(
        q.cuda(),
        k.cuda(),
        v.cuda(),
        method.block_mask(q.cuda(), k.cuda(), is_causal=True),
        is_causal=True,
        scale=128**-0.5,
        dtype=torch.float32,
    )
    assert torch.isfinite(out).all() and (out.float() - ref.float()).abs().max() < 2e-2


def test_local_blocks_are_forced_before_each_diagonal():
    from sparge_core.methods.sparge_budget import forced_blocks

    n = 1024
    base, local = forced_blocks(n, n), forced_blocks(n, n, local_blocks=2)
    extra = local & ~base
    # query block i (rows 128 i ..) starts at key block 2 i: blocks 2 i - 2 and 2 i - 1 are added
    for i in range(n // 128):
        expected = {j for j in (2 * i - 2, 2 * i - 1) if j >= 1}
        assert set(torch.nonzero(extra[i]).flatten().tolist()) == expected
    q, k, _ = rand_qkv(1, 4, 2, n, n, 64, dtype=torch.float32, seed=8)
    mask = get_method("sparge-budget", density=0.0, local_blocks=2).block_mask(q, k, is_causal=True)
    assert (mask == local).all()
    with pytest.raises(ValueError, match="local_blocks must be an integer >= 0"):
        get_method("sparge-budget", local_blocks=-1)
