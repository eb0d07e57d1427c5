"""sparge inside diffusers transformers: tiny random-weight Wan, Flux and CogVideoX built from
diffusers' own classes (CPU, no weights). Keeping everything equals dense, a calibrated per-layer
config runs sparse, the visual tokens (and only those) reach the method in Hilbert order, captures
round-trip through calibrate's capture reader and the calibration CLI, official SpargeAttn tuned
files apply, and bad setups fail with a clear message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from calibrate.capture import capture_diffusers, load_captured, read_meta  # noqa: E402
from sparge_core.integrations import diffusers as D  # noqa: E402
from sparge_core.methods.dense import Dense  # noqa: E402
from sparge_core.official import import_state_dict  # noqa: E402
from sparge_core.params import ConfigError, LayerConfig, ModelConfig  # noqa: E402
from sparge_core.permute import get_order, permute_tokens  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HEADS, HEAD_DIM, TEXT = 2, 64, 7


def _wan():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 2, 32, 32, generator=g),
        timestep=torch.tensor([700]),
        encoder_hidden_states=torch.randn(1, TEXT, 32, generator=g),
        return_dict=False,
    )
    return model.eval(), inputs, D.TokenLayout(0, (2, 16, 16))


def _flux(img_ids=None):
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        axes_dims_rope=(16, 24, 24),
    )
    h, w = 16, 24
    ids = (
        diffusers.FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)
        if img_ids is None
        else img_ids
    )
    g = torch.Generator().manual_seed(2)
    inputs = dict(
        hidden_states=torch.randn(1, h * w, 8, generator=g),
        encoder_hidden_states=torch.randn(1, TEXT, 32, generator=g),
        pooled_projections=torch.randn(1, 16, generator=g),
        timestep=torch.tensor([0.7]),
        img_ids=ids,
        txt_ids=torch.zeros(TEXT, 3),
        return_dict=False,
    )
    return model.eval(), inputs, D.TokenLayout(TEXT, (h, w))


def _cogvideox():
    torch.manual_seed(0)
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=32,
        num_layers=2,
        sample_width=32,
        sample_height=32,
        sample_frames=5,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT,
        use_rotary_positional_embeddings=True,
    )
    g = torch.Generator().manual_seed(3)
    # a classifier-free-guidance batch: row 0 unconditional, row 1 conditional
    inputs = dict(
        hidden_states=torch.randn(2, 2, 4, 32, 32, generator=g),
        encoder_hidden_states=torch.randn(2, TEXT, 32, generator=g),
        timestep=torch.tensor([700, 700]),
        image_rotary_emb=_cog_rope(2, 16, 16),
        return_dict=False,
    )
    return model.eval(), inputs, D.TokenLayout(TEXT, (2, 16, 16))


def _cog_rope(frames, h, w):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    # as CogVideoXPipeline._prepare_rotary_positional_embeddings does for CogVideoX 1.0 at the base size
    return get_3d_rotary_pos_embed(
        embed_dim=HEAD_DIM, crops_coords=((0, 0), (h, w)), grid_size=(h, w), temporal_size=frames
    )


MODELS = {"wan": _wan, "flux": _flux, "cogvideox": _cogvideox}


@pytest.fixture(scope="module", params=list(MODELS))
def built(request):
    model, inputs, layout = MODELS[request.param]()
    with torch.no_grad():
        dense = model(**inputs)[0]
    return request.param, model, inputs, layout, dense


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _restored(model) -> bool:
    return not any(isinstance(p, D.SpargeProcessor) for p in model.attn_processors.values())


# --------------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------------
def test_layers_are_the_self_attention_modules_in_module_order():
    assert D.attention_module_names(_wan()[0]) == ["blocks.0.attn1", "blocks.1.attn1"]
    assert D.attention_module_names(_flux()[0]) == [
        "transformer_blocks.0.attn",
        "single_transformer_blocks.0.attn",
    ]
    assert D.attention_module_names(_cogvideox()[0]) == [
        "transformer_blocks.0.attn1",
        "transformer_blocks.1.attn1",
    ]
    assert D.model_info(_wan()[0], "wan-tiny") == D.ModelInfo("wan-tiny", 2, HEADS, HEADS, HEAD_DIM)


def test_keep_everything_equals_dense(built):
    _, model, inputs, layout, dense = built
    for method, params in (("dense", {}), ("sparge", {"simthreshd1": 1.0, "cdfthreshd": 1.0})):
        with D.apply(model, method, **params) as handle:
            out = _run(model, inputs)
        summary = handle.summary()
        assert summary["calls"] == 2 and summary["layout"] == {
            "text_before": layout.text_before,
            "grid": list(layout.grid),
        }
        torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)
    assert _restored(model)
    torch.testing.assert_close(_run(model, inputs), dense, atol=0, rtol=0)


def test_a_calibrated_config_runs_sparse_per_layer(built, tmp_path):
    name, model, inputs, _, dense = built
    info = D.model_info(model, f"{name}-tiny")
    sparse = LayerConfig(0, (-1.0,) * HEADS, (50.0,) * HEADS, topk=(0.25,) * HEADS)
    config = ModelConfig(info, (sparse, LayerConfig.dense(1, HEADS)), l1=0.1, pv_l1=0.1)
    folder = tmp_path / "transformer"
    config.save_pretrained(folder)  # a config saved beside the model's weights loads by the folder
    with D.apply(model, folder) as handle:
        out = _run(model, inputs)
    summary = handle.summary()
    assert summary["per_layer"]["0"]["qk_sparsity"] > 0.5 and "1" not in summary["per_layer"]
    assert summary["dense_calls"] == {"1": 1}
    assert torch.isfinite(out).all() and (out - dense).abs().max() > 1e-4
    assert _restored(model)


class _Spy(Dense):
    """Keeps everything, records the q it was given."""

    def __init__(self):
        self.seen = []

    def attend(self, q, k, v, **kw):
        self.seen.append(q.clone())
        return super().attend(q, k, v, **kw)


def test_only_the_visual_tokens_reach_the_method_in_hilbert_order(built):
    _, model, inputs, layout, _ = built
    rowmajor = {}
    with D.capture(
        model, lambda layer, sample, q, k, v: rowmajor.setdefault((layer, sample), q.clone()), order=None
    ):
        _run(model, inputs)
    spy = _Spy()
    with D.apply(model, spy):
        _run(model, inputs)
    order = get_order("hilbert", layout.grid)
    q0 = rowmajor[(0, 0)]
    expected = permute_tokens(q0, order, layout.text_before)
    torch.testing.assert_close(spy.seen[0][:1], expected, atol=0, rtol=0)
    if layout.text_before:
        torch.testing.assert_close(
            spy.seen[0][:1, :, : layout.text_before], q0[:, :, : layout.text_before], atol=0, rtol=0
        )
    assert not torch.equal(spy.seen[0][:1], q0)  # the order did change something


def test_flux_tokens_that_are_not_one_grid_keep_their_order():
    h, w = 8, 12
    one = diffusers.FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)
    two = torch.cat([one, one + torch.tensor([1.0, 0, 0])])  # a second (reference) image, Kontext style
    model, inputs, _ = _flux(img_ids=two)
    inputs["hidden_states"] = torch.randn(1, 2 * h * w, 8)
    spy = _Spy()
    with D.apply(model, spy) as handle:
        _run(model, inputs)
    assert handle.summary()["layout"] is None
    captured = {}
    with D.capture(model, lambda layer, sample, q, k, v: captured.setdefault(layer, q), order=None):
        _run(model, inputs)
    torch.testing.assert_close(spy.seen[0], captured[0], atol=0, rtol=0)
    with (
        pytest.raises(ValueError, match="layout of this flux call is not known"),
        D.capture(model, lambda *a: None),
    ):
        _run(model, inputs)
    assert _restored(model)


# --------------------------------------------------------------------------------------------
# capture -> calibrate -> apply
# --------------------------------------------------------------------------------------------
def _denoise(model, inputs, timesteps):
    for t in timesteps:
        _run(model, {**inputs, "timestep": torch.full_like(inputs["timestep"], t)})


def test_capture_round_trips_through_calibrate(tmp_path):
    model, inputs, layout = _cogvideox()
    out = tmp_path / "cog.capture"
    # two generations of three steps; keep steps 0 and 2 and the conditional row of the CFG batch
    with capture_diffusers(model, out, model_name="cog-tiny", steps=[0, 2], rows=[1]) as handle:
        _denoise(model, inputs, [900, 600, 300])
        _denoise(model, inputs, [900, 600, 300])
    labels = [(s["generation"], s["step"], s["row"]) for s in handle.samples]
    assert labels == [(0, 0, 1), (0, 2, 1), (1, 0, 1), (1, 2, 1)]
    meta = read_meta(out)
    n = layout.text_before + layout.num_visual
    assert (meta.model, meta.num_layers, meta.num_heads, meta.head_dim, meta.seq_len, meta.samples) == (
        "cog-tiny",
        2,
        HEADS,
        HEAD_DIM,
        n,
        4,
    )
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["is_causal"] is False and on_disk["source"] == "diffusers"
    assert on_disk["token_layout"] == {"text_before": TEXT, "grid": [2, 16, 16], "order": "hilbert"}
    samples = load_captured(out, 1)
    assert (
        len(samples) == 4
        and samples[0][0].shape == (1, HEADS, n, HEAD_DIM)
        and samples[0][0].dtype == torch.float16
    )

    # what was stored is the conditional row's q of the last step-2 call, Hilbert-ordered visual tokens
    rowmajor = {}
    with D.capture(
        model, lambda layer, sample, q, k, v: rowmajor.setdefault(layer, q.clone()), order=None, rows=[1]
    ):
        _run(model, {**inputs, "timestep": torch.tensor([300, 300])})
    expected = permute_tokens(rowmajor[1], get_order("hilbert", layout.grid), TEXT)
    torch.testing.assert_close(samples[3][0].float(), expected.half().float(), atol=0, rtol=0)

    # sparge-calibrate reads it (non-causal), and the config it writes applies to the model
    config = tmp_path / "cog.json"
    cmd = [
        sys.executable,
        "-m",
        "calibrate",
        "--model",
        "cog-tiny",
        "--capture-dir",
        str(out),
        "--non-causal",
        "--samples",
        "3",
        "--holdout",
        "1",
        "--seq-len",
        str(n),
        "--device",
        "cpu",
        "--l1",
        "0.3",
        "--pv-l1",
        "0.35",
        "--thetas",
        "-1",
        "0.5",
        "--bisect-steps",
        "3",
        "--quiet",
        "--out",
        str(config),
    ]
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    calibrated = ModelConfig.load(config)
    assert calibrated.model.num_layers == 2 and any((lc.sparsity or 0) > 0 for lc in calibrated.layers)
    with D.apply(model, config) as applied:
        result = _run(model, inputs)
    assert (
        torch.isfinite(result).all() and applied.summary()["calls"] + sum(applied.dense_calls.values()) == 2
    )
    # the config records the captured model's identity: other weights of the same shape are refused
    assert calibrated.model.architecture == "CogVideoXTransformer3DModel" and calibrated.model.fingerprint
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(ConfigError, match="weights differ"):
        D.apply(model, config)
    D.apply(model, config, allow_other_model=True).remove()


def test_capture_refuses_changing_lengths_and_empty_runs(tmp_path):
    model, inputs, _ = _wan()
    with pytest.raises(ValueError, match="capture each resolution"), D.capture(model, lambda *a: None):
        _run(model, inputs)
        _run(model, {**inputs, "hidden_states": torch.randn(1, 4, 1, 32, 32)})
    assert _restored(model)
    with (
        pytest.raises(ValueError, match="nothing was captured"),
        capture_diffusers(model, tmp_path / "c", model_name="w"),
    ):
        pass
    assert not (tmp_path / "c" / "meta.json").exists()


def test_wan_conditional_and_unconditional_calls_share_a_step():
    model, inputs, _ = _wan()
    handle = D.capture(model, lambda *a: None, layers=[0])
    try:
        for t in (900, 900, 500, 500):  # Wan's pipeline: conditional then unconditional call per step
            _run(model, {**inputs, "timestep": torch.tensor([t])})
    finally:
        handle.remove()
    assert [(s["step"], s["call"]) for s in handle.samples] == [(0, 0), (0, 1), (1, 2), (1, 3)]


# --------------------------------------------------------------------------------------------
# official tuned files, errors, imports
# --------------------------------------------------------------------------------------------
def test_an_official_tuned_state_dict_applies_by_module_name():
    model, inputs, _ = _cogvideox()
    names = D.attention_module_names(model)
    state = {}
    for name in reversed(names):  # file order differs from the model's: names decide the layer
        state[f"{name}.inner_attention.simthreshd1"] = torch.full((HEADS,), -1.0)
        state[f"{name}.inner_attention.cdfthreshd"] = torch.full((HEADS,), 0.3)
        state[f"{name}.inner_attention.pvthreshd"] = torch.full((HEADS,), 50.0)
    config = import_state_dict(
        state, model_name="cog-tiny", head_dim=HEAD_DIM, l1=0.06, pv_l1=0.07, module_names=names
    )
    assert config.calibration["modules"] == {"0": names[0], "1": names[1]}
    with D.apply(model, config) as handle:
        _run(model, inputs)
    assert all(v["qk_sparsity"] > 0.2 for v in handle.summary()["per_layer"].values())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_bad_setups_fail_with_a_message():
    model, inputs, _ = _wan()
    with pytest.raises(ValueError, match="supported diffusers transformers"):
        D.apply(torch.nn.Linear(2, 2), "dense")
    handle = D.apply(model, "dense")
    with pytest.raises(ValueError, match="already installed"):
        D.apply(model, "dense")
    handle.remove()
    bad = ModelConfig(
        D.ModelInfo("x", 3, HEADS, HEADS, HEAD_DIM), (LayerConfig.dense(0, HEADS),), l1=0.1, pv_l1=0.1
    )
    with pytest.raises(ConfigError, match="num_layers"):
        D.apply(model, bad)
    with pytest.raises(TypeError, match="cannot be combined"):
        D.apply(model, bad, topk=0.5)
    with pytest.raises(ValueError, match="out of range"):
        D.capture(model, lambda *a: None, layers=[5])
    model.set_attention_backend("flex")  # not an SDPA call: sparge cannot route it
    try:
        with pytest.raises(RuntimeError, match="native backend"), D.apply(model, "dense"):
            _run(model, inputs)
    finally:
        model.reset_attention_backend()
    assert _restored(model)


def test_the_integration_does_not_import_diffusers():
    code = (
        "import sys, sparge_core.integrations.diffusers; "
        "assert 'diffusers' not in sys.modules, 'diffusers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO)


@pytest.mark.gpu
def test_keep_everything_equals_dense_on_gpu_fp16():
    """The Triton kernel inside a diffusers model on CUDA (fp16): keeping every block matches SDPA."""
    model, inputs, _ = _wan()
    model = model.to("cuda", torch.float16)
    inputs = {k: v.to("cuda", torch.float16 if v.is_floating_point() else v.dtype) if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}
    dense = _run(model, inputs).float()
    with D.apply(model, "sparge", simthreshd1=1.0, cdfthreshd=1.0, backend="triton") as handle:
        out = _run(model, inputs).float()
    assert handle.summary()["calls"] == 2
    assert (out - dense).abs().max().item() < 2e-2 * dense.abs().max().item()
    with D.apply(model, "sparge-topk", topk=0.3, backend="triton") as handle:
        sparse = _run(model, inputs).float()
    assert torch.isfinite(sparse).all() and handle.summary()["qk_sparsity"] > 0.5
