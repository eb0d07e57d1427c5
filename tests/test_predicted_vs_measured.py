"""scripts/predicted_vs_measured.py on a fixture config and speed result, and the speed suite's
per-layer dense time that the comparison needs."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sparge_core.methods.sparge import Sparge
from sparge_core.params import LayerConfig, LayerPrediction, LayerVariant, ModelConfig, ModelInfo
from sparge_core.synthetic import structured_qkv

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("predicted_vs_measured", REPO / "scripts/predicted_vs_measured.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config(tmp_path) -> Path:
    h = 2
    layers = (
        LayerConfig(0, (0.5,) * h, (50.0,) * h, cdfthreshd=(0.9,) * h, variant=LayerVariant(False, "int8", False),
                    estimator="keys", predicted=LayerPrediction(0.5, 1.0)),
        LayerConfig(1, (1.0,) * h, (50.0,) * h, cdfthreshd=(1.0,) * h, variant=LayerVariant(dense=True),
                    predicted=LayerPrediction(1.0, 1.0)),
    )
    path = tmp_path / "c.json"
    ModelConfig(ModelInfo("m", 2, h, 1, 64), layers, 0.08, 0.09, calibration={"seq_len": 8192}).save(path)
    return path


def _speed(tmp_path, layer0_ms=0.55, dense0_ms=1.1) -> Path:
    doc = {"suite": "speed", "scores": {"lengths": {"4096": {"layers": {}}, "8192": {"layers": {
        "0": {"ms": layer0_ms, "density": 0.4, "dense_ms": dense0_ms}, "1": {"ms": 1.3, "density": 1.0}}}}}}
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(doc))
    return path


def test_the_comparison_table(tmp_path, capsys):
    mod = _script()
    out = tmp_path / "cmp.md"
    assert mod.main(["--config", str(_config(tmp_path)), "--speed", str(_speed(tmp_path)), "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["length"] == 8192
    l0, l1 = result["layers"]
    assert l0["error"] == pytest.approx((0.5 - 0.55) / 0.55) and l0["within"]
    assert l0["measured_speedup"] == pytest.approx(2.0) and l0["predicted_speedup"] == pytest.approx(2.0)
    assert l1["variant"] == "dense" and l1["error"] == pytest.approx((1.0 - 1.3) / 1.3) and not l1["within"]
    overall = result["overall"]
    assert overall["predicted_ms"] == pytest.approx(1.5) and overall["measured_ms"] == pytest.approx(1.85)
    assert overall["measured_speedup"] == pytest.approx((1.1 + 1.3) / 1.85)
    text = out.read_text()
    assert "| 0 | int8/keys |" in text and "| 1 | dense |" in text and "! |" in text and "1/2 layers" in text
    assert text == capsys.readouterr().out


def test_bad_inputs_exit_2(tmp_path, capsys):
    mod = _script()
    cfg = _config(tmp_path)
    assert mod.main(["--config", str(cfg), "--speed", str(_speed(tmp_path)), "--length", "2048"]) == 2
    assert "not the config's 2048" in capsys.readouterr().err
    (tmp_path / "x.json").write_text("{}")
    assert mod.main(["--config", str(cfg), "--speed", str(tmp_path / "x.json")]) == 2
    assert "scores.lengths" in capsys.readouterr().err
    assert mod.main(["--config", str(tmp_path / "none.json"), "--speed", str(_speed(tmp_path))]) == 2


def test_speed_suite_times_dense_beside_each_sparse_layer():
    from evals.speed import attention_ms

    layers = {i: structured_qkv(1, 2, 1, 256, 64, dtype=torch.float32, seed=i) for i in range(2)}
    method = Sparge(simthreshd1=[-1.0, -1.0], cdfthreshd=[0.8, 0.8], pvthreshd=None, quant="int8")
    out = attention_ms(layers, {0: method, 1: None}.get, torch.device("cpu"), backend="reference", repeats=1)
    assert set(out[0]) == {"ms", "density", "dense_ms"} and out[0]["density"] < 1.0
    assert set(out[1]) == {"ms", "density"} and out[1]["density"] == 1.0
    assert all(v["ms"] > 0 for v in out.values())


def test_host_floors_bound_the_predictions_from_below(tmp_path, capsys):
    from calibrate.cost import CostModel

    mod = _script()
    cost = json.loads((REPO / "results/kernel/h200-cost.json").read_text())
    cost["host_ms"] = {"dense": 0.0, "int8": 0.8}
    CostModel.from_dict(cost).save(tmp_path / "cost.json")
    out = tmp_path / "cmp.md"
    assert mod.main(["--config", str(_config(tmp_path)), "--speed", str(_speed(tmp_path)), "--out", str(out),
                     "--host-floors", str(tmp_path / "cost.json")]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    l0, l1 = result["layers"]
    assert l0["predicted_ms"] == pytest.approx(0.8) and l0["predicted_speedup"] == pytest.approx(1.0 / 0.8)
    assert l1["predicted_ms"] == pytest.approx(1.0)  # dense: its floor 0 is below the config's 1.0 ms
    assert result["host_floors"]["host_ms"]["int8"] == 0.8
    del cost["host_ms"]
    CostModel.from_dict(cost).save(tmp_path / "bare.json")
    assert mod.main(["--config", str(_config(tmp_path)), "--speed", str(_speed(tmp_path)),
                     "--host-floors", str(tmp_path / "bare.json")]) == 2
    assert "holds no host_ms" in capsys.readouterr().err


def test_a_cost_model_re_predicts_every_layer_from_the_config(tmp_path, capsys):
    import dataclasses

    from calibrate.cost import CostModel

    mod = _script()
    cfg = ModelConfig.load(_config(tmp_path))
    layers = (dataclasses.replace(cfg.layers[0], sparsity=0.6), cfg.layers[1])
    dataclasses.replace(cfg, layers=layers).save(tmp_path / "c2.json")
    cost_path = REPO / "results/kernel/h200-cost.json"
    cost = CostModel.load(cost_path)
    out = tmp_path / "cmp.md"
    assert mod.main(["--config", str(tmp_path / "c2.json"), "--speed", str(_speed(tmp_path)), "--out", str(out),
                     "--cost-model", str(cost_path)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    l0, l1 = result["layers"]
    dense = cost.predict_ms("dense", 8192, 8192, 2, 64, True, 1.0)
    sparse = cost.predict_ms("int8", 8192, 8192, 2, 64, True, 0.4, estimator="keys")
    assert l0["predicted_ms"] == pytest.approx(sparse) and l0["predicted_dense_ms"] == pytest.approx(dense)
    assert l1["predicted_ms"] == pytest.approx(dense)  # not the config's own 1.0 ms
    assert sparse != pytest.approx(0.5) and result["repredicted_with"]["sha256"] == cost.sha256()
    # a layer without a sparsity cannot be re-predicted; both options at once are refused
    assert mod.main(["--config", str(_config(tmp_path)), "--speed", str(_speed(tmp_path)),
                     "--cost-model", str(cost_path)]) == 2
    assert "has no sparsity" in capsys.readouterr().err
    assert mod.main(["--config", str(tmp_path / "c2.json"), "--speed", str(_speed(tmp_path)),
                     "--cost-model", str(cost_path), "--host-floors", str(cost_path)]) == 2
    assert "drop --host-floors" in capsys.readouterr().err
