"""The paper's Table 1 for one model, from committed result files, every number with its confidence.

Rows: dense; sparge calibrated at the default bound; sparge calibrated at a tighter bound; sparge with
``local_blocks`` 1 calibrated at the default bound; sparge-topk,
MInference and FlexPrefill, each rival at the per-layer density of the default calibrated config
(``--density matched``). Columns: sparsity; perplexity at 8K / 16K / 32K on each corpus; NIAH; RULER;
TTFT speed-up over dense; calibration time. A cell with no result file is ``n/a``; a cell that does
not apply (calibration time of a tuning-free rival, dense's speed-up) is ``–``. No number is made
up: every one is read from a file, and the files are listed under the table.

Where the files are (``results/<suite>/<group>/<label>.json``, written by ``python -m evals``):

- group ``<model>``: dense, ``sparge`` (the default bound) and the rivals ``<method>@matched``, for
  ``ppl`` (the first corpus), ``niah``, ``ruler`` and ``speed``;
- group ``<model>-tight``: ``sparge`` calibrated at the tighter bound (same suites);
- group ``<model>-local1``: ``sparge`` calibrated at the default bound with ``local_blocks`` 1 (the
  predictor also keeps the key block just before each query block's diagonal; same suites);
- group ``<model>-ppl-<corpus>``: ``ppl`` of every row on another corpus;
- ``results/calibration/*.json``: the calibrated configs; a row's config is found by the
  ``config_sha256`` its result files carry, and gives the bound and the calibration seconds.

Confidence: perplexity gets a bootstrap interval over its windows when the file has per-window NLLs
(``window_nll@<len>``), NIAH and RULER (mean item score in [0, 1]) over their items, the speed-up
over the repeated prefill timings
(``prefill_ms_all``); every cell names its item count. Fewer than two items: the value and its count,
no interval.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bootstrap import Interval, accuracy_ci, paired_ppl_ratio_ci, perplexity_ci, speedup_ci

DEFAULT_LENGTHS = (8192, 16384, 32768)
NA = "n/a"
NOT_APPLICABLE = "–"


@dataclass(frozen=True)
class Row:
    """One table row: where its result files are and how it is named."""

    name: str
    group: str
    label: str
    calibrated: bool = False


def default_rows(model: str) -> list[Row]:
    return [
        Row("dense", model, "dense"),
        Row("sparge (default bound)", model, "sparge", calibrated=True),
        Row("sparge (tighter bound)", f"{model}-tight", "sparge", calibrated=True),
        Row("sparge + local_blocks 1 (default bound, beyond the paper)", f"{model}-local1", "sparge",
            calibrated=True),
        Row("sparge-topk @ matched", model, "sparge-topk@matched"),
        Row("MInference @ matched", model, "minference@matched"),
        Row("FlexPrefill @ matched", model, "flexprefill@matched"),
        Row("sparge-budget @ matched (beyond the paper)", model, "sparge-budget@matched"),
    ]


# --------------------------------------------------------------------------------------------
# reading the files
# --------------------------------------------------------------------------------------------
def _read(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def find_result(root: Path, suite: str, group: str, label: str) -> tuple[dict[str, Any], Path] | None:
    """The result file of ``label`` in ``results/<suite>/<group>/`` (matched on its ``label`` field)."""
    folder = root / suite / group
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        doc = _read(path)
        if doc and doc.get("suite") == suite and doc.get("label") == label:
            return doc, path
    return None


def corpus_groups(root: Path, model: str) -> dict[str, str]:
    """``{corpus: group}`` of the perplexity results: the main group's corpus first, then every
    ``<model>-ppl-<corpus>`` group."""
    out: dict[str, str] = {}
    candidates = [model] + sorted(p.name for p in (root / "ppl").glob(f"{model}-ppl-*") if p.is_dir())
    for group in candidates:
        for path in sorted((root / "ppl" / group).glob("*.json")):
            doc = _read(path)
            corpus = ((doc or {}).get("data") or {}).get("corpus")
            if corpus and corpus not in out:
                out[corpus] = group
                break
    return out


def configs_by_sha(root: Path) -> dict[str, tuple[dict[str, Any], Path]]:
    """Every calibrated config under ``results/calibration/``, by the sha256 of its bytes."""
    out = {}
    folder = root / "calibration"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        doc = _read(path)
        if doc and doc.get("format") == "sparge-config":
            out[hashlib.sha256(path.read_bytes()).hexdigest()] = (doc, path)
    return out


# --------------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------------
def _num(x: float, digits: int) -> str:
    return f"{x:.{digits}f}"


def fmt_interval(
    ci: Interval | None, value: float | None, n: int | None, digits: int = 2, suffix: str = ""
) -> str:
    """``12.34 [12.01, 12.70] (n=4)``; without an interval ``12.34 (n=1)``; no value: ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    count = f" (n={n})" if n is not None else ""
    if ci is None:
        return f"{_num(value, digits)}{suffix}{count}"
    return f"{_num(value, digits)}{suffix} [{_num(ci.low, digits)}, {_num(ci.high, digits)}]{count}"


