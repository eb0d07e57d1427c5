"""The integration end to end: sliding-window models run sparse, the from_pretrained route, torch.compile
(fullgraph) and, on a GPU, CUDA-graph capture; and a forward pass that reads nothing on the host.

Tiny seeded random models, float32 on the CPU with the reference kernels (the GPU tests: bf16, Triton).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from calibrate.models import build_tiny_model, load_model, tiny_config  # noqa: E402
from sparge_core.integrations.transformers import DEFAULT_METHOD, apply, default_config, handle_of, remove  # noqa: E402
from sparge_core.ops.blocks import allowed_block_count  # noqa: E402

TINY_ATOL = 1e-4


def _ids(seed: int, n: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (batch, n), generator=g)


def _rel_l1(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().sum() / b.abs().sum()).item()


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _windowed_model(arch: str, window: int, seed: int = 4):
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    config.sliding_window = window
    config.initializer_range = 0.25
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


WINDOWED = [("mistral", [0, 1]), ("gemma3_text", [0])]  # (architecture, its sliding layers)


# ----------------------------------------------------------------------------------------------
# sliding-window layers stay sparse
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,sliding", WINDOWED)
def test_sliding_window_keep_everything_equals_sdpa(arch, sliding):
    n, window = 600, 200
    model = _windowed_model(arch, window)
    ids = _ids(1, n)
    ref = _logits(model, ids)
    handle = apply(model, "sparge", cdfthreshd=1.0, collect_stats=True)
    try:
        out = _logits(model, ids)
    finally:
        remove(model)
    assert (out - ref).abs().max().item() <= TINY_ATOL
    for layer in range(2):
        stats = handle.stats[layer]
        assert stats.sparse_calls == 1 and stats.dense_calls == 0
        w = window if layer in sliding else None
        heads = model.config.num_attention_heads
        assert int(stats.allowed.sum()) == heads * allowed_block_count(n, n, True, w)


@pytest.mark.parametrize("arch,sliding", WINDOWED)
def test_sliding_window_sparse_config_skips_blocks_inside_the_band(arch, sliding):
    n, window = 900, 300
    model = _windowed_model(arch, window)
    ids = _ids(2, n)
    ref = _logits(model, ids)
    handle = apply(model, "sparge-topk", simthreshd1=-1.0, topk=0.3, collect_stats=True)
    try:
        out = _logits(model, ids)
    finally:
        remove(model)
    heads = model.config.num_attention_heads
    for layer in sliding:
        stats = handle.stats[layer]
        band = heads * allowed_block_count(n, n, True, window)
        assert int(stats.allowed.sum()) == band and 0 < int(stats.computed.sum()) < band
    assert torch.isfinite(out).all() and (out - ref).abs().max().item() > 1e-3


def test_sliding_window_padded_batch_equals_separate_runs():
    model = _windowed_model("mistral", 150)
    seqs = [_ids(3, 420)[0], _ids(4, 260)[0]]
    apply(model, "sparge-topk", simthreshd1=-1.0, topk=0.5)
    try:
        alone = [_logits(model, s[None])[0] for s in seqs]
        width = max(s.numel() for s in seqs)
        ids = torch.zeros(2, width, dtype=torch.long)
        mask = torch.zeros(2, width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - s.numel():], mask[i, width - s.numel():] = s, 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        batch = _logits(model, ids, attention_mask=mask, position_ids=pos)
    finally:
        remove(model)
    for i in range(2):
        torch.testing.assert_close(batch[i, mask[i].bool()], alone[i], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# from_pretrained(..., attn_implementation="sparge")
# ----------------------------------------------------------------------------------------------
def test_from_pretrained_route_uses_the_default_and_apply_still_routes(tmp_path):
    from transformers import AutoModelForCausalLM

    source = build_tiny_model("llama", seed=5)
    source.save_pretrained(tmp_path)
    ids = _ids(6, 400)
    dense = _logits(source, ids)
    apply(source, default_config(source.config))
    try:
        want = _logits(source, ids)  # what the default routing computes
    finally:
        remove(source)

    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparge").eval()
    assert model.config._attn_implementation == "sparge"
    got = _logits(model, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - dense).abs().max().item() > 1e-3  # really sparse
    handle = handle_of(model)
    assert handle is not None and handle.description.startswith("default")
    assert DEFAULT_METHOD in handle.description or "SpargeTopk" in handle.description

    handle = apply(model, "sparge", cdfthreshd=1.0, collect_stats=True)  # apply still routes per layer
    try:
        torch.testing.assert_close(_logits(model, ids), dense, rtol=0, atol=TINY_ATOL)
        assert handle.sparsity_report()["total"]["sparse_calls"] == 2
    finally:
        remove(model)
    assert model.config._attn_implementation == "sparge"
    torch.testing.assert_close(_logits(model, ids), want, rtol=0, atol=1e-6)  # back to the default route

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    loaded.set_attn_implementation("sparge")
    torch.testing.assert_close(_logits(loaded, ids), want, rtol=0, atol=1e-6)


def test_from_pretrained_route_uses_a_config_saved_beside_the_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from sparge_core.params import LayerConfig, ModelConfig, ModelInfo, weights_fingerprint

    source = build_tiny_model("llama", seed=6)
    source.save_pretrained(tmp_path)
    heads = source.config.num_attention_heads
    layers = (LayerConfig(0, (-1.0,) * heads, (50.0,) * heads, cdfthreshd=(0.3,) * heads),
              LayerConfig.dense(1, heads))
    info = ModelInfo("tiny", 2, heads, source.config.num_key_value_heads, 64, architecture="llama",
                     fingerprint=weights_fingerprint(source))
    config = ModelConfig(model=info, layers=layers, l1=0.08, pv_l1=0.09)
    config.save_pretrained(tmp_path)
    ids = _ids(7, 400)
    apply(source, config)
    try:
        want = _logits(source, ids)
    finally:
        remove(source)
    assert (want - _logits(source, ids)).abs().max().item() > 1e-3  # the saved config is really sparse
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparge").eval()
    torch.testing.assert_close(_logits(model, ids), want, rtol=0, atol=1e-6)
    assert handle_of(model).methods[1] is None  # layer 1 kept dense, as the config says


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    model, _ = load_model("tiny-llama")
    return model


def _padded(seqs):
    width = max(s.numel() for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - s.numel():], mask[i, width - s.numel():] = s, 1
    return ids, mask


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_equals_eager(tiny_llama, compiler):
    torch._dynamo.reset()
    model = tiny_llama
    ids = _ids(7, 300)
    pad_ids, pad_mask = _padded([_ids(8, 300)[0], _ids(9, 200)[0]])
    cases = [dict(), dict(use_cache=False)]
    if compiler == "aot_eager":
        cases.append(dict(attention_mask=pad_mask, position_ids=(pad_mask.cumsum(-1) - 1).clamp(min=0)))
    apply(model, "sparge-topk", simthreshd1=-1.0, topk=0.4, backend="reference")
    try:
        compiled = torch.compile(model, fullgraph=True, backend=compiler)
        for kw in cases:
            x = pad_ids if "attention_mask" in kw else ids
            eager = _logits(model, x, **kw)
            got = _logits(compiled, x, **kw)
            # inductor fuses the model's own float32 ops differently (observed 1.5e-4); aot_eager is exact
            torch.testing.assert_close(got, eager, rtol=0, atol=1e-5 if compiler == "aot_eager" else 1e-3)
        sparse_eager = _logits(model, ids)
    finally:
        remove(model)
        torch._dynamo.reset()
    assert (sparse_eager - _logits(model, ids)).abs().max() > 1e-3  # sparge really changed the model


def test_forward_reads_nothing_on_the_host(tiny_llama, monkeypatch):
    """A prefill without a padding mask: sparge_core code calls no .item/.tolist/bool()/int()/nonzero
    on a tensor (each would wait for the GPU and forbid CUDA-graph capture), statistics included. The
    Triton executor is the path a GPU runs (here under the interpreter); the reference executor is a
    float32 oracle that checks its inputs for non-finite values on the host."""
    calls = []

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            if "sparge_core" in frame.f_code.co_filename:
                calls.append(f"{name} at {frame.f_code.co_filename}:{frame.f_lineno}")
            return original(self, *args, **kwargs)
        return wrapper

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled Triton on a GPU, the interpreter on CPU
    tiny_llama.to(dev)
    ids = _ids(10, 333).to(dev)
    handle = apply(tiny_llama, "sparge-topk", simthreshd1=[-0.1, 0.1, 0.2, 0.3], topk=0.4, collect_stats=True,
                   backend="triton")
    try:
        _logits(tiny_llama, ids)  # warms the device-value cache
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
            monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        _logits(tiny_llama, ids)
        monkeypatch.undo()
    finally:
        remove(tiny_llama)
    assert calls == []
    assert handle.sparsity_report()["total"]["sparse_calls"] == 4


# ----------------------------------------------------------------------------------------------
# GPU: compile with the Triton kernels, CUDA-graph capture and replay
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_compile_fullgraph_triton_gpu_equals_eager():
    torch._dynamo.reset()
    model = build_tiny_model("llama", dtype=torch.bfloat16, device="cuda", seed=1)
    ids = _ids(11, 1024).cuda()
    dense = _logits(model, ids)
    apply(model, "sparge-topk", simthreshd1=-1.0, topk=0.4)
    try:
        eager = _logits(model, ids)
        compiled = torch.compile(model, fullgraph=True)
        # Inductor fuses the bf16 norms and rotary embedding differently, so the predictor sees slightly
        # different Q/K and flips near-tied top-k picks of this random model: on an H200 the compiled
        # logits sit 5% (relative L1) from eager with the Triton and the reference executor alike,
        # while sparse attention itself moves them 61% from dense. The check: the compiled graph runs
        # (fullgraph: no break) and lands far closer to eager than sparsity moves it.
        for kw in ({}, {"use_cache": False}):
            out = _logits(compiled, ids, **kw)
            assert torch.isfinite(out).all()
            assert _rel_l1(out, eager) < 0.25 * _rel_l1(eager, dense)
    finally:
        remove(model)
        torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "int8"])
def test_cuda_graph_capture_and_replay_equal_eager(quant):
    model = build_tiny_model("llama", dtype=torch.bfloat16, device="cuda", seed=2)
    ids = _ids(12, 2048).cuda()
    other = _ids(13, 2048).cuda()
    apply(model, "sparge-topk", simthreshd1=-1.0, topk=0.4, quant=quant, backend="triton")
    try:
        eager, eager_other = _logits(model, ids), _logits(model, other)
        static = ids.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                model(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            out = model(static).logits
        graph.replay()
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        static.copy_(other)  # the map is predicted again from the new data
        graph.replay()
        torch.testing.assert_close(out, eager_other, rtol=0, atol=0)
    finally:
        remove(model)


@pytest.mark.gpu
def test_sparse_call_does_not_synchronise_gpu():
    from sparge_core.methods import get_method
    from sparge_core.synthetic import structured_qkv

    q, k, v = structured_qkv(1, 8, 2, 8192, 128, dtype=torch.bfloat16, device="cuda", seed=3)
    for name, kw in (("sparge-topk", dict(topk=0.3)), ("sparge", dict(cdfthreshd=0.9, estimator="keys"))):
        method = get_method(name, **kw)
        method(q, k, v, is_causal=True, quant="int8", window=3000)  # warm-up: compile, cache values
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, stats = method(q, k, v, is_causal=True, quant="int8", window=3000, return_stats=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert stats.qk_sparsity > 0 and torch.isfinite(out).all()
