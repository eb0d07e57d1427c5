"""Search quality and cost: our stage-1 search vs the official tuner's exhaustive procedure.

On captured Q/K/V (``calibrate``'s ``<config>.capture``), for each chosen layer and the same bound:
- ours: ``calibrate.search.search_layer`` stage 1 (the simthreshd1 grid x bisection, all heads at once);
- reference: ``exhaustive_reference_sweep`` (32 simthreshd1 values in [-1, 1) x a 10-step bisection on
  cdfthreshd, the official tuner's stage 1), also vectorised over heads so both count evaluations
  the same way (one evaluation = one ``sparge_attn`` call per sample for all heads).
Reports the mean per-head stage-1 sparsity of both, their ratio and the evaluation counts.

    python scripts/search_quality.py --capture runs/smollm2.capture --layers 0 5 10 15 20 25 29 \\
        --out results/calibration/search-quality-<gpu>.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.capture import load_captured, read_meta  # noqa: E402
from calibrate.cli import HelpFormatter  # noqa: E402
from calibrate.search import LayerEvaluator, SearchSettings, exhaustive_reference_sweep, search_layer  # noqa: E402
from evals.environment import gpu_name  # noqa: E402
from sparge_core.params import write_json_atomic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--capture", required=True)
    ap.add_argument("--layers", type=int, nargs="+", default=None)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--l1", type=float, default=0.08)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    meta = read_meta(args.capture)
    layers = args.layers or list(meta.layers)
    settings = SearchSettings(l1=args.l1, pv_l1=args.l1, tune_pv=False)
    rows = []
    for layer in layers:
        ev = LayerEvaluator(load_captured(args.capture, layer)[: args.samples], is_causal=True, device=args.device)
        t0 = time.perf_counter()
        ours = search_layer(ev, ev.num_heads, settings)
        t_ours = time.perf_counter() - t0
        ours_sp = [h.sparsity for h in ours.heads]
        t0 = time.perf_counter()
        ref_sp, ref_calls = exhaustive_reference_sweep(ev, ev.num_heads, settings)
        t_ref = time.perf_counter() - t0
        # the exhaustive sweep has no dense fallback: apply the same rule (<= 0.1 -> dense) to compare like with like
        ref_sp = [float(s) if s > 0.1 else 0.0 for s in ref_sp]
        row = {"layer": layer, "ours_sparsity": sum(ours_sp) / len(ours_sp), "exhaustive_sparsity": sum(ref_sp) / len(ref_sp),
               "ours_evaluations": ours.evaluations, "exhaustive_evaluations": ref_calls,
               "ours_seconds": t_ours, "exhaustive_seconds": t_ref, "ours_per_head": ours_sp, "exhaustive_per_head": ref_sp}
        rows.append(row)
        print(f"layer {layer:>3}: ours {row['ours_sparsity']:.4f} ({ours.evaluations} evals, {t_ours:.1f}s) "
              f"exhaustive {row['exhaustive_sparsity']:.4f} ({ref_calls} evals, {t_ref:.1f}s)", flush=True)
    ours_total = sum(r["ours_sparsity"] for r in rows)
    ref_total = sum(r["exhaustive_sparsity"] for r in rows)
    summary = {"ratio_of_sparsity": ours_total / ref_total if ref_total else None,
               "ours_evaluations": sum(r["ours_evaluations"] for r in rows),
               "exhaustive_evaluations": sum(r["exhaustive_evaluations"] for r in rows)}
    summary["evaluation_ratio"] = summary["ours_evaluations"] / summary["exhaustive_evaluations"]
    doc = {"device": gpu_name(), "capture": str(args.capture), "model": meta.model, "seq_len": meta.seq_len,
           "samples": min(args.samples, meta.samples), "l1": args.l1, "thetas": list(settings.thetas),
           "bisect_steps": settings.bisect_steps, "summary": summary, "layers": rows,
           "command": "python " + " ".join(sys.argv)}
    write_json_atomic(args.out, doc)
    ratio = summary["ratio_of_sparsity"]
    print(f"sparsity ratio ours/exhaustive {'n/a' if ratio is None else f'{ratio:.3f}'}, evaluations "
          f"{summary['ours_evaluations']} vs {summary['exhaustive_evaluations']} ({summary['evaluation_ratio']:.3f}) -> {args.out}")


if __name__ == "__main__":
    main()
