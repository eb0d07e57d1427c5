"""Demo: SpargeAttn on long structured random inputs vs dense attention (CPU or GPU).

Prints, for a few lengths, the block sparsity the default predictor finds and the relative L1 error
of the output against dense softmax attention.
"""

from __future__ import annotations

import argparse
import time

import torch

from sparge_core import sparge_attn
from sparge_core.synthetic import structured_qkv


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().sum() / b.float().abs().sum()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--cdfthreshd", type=float, default=0.98)
    parser.add_argument("--simthreshd1", type=float, default=0.6)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"device={device} dtype={dtype} heads={args.heads} head_dim={args.head_dim}")
    print(f"{'n':>7} {'causal':>6} {'sparsity':>9} {'rel_l1':>8} {'sparse_s':>9} {'dense_s':>8}")
    for n in args.lengths:
        q, k, v = structured_qkv(1, args.heads, args.heads, n, args.head_dim, dtype=dtype, device=device)
        for causal in (False, True):
            t0 = time.perf_counter()
            out, stats = sparge_attn(q, k, v, is_causal=causal, simthreshd1=args.simthreshd1,
                                     cdfthreshd=args.cdfthreshd, return_stats=True)
            t1 = time.perf_counter()
            dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            t2 = time.perf_counter()
            print(f"{n:>7} {str(causal):>6} {stats.sparsity:>9.3f} {rel_l1(out, dense):>8.4f} {t1 - t0:>9.2f} {t2 - t1:>8.2f}")


if __name__ == "__main__":
    main()
