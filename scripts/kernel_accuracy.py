"""Kernel accuracy on a GPU: each variant's relative L1 error vs a float64 reference, next to PyTorch's
own low-precision error vs the same reference (flash-attention's 2x rule).

Rows per N, D, causal setting and dtype (``config`` names what ran):
- density 1.0, baseline SDPA in the same dtype: ``block_sparse_attn`` at its shipped defaults
  (``config=defaults``: stage 2 off since the H200 sweep), the Triton kernel with ``pvthreshd=None``
  (``nopv``; ``backend="triton"``, which ``auto`` would hand to FA4 when installed), each
  ``--configs`` KernelConfig (stage 2 on at 50), FA4 on the full map when installed (``fa4``), and the
  quantized paths (``quant=int8``; ``int8-fp8`` on sm89+);
- density 0.3 random block maps, baseline the plain-PyTorch masked attention in the same low
  precision: the shipped defaults and ``nopv``.
The reference takes float64 copies of the inputs, so its output is not rounded back to 16 bits.

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
from sparge_core.ops import attention as A  # noqa: E402
from sparge_core.ops import fa4 as FA4  # noqa: E402
from sparge_core.ops import reference as R  # noqa: E402

COLUMNS = ["gpu", "n", "d", "heads", "causal", "dtype", "density", "quant", "kernel_rel_l1", "baseline",
           "baseline_rel_l1", "ratio", "config"]
DEFAULT_CONFIGS = ["w8s2-branch-pointer", "w8s2-prefetch-pointer", "w8s2-select-descriptor"]


def rel_l1(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().sum() / b.abs().sum()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="KernelConfig names (stage 2 on)")
    ap.add_argument("--out", default=None, help="CSV path (default results/kernel/accuracy-<gpu>.csv)")
    args = ap.parse_args()
    configs = []
    for name in args.configs:
        try:
            configs.append(A.KernelConfig.from_name(name))
        except ValueError as err:
            ap.error(str(err))
    if not torch.cuda.is_available():
        sys.exit("kernel_accuracy.py needs a CUDA GPU")
    out = args.out or f"results/kernel/accuracy-{gpu_slug()}.csv"
    log = CsvLog(out, COLUMNS)
    gpu = gpu_name()
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    has_fa4 = FA4.installed() and FA4.supported(torch.device("cuda"), 128, torch.bfloat16) is None
    worst_exact, worst_quant = 0.0, {}
    for n in args.n:
        for d in args.d:
            for causal in (False, True):
                for dtype in (torch.bfloat16, torch.float16):
                    t0 = time.time()
                    g = torch.Generator(device="cuda").manual_seed(n + d)
                    q, k, v = (torch.randn(1, args.heads, n, d, device="cuda", generator=g).to(dtype)
                               for _ in range(3))
                    nqb, nkb = R.num_blocks(n, 128), R.num_blocks(n, 64)
                    full = torch.ones(1, args.heads, nqb, nkb, dtype=torch.bool, device="cuda")
                    q64, k64, v64 = q.double(), k.double(), v.double()
                    ref = R.dense_attention(q64, k64, v64, is_causal=causal, scale=d ** -0.5)
                    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    base = rel_l1(sdpa, ref)
                    name = str(dtype).split(".")[-1]

                    def add(density, quant, err, baseline, b, config, exact):
                        nonlocal worst_exact
                        log.add(gpu=gpu, n=n, d=d, heads=args.heads, causal=causal, dtype=name,
                                density=density, quant=quant, kernel_rel_l1=f"{err:.4e}", baseline=baseline,
                                baseline_rel_l1=f"{b:.4e}", ratio=f"{err / b:.3f}", config=config)
                        if exact:
                            worst_exact = max(worst_exact, err / b)
                        else:
                            worst_quant[quant] = max(worst_quant.get(quant, 0.0), err)

                    runs = [("defaults", "none", lambda: block_sparse_attn(q, k, v, full, is_causal=causal)),
                            ("nopv", "none", lambda: block_sparse_attn(q, k, v, full, is_causal=causal,
                                                                       pvthreshd=None, backend="triton"))]
                    pv = torch.full((args.heads,), 50.0, device="cuda")
                    for cfg in configs:
                        runs.append((cfg.name, "none", lambda cfg=cfg: A.block_sparse_attn(
                            q, k, v, full, is_causal=causal, scale=d ** -0.5, pvthreshd=pv, config=cfg)[0]))
                    if has_fa4:
                        runs.append(("fa4", "none", lambda: block_sparse_attn(q, k, v, full, is_causal=causal,
                                                                              pvthreshd=None, backend="fa4")))
                    for quant in ("int8", "int8-fp8") if fp8 else ("int8",):
                        runs.append(("nopv", quant, lambda quant=quant: block_sparse_attn(
                            q, k, v, full, is_causal=causal, pvthreshd=None, quant=quant)))
                    for config, quant, fn in runs:
                        add(1.0, quant, rel_l1(fn(), ref), "sdpa", base, config, quant == "none")

                    mask = torch.rand(1, args.heads, nqb, nkb, device="cuda", generator=g) < 0.3
                    ref_m, _ = R.masked_attention(q64, k64, v64, mask, is_causal=causal, scale=d ** -0.5)
                    low_m, _ = R.masked_attention(q, k, v, mask, is_causal=causal, scale=d ** -0.5,
                                                  dtype=dtype)
                    b = rel_l1(low_m, ref_m)
                    for config, kw in (("defaults", {}), ("nopv", {"pvthreshd": None, "backend": "triton"})):
                        o = block_sparse_attn(q, k, v, mask, is_causal=causal, **kw)
                        add(0.3, "none", rel_l1(o, ref_m), "torch-lowp-masked", b, config, True)
                    print(f"n={n} d={d} causal={causal} {name}: sdpa {base:.2e}, worst exact/baseline so far "
                          f"{worst_exact:.2f} ({time.time() - t0:.1f}s)", flush=True)
                    q = k = v = q64 = k64 = v64 = ref = sdpa = ref_m = low_m = None  # free before the next
                    torch.cuda.empty_cache()
    print(f"worst exact-path kernel/baseline ratio: {worst_exact:.3f} (bound 2)  -> {out}")
    for quant, e in worst_quant.items():
        print(f"worst {quant} rel_l1 on Gaussian inputs: {e:.4f} (bound 0.02 for the shipped quantized path)")


if __name__ == "__main__":
    main()
