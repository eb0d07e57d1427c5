"""Config version 2: per-layer variant and prediction round trip, version 1 files still load, bad
variants name the field, and the method built from a layer runs exactly what the config says."""

import copy
import json
from pathlib import Path

import pytest
import torch

from sparge_core import sparge_attn
from sparge_core.methods.sparge import Sparge, SpargeTopk
from sparge_core.params import (
    CONFIG_VERSION,
    ConfigError,
    LayerConfig,
    LayerPrediction,
    LayerVariant,
    ModelConfig,
    ModelInfo,
)
from sparge_core.synthetic import structured_qkv

REPO = Path(__file__).resolve().parents[1]
H = 4


def _config() -> ModelConfig:
    sparse = LayerConfig(0, (0.5, -1.0, 0.3, 0.2), (50.0, 50.0, 50.0, 50.0), cdfthreshd=(0.9, 0.95, 0.8, 1.0),
                         sparsity=0.4, l1=0.05, estimator="keys", variant=LayerVariant(False, "int8", False),
                         predicted=LayerPrediction(0.5, 1.0))
    staged = LayerConfig(1, (0.5,) * H, (8.0, 12.0, 50.0, 3.0), topk=(0.3, 0.4, 0.5, 1.0), sparsity=0.5, l1=0.07,
                         variant=LayerVariant(False, "none", True), predicted=LayerPrediction(0.7, 1.0))
    dense = LayerConfig(2, (1.0,) * H, (50.0,) * H, cdfthreshd=(1.0,) * H, variant=LayerVariant(dense=True),
                        predicted=LayerPrediction(1.0, 1.0))
    return ModelConfig(ModelInfo("m", 3, H, 2, 64), (sparse, staged, dense), l1=0.08, pv_l1=0.09,
                       calibration={"objective": "time"})


