"""Per-layer relative L1 of a calibrated config on text it was not calibrated on (any corpus).

Captures ``--windows`` windows of ``--seq-len`` tokens of ``--data`` (dense run), then runs each
layer's calibrated hyperparameters on them and reports, per layer, the worst window's relative L1 of
the whole layer (all heads together) and of its worst head, against the config's bounds.

    python scripts/heldout_l1.py --config runs/smollm2.json --data austen --windows 4 --seq-len 8192 \\
        --out results/calibration/smollm2-heldout-austen-h100.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.capture import capture_to_disk, load_captured  # noqa: E402
from calibrate.cli import HelpFormatter  # noqa: E402
from calibrate.data import token_windows  # noqa: E402
from calibrate.models import load_model  # noqa: E402
from calibrate.search import config_window_errors  # noqa: E402
from sparge_core.params import ModelConfig, write_json_atomic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="austen")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=99)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    config = ModelConfig.load(args.config)
    model, tok = load_model(args.model, device=args.device)
    windows = token_windows(tok, args.data, args.seq_len, args.windows, seed=args.seed)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        capture_to_disk(model, windows, Path(tmp) / "cap", model_name=args.model)
        del model
        for lc in config.layers:
            if lc.is_dense:
                continue
            layer_l1, head_l1 = config_window_errors(load_captured(Path(tmp) / "cap", lc.layer), lc, is_causal=True,
                                                     device=args.device)
            rows.append({"layer": lc.layer, "layer_l1": max(layer_l1), "worst_head_l1": max(max(h) for h in head_l1),
                         "per_window_layer_l1": layer_l1, "calibration_l1": lc.l1, "sparsity": lc.sparsity})
            print(f"layer {lc.layer:>3}: layer L1 {max(layer_l1):.4f} worst head {rows[-1]['worst_head_l1']:.4f}",
                  flush=True)
    bound = config.pv_l1
    worst = max(r["layer_l1"] for r in rows)
    doc = {"config": str(args.config), "data": windows.describe(), "model": args.model, "pv_l1": bound, "l1": config.l1,
           "worst_layer_l1": worst, "worst_ratio_to_pv_l1": worst / bound,
           "layers_over_1.25x": [r["layer"] for r in rows if r["layer_l1"] > 1.25 * bound],
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "seconds": time.perf_counter() - t0, "rows": rows, "command": "python " + " ".join(sys.argv)}
    write_json_atomic(args.out, doc)
    print(f"worst layer L1 {worst:.4f} = {worst / bound:.2f} x pv_l1 {bound}; -> {args.out}")


if __name__ == "__main__":
    main()
