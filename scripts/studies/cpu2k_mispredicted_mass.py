"""CPU 2K study: how much true attention mass the pooled predictor drops on held-out windows.

Layer ``--layer`` is calibrated (stage 1, pooled estimator) on 5 seeded windows of the 55-window
capture; then, for some held-out windows and one calibration window, the worst head's share of its
true attention mass (per query block) in blocks the predicted map left out.

    python scripts/studies/cpu2k_mispredicted_mass.py --capture /tmp/hs/all2k --layer 4
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import calibrate.search as S  # noqa: E402
from calibrate.capture import load_captured  # noqa: E402
from calibrate.cli import HelpFormatter  # noqa: E402
from sparge_core.ops import reference as R  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--capture", required=True, help="the 55-window capture (cpu2k_capture.py --first)")
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--windows", type=int, nargs="+", default=[6, 54], help="held-out windows to inspect")
    args = ap.parse_args()
    samples = load_captured(args.capture, args.layer)
    perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    cal = sorted(perm[:5])
    ev = S.LayerEvaluator([samples[i] for i in cal], is_causal=True, estimator="pooled")
    res = S.search_layer(ev, ev.num_heads, S.SearchSettings(tune_pv=False))
    theta = torch.tensor([h.simthreshd1 for h in res.heads]).float()
    budget = torch.tensor([h.budget for h in res.heads]).float()
    print("budget", [round(x, 4) for x in budget.tolist()], "theta", theta.tolist())
    for w in (*args.windows, cal[0]):
        q, k, v = samples[w]
        err, sp = S.LayerEvaluator([samples[w]], is_causal=True, estimator="pooled")(theta, budget, None, "cdf")
        print("window", w, "err", [round(x, 3) for x in err.tolist()], "sp", [round(x, 2) for x in sp.tolist()])
        h = int(err.argmax())
        group = q.shape[1] // k.shape[1]
        scale = 1 / math.sqrt(q.shape[-1])
        scores = (q.float()[0, h] @ k.float().repeat_interleave(group, 1)[0, h].T) * scale
        n = scores.shape[0]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        p = scores.softmax(-1)
        nqb, nkb = n // R.BLOCK_Q, n // R.BLOCK_K
        mass = p.reshape(nqb, R.BLOCK_Q, nkb, R.BLOCK_K).sum(-1).mean(1)  # true block mass, mean over rows
        mask = R.predict_block_mask(q, k, is_causal=True, simthreshd1=theta, cdfthreshd=budget, scale=scale)[0, h]
        dropped = (mass * (~mask)).sum(-1)
        print("  head", h, "dropped true mass per qblock", [round(x, 3) for x in dropped.tolist()])
        print("  sink mass per qblock", [round(x, 2) for x in mass[:, 0].tolist()])


if __name__ == "__main__":
    main()
