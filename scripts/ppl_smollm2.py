"""Perplexity of a model on a corpus, dense SDPA vs sparge methods, written to a result JSON.

Example (the committed CPU result)::

    python scripts/ppl_smollm2.py --device cpu --length 2048 --count 8 \\
        --out results/ppl/smollm2-h100/cpu-pydoc-2k.json

Methods are ``sdpa`` (the model's own dense attention) or ``NAME[:key=value,...]`` with a method
from the registry, e.g. ``sparge``, ``sparge:cdfthreshd=0.9``, ``sparge-topk:topk=0.5``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.cli import HelpFormatter  # noqa: E402
from calibrate.data import load_corpus, token_windows  # noqa: E402
from calibrate.models import load_model, model_spec  # noqa: E402
from evals.environment import device_name, versions  # noqa: E402
from evals.ppl import run_methods  # noqa: E402
from evals.runner import parse_method_spec  # noqa: E402
from sparge_core.atomic import write_json_atomic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--corpus", default="pydoc")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--seed", type=int, default=None, help="pick windows at random (default: the first ones)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 CPU, bf16 GPU)")
    parser.add_argument("--backend", default="auto", help="sparge kernel backend: auto | triton | reference")
    parser.add_argument("--methods", nargs="+", default=["sdpa", "sparge"])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    device = torch.device(args.device)
    model, tokenizer = load_model(args.model, device=device, dtype=args.dtype)
    corpus = load_corpus(args.corpus)
    windows = token_windows(tokenizer, corpus, args.length, args.count, seed=args.seed)
    try:
        methods = [parse_method_spec(m) for m in args.methods]
    except ValueError as err:
        parser.error(str(err))
    results = run_methods(model, windows.input_ids, methods, backend=args.backend)
    for r in results:
        print(f"{r.method:12s} ppl {r.ppl:8.4f}  sparsity {r.sparsity.get('total', {}).get('sparsity', 0.0):.4f}  "
              f"{r.seconds:7.1f} s")
    spec = model_spec(model, args.model)
    record = {
        "suite": "ppl",
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "model": {"name": args.model, "num_layers": spec.num_layers, "num_heads": spec.num_heads,
                  "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
        "device": device_name(device),
        "backend": args.backend,
        "data": {**corpus.describe(), **{k: v for k, v in windows.describe().items() if k != "corpus"}},
        "versions": versions(extra=("transformers",)),
        "results": [r.to_dict() for r in results],
    }
    write_json_atomic(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