def _same_windows(doc: dict[str, Any], dense: dict[str, Any], length: int) -> bool:
    """Both results scored the same windows of the same text (so their NLLs pair up)."""
    a = ((doc.get("data") or {}).get("windows") or {}).get(str(length))
    b = ((dense.get("data") or {}).get("windows") or {}).get(str(length))
    same_text = (doc.get("data") or {}).get("sha256") == (dense.get("data") or {}).get("sha256")
    return bool(a) and a == b and same_text


def ppl_cell(doc: dict[str, Any] | None, length: int, dense: dict[str, Any] | None = None) -> str:
    """Perplexity with its bootstrap interval over windows; with ``dense`` scored on the same windows,
    also the change against dense with a paired interval (``+1.1% [+0.7, +1.3]``); for a sparse
    method, the block sparsity it reached at that length."""
    if doc is None:
        return NA
    scores = doc.get("scores") or {}
    value = scores.get(f"ppl@{length}")
    if value is None:
        return NA
    windows = scores.get(f"window_nll@{length}")
    count = ((doc.get("data") or {}).get("windows") or {}).get(str(length), {}).get("count")
    cell = (fmt_interval(perplexity_ci(windows), float(value), len(windows)) if windows
            else fmt_interval(None, float(value), count))
    dense_windows = ((dense or {}).get("scores") or {}).get(f"window_nll@{length}")
    if windows and dense is not None and dense_windows and len(dense_windows) == len(windows) \
            and _same_windows(doc, dense, length):
        ratio = paired_ppl_ratio_ci(windows, dense_windows)
        if ratio is not None:
            pct = lambda r: f"{100 * (r - 1):+.1f}"  # noqa: E731
            cell += f"; {pct(ratio.estimate)}% [{pct(ratio.low)}, {pct(ratio.high)}] vs dense"
    spars = ((doc.get("sparsity") or {}).get(str(length)) or {}).get("mean")
    if doc.get("label") != "dense" and isinstance(spars, (int, float)):
        cell += f"; sparsity {spars:.2f}"  # measured at this length: it grows with the length
    return cell


def item_scores(doc: dict[str, Any]) -> list[float]:
    """Per-item scores of a NIAH / RULER-style result (``items`` or ``scores.samples``)."""
    items = doc.get("items") or (doc.get("scores") or {}).get("samples") or []
    out = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("score"), (int, float)):
            out.append(float(item["score"]))
    return out


def accuracy_cell(doc: dict[str, Any] | None, key_options: tuple[str, ...] = ("accuracy", "average")) -> str:
    """Mean item score with a bootstrap interval over the items. With per-item scores the cell is their
    mean (in [0, 1]); without them, the file's headline number and its count, no interval."""
    if doc is None:
        return NA
    items = item_scores(doc)
    if items:
        return fmt_interval(accuracy_ci(items), sum(items) / len(items), len(items), digits=3)
    scores = doc.get("scores") or {}
    value = next((scores[k] for k in key_options if isinstance(scores.get(k), (int, float))), None)
    if value is None:
        return NA
    n = scores.get("n")
    if isinstance(n, dict):
        n = sum(v for v in n.values() if isinstance(v, int))
    data = doc.get("data") or {}
    if n is None and all(k in data for k in ("tasks", "lengths", "per_task")):  # a RULER run: task means only
        n = len(data["tasks"]) * len(data["lengths"]) * int(data["per_task"])
    return fmt_interval(None, float(value), n if isinstance(n, int) else None, digits=3)


