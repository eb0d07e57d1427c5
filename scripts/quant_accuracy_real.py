"""Accuracy of the quantized kernel on Q/K/V captured from a real model (issue 4's last target).

For every captured layer and sample: relative L1 vs a float32 dense reference (causal SDPA on float32
copies) of the kernel at density 1.0: without quantization (``none``: the Triton kernel, stage 2 off),
with ``quant="int8"`` (INT8 QK^T, 16-bit P.V; bound 0.025), with ``quant="int8-fp8"`` (FP8 P.V too,
sm89+), at the shipped defaults (``defaults``: whatever ``block_sparse_attn`` runs with every argument
at its default, stage 2 included) and FA4 on the full map (``fa4``, when installed on sm90). On a CPU
(``--device cpu``) the reference backend simulates INT8 QK^T exactly (``none`` and ``int8`` only).
Writes a CSV and prints the worst and mean per variant.

    python scripts/quant_accuracy_real.py --capture runs/smollm2.capture --out results/kernel/accuracy-real-<gpu>.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.capture import load_captured, read_meta  # noqa: E402
from calibrate.cli import HelpFormatter  # noqa: E402
from evals.environment import CsvLog, gpu_name  # noqa: E402
from sparge_core import block_sparse_attn  # noqa: E402
from sparge_core.ops import fa4 as FA4  # noqa: E402
from sparge_core.ops import reference as R  # noqa: E402


def rel_l1(a, b) -> float:
    return ((a.float() - b.float()).abs().sum() / b.float().abs().sum()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--capture", required=True)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    meta = read_meta(args.capture)
    cuda = args.device.startswith("cuda")
    variants = ["none", "int8"] + (["int8-fp8", "defaults"] if cuda else [])
    if cuda and FA4.installed() and FA4.supported(torch.device(args.device), 64, torch.bfloat16) is None:
        variants.append("fa4")
    log = CsvLog(args.out, ["gpu", "model", "seq_len", "layer", "sample", "dtype", "quant", "rel_l1"])
    worst = {v: 0.0 for v in variants}
    total = {v: 0.0 for v in variants}
    count = 0
    for layer in meta.layers:
        for i, (q, k, v) in enumerate(load_captured(args.capture, layer)[: args.samples]):
            q, k, v = (t.to(args.device) for t in (q, k, v))
            group = q.shape[1] // k.shape[1]
            ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                                 v.float().repeat_interleave(group, 1), is_causal=True)
            full = torch.ones(1, 1, R.num_blocks(q.shape[2], R.BLOCK_Q), R.num_blocks(k.shape[2], R.BLOCK_K),
                              dtype=torch.bool, device=q.device)
            for variant in variants:
                if variant == "defaults":
                    out = block_sparse_attn(q, k, v, full, is_causal=True)
                elif variant == "fa4":
                    out = block_sparse_attn(q, k, v, full, is_causal=True, pvthreshd=None, backend="fa4")
                else:  # the Triton kernel on a GPU (auto would hand an exact call to FA4), else the reference
                    out = block_sparse_attn(q, k, v, full, is_causal=True, pvthreshd=None, quant=variant,
                                            backend="triton" if cuda else "reference")
                e = rel_l1(out, ref)
                worst[variant] = max(worst[variant], e)
                total[variant] += e
                log.add(gpu=gpu_name(), model=meta.model, seq_len=meta.seq_len, layer=layer, sample=i,
                        dtype=str(q.dtype).split(".")[-1], quant=variant, rel_l1=f"{e:.5f}")
            count += 1
    for variant in variants:
        print(f"{variant:<9} mean rel L1 {total[variant] / count:.4f}  worst {worst[variant]:.4f}  "
              f"({count} layer-samples)")


if __name__ == "__main__":
    main()
