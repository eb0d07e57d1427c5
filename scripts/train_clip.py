"""Train the project's small CLIP (clip-anytorch's architecture) on the procedural images and
video frames with their captions, for CLIP score / CLIPSIM / CLIP-T.

    python scripts/train_clip.py --device cuda --minutes 3 --out evals/dit/checkpoints/clip.pt
    python scripts/train_clip.py --preset tiny --steps 3 --out /tmp/clip-smoke.pt     # CPU smoke test

Writes the checkpoint (fp16) and ``<out>.json`` (loss history and zero-shot retrieval accuracy on
fresh rendered images and video frames). Needs ``pip install --no-deps clip-anytorch==2.6.0``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from calibrate.cli import HelpFormatter  # noqa: E402
from evals.dit.train import CLIP_PRESETS, TrainConfig, train_clip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=sorted(CLIP_PRESETS), default="base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=100000, help="maximum optimizer steps")
    p.add_argument("--minutes", type=float, default=3.0, help="wall-time budget")
    p.add_argument("--out", required=True, help="checkpoint path (.pt)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    train = TrainConfig(steps=args.steps, minutes=args.minutes, batch=args.batch, lr=args.lr, seed=args.seed,
                        log_every=args.log_every, warmup=50)
    train_clip(CLIP_PRESETS.get(args.preset), train, args.out, device=args.device, preset=args.preset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
