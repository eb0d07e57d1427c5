"""Sparse attention inside Hugging Face transformers models (Llama, Qwen2/3, Mistral, Gemma3).

::

    from sparge_core.integrations.transformers import apply, remove

    handle = apply(model, "sparge", cdfthreshd=0.9)       # one method for every layer
    handle = apply(model, "runs/smollm2.json")  # calibrated, per layer (docs/design.md, "Config file")
    handle = apply(model, "sparge", collect_stats=True)    # ...and count skipped blocks per layer
    logits = model(input_ids).logits
    print(handle.sparsity_report())
    remove(model)                                          # back to the original attention

    # the standard transformers route (``default_config`` picks the method of every layer):
    import sparge_core.integrations.transformers  # registers "sparge"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sparge")
    model.set_attn_implementation("sparge")       # the same for a loaded model

Importing this module registers an attention function named ``sparge`` with
``transformers.AttentionInterface`` and a mask builder under the same name with
``AttentionMaskInterface``; ``apply`` switches a model to it. Each attention module carries a reference
to the ``SpargeAttention`` handle, which maps ``module.layer_idx`` to that layer's method (a model
switched to ``sparge`` without ``apply`` gets a handle built from ``default_config`` on its first
forward pass).

Semantics of the attention function:

- K and V arrive un-repeated (GQA stays native: the kernels handle ``Hq % Hkv == 0``).
- Sliding-window layers (Mistral, Gemma3's local layers, Qwen with ``use_sliding_window``) run sparse:
  the window (the ``sliding_window`` transformers passes, else the layer type in the config) is the
  pipeline's ``window=``, a block band intersected with the predicted map.
- Dense SDPA (transformers' own ``sdpa_attention_forward``) is used for queries shorter than one
  ``BLOCK_Q`` block (decoding) or than a calibrated layer's ``min_tokens`` (the length below which the
  cost model predicted its sparse call slower than dense), for layers the config marks dense, and for masks that are not "causal
  (or sliding-window causal, or full) over one contiguous range of tokens per sequence" (e.g. packed
  sequences); the last case logs a warning.
- Masks: without a padding mask the mask builder returns None (no mask is built, nothing is read on the
  host) and attention is bottom-right aligned causal. With a padding mask, each sequence runs on its
  own valid contiguous token range (bottom-right aligned causal), so a padded batch gives the same
  result per sequence as separate runs; the ranges are read from the mask once per forward pass (one
  host synchronisation, cached for every layer). Query rows at padded positions get zeros.
- A config's per-layer hyperparameters, ``local_blocks`` included (the predictor's forced key blocks
  before each query block's diagonal, causal only), reach the layer's method unchanged
  (``Sparge.from_layer_config``), on the eager path and in the compiled padded-batch op alike.
- Statistics (``collect_stats``) accumulate on the device; ``sparsity_report()`` reads them.
- A layer's sparse call over the whole batch replays from a CUDA graph once it repeats at one input
  geometry (``apply(..., cuda_graphs=True)``, the default; ``sparge_core.graphs``): the first call of a
  length runs eagerly, the second is captured, later ones copy Q/K/V in and replay (the host cost of a
  call drops from ~0.6-1 ms to ~0.1 ms on an H200). Padded batches split into runs, autograd, large
  calls and calls inside ``torch.compile`` or the caller's own capture stay eager.
- ``torch.compile(model, fullgraph=True)`` works: sparge's kernels are custom ops, and a materialized
  mask (a padded batch, or the mask transformers builds while tracing a call without a cache) goes to
  one custom op that plans the ranges inside (a host read per layer). A prefill without a mask (e.g.
  ``model(ids)`` with its default cache) reads nothing on the host and can be captured in a CUDA graph.
- The output is ``[B, S, Hq, D]`` as transformers expects.

This module imports transformers; ``sparge_core/__init__`` does not import it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..api import QUANT_MODES, Selection, _sparge_attn_impl, parse_pvthreshd, resolve_backend, resolve_quant
from ..graphs import GraphCache
from ..methods import AttentionMethod, get_method, method_names
from ..ops.blocks import BLOCK_Q, allowed_block_count
from ..ops.reference import causal_token_mask
from ..params import CONFIG_FILE_NAME, ModelConfig, weights_fingerprint
from ..validation import check_choice, check_flag, resolve_scale
from .capture import QKVRecorder

logger = logging.getLogger(__name__)

IMPLEMENTATION_NAME = "sparge"
#: transformers ``model_type`` values this integration is tested or written for
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gemma3")
#: the method of every layer of a model switched to "sparge" without ``apply`` (see ``default_config``)
DEFAULT_METHOD = "sparge-topk"
_HANDLE_ATTR = "_sparge_attention"


# --------------------------------------------------------------------------------------------
# per-layer statistics
# --------------------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """Block counts of one layer summed over calls and batch, per query head, kept on the device of
    the attention inputs (adding a call's counts reads nothing on the host; ``summary`` does)."""

    allowed: torch.Tensor | None = None
    computed: torch.Tensor | None = None
    pv_skipped: torch.Tensor | None = None
    sparse_calls: int = 0
    dense_calls: int = 0

    def add(self, allowed: torch.Tensor, computed: torch.Tensor, pv_skipped: torch.Tensor) -> None:
        """Add ``(B, Hq)`` counts of one call."""
        parts = [t.detach().sum(0).to(torch.long) for t in (allowed, computed, pv_skipped)]
        if self.allowed is None:
            self.allowed, self.computed, self.pv_skipped = parts
        else:
            device = self.allowed.device
            self.allowed = self.allowed + parts[0].to(device)
            self.computed = self.computed + parts[1].to(device)
            self.pv_skipped = self.pv_skipped + parts[2].to(device)

    def summary(self) -> dict[str, float | int]:
        """qk_sparsity, pv_skip and the paper's sparsity of this layer (0 for dense calls)."""
        if self.allowed is None:
            return {"qk_sparsity": 0.0, "pv_skip": 0.0, "sparsity": 0.0, "sparse_calls": self.sparse_calls,
                    "dense_calls": self.dense_calls}
        allowed, computed, skipped = (int(t.sum()) for t in (self.allowed, self.computed, self.pv_skipped))
        return {
            "qk_sparsity": (allowed - computed) / allowed if allowed else 0.0,
            "pv_skip": skipped / computed if computed else 0.0,
            "sparsity": (2 * (allowed - computed) + skipped) / (2 * allowed) if allowed else 0.0,
            "sparse_calls": self.sparse_calls,
            "dense_calls": self.dense_calls,
        }


# --------------------------------------------------------------------------------------------
# the handle bound to a model
# --------------------------------------------------------------------------------------------
@dataclass
class SpargeAttention:
    """What ``apply`` installed on one model: the method of each layer (None = dense SDPA) and each
    layer's sliding window from the model config (None = full attention)."""

    methods: dict[int, AttentionMethod | None]
    original_implementation: str
    backend: str = "auto"
    quant: str = "auto"
    collect_stats: bool = False
    stats: dict[int, LayerStats] = field(default_factory=dict)
    recorder: QKVRecorder | None = None
    description: str = ""
    windows: dict[int, int | None] = field(default_factory=dict)
    #: per layer: calls with fewer query tokens run dense SDPA (a config's ``min_tokens``; absent: BLOCK_Q)
    min_tokens: dict[int, int] = field(default_factory=dict)
    cuda_graphs: bool = True
    graphs: GraphCache = field(default_factory=GraphCache, repr=False)
    _mask_plan: tuple | None = field(default=None, repr=False)
    _warned_layers: set = field(default_factory=set, repr=False)

    def method_for(self, layer: int) -> AttentionMethod | None:
        if layer not in self.methods:
            raise KeyError(f"sparge has no entry for layer {layer} (it knows layers 0..{len(self.methods) - 1})")
        return self.methods[layer]

    def dense_below(self, layer: int) -> int:
        """Calls of ``layer`` with fewer query tokens run dense SDPA: one ``BLOCK_Q`` block (decoding) or
        the config's ``min_tokens``, whichever is larger."""
        return max(BLOCK_Q, self.min_tokens.get(layer, 0))

    def layer_stats(self, layer: int) -> LayerStats:
        return self.stats.setdefault(layer, LayerStats())

    def reset_stats(self) -> None:
        self.stats.clear()

    def sparsity_report(self) -> dict[str, Any]:
        """Per-layer summaries and their totals (block counts summed over layers and heads)."""
        layers = {layer: s.summary() for layer, s in sorted(self.stats.items())}
        total = LayerStats()
        for s in self.stats.values():
            if s.allowed is not None:
                total.add(s.allowed[None], s.computed[None], s.pv_skipped[None])
            total.sparse_calls += s.sparse_calls
            total.dense_calls += s.dense_calls
        return {"layers": layers, "total": total.summary()}


def handle_of(model) -> SpargeAttention | None:
    """The ``SpargeAttention`` installed on a model by ``apply`` (or the default one a model switched to
    "sparge" without ``apply`` built on its first forward pass), or None."""
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is not None or not isinstance(model, torch.nn.Module):
        return handle
    for module in model.modules():
        handle = getattr(module, _HANDLE_ATTR, None)
        if handle is not None:
            return handle
    return None


# --------------------------------------------------------------------------------------------
# apply / remove
# --------------------------------------------------------------------------------------------
def apply(model, config: str | os.PathLike | dict | ModelConfig | AttentionMethod, *, backend: str = "auto",
          quant: str = "auto", collect_stats: bool = False, allow_other_model: bool = False,
          cuda_graphs: bool = True, **method_params) -> SpargeAttention:
    """Route the model's attention through sparge.

    Args:
        model: a transformers causal LM of a supported family (``SUPPORTED_MODEL_TYPES``).
        config: a method name from the registry (``method_names()``; ``method_params`` are its
            global hyperparameters), a configured ``AttentionMethod``, a mapping ``{layer index:
            AttentionMethod or None}`` (None and missing layers run dense SDPA), a ``ModelConfig``, a
            dict in the config-file format or the path of a config JSON (per-layer hyperparameters;
            layers marked dense and layers without an entry run dense SDPA).
        backend, quant: passed to the kernels (see ``sparge_core.block_sparse_attn``).
        collect_stats: count skipped blocks per layer (``handle.sparsity_report()``).
        allow_other_model: apply a config calibrated for another model of the same shape (its
            recorded architecture or weights fingerprint differ; ``ModelConfig.check_identity``).
        cuda_graphs: replay each layer's sparse call from a CUDA graph once it repeats at one length
            (``sparge_core.graphs``: the first call of a length runs eagerly, the second captures; calls
            up to ``graphs.MAX_GRAPH_ELEMENTS`` elements, without a padding mask, without autograd).
            False: every call runs eagerly.

    Returns the ``SpargeAttention`` handle (also reachable as ``handle_of(model)``). Applying again
    replaces the previous routing; ``remove(model)`` restores the original implementation.
    """
    layers = attention_modules(model)
    if handle_of(model) is not None:
        remove(model)
    handle = _build_handle(model.config, config, method_params, num_layers=len(layers),
                           original=model.config._attn_implementation, backend=backend, quant=quant,
                           collect_stats=collect_stats, model=model, allow_other_model=allow_other_model,
                           cuda_graphs=cuda_graphs)
    _install(model, layers, handle)
    return handle


def _build_handle(model_config, config, method_params: dict, *, num_layers: int, original: str, backend: str,
                  quant: str, collect_stats: bool, model=None, allow_other_model: bool = False,
                  cuda_graphs: bool = True) -> SpargeAttention:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    check_flag("cuda_graphs", cuda_graphs)
    check_choice("quant", quant, QUANT_MODES)  # the name now; what "auto" means is decided per device
    methods, description, min_tokens = _resolve_methods(model_config, config, method_params, num_layers=num_layers,
                                                        model=model, allow_other_model=allow_other_model)
    return SpargeAttention(methods=methods, original_implementation=original, backend=backend, quant=quant,
                           collect_stats=collect_stats, description=description,
                           windows=layer_windows(model_config, num_layers), min_tokens=min_tokens,
                           cuda_graphs=cuda_graphs)


def remove(model) -> None:
    """Undo ``apply``: restore the model's previous attention implementation."""
    handle = handle_of(model)
    if handle is None:
        raise ValueError("sparge is not applied to this model (nothing to remove)")
    model.set_attn_implementation(handle.original_implementation)
    for module in model.modules():
        if getattr(module, _HANDLE_ATTR, None) is handle:
            delattr(module, _HANDLE_ATTR)


def _install(model, layers: dict[int, torch.nn.Module], handle: SpargeAttention) -> None:
    register()
    for module in layers.values():
        setattr(module, _HANDLE_ATTR, handle)
    setattr(model, _HANDLE_ATTR, handle)
    model.set_attn_implementation(IMPLEMENTATION_NAME)
    if model.config._attn_implementation != IMPLEMENTATION_NAME:
        for module in [model, *layers.values()]:
            delattr(module, _HANDLE_ATTR)
        raise ValueError(f"{type(model).__name__} did not accept a custom attention implementation "
                         f"(it is still {model.config._attn_implementation!r})")


def register() -> None:
    """Register the ``sparge`` attention function and its mask builder with transformers (done when this
    module is imported; calling it again is harmless)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION_NAME, sparge_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, sparge_mask)


def sparge_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                mask_function=None, attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                allow_is_causal_skip: bool = True, **kwargs):
    """The mask builder registered as ``sparge``: None when there is no padding mask and transformers
    allows a plain causal (or sliding-window causal) mask to be implied, since sparge's attention is
    bottom-right aligned causal with the layer's window by itself; otherwise transformers' SDPA mask.
    Returning None reads nothing on the host (transformers' own check for an all-ones padding mask
    does)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if attention_mask is None and allow_is_causal_skip and not kwargs.get("allow_is_bidirectional_skip"):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                     mask_function if mask_function is not None else causal_mask_function, attention_mask,
                     local_size, allow_is_causal_skip, **kwargs)


