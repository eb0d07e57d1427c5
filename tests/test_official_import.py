"""sparge_core.official: tuned state dicts in the official SpargeAttn layout (built here with
torch.save, as its tuner saves them) become per-layer, per-head configs; what cannot be mapped is
refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from sparge_core.official import bounds_from_file_name, import_state_dict, load_official, main
from sparge_core.params import ConfigError, ModelConfig

HEADS = 4


def _module(sim, cdf, pv, *, sparse=None, sim2=None, topk=None) -> dict[str, torch.Tensor]:
    d = {"simthreshd1": torch.tensor(sim), "pvthreshd": torch.tensor(pv)}
    if topk is not None:
        d["topk"] = torch.tensor(topk)
    else:
        d["cdfthreshd"] = torch.tensor(cdf)
    d["is_sparse"] = torch.tensor(sparse if sparse is not None else [True] * len(sim))
    d["simthreshd2"] = torch.tensor(sim2 if sim2 is not None else [0.0] * len(sim))
    return d


def _state(modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The official tuner's layout: '<module>.inner_attention.<param>', modules in model order."""
    return {
        f"{name}.inner_attention.{param}": value
        for name, params in modules.items()
        for param, value in params.items()
    }


MODULES = {  # insertion (model) order; block 10 before block 2 on purpose: the file order wins, not sorting
    "transformer_blocks.0.attn1": _module(
        [1.0, -0.9375, 0.3125, 1.0],
        [1.0, 0.95, 0.9, 1.0],
        [49.97, 4.4, 2.2, 50.0],
        sparse=[False, True, True, False],
    ),
    "transformer_blocks.10.attn1": _module([0.0625] * HEADS, [0.98, 0.97, 0.96, 0.5], [20.0, 1.5, 0.3, 0.0]),
    "transformer_blocks.2.attn1": _module([-1.0] * HEADS, [0.1] * HEADS, [10.0] * HEADS),
}


def test_import_maps_each_module_to_a_layer_per_head(tmp_path):
    path = tmp_path / "CogVideoX-tiny_0.06_0.07.pt"
    torch.save(_state(MODULES), path)
    config = load_official(path, model_name="cog-tiny", head_dim=64)
    assert (config.l1, config.pv_l1) == (0.06, 0.07)
    assert (
        config.model.name,
        config.model.num_layers,
        config.model.num_heads,
        config.model.num_kv_heads,
        config.model.head_dim,
    ) == ("cog-tiny", 3, HEADS, HEADS, 64)
    for layer, params in enumerate(MODULES.values()):
        lc = config.layer(layer)
        for name in ("simthreshd1", "cdfthreshd", "pvthreshd"):
            assert getattr(lc, name) == pytest.approx(params[name].tolist()), (layer, name)
        assert lc.topk is None and lc.estimator == "pooled"
    assert config.calibration["modules"] == {
        "0": "transformer_blocks.0.attn1",
        "1": "transformer_blocks.10.attn1",
        "2": "transformer_blocks.2.attn1",
    }
    assert config.calibration["heads_tuned_dense"] == 2 and len(config.calibration["state_dict_sha256"]) == 64
    assert path.name in config.calibration["source"]
    assert (
        not config.layer(0).is_dense and config.layer(0).kwargs()["cdfthreshd"][0] == 1.0
    )  # head 0 keeps all
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # a valid config file


def test_module_names_give_the_layer_order_and_rename_maps_names():
    state = _state(
        {
            "blocks.1.self_attn": MODULES["transformer_blocks.2.attn1"],
            "blocks.0.self_attn": MODULES["transformer_blocks.10.attn1"],
        }
    )
    names = ["blocks.0.attn1", "blocks.1.attn1", "blocks.2.attn1"]
    config = import_state_dict(
        state,
        model_name="wan-tiny",
        head_dim=128,
        l1=0.05,
        pv_l1=0.06,
        module_names=names,
        rename={"self_attn": "attn1"},
    )
    assert config.model.num_layers == 3 and [lc.layer for lc in config.layers] == [0, 1]
    assert config.layer(1).cdfthreshd == pytest.approx([0.1] * HEADS)
    with pytest.raises(ConfigError, match=r"'blocks.1.self_attn'.*not one of the target's attention modules"):
        import_state_dict(state, model_name="w", head_dim=64, l1=0.05, pv_l1=0.06, module_names=names)


