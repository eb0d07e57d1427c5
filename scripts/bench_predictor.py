"""Predictor and pipeline timing against dense cuDNN attention, in one run (the issue-13 targets).

For each N, causal setting and head layout (B=1, D=128, bf16, structured inputs so the maps are
realistic), timed with ``triton.testing.do_bench`` medians after warm-up:

- ``sdpa-cudnn``: dense ``F.scaled_dot_product_attention`` on cuDNN (the 100% line);
- ``predict``: ``predict_block_mask`` at its shipped defaults (pooled estimator, top-CDF);
- ``predict-topk``: the same in top-k mode (topk=0.5, simthreshd1=-1);
- ``predict-keys``: ``estimator="keys"`` (the calibration default), top-CDF;
- ``pipeline-int8``: ``sparge_attn(topk=0.5, simthreshd1=-1, quant="int8")`` (predict + quantize + attend);
- ``pipeline``: the same with ``quant="none"``;
- ``official-pipeline``: the official SpargeAttn CUDA package's
  ``spas_sage2_attn_meansim_topk_cuda(topk=0.5)`` (its predictor, INT8 / FP8 quantization and kernel),
  when that package is importable (a peer, built separately; its own block geometry and stage 2 at 50;
  equal query and KV head counts only: its predictor does not take GQA).

Each row gives ms, the percentage of ``sdpa-cudnn`` (predictor rows) or the speedup over it
(pipeline rows), and the number of GPU kernels one call launches (torch.profiler). Targets (H200):
predictor <= 2% of cuDNN at 32K and <= 5% at 8K, ``keys`` <= 3% at 32K, causal and not; pipeline
>= 2.3x cuDNN at 32K and >= 1.8x at 8K.

    python scripts/bench_predictor.py                        # -> results/predictor/<gpu>.csv + .log
    python scripts/bench_predictor.py --n 32768 --causal true

Needs a CUDA GPU (exit 2 otherwise).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.cli import HelpFormatter  # noqa: E402
from sparge_core import predict_block_mask, sparge_attn  # noqa: E402
from sparge_core.ops.reference import allowed_block_mask  # noqa: E402
from sparge_core.params import write_text_atomic  # noqa: E402
from sparge_core.synthetic import structured_qkv  # noqa: E402

COLUMNS = ["gpu", "n", "d", "heads", "kv_heads", "causal", "method", "ms", "pct_of_cudnn", "speedup",
           "kernels", "density"]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


def _versions() -> dict:
    from evals.environment import versions  # the git state from .tree-commit on a copied tree

    return {**versions(), "cudnn": torch.backends.cudnn.version()}


def _bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _kernels(fn) -> int:
    """GPU kernels (and memsets/copies) one call of ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _official_pipeline():
    """The official SpargeAttn top-k pipeline when that package is importable, else None."""
    try:
        from spas_sage_attn import spas_sage2_attn_meansim_topk_cuda
    except Exception:  # not installed, or built for another GPU
        return None
    return spas_sage2_attn_meansim_topk_cuda


