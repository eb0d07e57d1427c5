"""The DiT integration: model and sampler shapes, the attention_fn hook and adapter (dense when
keeping everything, token order applied and inverted exactly, per-layer configs), Q/K/V capture
files, procedural data and the training loop (tiny sizes, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from evals.dit import data
from evals.dit.model import (
    DiT,
    DiTConfig,
    SamplerConfig,
    load_checkpoint,
    rectified_flow_loss,
    sample,
    save_checkpoint,
)
from sparge_core.integrations.dit import QKVCapture, SparseDiTAttention, TokenLayout, install
from sparge_core.methods.base import AttentionMethod
from sparge_core.params import ConfigError, LayerConfig, ModelConfig, ModelInfo
from sparge_core.permute import get_order, permute_tokens, unpermute_tokens
from sparge_core.stats import SparsityStats

IMG = DiTConfig(frames=1, size=12, dim=64, depth=2, heads=2)  # 144 visual + 8 text tokens
VID = DiTConfig(frames=3, size=6, dim=64, depth=2, heads=2)  # 108 visual + 8 text tokens
FAST = SamplerConfig(steps=3, cfg_scale=2.0)


def _model(cfg: DiTConfig, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    m = DiT(cfg).eval()
    # adaLN-Zero starts as the identity; give every zero-initialised layer random weights so
    # attention actually shapes the output
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith(("blocks.", "ada_out", "out")) and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m


CAPTIONS = ["a red circle in the top left", "a blue cross in the center"]
VCAPTIONS = ["a green square moving up", "a cyan triangle moving right"]


# --------------------------------------------------------------------------------------------
# model and sampler
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [IMG, VID], ids=["image", "video"])
def test_forward_and_sampler_shapes(cfg):
    m = _model(cfg)
    b = 2
    shape = (b, 3, cfg.frames, cfg.size, cfg.size) if cfg.is_video else (b, 3, cfg.size, cfg.size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    text = data.tokenize(VCAPTIONS if cfg.is_video else CAPTIONS)
    v = m(x, torch.rand(b), text)
    assert v.shape == shape and torch.isfinite(v).all()
    assert m.layout.text_before == cfg.context_length and math.prod(m.layout.grid) == cfg.num_visual_tokens
    out = sample(m, VCAPTIONS if cfg.is_video else CAPTIONS, seed=3, sampler=FAST)
    assert out.shape == shape and out.abs().max() <= 1
    assert torch.equal(out, sample(m, VCAPTIONS if cfg.is_video else CAPTIONS, seed=3, sampler=FAST))
    assert not torch.equal(out, sample(m, VCAPTIONS if cfg.is_video else CAPTIONS, seed=4, sampler=FAST))


def test_patchify_roundtrip_and_loss_backward():
    cfg = DiTConfig(frames=2, size=8, patch=2, dim=64, depth=1, heads=2)
    m = _model(cfg)
    x = torch.randn(2, 3, 2, 8, 8)
    assert m.patchify(x).shape == (2, cfg.num_visual_tokens, 12)
    assert torch.equal(m.unpatchify(m.patchify(x)), x)
    loss = rectified_flow_loss(m, x, data.tokenize(VCAPTIONS), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and m.patch_embed.weight.grad.abs().sum() > 0


def test_checkpoint_roundtrip(tmp_path):
    m = _model(IMG)
    save_checkpoint(m, tmp_path / "m.pt", {"note": "x"})
    m2, info = load_checkpoint(tmp_path / "m.pt")
    assert info == {"note": "x"} and m2.cfg == IMG
    x = torch.randn(1, 3, 12, 12)
    text = data.tokenize(CAPTIONS[:1])
    # weights are stored in fp16: outputs agree to fp16 rounding of the weights
    assert torch.allclose(m(x, torch.tensor([0.5]), text), m2(x, torch.tensor([0.5]), text), atol=2e-2)
    with pytest.raises(ValueError, match="not a sparge DiT checkpoint"):
        torch.save({"x": 1}, tmp_path / "bad.pt")
        load_checkpoint(tmp_path / "bad.pt")


# --------------------------------------------------------------------------------------------
# the adapter
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,order", [(IMG, "hilbert"), (VID, "hilbert"), (VID, "random")], ids=["img", "vid", "rand"])
def test_adapter_keeping_everything_equals_dense(cfg, order):
    m = _model(cfg)
    captions = VCAPTIONS if cfg.is_video else CAPTIONS
    ref = sample(m, captions, seed=5, sampler=FAST)
    fn = SparseDiTAttention.from_method("sparge", m.layout, order=order, backend="reference",
                                        params={"cdfthreshd": 1.0, "simthreshd1": 0.0})
    with install(m, fn):
        out = sample(m, captions, seed=5, sampler=FAST)
    assert (out - ref).abs().max() < 1e-4
    s = fn.summary()
    assert s["sparsity"] == 0.0 and s["calls"] == cfg.depth * FAST.steps
    # the hook is removed on exit: the model is dense again
    assert all(a.attention_fn.__name__ == "sdpa_attention" for a in m.attention_modules)


def test_adapter_sparse_setting_changes_output_and_counts_sparsity():
    cfg = DiTConfig(frames=1, size=16, dim=64, depth=2, heads=2)  # 256 + 8 tokens: 3 query / 5 key blocks
    m = _model(cfg)
    ref = sample(m, CAPTIONS, seed=5, sampler=FAST)
    fn = SparseDiTAttention.from_method("sparge-topk", m.layout, backend="reference",
                                        params={"topk": 0.2, "simthreshd1": -1.0})
    with install(m, fn):
        out = sample(m, CAPTIONS, seed=5, sampler=FAST)
    assert fn.summary()["sparsity"] > 0.3
    assert (out - ref).abs().max() > 1e-4


class _Spy(AttentionMethod):
    """Returns 2 * v as the 'attention' output and remembers what it was given."""

    name = "spy"

    def __init__(self):
        self.seen = []

    def block_mask(self, q, k, *, is_causal, scale=None):
        raise NotImplementedError

    def attend(self, q, k, v, *, is_causal=False, scale=None, backend="auto", quant="auto"):
        self.seen.append((q.clone(), k.clone(), v.clone()))
        ones = torch.ones(q.shape[0], q.shape[1], dtype=torch.int64)
        return 2 * v, SparsityStats(ones * 4, ones * 3, ones * 0)


@pytest.mark.parametrize("grid", [(5, 7), (3, 4, 5)])
def test_adapter_applies_the_order_to_visual_tokens_and_inverts_it(grid):
    text_before, text_after = 6, 3
    layout = TokenLayout(text_before, grid)
    n = text_before + math.prod(grid) + text_after
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for _ in range(3))
    spy = _Spy()
    fn = SparseDiTAttention(lambda layer: spy, layout, order="hilbert")
    out = fn(q, k, v, 0)
    order = get_order("hilbert", grid)
    for seen, orig in zip(spy.seen[0], (q, k, v)):
        assert torch.equal(seen, permute_tokens(orig, order, text_before))
        assert torch.equal(seen[:, :, :text_before], orig[:, :, :text_before])
        assert torch.equal(seen[:, :, -text_after:], orig[:, :, -text_after:])
    assert not torch.equal(spy.seen[0][0], q)
    assert torch.equal(out, 2 * v)  # inverse applied exactly
    assert fn.summary()["qk_sparsity"] == pytest.approx(0.25)


def test_adapter_rejects_a_layout_that_does_not_fit():
    fn = SparseDiTAttention(lambda layer: _Spy(), TokenLayout(8, (4, 4)), order="hilbert")
    with pytest.raises(ValueError, match="layout needs"):
        fn(*(torch.randn(1, 1, 20, 8) for _ in range(3)), 0)


def _config(num_layers, heads, head_dim, dense_layers=()):
    layers = []
    for i in range(num_layers):
        if i in dense_layers:
            layers.append(LayerConfig.dense(i, heads))
        else:
            layers.append(LayerConfig(i, (0.0,) * heads, (50.0,) * heads, cdfthreshd=(0.5,) * heads))
    return ModelConfig(ModelInfo("tiny-dit", num_layers, heads, heads, head_dim), tuple(layers), l1=0.05, pv_l1=0.06)


def test_adapter_from_per_layer_config():
    cfg = DiTConfig(frames=1, size=16, dim=64, depth=2, heads=2)
    m = _model(cfg)
    conf = _config(2, 2, 32, dense_layers=(0,))
    fn = SparseDiTAttention.from_config(conf, m.layout, backend="reference", num_layers=2, num_heads=2, head_dim=32)
    assert fn.methods(0).name == "dense" and fn.methods(1).name == "sparge"
    with install(m, fn):
        sample(m, CAPTIONS, seed=0, sampler=FAST)
    per_layer = fn.summary()["per_layer"]
    assert per_layer["0"]["sparsity"] == 0.0 and per_layer["1"]["sparsity"] > 0.0
    with pytest.raises(ConfigError, match="num_layers"):
        SparseDiTAttention.from_config(conf, m.layout, num_layers=3, num_heads=2, head_dim=32)
    with pytest.raises(KeyError, match="no entry for layer 5"):
        fn.methods(5)


# --------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------
def test_capture_writes_one_file_per_layer_and_prompt_step(tmp_path):
    pytest.importorskip("safetensors")
    from evals.dit.capture import capture_dit, load_sample

    m = _model(VID)
    meta = capture_dit(m, VCAPTIONS, tmp_path / "cap", sampler=FAST, steps=[0, 2], seed=1, batch=1)
    assert meta["samples"] == 4 and meta["layers"] == [0, 1]
    files = sorted(p.relative_to(tmp_path / "cap").as_posix() for p in (tmp_path / "cap").rglob("*.safetensors"))
    assert files == [f"L{layer:03d}/S{s:03d}.safetensors" for layer in range(2) for s in range(4)]
    on_disk = json.loads((tmp_path / "cap" / "meta.json").read_text())
    assert on_disk["token_layout"] == {"text_before": 8, "grid": [3, 6, 6], "order": "row-major"}
    assert [(r["prompt"], r["step"]) for r in on_disk["sample_info"]] == [(0, 0), (0, 2), (1, 0), (1, 2)]
    try:  # the LLM capture's reader accepts the DiT capture
        from calibrate.capture import CaptureMeta, load_captured
    except ImportError:
        CaptureMeta = None
    if CaptureMeta is not None:
        parsed = CaptureMeta.from_dict(on_disk)
        assert (parsed.samples, parsed.num_heads, parsed.layers) == (4, VID.heads, (0, 1))
        assert len(load_captured(tmp_path / "cap", 1)) == 4
    q, k, v = load_sample(tmp_path / "cap", 1, 2)
    n = 8 + VID.num_visual_tokens
    assert q.shape == k.shape == v.shape == (1, VID.heads, n, VID.head_dim) and q.dtype == torch.float16

    # the stored tensors are what the layer's attention received: recompute sample 2 (prompt 1,
    # step 0) by capturing in memory, and in Hilbert order they are the permuted tensors
    got = {}
    hook = QKVCapture(lambda layer, sid, *t: got.setdefault((layer, sid), t))
    with install(m, hook):
        hook.set_context(sample_ids=[0])
        sample(m, VCAPTIONS[1:], seed=2, sampler=SamplerConfig(steps=1, cfg_scale=2.0))
    assert torch.allclose(got[(1, 0)][0].half().float(), q.float(), atol=1e-3)
    meta_h = capture_dit(m, VCAPTIONS[1:], tmp_path / "h", sampler=FAST, steps=[0], seed=2, order="hilbert", layers=[1])
    assert meta_h["layers"] == [1] and meta_h["token_layout"]["order"] == "hilbert"
    qh = load_sample(tmp_path / "h", 1, 0)[0]
    assert torch.equal(qh, permute_tokens(q, get_order("hilbert", (3, 6, 6)), 8))
    assert torch.equal(unpermute_tokens(qh, get_order("hilbert", (3, 6, 6)), 8), q)


def test_capture_skips_unlabelled_rows():
    rec = []
    hook = QKVCapture(lambda layer, sid, q, k, v: rec.append((layer, sid, q.shape)))
    q = torch.randn(4, 2, 10, 8)
    hook.set_context(sample_ids=[7, None, 9])
    hook(q, q, q, 3)
    assert rec == [(3, 7, (1, 2, 10, 8)), (3, 9, (1, 2, 10, 8))]
    with pytest.raises(ValueError, match="sample ids"):
        hook.set_context(sample_ids=[1] * 5)
        hook(q, q, q, 0)


# --------------------------------------------------------------------------------------------
# data and training
# --------------------------------------------------------------------------------------------
def test_attribute_readers_recover_rendered_attributes():
    g = torch.Generator().manual_seed(7)
    specs = data.all_specs(video=False)[::2]
    acc = data.attribute_accuracy(specs, data.read_image_attributes(data.render_images(specs, generator=g)))
    assert acc["colour"] == 1.0 and acc["position"] == 1.0 and acc["shape"] >= 0.95
    vspecs = data.all_specs(video=True)
    vacc = data.attribute_accuracy(vspecs, data.read_video_attributes(data.render_videos(vspecs, generator=g)))
    assert vacc["colour"] == 1.0 and vacc["direction"] == 1.0 and vacc["shape"] >= 0.9
    # shuffled captions are mostly wrong
    wrong = data.attribute_accuracy(specs[1:] + specs[:1], data.read_image_attributes(data.render_images(specs)))
    assert wrong["colour"] < 0.2
    assert wrong["all"] < 0.2


def test_tokenizer():
    ids = data.tokenize(["a red circle in the top left", ""])
    assert ids.shape == (2, data.CONTEXT_LENGTH)
    assert ids[0, 7] == data.TOKEN_ID[data.EOT] == len(data.VOCAB) - 1 == ids.max()
    assert ids[1, 0] == data.TOKEN_ID[data.NULL]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        data.tokenize(["a purple circle"])


def test_training_loop_smoke(tmp_path):
    from evals.dit.train import DIT_PRESETS, TrainConfig, train_dit

    info = train_dit(DIT_PRESETS.get("image-tiny"), TrainConfig(steps=2, batch=2, log_every=1), tmp_path / "t.pt",
                     eval_samples=2, eval_steps=2)
    assert info["steps"] == 2 and (tmp_path / "t.pt").stat().st_size < 50e6
    assert (tmp_path / "t.pt.samples.png").read_bytes()[:4] == b"\x89PNG"
    m, saved = load_checkpoint(tmp_path / "t.pt")
    assert saved["steps"] == 2 and m.cfg == DIT_PRESETS.get("image-tiny")


# --------------------------------------------------------------------------------------------
# sample grids (Pillow)
# --------------------------------------------------------------------------------------------
def test_png_grid_round_trips_through_pillow(tmp_path):
    from PIL import Image

    from evals.dit.grid import image_grid, save_png, video_grid

    g = torch.Generator().manual_seed(3)
    images = torch.rand(5, 3, 4, 6, generator=g)
    grid = image_grid(images, cols=3)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 7 + 1)
    path = tmp_path / "sub" / "grid.png"
    save_png(path, grid, scale=2)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (2 * grid.shape[2], 2 * grid.shape[1])
        pixels = torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1)
    expected = (grid.clamp(0, 1) * 255).round().to(torch.uint8).repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(pixels, expected)
    assert (path.stat().st_mode & 0o777) != 0o600 and not list(path.parent.glob(".*.tmp"))
    assert video_grid(torch.rand(2, 3, 4, 5, 5, generator=g)).shape == (3, 2 * 6 + 1, 4 * 6 + 1)
    with pytest.raises(ValueError, match="RGB"):
        save_png(tmp_path / "x.png", torch.rand(1, 4, 4))


def test_package_data_names_existing_files():
    """Every package-data pattern in pyproject.toml matches files (the wheel ships them), and the
    bundled checkpoints resolve and load."""
    from pathlib import Path

    import tomllib

    from evals.dit.model import bundled_checkpoint

    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, patterns in declared.items():
        for pattern in patterns:
            assert list((root / package).glob(pattern)), f"package-data {package}/{pattern} matches no file"
    model, info = load_checkpoint(bundled_checkpoint("t2i"))
    assert model.cfg.size == 32 and isinstance(info, dict)
    with pytest.raises(FileNotFoundError, match="t2i"):
        bundled_checkpoint("nope")
