"""CPU smoke tests of the held-out checks: ``scripts/holdout_study.py`` (search on some captured
windows, measure the others) and ``scripts/heldout_l1.py`` (a config on another text), on tiny-llama."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from calibrate.capture import capture_to_disk
from calibrate.data import token_windows
from calibrate.models import build_tiny_model, byte_tokenizer
from sparge_core.params import LayerConfig, ModelConfig, ModelInfo

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))


def _run(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    module.main()


def test_holdout_study_measures_every_held_out_window(tmp_path, monkeypatch):
    import holdout_study

    cap = tmp_path / "cap"
    windows = token_windows(byte_tokenizer(), "pydoc", 384, 3, seed=1)
    capture_to_disk(build_tiny_model("llama", seed=2), windows, cap, layers=[0, 1], model_name="tiny-llama")
    out = tmp_path / "study.json"
    _run(holdout_study, ["--capture", str(cap), "--calib", "2", "--l1", "0.3", "--pv-l1", "0.35", "--device", "cpu",
                         "--variants", "base", "margin0.5", "--out", str(out)], monkeypatch)
    doc = json.loads(out.read_text())
    assert doc["calib"] == 2 and doc["held"] == 1 and doc["estimator"] == "keys"
    rows = {(r["layer"], r["variant"]): r for r in doc["rows"]}
    assert set(rows) == {(0, "base"), (0, "margin0.5"), (1, "base"), (1, "margin0.5")}
    for (layer, variant), r in rows.items():
        assert len(r["holdout_per_window"]) == 1 and len(r["holdout_per_head"][0]) == 4
        assert r["calib_l1"] <= (0.35 if variant == "base" else 0.175) + 1e-9
        assert r["sparsity"] <= rows[(layer, "base")]["sparsity"] + 1e-9


def test_heldout_l1_reports_layer_and_worst_head(tmp_path, monkeypatch):
    import heldout_l1

    heads = 4
    sparse = LayerConfig(layer=0, simthreshd1=(-1.0,) * heads, pvthreshd=(50.0,) * heads, cdfthreshd=(0.6,) * heads,
                         estimator="keys")
    config = ModelConfig(model=ModelInfo("tiny-llama", 2, heads, 2, 64), layers=(sparse, LayerConfig.dense(1, heads)),
                         l1=0.1, pv_l1=0.1)
    path = tmp_path / "c.json"
    config.save(path)
    out = tmp_path / "held.json"
    _run(heldout_l1, ["--config", str(path), "--model", "tiny-llama", "--data", "pydoc", "--windows", "2",
                      "--seq-len", "320", "--device", "cpu", "--out", str(out)], monkeypatch)
    doc = json.loads(out.read_text())
    assert [r["layer"] for r in doc["rows"]] == [0]  # the dense layer is not measured
    row = doc["rows"][0]
    assert len(row["per_window_layer_l1"]) == 2
    # the layer's L1 is a weighted mean of its heads' L1s, so it never exceeds the worst head
    assert 0 < row["layer_l1"] <= row["worst_head_l1"] + 1e-9
    assert doc["worst_ratio_to_pv_l1"] == pytest.approx(row["layer_l1"] / 0.1)
