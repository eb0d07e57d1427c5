"""CUDA-graph replay of repeated calls (sparge_core.graphs): eligibility and bookkeeping on any device,
replay equal to the eager call on the GPU (fresh data after capture, shared buffers, eviction, failed
captures, statistics, non-finite inputs, a whole transformers model)."""

import pytest
import torch

from sparge_core import graphs, sparge_attn, validation
from sparge_core.graphs import GraphCache, graphable


def _qkv(hq, hkv, n, d, *, device, seed, dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(1, h, n, d, device=device, dtype=dtype, generator=g) for h in (hq, hkv, hkv))


# --------------------------------------------------------------------------------------------
# any device
# --------------------------------------------------------------------------------------------
def test_cpu_calls_run_eagerly_every_time():
    cache = GraphCache()
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    x = torch.randn(4, 5)
    for _ in range(3):
        torch.testing.assert_close(cache.run("owner", fn, (x,)), x * 2)
    assert len(calls) == 3 and cache.captures == 0 and cache.replays == 0 and len(cache) == 0
    assert not graphable((x,))


def test_graphable_refuses_mixed_or_empty_inputs():
    assert not graphable(())
    assert not graphable((torch.randn(2), "not a tensor"))


def test_static_buffer_keeps_shape_strides_and_offset():
    base = torch.randn(2, 7, 3, 16)
    view = base.transpose(1, 2)[:, :, 1:]  # non-contiguous, with a storage offset
    static = graphs._static_like(view)
    assert static.shape == view.shape and static.stride() == view.stride()
    assert static.storage_offset() == view.storage_offset()
    static.copy_(view)
    torch.testing.assert_close(static, view, rtol=0, atol=0)


def test_max_geometries_is_checked():
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="max_geometries"):
            GraphCache(max_geometries=bad)


def test_pinned_device_values_records_what_it_hands_out():
    values = (0.25, 0.5, 0.75)
    outside = validation.device_values(values, "cpu")
    with validation.pinned_device_values() as pinned:
        inside = validation.device_values(values, "cpu")
        validation.device_values((1.0,), "cpu", torch.float64)
    assert inside is outside  # the by-value cache still answers
    assert len(pinned) == 2 and pinned[0] is inside and pinned[1].dtype == torch.float64
    validation.device_values((2.0,), "cpu")
    assert len(pinned) == 2  # nothing recorded after the block


