"""``results/`` -> ``results/TABLES.md``: the paper-style tables, from the committed result files.

Tables:
1. Per LLM, the paper's Table 1 layout: method (sparsity) | attention TOPS | perplexity |
   long-context score | NIAH, from ``ppl``, ``speed``, ``longctx`` and ``niah`` results. Substitutes
   are labelled as such; the paper's Llama-3.1 numbers are printed beside them for reference only.
2. The kernel benchmark (``results/kernel/<gpu>.csv``): speed-up over cuDNN SDPA at N=32K, D=128.
3. Calibration summaries (``results/calibration/*.json``) and the rivals' L1 tables
   (``results/rivals/*.md``), included as they are.
4. Image / video results (``results/t2i``, ``results/t2v``), if present.

Every number comes from a file; the file and its device are named under each table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PAPER_TABLE1_LLAMA = """| attention (sparsity) | TOPS | WikiText PPL | LongBench | InfiniteBench | NIAH |
| --- | --- | --- | --- | --- | --- |
| Full | 156.9 | 6.013 | 38.682 | 0.6594 | 0.907 |
| MInference (0.5) | 140.1 | 10.631 | 28.860 | 0.5152 | 0.832 |
| FlexPrefill (0.5) | 240.6 | 6.476 | 38.334 | 0.6460 | 0.858 |
| MInference (0.3) | 115.7 | 6.705 | 34.074 | 0.6532 | 0.870 |
| FlexPrefill (0.42) | 206.9 | 6.067 | 38.334 | 0.6581 | 0.878 |
| SpargeAttn (0.54) | 708.1 | 6.020 | 39.058 | 0.6638 | 0.909 |"""

ORDER = ["dense", "sparge", "sparge-topk", "minference", "flexprefill"]


def load_results(root: str | Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(Path(root).glob("*/*/*.json")):
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict) and "suite" in doc and "label" in doc:
            doc["_path"] = str(path)
            doc["_group"] = path.parent.name  # results/<suite>/<group>/: a model, or a model and a setting
            out.append(doc)
    return out


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _order_key(label: str) -> tuple:
    base = label.split("@")[0]
    return (ORDER.index(base) if base in ORDER else len(ORDER), label)


def table1(results: list[dict], model: str) -> str | None:
    """The Table 1 layout for one model, or None when it has no text results."""
    import pandas as pd

    rows: dict[str, dict[str, Any]] = {}
    devices = set()
    for r in results:
        if r["_group"] != model or r["suite"] not in ("ppl", "niah", "longctx", "ruler", "speed"):
            continue
        row = rows.setdefault(r["label"], {"label": r["label"]})
        devices.add(r.get("device", "?"))
        scores = r.get("scores", {})
        if r["suite"] == "ppl":
            for key, value in scores.items():
                if key.startswith("ppl@"):
                    row[f"PPL {key[4:]}"] = value
            spars = r.get("sparsity", {})
            if spars:
                longest = max(spars, key=lambda k: int(k))
                row["sparsity"] = spars[longest].get("mean")
        elif r["suite"] == "niah":
            row["NIAH"] = scores.get("accuracy")
        elif r["suite"] == "longctx":
            row["long-ctx"] = scores.get("average")
        elif r["suite"] == "ruler":
            row["RULER"] = scores.get("average")
        elif r["suite"] == "speed":
            lengths = scores.get("lengths", {})
            if lengths:
                longest = max(lengths, key=lambda k: int(k))
                row[f"TOPS@{longest}"] = lengths[longest].get("attention_tops")
                row[f"prefill ms@{longest}"] = lengths[longest].get("prefill_ms")
    if not rows:
        return None
    df = pd.DataFrame(sorted(rows.values(), key=lambda r: _order_key(r["label"])))
    df["label"] = [f"{lab} ({_fmt(s, 2)})" if s is not None and s == s else lab
                   for lab, s in zip(df["label"], df.get("sparsity", [None] * len(df)))]
    df = df.drop(columns=[c for c in ("sparsity",) if c in df.columns]).rename(columns={"label": "method (sparsity)"})
    cols = ["method (sparsity)"] + sorted([c for c in df.columns if c.startswith("TOPS")]) + \
        sorted([c for c in df.columns if c.startswith("PPL")], key=lambda c: int(c.split()[1])) + \
        [c for c in ("long-ctx", "RULER", "NIAH") if c in df.columns] + \
        [c for c in df.columns if c.startswith("prefill")]
    df = df[[c for c in cols if c in df.columns]]
    body = markdown_table(list(df.columns), [[row[c] for c in df.columns] for _, row in df.iterrows()])
    ruler = "RULER: lm-eval's offline RULER tasks, mean accuracy; " if "RULER" in df.columns else ""
    note = (f"\n\nDevice: {', '.join(sorted(devices))}. PPL: perplexity on the corpus named in each result file "
            f"(a WikiText substitute); long-ctx: generated RULER-style tasks (a LongBench substitute); {ruler}NIAH: "
            f"generated passkey / multi-key retrieval. Sparsity: mean over layers at the longest PPL length.\n")
    return body + note


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table (``DataFrame.to_markdown``, i.e. tabulate's pipe format) of
    cells formatted by ``_fmt``; tabulate's own number parsing is off so every cell prints as given."""
    import pandas as pd

    frame = pd.DataFrame([[_fmt(cell) for cell in row] for row in rows], columns=columns)
    return frame.to_markdown(index=False, tablefmt="github", disable_numparse=True)


