"""Sparse attention and Q/K/V capture for diffusion transformers (DiT, MM-DiT, video DiT).

The hook contract: a DiT's attention layer computes Q, K, V ``(B, heads, tokens, head_dim)``,
applies its positional encoding (RoPE), and then calls ``attention_fn(q, k, v, layer_idx)`` and
uses the ``(B, heads, tokens, head_dim)`` result. A model following it exposes the layers as
modules with attributes ``attention_fn`` and ``layer_idx`` (``evals.dit.model.DiT`` does, and
also has ``set_attention_fn``); ``install`` swaps the function on every such module and returns
a handle that restores the originals.

``SparseDiTAttention`` is such an ``attention_fn``. Per call it

1. reorders the visual tokens ``[text_before, text_before + prod(grid))`` of Q, K and V by a token
   order of ``sparge_core.permute`` (Hilbert by default; text tokens before and after keep their
   places),
2. runs the layer's attention method (non-causal) from the ``sparge_core.methods`` registry: one
   method for every layer (``from_method``), or per-layer methods from a calibrated
   ``ModelConfig`` (``from_config``; layers calibrated dense run the ``dense`` method),
3. restores the model's token order on the output,

and accumulates block counts per layer (the paper's sparsity) and, optionally, the time spent in
the attention method (CUDA-synchronised wall time of prediction + kernel, not of the permutation;
measured only when ``time_attention`` is set), from which ``summary`` reports dense-equivalent
TOPS (the FLOPs dense attention would need, ``4 B H Nq Nk D``, over the measured time), the
paper's speed measure.

``QKVCapture`` is an ``attention_fn`` that hands the post-RoPE Q/K/V of selected batch rows to a
sink (e.g. ``evals.dit.capture`` writes them as safetensors; this package imports only torch),
optionally in a token order, then runs the wrapped attention (dense SDPA by default). A sampler
labels rows with ``set_context(step=..., sample_ids=[...])``: one calibration sample per
(prompt, denoising step); rows whose id is None (e.g. the unconditional half of a
classifier-free-guidance batch) are not recorded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from ..graphs import GraphCache
from ..methods import AttentionMethod, get_method
from ..methods.sparge import Sparge
from ..params import ModelConfig
from ..permute import TokenOrder, get_order, permute_tokens, unpermute_tokens

logger = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class TokenLayout:
    """Where the visual tokens sit in the joint sequence: ``text_before`` tokens, then the visual
    grid ``(H, W)`` or ``(T, H, W)`` in row-major order, then any remaining (text) tokens."""

    text_before: int
    grid: tuple[int, ...]

    def __post_init__(self):
        if self.text_before < 0:
            raise ValueError(f"text_before must be >= 0, got {self.text_before}")
        if len(self.grid) not in (2, 3) or any(g < 1 for g in self.grid):
            raise ValueError(f"grid must be (H, W) or (T, H, W) of positive sizes, got {self.grid}")

    @property
    def num_visual(self) -> int:
        return math.prod(self.grid)

    def check(self, num_tokens: int) -> None:
        if self.text_before + self.num_visual > num_tokens:
            raise ValueError(f"layout needs {self.text_before} + {self.num_visual} tokens but the attention call "
                             f"has {num_tokens}")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """Dense non-causal attention (the default wrapped function)."""
    return F.scaled_dot_product_attention(q, k, v)


# --------------------------------------------------------------------------------------------
# installing an attention_fn
# --------------------------------------------------------------------------------------------
class _HasAttentionFn(Protocol):
    attention_fn: AttentionFn
    layer_idx: int


def attention_layers(model: torch.nn.Module) -> list[_HasAttentionFn]:
    """The modules of ``model`` that follow the hook contract, in layer order."""
    layers = [m for m in model.modules() if hasattr(m, "attention_fn") and isinstance(getattr(m, "layer_idx", None), int)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention module with `attention_fn` and `layer_idx`; "
                         f"its attention must call attention_fn(q, k, v, layer_idx) (see sparge_core.integrations.dit)")
    return sorted(layers, key=lambda m: m.layer_idx)


class Installed:
    """Handle returned by ``install``: ``restore()`` (or leaving the ``with`` block) undoes it."""

    def __init__(self, saved: list[tuple[_HasAttentionFn, AttentionFn]]):
        self._saved = saved

    def restore(self) -> None:
        for module, fn in self._saved:
            module.attention_fn = fn
        self._saved = []

    def __enter__(self) -> Installed:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def install(model: torch.nn.Module, fn: AttentionFn) -> Installed:
    """Route every attention layer of ``model`` through ``fn(q, k, v, layer_idx)``."""
    saved = []
    for module in attention_layers(model):
        saved.append((module, module.attention_fn))
        module.attention_fn = fn
    return Installed(saved)


# --------------------------------------------------------------------------------------------
# sparse attention with a token order
# --------------------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """Block counts of one layer summed over calls, plus calls and attention seconds. A call's counts
    are added on the device (``add_counts``: no host read per call); ``settle`` (done by the figures
    and by ``SparseDiTAttention.summary``) reads them into the integer fields once."""

    allowed: int = 0
    computed: int = 0
    pv_skipped: int = 0
    calls: int = 0
    seconds: float = 0.0
    dense_flops: float = 0.0  # 4 * B * H * Nq * Nk * D per call: what dense attention would compute
    _pending: torch.Tensor | None = field(default=None, repr=False)  # (3,) int64: allowed, computed, skipped

    def add_counts(self, counts: torch.Tensor) -> None:
        """Add one call's ``(allowed, computed, pv_skipped)`` totals (a (3,) tensor on any device)."""
        self._pending = counts.to(torch.long, copy=True) if self._pending is None else self._pending + counts

    def settle(self) -> LayerStats:
        if self._pending is not None:
            allowed, computed, skipped = (int(x) for x in self._pending.tolist())
            self.allowed, self.computed, self.pv_skipped = (self.allowed + allowed, self.computed + computed,
                                                            self.pv_skipped + skipped)
            self._pending = None
        return self

    @property
    def sparsity(self) -> float:
        """Paper definition: skipped (QK + PV) block products / dense total."""
        self.settle()
        return (2 * (self.allowed - self.computed) + self.pv_skipped) / (2 * self.allowed) if self.allowed else 0.0

    @property
    def qk_sparsity(self) -> float:
        self.settle()
        return (self.allowed - self.computed) / self.allowed if self.allowed else 0.0


