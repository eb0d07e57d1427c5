"""The time objective on synthetic layers and cost models whose right answer is known: dense
fastest, INT8 fastest, an INT8 whose error alone breaks the bound, stage 2 that cannot pay for its
check and stage 2 that does, the cheaper estimator; pruning before evaluating; the chosen point is
the best of every evaluated point; resume; the objective's resolution."""

import pytest
import torch

from calibrate.cost import CallShape, CostModel
from calibrate.objective import (
    Family,
    LayerTimer,
    ObjectiveError,
    resolve_objective,
    search_layer_time,
)
from calibrate.search import PV_MAX, SearchSettings

H = 4
SHAPE = CallShape(4096, 4096, H, 64, True)
SETTINGS = SearchSettings(l1=0.08, pv_l1=0.09, mode="topk", thetas=(-1.0, 0.5), bisect_steps=6)


class FakeFamilyLayer:
    """Per head: density = budget ** sharp (theta above 0.6: dense), L1 = scale / gain * (1 - density) +
    the executor's quantization error; stage 2 skips (1 - pv/50)/2 of the computed pairs and adds
    skip * 0.02 of error. Returns ``(l1, sparsity, density, pv_skip)``."""

    def __init__(self, quant_error: float, estimator_gain: float = 1.0):
        self.sharp = torch.tensor([1.0, 1.5, 2.0, 3.0], dtype=torch.float64)
        self.scale = torch.tensor([0.1, 0.15, 0.12, 0.2], dtype=torch.float64) / estimator_gain
        self.quant_error = quant_error
        self.calls = 0

    def __call__(self, theta, budget, pv, mode):
        self.calls += 1
        density = budget.double().clamp(0, 1) ** self.sharp
        density = torch.where(theta.double() > 0.6, torch.ones_like(density), density)
        l1 = self.scale * (1 - density) + self.quant_error
        skip = torch.zeros_like(density)
        if pv is not None:
            skip = (1 - pv.double() / PV_MAX).clamp(0, 1) / 2
            l1 = l1 + 0.02 * skip
        sparsity = (1 - density) + skip * density / 2
        return l1, sparsity, density, skip


def _lin(fixed, pair, saved=0.0, source="measured"):
    d = {"fixed_ms": fixed, "per_row_ns": 0.0, "per_pair_ns": pair, "source": source}
    if saved:
        d["pv_saved_ns"] = saved
    return {"64": d}


def cost_model(*, dense_pair=1000.0, none_pair=1500.0, int8_pair=None, pv_pair=None, pv_saved=0.0, launch=0.01,
               pooled=(0.01, 0.0), keys=None) -> CostModel:
    """A cost model in round numbers (per_pair in ns; the layer has about 8.4K allowed pairs per head)."""
    kernels = {"dense": _lin(0.0, dense_pair), "none": _lin(0.0, none_pair)}
    launch_ms = {"none": launch}
    if pv_pair is not None:
        kernels["none+pv"] = _lin(0.0, pv_pair, pv_saved)
    if int8_pair is not None:
        kernels["int8"] = _lin(0.0, int8_pair)
        launch_ms["int8"] = launch
    predictors = {"pooled": {"64": {"fixed_ms": pooled[0], "per_row_ns": 0.0, "per_pair_ns": pooled[1],
                                    "source": "measured"}}}
    if keys is not None:
        predictors["keys"] = {"64": {"fixed_ms": keys[0], "per_row_ns": 0.0, "per_pair_ns": keys[1],
                                     "source": "measured"}}
    return CostModel.from_dict({"format": "sparge-cost-model", "version": 1, "gpu": "Synthetic GPU",
                                "kernels": kernels, "predictors": predictors, "launch_ms": launch_ms})


def run(model, families, *, quant_error=None, gains=None, settings=SETTINGS, **kw):
    quant_error = quant_error or {"none": 0.0, "int8": 0.01}
    gains = gains or {}
    layers = {f.key: FakeFamilyLayer(quant_error[f.quant], gains.get(f.estimator, 1.0)) for f in families}
    seen = []
    res = search_layer_time(lambda f: layers[f.key], H, settings, LayerTimer(model, SHAPE), families,
                            on_evaluation=seen.append, **kw)
    return res, layers, seen