def bench_shape(gpu: str, n: int, d: int, heads: int, kv_heads: int, causal: bool,
                methods: list[str]) -> list:
    """The rows of one shape: cuDNN first, then each predictor/pipeline case."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = structured_qkv(1, heads, kv_heads, n, d, dtype=torch.bfloat16, device="cuda", seed=n)
    base = dict(gpu=gpu, n=n, d=d, heads=heads, kv_heads=kv_heads, causal=causal)
    topk = dict(simthreshd1=-1.0, topk=0.5, cdfthreshd=None)

    def dense():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=heads != kv_heads)

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense_ms = _bench(dense)
        dense_kernels = _kernels(dense)
    rows = [{**base, "method": "sdpa-cudnn", "ms": f"{dense_ms:.4f}", "pct_of_cudnn": "100.00",
             "speedup": "1.000", "kernels": dense_kernels, "density": "1.0000"}]
    cases = {
        "predict": lambda: predict_block_mask(q, k, is_causal=causal),
        "predict-topk": lambda: predict_block_mask(q, k, is_causal=causal, **topk),
        "predict-keys": lambda: predict_block_mask(q, k, is_causal=causal, estimator="keys"),
        "pipeline-int8": lambda: sparge_attn(q, k, v, is_causal=causal, quant="int8", **topk),
        "pipeline": lambda: sparge_attn(q, k, v, is_causal=causal, quant="none", **topk),
    }
    official = _official_pipeline()
    if official is not None and heads == kv_heads:  # its predictor pools Q and K heads 1:1 (no GQA)
        official_kw = dict(is_causal=causal, topk=0.5, tensor_layout="HND")
        cases["official-pipeline"] = lambda: official(q, k, v, **official_kw)
    allowed = allowed_block_mask(n, n, causal, device="cuda")
    for name, fn in cases.items():
        if name not in methods:
            continue
        ms = _bench(fn)
        if name == "official-pipeline":
            _, sparsity = official(q, k, v, return_sparsity=True, **official_kw)
            density = 1.0 - sparsity
        elif name.startswith("predict"):
            density = float((fn() & allowed).sum() / (allowed.sum() * heads))
        else:
            quant = "int8" if name.endswith("int8") else "none"
            _, stats = sparge_attn(q, k, v, is_causal=causal, quant=quant, return_stats=True, **topk)
            density = stats.density
        rows.append({**base, "method": name, "ms": f"{ms:.4f}", "pct_of_cudnn": f"{100 * ms / dense_ms:.2f}",
                     "speedup": f"{dense_ms / ms:.3f}", "kernels": _kernels(fn), "density": f"{density:.4f}"})
    return rows


def run(args) -> None:
    gpu = torch.cuda.get_device_name()
    out = Path(args.out or ROOT / "results" / "predictor" / f"{_slug(gpu)}.csv")
    command = f"# python {' '.join(shlex.quote(a) for a in sys.argv)}"
    rows, lines = [], [command, f"# {gpu} {json.dumps(_versions())}"]

    def flush():
        text = [",".join(COLUMNS)] + [",".join(str(r.get(c, "")) for c in COLUMNS) for r in rows]
        write_text_atomic(out, "\n".join(text) + "\n")
        write_text_atomic(out.with_suffix(".log"), "\n".join(lines) + "\n")

    for n in args.n:
        for causal in args.causal:
            for heads, kv_heads in args.layouts:
                shape_rows = bench_shape(gpu, n, args.d, heads, kv_heads, causal, args.methods)
                for r in shape_rows:
                    line = (f"n={n} causal={causal} H={heads}/{kv_heads} {r['method']:<14} {r['ms']:>9} ms "
                            f"{r['pct_of_cudnn']:>7}% of cuDNN  x{r['speedup']}  kernels={r['kernels']} "
                            f"density={r['density']}")
                    print(line, flush=True)
                    lines.append(line)
                rows.extend(shape_rows)
                flush()
                torch.cuda.empty_cache()
    lines.append(f"# done: {len(rows)} rows in {out}")
    flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--causal", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="+",
                    default=[False, True])
    ap.add_argument("--layouts", type=lambda s: tuple(int(x) for x in s.split("/")), nargs="+",
                    default=[(32, 32), (32, 8)], help="query/KV heads, e.g. 32/32 32/8")
    ap.add_argument("--methods", nargs="+",
                    default=["predict", "predict-topk", "predict-keys", "pipeline-int8", "pipeline",
                             "official-pipeline"])
    ap.add_argument("--out", default=None, help="CSV path (default results/predictor/<gpu>.csv)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_predictor.py: error: needs a CUDA GPU (the CPU path is the Triton interpreter: not a "
              "benchmark)", file=sys.stderr)
        return 2
    if any(n < 1 for n in args.n) or any(h % g for h, g in args.layouts):
        print("bench_predictor.py: error: --n must be positive and query heads a multiple of KV heads",
              file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
