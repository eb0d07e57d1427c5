"""CPU 2K study: bound every ``--chunk``-query chunk of a window instead of the whole window, then
measure the held-out windows of the 12-window capture (worst head, whole window).

    python scripts/studies/cpu2k_chunk_bound.py --capture /tmp/hs/cap2k --layer 4 --chunk 512 --calib 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import calibrate.search as S  # noqa: E402
from calibrate.capture import load_captured  # noqa: E402
from calibrate.cli import HelpFormatter  # noqa: E402
from sparge_core import sparge_attn  # noqa: E402


class ChunkEvaluator(S.LayerEvaluator):
    """Worst relative L1 over chunks of ``chunk`` query rows (not over whole windows)."""

    def __init__(self, samples, *, chunk: int, **kwargs):
        super().__init__(samples, **kwargs)
        self.chunk = chunk

    def __call__(self, theta, budget, pv, mode):
        self.calls += 1
        worst = torch.zeros(self.num_heads, dtype=torch.float64)
        spars = torch.zeros(self.num_heads, dtype=torch.float64)
        for (q, k, v), ref in zip(self.samples, self.dense):
            out, stats = sparge_attn(q, k, v, is_causal=True, simthreshd1=theta, pvthreshd=pv, cdfthreshd=budget,
                                     return_stats=True)
            c = q.shape[2] // self.chunk
            d = (out.float() - ref).abs()[0].reshape(self.num_heads, c, self.chunk, -1).sum((2, 3))
            r = ref.abs()[0].reshape(self.num_heads, c, self.chunk, -1).sum((2, 3))
            worst = torch.maximum(worst, (d / r).max(1).values.double())
            spars += stats.per_head_sparsity()
        return worst, spars / len(self.samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--capture", required=True, help="the 12-window capture (cpu2k_capture.py)")
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--calib", default="0,1,2,3,4", help="comma-separated calibration windows")
    args = ap.parse_args()
    cal = [int(x) for x in args.calib.split(",")]
    s = load_captured(args.capture, args.layer)
    ev = ChunkEvaluator([s[i] for i in cal], chunk=args.chunk, is_causal=True)
    held = [i for i in range(len(s)) if i not in cal]
    held_ev = [S.LayerEvaluator([s[i]], is_causal=True, estimator="pooled") for i in held]
    for tune in (False, True):
        res = S.search_layer(ev, ev.num_heads, S.SearchSettings(tune_pv=tune))
        th = torch.tensor([h.simthreshd1 for h in res.heads]).float()
        b = torch.tensor([h.budget for h in res.heads]).float()
        pv = torch.tensor([h.pvthreshd for h in res.heads]).float()
        out = [float(h(th, b, pv if tune else None, "cdf")[0].max()) for h in held_ev]
        print("chunk", args.chunk, "pv", tune, "sparsity %.3f" % res.sparsity,
              "held", dict(zip(held, [round(x, 3) for x in out])))


if __name__ == "__main__":
    main()
