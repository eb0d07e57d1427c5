"""CPU 2K study: which 5 calibration windows? A k-center (diverse) choice on token histograms vs three
seeded random choices, each searched (pooled estimator) and measured on the other 50 windows.

    python scripts/studies/cpu2k_window_choice.py --capture /tmp/hs/all2k --ids /tmp/hs/all2k_ids.pt --layers 4
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


def features(ids_2d: torch.Tensor, buckets: int = 4096) -> torch.Tensor:
    """Hellinger embedding (unit vectors) of each window's hashed token histogram."""
    h = torch.zeros(ids_2d.shape[0], buckets, dtype=torch.float64)
    h.scatter_add_(1, (ids_2d.long() * 2654435761 % buckets), torch.ones_like(ids_2d, dtype=torch.float64))
    return (h / h.sum(1, keepdim=True)).sqrt()


def kcenter(feat: torch.Tensor, count: int) -> tuple[list[int], float]:
    """Greedy k-center: start farthest from the mean, then repeatedly the point farthest from the chosen."""
    d0 = (feat - feat.mean(0, keepdim=True)).norm(dim=1)
    chosen = [int(d0.argmax())]
    mind = (feat - feat[chosen[0]]).norm(dim=1)
    while len(chosen) < count:
        i = int(mind.argmax())
        chosen.append(i)
        mind = torch.minimum(mind, (feat - feat[i]).norm(dim=1))
    return chosen, float(mind.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--capture", required=True, help="the 55-window capture (cpu2k_capture.py --first)")
    ap.add_argument("--ids", required=True, help="its token ids (cpu2k_capture.py --ids-out)")
    ap.add_argument("--layers", default="4", help="comma-separated layers")
    args = ap.parse_args()
    ids = torch.load(args.ids)
    total = ids.shape[0]
    kc, radius = kcenter(features(ids), 5)
    print("kcenter", kc, "radius", radius)
    choices = {"kcenter": kc}
    for seed in (0, 1, 2):
        gen = torch.Generator().manual_seed(seed)
        choices[f"random{seed}"] = sorted(torch.randperm(total, generator=gen)[:5].tolist())
    for layer in [int(x) for x in args.layers.split(",")]:
        s = load_captured(args.capture, layer)
        for name, cal in choices.items():
            ev = S.LayerEvaluator([s[i] for i in cal], is_causal=True, estimator="pooled")
            res = S.search_layer(ev, ev.num_heads, S.SearchSettings())
            th = torch.tensor([h.simthreshd1 for h in res.heads]).float()
            b = torch.tensor([h.budget for h in res.heads]).float()
            pv = torch.tensor([h.pvthreshd for h in res.heads]).float()
            held = [i for i in range(total) if i not in cal]
            errs = torch.tensor([float(S.LayerEvaluator([s[i]], is_causal=True, estimator="pooled")(
                th, b, pv, "cdf")[0].max()) for i in held])
            print(f"layer {layer} {name:<8} {cal} sparsity {res.sparsity:.3f} held max {errs.max():.3f} "
                  f"(win {held[int(errs.argmax())]}) p90 {errs.quantile(0.9):.3f} "
                  f">0.1125: {(errs > 0.1125).sum().item()}/{len(held)}", flush=True)


if __name__ == "__main__":
    main()
