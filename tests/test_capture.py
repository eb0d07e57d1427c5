"""Q/K/V capture: in memory (sparge_core.integrations) and to disk (calibrate.capture)."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from calibrate.capture import capture_to_disk, load_captured, read_meta, sample_path  # noqa: E402
from calibrate.data import token_windows  # noqa: E402
from calibrate.models import build_tiny_model, byte_tokenizer  # noqa: E402
from sparge_core.integrations.capture import QKVRecorder  # noqa: E402
from sparge_core.integrations.transformers import capture_qkv, handle_of  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    return build_tiny_model("llama", seed=5)


def _ids(seed: int, n: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (batch, n), generator=g)


def test_recorded_qkv_are_what_attention_consumed(llama):
    """Attention recomputed from the captured (post-RoPE) Q, K, V reproduces the layer's output."""
    ids = _ids(0, 150, batch=2)
    outputs = {}
    hooks = [llama.model.layers[i].self_attn.register_forward_hook(
        lambda mod, args, out, i=i: outputs.__setitem__(i, out[0].detach())) for i in range(2)]
    try:
        with torch.no_grad():
            ref = llama(ids).logits
            with capture_qkv(llama) as rec:
                out = llama(ids).logits
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out, ref)
    assert llama.config._attn_implementation == "sdpa" and handle_of(llama) is None
    for layer in range(2):
        (call,) = rec.layer_records(layer)
        assert call.q.shape == (2, 4, 150, 64) and call.k.shape == (2, 2, 150, 64) and call.v.shape == (2, 2, 150, 64)
        assert call.q.device.type == "cpu"
        k = call.k.repeat_interleave(2, dim=1)
        v = call.v.repeat_interleave(2, dim=1)
        attn = torch.nn.functional.scaled_dot_product_attention(call.q, k, v, is_causal=True)
        proj = llama.model.layers[layer].self_attn.o_proj(attn.transpose(1, 2).reshape(2, 150, -1))
        torch.testing.assert_close(proj, outputs[layer], rtol=1e-5, atol=1e-5)
    # post-RoPE: two tokens with equal ids at different positions get different keys
    same = torch.full((1, 8), 42)
    with torch.no_grad(), capture_qkv(llama, layers=[0]) as rec:
        llama(same)
    k0 = rec.layer_records(0)[0].k[0, 0]
    assert not torch.allclose(k0[0], k0[5])


def test_layer_filter_and_sink():
    rec = QKVRecorder(layers=[1])
    t = torch.randn(1, 2, 3, 4)
    rec.record(0, t, t, t)
    rec.record(1, t, t, t)
    assert list(rec.records) == [1] and rec.layer_records(0) == []
    got = []
    sink = QKVRecorder(sink=lambda layer, q, k, v: got.append((layer, q.shape)))
    sink.record(3, t, t, t)
    assert got == [(3, (1, 2, 3, 4))] and not sink.records
    with pytest.raises(ValueError, match="non-negative"):
        QKVRecorder(layers=[-1])


def test_capture_to_disk_contract(llama, tmp_path):
    windows = token_windows(byte_tokenizer(), "pydoc", 160, 2, seed=3)
    out = tmp_path / "cap"
    meta = capture_to_disk(llama, windows, out, layers=[1], model_name="tiny-llama")
    assert sample_path(out, 1, 0) == out / "L001" / "S000.safetensors"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        ["L001/S000.safetensors", "L001/S001.safetensors", "meta.json"]
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["model"] == "tiny-llama" and on_disk["num_layers"] == 2 and on_disk["num_heads"] == 4
    assert on_disk["num_kv_heads"] == 2 and on_disk["head_dim"] == 64 and on_disk["seq_len"] == 160
    assert on_disk["samples"] == 2 and on_disk["dtype"] == "float32" and on_disk["layers"] == [1]
    assert on_disk["data"]["name"] == "pydoc" and on_disk["data"]["sha256"] == windows.sha256
    assert read_meta(out) == meta
    loaded = load_captured(out, 1)
    with torch.no_grad(), capture_qkv(llama, layers=[1]) as rec:
        for ids in windows.input_ids:
            llama(ids[None], use_cache=False)
    assert len(loaded) == 2
    for (q, k, v), call in zip(loaded, rec.layer_records(1)):
        assert q.shape == (1, 4, 160, 64) and k.shape == (1, 2, 160, 64) and v.shape == (1, 2, 160, 64)
        assert q.dtype == torch.float32
        assert torch.equal(q, call.q) and torch.equal(k, call.k) and torch.equal(v, call.v)
    with pytest.raises(ValueError, match="captured layers: \\[1\\]"):
        load_captured(out, 0)
    with pytest.raises(FileExistsError):
        capture_to_disk(llama, windows, out)


def test_capture_to_disk_from_tokenizer_and_ids(llama, tmp_path):
    ids = _ids(1, 140, batch=1)
    meta = capture_to_disk(llama, ids, tmp_path / "ids", layers=[0])
    assert meta.data_name == "token-ids" and meta.samples == 1 and meta.seq_len == 140
    bf16 = build_tiny_model("llama", seed=5, dtype=torch.bfloat16)
    meta = capture_to_disk(bf16, byte_tokenizer(), tmp_path / "tok", corpus="pydoc", seq_len=130, samples=1)
    assert meta.layers == (0, 1) and meta.dtype == "bfloat16"
    q, k, v = load_captured(tmp_path / "tok", 1)[0]
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="out of range"):
        capture_to_disk(llama, ids, tmp_path / "bad", layers=[5])
    with pytest.raises(ValueError, match="seq_len and samples"):
        capture_to_disk(llama, byte_tokenizer(), tmp_path / "bad2")
    with pytest.raises(FileNotFoundError, match="not a finished capture"):
        load_captured(tmp_path / "nothing", 0)