@dataclass
class SparseDiTAttention:
    """An ``attention_fn`` running per-layer attention methods on token-reordered Q/K/V."""

    methods: Callable[[int], AttentionMethod]
    layout: TokenLayout
    order: str = "hilbert"
    order_seed: int = 0
    backend: str = "auto"
    quant: str = "auto"
    time_attention: bool = False
    stats: dict[int, LayerStats] = field(default_factory=dict)
    cuda_graphs: bool = True  # replay a repeated call from a CUDA graph (sparge_core.graphs)
    graphs: GraphCache = field(default_factory=GraphCache, repr=False)

    @classmethod
    def from_method(cls, name: str, layout: TokenLayout, *, order: str = "hilbert", params: dict | None = None,
                    **kwargs) -> SparseDiTAttention:
        """One method for every layer: ``name`` from the method registry, built with ``params``."""
        method = get_method(name, **(params or {}))
        return cls(lambda layer: method, layout, order=order, **kwargs)

    @classmethod
    def from_config(cls, config: ModelConfig, layout: TokenLayout, *, order: str = "hilbert",
                    num_layers: int | None = None, num_heads: int | None = None, head_dim: int | None = None,
                    **kwargs) -> SparseDiTAttention:
        """Per-layer calibrated SpargeAttn; shapes given here are checked against the config."""
        if num_layers is not None and num_heads is not None and head_dim is not None:
            config.check_matches(num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_heads, head_dim=head_dim)
        config.check_bidirectional("a DiT")
        per_layer = {}
        for lc in config.layers:
            per_layer[lc.layer] = get_method("dense") if lc.is_dense else Sparge.from_layer_config(lc)

        def lookup(layer: int) -> AttentionMethod:
            if layer not in per_layer:
                raise KeyError(f"the sparge config has no entry for layer {layer} (it has {sorted(per_layer)})")
            return per_layer[layer]

        return cls(lookup, layout, order=order, **kwargs)

    def token_order(self, device: torch.device) -> TokenOrder:
        return get_order(self.order, self.layout.grid, device=device, seed=self.order_seed)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        self.layout.check(q.shape[2])
        order = self.token_order(q.device)
        start = self.layout.text_before
        method = self.methods(layer_idx)

        def call(q, k, v):
            qp, kp, vp = (permute_tokens(x, order, start) for x in (q, k, v))
            out, stats = method.attend(qp, kp, vp, is_causal=False, backend=self.backend, quant=self.quant)
            counts = torch.stack([stats.allowed_blocks.sum(), stats.computed_blocks.sum(),
                                  stats.pv_skipped_blocks.sum()])
            return unpermute_tokens(out, order, start), counts

        if self.time_attention and q.is_cuda:
            torch.cuda.synchronize(q.device)
        t0 = time.perf_counter()
        if self.cuda_graphs:
            owner = (layer_idx, id(method), self.order, self.order_seed, start, self.backend, self.quant)
            out, counts = self.graphs.run(owner, call, (q, k, v), keep=(method, order), clone=(0,))
        else:
            out, counts = call(q, k, v)
        if self.time_attention and q.is_cuda:
            torch.cuda.synchronize(q.device)
        seconds = time.perf_counter() - t0
        st = self.stats.setdefault(layer_idx, LayerStats())
        st.add_counts(counts)  # (a new tensor at once: a later replay may overwrite ``counts``)
        st.calls += 1
        st.seconds += seconds
        st.dense_flops += 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        return out

    def reset_stats(self) -> None:
        self.stats.clear()

    def summary(self) -> dict:
        """Overall and per-layer sparsity, calls and attention seconds (seconds are only meaningful
        with ``time_attention``)."""
        total = LayerStats()
        for st in self.stats.values():
            st.settle()
            total.allowed += st.allowed
            total.computed += st.computed
            total.pv_skipped += st.pv_skipped
            total.calls += st.calls
            total.seconds += st.seconds
            total.dense_flops += st.dense_flops
        timed = self.time_attention and total.seconds > 0
        return {
            "sparsity": total.sparsity, "qk_sparsity": total.qk_sparsity, "calls": total.calls,
            "attention_seconds": total.seconds if self.time_attention else None,
            "attention_tops": total.dense_flops / total.seconds / 1e12 if timed else None,
            "per_layer": {str(i): {"sparsity": s.sparsity, "qk_sparsity": s.qk_sparsity, "calls": s.calls}
                          for i, s in sorted(self.stats.items())},
        }


