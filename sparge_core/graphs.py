"""Replaying a repeated attention call from a CUDA graph, so that its host cost is one replay.

Why: a sparse call is Python, five Triton launches and a dozen small torch kernels; on an H200 host
issuing them takes 0.45-0.75 ms, more than the whole dense call of a small model's layer
(``docs/design.md``, "Host cost of a call"). A CUDA graph of the same call replays every kernel for a
few tens of microseconds of host time, and a model's prefills at one length repeat the same calls.

How ``GraphCache.run(owner, fn, inputs)`` treats a call:

- Eligible calls only: every input on one CUDA device; not while ``torch.compile`` traces, not inside
  another stream capture (the caller's own CUDA graph then records the eager call), not when autograd
  would record it; and the largest input at most ``MAX_GRAPH_ELEMENTS`` elements (above that one
  call's GPU work already hides its host work, and a graph's buffers would cost memory for nothing).
  Everything else runs ``fn`` eagerly.
- ``owner`` names what ``fn`` computes apart from its tensor inputs (the layer, its method and every
  non-tensor argument); with the inputs' geometry (shape, strides, storage offset, dtype, device) it
  keys a graph. The first call of a key runs eagerly (it compiles the kernels and fills the by-value
  caches a capture must not touch); the second captures ``fn`` once and replays it; later calls copy
  the inputs into the graph's static buffers and replay.
- The static input buffers are shared by every owner of one geometry (the layers of a model at one
  length), and so is one memory pool. The tensors ``run`` returns belong to the graph and are
  overwritten when the same graph replays again, except those it is asked to ``clone``.
- At most ``max_geometries`` geometries are kept; the least recently used one is dropped with its
  graphs and buffers. A key whose capture fails runs eagerly from then on (logged once; the cache's first
  failure with its traceback).

Memory: every graph keeps its output (and the pool its largest intermediates), so a geometry costs
about one attention output per layer: 0.3 GB for SmolLM2 at 8K, 2 GB for a Llama-3.1-8B shape at 8K
(32 layers x 64 MiB); hence the default of two geometries. A capture that runs out of memory leaves
its key eager.

Limits: a replay reads the static buffers, so callers must not run two calls of one geometry
concurrently on different streams; the first two calls of a new length pay the eager cost (the
second also the capture, about a millisecond per layer), so workloads whose lengths never repeat
gain nothing.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from . import validation

logger = logging.getLogger(__name__)

#: the largest input (elements) whose calls are graphed: 2**26 is a 32-head, 8K-token, head-dim-128
#: query (128 MiB in bf16); a call that size already keeps the GPU busier than its host cost.
MAX_GRAPH_ELEMENTS = 1 << 26
#: how many calls of a key run eagerly before it is captured
EAGER_CALLS_BEFORE_CAPTURE = 1
_MAX_SIGHTINGS = 4096  # keys remembered while counting eager calls (cleared when exceeded)

Geometry = tuple


def graphable(inputs: Sequence[torch.Tensor]) -> bool:
    """Whether a call on ``inputs`` may be replayed from a CUDA graph (see the module docstring)."""
    if not inputs or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs):
        return False
    device = inputs[0].device
    if any(t.device != device for t in inputs):
        return False
    if max(t.numel() for t in inputs) > MAX_GRAPH_ELEMENTS:
        return False
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return False
    return True


def _geometry(inputs: Sequence[torch.Tensor]) -> Geometry:
    return tuple((tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.device) for t in inputs)


def _static_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor with ``t``'s shape, strides and storage offset (so the kernels take the
    same code path, e.g. tensor descriptors or pointer loads, as on ``t`` itself)."""
    extent = t.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    storage = torch.empty(extent if t.numel() else 0, dtype=t.dtype, device=t.device)
    return storage.as_strided(t.shape, t.stride(), t.storage_offset())


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    outputs: tuple[torch.Tensor, ...]
    single: bool  # fn returned one tensor, not a tuple
    keep: tuple  # what the graph reads that nothing else may free: owner objects, device values


@dataclass
class _Geometry:
    inputs: tuple[torch.Tensor, ...]
    pool: tuple
    graphs: dict[Hashable, _Graph] = field(default_factory=dict)


