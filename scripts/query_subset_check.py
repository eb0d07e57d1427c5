"""What calibrating on a subset of query blocks does to the bound: calibrate with ``--query-blocks K``,
then measure the written config on *every* query row of the same windows (and of the held-out ones).

    python scripts/query_subset_check.py --model tiny-llama --seq-len 2048 --query-blocks 4 \\
        --out results/calibration/query-subset-check-cpu

Per layer: the worst head's L1 on the stored rows (what the search held to margin x the bound) and
on all rows, for the calibration windows and the held-out windows, relative to the bound. Writes
``<out>.json`` and ``<out>.md``; the calibrate command and its arguments are in the JSON.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calibrate.capture import capture_to_disk, load_captured, read_meta, select_query_rows  # noqa: E402
from calibrate.cli import HelpFormatter  # noqa: E402
from calibrate.search import config_window_errors  # noqa: E402
from sparge_core.params import ModelConfig, write_json_atomic, write_text_atomic  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--holdout", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--query-blocks", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more calibrate arguments")
    args = ap.parse_args()
    from calibrate.data import token_windows
    from calibrate.models import load_model

    scratch = tempfile.TemporaryDirectory(prefix="sparge-subset-")  # removed when the script ends
    tmp = Path(scratch.name)
    cfg_path = tmp / "sub.json"
    cmd = [sys.executable, "-m", "calibrate", "--model", args.model, "--data", args.data, "--samples",
           str(args.samples), "--holdout", str(args.holdout), "--seq-len", str(args.seq_len), "--device", args.device,
           "--query-blocks", str(args.query_blocks), "--objective", "sparsity", "--quiet", "--out", str(cfg_path),
           *(args.extra or ["--l1", "0.3", "--pv-l1", "0.35", "--thetas", "-1", "0.5", "--bisect-steps", "6"])]
    subprocess.run(cmd, check=True, cwd=REPO)
    config = ModelConfig.load(cfg_path)
    sub_meta = read_meta(tmp / "sub.capture")
    model, tokenizer = load_model(args.model, device=args.device)
    windows = token_windows(tokenizer, args.data, args.seq_len, args.samples + args.holdout, seed=0)
    full_meta = capture_to_disk(model, windows, tmp / "full", model_name=args.model)
    assert full_meta.data_sha256 == sub_meta.data_sha256, "the two captures must hold the same windows"
    rows = []
    for lc in config.layers:
        if lc.is_dense:
            continue
        full = load_captured(tmp / "full", lc.layer)
        stored = [(select_query_rows(q, sub_meta.query_chunks), k, v) for q, k, v in full]
        entry = {"layer": lc.layer}
        for name, part in (("calibration", slice(0, args.samples)), ("heldout", slice(args.samples, None))):
            _, heads_sub = config_window_errors(stored[part], lc, is_causal=True, device=args.device,
                                                query_chunks=sub_meta.query_chunks)
            _, heads_full = config_window_errors(full[part], lc, is_causal=True, device=args.device)
            entry[f"{name}_stored_rows"] = max(max(h) for h in heads_sub) / config.pv_l1
            entry[f"{name}_all_rows"] = max(max(h) for h in heads_full) / config.pv_l1
        rows.append(entry)
    result = {"script": " ".join(["python", *sys.argv]), "command": " ".join(cmd[1:]), "query_chunks": [list(c) for c in sub_meta.query_chunks],
              "seq_len": args.seq_len, "bound": config.pv_l1, "margin": config.calibration.get("margin"),
              "what": "worst head's relative L1 / pv_l1, worst window", "layers": rows}
    lines = [(f"Query subset: {sum(n for _, n in sub_meta.query_chunks) // 128} of {args.seq_len // 128} query "
              f"blocks, {args.model}, {args.samples} + {args.holdout} held-out windows of {args.seq_len} tokens "
              f"(worst head's L1 / pv_l1, worst window)"), "",
             "| layer | calibration, stored rows | calibration, all rows | held-out, stored rows | held-out, all rows |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['calibration_stored_rows']:.3f} | {r['calibration_all_rows']:.3f} | "
                     f"{r['heldout_stored_rows']:.3f} | {r['heldout_all_rows']:.3f} |")
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), result)
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
