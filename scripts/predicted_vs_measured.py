"""Predicted vs measured attention time of a calibrated config, per layer and overall.

    python -m evals speed --model smollm2 --config runs/smollm2.json --methods sparge --lengths 8192 --device cuda
    python scripts/predicted_vs_measured.py --config runs/smollm2.json \\
        --speed results/speed/smollm2/sparge.json --out results/calibration/smollm2-h200-predicted-vs-measured.md

The config's layers hold ``predicted`` (the cost model's ms of the layer's variant and of dense SDPA
at the calibration length, batch 1); the speed result holds each layer's measured ms and, for
sparse layers, the dense SDPA ms on the same Q/K/V (``evals/speed.py``). Writes a Markdown table and
a JSON file next to it: per layer predicted and measured ms, their relative error, predicted and
measured speed-up over dense; overall the sums. ``--tolerance`` (default 0.15) marks the rows whose
error exceeds it; the exit code is 0 either way (it is a report).

``--cost-model COST_JSON`` re-predicts every layer with another cost model (e.g. one profiled at the
model's own shape with ``sparge-profile --replay``) from what the config holds: the layer's variant,
estimator and calibrated block sparsity, at the compared length, with the model's head count and
head dim. The config does not record how many blocks stage 2 skipped, so ``+pv`` layers are predicted
with none skipped (an upper bound on their time).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibrate.cli import HelpFormatter  # noqa: E402
from calibrate.cost import CostModel, CostModelError, kernel_key  # noqa: E402
from sparge_core.params import ConfigError, ModelConfig, write_json_atomic, write_text_atomic


def cost_model_predictions(config: ModelConfig, model: CostModel, length: int) -> dict[int, tuple[float, float]]:
    """``{layer: (predicted ms, predicted dense ms)}`` of every layer under ``model`` (see the module
    docstring): causal self-attention of ``length`` tokens, batch 1."""
    m = config.model
    heads, head_dim = m.num_heads, m.head_dim
    if not heads or not head_dim:
        raise ValueError("--cost-model needs the config's model.num_heads and model.head_dim")
    dense = model.predict_ms("dense", length, length, heads, head_dim, True, 1.0)
    out = {}
    for lc in config.layers:
        if lc.is_dense:
            out[lc.layer] = (dense, dense)
            continue
        if lc.sparsity is None:
            raise ValueError(f"layer {lc.layer} of the config has no sparsity: --cost-model cannot re-predict it")
        density = 1.0 - lc.sparsity
        ms = model.predict_ms(_kernel_key(lc), length, length, heads, head_dim, True, density,
                              estimator=lc.estimator)
        out[lc.layer] = (ms, dense)
    return out


def compare(config: ModelConfig, speed: dict, length: int | None = None, tolerance: float = 0.15,
            host_floors: dict[str, float] | None = None,
            cost_model: CostModel | None = None) -> dict:
    """The comparison rows (see the module docstring) as a dict. ``host_floors`` (a cost model's
    ``host_ms``, kernel key -> ms) bounds each prediction from below as the cost model now does:
    ``max(floor, predicted)``, the rest of the prediction as the config holds it."""
    floors = host_floors or {}
    lengths = speed.get("scores", speed).get("lengths")
    if not lengths:
        raise ValueError("the speed file has no scores.lengths: is it a python -m evals speed result?")
    want = length or config.calibration.get("seq_len")
    key = str(want) if want is not None and str(want) in lengths else max(lengths, key=int)
    if want is not None and str(want) != key:
        raise ValueError(f"the speed file has lengths {sorted(lengths, key=int)}, not the config's {want}; pass "
                         f"--length or measure that length")
    measured = lengths[key]["layers"]
    repredicted = cost_model_predictions(config, cost_model, int(key)) if cost_model is not None else {}
    rows, missing = [], []
    for lc in config.layers:
        m = measured.get(str(lc.layer))
        if (lc.predicted is None and lc.layer not in repredicted) or m is None:
            missing.append(lc.layer)
            continue
        dense_ms = m.get("dense_ms", m["ms"] if lc.is_dense else None)
        if lc.layer in repredicted:
            pred, pred_dense = repredicted[lc.layer]
        else:
            pred_dense = max(floors.get("dense", 0.0), lc.predicted.dense_ms)
            pred = pred_dense if lc.is_dense else max(floors.get(_kernel_key(lc), 0.0), lc.predicted.ms)
        err = (pred - m["ms"]) / m["ms"]
        rows.append({
            "layer": lc.layer, "variant": _variant(lc), "predicted_ms": pred, "measured_ms": m["ms"],
            "error": err, "predicted_speedup": pred_dense / pred,
            "measured_speedup": None if dense_ms is None else dense_ms / m["ms"],
            "predicted_dense_ms": pred_dense, "measured_dense_ms": dense_ms,
            "within": abs(err) <= tolerance})
    if not rows:
        raise ValueError("no layer has both a prediction (a v2 config calibrated with a cost model) and a measurement")
    total_pred = sum(r["predicted_ms"] for r in rows)
    total_meas = sum(r["measured_ms"] for r in rows)
    dense_pred = sum(r["predicted_dense_ms"] for r in rows)
    have_dense = all(r["measured_dense_ms"] is not None for r in rows)
    dense_meas = sum(r["measured_dense_ms"] for r in rows) if have_dense else None
    overall = {"predicted_ms": total_pred, "measured_ms": total_meas, "error": (total_pred - total_meas) / total_meas,
               "predicted_speedup": dense_pred / total_pred,
               "measured_speedup": None if dense_meas is None else dense_meas / total_meas}
    overall["within"] = abs(overall["error"]) <= tolerance
    return {"length": int(key), "tolerance": tolerance, "layers": rows, "overall": overall,
            "layers_without_data": missing, "cost_model": config.calibration.get("cost_model"),
            "speed_device": speed.get("device") or speed.get("gpu")}


def _kernel_key(lc) -> str:
    """The cost model's kernel key of a sparse layer (a v1 layer: bf16 with stage 2)."""
    if lc.variant is None:
        return kernel_key("none", True)
    return kernel_key(lc.variant.quant, lc.variant.stage2)