class GraphCache:
    """CUDA graphs of repeated calls, per owner and input geometry (see the module docstring)."""

    def __init__(self, max_geometries: int = 2):
        if not isinstance(max_geometries, int) or max_geometries < 1:
            raise ValueError(f"max_geometries must be an integer >= 1, got {max_geometries!r}")
        self.max_geometries = max_geometries
        self._geometries: OrderedDict[Geometry, _Geometry] = OrderedDict()
        self._sightings: dict[tuple, int] = {}
        self._failed: set[tuple] = set()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.captures = 0
        self.replays = 0

    @property
    def failures(self) -> int:
        """How many keys could not be captured (they run eagerly)."""
        return len(self._failed)

    def __len__(self) -> int:
        return sum(len(g.graphs) for g in self._geometries.values())

    def clear(self) -> None:
        self._geometries.clear()
        self._sightings.clear()
        self._failed.clear()

    def run(self, owner: Hashable, fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
            inputs: Sequence[torch.Tensor], *, keep: tuple = (), clone: Sequence[int] = ()):
        """``fn(*inputs)``, eagerly or from this key's graph. ``keep``: objects the graph depends on that
        must stay alive while it does (e.g. the method ``fn`` calls). ``clone``: positions of the outputs
        to hand out as copies when they come from a graph (the others are the graph's own tensors)."""
        inputs = tuple(inputs)
        if not graphable(inputs):
            return fn(*inputs)
        geometry = _geometry(inputs)
        key = (owner, geometry)
        if key in self._failed:
            return fn(*inputs)
        entry = self._geometries.get(geometry)
        graph = entry.graphs.get(owner) if entry is not None else None
        if graph is None:
            seen = self._sightings.get(key, 0)
            if seen < EAGER_CALLS_BEFORE_CAPTURE:
                if len(self._sightings) >= _MAX_SIGHTINGS:
                    self._sightings.clear()
                self._sightings[key] = seen + 1
                return fn(*inputs)
            self._sightings.pop(key, None)
            entry = self._entry(geometry, inputs)
            graph = self._capture(key, fn, entry, keep)
            if graph is None:
                return fn(*inputs)
            entry.graphs[owner] = graph
        self._geometries.move_to_end(geometry)
        for static, given in zip(entry.inputs, inputs):
            static.copy_(given)
        graph.graph.replay()
        self.replays += 1
        outputs = tuple(t.clone() if i in clone else t for i, t in enumerate(graph.outputs))
        return outputs[0] if graph.single else outputs

    def _entry(self, geometry: Geometry, inputs: tuple[torch.Tensor, ...]) -> _Geometry:
        entry = self._geometries.get(geometry)
        if entry is None:
            while len(self._geometries) >= self.max_geometries:
                self._geometries.popitem(last=False)
            entry = self._geometries[geometry] = _Geometry(tuple(_static_like(t) for t in inputs),
                                                           torch.cuda.graph_pool_handle())
        return entry

    def _capture(self, key, fn, entry: _Geometry, keep: tuple) -> _Graph | None:
        device = entry.inputs[0].device
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        try:
            with validation.pinned_device_values() as pinned, torch.cuda.stream(stream):
                graph.capture_begin(pool=entry.pool, capture_error_mode="thread_local")
                try:
                    result = fn(*entry.inputs)
                finally:
                    graph.capture_end()
        except Exception as err:  # an op that cannot be captured: this key stays eager
            first = not self._failed
            self._failed.add(key)
            # the first failure of a cache with its traceback: a later one is often a consequence of it
            logger.warning("sparge: a call could not be captured in a CUDA graph (%s: %s); it runs eagerly",
                           type(err).__name__, err, exc_info=first)
            current.wait_stream(stream)
            return None
        current.wait_stream(stream)
        single = isinstance(result, torch.Tensor)
        outputs = (result,) if single else tuple(result)
        if not all(isinstance(t, torch.Tensor) for t in outputs):
            raise TypeError("a graphed call must return a tensor or a tuple of tensors")
        self.captures += 1
        return _Graph(graph, outputs, single, (*keep, *pinned))
