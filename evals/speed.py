"""Speed suite: prefill latency (time to first token) and attention-only time per layer.

- **Prefill**: one forward pass over a ``length``-token prompt without KV cache (the work before the
  first generated token), median of ``repeats`` runs after ``warmup`` runs, synchronised on CUDA.
- **Attention only**: the post-RoPE Q/K/V of every layer at that length are captured once (dense
  run); each layer's attention is then timed alone with the method (prediction included) and with
  dense SDPA, using ``triton.testing.do_bench`` medians on CUDA (a wall clock on CPU). Reported as
  milliseconds per layer (``ms``; for sparse layers also ``dense_ms``, dense SDPA on the same Q/K/V in
  the same run, so ``scripts/predicted_vs_measured.py`` can set a config's predicted speed-up against
  the measured one) and dense-equivalent TOPS (4 n^2 d heads / time, halved: causal). A calibrated
  config's layers run what the config says (its variant: quantization, stage 2 on or off). A sparse
  layer's call is timed as ``apply`` runs it at a repeated length: replayed from a CUDA graph
  (``sparge_core.graphs``, the copies of Q/K/V in included; eager on a CPU).

On a CPU the suite runs (the reference backend), and results say ``CPU``: its numbers say nothing
about GPU speed.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_ms(model, ids: torch.Tensor, *, warmup: int = 2, repeats: int = 5) -> list[float]:
    device = ids.device
    for _ in range(warmup):
        model(ids, use_cache=False, logits_to_keep=1)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def _time(fn, device: torch.device, repeats: int = 3) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


@torch.no_grad()
def capture_layers(model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Q/K/V of every layer for one prompt, kept on the model's device."""
    from sparge_core.integrations.transformers import capture_qkv

    store: dict[int, tuple] = {}

    def sink(layer, q, k, v):
        store[layer] = (q, k, v)

    with capture_qkv(model, None, sink=sink, device=ids.device):
        model(ids, use_cache=False, logits_to_keep=1)
    return store


def attention_ms(layers: dict[int, tuple], method_for_layer, device: torch.device, *, backend: str = "auto",
                 repeats: int = 3, cuda_graphs: bool = True, graphs=None) -> dict[int, dict[str, float]]:
    """Per layer: the method's attention time (prediction included) and its density. ``cuda_graphs``: a
    sparse layer's call is timed as ``apply`` runs it at a repeated length, replayed from a CUDA graph
    (``sparge_core.graphs``; the copies of Q/K/V in included; eager where a graph cannot be used, e.g.
    on a CPU); False: issued eagerly. ``graphs``: the ``GraphCache`` to use (default: a new one), e.g. to
    read its capture counts after."""
    from sparge_core.graphs import GraphCache

    graphs = GraphCache() if graphs is None else graphs
    out = {}
    for layer, (q, k, v) in sorted(layers.items()):
        method = method_for_layer(layer)
        group = q.shape[1] // k.shape[1]

        def dense(q=q, k=k, v=v, group=group):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)

        if method is None:
            out[layer] = {"ms": _time(dense, device, repeats), "density": 1.0}
            continue

        def call(q, k, v, m=method):
            return m(q, k, v, is_causal=True, backend=backend)

        def run(q=q, k=k, v=v, layer=layer):
            return graphs.run(layer, call, (q, k, v)) if cuda_graphs else call(q, k, v)

        density = method.attend(q, k, v, is_causal=True, backend=backend)[1].density
        out[layer] = {"ms": _time(run, device, repeats), "density": density, "dense_ms": _time(dense, device, repeats)}
    return out


def _routed(handle, length: int):
    """``layer -> method or None`` as the integration routes a prefill of ``length`` tokens: None (dense
    SDPA) for layers the config keeps dense and where ``length`` is below ``handle.dense_below``."""
    def method_for_layer(layer: int):
        if length < handle.dense_below(layer):
            return None
        return handle.methods.get(layer)

    return method_for_layer


def run_speed(model, tokenizer, setting, lengths: list[int], corpus, *, backend: str = "auto", warmup: int = 2,
              repeats: int = 5) -> dict[str, Any]:
    """Prefill latency and per-layer attention time of one ``MethodSetting`` at each length."""
    from calibrate.data import token_windows
    from calibrate.models import model_spec

    device = next(model.parameters()).device
    spec = model_spec(model)
    rows = {}
    for length in lengths:
        ids = token_windows(tokenizer, corpus, length, 1).input_ids.to(device)
        with setting.applied(model, backend=backend, collect_stats=False) as handle:
            times = prefill_ms(model, ids, warmup=warmup, repeats=repeats)
            method_for_layer = (lambda layer: None) if handle is None else _routed(handle, length)
            cache = getattr(handle, "graphs", None)
            # whether the prefill's sparse calls replayed from CUDA graphs (sparge_core.graphs) or ran eagerly
            prefill_graphs = None if cache is None else {"captures": cache.captures, "replays": cache.replays,
                                                         "failures": cache.failures}
        layers = capture_layers(model, ids)
        per_layer = attention_ms(layers, method_for_layer, device, backend=backend)
        total = sum(v["ms"] for v in per_layer.values())
        flops = 4.0 * length * length * spec.head_dim * spec.num_heads / 2  # causal
        mean_ms = total / len(per_layer)
        rows[str(length)] = {
            "prefill_ms": statistics.median(times), "prefill_ms_all": times,
            "prefill_graphs": prefill_graphs,
            "attention_ms_total": total, "attention_ms_per_layer": mean_ms,
            "attention_tops": flops / (mean_ms * 1e-3) / 1e12,
            "density_mean": sum(v["density"] for v in per_layer.values()) / len(per_layer),
            "layers": {str(k): v for k, v in per_layer.items()},
        }
        del layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"lengths": rows, "cpu_only": device.type != "cuda",
            "attention_timing": "sparse layers: CUDA-graph replay (as apply runs a repeated length)"
            if device.type == "cuda" else "eager"}