def test_dense_wins_when_fixed_costs_exceed_dense_attention_and_nothing_is_evaluated():
    model = cost_model(launch=1e3, int8_pair=500.0, pv_pair=1500.0)
    res, layers, seen = run(model, [Family("none", "pooled"), Family("int8", "pooled")])
    assert res.variant == {"dense": True}
    assert all(h.budget == 1.0 and h.simthreshd1 == 1.0 for h in res.heads)
    assert res.evaluations == 0 and all(layer.calls == 0 for layer in layers.values())
    assert [e.stage for e in seen] == ["dense"]
    assert len(res.cost["pruned"]) == 2 and "fixed costs" in res.cost["pruned"][0]
    assert res.predicted["ms"] == res.predicted["dense_ms"]


def test_a_host_floor_above_dense_attention_keeps_the_layer_dense_without_evaluating():
    # the GPU formula alone would make the sparse variants win (cheap fixed costs); the host's time to
    # issue a sparse call is above the whole dense call, so no sparse point can be faster
    data = cost_model(int8_pair=500.0).to_dict()
    dense_ms = LayerTimer(CostModel.from_dict(data), SHAPE).dense_ms()
    data["host_ms"] = {"none": 2 * dense_ms, "int8": 2 * dense_ms, "dense": 0.0}
    res, layers, seen = run(CostModel.from_dict(data), [Family("none", "pooled"), Family("int8", "pooled")])
    assert res.variant == {"dense": True} and res.evaluations == 0
    assert all(layer.calls == 0 for layer in layers.values())
    free, _, _ = run(cost_model(int8_pair=500.0), [Family("none", "pooled"), Family("int8", "pooled")])
    assert free.variant["dense"] is False  # without the floor the same layer goes sparse


def test_int8_wins_when_its_kernel_is_cheaper_and_its_error_fits():
    model = cost_model(int8_pair=600.0)
    res, layers, _ = run(model, [Family("none", "pooled"), Family("int8", "pooled")], settings=SearchSettings(
        l1=0.08, pv_l1=0.09, mode="topk", thetas=(-1.0, 0.5), bisect_steps=6, tune_pv=False))
    assert res.variant == {"dense": False, "quant": "int8", "stage2": False}
    assert all(h.l1 <= 0.08 + 1e-12 for h in res.heads) and min(h.l1 for h in res.heads) >= 0.01
    # int8 needs a little more density than exact (its error eats part of the bound), yet is faster
    timer = LayerTimer(model, SHAPE)
    assert res.predicted["ms"] < timer.dense_ms()
    assert layers["int8/pooled"].calls > 1  # probe + stage 1


def test_int8_whose_error_alone_exceeds_the_bound_is_pruned_after_one_probe():
    model = cost_model(int8_pair=600.0)
    res, layers, seen = run(model, [Family("none", "pooled"), Family("int8", "pooled")],
                            quant_error={"none": 0.0, "int8": 0.1})
    assert res.variant["quant"] == "none"
    assert layers["int8/pooled"].calls == 1
    assert any("exceeds the bound" in p for p in res.cost["pruned"])
    probe = [e for e in seen if e.stage == "probe"]
    assert len(probe) == 1 and max(probe[0].l1) > 0.08


def test_stage2_is_not_searched_when_it_cannot_pay_for_its_check():
    model = cost_model(pv_pair=1500.0 * 1.5)  # the measured H200 case: the check costs, skipping saves nothing
    res, _, seen = run(model, [Family("none", "pooled")])
    assert res.variant == {"dense": False, "quant": "none", "stage2": False}
    assert not [e for e in seen if e.stage == "stage2"]
    assert any("cannot pay" in p for p in res.cost["pruned"])
    assert all(h.pvthreshd == PV_MAX for h in res.heads)


def test_stage2_is_taken_when_its_saving_beats_the_check():
    model = cost_model(pv_pair=1550.0, pv_saved=1400.0)
    res, _, seen = run(model, [Family("none", "pooled")])
    assert res.variant == {"dense": False, "quant": "none", "stage2": True}
    assert [e for e in seen if e.stage == "stage2"]
    assert all(h.pvthreshd < PV_MAX for h in res.heads) and all(h.l1 <= 0.09 + 1e-12 for h in res.heads)


