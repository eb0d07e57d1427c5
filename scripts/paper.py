"""``make paper MODEL=<name>``: the paper's Table 1 for one model, from the committed result files.

    python scripts/paper.py --model smollm2 --out results   # results/ -> results/paper/table1-smollm2.md
    python scripts/paper.py --model qwen2.5-coder-0.5b --run --device cuda --out results   # measure, then the table

``--out`` (default ``runs/paper``; the Makefile targets pass ``results``) is the results folder below.
Without ``--run`` nothing is measured: the table is rebuilt from ``results/`` (``evals.paper_table``;
cells without a result file say ``n/a``). With ``--run`` the whole pipeline runs first and writes the
result files the table reads (the layout is in ``evals/paper_table.py``):

1. calibrate at the default bound (``runs/<model>.json``, capture ``runs/<model>.capture``) and at the
   tighter ``--tight-l1`` bound on the same capture (``runs/<model>-tight.json``); both configs are copied
   to ``results/calibration/<model>[-tight]-<gpu>.json``;
2. every suite (ppl on the first corpus, niah, ruler if this checkout has it, speed) for dense, sparge
   and the rivals at the calibrated per-layer density -> ``results/<suite>/<model>/``;
3. the same suites for sparge at the tighter bound -> ``results/<suite>/<model>-tight/``;
4. ppl on each further corpus -> ``results/ppl/<model>[-tight]-ppl-<corpus>/``;
5. the table (and ``results/TABLES.md``).

On a CPU ``--run`` uses a reduced setting (minutes; the numbers only show that the pipeline works).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.__main__ import main as calibrate_main  # noqa: E402
from calibrate.cli import HelpFormatter  # noqa: E402
from evals.__main__ import LLM_SUITES as SUITES  # noqa: E402
from evals.__main__ import main as evals_main  # noqa: E402
from evals.paper_table import DEFAULT_LENGTHS, write_table1  # noqa: E402
from sparge_core.atomic import write_bytes_atomic  # noqa: E402

#: context of the named models (suites are not run beyond it)
MAX_CONTEXT = {"smollm2": 8192, "qwen2.5-coder-0.5b": 32768, "gemma3-270m": 32768}
RIVALS = ["dense", "sparge", "sparge-topk", "minference", "flexprefill", "sparge-budget"]

GPU = {
    "calib": ["--samples", "5", "--holdout", "8", "--seq-len", "8192"],
    "ppl": ["--windows", "4"],
    "niah": [],
    "ruler": [],
    "speed": [],
}
CPU = {
    "calib": [
        "--samples",
        "2",
        "--holdout",
        "1",
        "--seq-len",
        "1024",
        "--thetas",
        "-1",
        "0.5",
        "--bisect-steps",
        "5",
        "--no-pv",
    ],
    "ppl": ["--windows", "2"],
    "niah": ["--depths", "0.1", "0.5", "0.9"],
    "ruler": [],
    "speed": [],
}
CPU_LENGTHS = (1024,)


def gpu_tag(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        for tag in ("h200", "h100", "a100", "l40s", "b200"):
            if tag in name:
                return tag
        return name.split()[-1]
    return "cpu"


def _suite_lengths(suite: str, lengths: tuple[int, ...], context: int) -> list[str]:
    chosen = [L for L in lengths if L <= context]
    if suite in ("niah", "ruler", "speed") and lengths != CPU_LENGTHS:
        chosen = sorted({min(L, context) for L in (4096, *chosen)})
    return ["--lengths", *map(str, chosen)] if chosen else []


def _move_group(src_root: Path, suite: str, model: str, dest_root: Path, group: str) -> None:
    src = src_root / suite / model
    if not src.is_dir():
        return
    dest = dest_root / suite / group
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.move(str(f), dest / f.name)


def run_pipeline(args, setting: dict, lengths: tuple[int, ...]) -> int:
    model, out, runs = args.model, Path(args.out), Path(args.runs)
    context = args.max_context or MAX_CONTEXT.get(model, max(lengths))
    capture = runs / f"{model}.capture"
    tag = gpu_tag(args.device)
    configs = {"": runs / f"{model}.json", "-tight": runs / f"{model}-tight.json"}
    bounds = {
        "": ["--l1", str(args.l1), "--pv-l1", str(args.pv_l1)],
        "-tight": ["--l1", str(args.tight_l1), "--pv-l1", str(args.tight_pv_l1)],
    }
    for suffix, config in configs.items():
        rc = calibrate_main(
            [
                "--model",
                model,
                "--data",
                args.data,
                "--device",
                args.device,
                "--capture-dir",
                str(capture),
                "--out",
                str(config),
                "--quiet",
                *bounds[suffix],
                *setting["calib"],
            ]
        )
        if rc:
            return rc
        (out / "calibration").mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out / "calibration" / f"{model}{suffix}-{tag}.json", config.read_bytes())
    suites = [s for s in args.suites if s in SUITES or s == "ruler"]
    missing = [s for s in suites if s not in SUITES]
    for s in missing:
        print(f"paper: this checkout has no {s!r} suite; its column stays n/a", file=sys.stderr)
    suites = [s for s in suites if s in SUITES]

    def evals(suite, methods, config, dest, extra=()):
        return evals_main(
            [
                suite,
                "--model",
                model,
                "--methods",
                *methods,
                "--config",
                str(config),
                "--capture",
                str(capture),
                "--density",
                "matched",
                "--device",
                args.device,
                "--out",
                str(dest),
                "--quiet",
                *_suite_lengths(suite, lengths, context),
                *setting[suite],
                *extra,
            ]
        )

    for suite in suites:  # dense, sparge at the default bound, rivals at its density
        if rc := evals(suite, RIVALS, configs[""], out):
            return rc
    with tempfile.TemporaryDirectory(dir=runs) as tmp:
        tmp = Path(tmp)
        for suite in suites:  # sparge at the tighter bound
            if rc := evals(suite, ["sparge"], configs["-tight"], tmp / "tight"):
                return rc
            _move_group(tmp / "tight", suite, model, out, f"{model}-tight")
        for corpus in args.more_corpora:
            for suffix, methods in (("", RIVALS), ("-tight", ["sparge"])):
                dest = tmp / f"ppl-{corpus}{suffix}"
                if rc := evals("ppl", methods, configs[suffix], dest, ("--data", corpus)):
                    return rc
                _move_group(dest, "ppl", model, out, f"{model}{suffix}-ppl-{corpus}")
    return evals_main(["tables", "--out", str(out)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="runs/paper", help="the results folder the table reads and --run writes "
                    "(`make paper` / `make paper-run` pass results)")
    ap.add_argument("--run", action="store_true", help="measure first (calibration and every suite)")
    ap.add_argument("--data", default="pydoc", help="calibration corpus and the first perplexity corpus")
    ap.add_argument("--more-corpora", nargs="*", default=["austen"], help="further perplexity corpora")
    ap.add_argument("--runs", default="runs", help="where configs, captures and Optuna studies go")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--suites", nargs="+", default=["ppl", "niah", "ruler", "speed"])
    ap.add_argument("--l1", type=float, default=0.08)
    ap.add_argument("--pv-l1", type=float, default=0.09)
    ap.add_argument("--tight-l1", type=float, default=0.03)
    ap.add_argument("--tight-pv-l1", type=float, default=0.035)
    ap.add_argument("--max-context", type=int, help="the model's context (default: known models' own)")
    args = ap.parse_args()
    if args.tight_l1 >= args.l1:
        ap.error(f"--tight-l1 ({args.tight_l1}) must be below --l1 ({args.l1})")
    cpu = not args.device.startswith("cuda")
    lengths = CPU_LENGTHS if cpu else DEFAULT_LENGTHS
    if args.run:
        Path(args.runs).mkdir(parents=True, exist_ok=True)
        rc = run_pipeline(args, CPU if cpu else GPU, lengths)
        if rc:
            return rc
    context = args.max_context or MAX_CONTEXT.get(args.model)
    path = write_table1(args.out, args.model, max_context=context)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
