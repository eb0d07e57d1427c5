"""Kernel launch-config sweep on a GPU: num_warps x num_stages for each kernel variant
(bf16 P.V, INT8 QK^T, INT8 QK^T + FP8 P.V), dense and sparse masks, D 64/128, causal or not.

Prints a table and writes a CSV (variant, config, ms, TOPS) so the defaults in
``sparge_core/ops/attention.py::default_kernel_config`` can be chosen by measurement.

    python scripts/tune_kernel.py --out results/kernel/tune-<gpu>.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibrate.cli import HelpFormatter  # noqa: E402
from evals.environment import CsvLog, bench_ms, gpu_name, gpu_slug  # noqa: E402
from sparge_core.ops import attention as A  # noqa: E402
from sparge_core.ops import predict as P  # noqa: E402
from sparge_core.ops import reference as R  # noqa: E402

COLUMNS = ["gpu", "n", "d", "heads", "causal", "density", "variant", "num_warps", "num_stages", "ms", "tops"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[32768])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.3])
    ap.add_argument("--variants", nargs="+", default=["none", "int8"])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    log = CsvLog(args.out or f"results/kernel/tune-{gpu_slug()}.csv", COLUMNS)
    gpu = gpu_name()
    gen = torch.Generator(device="cuda").manual_seed(0)
    best = {}
    for n in args.n:
        for d in args.d:
            q, k, v = (torch.randn(1, args.heads, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
            scale = d ** -0.5
            _, qi, qs = P.pool_and_similarity(q, R.BLOCK_Q, smooth=False, quant_multiplier=scale * R.LOG2E)
            _, ki, ks = P.pool_and_similarity(k, R.BLOCK_K, smooth=True, quant_multiplier=1.0)
            for causal in (False, True):
                flops = 4.0 * n * n * d * args.heads / (2 if causal else 1)
                for density in args.densities:
                    mask = torch.rand(1, args.heads, R.num_blocks(n, 128), R.num_blocks(n, 64), device="cuda",
                                      generator=gen) < density
                    for variant in args.variants:
                        for w in args.warps:
                            for s in args.stages:
                                cfg = A.KernelConfig(num_warps=w, num_stages=s)
                                quantized = None if variant == "none" else (qi, qs, ki, ks)
                                fn = lambda: A.block_sparse_attn(q, k, v, mask, is_causal=causal, scale=scale,  # noqa: E731
                                                                 pvthreshd=None, quant=variant, quantized=quantized,
                                                                 config=cfg)
                                try:
                                    ms = bench_ms(fn)
                                except Exception as err:  # an out-of-resources config: record and go on
                                    print(f"  {variant} w{w} s{s}: failed ({type(err).__name__}: {str(err)[:80]})")
                                    continue
                                tops = flops / (ms * 1e-3) / 1e12
                                log.add(gpu=gpu, n=n, d=d, heads=args.heads, causal=causal, density=density,
                                        variant=variant, num_warps=w, num_stages=s, ms=f"{ms:.4f}", tops=f"{tops:.1f}")
                                key = (n, d, causal, density, variant)
                                if key not in best or ms < best[key][0]:
                                    best[key] = (ms, w, s, tops)
                        ms, w, s, tops = best[(n, d, causal, density, variant)]
                        print(f"n={n} d={d} causal={causal} dens={density} {variant:<9} best w{w} s{s} "
                              f"{ms:.3f} ms {tops:.0f} TOPS", flush=True)


if __name__ == "__main__":
    main()
