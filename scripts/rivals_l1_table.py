"""Per-layer mean relative L1 error vs dense attention of sparge, minference and flexprefill at
matched block densities (default 0.5 and 0.7, i.e. sparsity 0.5 / 0.3 as in the paper's tables),
all on the same block-sparse kernel.

For every layer and sample (a ``calibrate.capture`` folder, or ``--synthetic`` inputs; see
``evals.rivals`` for the input options) and every method and target density:
``sparge_core.methods.density.match_density`` sets the method's own budget knob (sparge:
``cdfthreshd``; sparge-topk: ``topk``; minference: ``budget_ratio``; flexprefill: ``gamma``) so that its
block map keeps the target fraction of the causal block pairs; the map is run by
``block_sparse_attn`` (Triton on CUDA) and compared with float32 dense attention:
``rel_l1 = sum |o - o_dense| / sum |o_dense|``. Sparge keeps its stage-2 PV skip (``pvthreshd``
default); the rivals have none.

Methods are ``LABEL=NAME[:key=value,...]`` (values parsed as int, float, None/none, true/false or
text). Defaults: ``sparge`` (cdf mode, simthreshd1 0.6), ``sparge-topk``, ``minference-bs`` (the
block-sparse pattern the SpargeAttn paper ran), ``minference-vs`` (MInference's own default
pattern), ``flexprefill`` (gamma knob, tau 0.1, min_budget 1024).

A method whose knob cannot reach a target (e.g. flexprefill's min_budget floor, or sparge's
always-kept non-self-similar blocks) is reported at the closest density it reaches, flagged in the
table with ``*`` and listed under ``unreached`` in the JSON.

Writes ``<out>.json`` (command, environment, every row, the tables), ``<out>.csv`` (rows) and
``<out>.md`` (the tables); prints the markdown. Default ``<out>``: ``$OUT/rivals_l1`` if ``$OUT`` is
set, else ``runs/rivals/rivals_l1``.

Examples::

    python scripts/rivals_l1_table.py --synthetic --seq-len 1024 --heads 4 --kv-heads 2 --layers 0 1
    python scripts/rivals_l1_table.py --capture runs/cap-smollm2-8k --samples 2
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from calibrate.cli import HelpFormatter  # noqa: E402
from evals.rivals import (  # noqa: E402
    add_input_args,
    default_out,
    dense_reference,
    describe_inputs,
    iter_inputs,
    rel_l1,
    run_info,
)
from sparge_core import block_sparse_attn  # noqa: E402
from sparge_core.atomic import atomic_open, write_json_atomic, write_text_atomic  # noqa: E402
from sparge_core.methods.density import match_density  # noqa: E402

logger = logging.getLogger("rivals_l1_table")

DEFAULT_METHODS = [
    "sparge=sparge",
    "sparge-topk=sparge-topk",
    "minference-bs=minference:pattern=block_sparse",
    "minference-vs=minference:pattern=vertical_slash",
    "flexprefill=flexprefill",
]


def _value(text: str) -> Any:
    low = text.lower()
    if low == "none":
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_method(spec: str) -> tuple[str, str, dict]:
    """``LABEL=NAME[:k=v,...]`` (or ``NAME[:...]``, labelled by itself) -> (label, name, params)."""
    label, sep, rest = spec.partition("=")
    if not sep or ":" in label:
        label, rest = spec.split(":", 1)[0], spec
    name, _, items = rest.partition(":")
    params = {}
    for item in filter(None, items.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"bad method spec {spec!r}: expected LABEL=NAME:key=value,...")
        params[key] = _value(value)
    return label, name, params


def build_tables(rows: list[dict], labels: list[str], targets: list[float], tol: float) -> dict:
    """Per-layer means of L1 and reached density, and the mean over layers."""
    layers = sorted({r["layer"] for r in rows})
    l1: dict[str, dict[str, float]] = {}
    density: dict[str, dict[str, float]] = {}
    for layer in layers + ["mean"]:
        l1[str(layer)], density[str(layer)] = {}, {}
        for label in labels:
            for target in targets:
                col = f"{label}@{target:g}"
                group = [
                    r
                    for r in rows
                    if r["method"] == label
                    and r["target"] == target
                    and (layer == "mean" or r["layer"] == layer)
                ]
                if layer == "mean":  # mean over layers of the per-layer means
                    per_layer = [l1[str(x)][col] for x in layers if col in l1[str(x)]]
                    per_dens = [density[str(x)][col] for x in layers if col in density[str(x)]]
                    if per_layer:
                        l1["mean"][col] = sum(per_layer) / len(per_layer)
                        density["mean"][col] = sum(per_dens) / len(per_dens)
                elif group:
                    l1[str(layer)][col] = sum(r["l1"] for r in group) / len(group)
                    density[str(layer)][col] = sum(r["density"] for r in group) / len(group)
    unreached = [
        {k: r[k] for k in ("layer", "sample", "method", "target", "density")}
        for r in rows
        if abs(r["density"] - r["target"]) > tol + 1e-12
    ]
    return {"l1": l1, "density": density, "unreached": unreached}


def markdown(tables: dict, labels: list[str], targets: list[float], tol: float) -> str:
    cols = [f"{label}@{t:g}" for t in targets for label in labels]
    flagged = {(str(u["layer"]), f"{u['method']}@{u['target']:g}") for u in tables["unreached"]}
    out = []
    for title, key, fmt in (
        ("mean relative L1 vs dense", "l1", "{:.4f}"),
        ("reached density", "density", "{:.3f}"),
    ):
        out.append(
            f"**{title}** (per layer, mean over samples; `*`: a sample missed the target by more than {tol})"
        )
        out.append("")
        out.append("| layer | " + " | ".join(cols) + " |")
        out.append("|---|" + "---|" * len(cols))
        for layer, values in tables[key].items():
            cells = []
            for col in cols:
                value = values.get(col)
                mark = (
                    "*"
                    if (layer, col) in flagged or (layer == "mean" and any(c == col for _, c in flagged))
                    else ""
                )
                cells.append("-" if value is None else fmt.format(value) + mark)
            out.append(f"| {layer} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=HelpFormatter
    )
    add_input_args(parser)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="LABEL=NAME[:key=value,...]")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7], help="block densities")
    parser.add_argument("--tol", type=float, default=0.02, help="density tolerance reported as reached")
    parser.add_argument(
        "--out", type=Path, default=None, help="output stem (.json, .csv and .md are written)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    methods = [parse_method(m) for m in args.methods]
    labels = [label for label, _, _ in methods]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"method labels must be unique, got {labels}")
    device = torch.device(args.device)

    rows = []
    with torch.no_grad():
        for x in iter_inputs(args):
            dense = dense_reference(x.q, x.k, x.v)
            for label, name, fixed in methods:
                for target in args.targets:
                    t0 = time.perf_counter()
                    method, reached = match_density(name, x.q, x.k, target, True, tol=args.tol, **fixed)
                    mask = method.block_mask(x.q, x.k, is_causal=True)
                    out, stats = block_sparse_attn(
                        x.q,
                        x.k,
                        x.v,
                        mask,
                        is_causal=True,
                        pvthreshd=method.pvthreshd,
                        backend=args.backend,
                        return_stats=True,
                    )
                    knob = method.budget_param
                    rows.append(
                        {
                            "layer": x.layer,
                            "sample": x.sample,
                            "method": label,
                            "name": name,
                            "target": target,
                            "density": reached,
                            "kernel_density": stats.density,
                            "pv_skip": stats.pv_skip,
                            "knob": knob,
                            "knob_value": method.params().get(knob) if knob else None,
                            "params": method.params(),
                            "l1": rel_l1(out, dense),
                            "seconds": time.perf_counter() - t0,
                        }
                    )
                    logger.info(
                        "L%03d S%03d %-14s target %.2f density %.4f L1 %.4f",
                        x.layer,
                        x.sample,
                        label,
                        target,
                        reached,
                        rows[-1]["l1"],
                    )
            del dense
    tables = build_tables(rows, labels, args.targets, args.tol)
    text = markdown(tables, labels, args.targets, args.tol)
    info = run_info(device, args.backend, __file__, argv)
    record = {
        "suite": "rivals_l1",
        **info,
        "inputs": describe_inputs(args),
        "targets": args.targets,
        "tol": args.tol,
        "methods": [{"label": lb, "name": n, "fixed": p} for lb, n, p in methods],
        "tables": tables,
        "rows": rows,
    }
    stem = args.out or default_out("rivals_l1")
    write_json_atomic(stem.with_suffix(".json"), record, default=str)
    with atomic_open(stem.with_suffix(".csv"), "w", newline="") as f:
        keys = [k for k in rows[0] if k != "params"] if rows else []
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    header = (
        f"Command: `{info['command']}`  \nDevice: {info['device']}, backend {args.backend}, "
        f"sparge {info['versions']['sparge_git']}, torch {info['versions']['torch']}\n\n"
    )
    write_text_atomic(stem.with_suffix(".md"), header + text + "\n")
    print(text)
    print(f"wrote {stem.with_suffix('.json')}, .csv and .md (repository root {ROOT})")
    return record


if __name__ == "__main__":
    main()