def test_topk_files_map_to_topk_layers():
    state = _state({"attn": _module([-0.1] * 2, None, [50.0] * 2, topk=[0.5, 0.25])})
    lc = import_state_dict(state, model_name="m", head_dim=64, l1=0.05, pv_l1=0.06).layer(0)
    assert lc.topk == pytest.approx((0.5, 0.25)) and lc.cdfthreshd is None


def _broken(edit) -> dict:
    modules = {name: dict(params) for name, params in MODULES.items()}
    edit(modules)
    return _state(modules)


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda m: m["transformer_blocks.2.attn1"].update(temperature=torch.ones(HEADS)),
            r"'transformer_blocks.2.attn1.inner_attention.temperature' is not a SpargeAttn tuned "
            r"hyperparameter",
        ),
        (
            lambda m: m["transformer_blocks.2.attn1"].pop("pvthreshd"),
            r"'transformer_blocks.2.attn1.inner_attention' has no pvthreshd",
        ),
        (
            lambda m: m["transformer_blocks.2.attn1"].update(topk=torch.full((HEADS,), 0.5)),
            "exactly one of cdfthreshd and topk",
        ),
        (
            lambda m: m["transformer_blocks.0.attn1"].update(simthreshd2=torch.full((HEADS,), 0.3)),
            r"transformer_blocks.0.attn1.inner_attention.simthreshd2 is non-zero",
        ),
        (
            lambda m: m["transformer_blocks.2.attn1"].update(cdfthreshd=torch.full((HEADS + 1,), 0.5)),
            r"cdfthreshd has 5 heads but other modules have 4",
        ),
        (
            lambda m: m["transformer_blocks.10.attn1"].update(cdfthreshd=torch.tensor([0.5, 1.5, 0.5, 0.5])),
            r"transformer_blocks.10.attn1.inner_attention.cdfthreshd\[1\] is 1.5, outside \[0.0, 1.0\]",
        ),
        (
            lambda m: m["transformer_blocks.10.attn1"].update(
                pvthreshd=torch.tensor([1.0, float("nan"), 1.0, 1.0])
            ),
            r"pvthreshd\[1\] is nan",
        ),
        (
            lambda m: m["transformer_blocks.10.attn1"].update(simthreshd1=torch.ones(2, 2)),
            "must be a 1-D per-head tensor",
        ),
        (
            lambda m: m["transformer_blocks.10.attn1"].update(is_sparse=torch.ones(HEADS)),
            "is_sparse must be a bool tensor",
        ),
    ],
)
def test_what_cannot_be_mapped_is_refused_by_name(edit, message):
    with pytest.raises(ConfigError, match=message):
        import_state_dict(_broken(edit), model_name="m", head_dim=64, l1=0.05, pv_l1=0.06)


def test_files_without_bounds_or_tensors_are_refused(tmp_path):
    assert bounds_from_file_name("CogVideoX-2b_0.06_0.07.pt") == (0.06, 0.07)
    assert bounds_from_file_name("tuned.pt") is None
    plain = tmp_path / "tuned.pt"
    torch.save(_state(MODULES), plain)
    with pytest.raises(ConfigError, match="pass l1 and pv_l1"):
        load_official(plain, model_name="m", head_dim=64)
    assert load_official(plain, model_name="m", head_dim=64, l1=0.1, pv_l1=0.2).l1 == 0.1
    odd = tmp_path / "odd_0.1_0.2.pt"
    torch.save({"x": object()}, odd)
    with pytest.raises(ConfigError, match="not a torch.save file of plain tensors"):
        load_official(odd, model_name="m", head_dim=64)
    with pytest.raises(ConfigError, match="non-empty dict"):
        import_state_dict({}, model_name="m", head_dim=64, l1=0.1, pv_l1=0.2)


def test_cli_writes_a_config_and_exits_2_on_bad_input(tmp_path, capsys):
    path = tmp_path / "Model_0.05_0.06.pt"
    torch.save(_state(MODULES), path)
    folder = tmp_path / "model"  # a folder that does not exist yet: written as <folder>/sparge_config.json
    assert main([str(path), "--out", str(folder), "--model", "m", "--head-dim", "64"]) == 0
    assert ModelConfig.load(folder).model.num_layers == 3
    assert main([str(path), "--out", str(tmp_path / "c.json"), "--model", "m", "--head-dim", "64"]) == 0
    assert ModelConfig.load(tmp_path / "c.json").model.num_layers == 3
    torch.save(_broken(lambda m: m["transformer_blocks.2.attn1"].pop("simthreshd1")), path)
    assert main([str(path), "--out", str(tmp_path / "x.json"), "--model", "m", "--head-dim", "64"]) == 2
    assert "has no simthreshd1" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