def test_v2_round_trip(tmp_path):
    cfg = _config()
    cfg.save(tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["version"] == CONFIG_VERSION == 2
    assert data["layers"][0]["variant"] == {"dense": False, "quant": "int8", "stage2": False}
    assert data["layers"][2]["variant"] == {"dense": True}
    assert data["layers"][0]["predicted"] == {"ms": 0.5, "dense_ms": 1.0, "speedup": 2.0}
    back = ModelConfig.load(tmp_path / "c.json")
    assert back == cfg
    assert back.layers[2].is_dense and not back.layers[0].is_dense
    assert back.layers[0].quant == "int8" and back.layers[0].stage2 is False
    assert back.layers[1].quant == "none" and back.layers[1].stage2 is True


def test_v1_files_load_and_mean_what_they_meant():
    for path in [REPO / "results/calibration/smollm2-h100.json", REPO / "results/t2i/dit/t2i-config.json"]:
        data = json.loads(path.read_text())
        assert data["version"] == 1
        cfg = ModelConfig.load(path)
        for lc in cfg.layers:
            assert lc.variant is None and lc.quant is None and lc.stage2 is True
            assert lc.kwargs()["pvthreshd"] == list(lc.pvthreshd) and "quant" not in lc.kwargs()


def _dict():
    return _config().to_dict()


@pytest.mark.parametrize("mutate,fragment", [
    (lambda d: d["layers"][0]["variant"].update(quant="int4"), "layers[0].variant.quant must be one of"),
    (lambda d: d["layers"][0]["variant"].update(stage2="no"), "layers[0].variant.stage2 must be true or false"),
    (lambda d: d["layers"][0]["variant"].pop("stage2"), "layers[0].variant is missing ['stage2']"),
    (lambda d: d["layers"][0].update(variant={"dense": 1}), "layers[0].variant.dense must be true or false"),
    (lambda d: d["layers"][0].update(variant={"dense": True, "quant": "none"}), "unknown key(s) ['quant']"),
    (lambda d: d["layers"][0].update(variant={"dense": True}), "layers[0].variant says dense"),
    (lambda d: d["layers"][1]["predicted"].update(ms=0), "layers[1].predicted.ms must be in"),
    (lambda d: d["layers"][1]["predicted"].pop("dense_ms"), "layers[1].predicted is missing ['dense_ms']"),
    (lambda d: d.update(version=3), "version must be one of [1, 2]"),
    (lambda d: d.update(version=1), "layers[0] has unknown key(s) ['predicted', 'variant']"),
])
def test_bad_v2_fields_are_named(mutate, fragment):
    d = copy.deepcopy(_dict())
    mutate(d)
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(d)
    assert fragment in str(err.value)


def test_the_layer_method_runs_the_variant():
    cfg = _config()
    m0 = Sparge.from_layer_config(cfg.layers[0])
    assert m0.quant == "int8" and m0.pvthreshd is None and m0.params()["quant"] == "int8"
    m1 = Sparge.from_layer_config(cfg.layers[1])
    assert isinstance(m1, SpargeTopk) and m1.quant == "none" and m1.pvthreshd == [8.0, 12.0, 50.0, 3.0]
    q, k, v = structured_qkv(1, H, 2, 512, 64, dtype=torch.float32, seed=1)
    out, stats = m0(q, k, v, is_causal=True, backend="reference", return_stats=True)
    want, _ = sparge_attn(q, k, v, is_causal=True, backend="reference", quant="int8", pvthreshd=None,
                                   return_stats=True, **{k_: v_ for k_, v_ in cfg.layers[0].kwargs().items()
                                                         if k_ not in ("pvthreshd", "quant")})
    assert torch.equal(out, want) and int(stats.pv_skipped_blocks.sum()) == 0
    exact = sparge_attn(q, k, v, is_causal=True, backend="reference", quant="none", pvthreshd=None,
                        **{k_: v_ for k_, v_ in cfg.layers[0].kwargs().items() if k_ not in ("pvthreshd", "quant")})
    assert not torch.equal(out, exact)  # it really ran INT8
    # "auto" runs the config's quant; an explicit other quant is refused with a message
    assert torch.equal(m0(q, k, v, is_causal=True, backend="reference", quant="auto"), out)
    with pytest.raises(ValueError, match="calibrated with quant='int8'"):
        m0(q, k, v, is_causal=True, backend="reference", quant="none")


def test_v1_layers_keep_taking_the_callers_quant():
    cfg = ModelConfig.load(REPO / "results/calibration/smollm2-h100.json")
    lc = next(lc for lc in cfg.layers if not lc.is_dense)
    m = Sparge.from_layer_config(lc)
    assert m.quant is None and m.pvthreshd == list(lc.pvthreshd)
    assert m._quant("int8") == "int8" and m._quant("auto") == "auto"


def test_the_transformers_integration_runs_the_configs_variant(tmp_path):
    pytest.importorskip("transformers")
    from calibrate.models import build_tiny_model
    from sparge_core.integrations.transformers import apply, remove

    model = build_tiny_model("llama")
    sparse = LayerConfig(0, (-1.0,) * H, (50.0,) * H, topk=(0.5,) * H, estimator="pooled",
                         variant=LayerVariant(False, "int8", False))
    dense = LayerConfig(1, (0.2,) * H, (50.0,) * H, topk=(0.5,) * H, variant=LayerVariant(dense=True))
    with pytest.raises(ConfigError, match="variant says dense"):
        ModelConfig.from_dict(ModelConfig(ModelInfo("tiny", 2, H, 2, 64), (sparse, dense), 0.1, 0.1).to_dict())
    dense = LayerConfig.dense(1, H)
    cfg = ModelConfig(ModelInfo("tiny", 2, H, 2, 64), (sparse, LayerConfig(1, dense.simthreshd1, dense.pvthreshd,
                      cdfthreshd=dense.cdfthreshd, variant=LayerVariant(dense=True))), 0.1, 0.1)
    handle = apply(model, cfg, backend="reference", collect_stats=True)
    assert handle.methods[1] is None and handle.methods[0].quant == "int8" and handle.methods[0].pvthreshd is None
    ids = torch.randint(3, 200, (1, 256))
    with torch.no_grad():
        model(ids)
    report = handle.sparsity_report()["layers"]
    assert report[0]["sparse_calls"] == 1 and report[0]["pv_skip"] == 0.0 and report[1]["dense_calls"] == 1
    remove(model)


# ----------------------------------------------------------------------------------------------
# local_blocks: a per-layer field (version 2), 0 by default and then not written
# ----------------------------------------------------------------------------------------------
def test_local_blocks_round_trip_and_zero_is_not_written(tmp_path):
    cfg = _config()
    cfg.save(tmp_path / "zero.json")
    assert all("local_blocks" not in layer for layer in json.loads((tmp_path / "zero.json").read_text())["layers"])
    assert all(lc.local_blocks == 0 for lc in ModelConfig.load(tmp_path / "zero.json").layers)
    local = cfg.with_local_blocks(2)
    assert [lc.local_blocks for lc in local.layers] == [2, 2, 2] and local.layers[0].simthreshd1 == cfg.layers[0].simthreshd1
    local.save(tmp_path / "two.json")
    data = json.loads((tmp_path / "two.json").read_text())
    assert [layer["local_blocks"] for layer in data["layers"]] == [2, 2, 2]
    back = ModelConfig.load(tmp_path / "two.json")
    assert back == local and back != cfg
    assert back.layers[0].kwargs()["local_blocks"] == 2 and "local_blocks" not in cfg.layers[0].kwargs()
    with pytest.raises(ConfigError, match="local_blocks must be an integer >= 0"):
        cfg.with_local_blocks(-1)


def test_old_files_write_unchanged():
    """A committed config, loaded and written again, has the same layers (no local_blocks key)."""
    path = REPO / "results/calibration/smollm2-h100.json"
    assert ModelConfig.load(path).to_dict()["layers"] == json.loads(path.read_text())["layers"]


@pytest.mark.parametrize("value", [-1, 1.5, True, "1", None])
def test_bad_local_blocks_are_named(value):
    d = copy.deepcopy(_dict())
    d["layers"][1]["local_blocks"] = value
    with pytest.raises(ConfigError, match=r"layers\[1\]\.local_blocks must be an integer >= 0"):
        ModelConfig.from_dict(d)
    d["layers"][1]["local_blocks"] = 1
    assert ModelConfig.from_dict(d).layers[1].local_blocks == 1
    d["version"] = 1
    for layer in d["layers"]:
        layer.pop("variant"), layer.pop("predicted")
    with pytest.raises(ConfigError, match=r"layers\[1\] has unknown key\(s\) \['local_blocks'\]"):
        ModelConfig.from_dict(d)  # a version-2 field


def test_the_layer_method_runs_the_configs_local_blocks():
    g = torch.Generator().manual_seed(5)  # Gaussian: flat rows, so the selection misses local blocks
    q, k = torch.randn(1, H, 900, 64, generator=g), torch.randn(1, 2, 900, 64, generator=g)
    layers = (LayerConfig(0, (-1.0,) * H, (50.0,) * H, cdfthreshd=(0.3, 0.4, 0.5, 0.6)),
              LayerConfig(1, (-1.0,) * H, (50.0,) * H, topk=(0.1, 0.15, 0.2, 0.25)))
    for lc0 in layers:
        lc = ModelConfig(ModelInfo("m", 2, H, 2, 64), (lc0,), 0.1, 0.1).with_local_blocks(1).layers[0]
        m = Sparge.from_layer_config(lc)
        assert m.local_blocks == 1 and m.pipeline_kwargs()["local_blocks"] == 1 and m.params()["local_blocks"] == 1
        got = m.block_mask(q, k, is_causal=True)
        base = Sparge.from_layer_config(lc0)
        assert "local_blocks" not in base.params() and base.pipeline_kwargs()["local_blocks"] == 0
        before = base.block_mask(q, k, is_causal=True)
        assert (got | ~before).all() and got.sum() > before.sum()
        with pytest.raises(ValueError, match="needs is_causal=True"):
            m.block_mask(q, k, is_causal=False)
    for bad in (-2, 0.5):
        with pytest.raises(ValueError, match="sparge: local_blocks must be an integer >= 0"):
            Sparge(local_blocks=bad)
        with pytest.raises(ValueError, match="sparge-topk: local_blocks must be an integer >= 0"):
            SpargeTopk(local_blocks=bad)


def test_a_bidirectional_integration_refuses_local_blocks():
    from sparge_core.integrations.dit import SparseDiTAttention, TokenLayout

    cfg = _config().with_local_blocks(1)
    with pytest.raises(ConfigError, match=r"layers \[0, 1\] set local_blocks"):
        SparseDiTAttention.from_config(cfg, TokenLayout(0, (4, 4)))
    SparseDiTAttention.from_config(_config(), TokenLayout(0, (4, 4)))


def test_save_refuses_a_config_that_load_would_refuse(tmp_path):
    heads = 2
    bad = ModelConfig(ModelInfo("tiny-llama", 1, heads, 2, 64), (LayerConfig.dense(0, heads),), l1=0.0, pv_l1=0.0)
    path = tmp_path / "bad.json"
    with pytest.raises(ConfigError, match="l1 must be in"):
        bad.save(path)
    assert not path.exists()
    good = ModelConfig(bad.model, bad.layers, l1=0.08, pv_l1=0.09)
    good.save(path)
    assert ModelConfig.load(path).l1 == 0.08