def default_config(model_config) -> str | os.PathLike | dict | ModelConfig | AttentionMethod:
    """What a model switched to ``attn_implementation="sparge"`` without ``apply`` runs with: anything
    ``apply`` accepts as ``config``. A calibrated config saved beside the model
    (``<model folder>/sparge_config.json``, ``ModelConfig.save_pretrained``; the folder is
    ``model_config._name_or_path``) when there is one, else ``DEFAULT_METHOD`` ("sparge-topk" at its
    defaults: simthreshd1=-0.1, topk=0.5) for every layer."""
    folder = getattr(model_config, "_name_or_path", None)
    if folder and (Path(folder) / CONFIG_FILE_NAME).is_file():
        return ModelConfig.load(folder)
    return DEFAULT_METHOD


_DEFAULT_HANDLES: dict[int, SpargeAttention] = {}


def _default_handle(module) -> SpargeAttention:
    """The handle of a model that runs "sparge" without ``apply`` (one per model config, built on its
    first forward pass from ``default_config``)."""
    config = getattr(module, "config", None)
    if config is None:
        raise RuntimeError("this model's attention is set to 'sparge' but sparge was not applied to it and "
                           "the attention module has no config; use "
                           "sparge_core.integrations.transformers.apply(model, ...)")
    key = id(config)
    handle = _DEFAULT_HANDLES.get(key)
    if handle is None:
        num_layers = int(_text_config(config).num_hidden_layers)
        handle = _build_handle(config, default_config(config), {}, num_layers=num_layers,
                               original=IMPLEMENTATION_NAME, backend="auto", quant="auto",
                               collect_stats=False)
        handle.description = f"default ({handle.description})"
        _DEFAULT_HANDLES[key] = handle
        weakref.finalize(config, _DEFAULT_HANDLES.pop, key, None)
        logger.info("sparge: %s runs with the default routing %s", type(config).__name__, handle.description)
    setattr(module, _HANDLE_ATTR, handle)
    return handle


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """``{layer_idx: attention module}``; raises for unsupported architectures."""
    model_type = _model_type(model)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"sparge does not support {type(model).__name__} (model_type {model_type!r}); supported "
                         f"model types: {list(SUPPORTED_MODEL_TYPES)}")
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "num_key_value_groups") and hasattr(module, "head_dim"):
            if module.layer_idx in found:
                raise ValueError(f"two attention modules claim layer_idx {module.layer_idx}")
            found[module.layer_idx] = module
    if not found or sorted(found) != list(range(len(found))):
        raise ValueError(f"could not find attention modules numbered 0..N-1 in {type(model).__name__} "
                         f"(found layer indices {sorted(found)})")
    return found


