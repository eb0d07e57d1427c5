"""The length below which a sparse layer runs dense (``min_tokens``): the grid of lengths, the crossover
against a synthetic cost model whose answer is computed here independently, the time objective writing
it into the layer result and the config entry, and ``python -m calibrate.crossover`` on a saved config
(exit 2 on bad input)."""

import json

import pytest
import torch
from test_objective import SETTINGS, FakeFamilyLayer, H, cost_model

from calibrate import crossover
from calibrate.cost import CallShape
from calibrate.objective import Family, LayerTimer, crossover_lengths, crossover_tokens, search_layer_time
from calibrate.report import layer_config, summary
from sparge_core.ops.blocks import BLOCK_K, BLOCK_Q
from sparge_core.params import LayerConfig, LayerVariant, ModelConfig, ModelInfo


def _allowed_pairs(n: int) -> int:
    """Causal block pairs of an n x n prefill, counted one by one."""
    nb_q, nb_k = -(-n // BLOCK_Q), -(-n // BLOCK_K)
    return sum(1 for i in range(nb_q) for j in range(nb_k) if j * BLOCK_K <= min(n, (i + 1) * BLOCK_Q) - 1)


def test_crossover_lengths_are_block_multiples_below_the_length():
    assert crossover_lengths(8192) == [128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144]
    assert crossover_lengths(BLOCK_Q) == []
    assert all(n % BLOCK_Q == 0 and n < 5000 for n in crossover_lengths(5000))


@pytest.mark.parametrize("fixed_ms", [0.0, 0.002, 0.02, 0.2])
def test_crossover_matches_the_cost_formula(fixed_ms):
    """dense = 1000 ns x pairs, sparse = fixed + 1500 ns x density x pairs: at density 0.25 the sparse
    call wins once 625 ns x pairs exceeds the fixed cost."""
    model = cost_model(dense_pair=1000.0, none_pair=1500.0, launch=fixed_ms, pooled=(0.0, 0.0))
    timer = LayerTimer(model, CallShape(8192, 8192, H, 64, True))
    density = torch.full((H,), 0.25, dtype=torch.float64)
    got = crossover_tokens(timer, Family("none", "pooled"), False, density)
    wins = [n for n in crossover_lengths(8192) if fixed_ms < 1e-6 * 625.0 * H * _allowed_pairs(n)]
    losing = [n for n in crossover_lengths(8192) if n not in wins]
    expected = 0 if not losing else min(n for n in wins if n > max(losing))
    assert got == expected
    if fixed_ms == 0.0:
        assert got == 0
    if fixed_ms == 0.2:
        assert got > 1024


def test_a_layer_slower_than_dense_just_below_its_length_gets_that_length():
    model = cost_model(launch=10.0, pooled=(0.0, 0.0))
    timer = LayerTimer(model, CallShape(4096, 4096, H, 64, True))
    assert crossover_tokens(timer, Family("none", "pooled"), False, torch.full((H,), 0.1)) == 4096


def test_the_time_objective_writes_min_tokens_into_the_config_entry():
    model = cost_model(int8_pair=600.0, launch=0.05)
    shape = CallShape(4096, 4096, H, 64, True)
    layers = {f.key: FakeFamilyLayer({"none": 0.0, "int8": 0.01}[f.quant]) for f in (Family("none", "pooled"),)}
    res = search_layer_time(lambda f: layers[f.key], H, SETTINGS, LayerTimer(model, shape), [Family("none", "pooled")])
    assert res.variant["dense"] is False
    assert res.predicted["min_tokens"] > 0
    lc = layer_config(3, res, "pooled")
    assert lc.min_tokens == res.predicted["min_tokens"]
    assert lc.to_dict()["min_tokens"] == lc.min_tokens


def _config(tmp_path, sparsity=0.6):
    heads = 4
    sparse = LayerConfig(1, (-1.0,) * heads, (50.0,) * heads, topk=(0.3,) * heads, sparsity=sparsity, l1=0.05,
                         variant=LayerVariant(dense=False, quant="none", stage2=False))
    cfg = ModelConfig(ModelInfo("tiny", 2, heads, 2, 64), (LayerConfig.dense(0, heads), sparse), l1=0.08,
                      pv_l1=0.09, calibration={"seq_len": 8192, "seconds": 1.0, "evaluations": 1, "device": "cpu"})
    path = tmp_path / "config.json"
    cfg.save(path)
    cost = tmp_path / "cost.json"
    cost_model(launch=0.05, pooled=(0.0, 0.0)).save(cost)
    return path, cost


def test_the_command_sets_min_tokens_of_sparse_layers_only(tmp_path):
    path, cost = _config(tmp_path)
    out = tmp_path / "gated.json"
    assert crossover.main([str(path), "--cost-model", str(cost), "--out", str(out)]) == 0
    gated = ModelConfig.load(out)
    assert gated.layer(0).min_tokens == 0
    model = cost_model(launch=0.05, pooled=(0.0, 0.0))
    expected = crossover_tokens(LayerTimer(model, CallShape(8192, 8192, 4, 64, True)), Family("none", "pooled"),
                                False, torch.full((4,), 0.4, dtype=torch.float64))
    assert gated.layer(1).min_tokens == expected > 0
    assert "run dense below a predicted crossover" in summary(gated, {})
    assert json.loads(out.read_text())["layers"][1]["min_tokens"] == expected


def test_the_command_refuses_bad_input_with_exit_2(tmp_path, capsys):
    path, cost = _config(tmp_path)
    out = tmp_path / "o.json"
    assert crossover.main([str(path), "--cost-model", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert crossover.main([str(path), "--cost-model", str(cost), "--out", str(out), "--seq-len", "0"]) == 2
    assert not out.exists()
