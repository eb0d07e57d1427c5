"""`python -m evals` on tiny-llama: every text suite writes its result file, matched densities, errors."""

import json

import pytest

from calibrate.__main__ import main as calibrate_main
from evals.__main__ import main as evals_main

CAL = ["--model", "tiny-llama", "--samples", "1", "--holdout", "0", "--seq-len", "512", "--device", "cpu",
       "--l1", "0.3", "--pv-l1", "0.35", "--thetas", "-1", "--bisect-steps", "3", "--no-pv", "--quiet"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "tiny.json"
    assert calibrate_main([*CAL, "--out", str(out)]) == 0
    return out


def _load(root, suite, label):
    return json.loads((root / suite / "tiny-llama" / f"{label}.json").read_text())


def test_ppl_with_matched_densities(calibrated, tmp_path):
    args = ["ppl", "--model", "tiny-llama", "--config", str(calibrated), "--density", "matched", "--device", "cpu",
            "--lengths", "512", "--windows", "1", "--out", str(tmp_path), "--quiet",
            "--methods", "dense", "sparge", "sparge-topk", "minference"]
    assert evals_main(args) == 0
    dense, sparge = _load(tmp_path, "ppl", "dense"), _load(tmp_path, "ppl", "sparge")
    topk = _load(tmp_path, "ppl", "sparge-topk_at_matched")
    assert dense["scores"]["ppl@512"] > 1 and sparge["scores"]["ppl@512"] > 1
    assert dense["sparsity"]["512"]["mean"] == 0.0
    assert topk["setting"]["density_target"] == "matched"
    # the rival was set, layer by layer, to the calibrated config's density on the captured Q/K/V
    want = sparge["setting"]["capture_density_per_layer"]
    got = topk["setting"]["capture_density_per_layer"]
    assert set(got) == set(want) and all(abs(got[k] - want[k]) <= 0.1 for k in want)
    for doc in (dense, sparge, topk):
        assert doc["device"].startswith("CPU") and doc["data"]["sha256"] and doc["command"]


def test_niah_longctx_speed_write_results(tmp_path):
    base = ["--model", "tiny-llama", "--device", "cpu", "--out", str(tmp_path), "--quiet", "--methods", "dense",
            "sparge-topk"]
    assert evals_main(["niah", *base, "--lengths", "1024", "--depths", "0.5"]) == 0
    assert evals_main(["longctx", *base, "--lengths", "2048", "--per-task", "1"]) == 0
    assert evals_main(["speed", *base, "--lengths", "512"]) == 0
    niah = _load(tmp_path, "niah", "sparge-topk")
    assert 0.0 <= niah["scores"]["accuracy"] <= 1.0 and (tmp_path / "niah" / "tiny-llama" / "sparge-topk.png").exists()
    assert len(niah["items"]) == 2  # single + multikey at one length and depth
    longctx = _load(tmp_path, "longctx", "dense")
    assert "average" in longctx["scores"] and longctx["data"]["label"].startswith("LongBench substitute")
    speed = _load(tmp_path, "speed", "sparge-topk")["scores"]
    row = speed["lengths"]["512"]
    assert speed["cpu_only"] and row["prefill_ms"] > 0 and len(row["layers"]) == 2 and row["density_mean"] < 1.0
    assert row["prefill_graphs"] == {"captures": 0, "replays": 0, "failures": 0}  # a CPU prefill is never graphed
    assert _load(tmp_path, "speed", "dense")["scores"]["lengths"]["512"]["prefill_graphs"] is None
    assert evals_main(["tables", "--out", str(tmp_path)]) == 0
    assert "Table 1 layout: tiny-llama" in (tmp_path / "TABLES.md").read_text()


@pytest.mark.parametrize("extra,fragment", [
    (["--model", "no-such-model"], "no model named"),
    (["--density", "matched"], "needs the calibrated sparge --config"),
    (["--density", "1.5", "--capture", "x"], "density must be in (0, 1]"),
    (["--methods", "dense", "bogus"], "unknown methods ['bogus']"),
])
def test_bad_input_exits_2(tmp_path, capsys, extra, fragment):
    args = ["ppl", "--model", "tiny-llama", "--device", "cpu", "--lengths", "512", "--windows", "1",
            "--out", str(tmp_path), "--quiet", *extra]
    assert evals_main(args) == 2
    assert fragment in capsys.readouterr().err


def test_t2i_suite_through_the_cli(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for script, extra in (("train_dit.py", ["--preset", "image-tiny"]), ("train_clip.py", [])):
        out = tmp_path / ("dit.pt" if script == "train_dit.py" else "clip.pt")
        run = subprocess.run([sys.executable, str(repo / "scripts" / script), *extra, "--device", "cpu", "--steps", "2",
                              "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
    args = ["t2i", "--model", str(tmp_path / "dit.pt"), "--clip", str(tmp_path / "clip.pt"), "--methods", "dense",
            "sparge-topk", "--prompts", "2", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "res"),
            "--quiet"]
    assert evals_main(args) == 0
    doc = json.loads((tmp_path / "res" / "t2i" / "dit" / "results.json").read_text())
    assert set(doc["methods"]) == {"dense", "sparge-topk"}
    topk = doc["methods"]["sparge-topk"]
    assert "error" not in topk and 0 < topk["sparsity"] < 1
    assert "fid_efficientnet_lite0" in topk["metrics"] and "ssim_vs_dense" in topk["metrics"]
