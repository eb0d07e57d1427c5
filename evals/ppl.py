"""Perplexity of a causal LM on fixed token windows, with dense SDPA or any sparge method.

``perplexity(model, windows)`` runs each window as one forward pass (no overlap, no BOS) and
returns the token-level perplexity ``exp(mean NLL)`` over all predicted tokens.
``run_methods(model, windows, methods)`` measures several attention methods on the same windows
(``"sdpa"`` is the model's own dense attention; other names go through
``sparge_core.integrations.transformers.apply``) and collects per-layer sparsity.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

DENSE = "sdpa"


@dataclass(frozen=True)
class PerplexityResult:
    method: str
    params: dict[str, Any]
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int
    seconds: float
    window_ppl: tuple[float, ...]
    sparsity: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL of tokens 1..L-1 of each window given the tokens before it: float64 ``(B,)``."""
    logits = model(input_ids).logits.float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    return nll.double().sum(dim=1)


def perplexity(model, input_ids: torch.Tensor, *, batch_size: int = 1) -> tuple[float, float, tuple[float, ...]]:
    """``(ppl, mean_nll, per-window ppl)`` over windows ``(N, L)`` run ``batch_size`` at a time."""
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (windows, length >= 2), got shape {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    sums = [window_nll(model, chunk.to(device)).cpu() for chunk in input_ids.split(batch_size)]
    per_window = torch.cat(sums)
    predicted = input_ids.shape[1] - 1
    mean = float(per_window.sum()) / (predicted * input_ids.shape[0])
    return math.exp(mean), mean, tuple(math.exp(float(s) / predicted) for s in per_window)


def run_methods(model, input_ids: torch.Tensor, methods: list[tuple[str, dict[str, Any]]], *,
                backend: str = "auto", batch_size: int = 1) -> list[PerplexityResult]:
    """Perplexity for each ``(method name, hyperparameters)``; ``"sdpa"`` means no sparge."""
    from sparge_core.integrations.transformers import apply, handle_of, remove

    results = []
    for name, params in methods:
        handle = None
        if name != DENSE:
            handle = apply(model, name, backend=backend, collect_stats=True, **params)
        started = time.perf_counter()
        try:
            ppl, nll, per_window = perplexity(model, input_ids, batch_size=batch_size)
        finally:
            if handle_of(model) is not None:
                remove(model)
        seconds = time.perf_counter() - started
        sparsity = handle.sparsity_report() if handle is not None else {}
        shown = {**handle.methods[0].params()} if handle is not None and handle.methods.get(0) else dict(params)
        results.append(PerplexityResult(name, shown, ppl, nll, int(input_ids.shape[0] * (input_ids.shape[1] - 1)),
                                        seconds, per_window, sparsity))
    return results
