"""``make paper``: the whole pipeline for one model: calibrate, every text suite for every method at
matched density, the kernel table and ``results/TABLES.md``.

On a GPU the paper-size setting (calibration on 5 x 8192 tokens; suites at 2K-8K); on a CPU a
reduced one (minutes, not hours; the numbers only show that the pipeline works).

    python scripts/paper.py --model smollm2 --out results   # -> results/<suite>/smollm2/*.json, TABLES.md
    python scripts/paper.py --model smollm2                 # the same into runs/paper/ (results/ untouched)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.__main__ import main as calibrate_main  # noqa: E402
from calibrate.cli import HelpFormatter  # noqa: E402
from evals.__main__ import main as evals_main  # noqa: E402
from sparge_core.atomic import write_text_atomic  # noqa: E402

GPU = {"calib": ["--samples", "5", "--seq-len", "8192"], "ppl": ["--lengths", "2048", "4096", "8192"],
       "niah": ["--lengths", "2048", "4096", "8192"], "longctx": ["--lengths", "4096", "8192"],
       "speed": ["--lengths", "2048", "4096", "8192"]}
CPU = {"calib": ["--samples", "2", "--seq-len", "1024", "--thetas", "-1", "0.5", "--bisect-steps", "5", "--no-pv"],
       "ppl": ["--lengths", "1024", "--windows", "2"], "niah": ["--lengths", "1024", "--depths", "0.1", "0.5", "0.9"],
       "longctx": ["--lengths", "1024", "--per-task", "1"], "speed": ["--lengths", "1024"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="pydoc", help="calibration corpus")
    ap.add_argument("--out", default="runs/paper", help="results folder (`make paper` passes results)")
    ap.add_argument("--runs", default="runs", help="where the config, its capture and Optuna study go")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--suites", nargs="+", default=["ppl", "niah", "longctx", "speed"])
    args = ap.parse_args()
    setting = GPU if args.device.startswith("cuda") else CPU
    config = Path(args.runs) / f"{args.model}.json"
    rc = calibrate_main(["--model", args.model, "--data", args.data, "--device", args.device, "--out", str(config),
                         "--quiet", *setting["calib"]])
    if rc:
        return rc
    write_text_atomic(Path(args.out) / "calibration" / f"{args.model}-{args.device.split(':')[0]}.json",
                      config.read_text())
    for suite in args.suites:
        rc = evals_main([suite, "--model", args.model, "--config", str(config), "--density", "matched",
                         "--device", args.device, "--out", args.out, "--quiet", *setting[suite]])
        if rc:
            return rc
    return evals_main(["tables", "--out", args.out])


if __name__ == "__main__":
    sys.exit(main())