def test_apply_checks_cuda_graphs_flag():
    from calibrate.models import build_tiny_model
    from sparge_core.integrations.transformers import apply

    model = build_tiny_model("llama")
    with pytest.raises(TypeError, match="cuda_graphs"):
        apply(model, "sparge-topk", cuda_graphs="yes")


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------
CASES = [  # hq, hkv, n, d, causal, kwargs
    (9, 3, 2048, 64, True, dict()),
    (8, 2, 1000, 128, True, dict(quant="int8", topk=0.3, cdfthreshd=None, simthreshd1=-1.0)),
    (4, 4, 777, 64, False, dict(cdfthreshd=0.9, estimator="keys", pvthreshd=20.0)),
    (8, 1, 1536, 128, True, dict(quant="int8-fp8", cdfthreshd=0.9, pvthreshd=8.0, window=700)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,n,d,causal,kw", CASES)
def test_replay_equals_eager_on_fresh_data(hq, hkv, n, d, causal, kw):
    cache = GraphCache()

    def fn(q, k, v):
        out, st = sparge_attn(q, k, v, is_causal=causal, return_stats=True, **kw)
        return out, st.computed_blocks, st.pv_skipped_blocks

    for seed in range(4):  # eager, capture + replay, replay, replay: each on new data
        q, k, v = _qkv(hq, hkv, n, d, device="cuda", seed=seed)
        want = fn(q, k, v)
        got = cache.run("layer", fn, (q, k, v), clone=(0,))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert cache.captures == 1 and cache.replays == 3


@pytest.mark.gpu
def test_owners_share_buffers_and_each_replays_its_own_call():
    cache = GraphCache()
    owners = {f"layer{i}": dict(topk=t, cdfthreshd=None, simthreshd1=-1.0) for i, t in enumerate((0.2, 0.5, 0.8))}
    for seed in range(3):
        q, k, v = _qkv(8, 2, 2048, 128, device="cuda", seed=10 + seed)
        for owner, kw in owners.items():
            fn = lambda q, k, v, kw=kw: sparge_attn(q, k, v, is_causal=True, **kw)  # noqa: E731
            torch.testing.assert_close(cache.run(owner, fn, (q, k, v), clone=(0,)), fn(q, k, v), rtol=0, atol=0)
    assert len(cache._geometries) == 1 and len(cache) == 3 and cache.captures == 3


@pytest.mark.gpu
def test_eviction_keeps_results_right():
    cache = GraphCache(max_geometries=1)
    fn = lambda q, k, v: sparge_attn(q, k, v, is_causal=True, topk=0.4, cdfthreshd=None)  # noqa: E731
    for step in range(8):
        n = (1024, 1536)[step % 2 if step >= 4 else step // 2]
        q, k, v = _qkv(4, 2, n, 64, device="cuda", seed=20 + step)
        torch.testing.assert_close(cache.run("layer", fn, (q, k, v), clone=(0,)), fn(q, k, v), rtol=0, atol=0)
    assert len(cache._geometries) == 1 and cache.captures >= 2


@pytest.mark.gpu
def test_a_call_that_cannot_be_captured_stays_eager(caplog):
    cache = GraphCache()

    def fn(q, k, v):  # reads the device on the host: not capturable
        return sparge_attn(q, k, v, is_causal=True) * float(q.abs().max().item() > 0)

    for seed in range(3):
        q, k, v = _qkv(4, 2, 1024, 64, device="cuda", seed=30 + seed)
        torch.testing.assert_close(cache.run("layer", fn, (q, k, v)), fn(q, k, v), rtol=0, atol=0)
    assert cache.captures == 0 and cache.replays == 0
    assert "could not be captured" in caplog.text
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_non_finite_inputs_propagate_through_a_replay():
    cache = GraphCache()
    fn = lambda q, k, v: sparge_attn(q, k, v, is_causal=True, topk=0.5, cdfthreshd=None)  # noqa: E731
    for seed in range(3):
        q, k, v = _qkv(4, 2, 1024, 64, device="cuda", seed=40 + seed)
        if seed == 2:
            v[0, 1, 5] = float("nan")
            q[0, 0, 300] = float("inf")
        got, want = cache.run("layer", fn, (q, k, v), clone=(0,)), fn(q, k, v)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert cache.replays == 2 and torch.isnan(got).any()


@pytest.mark.gpu
def test_autograd_and_large_calls_are_not_graphed():
    q, k, v = _qkv(4, 2, 1024, 64, device="cuda", seed=50)
    assert graphable((q, k, v))
    q.requires_grad_(True)
    assert not graphable((q, k, v))
    with torch.no_grad():
        assert graphable((q, k, v))
    big = torch.empty(graphs.MAX_GRAPH_ELEMENTS + 1, device="cuda", dtype=torch.bfloat16)
    assert not graphable((big,))


@pytest.mark.gpu
@pytest.mark.parametrize("collect_stats", [False, True])
def test_model_with_layer_graphs_equals_eager(collect_stats):
    from calibrate.models import build_tiny_model
    from sparge_core.integrations.transformers import apply, remove

    model = build_tiny_model("llama", dtype=torch.bfloat16, device="cuda", seed=3)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(3, model.config.vocab_size, (1, 1800), generator=g).cuda() for _ in range(4)]
    results = {}
    for graphs_on in (False, True):
        handle = apply(model, "sparge-topk", simthreshd1=-1.0, topk=0.4, collect_stats=collect_stats,
                       cuda_graphs=graphs_on)
        try:
            with torch.no_grad():
                results[graphs_on] = [model(ids).logits for ids in batches]
            report = handle.sparsity_report() if collect_stats else None
            replays = handle.graphs.replays
        finally:
            remove(model)
        results[graphs_on].append(report)
        if graphs_on:
            assert replays == 3 * model.config.num_hidden_layers  # calls 2 (captured), 3 and 4 of each layer
        else:
            assert replays == 0
    for a, b in zip(results[False][:-1], results[True][:-1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert results[False][-1] == results[True][-1]


@pytest.mark.gpu
def test_dit_attention_with_graphs_equals_eager():
    from sparge_core.integrations.dit import SparseDiTAttention, TokenLayout

    layout = TokenLayout(8, (32, 32))  # 8 text tokens, then 1024 visual tokens in Hilbert order
    fns = {on: SparseDiTAttention.from_method("sparge-topk", layout, params={"topk": 0.3, "simthreshd1": -1.0},
                                              cuda_graphs=on) for on in (False, True)}
    for seed in range(4):
        q, k, v = _qkv(4, 4, 8 + 32 * 32, 64, device="cuda", seed=60 + seed)
        outs = {on: fn(q, k, v, layer_idx=seed % 2) for on, fn in fns.items()}
        torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=0)
    assert fns[True].graphs.replays == 2 and fns[False].graphs.replays == 0  # per layer: call 2 captures
    assert fns[True].summary() == fns[False].summary() and fns[True].summary()["qk_sparsity"] > 0.3


@pytest.mark.gpu
def test_calibrated_style_config_graphs_without_capture_failures(caplog):
    """Layer graphs of a config shaped like a calibration's output (per-head values, the keys and pooled
    estimators, an INT8 variant with stage 2, one local block, statistics on): every sparse layer is
    captured once and replayed, nothing is logged as uncapturable, and the logits equal eager ones.
    (``python -m evals speed`` on SmolLM2's H200 config logged capture failures; this pins the path.)"""
    from calibrate.models import build_tiny_model
    from sparge_core.integrations.transformers import apply, remove
    from sparge_core.params import LayerConfig, LayerVariant, ModelConfig, ModelInfo

    model = build_tiny_model("llama", dtype=torch.bfloat16, device="cuda", seed=4, num_layers=3)
    h, hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    layers = (LayerConfig(0, (0.2, -1.0, 0.4, -0.1), (6.0, 50.0, 9.0, 12.0), cdfthreshd=(0.9, 0.95, 0.85, 0.97),
                          estimator="keys", variant=LayerVariant(False, "int8", True)),
              LayerConfig(1, (-1.0,) * h, (50.0,) * h, topk=(0.3, 0.4, 0.5, 0.35), estimator="pooled",
                          variant=LayerVariant(False, "int8", False)),
              LayerConfig.dense(2, h))
    config = ModelConfig(ModelInfo("tiny", 3, h, hkv, 64), layers, l1=0.08, pv_l1=0.09).with_local_blocks(1)
    g = torch.Generator().manual_seed(8)
    batches = [torch.randint(3, model.config.vocab_size, (1, 2100), generator=g).cuda() for _ in range(4)]
    results = {}
    caplog.set_level("WARNING", logger="sparge_core.graphs")
    for graphs_on in (False, True):
        handle = apply(model, config, collect_stats=True, cuda_graphs=graphs_on, allow_other_model=True)
        try:
            with torch.no_grad():
                results[graphs_on] = [model(ids).logits for ids in batches]
            replays, captures = handle.graphs.replays, handle.graphs.captures
            report = handle.sparsity_report()
        finally:
            remove(model)
        results[graphs_on].append(report)
        if graphs_on:
            assert (captures, replays) == (2, 6)  # two sparse layers; calls 2 (captured), 3 and 4 replay
    assert "could not be captured" not in caplog.text
    for a, b in zip(results[False][:-1], results[True][:-1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert results[False][-1] == results[True][-1]