# --------------------------------------------------------------------------------------------
# capture for calibration
# --------------------------------------------------------------------------------------------
QKVSink = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class QKVCapture:
    """An ``attention_fn`` that records Q/K/V of labelled batch rows, then runs ``inner``.

    ``sink(layer_idx, sample_id, q, k, v)`` receives ``(1, heads, tokens, head_dim)`` tensors, in
    the token order ``order`` when one is given (with ``layout``), else as the model made them.
    ``layers`` restricts recording to some layers (None: all).
    """

    sink: QKVSink
    inner: AttentionFn = sdpa
    layout: TokenLayout | None = None
    order: str | None = None
    order_seed: int = 0
    layers: set[int] | None = None
    _sample_ids: list[int | None] = field(default_factory=list)
    step: int | None = None

    def __post_init__(self):
        if self.order is not None and self.layout is None:
            raise ValueError("a token order needs the token layout (text_before, grid)")

    def set_context(self, *, sample_ids: list[int | None], step: int | None = None) -> None:
        """Label the batch rows of the following calls: row i is sample ``sample_ids[i]`` (None: skip)."""
        self._sample_ids = list(sample_ids)
        self.step = step

    def _rows(self, batch: int) -> Iterator[tuple[int, int]]:
        if len(self._sample_ids) > batch:
            raise ValueError(f"{len(self._sample_ids)} sample ids for a batch of {batch} rows")
        for row, sid in enumerate(self._sample_ids):
            if sid is not None:
                yield row, sid

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
        if self.layers is None or layer_idx in self.layers:
            tensors = (q, k, v)
            if self.order is not None:
                self.layout.check(q.shape[2])
                order = get_order(self.order, self.layout.grid, device=q.device, seed=self.order_seed)
                tensors = tuple(permute_tokens(x, order, self.layout.text_before) for x in tensors)
            for row, sid in self._rows(q.shape[0]):
                self.sink(layer_idx, sid, *(x[row:row + 1].detach() for x in tensors))
        return self.inner(q, k, v, layer_idx)


__all__ = ["Installed", "LayerStats", "QKVCapture", "SparseDiTAttention", "TokenLayout", "attention_layers", "install",
           "sdpa"]