#: the columns of a scripts/bench_kernel.py CSV, the only kind the kernel table reads
BENCH_COLUMNS = {"n", "d", "heads", "causal", "method", "density", "ms"}


def kernel_table(root: Path) -> str | None:
    import pandas as pd

    parts = []
    for csv in sorted((root / "kernel").glob("*.csv")):
        if csv.name.startswith(("accuracy", "tune")):
            continue
        df = pd.read_csv(csv)
        if not BENCH_COLUMNS <= set(df.columns):  # another kind of CSV (assembly report, a study)
            continue
        if "mask" not in df.columns:
            df["mask"] = "random"
        sel = df[(df.n == df.n.max()) & (df.d == 128)]
        if sel.empty:
            continue
        title = (f"**{csv.stem}** (`{csv.relative_to(root.parent)}`), N={int(df.n.max())}, D=128, "
                 f"H={int(df.heads.iloc[0])}, speed-up over sdpa-cudnn in the same run:")
        rows = []
        for causal, grp in sel.groupby("causal"):
            cudnn = grp[grp.method == "sdpa-cudnn"].ms.min()
            for dens in sorted(grp[(grp["mask"] == "random")].density.unique(), reverse=True):
                g = grp[(grp["mask"] == "random") & (grp.density == dens)]

                def ratio(m, g=g):
                    v = g[g.method == m].ms
                    return f"{cudnn / v.iloc[0]:.2f}x" if len(v) else "–"

                rows.append([str(causal), f"{dens:.2f}", ratio("sparge-quant"), ratio("sparge"), ratio("flex")])
        parts.append("\n".join([title, "", markdown_table(["causal", "density", "sparge-quant", "sparge", "flex"],
                                                          rows)]))
    return "\n\n".join(parts) if parts else None


def calibration_table(root: Path) -> str | None:
    """One row per calibrated config: setting, cost, sparsity, and the worst held-out layer L1 (whole
    layer; worst head in brackets) relative to pv_l1 when the config carries held-out results."""
    files = sorted((root / "calibration").glob("*.json")) if (root / "calibration").exists() else []
    lines = []
    for f in files:
        doc = json.loads(f.read_text())
        if doc.get("format") != "sparge-config":
            continue
        cal = doc.get("calibration", {})
        sp = [lc.get("sparsity") or 0 for lc in doc["layers"]]
        held = cal.get("holdout_l1") or {}
        heads = cal.get("holdout_l1_worst_head") or {}
        held_txt = "–"
        if held and heads:
            held_txt = (f"{max(held.values()) / doc['pv_l1']:.2f}x ({max(heads.values()) / doc['pv_l1']:.2f}x), "
                        f"{cal.get('holdout_windows', 1)} win")
        elif held:  # configs written before the per-layer measure: holdout_l1 was the worst head
            held_txt = f"– ({max(held.values()) / doc['pv_l1']:.2f}x), {cal.get('holdout_windows', 1)} win"
        setting = f"{cal.get('estimator', 'pooled')}, margin {cal.get('margin', 1.0)}"
        lines.append([doc["model"]["name"], f"{cal.get('samples')} x {cal.get('seq_len')}", f"{doc['l1']}/{doc['pv_l1']}",
                      setting, f"{sum(sp) / len(sp):.3f}", held_txt, str(cal.get("seconds")), str(cal.get("evaluations")),
                      str(cal.get("device")), f"`{f.relative_to(root.parent)}`"])
    if not lines:
        return None
    return markdown_table(["model", "samples x tokens", "l1/pv_l1", "estimator, margin", "mean sparsity",
                           "held-out worst layer L1 / pv_l1 (worst head)", "search s", "evaluations", "device", "file"],
                          lines)


