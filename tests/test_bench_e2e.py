"""``scripts/bench_e2e.py``: refuses to run on a CPU without --smoke (exit 2, before any work), checks its
arguments, and in the smoke mode writes the CSV and log of every part (tiny models, reference kernels;
the numbers measure nothing: this checks the script)."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_e2e.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cpu_without_smoke_exits_2_before_work(bench, tmp_path, capsys):
    out = tmp_path / "x.csv"
    assert bench.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--smoke" in err
    assert not out.exists()


@pytest.mark.parametrize("argv,fragment", [
    (["--smoke", "--topk", "1.5"], "--topk budgets must be in"),
    (["--smoke", "--parts", "llama70b"], "--parts takes"),
    (["--smoke", "--lengths", "0"], "positive token counts"),
    (["--smoke", "--fast-quant", "fp4"], "--fast-quant must be one of"),
])
def test_bad_arguments_exit_2(bench, tmp_path, capsys, argv, fragment):
    assert bench.main([*argv, "--out", str(tmp_path / "x.csv")]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_smoke_writes_the_csv_and_the_log(bench, tmp_path):
    out = tmp_path / "e2e" / "smoke.csv"
    argv = ["--smoke", "--lengths", "256", "--smollm2-lengths", "256", "--topk", "0.3", "--out", str(out)]
    assert bench.main(argv) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["gpu", "model", "n", "method", "sparsity", "ms", "speedup", "ideal_speedup"]
    methods = [(r["model"], r["method"]) for r in rows]
    assert methods == [("tiny-llama-smoke", "dense"), ("tiny-llama-smoke", "sparge-topk0.3"),
                       ("tiny-llama-smoke", "sparge-topk0.3-fast"), ("tiny-qwen2-smoke", "dense"),
                       ("tiny-qwen2-smoke", "sparge-config"), ("tiny-qwen2-smoke", "sparge-config-fast")]
    for r in rows:
        assert r["n"] == "256" and float(r["ms"]) > 0
        if r["method"] == "dense":
            assert float(r["speedup"]) == 1.0 and float(r["sparsity"]) == 0.0
        else:
            assert 0 < float(r["sparsity"]) < 1 and float(r["ideal_speedup"]) >= 1.0
    log = out.with_suffix(".log").read_text()
    assert "bench_e2e.py --smoke" in log and '"torch"' in log and "random weights" in log
    assert "attention" in log and "ideal ttft" in log
