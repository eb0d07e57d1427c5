"""Kernel accuracy on a GPU: the Triton kernel's relative L1 error vs a float64 reference, next to
PyTorch's own low-precision error vs the same reference (flash-attention's 2x rule).

Rows: density 1.0 (baseline: SDPA in the same dtype) and density 0.3 random block masks (baseline: the
plain-PyTorch masked attention computed in the same low precision), for every N, D, causal, dtype,
plus the quantized path (``quant=int8``: INT8 QK, FP8 PV on sm89+) at density 1.0.

    python scripts/kernel_accuracy.py --out results/kernel/accuracy-<gpu>.csv
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibrate.cli import HelpFormatter  # noqa: E402
from evals.environment import CsvLog, gpu_name, gpu_slug  # noqa: E402
from sparge_core import block_sparse_attn  # noqa: E402
from sparge_core.ops import reference as R  # noqa: E402

COLUMNS = ["gpu", "n", "d", "heads", "causal", "dtype", "density", "quant", "kernel_rel_l1", "baseline",
           "baseline_rel_l1", "ratio"]


def rel_l1(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().sum() / b.abs().sum()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--out", default=None, help="CSV path (default results/kernel/accuracy-<gpu>.csv)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_accuracy.py needs a CUDA GPU")
    out = args.out or f"results/kernel/accuracy-{gpu_slug()}.csv"
    log = CsvLog(out, COLUMNS)
    gpu = gpu_name()
    worst = 0.0
    for n in args.n:
        for d in args.d:
            for causal in (False, True):
                for dtype in (torch.bfloat16, torch.float16):
                    t0 = time.time()
                    g = torch.Generator(device="cuda").manual_seed(n + d)
                    q, k, v = (torch.randn(1, args.heads, n, d, device="cuda", generator=g).to(dtype) for _ in range(3))
                    nqb, nkb = R.num_blocks(n, 128), R.num_blocks(n, 64)
                    full = torch.ones(1, args.heads, nqb, nkb, dtype=torch.bool, device="cuda")
                    ref = R.dense_attention(q, k, v, is_causal=causal, scale=d ** -0.5)
                    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    base = rel_l1(sdpa, ref)
                    for quant in ("none", "int8"):
                        o = block_sparse_attn(q, k, v, full, is_causal=causal, pvthreshd=None, quant=quant)
                        e = rel_l1(o, ref)
                        log.add(gpu=gpu, n=n, d=d, heads=args.heads, causal=causal, dtype=str(dtype).split(".")[-1],
                                density=1.0, quant=quant, kernel_rel_l1=f"{e:.4e}", baseline="sdpa",
                                baseline_rel_l1=f"{base:.4e}", ratio=f"{e / base:.3f}")
                        if quant == "none":
                            worst = max(worst, e / base)
                    mask = torch.rand(1, args.heads, nqb, nkb, device="cuda", generator=g) < 0.3
                    ref_m, _ = R.masked_attention(q, k, v, mask, is_causal=causal, scale=d ** -0.5)
                    low_m, _ = R.masked_attention(q, k, v, mask, is_causal=causal, scale=d ** -0.5, dtype=dtype)
                    o = block_sparse_attn(q, k, v, mask, is_causal=causal, pvthreshd=None, quant="none")
                    e, b = rel_l1(o, ref_m), rel_l1(low_m, ref_m)
                    worst = max(worst, e / b)
                    log.add(gpu=gpu, n=n, d=d, heads=args.heads, causal=causal, dtype=str(dtype).split(".")[-1],
                            density=0.3, quant="none", kernel_rel_l1=f"{e:.4e}", baseline="torch-lowp-masked",
                            baseline_rel_l1=f"{b:.4e}", ratio=f"{e / b:.3f}")
                    print(f"n={n} d={d} causal={causal} {dtype}: sdpa {base:.2e} kernel/sdpa {worst:.2f} "
                          f"({time.time() - t0:.1f}s)", flush=True)
                    del q, k, v, ref, sdpa, ref_m, low_m
                    torch.cuda.empty_cache()
    print(f"worst kernel/baseline ratio (quant=none): {worst:.3f}  -> {out}")


if __name__ == "__main__":
    main()
