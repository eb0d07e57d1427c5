"""Prefill latency of a model (one forward pass, no KV cache), dense SDPA vs sparge methods.

For each length the same token window is run ``--repeats`` times after ``--warmup`` runs; the
median wall time (CUDA-synchronised) is reported, with the per-method sparsity of one extra run.

    python scripts/latency_smollm2.py --lengths 2048 4096 8192 \\
        --out results/speed/smollm2-h100/h100-prefill.json

Methods use ``evals.runner.parse_method_spec``'s syntax (``sdpa``, ``sparge``, ``sparge:cdfthreshd=1``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.cli import HelpFormatter  # noqa: E402
from calibrate.data import load_corpus, token_windows  # noqa: E402
from calibrate.models import load_model  # noqa: E402
from evals.environment import device_name, versions  # noqa: E402
from evals.runner import parse_method_spec  # noqa: E402
from evals.speed import prefill_ms  # noqa: E402
from sparge_core.atomic import write_json_atomic  # noqa: E402
from sparge_core.integrations.transformers import apply, handle_of, remove  # noqa: E402


@torch.no_grad()
def sparsity_of(model, ids: torch.Tensor, name: str, params: dict, backend: str) -> dict:
    apply(model, name, backend=backend, collect_stats=True, **params)
    try:
        model(ids, use_cache=False, logits_to_keep=1)
        return handle_of(model).sparsity_report()["total"]
    finally:
        remove(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--corpus", default="pydoc")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--methods", nargs="+", default=["sdpa", "sparge", "sparge:cdfthreshd=1"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    try:
        methods = [(spec, *parse_method_spec(spec)) for spec in args.methods]
    except ValueError as err:
        parser.error(str(err))
    device = torch.device(args.device)
    model, tokenizer = load_model(args.model, device=device, dtype=args.dtype)
    corpus = load_corpus(args.corpus)
    rows = []
    for length in args.lengths:
        ids = token_windows(tokenizer, corpus, length, 1).input_ids.to(device)
        for spec, name, params in methods:
            if name != "sdpa":
                apply(model, name, backend=args.backend, **params)
            try:
                times = [t / 1e3 for t in prefill_ms(model, ids, warmup=args.warmup, repeats=args.repeats)]
            finally:
                if handle_of(model) is not None:
                    remove(model)
            sparsity = sparsity_of(model, ids, name, params, args.backend) if name != "sdpa" else {}
            row = {"length": length, "method": spec, "median_ms": 1e3 * statistics.median(times),
                   "min_ms": 1e3 * min(times), "times_ms": [1e3 * t for t in times],
                   "sparsity": sparsity.get("sparsity"), "qk_sparsity": sparsity.get("qk_sparsity")}
            rows.append(row)
            print(f"{length:6d} {spec:24s} {row['median_ms']:9.2f} ms  sparsity {row['sparsity']}", flush=True)
    record = {
        "suite": "prefill-latency",
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "model": args.model, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": device_name(device), "backend": args.backend,
        "data": corpus.describe(), "warmup": args.warmup, "repeats": args.repeats,
        "versions": versions(extra=("transformers",)), "rows": rows,
    }
    write_json_atomic(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
