"""From layer results to config entries, and the one-screen summary of a calibration."""

from __future__ import annotations

from typing import Any

from sparge_core.params import LayerConfig, LayerPrediction, LayerVariant, ModelConfig

from .search import LayerResult


def layer_config(layer: int, res: LayerResult, default_estimator: str, local_blocks: int = 0) -> LayerConfig:
    """The config entry of a searched layer: hyperparameters, estimator, variant, prediction, and the
    ``local_blocks`` the search ran with."""
    key = "topk" if res.mode == "topk" else "cdfthreshd"
    variant = LayerVariant(**res.variant) if res.variant else None
    predicted = None
    if res.predicted and res.predicted.get("ms"):
        predicted = LayerPrediction(round(res.predicted["ms"], 6), round(res.predicted["dense_ms"], 6))
    return LayerConfig(
        layer=layer, simthreshd1=tuple(h.simthreshd1 for h in res.heads), pvthreshd=tuple(h.pvthreshd for h in res.heads),
        sparsity=round(res.sparsity, 6), l1=round(res.l1, 6), estimator=res.estimator or default_estimator,
        variant=variant, predicted=predicted, local_blocks=local_blocks,
        min_tokens=int((res.predicted or {}).get("min_tokens", 0)), **{key: tuple(h.budget for h in res.heads)})


def predicted_speedup(config: ModelConfig) -> dict[str, float] | None:
    """The model's predicted attention time over its layers (sum of per-layer predictions) and its
    speed-up over dense SDPA; None unless every layer has a prediction."""
    if not config.layers or any(lc.predicted is None for lc in config.layers):
        return None
    ms = sum(lc.predicted.ms for lc in config.layers)
    dense = sum(lc.predicted.dense_ms for lc in config.layers)
    return {"ms": round(ms, 6), "dense_ms": round(dense, 6), "speedup": round(dense / ms, 6)}


def search_costs(results: list[LayerResult]) -> dict[str, Any]:
    """Peak memory and per-layer search seconds over the layers searched."""
    costs = [r.cost for r in results if r.cost]
    out: dict[str, Any] = {}
    if not costs:
        return out
    secs = [c["seconds"] for c in costs if "seconds" in c]
    cpu = [c["cpu_seconds"] for c in costs if "cpu_seconds" in c]
    if cpu:
        out["search_cpu_seconds"] = round(sum(cpu), 3)  # CPU time of the workers (less noisy than wall time)
    if secs:
        out["layer_seconds_mean"] = round(sum(secs) / len(secs), 3)
        out["layer_seconds_max"] = round(max(secs), 3)
    for key in ("peak_host_rss_bytes", "peak_gpu_bytes"):
        vals = [c[key] for c in costs if key in c]
        if vals:
            out[key] = max(vals)
    pruned = [p for c in costs for p in c.get("pruned", [])]
    if pruned:
        out["pruned_candidates"] = len(pruned)
    return out


def _variant_text(lc: LayerConfig) -> str:
    if lc.is_dense:
        return "dense"
    if lc.variant is None:
        return "sparse"
    return lc.variant.quant + ("+pv" if lc.variant.stage2 else "") + f"/{lc.estimator}"


def summary(config: ModelConfig, holdout: dict[int, dict[str, float]]) -> str:
    """One screen: per layer variant, sparsity, calibration L1 (worst head, worst window), held-out L1
    (whole layer and its worst head) and, with a cost model, the predicted speed-up over dense; then the
    model's predicted attention speed-up."""
    predicted = any(lc.predicted is not None for lc in config.layers)
    head = f"{'layer':>5} {'variant':>14} {'sparsity':>8} {'L1':>7} {'heldout':>8} {'(head)':>7} {'dense heads':>11}"
    lines = [head + (f" {'pred ms':>8} {'speed-up':>8}" if predicted else "")]
    for lc in config.layers:
        dense = sum(1 for v in (lc.topk or lc.cdfthreshd) if v >= 1.0)
        h = holdout.get(lc.layer)
        held = f"{'':>8} {'':>7}" if h is None else f"{h['layer']:>8.4f} {h['worst_head']:>7.4f}"
        line = (f"{lc.layer:>5} {_variant_text(lc):>14} {lc.sparsity or 0:>8.3f} {lc.l1 or 0:>7.4f} {held} "
                f"{dense:>5}/{lc.num_heads}")
        if predicted:
            line += (f" {lc.predicted.ms:>8.4f} {lc.predicted.speedup:>7.2f}x" if lc.predicted is not None
                     else f" {'':>8} {'':>8}")
        lines.append(line)
    mean = sum(lc.sparsity or 0 for lc in config.layers) / len(config.layers)
    cal = config.calibration
    lines.append(f"mean sparsity {mean:.3f} over {len(config.layers)} layers; search {cal['seconds']} s, "
                 f"{cal['evaluations']} evaluations on {cal['device']}"
                 + (f" ({cal['workers']} workers)" if cal.get("workers", 1) > 1 else ""))
    if "objective" in cal:
        lines.append(f"objective: {cal['objective']} ({cal.get('objective_reason', '')})")
    gated = [lc for lc in config.layers if lc.min_tokens and not lc.is_dense]
    if gated:
        lengths = sorted({lc.min_tokens for lc in gated})
        lines.append(f"{len(gated)} sparse layers run dense below a predicted crossover of {lengths[0]}"
                     + (f"-{lengths[-1]}" if len(lengths) > 1 else "") + " query tokens (min_tokens)")
    model = predicted_speedup(config)
    if model is not None:
        lines.append(f"predicted attention time {model['ms']:.3f} ms vs dense {model['dense_ms']:.3f} ms per forward "
                     f"(batch 1, {cal.get('seq_len')} tokens): predicted attention speed-up {model['speedup']:.2f}x")
    return "\n".join(lines)
