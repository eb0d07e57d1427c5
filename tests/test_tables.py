"""`make tables` on fixture result files: the Table 1 layout, the kernel table and image tables."""

import json

from evals.runner import MethodSetting, write_result
from evals.tables import write_tables


def _fixture(root):
    dense, sparge = MethodSetting("dense", "dense"), MethodSetting("sparge", "sparge", config_path=None)
    rival = MethodSetting("minference@matched", "minference", target="matched")
    for s, ppl, acc, avg, tops in ((dense, 9.40, 0.83, 18.7, 361.0), (sparge, 9.50, 0.77, 19.1, 64.0),
                                   (rival, 9.72, 0.80, 20.6, 21.0)):
        sp = {"8192": {"mean": 0.0 if s is dense else 0.6}}
        write_result(root, "ppl", "m", s, scores={"ppl@8192": ppl, "ppl@2048": ppl + 2}, sparsity=sp)
        write_result(root, "niah", "m", s, scores={"accuracy": acc})
        write_result(root, "longctx", "m", s, scores={"average": avg})
        write_result(root, "ruler", "m", s, scores={"average": acc / 2})
        write_result(root, "speed", "m", s, scores={"lengths": {"8192": {"attention_tops": tops, "prefill_ms": 30.0}}})
    (root / "kernel").mkdir()
    (root / "kernel" / "card.csv").write_text(
        "gpu,n,d,heads,causal,density,method,ms,tops,mask\n"
        "card,32768,128,32,False,1.0,sdpa-cudnn,28.0,630,dense\n"
        "card,32768,128,32,False,0.5,sparge-quant,14.0,1260,random\n"
        "card,32768,128,32,False,0.5,sparge,20.0,880,random\n"
        "card,32768,128,32,False,0.5,flex,21.0,840,random\n")
    (root / "kernel" / "asm-report.csv").write_text("kernel,instruction,count\nattn,HGMMA,64\n")  # not a benchmark
    (root / "t2v" / "dit").mkdir(parents=True)
    (root / "t2v" / "dit" / "results.json").write_text(json.dumps({"device": "card", "methods": {
        "dense": {"sparsity": 0.0, "metrics": {"fid_efficientnet_lite0": 41.0, "attribute_accuracy": {"all": 0.35}}},
        "sparge": {"sparsity": 0.38, "metrics": {"fid_efficientnet_lite0": 52.6, "psnr_vs_dense": 23.8}},
        "broken": {"error": "ConfigError: missing"}}}))
    (root / "t2v" / "dit" / "permutation_ablation.json").write_text(json.dumps(
        {"device": "card", "settings": {"l1_bound": 0.05}, "orders": {"hilbert": {"sim_q": 0.57, "sim_k": 0.58,
                                                                                  "l1": 0.0498, "sparsity": 0.355}}}))


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_rows(text: str) -> list[list[str]]:
    """Every Markdown table row of ``text`` as stripped cells (alignment rules left out)."""
    rows = [_cells(line) for line in text.splitlines() if line.startswith("|")]
    return [r for r in rows if not all(set(c) <= set(":-") and c for c in r)]


def test_tables_from_fixture_results(tmp_path):
    _fixture(tmp_path)
    text = write_tables(tmp_path).read_text()
    assert "## Table 1 layout: m" in text
    rows = {r[0]: r for r in _table_rows(text)}
    assert {"9.400", "0.830", "18.700"} <= set(rows["dense (0.00)"])
    assert {"9.500", "64.000"} <= set(rows["sparge (0.60)"])
    assert "minference@matched (0.60)" in rows
    # column order: TOPS, PPL by length, long-ctx, NIAH
    assert rows["method (sparsity)"][:7] == ["method (sparsity)", "TOPS@8192", "PPL 2048", "PPL 8192", "long-ctx",
                                             "RULER", "NIAH"]
    assert rows["dense (0.00)"][5] == "0.415" and "RULER: lm-eval's offline RULER tasks" in text
    # kernel: speed-up over cuDNN from the same CSV
    assert ["False", "0.50", "2.00x", "1.40x", "1.33x"] in _table_rows(text)
    # image: failed methods are left out; the ablation has its own table
    assert rows["sparge"][:2] == ["sparge", "0.380"] and "broken" not in text
    assert rows["hilbert"] == ["hilbert", "0.570", "0.580", "0.0498", "0.355"]
    assert "the paper's Table 1" in text
    # every table is tabulate's GitHub pipe format: header, rule, rows of equal width
    lines = text.splitlines()
    rule = lines.index(next(line for line in lines if line.startswith("|---")))
    assert len({len(line) for line in lines[rule - 1:rule + 2]}) == 1


def test_markdown_table_keeps_cells_as_given():
    from evals.tables import markdown_table

    table = markdown_table(["a", "b"], [["0.50", 1.0], [None, "x"]]).splitlines()
    assert len(table) == 4 and set(table[1]) <= set("|-")
    assert [_cells(table[i]) for i in (0, 2, 3)] == [["a", "b"], ["0.50", "1.000"], ["–", "x"]]


def test_tables_with_no_results(tmp_path):
    text = write_tables(tmp_path).read_text()
    assert "Table 1 layout" not in text.split("For reference")[0]
