"""CPU 2K study: the prototype of the ``keys`` block estimator, before ``estimator="keys"`` existed.

``--mode keys`` replaces the reference predictor (``sparge_core.ops.reference.predict_block_mask``,
which the reference backend calls) by one whose block scores are the pooled query against every key
of a block (log-sum-exp per block, fed to ``select_blocks`` through an identity "pooled key"); the
library's version of the same estimator is ``reference.key_resolved_scores``. ``--mode pooled`` runs
the paper's estimator. Two seeded choices of 5 calibration windows, measured on every other
held-out window of the 55-window capture.

    python scripts/studies/cpu2k_keys_prototype.py --capture /tmp/hs/all2k --layer 4 --mode keys
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

_select_blocks = R.select_blocks


def key_resolved_predictor(q, k, *, is_causal, scale, simthreshd1, cdfthreshd=None, topk=None, estimator=None,
                           dtype=torch.float64):
    """``reference.predict_block_mask`` with key-resolved block scores (``estimator`` is ignored)."""
    qb = R.pool_and_similarity(q, R.BLOCK_Q, smooth=False, dtype=dtype)
    kb = R.pool_and_similarity(k, R.BLOCK_K, smooth=True, dtype=dtype)
    b, hq, nqb, d = qb.pooled.shape
    hk, n = k.shape[1], k.shape[2]
    g = hq // hk
    keys = R._pad_tokens(k.to(dtype), R.BLOCK_K)
    nkb = keys.shape[2] // R.BLOCK_K
    s = (qb.pooled.reshape(b, hk, g * nqb, d) @ keys.transpose(-1, -2)) * scale
    s[..., n:] = -math.inf
    lse = torch.logsumexp(s.view(b, hk, g * nqb, nkb, R.BLOCK_K), -1) / scale
    # select_blocks forms pooled_q @ pooled_k^T: an identity pooled key makes that the lse scores
    eye = torch.eye(nkb, dtype=dtype).expand(b, hk, nkb, nkb)
    return _select_blocks(R.PooledBlocks(lse.view(b, hq, nqb, nkb), qb.sim), R.PooledBlocks(eye, kb.sim),
                          nq=q.shape[-2], nk=n, is_causal=is_causal, scale=scale, simthreshd1=simthreshd1,
                          cdfthreshd=cdfthreshd, topk=topk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--capture", required=True, help="the 55-window capture (cpu2k_capture.py --first)")
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--mode", choices=["keys", "pooled"], required=True)
    args = ap.parse_args()
    if args.mode == "keys":
        R.predict_block_mask = key_resolved_predictor
    s = load_captured(args.capture, args.layer)
    for seed in (0, 2):
        perm = torch.randperm(len(s), generator=torch.Generator().manual_seed(seed)).tolist()
        cal = sorted(perm[:5])
        ev = S.LayerEvaluator([s[i] for i in cal], is_causal=True, backend="reference", estimator="pooled")
        res = S.search_layer(ev, ev.num_heads, S.SearchSettings(backend="reference"))
        th = torch.tensor([h.simthreshd1 for h in res.heads]).float()
        b = torch.tensor([h.budget for h in res.heads]).float()
        pv = torch.tensor([h.pvthreshd for h in res.heads]).float()
        held = [i for i in range(len(s)) if i not in cal][::2]
        errs = torch.tensor([float(S.LayerEvaluator([s[i]], is_causal=True, backend="reference", estimator="pooled")(
            th, b, pv, "cdf")[0].max()) for i in held])
        print(f"{args.mode} layer {args.layer} seed {seed} sparsity {res.sparsity:.3f} calib {res.l1:.3f} "
              f"held max {errs.max():.3f} p90 {errs.quantile(0.9):.3f} >0.1: {(errs > 0.1).sum().item()} "
              f">0.1125: {(errs > 0.1125).sum().item()}/{len(held)}", flush=True)


if __name__ == "__main__":
    main()
