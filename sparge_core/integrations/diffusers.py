"""sparge in diffusers transformers (Wan, Flux, CogVideoX) without patching diffusers.

Mechanism: attention processors, not the attention dispatcher. diffusers 0.42 offers a third party
two ways in. Its dispatcher (``diffusers.models.attention_dispatch``: ``attention_backend``,
``ModelMixin.set_attention_backend``, marked experimental) selects a backend by a member of the
closed ``AttentionBackendName`` enum, so a new backend cannot be registered without writing into
the private ``_AttentionBackendRegistry``; and a backend function receives only ``(query, key,
value, mask, ...)``: no layer identity (per-layer calibrated configs need it) and no token layout
(the Hilbert order needs it). Attention processors are the public per-module hook:
``ModelMixin.set_attn_processor({module name: processor})`` installs any callable on each
attention module, and ``model.attn_processors`` lists them in the model's module order.

``apply`` wraps each self-attention module's own processor in a ``SpargeProcessor`` that runs it
unchanged (projections, norms, RoPE, the joint text + visual concatenation stay the model's code)
and replaces only its ``torch.nn.functional.scaled_dot_product_attention`` call, intercepted with a
``torch.overrides.TorchFunctionMode`` while that processor runs, by the layer's sparge method. This
needs diffusers' ``native`` attention backend (the default); a processor that makes no SDPA call
(another backend set with ``set_attention_backend``) raises, naming the module. ``remove`` puts
the original processors back.

Layer order (what a config's ``layers[i]`` refers to): ``attention_module_names(model)``, the
self-attention modules in ``model.attn_processors`` order, i.e. the model's module order:

- ``WanTransformer3DModel``: ``blocks.<i>.attn1`` (``attn2``, the cross-attention, stays dense); all
  tokens are visual, grid ``(T/pt, H/ph, W/pw)`` of the latent and ``config.patch_size``;
- ``FluxTransformer2DModel``: ``transformer_blocks.<i>.attn``, then ``single_transformer_blocks.<i>.attn``;
  the text tokens come first, then the image grid ``(h, w)`` given by ``img_ids``;
- ``CogVideoXTransformer3DModel``: ``transformer_blocks.<i>.attn1``; the text tokens first, then the
  grid ``(T', H/p, W/p)`` (``T' = T / patch_size_t`` for CogVideoX 1.5).

The layout is read from each forward call's inputs (a forward pre-hook on the transformer): the
latent shape and the config's patch sizes for Wan and CogVideoX, ``img_ids`` and the text length for
Flux (whose text tokens come first and are never reordered). When the visual tokens are not one
row-major grid (e.g. Flux Kontext's reference-image tokens), the tokens keep the model's order.

Per call, a sparse layer reorders the visual tokens of Q/K/V (``sparge_core.permute``, Hilbert by
default), runs its method non-causally, and restores the order: this is
``sparge_core.integrations.dit.SparseDiTAttention``, reused, with its statistics
(``handle.summary()``). Layers without a method (a config's dense or missing layers) and calls with
an attention mask, dropout or a non-default scale run the model's SDPA unchanged (the latter with a
warning, once).

``capture(model, sink)`` records post-RoPE Q/K/V instead (``sparge_core.integrations.dit.QKVCapture``):
one sample per (transformer call, batch row), in the token order ``order`` (Hilbert by default: the
order ``apply`` deploys), labelled with the generation (a new one starts when the timestep rises),
denoising step (a new one when the timestep falls; Wan's conditional and unconditional calls of one
step share it), call, row and timestep. ``calibrate.capture.capture_diffusers`` writes these to disk
in the capture format ``sparge-calibrate --capture-dir ... --non-causal`` reads.

Not supported: ``torch.compile`` of the wrapped modules, context parallelism (``parallel_config``).
Imports only torch (diffusers objects are used through their methods).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..methods import AttentionMethod, get_method, method_names
from ..params import ModelConfig, ModelInfo, weights_fingerprint
from ..registry import Registry
from .dit import QKVCapture, QKVSink, SparseDiTAttention, TokenLayout

logger = logging.getLogger(__name__)

_HANDLE_ATTR = "_sparge_diffusers_handle"


# --------------------------------------------------------------------------------------------
# model families: which modules are layers, where the visual tokens are
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """How sparge reads one diffusers transformer class."""

    name: str
    is_layer: Callable[[str], bool]  # module name -> is it a self-attention layer
    layout: Callable[[Any, dict], TokenLayout | None]  # (model, forward arguments) -> layout (None: unknown)


FAMILIES: Registry[tuple[str, Family]] = Registry("diffusers transformer class")


def _wan_layout(model, args: dict) -> TokenLayout | None:
    _, _, frames, height, width = args["hidden_states"].shape
    pt, ph, pw = model.config.patch_size
    return TokenLayout(0, (frames // pt, height // ph, width // pw))


def _cogvideox_layout(model, args: dict) -> TokenLayout | None:
    _, frames, _, height, width = args["hidden_states"].shape
    p, pt = model.config.patch_size, model.config.patch_size_t
    text = args["encoder_hidden_states"].shape[1]
    return TokenLayout(text, (frames // pt if pt else frames, height // p, width // p))


def _flux_layout(model, args: dict) -> TokenLayout | None:
    ids = args.get("img_ids")
    text = args["encoder_hidden_states"].shape[1]
    n = args["hidden_states"].shape[1]
    if ids is None:
        return None
    ids = ids[0] if ids.ndim == 3 else ids
    rows, cols = ids[:, 1].round().long(), ids[:, 2].round().long()
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    # one row-major grid of the image tokens, or the layout is not known (e.g. extra reference images)
    if (
        ids.shape[0] != n
        or h * w != n
        or not torch.equal(rows * w + cols, torch.arange(n, device=ids.device))
    ):
        return None
    return TokenLayout(text, (h, w))


FAMILIES.add(
    "WanTransformer3DModel", ("wan", Family("wan", lambda name: name.endswith(".attn1"), _wan_layout))
)
FAMILIES.add(
    "FluxTransformer2DModel", ("flux", Family("flux", lambda name: name.endswith(".attn"), _flux_layout))
)
FAMILIES.add(
    "CogVideoXTransformer3DModel",
    ("cogvideox", Family("cogvideox", lambda name: name.endswith(".attn1"), _cogvideox_layout)),
)


def family_of(model) -> Family:
    """The ``Family`` of a diffusers transformer (by its class or a base class); unknown classes raise,
    listing the supported ones."""
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES.names():
            return FAMILIES.get(cls.__name__)[1]
    raise ValueError(
        f"sparge does not support {type(model).__name__}; supported diffusers transformers: "
        f"{FAMILIES.names()}"
    )


def _processor_names(model) -> list[str]:
    processors = getattr(model, "attn_processors", None)
    if not isinstance(processors, Mapping):
        raise TypeError(
            f"expected a diffusers ModelMixin with attention processors, got {type(model).__name__}"
        )
    return [name.removesuffix(".processor") for name in processors]


def attention_module_names(model) -> list[str]:
    """The model's self-attention modules in layer order (``layers[i]`` of a config is the i-th)."""
    family = family_of(model)
    names = [name for name in _processor_names(model) if family.is_layer(name)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no self-attention module that sparge recognises")
    return names


def model_info(model, name: str | None = None) -> ModelInfo:
    """The config ``model`` section of a diffusers transformer (layers = ``attention_module_names``)."""
    names = attention_module_names(model)
    module = model.get_submodule(names[0])
    heads = int(module.heads)
    head_dim = int(getattr(module, "head_dim", None) or module.inner_dim // heads)
    kv_heads = int(module.to_k.out_features // head_dim) if hasattr(module, "to_k") else heads
    label = (
        name
        or getattr(model, "sparge_name", None)
        or getattr(model.config, "_name_or_path", "")
        or type(model).__name__
    )
    return ModelInfo(str(label), len(names), heads, kv_heads, head_dim)


# --------------------------------------------------------------------------------------------
# intercepting the processor's SDPA call
# --------------------------------------------------------------------------------------------
Attend = Callable[[int, tuple, dict], torch.Tensor]  # (layer, sdpa args, sdpa kwargs) -> output


class _RouteSdpa(TorchFunctionMode):
    """While active, ``F.scaled_dot_product_attention(...)`` goes to ``attend(layer, args, kwargs)``."""

    def __init__(self, attend: Attend, layer: int):
        super().__init__()
        self.attend, self.layer, self.calls = attend, layer, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            return self.attend(self.layer, args, kwargs)
        return func(*args, **kwargs)


class SpargeProcessor:
    """Runs a module's own processor with its SDPA call routed to sparge (see the module docstring).

    Attribute reads it does not have go to the wrapped processor, and ``set_attention_backend``'s
    writes (``_attention_backend``, ``_parallel_config``) reach it."""

    _FORWARDED = ("_attention_backend", "_parallel_config")

    def __init__(self, inner, layer: int, module_name: str, attend: Attend):
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "module_name", module_name)
        object.__setattr__(self, "attend", attend)

    def _run(self, *args, **kwargs):
        route = _RouteSdpa(self.attend, self.layer)
        with route:
            out = self.inner(*args, **kwargs)
        if route.calls == 0:
            backend = getattr(self.inner, "_attention_backend", None)
            raise RuntimeError(
                f"the processor of {self.module_name} ({type(self.inner).__name__}) made no "
                f"scaled_dot_product_attention call (attention backend {backend!r}); sparge needs "
                f"diffusers' native backend: model.reset_attention_backend()"
            )
        return out

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "inner"), name)

    def __setattr__(self, name, value):
        if name in self._FORWARDED:
            setattr(self.inner, name, value)
        else:
            object.__setattr__(self, name, value)