_IMAGE_COLUMNS = [("sparsity", "sparsity"), ("attention_tops", "attn TOPS"),
                  ("fid_efficientnet_lite0", "FID (EffNet-Lite0)"), ("clip_score", "CLIP score"), ("clipsim", "CLIPSIM"),
                  ("clip_t", "CLIP-T"), ("attribute_all", "attributes (all)"), ("psnr_vs_dense", "PSNR vs dense"),
                  ("ssim_vs_dense", "SSIM vs dense")]


def image_tables(root: Path) -> str | None:
    """t2i / t2v result files (``results/<suite>/<model>/results.json``) and the permutation ablation."""
    parts = []
    for suite in ("t2i", "t2v"):
        folder = root / suite
        for f in sorted(folder.glob("*/results.json")) if folder.exists() else []:
            doc = json.loads(f.read_text())
            methods = doc.get("methods", {})
            rows = []
            for label, m in methods.items():
                if not isinstance(m, dict) or m.get("error"):
                    continue
                metrics = dict(m.get("metrics") or {})
                acc = metrics.pop("attribute_accuracy", {}) or {}
                flat = {**m, **metrics, "attribute_all": acc.get("all")}
                rows.append([label] + [flat.get(k) for k, _ in _IMAGE_COLUMNS])
            if not rows:
                continue
            head = ["method"] + [name for _, name in _IMAGE_COLUMNS]
            parts.append("\n".join([f"**{suite}: {f.parent.name}** (`{f.relative_to(root.parent)}`, "
                                    f"{doc.get('device', '?')})", "", markdown_table(head, rows)]))
        for f in sorted(folder.glob("*/permutation_ablation.json")) if folder.exists() else []:
            doc = json.loads(f.read_text())
            bound = (doc.get("settings") or {}).get("l1_bound")
            rows = [[order, _fmt(r.get("sim_q")), _fmt(r.get("sim_k")), _fmt(r.get("l1"), 4), _fmt(r.get("sparsity"))]
                    for order, r in doc.get("orders", {}).items()]
            parts.append("\n".join([f"**Permutation ablation (paper Table 4) on {f.parent.name}** "
                                    f"(`{f.relative_to(root.parent)}`, {doc.get('device', '?')}, L1 bound {bound})", "",
                                    markdown_table(["order", "Sim-q", "Sim-k", "L1", "sparsity"], rows)]))
    return "\n\n".join(parts) if parts else None


def write_tables(root: str | Path = "results") -> Path:
    """Build ``<root>/TABLES.md`` from every result file under ``root``."""
    from sparge_core.params import write_text_atomic

    root = Path(root)
    results = load_results(root)
    sections = ["# Results tables", "",
                "Generated by `make tables` (`python -m evals tables`) from the files under `results/`. "
                "Substitutes (perplexity corpus, long-context tasks, image metrics) are labelled; they are not "
                "comparable to the paper's absolute numbers, only the dense-vs-sparse differences are.", ""]
    for group in sorted({r["_group"] for r in results}):
        t = table1(results, group)
        if t:
            configs = sorted({r["setting"].get("config") for r in results if r["_group"] == group
                              and r["setting"].get("config")})
            where = f" (calibrated config: {', '.join(f'`{c}`' for c in configs)})" if configs else ""
            sections += [f"## Table 1 layout: {group}{where}", "", t, ""]
    sections += ["## For reference: the paper's Table 1 (Llama-3.1-8B, 128K; not measured here)", "",
                 PAPER_TABLE1_LLAMA, ""]
    k = kernel_table(root)
    if k:
        sections += ["## Kernel", "", k, "", "Plots: `results/kernel/*.png`; notes: `results/kernel/NOTES.md`.", ""]
    c = calibration_table(root)
    if c:
        sections += ["## Calibration", "", c, ""]
    rivals = sorted((root / "rivals").glob("*.md")) if (root / "rivals").exists() else []
    for f in rivals:
        sections += [f"## Rivals at matched density ({f.name})", "", f.read_text().strip(), ""]
    img = image_tables(root)
    if img:
        sections += ["## Image and video (self-trained DiTs; substitute metrics)", "", img, ""]
    path = root / "TABLES.md"
    write_text_atomic(path, "\n".join(sections).rstrip() + "\n")
    return path
