"""calibrate.search: bisection, simthreshd1 grid, dense fallback, resume, and a real evaluator."""

import math

import pytest
import torch

from calibrate.search import (
    DENSE_BELOW,
    LayerEvaluator,
    SearchSettings,
    bisect_budget,
    exhaustive_reference_sweep,
    search_layer,
)
from sparge_core.synthetic import structured_qkv


class FakeLayer:
    """A layer whose error and sparsity are known functions of the hyperparameters, per head:
    density = budget ** sharp_h (theta > limit_h makes the head fully dense), L1 = scale_h * (1 - density)."""

    def __init__(self, sharp, scale, theta_limit):
        self.sharp = torch.tensor(sharp, dtype=torch.float64)
        self.scale = torch.tensor(scale, dtype=torch.float64)
        self.limit = torch.tensor(theta_limit, dtype=torch.float64)
        self.calls = 0

    def __call__(self, theta, budget, pv, mode):
        self.calls += 1
        density = budget.double().clamp(0, 1) ** self.sharp
        # a higher simthreshd1 makes more fix blocks: denser, more accurate
        density = torch.where(theta.double() > self.limit, torch.ones_like(density), density)
        l1 = self.scale * (1 - density)
        if pv is not None:  # lower pvthreshd: more skipping, more error, more sparsity
            skip = (1 - pv.double() / 50).clamp(0, 1) * 0.2
            l1 = l1 + skip * 0.1
            return l1, (1 - density) + skip * density / 2
        return l1, 1 - density


def test_bisection_finds_the_bound_per_head():
    layer = FakeLayer([1.0, 2.0, 4.0], [0.2, 0.2, 0.05], [2, 2, 2])
    settings = SearchSettings(l1=0.08, mode="topk", bisect_steps=12)
    budget, l1, sp = bisect_budget(layer, torch.full((3,), -1.0), settings)
    # head 0: 0.2 (1 - b) <= 0.08 -> b >= 0.6; head 1: b^2 >= 0.6; head 2: always feasible -> b -> 0
    assert budget[0] == pytest.approx(0.6, abs=1e-3)
    assert budget[1] == pytest.approx(math.sqrt(0.6), abs=1e-3)
    assert budget[2] < 1e-3
    assert (l1 <= 0.08 + 1e-12).all()
    assert sp[0] == pytest.approx(0.4, abs=1e-3)


def test_cdf_bisection_resolution_is_fine_near_one():
    layer = FakeLayer([50.0], [1.0], [2])  # needs density >= 0.92: cdfthreshd >= 0.92^(1/50) = 0.99833
    settings = SearchSettings(l1=0.08, mode="cdf", bisect_steps=10)
    budget, l1, _ = bisect_budget(layer, torch.full((1,), -1.0), settings)
    assert l1.item() <= 0.08
    assert 0.99833 <= budget.item() < 0.9990


def test_search_layer_picks_best_theta_and_falls_back_to_dense():
    # head 1 can never be sparse enough (error scale huge): dense
    layer = FakeLayer([1.0, 1.0], [0.2, 50.0], [0.3, 0.3])
    settings = SearchSettings(l1=0.08, pv_l1=0.09, mode="topk", bisect_steps=10, tune_pv=True)
    res = search_layer(layer, 2, settings)
    assert res.heads[0].sparsity > DENSE_BELOW and not res.heads[0].dense
    assert res.heads[1].dense and res.heads[1].simthreshd1 == 1.0 and res.heads[1].pvthreshd == 50.0
    # stage 2 lowered pvthreshd of the sparse head within pv_l1
    assert res.heads[0].pvthreshd < 50.0 and res.heads[0].l1 <= 0.09 + 1e-12
    assert res.evaluations == layer.calls


def test_layer_granularity_shares_values():
    layer = FakeLayer([1.0, 3.0], [0.2, 0.2], [2, 2])
    res = search_layer(layer, 2, SearchSettings(mode="topk", granularity="layer", tune_pv=False))
    assert res.heads[0].budget == res.heads[1].budget
    assert res.heads[0].simthreshd1 == res.heads[1].simthreshd1


def test_resume_from_finished_thetas_gives_the_same_result_with_fewer_evaluations():
    settings = SearchSettings(mode="topk", bisect_steps=6, tune_pv=True)
    full = search_layer(FakeLayer([1.0, 2.0], [0.2, 0.3], [0.5, 0.5]), 2, settings)
    done = {}
    search_layer(FakeLayer([1.0, 2.0], [0.2, 0.3], [0.5, 0.5]), 2,
                 SearchSettings(mode="topk", bisect_steps=6, thetas=settings.thetas[:3], tune_pv=False),
                 on_theta_done=lambda t, b, err, s, d: done.__setitem__(t, (b, err, s, d)))
    again = FakeLayer([1.0, 2.0], [0.2, 0.3], [0.5, 0.5])
    resumed = search_layer(again, 2, settings, done_thetas=done)
    assert resumed.heads == full.heads
    assert again.calls < full.evaluations


def test_bad_settings():
    with pytest.raises(ValueError, match="l1 must be a positive"):
        SearchSettings(l1=0.0)
    with pytest.raises(ValueError, match="pv_l1"):
        SearchSettings(l1=0.1, pv_l1=0.05)
    with pytest.raises(ValueError, match="mode"):
        SearchSettings(mode="random")


@pytest.fixture(scope="module")
def structured_layer():
    samples = [structured_qkv(1, 4, 2, 1024, 64, dtype=torch.float32, seed=s) for s in range(2)]
    return LayerEvaluator(samples, is_causal=True, backend="reference")


def test_real_evaluator_is_monotone_in_cdfthreshd(structured_layer):
    theta = torch.full((4,), -1.0)
    results = [structured_layer(theta, torch.full((4,), t), None, "cdf") for t in (0.5, 0.9, 0.99, 1.0)]
    l1s = torch.stack([r[0] for r in results])
    sps = torch.stack([r[1] for r in results])
    assert (l1s[1:] <= l1s[:-1] + 1e-6).all() and (sps[1:] <= sps[:-1] + 1e-9).all()
    assert (l1s[-1] < 1e-5).all() and (sps[-1] == 0).all()


def test_search_on_structured_attention_respects_bound_and_beats_nothing(structured_layer):
    settings = SearchSettings(l1=0.08, pv_l1=0.09, bisect_steps=6, thetas=(-1.0, 0.5))
    res = search_layer(structured_layer, 4, settings)
    assert all(h.l1 <= 0.09 + 1e-9 for h in res.heads)
    assert res.sparsity > 0.1
    # re-evaluating the chosen per-head hyperparameters reproduces the recorded bound
    theta = torch.tensor([h.simthreshd1 for h in res.heads])
    budget = torch.tensor([h.budget for h in res.heads])
    pv = torch.tensor([h.pvthreshd for h in res.heads])
    l1, _ = structured_layer(theta, budget, pv, "cdf")
    assert (l1 <= 0.09 + 1e-6).all()


def test_exhaustive_sweep_counts_its_evaluations():
    layer = FakeLayer([1.0], [0.2], [0.5])
    best, calls = exhaustive_reference_sweep(layer, 1, SearchSettings(mode="topk"))
    assert calls == 32 * 11 and best[0] == pytest.approx(0.4, abs=2e-3)