def _variant(lc) -> str:
    if lc.is_dense:
        return "dense"
    if lc.variant is None:
        return "sparse (v1)"
    return f"{_kernel_key(lc)}/{lc.estimator}"


def markdown(result: dict) -> str:
    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    lines = [(f"Predicted vs measured attention time, {result['length']} tokens, batch 1 "
              f"(tolerance {result['tolerance']:.0%}; ! = outside)"), "",
             "| layer | variant | predicted ms | measured ms | error | predicted speed-up | measured speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["layers"]:
        lines.append(f"| {r['layer']} | {r['variant']} | {r['predicted_ms']:.4f} | {r['measured_ms']:.4f} | "
                     f"{r['error']:+.1%}{'' if r['within'] else ' !'} | {r['predicted_speedup']:.2f}x | "
                     f"{f(r['measured_speedup'], '.2f')}x |")
    o = result["overall"]
    lines.append(f"| all | | {o['predicted_ms']:.4f} | {o['measured_ms']:.4f} | {o['error']:+.1%}"
                 f"{'' if o['within'] else ' !'} | {o['predicted_speedup']:.2f}x | {f(o['measured_speedup'], '.2f')}x |")
    inside = sum(r["within"] for r in result["layers"])
    lines += ["", (f"{inside}/{len(result['layers'])} layers within the tolerance; overall "
                   f"{'within' if o['within'] else 'outside'}.")]
    if result["layers_without_data"]:
        lines.append(f"Layers without a prediction or a measurement: {result['layers_without_data']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--config", required=True, help="calibrated config JSON (version 2, with predictions)")
    ap.add_argument("--speed", required=True, help="python -m evals speed result JSON of that config")
    ap.add_argument("--length", type=int, default=None, help="context length to compare (default: the config's)")
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--host-floors", default=None, metavar="COST_JSON",
                    help="re-predict with this cost model's host floors (host_ms): each layer's prediction becomes "
                    "max(floor, the config's prediction); for a config calibrated before its card had floors")
    ap.add_argument("--cost-model", default=None, metavar="COST_JSON",
                    help="re-predict every layer with this cost model from the config's variants and sparsities "
                    "(see above)")
    ap.add_argument("--out", default=None, help="Markdown table to write (plus a .json beside it)")
    args = ap.parse_args(argv)
    try:
        if args.cost_model and args.host_floors:
            raise ValueError("--cost-model re-predicts with that file's own host floors; drop --host-floors")
        config = ModelConfig.load(args.config)
        speed = json.loads(Path(args.speed).read_text())
        floors = None
        if args.host_floors:
            try:
                floors = CostModel.load(args.host_floors).host_ms
            except CostModelError as err:
                raise ValueError(f"--host-floors: {err}") from err
            if not floors:
                raise ValueError(f"--host-floors: {args.host_floors} holds no host_ms (sparge-profile --host-floor-only)")
        cost = None
        if args.cost_model:
            try:
                cost = CostModel.load(args.cost_model)
            except CostModelError as err:
                raise ValueError(f"--cost-model: {err}") from err
        result = compare(config, speed, args.length, args.tolerance, floors, cost)
        if cost is not None:
            result["repredicted_with"] = {"file": args.cost_model, "sha256": cost.sha256()}
        if floors:
            result["host_floors"] = {"file": args.host_floors, "host_ms": floors}
    except (ConfigError, OSError, ValueError, KeyError) as err:
        print(f"predicted_vs_measured: error: {err}", file=sys.stderr)
        return 2
    text = markdown(result)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        write_text_atomic(out, text)
        write_json_atomic(out.with_suffix(".json"), {**result, "config": args.config, "speed": args.speed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
