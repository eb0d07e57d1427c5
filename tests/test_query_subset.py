"""A capture that stores a subset of the query blocks: the chunk geometry, exactness of attention on
the stored rows, the capture contract, memory-mapped loading, and the CLI's --query-blocks."""

import pytest
import torch

from calibrate.capture import (
    capture_to_disk,
    load_captured,
    load_layer,
    query_chunks_for,
    read_meta,
    select_query_rows,
)
from calibrate.search import LayerEvaluator
from sparge_core import sparge_attn
from sparge_core.synthetic import structured_qkv


def test_chunk_geometry():
    chunks = query_chunks_for(32768, 32)
    assert chunks == ((7168, 1024), (15360, 1024), (23552, 1024), (31744, 1024))
    assert sum(n for _, n in chunks) == 32 * 128 and chunks[-1][0] + chunks[-1][1] == 32768
    assert query_chunks_for(32768, None) == () and query_chunks_for(1024, 8) == () and query_chunks_for(1024, 99) == ()
    odd = query_chunks_for(1000, 3, chunk_blocks=2)  # 8 blocks, the last one partial
    assert odd == ((256, 256), (896, 104))
    assert all(start % 128 == 0 for start, _ in query_chunks_for(5000, 7, chunk_blocks=3))
    with pytest.raises(ValueError):
        query_chunks_for(4096, 0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("quant", ["none", "int8"])
def test_the_subset_path_is_exact_for_the_stored_rows(causal, quant):
    """The evaluator's subset path (zero query except the stored rows, their map rows only) gives the
    stored rows of the whole-window sparge_attn call: outputs, computed and skipped blocks."""
    q, k, v = structured_qkv(1, 4, 2, 1280, 64, dtype=torch.float32, seed=4)
    chunks = query_chunks_for(1280, 4, chunk_blocks=2)
    theta, budget, pv = torch.tensor([0.3, -1.0, 0.5, 0.1]), torch.tensor([0.9, 0.8, 0.95, 0.7]), torch.full((4,), 6.0)
    full = sparge_attn(q, k, v, is_causal=causal, simthreshd1=theta, cdfthreshd=budget, pvthreshd=pv,
                           backend="reference", estimator="keys", quant=quant)
    ev = LayerEvaluator([(select_query_rows(q, chunks), k, v)], is_causal=causal, backend="reference",
                        quant=quant, query_chunks=chunks)
    out, allowed, computed, skipped = ev._attend(0, *ev.groups[0][1:], theta, pv, {"cdfthreshd": budget, "topk": None})
    rows = torch.cat([torch.arange(s, s + n) for s, n in chunks])
    torch.testing.assert_close(out, full[:, :, rows], rtol=1e-5, atol=1e-6)
    # the truncated-keys shortcut is not exact: K is smoothed by its mean over every key, which moves
    # the key blocks' self-similarity (why the subset path keeps all of K)
    s0, n0 = chunks[0]
    cut = sparge_attn(q[:, :, s0:s0 + n0], k[:, :, :s0 + n0], v[:, :, :s0 + n0], is_causal=True, simthreshd1=theta,
                      cdfthreshd=budget, pvthreshd=pv, backend="reference", estimator="keys", quant=quant)
    if causal:
        assert not torch.allclose(cut, full[:, :, s0:s0 + n0], atol=1e-4)
    assert int(allowed[0, 0]) > 0 and bool((computed <= allowed).all()) and bool((skipped <= computed).all())


def test_the_evaluator_on_a_subset_measures_the_stored_rows():
    samples = [structured_qkv(1, 4, 2, 1280, 64, dtype=torch.float32, seed=s) for s in range(2)]
    chunks = query_chunks_for(1280, 4, chunk_blocks=2)
    sub = [(select_query_rows(q, chunks), k, v) for q, k, v in samples]
    ev = LayerEvaluator(sub, is_causal=True, backend="reference", query_chunks=chunks)
    theta, budget = torch.full((4,), -1.0), torch.full((4,), 0.8)
    got = ev.evaluate(theta, budget, None, "cdf")
    # by hand: relative L1 over the stored rows, dense reference per chunk
    worst = torch.zeros(4, dtype=torch.float64)
    for q, k, v in samples:
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
        out = sparge_attn(q, k, v, is_causal=True, simthreshd1=theta, cdfthreshd=budget, pvthreshd=None,
                          backend="reference", estimator="keys")
        rows = torch.cat([torch.arange(s, s + n) for s, n in chunks])
        diff = (out - ref)[:, :, rows].abs().sum(dim=(0, 2, 3)).double()
        worst = torch.maximum(worst, diff / ref[:, :, rows].abs().sum(dim=(0, 2, 3)).double())
    torch.testing.assert_close(got.l1, worst, rtol=1e-4, atol=1e-7)
    assert ((got.density > 0) & (got.density <= 1)).all()
    full = LayerEvaluator(samples, is_causal=True, backend="reference").evaluate(theta, budget, None, "cdf")
    assert not torch.allclose(full.l1, got.l1)  # a subset estimate, not the whole-window value


def test_batched_samples_equal_one_by_one():
    samples = [structured_qkv(1, 4, 2, 512, 64, dtype=torch.float32, seed=s) for s in range(3)]
    batched = LayerEvaluator(samples, is_causal=True, backend="reference")
    assert len(batched.groups) == 1
    theta, budget, pv = torch.full((4,), 0.2), torch.full((4,), 0.85), torch.full((4,), 6.0)
    got = batched.evaluate(theta, budget, pv, "cdf")
    singles = [LayerEvaluator([s], is_causal=True, backend="reference").evaluate(theta, budget, pv, "cdf")
               for s in samples]
    torch.testing.assert_close(got.l1, torch.stack([s.l1 for s in singles]).max(0).values, rtol=1e-5, atol=1e-8)
    for name in ("sparsity", "density", "pv_skip"):
        torch.testing.assert_close(getattr(got, name), torch.stack([getattr(s, name) for s in singles]).mean(0))


@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("transformers")
    from calibrate.models import build_tiny_model

    return build_tiny_model("llama")


def test_capture_with_a_query_subset(llama, tmp_path):
    ids = torch.randint(3, 250, (2, 1024))
    meta = capture_to_disk(llama, ids, tmp_path / "cap", query_blocks=3, model_name="tiny-llama")
    assert meta.query_chunks == query_chunks_for(1024, 3) and meta.query_rows == 384
    assert read_meta(tmp_path / "cap").query_chunks == meta.query_chunks
    for layer in (0, 1):
        loaded = load_captured(tmp_path / "cap", layer)
        mapped = load_layer(tmp_path / "cap", layer, "cpu")
        assert len(mapped) == 2
        for (q, k, v), (mq, mk, mv) in zip(loaded, mapped):
            assert q.shape == (1, 4, 384, 64) and k.shape == (1, 2, 1024, 64)
            assert torch.equal(q, mq) and torch.equal(k, mk) and torch.equal(v, mv)
        assert len(load_layer(tmp_path / "cap", layer, "cpu", samples=[1])) == 1
    full = capture_to_disk(llama, ids, tmp_path / "full", model_name="tiny-llama")
    q_full = load_captured(tmp_path / "full", 0)[0][0]
    assert full.query_chunks == () and torch.equal(select_query_rows(q_full, meta.query_chunks),
                                                   load_captured(tmp_path / "cap", 0)[0][0])


def test_cli_with_query_blocks(tmp_path):
    from calibrate.__main__ import main
    from sparge_core.params import ModelConfig

    out = tmp_path / "sub.json"
    assert main(["--model", "tiny-llama", "--samples", "2", "--seq-len", "640", "--device", "cpu", "--l1", "0.3",
                 "--pv-l1", "0.35", "--thetas", "-1", "--bisect-steps", "3", "--no-pv", "--quiet",
                 "--query-blocks", "2", "--out", str(out)]) == 0
    cfg = ModelConfig.load(out)
    assert cfg.calibration["query_chunks"] == [list(c) for c in query_chunks_for(640, 2)]
    assert "holdout_l1" in cfg.calibration
    assert all(lc.variant is not None and (lc.is_dense or lc.variant.stage2 is False) for lc in cfg.layers)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "int8"])
def test_the_subset_path_is_exact_on_the_gpu(quant):
    q, k, v = structured_qkv(1, 8, 2, 4096, 128, dtype=torch.bfloat16, device="cuda", seed=2)
    chunks = query_chunks_for(4096, 8, chunk_blocks=4)
    theta, budget = torch.full((8,), 0.3), torch.full((8,), 0.9)
    full = sparge_attn(q, k, v, is_causal=True, simthreshd1=theta, cdfthreshd=budget, pvthreshd=None,
                       estimator="keys", quant=quant)
    ev = LayerEvaluator([(select_query_rows(q, chunks), k, v)], is_causal=True, quant=quant, query_chunks=chunks)
    out, *_ = ev._attend(0, *ev.groups[0][1:], theta, None, {"cdfthreshd": budget, "topk": None})
    rows = torch.cat([torch.arange(s, s + n) for s, n in chunks]).cuda()
    assert torch.equal(out, full[:, :, rows])
