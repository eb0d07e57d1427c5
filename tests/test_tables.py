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
        write_result(root, "speed", "m", s, scores={"lengths": {"8192": {"attention_tops": tops, "prefill_ms": 30.0}}})
    (root / "kernel").mkdir()
    (root / "kernel" / "card.csv").write_text(
        "gpu,n,d,heads,causal,density,method,ms,tops,mask\n"
        "card,32768,128,32,False,1.0,sdpa-cudnn,28.0,630,dense\n"
        "card,32768,128,32,False,0.5,sparge-quant,14.0,1260,random\n"
        "card,32768,128,32,False,0.5,sparge,20.0,880,random\n"
        "card,32768,128,32,False,0.5,flex,21.0,840,random\n")
    (root / "t2v" / "dit").mkdir(parents=True)
    (root / "t2v" / "dit" / "results.json").write_text(json.dumps({"device": "card", "methods": {
        "dense": {"sparsity": 0.0, "metrics": {"fid_efficientnet_lite0": 41.0, "attribute_accuracy": {"all": 0.35}}},
        "sparge": {"sparsity": 0.38, "metrics": {"fid_efficientnet_lite0": 52.6, "psnr_vs_dense": 23.8}},
        "broken": {"error": "ConfigError: missing"}}}))
    (root / "t2v" / "dit" / "permutation_ablation.json").write_text(json.dumps(
        {"device": "card", "settings": {"l1_bound": 0.05}, "orders": {"hilbert": {"sim_q": 0.57, "sim_k": 0.58,
                                                                                  "l1": 0.0498, "sparsity": 0.355}}}))


def test_tables_from_fixture_results(tmp_path):
    _fixture(tmp_path)
    text = write_tables(tmp_path).read_text()
    assert "## Table 1 layout: m" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "9.400" in rows["dense (0.00)"] and "0.830" in rows["dense (0.00)"] and "18.700" in rows["dense (0.00)"]
    assert "9.500" in rows["sparge (0.60)"] and "64.000" in rows["sparge (0.60)"]
    assert "minference@matched (0.60)" in rows
    # column order: TOPS, PPL by length, long-ctx, NIAH
    header = next(line for line in text.splitlines() if line.startswith("| method (sparsity)"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:5] == ["method (sparsity)", "TOPS@8192", "PPL 2048", "PPL 8192", "long-ctx"]
    # kernel: speed-up over cuDNN from the same CSV
    assert "| False | 0.50 | 2.00x | 1.40x | 1.33x |" in text
    # image: failed methods are left out; the ablation has its own table
    assert "| sparge | 0.380 |" in text and "broken" not in text
    assert "| hilbert | 0.570 | 0.580 | 0.0498 | 0.355 |" in text
    assert "the paper's Table 1" in text


def test_tables_with_no_results(tmp_path):
    text = write_tables(tmp_path).read_text()
    assert "Table 1 layout" not in text.split("For reference")[0]