def _model_type(model) -> str:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    return getattr(config, "model_type", "")


def _text_config(cfg):
    inner = getattr(cfg, "text_config", None)
    return inner if inner is not None and hasattr(inner, "num_attention_heads") else cfg


def _model_shape(model_config) -> dict[str, int]:
    cfg = _text_config(model_config)
    heads = int(cfg.num_attention_heads)
    return {"num_layers": int(cfg.num_hidden_layers), "num_heads": heads,
            "num_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)}


def layer_windows(model_config, num_layers: int) -> dict[int, int | None]:
    """Each layer's sliding window from a transformers config (``sliding_window`` with ``layer_types``,
    or on every layer when the config has no layer types, as Mistral's), None for full attention."""
    cfg = _text_config(model_config)
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return {i: None for i in range(num_layers)}
    types = getattr(cfg, "layer_types", None)
    if not types:
        return {i: int(window) for i in range(num_layers)}
    return {i: int(window) if i < len(types) and types[i] == "sliding_attention" else None
            for i in range(num_layers)}


def _resolve_methods(model_config, config, method_params: dict, *, num_layers: int, model=None,
                     allow_other_model: bool = False):
    """``({layer: method or None}, description, {layer: min_tokens})`` for the accepted kinds of ``config``
    (only a calibrated config sets ``min_tokens``)."""
    if isinstance(config, Mapping) and config and all(isinstance(k, int) for k in config):
        _no_params(method_params, "a per-layer mapping of methods")
        bad = [k for k, m in config.items()
               if not (0 <= k < num_layers) or not (m is None or isinstance(m, AttentionMethod))]
        if bad:
            raise ValueError(f"per-layer methods: layers {bad} are out of range 0..{num_layers - 1} or not an "
                             f"AttentionMethod/None")
        methods = {i: config.get(i) for i in range(num_layers)}
        return methods, "per-layer methods", {}
    if isinstance(config, AttentionMethod):
        _no_params(method_params, "a configured AttentionMethod")
        return {i: config for i in range(num_layers)}, repr(config), {}
    if isinstance(config, str) and config in method_names():
        method = get_method(config, **method_params)
        return {i: method for i in range(num_layers)}, repr(method), {}
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.suffix == ".json" and not path.exists():
            raise ValueError(f"config {str(config)!r} is neither a known method ({method_names()}) nor a config "
                             f"JSON file")
        _no_params(method_params, "a config file")
        config = ModelConfig.load(path)
    elif isinstance(config, dict):
        _no_params(method_params, "a config dict")
        config = ModelConfig.from_dict(config)
    elif not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a method name, an AttentionMethod, a ModelConfig, a dict or a path, got "
                        f"{type(config).__name__}")
    _no_params(method_params, "a ModelConfig")
    config.check_matches(**_model_shape(model_config))
    config.check_identity(architecture=getattr(_text_config(model_config), "model_type", None),
                          fingerprint=None if model is None else (lambda: weights_fingerprint(model)),
                          allow_other_model=allow_other_model)
    min_tokens = {lc.layer: lc.min_tokens for lc in config.layers if lc.min_tokens and not lc.is_dense}
    return _methods_from_config(config, num_layers), f"config for {config.model.name}", min_tokens