def test_the_cheaper_estimator_wins_at_equal_accuracy_and_the_dearer_is_pruned():
    model = cost_model(pooled=(0.01, 0.0), keys=(3.0, 0.0))  # dense is ~4.2 ms, pooled ~2.5 ms
    fams = [Family("none", "keys"), Family("none", "pooled")]
    res, layers, _ = run(model, fams)
    assert res.estimator == "pooled"
    assert layers["none/keys"].calls == 0  # its fixed cost alone is above the pooled result


def test_a_more_accurate_estimator_can_pay_for_itself():
    # keys costs a bit more but predicts well enough (a third of the error at a density) to need far less density
    model = cost_model(pooled=(0.01, 0.0), keys=(0.05, 0.0))
    res, _, _ = run(model, [Family("none", "keys"), Family("none", "pooled")], gains={"keys": 3.0})
    assert res.estimator == "keys"


def test_the_chosen_point_is_the_best_feasible_evaluation():
    model = cost_model(int8_pair=1200.0, pv_pair=1550.0, pv_saved=1400.0)
    res, _, seen = run(model, [Family("none", "pooled"), Family("int8", "pooled")])
    chosen = [e for e in seen if e.stage == "chosen"]
    assert len(chosen) == 1 and chosen[0].value == pytest.approx(res.predicted["ms"])
    for e in seen:
        bound = SETTINGS.pv_l1 if e.pvthreshd is not None else SETTINGS.l1
        if e.stage != "chosen" and all(x <= bound for x in e.l1):
            assert e.value >= chosen[0].value, e


def test_resume_per_family_gives_the_same_result_with_fewer_evaluations():
    model = cost_model(int8_pair=1200.0, pv_pair=1550.0, pv_saved=1400.0)
    fams = [Family("none", "pooled"), Family("int8", "pooled")]
    full, _, _ = run(model, fams)
    saved = {"stage1": {}, "probe": {}}

    def keep(key, theta, budget, l1, sp, dens):
        saved["stage1"].setdefault(key, {})[theta] = (budget, l1, sp, dens)

    run(model, fams, on_theta_done=keep, on_probe=lambda key, l1: saved["probe"].__setitem__(key, l1))
    again, layers, _ = run(model, fams, resume=saved)
    assert again.heads == full.heads and again.variant == full.variant
    assert sum(x.calls for x in layers.values()) < full.evaluations


def test_resolve_objective(tmp_path):
    path = tmp_path / "c.json"
    cost_model(int8_pair=600.0).save(path)
    cpu = resolve_objective(None, None, device="cpu", head_dim=64, estimators=["keys"])
    assert cpu.name == "sparsity" and "no cost model on CPU" in cpu.reason and cpu.cost_model is None
    timed = resolve_objective(None, str(path), device="cpu", head_dim=64, estimators=["pooled"])
    assert timed.name == "time" and timed.quants == ("none", "int8")
    assert [f.key for f in timed.families] == ["none/pooled", "int8/pooled"]
    assert timed.fingerprint()["cost_model_sha256"] == timed.cost_model.sha256()
    kept = resolve_objective("sparsity", str(path), device="cpu", head_dim=64, estimators=["keys"])
    assert kept.name == "sparsity" and kept.cost_model is not None  # predictions still reported
    with pytest.raises(ObjectiveError, match="needs a cost model"):
        resolve_objective("time", None, device="cpu", head_dim=64, estimators=["keys"])
    with pytest.raises(ObjectiveError, match="no head dim|head dim 128"):
        resolve_objective("time", str(path), device="cpu", head_dim=128, estimators=["pooled"])
    with pytest.raises(ObjectiveError, match="cannot run on cpu"):
        resolve_objective("time", str(path), device="cpu", head_dim=64, estimators=["pooled"], quants=["int8-fp8"])
    with pytest.raises(ObjectiveError, match="one estimator"):
        resolve_objective("sparsity", None, device="cpu", head_dim=64, estimators=["keys", "pooled"])
