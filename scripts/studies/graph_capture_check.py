"""Which layers of a calibrated config replay from a CUDA graph: a GPU check of ``sparge_core.graphs``.

Each sparse layer's method (``Sparge.from_layer_config``) runs on fresh random Q/K/V of the config's
model shape (by default in the strided layout a transformers layer passes) through
``evals.speed.attention_ms``, the per-layer timing that ``python -m evals speed`` uses, with CUDA graphs
on. It reports the graph cache's capture / replay / failure counts and the first failure's message and
traceback, and compares each graphed output with the eager call on the same inputs.

    python scripts/studies/graph_capture_check.py --config results/calibration/smollm2-h200.json \\
        --length 8192 --out results/tests/graph-capture-smollm2-h200.json

Needs a CUDA GPU (exit 2 without one).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from calibrate.cli import HelpFormatter  # noqa: E402
from sparge_core.atomic import write_text_atomic  # noqa: E402

logger = logging.getLogger("graph_capture_check")


class _FailureHandler(logging.Handler):
    """Keeps the messages and tracebacks of the capture failures that ``sparge_core.graphs`` logs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.tracebacks: list[str] = []

    def emit(self, record):
        if "could not be captured" in record.getMessage():
            self.messages.append(record.getMessage())
        if record.exc_info:
            self.tracebacks.append("".join(traceback.format_exception(*record.exc_info)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", required=True, help="a calibrated config (JSON)")
    p.add_argument("--length", type=int, default=8192, help="tokens per call")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--layout", default="hf", choices=("hf", "contiguous"),
                   help="hf: Q/K/V as a transformers attention layer passes them, (B, N, H, D) tensors seen as "
                        "(B, H, N, D) (non-contiguous); contiguous: (B, H, N, D) tensors")
    p.add_argument("--out", type=Path, default=None, help="write the summary here (JSON)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("graph_capture_check: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.length < 1:
        print(f"graph_capture_check: --length must be >= 1, got {args.length}", file=sys.stderr)
        return 2
    from evals.speed import attention_ms
    from sparge_core import graphs
    from sparge_core.methods.sparge import Sparge
    from sparge_core.params import ModelConfig

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handler = _FailureHandler()
    graphs.logger.addHandler(handler)

    cfg = ModelConfig.load(args.config)
    info = cfg.model
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    layers, methods = {}, {}
    for lc in cfg.layers:
        if lc.is_dense:
            continue
        shapes = [(1, heads, args.length, info.head_dim) for heads in (info.num_heads, info.num_kv_heads,
                                                                        info.num_kv_heads)]
        if args.layout == "hf":
            layers[lc.layer] = tuple(torch.randn((b, n, h, d), device=device, dtype=dtype, generator=gen).transpose(1, 2)
                                     for b, h, n, d in shapes)
        else:
            layers[lc.layer] = tuple(torch.randn(s, device=device, dtype=dtype, generator=gen) for s in shapes)
        methods[lc.layer] = Sparge.from_layer_config(lc)
    cache = graphs.GraphCache()
    times = attention_ms(layers, methods.get, device, repeats=3, cuda_graphs=True, graphs=cache)
    # graphed output against the eager call on the same inputs
    worst = 0.0
    check = graphs.GraphCache()
    for layer, (q, k, v) in layers.items():
        def call(q, k, v, m=methods[layer]):
            return m(q, k, v, is_causal=True)
        eager = call(q, k, v).float()
        for _ in range(3):
            graphed = check.run(layer, call, (q, k, v), clone=(0,))
        worst = max(worst, (graphed.float() - eager).abs().max().item())
    summary = {
        "config": str(args.config), "length": args.length, "dtype": args.dtype, "layout": args.layout,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "sparse_layers": len(layers), "captures": cache.captures,
        "replays": cache.replays, "failures": cache.failures + check.failures, "first_failure": handler.messages[:1],
        "first_traceback": handler.tracebacks[:1],
        "check_captures": check.captures, "max_abs_graphed_vs_eager": worst,
        "ms_per_layer": {str(k): round(v["ms"], 4) for k, v in times.items()},
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    return 0 if not summary["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