def _longest_common(dense: dict, other: dict) -> str | None:
    a = (dense.get("scores") or {}).get("lengths") or {}
    b = (other.get("scores") or {}).get("lengths") or {}
    common = [k for k in a if k in b]
    return max(common, key=int) if common else None


def speedup_cell(dense: dict[str, Any] | None, doc: dict[str, Any] | None) -> tuple[str, str | None]:
    """TTFT (prefill) speed-up over dense at the longest length both measured, and that length."""
    if dense is None or doc is None:
        return NA, None
    length = _longest_common(dense, doc)
    if length is None:
        return NA, None
    a = dense["scores"]["lengths"][length]
    b = doc["scores"]["lengths"][length]
    if not b.get("prefill_ms") or not a.get("prefill_ms"):
        return NA, length
    runs_a, runs_b = a.get("prefill_ms_all") or [], b.get("prefill_ms_all") or []
    value = float(a["prefill_ms"]) / float(b["prefill_ms"])
    ci = speedup_ci(runs_a, runs_b) if runs_a and runs_b else None
    n = min(len(runs_a), len(runs_b)) if runs_a and runs_b else None
    cell = fmt_interval(ci, value, n, digits=2, suffix="x")
    graphs = b.get("prefill_graphs")
    if isinstance(graphs, dict) and graphs.get("failures") and not graphs.get("replays"):
        cell += "; eager (CUDA-graph capture failed)"
    return cell, length


def sparsity_value(doc: dict[str, Any] | None) -> float | None:
    """Mean sparsity over layers at the longest perplexity length of a ppl result."""
    spars = (doc or {}).get("sparsity") or {}
    lengths = [k for k in spars if k.isdigit() and isinstance(spars[k], dict)]
    if not lengths:
        return None
    return spars[max(lengths, key=int)].get("mean")


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------
@dataclass
class Table1:
    model: str
    header: list[str]
    rows: list[list[str]]
    sources: list[str]
    notes: list[str]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "| " + " | ".join("---" for _ in self.header) + " |"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        parts = [f"## Table 1: {self.model}", "", *lines, ""]
        parts += [f"- {n}" for n in self.notes]
        if self.sources:
            parts += ["", "Files:", *[f"- `{s}`" for s in self.sources]]
        return "\n".join(parts) + "\n"