def _methods_from_config(config: ModelConfig, num_layers: int) -> dict[int, AttentionMethod | None]:
    from ..methods.sparge import Sparge

    methods: dict[int, AttentionMethod | None] = {i: None for i in range(num_layers)}
    for lc in config.layers:
        methods[lc.layer] = None if lc.is_dense else Sparge.from_layer_config(lc)
    missing = [i for i in range(num_layers) if i not in {lc.layer for lc in config.layers}]
    if missing:
        logger.info("sparge config has no entry for layers %s; they run dense", missing)
    return methods


def _no_params(params: dict, what: str) -> None:
    if params:
        raise TypeError(f"hyperparameters {sorted(params)} cannot be combined with {what}; put them in the config "
                        f"or pass a method name")


# --------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def capture_qkv(model, layers: Iterable[int] | None = None, *, sink=None,
                device: str | torch.device = "cpu") -> Iterator[QKVRecorder]:
    """Record the post-RoPE Q, K, V each attention layer receives while the block runs.

    If sparge is applied, its routing stays as it is; otherwise the model runs dense SDPA through
    the sparge function for the duration (numerically the model's ordinary SDPA path). Yields the
    ``QKVRecorder`` (see ``sparge_core.integrations.capture``).
    """
    recorder = QKVRecorder(layers, sink=sink, device=device)
    handle = getattr(model, _HANDLE_ATTR, None)
    temporary = handle is None
    if temporary:
        modules = attention_modules(model)
        handle = SpargeAttention(methods={i: None for i in modules},
                                 original_implementation=model.config._attn_implementation,
                                 description="dense", windows=layer_windows(model.config, len(modules)))
        previous = {i: getattr(m, _HANDLE_ATTR, None) for i, m in modules.items()}
        _install(model, modules, handle)
    elif handle.recorder is not None:
        raise RuntimeError("a capture is already running on this model")
    handle.recorder = recorder
    try:
        yield recorder
    finally:
        handle.recorder = None
        if temporary:
            remove(model)
            for i, m in modules.items():  # a default-route handle comes back
                if previous[i] is not None:
                    setattr(m, _HANDLE_ATTR, previous[i])


