"""How well do calibrated hyperparameters hold on text the search did not see?

On a capture (``calibrate``'s ``<config>.capture`` or any ``calibrate.capture`` folder) with more
windows than the search uses: per layer, search on the first ``--calib`` windows with each variant,
then measure every held-out window's relative L1 (worst head) with the chosen hyperparameters.

Variants (``--variants``): ``base`` (bounds as given, margin 1), ``stage1`` (no PV skip tuning),
``margin<f>`` (search to f x the bounds, e.g. ``margin0.8``), ``pvgap<f>`` (stage 2 may add only f x
l1 on top of l1). ``--estimator`` picks the predictor's block estimator (default keys).

    python scripts/holdout_study.py --capture runs/study.capture --calib 5 --out results/calibration/holdout-study.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.capture import load_captured, read_meta  # noqa: E402
from calibrate.cli import HelpFormatter  # noqa: E402
from calibrate.search import LayerEvaluator, SearchSettings, search_layer  # noqa: E402
from sparge_core.params import write_json_atomic  # noqa: E402


def settings_for(variant: str, l1: float, pv_l1: float, estimator: str = "keys") -> SearchSettings:
    base = SearchSettings(l1=l1, pv_l1=pv_l1, estimator=estimator)
    if variant == "base":
        return base
    if variant == "stage1":
        return replace(base, tune_pv=False)
    if variant.startswith("margin"):
        f = float(variant.removeprefix("margin"))
        return replace(base, l1=l1 * f, pv_l1=pv_l1 * f)
    if variant.startswith("pvgap"):  # stage 2 may only add this fraction of l1 on top of stage 1's result
        f = float(variant.removeprefix("pvgap"))
        return replace(base, pv_l1=l1 * (1 + f))
    raise ValueError(f"unknown variant {variant!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--capture", required=True)
    ap.add_argument("--calib", type=int, default=5)
    ap.add_argument("--layers", type=int, nargs="+", default=None)
    ap.add_argument("--l1", type=float, default=0.08)
    ap.add_argument("--pv-l1", type=float, default=0.09)
    ap.add_argument("--variants", nargs="+", default=["base", "stage1"])
    ap.add_argument("--estimator", choices=["keys", "pooled"], default="keys")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    meta = read_meta(args.capture)
    layers = args.layers or list(meta.layers)
    rows = []
    for layer in layers:
        samples = load_captured(args.capture, layer)
        cal, held = samples[: args.calib], samples[args.calib:]
        ev = LayerEvaluator(cal, is_causal=True, device=args.device, estimator=args.estimator)
        held_ev = LayerEvaluator(held, is_causal=True, device=args.device, estimator=args.estimator)
        for variant in args.variants:
            st = settings_for(variant, args.l1, args.pv_l1, args.estimator)
            t0 = time.perf_counter()
            res = search_layer(ev, ev.num_heads, st)
            secs = time.perf_counter() - t0
            theta = torch.tensor([h.simthreshd1 for h in res.heads])
            budget = torch.tensor([h.budget for h in res.heads])
            pv = torch.tensor([h.pvthreshd for h in res.heads])
            _layer_l1, head_l1 = held_ev.window_errors(theta.float(), budget.float(), pv.float(), st.mode)
            per_window = [max(heads) for heads in head_l1]
            per_head = [[round(x, 5) for x in heads] for heads in head_l1]
            row = {"layer": layer, "variant": variant, "sparsity": res.sparsity, "calib_l1": res.l1,
                   "holdout_worst": max(per_window), "holdout_per_window": per_window, "holdout_per_head": per_head,
                   "simthreshd1": theta.tolist(), "budget": budget.tolist(), "pvthreshd": pv.tolist(),
                   "evaluations": res.evaluations, "seconds": secs}
            rows.append(row)
            print(f"layer {layer:>2} {variant:<10} sparsity {res.sparsity:.3f} calib {res.l1:.4f} held worst "
                  f"{max(per_window):.4f} windows {' '.join(f'{x:.3f}' for x in per_window)} ({secs:.0f}s)", flush=True)
    doc = {"capture": str(args.capture), "estimator": args.estimator, "seq_len": meta.seq_len, "calib": args.calib, "held": meta.samples - args.calib,
           "l1": args.l1, "pv_l1": args.pv_l1, "rows": rows, "command": "python " + " ".join(sys.argv),
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    write_json_atomic(args.out, doc)


if __name__ == "__main__":
    main()
