"""Summarise ``rivals_attribution.py`` outputs into markdown tables (per layer and overall).

python scripts/studies/rivals_summary.py --attribution A.csv [B.csv ...] [--ppl P.json ...] --out SUMMARY.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from calibrate.cli import HelpFormatter  # noqa: E402
from sparge_core.atomic import write_text_atomic  # noqa: E402


def layer_table(df: pd.DataFrame, value: str) -> pd.DataFrame:
    """Mean over windows of a per-layer value (``layer_l1``, ``layer_density``), layers x maps."""
    per_layer = df.drop_duplicates(["layer", "window", "map"])
    return per_layer.pivot_table(index="layer", columns="map", values=value, aggfunc="mean")


def attribution_summary(df: pd.DataFrame, maps: list[str]) -> list[str]:
    lines = []
    l1 = layer_table(df, "layer_l1")[maps]
    dens = layer_table(df, "layer_density")[maps]
    order = l1.mean().sort_values().index.tolist()
    lines += [
        "Mean relative L1 of the layer output (all heads) over layers and windows, and the density "
        "reached (target: the calibrated config's density on each window):",
        "",
        "| map | mean L1 | median L1 | worst layer L1 | layers where it beats minference | mean density |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in order:
        wins = int((l1[m] < l1["minference"]).sum()) if "minference" in l1 else 0
        lines.append(
            f"| {m} | {l1[m].mean():.4f} | {l1[m].median():.4f} | {l1[m].max():.4f} | {wins}/{len(l1)} | "
            f"{dens[m].mean():.3f} |"
        )
    lines += [
        "",
        "Per layer (mean over windows):",
        "",
        "| layer | target | " + " | ".join(maps) + " |",
        "| --- | --- | " + " | ".join("---" for _ in maps) + " |",
    ]
    target = df.drop_duplicates(["layer", "window"]).groupby("layer")["target"].mean()
    for layer, row in l1.iterrows():
        lines.append(f"| {layer} | {target[layer]:.3f} | " + " | ".join(f"{row[m]:.4f}" for m in maps) + " |")
    if "mass_only_this" in df:
        heads = df[df["map"].isin(["sparge-cal", "sparge-keys", "top-keys-layer", "top-true-layer"])]
        g = heads.groupby("map")[
            [
                "blocks_only_this",
                "blocks_only_minference",
                "mass_only_this",
                "mass_only_minference",
                "kept_mass",
            ]
        ].mean()
        lines += [
            "",
            "Against minference, per head (means over layers, windows, heads): blocks one map keeps "
            "that the other drops, and the true attention mass per query block in them:",
            "",
            "| map | blocks only in map | blocks only in minference | mass only in map "
            "| mass only in minference | mass kept by map |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        mi = df[df["map"] == "minference"]["kept_mass"].mean()
        for m, r in g.iterrows():
            lines.append(
                f"| {m} | {r.blocks_only_this:.1f} | {r.blocks_only_minference:.1f} | "
                f"{r.mass_only_this:.4f} | {r.mass_only_minference:.4f} | {r.kept_mass:.4f} |"
            )
        lines.append(f"| minference | | | | | {mi:.4f} |")
        # per-head density allocation: how unevenly each map spreads the layer's density
        spread = df.groupby(["map", "layer", "window"])["density"].std().groupby("map").mean()
        lines += [
            "",
            "Spread of the per-head density within a layer (std over heads, mean over layers and "
            "windows): " + ", ".join(f"{m} {spread[m]:.3f}" for m in maps if m in spread),
        ]
    return lines


def ppl_summary(doc: dict) -> list[str]:
    lines = [f"Perplexity (`{doc.get('command', '')}`):", ""]
    for data, entry in doc["results"].items():
        dense = entry["maps"]["dense"]["ppl"]
        lines += [
            f"**{data}** (windows starting at {entry['starts']}; dense {dense:.3f})",
            "",
            "| map | ppl | vs dense | sparsity (QK) |",
            "| --- | --- | --- | --- |",
        ]
        for name, r in entry["maps"].items():
            sp = r.get("qk_sparsity")
            lines.append(
                f"| {name} | {r['ppl']:.3f} | {100 * (r['ppl'] / dense - 1):+.2f}% | "
                f"{'' if sp is None else f'{sp:.3f}'} |"
            )
        lines.append("")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--attribution", nargs="*", default=[])
    ap.add_argument("--ppl", nargs="*", default=[])
    ap.add_argument(
        "--maps",
        nargs="+",
        default=[
            "sparge-cal",
            "sparge-pooled",
            "sparge-keys",
            "minference",
            "flexprefill",
            "top-pooled-row",
            "top-keys-row",
            "top-keys-head",
            "top-keys-layer",
            "top-keys-layer+vs",
            "top-true-row",
            "top-true-head",
            "top-true-layer",
        ],
    )
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    lines = ["# rivals at matched density: summary (generated by scripts/studies/rivals_summary.py)", ""]
    for path in args.attribution:
        df = pd.read_csv(path)
        maps = [m for m in args.maps if m in set(df["map"])]
        lines += [
            f"## {Path(path).name}: {df['layer'].nunique()} layers x {df['window'].nunique()} windows",
            "",
        ]
        lines += attribution_summary(df, maps) + [""]
    for path in args.ppl:
        lines += [f"## perplexity ({Path(path).name})", ""] + ppl_summary(json.loads(Path(path).read_text()))
    write_text_atomic(Path(args.out), "\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
