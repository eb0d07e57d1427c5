"""evals.paper_table: the Table 1 builder on fixture result files (tests/fixtures/paper_results)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from evals import paper_table as P

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "paper_results"


def _table(tmp_path=None, **kw):
    root = FIXTURES
    if tmp_path is not None:
        root = tmp_path / "results"
        shutil.copytree(FIXTURES, root)
    return P.build_table1(root, "toy", **kw), root


def _cell(table, row_name, column):
    row = next(r for r in table.rows if r[0] == row_name)
    return row[table.header.index(column)]


def test_layout_rows_and_columns():
    table, _ = _table()
    assert [r[0] for r in table.rows] == [
        "dense",
        "sparge (default bound)",
        "sparge (tighter bound)",
        "sparge + local_blocks 1 (default bound, beyond the paper)",
        "sparge-topk @ matched",
        "MInference @ matched",
        "FlexPrefill @ matched",
        "sparge-budget @ matched (beyond the paper)",
    ]
    assert table.header == [
        "method",
        "sparsity",
        "PPL pydoc 8K",
        "PPL pydoc 16K",
        "PPL pydoc 32K",
        "PPL austen 8K",
        "PPL austen 16K",
        "PPL austen 32K",
        "NIAH",
        "RULER",
        "TTFT speed-up",
        "calibration",
    ]


def test_perplexity_cells_carry_bootstrap_intervals_and_counts():
    table, _ = _table()
    cell, paired, spars = _cell(table, "sparge (default bound)", "PPL pydoc 8K").split("; ")
    assert spars == "sparsity 0.61"  # the sparsity this method reached at this length
    value = math.exp(sum([2.22, 2.27, 2.31, 2.20]) / 4)
    assert cell.startswith(f"{value:.2f} [") and cell.endswith("(n=4)")
    # the change against dense on the same windows: exp(mean NLL difference), paired interval
    assert paired.startswith(f"{100 * (math.exp(0.0175) - 1):+.1f}% [") and paired.endswith("] vs dense")
    low, high = (float(x) for x in paired.split("[")[1].split("]")[0].split(", "))
    assert 100 * (math.exp(0.01) - 1) - 0.05 <= low <= 1.8 <= high <= 100 * (math.exp(0.02) - 1) + 0.05
    assert "vs dense" not in _cell(table, "dense", "PPL pydoc 8K")
    assert "sparsity" not in _cell(table, "dense", "PPL pydoc 8K")
    low, high = (float(x) for x in cell.split("[")[1].split("]")[0].split(", "))
    assert math.exp(2.20) - 0.01 <= low < value < high <= math.exp(2.31) + 0.01
    # a file without per-window NLLs: the value and its window count, no interval
    assert (
        _cell(table, "MInference @ matched", "PPL pydoc 8K")
        == f"{math.exp(sum([2.21, 2.26, 2.30, 2.19]) / 4):.2f} (n=4); sparsity 0.63"
    )
    # the second corpus comes from <model>-ppl-<corpus>
    assert _cell(table, "sparge (default bound)", "PPL austen 8K").split("; ")[0].endswith("(n=2)")


def test_no_paired_change_when_the_windows_differ(tmp_path):
    import json

    _, root = _table(tmp_path)
    path = root / "ppl" / "toy" / "dense.json"
    doc = json.loads(path.read_text())
    doc["data"]["windows"]["8192"]["starts"] = [0, 1, 2, 3]  # other windows than the sparse row scored
    path.write_text(json.dumps(doc))
    table = P.build_table1(root, "toy")
    assert "vs dense" not in _cell(table, "sparge (default bound)", "PPL pydoc 8K")
    assert "vs dense" in _cell(table, "sparge (default bound)", "PPL pydoc 16K")


def test_missing_results_are_na_never_numbers():
    table, _ = _table()
    for row in ("sparge-topk @ matched", "FlexPrefill @ matched"):
        assert all(c == P.NA for c in next(r for r in table.rows if r[0] == row)[1:-1])
    assert _cell(table, "dense", "RULER") == P.NA
    assert _cell(table, "dense", "PPL pydoc 32K") == P.NA
    assert _cell(table, "sparge (tighter bound)", "PPL austen 8K") == P.NA
    beyond, _ = _table(max_context=8192)
    assert _cell(beyond, "dense", "PPL pydoc 16K").startswith("8.52 [")  # a result is shown even beyond
    assert _cell(beyond, "dense", "PPL pydoc 32K") == "n/a (> 8K context)"


def test_niah_speedup_sparsity_and_calibration():
    table, _ = _table()
    assert _cell(table, "sparge (default bound)", "NIAH").startswith("0.800 [") and _cell(
        table, "sparge (default bound)", "NIAH"
    ).endswith("(n=10)")
    assert _cell(table, "dense", "TTFT speed-up") == P.NOT_APPLICABLE
    speed = _cell(table, "sparge (default bound)", "TTFT speed-up")
    assert speed.startswith(f"{40.2 / 20.1:.2f}x [") and speed.endswith("(n=5)")
    assert _cell(table, "MInference @ matched", "TTFT speed-up").startswith(f"{40.2 / 50.5:.2f}x")
    assert _cell(table, "dense", "sparsity") == "0.00"
    assert _cell(table, "sparge (default bound)", "sparsity") == "0.61"
    assert _cell(table, "sparge (tighter bound)", "sparsity") == "0.52"
    assert _cell(table, "sparge (default bound)", "calibration") == "l1 0.08, 413 s (5 x 8192, NVIDIA H200)"
    assert _cell(table, "sparge (tighter bound)", "calibration").startswith("l1 0.03, 655 s")
    assert _cell(table, "MInference @ matched", "calibration") == P.NOT_APPLICABLE


def test_calibration_is_na_when_the_config_is_not_committed(tmp_path):
    table, root = _table(tmp_path)
    (root / "calibration" / "toy-tight-h200.json").unlink()
    table = P.build_table1(root, "toy")
    assert _cell(table, "sparge (tighter bound)", "calibration") == P.NA


def test_write_table1_markdown_lists_its_files(tmp_path):
    _, root = _table(tmp_path)
    path = P.write_table1(root, "toy")
    assert path == root / "paper" / "table1-toy.md"
    text = path.read_text()
    assert text.count("\n| ") >= 7 and "## Table 1: toy" in text
    assert "`results/ppl/toy/sparge.json`" in text and "`results/calibration/toy-h200.json`" in text
    assert "Devices: NVIDIA H200." in text


def test_an_empty_results_folder_gives_an_all_na_table(tmp_path):
    table = P.build_table1(tmp_path, "nothing")
    assert table.header[2:5] == ["PPL 8K", "PPL 16K", "PPL 32K"]
    assert all(c in (P.NA, P.NOT_APPLICABLE) for r in table.rows for c in r[1:])


def test_make_paper_script_rebuilds_the_table_without_measuring(tmp_path):
    import subprocess
    import sys

    _, root = _table(tmp_path)
    script = Path(__file__).resolve().parents[1] / "scripts" / "paper.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--model",
            "toy",
            "--out",
            str(root),
            "--runs",
            str(tmp_path / "runs"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (root / "paper" / "table1-toy.md").is_file() and not (tmp_path / "runs").exists()
    bad = subprocess.run(
        [sys.executable, str(script), "--model", "toy", "--tight-l1", "0.1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "--tight-l1" in bad.stderr


def test_ruler_cell_counts_items_from_a_task_mean_result():
    doc = {"scores": {"niah_single_1@4096": 1.0, "ruler_vt@4096": 0.25, "average@4096": 0.625, "average": 0.625},
           "data": {"tasks": ["niah_single_1", "ruler_vt"], "lengths": [4096], "per_task": 10}}
    assert P.accuracy_cell(doc) == "0.625 (n=20)"  # task means only: a count, no interval
    doc["data"]["lengths"] = [4096, 8192]
    assert P.accuracy_cell(doc) == "0.625 (n=40)"
    assert P.accuracy_cell({"scores": {"average": 0.5}}) == "0.500"  # nothing to count


def test_ttft_cell_says_eager_when_every_graph_capture_failed():
    def doc(ms, graphs=None):
        row = {"prefill_ms": ms, "prefill_ms_all": [ms] * 3}
        if graphs is not None:
            row["prefill_graphs"] = graphs
        return {"scores": {"lengths": {"8192": row}}}

    dense = doc(20.0)
    cell, length = P.speedup_cell(dense, doc(10.0, {"captures": 0, "replays": 0, "failures": 23}))
    assert length == "8192" and cell.startswith("2.00x") and cell.endswith("; eager (CUDA-graph capture failed)")
    assert "eager" not in P.speedup_cell(dense, doc(10.0, {"captures": 23, "replays": 92, "failures": 0}))[0]
    assert "eager" not in P.speedup_cell(dense, doc(10.0))[0]  # older files without the record