# --------------------------------------------------------------------------------------------
# the attention function
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Run:
    """One group of sequences sharing a valid range: query rows [q0, q1), keys [k0, k1)."""

    batch: tuple[int, ...]
    q0: int
    q1: int
    k0: int
    k1: int


def sparge_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """The function registered as ``sparge``; see the module docstring for its semantics."""
    handle: SpargeAttention | None = getattr(module, _HANDLE_ATTR, None)
    if handle is None:
        handle = _default_handle(module)
    if kwargs.get("softcap") is not None:
        raise ValueError("sparge does not support attention logit soft-capping (softcap)")
    layer = module.layer_idx
    if handle.recorder is not None:
        handle.recorder.record(layer, query, key, value)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    method = handle.method_for(layer)
    window = _binding_window(kwargs.get("sliding_window"), handle.windows.get(layer), key.shape[2])
    use_dense = (method is None or query.shape[2] < handle.dense_below(layer) or dropout > 0.0
                 or (window is not None and not causal))
    if not use_dense:
        if attention_mask is None:
            runs = [_Run(tuple(range(query.shape[0])), 0, query.shape[2], 0, key.shape[2])]
        elif torch.compiler.is_compiling() and method.pipeline_kwargs() is not None:
            return _planned_op(handle, method, layer, query, key, value, attention_mask, causal, scaling,
                               window), None
        else:
            runs = _plan(handle, attention_mask, query.shape[0], query.shape[2], key.shape[2], causal, window)
        if runs is not None:
            out = _sparse_attention(handle, method, layer, query, key, value, runs, causal, scaling, window)
            return out, None
        log = logger.debug if layer in handle._warned_layers else logger.warning
        handle._warned_layers.add(layer)
        log("sparge: layer %d got a mask that is not causal over one contiguous range per sequence; running "
            "dense SDPA for it", layer)
    return _dense_attention(handle, module, query, key, value, attention_mask, dropout, scaling, is_causal,
                            window, kwargs)


