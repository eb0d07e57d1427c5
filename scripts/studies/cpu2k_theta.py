"""CPU 2K study: the self-similarity guard. Per simthreshd1 value, stage 1 on windows 0-4 of the
12-window capture, then the calibrated sparsity and the worst-head L1 on window 11 (table-heavy)
and on windows 5-10.

    python scripts/studies/cpu2k_theta.py --capture /tmp/hs/cap2k --layer 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from calibrate.capture import load_captured  # noqa: E402
from calibrate.cli import HelpFormatter  # noqa: E402
from calibrate.search import LayerEvaluator, SearchSettings, bisect_budget  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--capture", required=True, help="the 12-window capture (cpu2k_capture.py)")
    ap.add_argument("--layer", type=int, default=4)
    args = ap.parse_args()
    s = load_captured(args.capture, args.layer)
    ev = LayerEvaluator(s[:5], is_causal=True, estimator="pooled")
    held11 = LayerEvaluator(s[11:], is_causal=True, estimator="pooled")
    held_other = LayerEvaluator(s[5:11], is_causal=True, estimator="pooled")
    settings = SearchSettings()
    for th in (-1.0, 0.2, 0.4, 0.55, 0.7, 0.85):
        theta = torch.full((ev.num_heads,), th)
        budget, _l1, sp = bisect_budget(ev, theta, settings)
        hl, hsp = held11(theta, budget.float(), None, "cdf")
        ol, _osp = held_other(theta, budget.float(), None, "cdf")
        print(th, "cal sp %.3f" % sp.mean(), "held11 l1 %.3f sp %.3f" % (hl.max(), hsp.mean()),
              "other held l1 %.3f" % ol.max(), [round(x, 3) for x in hl.tolist()])


if __name__ == "__main__":
    main()