def build_table1(
    root: str | Path,
    model: str,
    *,
    lengths: tuple[int, ...] = DEFAULT_LENGTHS,
    rows: list[Row] | None = None,
    max_context: int | None = None,
) -> Table1:
    """Table 1 for ``model`` from the files under ``root`` (``results/``)."""
    root = Path(root)
    rows = rows or default_rows(model)
    corpora = corpus_groups(root, model)
    configs = configs_by_sha(root)
    header = ["method", "sparsity"]
    header += [f"PPL {c} {L // 1024}K" for c in corpora for L in lengths] or [
        f"PPL {L // 1024}K" for L in lengths
    ]
    header += ["NIAH", "RULER", "TTFT speed-up", "calibration"]
    sources: set[str] = set()
    speed_lengths: set[str] = set()
    devices: set[str] = set()
    dense_ppl = {group: find_result(root, "ppl", group, "dense") for group in corpora.values()}
    dense_speed_found = find_result(root, "speed", model, "dense")
    dense_speed = dense_speed_found[0] if dense_speed_found else None
    table_rows = []

    def use(found):
        if found is None:
            return None
        doc, path = found
        sources.add(str(path.relative_to(root.parent) if root.parent in path.parents else path))
        if doc.get("device"):
            devices.add(str(doc["device"]))
        return doc

    for row in rows:
        cells = [row.name]
        first_ppl = None
        ppl_cells = []
        for corpus, group in corpora.items():
            g = row.group if group == model else _corpus_group(row.group, model, group)
            doc = use(find_result(root, "ppl", g, row.label))
            dense_found = dense_ppl[group] if row.label != "dense" else None
            first_ppl = first_ppl or doc
            for L in lengths:
                cell = ppl_cell(doc, L, dense_found[0] if dense_found else None)
                if cell == NA and max_context and L > max_context:
                    cell = f"{NA} (> {max_context // 1024}K context)"
                ppl_cells.append(cell)
        if not corpora:
            ppl_cells = [NA] * len(lengths)
        spars = 0.0 if row.label == "dense" and first_ppl is not None else sparsity_value(first_ppl)
        cells.append(NA if spars is None else f"{spars:.2f}")
        cells += ppl_cells
        cells.append(accuracy_cell(use(find_result(root, "niah", row.group, row.label))))
        cells.append(accuracy_cell(use(find_result(root, "ruler", row.group, row.label))))
        if row.label == "dense":
            cells.append(NOT_APPLICABLE if dense_speed else NA)
            use(dense_speed_found)
        else:
            speed_doc = use(find_result(root, "speed", row.group, row.label))
            cell, length = speedup_cell(dense_speed, speed_doc)
            if length:
                speed_lengths.add(length)
            cells.append(cell)
        cells.append(
            _calibration_cell(row, first_ppl, configs, sources, root) if row.calibrated else NOT_APPLICABLE
        )
        table_rows.append(cells)

    notes = [
        "Cells: value [95% percentile-bootstrap interval] (n = items: perplexity windows, NIAH / RULER "
        "items, prefill timing repeats). `n/a`: no result file yet; `–`: does not apply.",
        "Perplexity cells of sparse rows also give the change against dense on the same windows, with a "
        "paired bootstrap interval (windows resampled in pairs, so the spread between windows cancels).",
        "Perplexity corpora are substitutes (pydoc: Python documentation, WikiText-like; austen: PG-19-like "
        "prose); compare methods, not absolute values with the paper.",
        "Rivals run at the per-layer density the default calibrated config reaches on the calibration "
        "capture (`--density matched`); all methods share one block-sparse kernel.",
        "Sparsity: block sparsity (the paper's definition) at the longest perplexity length of the first "
        "corpus; each perplexity cell of a sparse row gives the sparsity reached at its own length.",
        "RULER: the mean of lm-eval's per-task scores over its tasks and lengths; n counts the items, and "
        "there is no interval where lm-eval reports only task means.",
    ]
    if speed_lengths:
        notes.append(
            "TTFT speed-up: dense prefill time / method prefill time at "
            f"{', '.join(sorted(speed_lengths, key=int))}"
            " tokens (medians)."
        )
    if devices:
        notes.append(f"Devices: {', '.join(sorted(devices))}.")
    return Table1(model, header, table_rows, sorted(sources), notes)


def _corpus_group(row_group: str, model: str, corpus_group: str) -> str:
    """The group of ``row_group``'s results on another corpus: ``<model>-ppl-<c>`` for the main group,
    ``<model>-tight-ppl-<c>`` for the tight one."""
    suffix = corpus_group[len(model) :]  # "-ppl-<corpus>"
    return row_group + suffix


def _calibration_cell(row: Row, ppl_doc, configs, sources: set[str], root: Path) -> str:
    sha = (ppl_doc or {}).get("config_sha256")
    if not sha or sha not in configs:
        return NA
    doc, path = configs[sha]
    sources.add(str(path.relative_to(root.parent) if root.parent in path.parents else path))
    cal = doc.get("calibration") or {}
    seconds = cal.get("seconds")
    bound = f"l1 {doc.get('l1')}"
    if seconds is None:
        return f"{bound}, time {NA}"
    where = f"{cal.get('samples')} x {cal.get('seq_len')}, {cal.get('device', '?')}"
    return f"{bound}, {float(seconds):.0f} s ({where})"


def write_table1(root: str | Path, model: str, out: str | Path | None = None, **kw) -> Path:
    """Build the table and write it to ``out`` (default ``<root>/paper/table1-<model>.md``)."""
    from sparge_core.params import write_text_atomic

    table = build_table1(root, model, **kw)
    path = Path(out) if out else Path(root) / "paper" / f"table1-{model}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "# Paper Table 1 layout (generated by `make paper`)\n\n" + table.markdown())
    return path