def _binding_window(passed, configured, nk: int) -> int | None:
    """The layer's window if it cuts any key (a window of at least Nk tokens never does)."""
    window = passed if passed is not None else configured
    if window is None or int(window) >= nk:
        return None
    return int(window)


def _dense_attention(handle, module, query, key, value, attention_mask, dropout, scaling, is_causal, window,
                     kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    nq, nk = query.shape[2], key.shape[2]
    if attention_mask is None and causal and (window is not None or (nq > 1 and nq != nk)):
        # the mask builder returned None: bottom-right causal (with the window) is ours to spell out
        attention_mask = causal_token_mask(nq, nk, device=query.device, window=window)[None, None]
    if handle.collect_stats:
        _count_dense(handle, module.layer_idx, query, key, causal=causal, window=window)
    passed = {k: v for k, v in kwargs.items() if k != "sliding_window"}
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **passed)


_allowed_count = functools.lru_cache(maxsize=1024)(allowed_block_count)


def _count_dense(handle: SpargeAttention, layer: int, query, key, *, causal: bool,
                 window: int | None) -> None:
    allowed = _allowed_count(query.shape[2], key.shape[2], causal, window if causal else None)
    counts = torch.full((query.shape[0], query.shape[1]), allowed, dtype=torch.long, device=query.device)
    stats = handle.layer_stats(layer)
    stats.add(counts, counts, torch.zeros_like(counts))
    stats.dense_calls += 1


def _record(handle: SpargeAttention, layer: int, allowed, computed, pv_skipped) -> None:
    layer_stats = handle.layer_stats(layer)
    layer_stats.add(allowed, computed, pv_skipped)
    layer_stats.sparse_calls += 1


def _sparse_attention(handle, method, layer, query, key, value, runs: list[_Run], causal: bool, scaling,
                      window: int | None):
    bsz, heads, nq, dim = query.shape
    whole = len(runs) == 1 and len(runs[0].batch) == bsz and (runs[0].q0, runs[0].q1) == (0, nq) \
        and (runs[0].k0, runs[0].k1) == (0, key.shape[2])
    if whole and handle.cuda_graphs:
        return _whole_graphed(handle, method, layer, query, key, value, causal, scaling, window)
    out = query.new_zeros(bsz, heads, nq, value.shape[-1]) if not whole else None
    for run in runs:
        idx = list(run.batch)
        q = query if whole else query[idx, :, run.q0:run.q1]
        k = key if whole else key[idx, :, run.k0:run.k1]
        v = value if whole else value[idx, :, run.k0:run.k1]
        run_window = None if window is None or window >= k.shape[2] else window
        result = method(q, k, v, is_causal=causal, scale=scaling, backend=handle.backend, quant=handle.quant,
                        return_stats=handle.collect_stats, window=run_window)
        if handle.collect_stats:
            result, stats = result
            _record(handle, layer, stats.allowed_blocks, stats.computed_blocks, stats.pv_skipped_blocks)
        if whole:
            out = result
        else:
            out[idx, :, run.q0:run.q1] = result
    return out.transpose(1, 2).contiguous()


