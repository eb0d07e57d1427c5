"""A recorder for the post-RoPE Q, K, V that attention layers receive (torch only).

The transformers integration calls ``QKVRecorder.record(layer, q, k, v)`` from inside its
attention function; ``capture_qkv`` in ``sparge_core.integrations.transformers`` installs it. The
recorder either keeps detached copies in memory (on ``device``, CPU by default) or hands them to
a sink callable, e.g. the safetensors writer in ``calibrate.capture``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

Sink = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class CapturedQKV:
    """One attention call of one layer: q ``(B, Hq, Nq, D)``, k and v ``(B, Hkv, Nk, D)``."""

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


class QKVRecorder:
    """Collects the Q, K, V of the chosen layers (all layers when ``layers`` is None).

    Args:
        layers: layer indices to record; None records every layer.
        sink: called as ``sink(layer, q, k, v)`` with detached tensors instead of keeping them.
        device: where in-memory copies go (ignored with a sink, which gets the tensors as they are).
    """

    def __init__(self, layers: Iterable[int] | None = None, *, sink: Sink | None = None,
                 device: str | torch.device = "cpu"):
        self.layers = None if layers is None else frozenset(_layer_index(x) for x in layers)
        self.sink = sink
        self.device = torch.device(device)
        self.records: dict[int, list[CapturedQKV]] = defaultdict(list)

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def record(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.wants(layer):
            return
        q, k, v = q.detach(), k.detach(), v.detach()
        if self.sink is not None:
            self.sink(layer, q, k, v)
            return
        copy = [t.to(self.device, copy=True) for t in (q, k, v)]
        self.records[layer].append(CapturedQKV(layer, *copy))

    def layer_records(self, layer: int) -> list[CapturedQKV]:
        """The calls recorded for one layer, in order (empty if none)."""
        return list(self.records.get(layer, []))

    def clear(self) -> None:
        self.records.clear()


def _layer_index(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"layer indices must be non-negative integers, got {value!r}")
    return value