@functools.cache
def _processor_class(inner_type: type) -> type:
    """A ``SpargeProcessor`` subclass whose ``__call__`` shows ``inner_type.__call__``'s signature:
    diffusers' attention modules pass on only the keyword arguments that signature names."""

    @functools.wraps(inner_type.__call__)
    def __call__(self, *args, **kwargs):
        return self._run(*args, **kwargs)

    return type(f"Sparge{inner_type.__name__}", (SpargeProcessor,), {"__call__": __call__})


def _default_scale(q: torch.Tensor, scale) -> bool:
    return scale is None or math.isclose(float(scale), q.shape[-1] ** -0.5, rel_tol=1e-6)


def _sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


# --------------------------------------------------------------------------------------------
# the installed state: processors, a layout hook, the per-call router
# --------------------------------------------------------------------------------------------
class _Installed:
    """Wrapped processors plus the pre-hook; ``remove()`` restores the originals."""

    def __init__(self, model, attend: Attend, on_forward: Callable[[dict], None]):
        if getattr(model, _HANDLE_ATTR, None) is not None:
            raise ValueError(
                "sparge is already installed on this model; call remove() (or leave its with-block) first"
            )
        self.model = model
        self.family = family_of(model)
        self.module_names = attention_module_names(model)
        self.layout: TokenLayout | None = None
        self._on_forward = on_forward
        self._signature = inspect.signature(model.forward)
        self._originals = dict(model.attn_processors)
        wrapped = dict(self._originals)
        for layer, name in enumerate(self.module_names):
            inner = self._originals[f"{name}.processor"]
            wrapped[f"{name}.processor"] = _processor_class(type(inner))(inner, layer, name, attend)
        model.set_attn_processor(wrapped)  # raises before anything is installed if diffusers refuses
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        setattr(model, _HANDLE_ATTR, self)

    def _pre_forward(self, module, args, kwargs):
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        self.layout = self.family.layout(module, bound)
        self._on_forward(bound)

    def remove(self) -> None:
        if getattr(self.model, _HANDLE_ATTR, None) is not self:
            return
        self._hook.remove()
        self.model.set_attn_processor(self._originals)
        delattr(self.model, _HANDLE_ATTR)

    def visual_layout(self, q: torch.Tensor, layer: int) -> TokenLayout | None:
        """The current layout, checked against this call's token count (None: keep the order)."""
        layout = self.layout
        if layout is None:
            return None
        if layout.text_before + layout.num_visual != q.shape[2]:
            raise ValueError(
                f"{self.module_names[layer]}: the attention call has {q.shape[2]} tokens but the "
                f"{self.family.name} layout of this forward has {layout.text_before} text + "
                f"{layout.num_visual} visual tokens {layout.grid}"
            )
        return layout