def _whole_graphed(handle, method, layer, query, key, value, causal: bool, scaling, window: int | None):
    """One call over the whole batch, replayed from a CUDA graph when it repeats (``sparge_core.graphs``;
    eager where a graph cannot be used). A replayed output is a copy (the graph's own is overwritten on
    the layer's next replay)."""
    run_window = None if window is None or window >= key.shape[2] else window
    stats = handle.collect_stats

    def call(q, k, v):
        result = method(q, k, v, is_causal=causal, scale=scaling, backend=handle.backend, quant=handle.quant,
                        return_stats=stats, window=run_window)
        if not stats:
            return (result.transpose(1, 2).contiguous(),)
        out, st = result
        return out.transpose(1, 2).contiguous(), st.allowed_blocks, st.computed_blocks, st.pv_skipped_blocks

    owner = (layer, id(method), causal, scaling, run_window, handle.backend, handle.quant, stats)
    out, *counts = handle.graphs.run(owner, call, (query, key, value), keep=(method,), clone=(0,))
    if stats:  # the counts are summed into new tensors at once, before any later replay
        _record(handle, layer, *counts)
    return out


# --------------------------------------------------------------------------------------------
# a materialized mask under torch.compile: one custom op plans and runs
# --------------------------------------------------------------------------------------------
def _planned_op(handle, method, layer, query, key, value, mask, causal: bool, scaling, window):
    kw = method.pipeline_kwargs()
    sel = Selection.parse(kw["simthreshd1"], kw["cdfthreshd"], kw["topk"])
    theta, budget = sel.for_heads(query.shape[1])
    pv = parse_pvthreshd(kw["pvthreshd"])
    out, allowed, computed, skipped = torch.ops.sparge.hf_planned_attention(
        query, key, value, mask, is_causal=causal, scale=resolve_scale(scaling, query.shape[-1]),
        simthreshd1=list(theta), budget=list(budget), topk_mode=sel.topk_mode,
        pvthreshd=None if pv is None else list(pv.for_heads(query.shape[1])),
        quant=resolve_quant(method._quant(handle.quant) if kw.get("quant") else handle.quant, query.device),
        estimator=kw["estimator"], window=window,
        backend=resolve_backend(handle.backend, query.device).name, local_blocks=kw.get("local_blocks", 0))
    if handle.collect_stats:
        _record(handle, layer, allowed, computed, skipped)
    return out.transpose(1, 2).contiguous()


