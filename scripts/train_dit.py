"""Train the project's text-to-image or text-to-video DiT on procedural captioned data.

    python scripts/train_dit.py --preset image --device cuda --minutes 3 --out evals/dit/checkpoints/t2i.pt
    python scripts/train_dit.py --preset video --device cuda --minutes 3 --out evals/dit/checkpoints/t2v.pt
    python scripts/train_dit.py --preset image-tiny --steps 3 --out /tmp/t2i-smoke.pt      # CPU smoke test

Stops at --steps or after --minutes, whichever is first. Writes the checkpoint (EMA weights, fp16),
``<out>.json`` (config, loss history, a quick attribute accuracy) and ``<out>.samples.png``.
Model sizes: see ``evals.dit.train.DIT_PRESETS``; --dim/--depth/--heads/--size/--frames/--patch
override the preset.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from calibrate.cli import HelpFormatter  # noqa: E402
from evals.dit.train import DIT_PRESETS, TrainConfig, preset_with, train_dit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=sorted(DIT_PRESETS), default="image")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=100000, help="maximum optimizer steps")
    p.add_argument("--minutes", type=float, default=3.0, help="wall-time budget")
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    p.add_argument("--batch", type=int, default=None, help="default: 128 (image), 32 (video), 8 (tiny)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-every", type=int, default=50)
    for name in ("dim", "depth", "heads", "size", "frames", "patch"):
        p.add_argument(f"--{name}", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset_with(DIT_PRESETS.get(args.preset), dim=args.dim, depth=args.depth, heads=args.heads, size=args.size,
                      frames=args.frames, patch=args.patch)
    batch = args.batch or (8 if "tiny" in args.preset else 32 if cfg.is_video else 128)
    train = TrainConfig(steps=args.steps, minutes=args.minutes, batch=batch, lr=args.lr, seed=args.seed,
                        log_every=args.log_every)
    train_dit(cfg, train, args.out, device=args.device, preset=args.preset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