class _WarnOnce:
    def __init__(self):
        self.seen: set[str] = set()

    def __call__(self, message: str) -> None:
        if message not in self.seen:
            self.seen.add(message)
            logger.warning(message)


# --------------------------------------------------------------------------------------------
# apply: sparse attention
# --------------------------------------------------------------------------------------------
class SpargeDiffusers:
    """Handle returned by ``apply``: ``summary()``, ``remove()`` (also on leaving a ``with`` block)."""

    def __init__(
        self,
        model,
        methods: dict[int, AttentionMethod | None],
        *,
        order: str,
        order_seed: int,
        backend: str,
        quant: str,
        time_attention: bool,
        description: str,
    ):
        self.methods = methods
        self.description = description
        self.dense_calls: dict[int, int] = {}
        self._warn = _WarnOnce()
        placeholder = TokenLayout(0, (1, 1))
        self._ordered = SparseDiTAttention(
            self._method,
            placeholder,
            order=order,
            order_seed=order_seed,
            backend=backend,
            quant=quant,
            time_attention=time_attention,
        )
        # unknown layouts keep the model's order; both share one statistics table
        self._unordered = SparseDiTAttention(
            self._method,
            placeholder,
            order="row-major",
            backend=backend,
            quant=quant,
            time_attention=time_attention,
            stats=self._ordered.stats,
        )
        self._installed = _Installed(model, self._attend, lambda bound: None)
        self.module_names = self._installed.module_names

    def _method(self, layer: int) -> AttentionMethod:
        return self.methods[layer]

    def _attend(self, layer: int, args: tuple, kwargs: dict) -> torch.Tensor:
        a = _sdpa_arguments(args, kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        reason = None
        if a.get("attn_mask") is not None:
            reason = "an attention mask"
        elif a.get("dropout_p", 0.0):
            reason = "dropout"
        elif a.get("is_causal", False):
            reason = "is_causal=True"
        elif not _default_scale(q, a.get("scale")):
            reason = f"a non-default scale {a.get('scale')}"
        if self.methods.get(layer) is None or reason is not None:
            if reason is not None:
                self._warn(
                    f"sparge: {self.module_names[layer]} and other layers run dense where the attention call "
                    f"has {reason}"
                )
            self.dense_calls[layer] = self.dense_calls.get(layer, 0) + 1
            return F.scaled_dot_product_attention(*args, **kwargs)
        layout = self._installed.visual_layout(q, layer)
        attention = self._ordered if layout is not None else self._unordered
        attention.layout = layout or TokenLayout(0, (1, q.shape[2]))
        return attention(q, k, v, layer)

    def summary(self) -> dict:
        """Sparsity over the sparse calls (``SparseDiTAttention.summary``) plus dense calls per layer."""
        out = self._ordered.summary()
        out["dense_calls"] = {str(i): n for i, n in sorted(self.dense_calls.items())}
        out["layers"] = {str(i): name for i, name in enumerate(self.module_names)}
        out["layout"] = (
            None
            if self._installed.layout is None
            else {
                "text_before": self._installed.layout.text_before,
                "grid": list(self._installed.layout.grid),
            }
        )
        return out

    def reset_stats(self) -> None:
        self._ordered.reset_stats()
        self.dense_calls.clear()

    def remove(self) -> None:
        self._installed.remove()

    def __enter__(self) -> SpargeDiffusers:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _resolve(model, config, params: dict, num_layers: int, *, allow_other_model: bool = False
             ) -> tuple[dict[int, AttentionMethod | None], str]:
    if isinstance(config, Mapping) and config and all(isinstance(k, int) for k in config):
        _no_params(params, "a per-layer mapping of methods")
        bad = [
            k
            for k, m in config.items()
            if not 0 <= k < num_layers or not (m is None or isinstance(m, AttentionMethod))
        ]
        if bad:
            raise ValueError(
                f"per-layer methods: layers {bad} are out of range 0..{num_layers - 1} or not an "
                f"AttentionMethod/None"
            )
        return {i: config.get(i) for i in range(num_layers)}, "per-layer methods"
    if isinstance(config, AttentionMethod):
        _no_params(params, "a configured AttentionMethod")
        return dict.fromkeys(range(num_layers), config), repr(config)
    if isinstance(config, str) and config in method_names():
        method = get_method(config, **params)
        return dict.fromkeys(range(num_layers), method), repr(method)
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.suffix != ".json" and not path.exists():
            raise ValueError(
                f"config {str(config)!r} is neither a known method ({method_names()}) nor a config JSON "
                f"file or a folder holding sparge_config.json"
            )
        config = ModelConfig.load(path)
    elif isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    elif not isinstance(config, ModelConfig):
        raise TypeError(
            f"config must be a method name, an AttentionMethod, {{layer: method}}, a ModelConfig, a dict "
            f"or a "
            f"path, got {type(config).__name__}"
        )
    _no_params(params, "a config")
    info = model_info(model)
    config.check_matches(
        num_layers=info.num_layers,
        num_heads=info.num_heads,
        num_kv_heads=info.num_kv_heads,
        head_dim=info.head_dim,
    )
    config.check_identity(architecture=type(model).__name__, fingerprint=lambda: weights_fingerprint(model),
                          allow_other_model=allow_other_model)
    config.check_bidirectional("a diffusers transformer")
    from ..methods.sparge import Sparge

    methods: dict[int, AttentionMethod | None] = dict.fromkeys(range(num_layers))
    for lc in config.layers:
        methods[lc.layer] = None if lc.is_dense else Sparge.from_layer_config(lc)
    return methods, f"config for {config.model.name}"


def _no_params(params: dict, what: str) -> None:
    if params:
        raise TypeError(
            f"hyperparameters {sorted(params)} cannot be combined with {what}; pass a method name"
        )


def apply(
    model,
    config,
    *,
    order: str = "hilbert",
    order_seed: int = 0,
    backend: str = "auto",
    quant: str = "auto",
    time_attention: bool = False,
    allow_other_model: bool = False,
    **method_params,
) -> SpargeDiffusers:
    """Route the self-attention layers of a diffusers transformer through sparge.

    Args:
        model: a ``WanTransformer3DModel``, ``FluxTransformer2DModel`` or ``CogVideoXTransformer3DModel``
            (e.g. ``pipe.transformer``).
        config: a method name (``method_params`` are its hyperparameters), an ``AttentionMethod``,
            ``{layer: AttentionMethod or None}``, or per-layer calibrated hyperparameters: a
            ``ModelConfig``, its dict, a config JSON path or a folder holding ``sparge_config.json``
            (layers index ``attention_module_names(model)``; dense and missing layers run SDPA).
        order: token order of the visual tokens (``sparge_core.permute.order_names()``).
        backend, quant: kernel settings (``sparge_core.block_sparse_attn``).
        time_attention: measure each sparse call (CUDA-synchronised) for ``summary()["attention_tops"]``.
        allow_other_model: apply a config calibrated for another model of the same shape (its
            recorded architecture and weights fingerprint are checked otherwise).
    """
    names = attention_module_names(model)
    methods, description = _resolve(model, config, method_params, len(names), allow_other_model=allow_other_model)
    return SpargeDiffusers(
        model,
        methods,
        order=order,
        order_seed=order_seed,
        backend=backend,
        quant=quant,
        time_attention=time_attention,
        description=description,
    )


def remove(model) -> None:
    """Undo ``apply`` or ``capture`` on ``model`` (restore its processors)."""
    installed = getattr(model, _HANDLE_ATTR, None)
    if installed is None:
        raise ValueError("sparge is not installed on this model (nothing to remove)")
    installed.remove()


# --------------------------------------------------------------------------------------------
# capture: (generation, step, row) samples of post-RoPE Q/K/V for calibration
# --------------------------------------------------------------------------------------------
@dataclass
class DiffusersCapture:
    """Handle returned by ``capture``; ``samples`` lists one record per captured (call, row)."""

    model: Any
    sink: QKVSink
    order: str | None = "hilbert"
    layers: set[int] | None = None
    steps: set[int] | None = None
    rows: set[int] | None = None
    samples: list[dict] = field(default_factory=list)
    seq_len: int | None = None
    layout: TokenLayout | None = None
    _generation: int = -1
    _step: int = 0
    _call: int = -1
    _last_t: float | None = None

    def __post_init__(self):
        self._recorder = QKVCapture(self._checked_sink, inner=lambda q, k, v, layer: None, layers=self.layers)
        self._installed = _Installed(self.model, self._attend, self._label)
        self.module_names = self._installed.module_names

    def _label(self, bound: dict) -> None:
        timestep = bound.get("timestep")
        hidden = bound["hidden_states"]
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep or 0.0)
        if self._last_t is None or t > self._last_t:
            self._generation, self._step = self._generation + 1, 0
        elif t < self._last_t:
            self._step += 1
        self._last_t = t
        self._call += 1
        ids: list[int | None] = []
        for row in range(hidden.shape[0]):
            keep = (self.steps is None or self._step in self.steps) and (
                self.rows is None or row in self.rows
            )
            if not keep:
                ids.append(None)
                continue
            row_t = (
                float(timestep.flatten()[row])
                if isinstance(timestep, torch.Tensor) and timestep.numel() > 1
                else t
            )
            ids.append(len(self.samples))
            self.samples.append(
                {
                    "sample": len(self.samples),
                    "generation": self._generation,
                    "step": self._step,
                    "call": self._call,
                    "row": row,
                    "timestep": round(row_t, 6),
                }
            )
        layout = self._installed.layout
        if self.order is not None and layout is None:
            raise ValueError(
                f"the token layout of this {self._installed.family.name} call is not known, so the "
                f"'{self.order}' order cannot be applied; capture with order=None"
            )
        self.layout = layout
        self._recorder.layout = layout if self.order is not None else None
        self._recorder.order = self.order
        self._recorder.set_context(sample_ids=ids, step=self._step)

    def _checked_sink(self, layer: int, sample: int, q, k, v) -> None:
        if self.seq_len is None:
            self.seq_len = q.shape[2]
        elif q.shape[2] != self.seq_len:
            raise ValueError(
                f"this capture holds {self.seq_len} tokens per sample but a call has {q.shape[2]}: "
                f"capture each resolution / frame count in its own folder"
            )
        self.sink(layer, sample, q, k, v)

    def _attend(self, layer: int, args: tuple, kwargs: dict) -> torch.Tensor:
        a = _sdpa_arguments(args, kwargs)
        q = a["query"]
        if self.order is not None:
            self._installed.visual_layout(q, layer)
        self._recorder(q, a["key"], a["value"], layer)
        return F.scaled_dot_product_attention(*args, **kwargs)

    def meta(self) -> dict[str, Any]:
        """The model/sample fields of a capture ``meta.json`` (``calibrate.capture`` adds the rest)."""
        info = model_info(self.model)
        layout = self.layout
        return {
            "num_layers": info.num_layers,
            "num_heads": info.num_heads,
            "num_kv_heads": info.num_kv_heads,
            "head_dim": info.head_dim,
            "seq_len": self.seq_len,
            "samples": len(self.samples),
            "layers": sorted(self.layers) if self.layers else list(range(info.num_layers)),
            "source": "diffusers",
            "is_causal": False,
            "modules": self.module_names,
            "token_layout": None
            if layout is None
            else {
                "text_before": layout.text_before,
                "grid": list(layout.grid),
                "order": self.order or "row-major",
            },
            "sample_info": list(self.samples),
        }

    def remove(self) -> None:
        self._installed.remove()

    def __enter__(self) -> DiffusersCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def capture(
    model, sink: QKVSink, *, order: str | None = "hilbert", layers=None, steps=None, rows=None
) -> DiffusersCapture:
    """Record post-RoPE Q/K/V of the self-attention layers while the model runs (dense attention).

    ``sink(layer, sample, q, k, v)`` receives ``(1, heads, tokens, head_dim)`` tensors in the token
    order ``order`` (None: as the model made them). ``layers``, ``steps`` (denoising step indices)
    and ``rows`` (batch rows, e.g. ``[1]`` for the conditional half of a CogVideoX CFG batch) limit
    what is recorded. The handle's ``samples`` label every sample (see the module docstring).
    """
    num_layers = len(attention_module_names(model))
    chosen = None if layers is None else {int(x) for x in layers}
    bad = sorted(x for x in (chosen or ()) if not 0 <= x < num_layers)
    if bad:
        raise ValueError(f"layers {bad} are out of range; the model has layers 0..{num_layers - 1}")
    return DiffusersCapture(
        model,
        sink,
        order=order,
        layers=chosen,
        steps=None if steps is None else set(steps),
        rows=None if rows is None else set(rows),
    )


@contextlib.contextmanager
def applied(model, config, **kwargs) -> Iterator[SpargeDiffusers]:
    """``with applied(pipe.transformer, "runs/wan.json"): pipe(...)``: ``apply`` for a block."""
    handle = apply(model, config, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()


__all__ = [
    "FAMILIES",
    "DiffusersCapture",
    "Family",
    "SpargeDiffusers",
    "SpargeProcessor",
    "applied",
    "apply",
    "attention_module_names",
    "capture",
    "family_of",
    "model_info",
    "remove",
]