@torch.library.custom_op("sparge::hf_planned_attention", mutates_args=())
def _hf_planned_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, *, is_causal: bool,
    scale: float, simthreshd1: list[float], budget: list[float], topk_mode: bool,
    pvthreshd: list[float] | None, quant: str, estimator: str, window: int | None, backend: str,
    local_blocks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sparge on each sequence's valid range of a padded batch (``_plan_from_mask``), or dense SDPA with
    the mask when it is not of that form; ``(out (B, Hq, Nq, D), allowed, computed, pv_skipped)``."""
    bsz, heads, nq, _ = query.shape
    nk = key.shape[2]
    runs = _plan_from_mask(mask, bsz, nq, nk, is_causal, window)
    counts = [torch.zeros(bsz, heads, dtype=torch.long, device=query.device) for _ in range(3)]
    if runs is None:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                                               enable_gqa=True)
        allowed = allowed_block_count(nq, nk, is_causal, window if is_causal else None)
        counts[0].fill_(allowed)
        counts[1].fill_(allowed)
        return out, *counts
    out = query.new_zeros(bsz, heads, nq, value.shape[-1])
    params = dict(is_causal=is_causal, scale=scale, simthreshd1=tuple(simthreshd1), budget=tuple(budget),
                  topk_mode=topk_mode, pvthreshd=None if pvthreshd is None else tuple(pvthreshd), quant=quant,
                  estimator=estimator, backend=backend, local_blocks=local_blocks)
    for run in runs:
        idx = list(run.batch)
        k = key[idx, :, run.k0:run.k1]
        run_window = None if window is None or window >= k.shape[2] else window
        result, c = _sparge_attn_impl(query[idx, :, run.q0:run.q1], k, value[idx, :, run.k0:run.k1],
                                      window=run_window, **params)
        out[idx, :, run.q0:run.q1] = result
        for total, part in zip(counts, (c.allowed, c.computed, c.pv_skipped)):
            total[idx] = part
    return out, *counts


@_hf_planned_attention.register_fake
def _(query, key, value, mask, **_kw):
    counts = [query.new_empty((query.shape[0], query.shape[1]), dtype=torch.long) for _ in range(3)]
    return query.new_empty((*query.shape[:3], value.shape[-1])), *counts


# --------------------------------------------------------------------------------------------
# mask analysis: which contiguous token range each sequence attends over
# --------------------------------------------------------------------------------------------
def _plan(handle: SpargeAttention, mask, bsz: int, nq: int, nk: int, causal: bool,
          window: int | None = None) -> list[_Run] | None:
    """Runs covering the batch, or None when the mask is not of the supported form. The plan is read
    from the mask once and cached for every layer that gets the same mask (one forward pass)."""
    if mask is None:
        return [_Run(tuple(range(bsz)), 0, nq, 0, nk)]
    key = (mask._version, causal, nq, nk, window)
    cached = handle._mask_plan
    if cached is not None and cached[0]() is mask and cached[1] == key:
        return cached[2]
    runs = _plan_from_mask(mask, bsz, nq, nk, causal, window)
    handle._mask_plan = (weakref.ref(mask), key, runs)
    return runs


def _allowed(mask: torch.Tensor) -> torch.Tensor | None:
    """Boolean ``(B, Nq, Nk)`` "may attend" from a bool or additive float mask; None if unsupported."""
    if mask.ndim != 4:
        return None
    if mask.shape[1] != 1:
        if not bool((mask == mask[:, :1]).all()):
            return None  # per-head masks
        mask = mask[:, :1]
    mask = mask[:, 0]
    if mask.dtype == torch.bool:
        return mask
    allowed = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    return allowed if bool((allowed | blocked).all()) else None  # a float bias is not a mask


def _plan_from_mask(mask: torch.Tensor, bsz: int, nq: int, nk: int, causal: bool,
                    window: int | None = None) -> list[_Run] | None:
    allowed = _allowed(mask)
    if allowed is None or allowed.shape[-2:] != (nq, nk) or allowed.shape[0] not in (1, bsz):
        return None
    allowed = allowed.expand(bsz, nq, nk)
    offset = nk - nq  # query row i sits at key position i + offset
    groups: dict[tuple[int, int, int, int], list[int]] = {}
    for b in range(bsz):
        span = _valid_span(allowed[b], nq, offset, causal, window)
        if span is None:
            return None
        if span[1] > span[0]:  # sequences that are all padding get zeros
            groups.setdefault(span, []).append(b)
    return [_Run(tuple(batch), *span) for span, batch in groups.items()]


def _valid_span(allowed: torch.Tensor, nq: int, offset: int, causal: bool,
                window: int | None = None) -> tuple[int, int, int, int] | None:
    """``(q0, q1, k0, k1)`` if ``allowed`` (Nq, Nk) is causal (with the sliding ``window``) or full over
    keys [k0, k1) for the query rows at those positions (other rows may hold anything: they are
    padding); else None."""
    nk = allowed.shape[1]
    keys = allowed.any(dim=0).nonzero().flatten()
    if keys.numel() == 0:
        return (0, 0, 0, 0)
    k0, k1 = int(keys[0]), int(keys[-1]) + 1
    if keys.numel() != k1 - k0:
        return None  # holes in the key range
    q0, q1 = max(0, k0 - offset), min(nq, k1 - offset)
    if q1 <= q0:
        return None  # no query row inside the valid range (not a layout we split)
    rows = allowed[q0:q1]
    if causal:
        expected = causal_token_mask(q1 - q0, k1 - k0, device=allowed.device, window=window)
    else:
        expected = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=allowed.device)
    if not bool((rows[:, k0:k1] == expected).all()):
        return None
    if (k0 > 0 and bool(rows[:, :k0].any())) or (k1 < nk and bool(rows[:, k1:].any())):
        return None
    return (q0, q1, k0, k1)


register()
