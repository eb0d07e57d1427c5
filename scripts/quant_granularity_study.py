"""CPU study: how the INT8 QK^T error on real Q/K/V depends on the quantization granularity.

For captured layers (``calibrate.capture`` format), the relative L1 error against causal float32 SDPA
of attention computed on de-quantized Q and K (exactly the values the INT8 kernel multiplies: symmetric
INT8, scale = max|x| / 127 + 1e-7 per group of rows, round half away from zero; Q multiplied by
scale * log2(e) first, K smoothed), for several (Q rows, K rows) group sizes. ``128 x 64`` is the
shipped kernel (one scale per block); ``1 x 64`` is one scale per query row (a per-row multiply in
the kernel), ``1 x 1`` one per query row and per key. P.V is float32 here, so the numbers leave out
the kernel's 16-bit P rounding (~0.002 on these inputs). No GPU, no timing.

    python scripts/quant_granularity_study.py --capture runs/smollm2.capture \
        --out results/kernel/quant-granularity-cpu.csv
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.capture import load_captured, read_meta  # noqa: E402
from calibrate.cli import HelpFormatter  # noqa: E402
from evals.environment import CsvLog  # noqa: E402
from sparge_core.ops import reference as R  # noqa: E402

GRANULARITIES = [(128, 64), (32, 64), (1, 64), (1, 1)]


def dequantized(x: torch.Tensor, rows: int, multiplier: float) -> torch.Tensor:
    x_i8, scales = R.quantize_per_block(x, rows, multiplier=multiplier)
    return R.dequantize_per_block(x_i8, scales, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--capture", required=True)
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="default: every captured layer")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    meta = read_meta(args.capture)
    layers = args.layers or list(meta.layers)
    log = CsvLog(args.out, ["model", "seq_len", "layer", "sample", "q_rows", "k_rows", "rel_l1"])
    worst = {g: 0.0 for g in GRANULARITIES}
    total = {g: 0.0 for g in GRANULARITIES}
    count = 0
    for layer in layers:
        for i, (q, k, v) in enumerate(load_captured(args.capture, layer)[: args.samples]):
            t0 = time.time()
            group = q.shape[1] // k.shape[1]
            scale = q.shape[-1] ** -0.5
            ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                                 v.float().repeat_interleave(group, 1), is_causal=True)
            ks = R.smooth_k(k.float())
            full = torch.ones(1, 1, R.num_blocks(q.shape[2], R.BLOCK_Q), R.num_blocks(k.shape[2], R.BLOCK_K),
                              dtype=torch.bool)
            errors = []
            for g in GRANULARITIES:
                qd = dequantized(q, g[0], scale * R.LOG2E) / (scale * R.LOG2E)
                kd = dequantized(ks, g[1], 1.0)
                out, _ = R.masked_attention(qd, kd, v.float(), full.expand(1, q.shape[1], -1, -1),
                                            is_causal=True, scale=scale, dtype=torch.float32)
                e = ((out.to(v.dtype).float() - ref).abs().sum() / ref.abs().sum()).item()
                worst[g] = max(worst[g], e)
                total[g] += e
                errors.append(f"{g[0]}x{g[1]} {e:.4f}")
                log.add(model=meta.model, seq_len=meta.seq_len, layer=layer, sample=i, q_rows=g[0],
                        k_rows=g[1], rel_l1=f"{e:.5f}")
            count += 1
            print(f"layer {layer} sample {i}: " + ", ".join(errors) + f" ({time.time() - t0:.0f}s)",
                  flush=True)
    for g in GRANULARITIES:
        print(f"Q {g[0]:>3} rows x K {g[1]:>2} rows: mean {total[g] / count:.4f}  worst {worst[g]:.4f}")


if __name__ == "__main__":
    main()
