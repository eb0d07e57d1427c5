"""CPU smoke tests of ``scripts/crosscheck_minference.py`` and ``scripts/rivals_l1_table.py`` on tiny
synthetic inputs (ours only: the minference package needs CUDA), plus hand-checked values of the
cross-check's token/block accounting helpers (``evals.minference_package``)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cc():
    return _load("crosscheck_minference")


@pytest.fixture(scope="module")
def acct():
    from evals import minference_package

    return minference_package


def test_block_pair_counts_hand_checked(acct):
    cc = acct
    counts = cc.block_pair_counts(256, 256, "cpu")
    # query block 0 (rows 0-127): key block 0 -> sum_{i<64}(i+1) + 64*64,
    # key block 1 -> sum_{i=64}^{127}(i-63)
    assert counts[0].tolist() == [2080 + 4096, 2080, 0, 0]
    assert counts.sum().item() == 256 * 257 // 2


def test_token_accounting_hand_checked(acct):
    cc = acct
    touched = torch.zeros(1, 1, 4, 256, dtype=torch.bool)
    touched[0, 0, 0, :64] = True  # row block 0 (rows 0-63) computes keys 0-63
    touched[0, 0, 3, 10] = True  # row block 3 (rows 192-255) computes key 10
    # rows 0-63 see i + 1 keys each; rows 192-255 see one key each
    assert cc.token_density_of_rows(touched, 64, 256) == pytest.approx((2080 + 64) / (256 * 257 / 2))
    grid = cc.rows_to_grid(touched, 64, 256, 256)
    want = torch.zeros(2, 4, dtype=torch.bool)
    want[0, 0] = want[1, 0] = True
    assert torch.equal(grid[0, 0], want)
    mask = torch.zeros(1, 1, 2, 4, dtype=torch.bool)
    mask[0, 0, 0, 0] = True
    assert cc.token_density_of_blocks(mask, 256, 256) == pytest.approx(6176 / (256 * 257 / 2))


def test_mask_overlap_and_jaccard(acct):
    cc = acct
    allowed = torch.ones(2, 2, dtype=torch.bool)
    a = torch.tensor([[True, True], [False, False]])[None, None]
    b = torch.tensor([[True, False], [True, False]])[None, None]
    got = cc.mask_overlap(a, b, allowed)
    assert got == {"mask_iou": pytest.approx(1 / 3), "pkg_in_ours": 0.5, "ours_in_pkg": 0.5}
    assert cc.set_jaccard(a.reshape(1, 1, 4), b.reshape(1, 1, 4)) == pytest.approx(1 / 3)


def test_crosscheck_smoke(cc, tmp_path):
    record = cc.main(
        [
            "--synthetic",
            "--seq-len",
            "640",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--head-dim",
            "16",
            "--layers",
            "0",
            "--device",
            "cpu",
            "--backend",
            "reference",
            "--vs",
            "60:120",
            "--bs-topk",
            "2",
            "--a-shape",
            "16:128",
            "--flex",
            "0.9:0.1:none",
            "--out",
            str(tmp_path / "cc"),
        ]
    )
    saved = json.loads((tmp_path / "cc.json").read_text())
    assert (tmp_path / "cc.csv").is_file()
    assert saved["package"]["used"] is False and "CUDA" in saved["package"]["reason"]
    assert [s["setting"] for s in saved["summary"]] == [
        "vs 60:120",
        "bs top2",
        "a-shape 16:128",
        "flex 0.9:0.1:none",
    ]
    for row in record["rows"]:
        assert 0 < row["density_ours"] < 1 and 0 < row["l1_ours_dense"] < 1
        assert row["token_density_ours"] <= row["density_ours"] + 1e-9 or row["method"] != "minference-vs"


def test_rivals_table_smoke(tmp_path):
    rv = _load("rivals_l1_table")
    record = rv.main(
        [
            "--synthetic",
            "--seq-len",
            "1024",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--head-dim",
            "16",
            "--layers",
            "0",
            "1",
            "--device",
            "cpu",
            "--backend",
            "reference",
            "--targets",
            "0.6",
            "--methods",
            "sparge-topk",
            "bs=minference:pattern=block_sparse",
            "fp=flexprefill:min_budget=none",
            "--out",
            str(tmp_path / "rv"),
        ]
    )
    assert set(record["tables"]["l1"]) == {"0", "1", "mean"}
    for col in ("sparge-topk@0.6", "bs@0.6", "fp@0.6"):
        assert 0 < record["tables"]["l1"]["mean"][col] < 1
        assert abs(record["tables"]["density"]["mean"][col] - 0.6) <= 0.05
    assert all(r["kernel_density"] == pytest.approx(r["density"]) for r in record["rows"])
    md = (tmp_path / "rv.md").read_text()
    assert "| mean |" in md and "rivals_l1_table.py" in md


def test_method_spec_parsing():
    rv = _load("rivals_l1_table")
    assert rv.parse_method("flexprefill") == ("flexprefill", "flexprefill", {})
    assert rv.parse_method("fp=flexprefill:gamma=0.9,min_budget=none") == (
        "fp",
        "flexprefill",
        {"gamma": 0.9, "min_budget": None},
    )
    assert rv.parse_method("minference:pattern=a_shape,n_init=64") == (
        "minference",
        "minference",
        {"pattern": "a_shape", "n_init": 64},
    )
    with pytest.raises(SystemExit, match="bad method spec"):
        rv.parse_method("x=minference:pattern")
