"""CPU checks of the kernel benchmark and tuning scripts' plumbing (never timings): the smoke run's
CSV, the FlexAttention block-map converter, README's kernel table from a CSV, the tuner's case list
and summaries."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

from helpers import random_block_mask
from sparge_core.ops import attention as A
from sparge_core.ops import reference as R

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))


def _main(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    module.main()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is the CPU (interpreter) plumbing check")
def test_bench_smoke_writes_the_issue_columns(tmp_path, monkeypatch):
    import bench_kernel

    out = tmp_path / "smoke.csv"
    _main(bench_kernel, ["--smoke", "--out", str(out), "--n", "200", "--d", "64", "--heads", "2",
                         "--causal", "true", "--densities", "1.0", "0.5",
                         "--methods", "sparge", "sparge-nopv", "sparge-exact",
                         "--exact-configs", "w4s1-select-pointer", "--no-plot"], monkeypatch)
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == bench_kernel.COLUMNS
    assert {r["method"] for r in rows} == {"sparge", "sparge-nopv", "sparge-exact"}
    for r in rows:
        assert float(r["ms"]) > 0 and r["causal"] == "True" and r["n"] == "200"
        # rel_l1 against float64 only at density 1 (and N <= 8192)
        assert (r["rel_l1"] != "") == (float(r["density"]) == 1.0)
        if r["rel_l1"]:
            assert float(r["rel_l1"]) < 0.01
    log = out.with_suffix(".log").read_text()
    assert "--smoke" in log and "torch" in log and "w4s1-select-pointer" in log


def test_bench_rejects_bad_config_names_before_work(monkeypatch, capsys):
    import bench_kernel

    with pytest.raises(SystemExit) as err:
        _main(bench_kernel, ["--smoke", "--out", "/nonexistent/x.csv", "--exact-configs", "fastest"],
              monkeypatch)
    assert err.value.code == 2 and "looks like 'w8s2-select-pointer'" in capsys.readouterr().err


@pytest.mark.parametrize("causal", [False, True])
def test_flex_block_mask_holds_exactly_the_kept_allowed_blocks(causal):
    import bench_kernel

    n = 1024
    mask = random_block_mask(1, 2, n, n, 0.4, seed=3)
    bm = bench_kernel.flex_block_mask(mask, n, causal)
    kept = mask & R.allowed_block_mask(n, n, causal)
    assert torch.equal(bm.to_dense().bool(), kept)
    # partial (token-masked) blocks are only the causal diagonal ones
    partial = torch.zeros_like(kept)
    for h in range(2):
        for qb in range(kept.shape[2]):
            cnt = int(bm.kv_num_blocks[0, h, qb])
            partial[0, h, qb, bm.kv_indices[0, h, qb, :cnt].long()] = True
    last_key = (torch.arange(kept.shape[3]) + 1)[None, :] * R.BLOCK_K - 1
    below = last_key <= torch.arange(kept.shape[2])[:, None] * R.BLOCK_Q  # wholly inside the triangle
    diag = R.causal_diagonal_block_mask(n, n, R.BLOCK_Q, R.BLOCK_K) & ~below
    assert torch.equal(partial, kept & diag) if causal else not partial.any()


@pytest.mark.parametrize("geometry", [(64, 128), (128, 64)])
def test_official_mask_keeps_the_density_and_each_diagonal_block(geometry):
    import bench_kernel

    n, heads = 1000, 3
    gen = torch.Generator().manual_seed(1)
    mask = bench_kernel.official_mask(heads, n, 0.3, geometry, gen, "cpu")
    bq, bk = geometry
    assert mask.shape == (1, heads, -(-n // bq), -(-n // bk)) and mask.dtype == torch.bool and mask.is_contiguous()
    rows = torch.arange(mask.shape[2])
    assert mask[0, :, rows, (rows * bq // bk).clamp(max=mask.shape[3] - 1)].all()
    assert 0.2 < mask.float().mean().item() < 0.5
    assert bench_kernel.official_mask(heads, n, 1.0, geometry, gen, "cpu").all()


def _write_csv(path, rows):
    import bench_kernel

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, bench_kernel.COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({"gpu": "TestGPU", "heads": 32, "tops": 1.0, "rel_l1": "", **r})


def test_readme_table_is_the_speedup_over_cudnn_of_the_same_run(tmp_path):
    import bench_kernel

    rows = []
    for causal in (False, True):
        rows.append(dict(n=32768, d=128, causal=causal, density=1.0, method="sdpa-cudnn", ms=2.0))
        for dens, ms in ((1.0, 4.0), (0.5, 1.0)):
            rows.append(dict(n=32768, d=128, causal=causal, density=dens, method="sparge", ms=ms))
            rows.append(dict(n=32768, d=128, causal=causal, density=dens, method="fa4", ms=ms / 2))
    rows.append(dict(n=8192, d=128, causal=False, density=1.0, method="sdpa-cudnn", ms=0.5))
    rows.append(dict(n=8192, d=128, causal=False, density=0.5, method="sparge", ms=0.25))
    rows.append(dict(n=8192, d=128, causal=False, density=1.0, method="sparge", ms=1.0))  # not in the table
    rows.append(dict(n=32768, d=64, causal=False, density=0.5, method="sparge", ms=9.0))  # other D: ignored
    rows.append(dict(n=32768, d=128, causal=False, density=0.5, method="official", ms=0.8))  # non-causal only
    path = tmp_path / "t.csv"
    _write_csv(path, rows)
    table = bench_kernel.readme_table(path)
    assert "| N | causal | density | sparge | fa4 | official |" in table and "`official` is the official" in table
    assert "`sparge-nopv` the same defaults on the Triton kernel" in table  # the run has fa4 rows
    lines = [line for line in table.splitlines() if line.startswith("| 32768") or line.startswith("| 8192")]
    assert lines[0] == "| 32768 | no | 1.0 | 0.50x | 1.00x | - |"
    assert lines[1] == "| 32768 | no | 0.5 | 2.00x | 4.00x | 2.50x |"
    assert lines[2].startswith("| 32768 | yes | 1.0 | 0.50x")
    assert lines[-1] == "| 8192 | no | 0.5 | 2.00x | - | - |"
    # a second run with FA4 installed: its own cudnn baseline; its sparge rows are the sparge[fa4] column
    fa4_path = tmp_path / "fa4.csv"
    _write_csv(fa4_path, [dict(n=32768, d=128, causal=False, density=1.0, method="sdpa-cudnn", ms=3.0),
                          dict(n=32768, d=128, causal=False, density=1.0, method="sparge", ms=2.0),
                          dict(n=32768, d=128, causal=False, density=1.0, method="fa4", ms=1.5)])
    both = bench_kernel.readme_table(path, fa4_csv=fa4_path)
    assert "| 32768 | no | 1.0 | 0.50x | 2.00x | - | 1.50x |" in both.splitlines()
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{bench_kernel.README_BEGIN}\nold\n{bench_kernel.README_END}\nafter\n")
    bench_kernel.update_readme(path, readme)
    text = readme.read_text()
    assert "old" not in text and table in text and text.startswith("before") and text.endswith("after\n")


def test_tuner_cases_cover_every_variant_once(monkeypatch):
    import tune_kernel

    args = type("Args", (), dict(n=[4096], d=[64, 128], quant=["none", "int8"], causal=[False, True],
                                 densities=[1.0, 0.5], warps=[4, 8], stages=[2],
                                 tile_loads=list(A.TILE_LOADS), pv_check=list(A.PV_CHECKS),
                                 skip_heavy=True))()
    cases = tune_kernel.cases(args)
    groups = 2 * 2 * 2  # d x quant x causal
    per_density = 2 * 2 * (1 + 3)  # warps x tile_loads x (stage 2 off + each pv_check)
    skip_heavy = 2 * 2 * 3 + 2 * 2
    assert len(cases) == groups * (2 * per_density + skip_heavy) == len(set(cases))
    keys = [(c.n, c.d, c.structured) for c in cases]
    assert keys == sorted(keys)  # inputs are built once per shape
    off = [c for c in cases if c.pv is None and not c.structured]
    assert {c.cfg.pv_check for c in off} == {"select"}  # pv_check plays no part with stage 2 off


def test_tuner_summary_reads_the_stage2_cost(capsys):
    import tune_kernel

    rows = []
    for pv, pv_check, ms in (("off", "", 10.0), ("50", "branch", 15.0), ("50", "select", 10.3),
                             ("50", "prefetch", 12.0)):
        rows.append(dict(n=32768, d=128, quant="none", causal=False, density=1.0, pv=pv, pv_check=pv_check,
                         config=f"w8s2-{pv_check or 'select'}-pointer", ms=ms, pv_skip=0.0, structured=False))
    tune_kernel.summarise(rows)
    tune_kernel.recommend(rows)
    out = capsys.readouterr().out
    assert " 1.030  branch 1.500, prefetch 1.200, select 1.030" in out
    assert "d=128 quant=none pv=50: w8s2-select-pointer" in out
