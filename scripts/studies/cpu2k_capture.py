"""CPU 2K study, step 0: capture SmolLM2's Q/K/V on pydoc windows of 2048 tokens.

    # 12 seeded windows of 10 layers (the held-out and theta runs)
    python scripts/studies/cpu2k_capture.py --out /tmp/hs/cap2k --samples 12 --layers 0,2,3,4,6,8,10,15,20,29
    # all 55 windows, in corpus order, of 6 layers, with their token ids (the window-choice run)
    python scripts/studies/cpu2k_capture.py --out /tmp/hs/all2k --samples 55 --first --layers 3,4,6,8,12,20 \\
        --ids-out /tmp/hs/all2k_ids.pt
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from calibrate.capture import capture_to_disk  # noqa: E402
from calibrate.cli import HelpFormatter  # noqa: E402
from calibrate.data import token_windows  # noqa: E402
from calibrate.models import load_model  # noqa: E402
from sparge_core.atomic import atomic_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--out", required=True, help="capture folder to create")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", default="pydoc")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--layers", required=True, help="comma-separated layer indices")
    ap.add_argument("--seed", type=int, default=0, help="seed of the window choice")
    ap.add_argument("--first", action="store_true", help="take the first windows in corpus order (no seed)")
    ap.add_argument("--ids-out", default=None, help="also save the windows' token ids (torch.save) here")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device="cpu")
    windows = token_windows(tokenizer, args.corpus, args.seq_len, args.samples, seed=None if args.first else args.seed)
    capture_to_disk(model, windows, args.out, layers=[int(x) for x in args.layers.split(",")], model_name=args.model)
    if args.ids_out:
        with atomic_path(args.ids_out) as tmp:
            torch.save(windows.input_ids, tmp)


if __name__ == "__main__":
    main()
