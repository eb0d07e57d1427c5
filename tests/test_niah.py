"""evals.niah: exact prompt lengths, needle placement by depth, determinism, exact-match scoring on
hand-made outputs, the KV-cache greedy loop against full recomputation, summaries and the heatmap.

Fast tests use the tiny random Llama and its byte tokenizer (one token per byte, so the decoded
prompt maps 1:1 onto token positions); the SmolLM2 check is marked ``smollm2``.
"""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from calibrate.models import load_model
from evals import niah
from helpers import needs_smollm2

LENGTHS = [512, 777]
DEPTHS = [0.0, 0.3, 1.0]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def items(tiny):
    _, tok = tiny
    return niah.build_niah(tok, LENGTHS, DEPTHS, seed=3)


def test_exact_length_and_grid(items):
    assert len(items) == 2 * len(LENGTHS) * len(DEPTHS)
    assert [(i.kind, i.length, i.depth) for i in items[:3]] == [("single", 512, d) for d in DEPTHS]
    for item in items:
        assert item.input_ids.dtype == torch.long and item.input_ids.ndim == 1
        assert item.input_ids.numel() == item.length


def test_needle_sits_where_the_depth_says(tiny, items):
    _, tok = tiny
    for item in items:
        needle_ids = niah.encode(tok, " " + item.needle)
        got = item.input_ids[item.needle_pos:item.needle_pos + len(needle_ids)].tolist()
        assert got == needle_ids, (item.kind, item.length, item.depth)
        # within one haystack piece (<= a classic sentence, 22 bytes) of the requested depth
        assert abs(item.needle_depth - item.depth) <= 23 / item.extra["haystack_tokens"]
        text = tok.decode(item.input_ids.tolist())
        assert text.count(item.needle) == 1
        assert item.answer in item.needle and item.answer.isdigit() and len(item.answer) == 7
    by_depth = {i.depth: i.needle_pos for i in items if i.kind == "single" and i.length == 777}
    assert by_depth[0.0] < by_depth[0.3] < by_depth[1.0]


def test_multikey_has_distinct_distractors_and_asks_for_the_planted_key(tiny, items):
    _, tok = tiny
    for item in (i for i in items if i.kind == "multikey"):
        text = tok.decode(item.input_ids.tolist())
        assert len(item.distractors) == 3
        key = item.needle.split(" for ")[1].split(" is ")[0]
        assert not any(f" {key} " in d for d in item.distractors)
        assert key in item.question and text.rstrip().endswith(f"The secret number for {key} is")
        values = {d.rsplit(" ", 1)[1].rstrip(".") for d in item.distractors}
        assert item.answer not in values and len(values) == 3
        for distractor in item.distractors:
            assert text.count(distractor) == 1


def test_deterministic_by_seed(tiny, items):
    _, tok = tiny
    again = niah.build_niah(tok, LENGTHS, DEPTHS, seed=3)
    assert all(torch.equal(a.input_ids, b.input_ids) and a.answer == b.answer for a, b in zip(items, again))
    other = niah.build_niah(tok, LENGTHS, DEPTHS, seed=4)
    assert [a.answer for a in items] != [b.answer for b in other]


def test_corpus_haystack(tiny):
    _, tok = tiny
    got = niah.build_niah(tok, [600], [0.5], kinds=["single"], haystack="pydoc", repeats=2, seed=0)
    assert [g.input_ids.numel() for g in got] == [600, 600]
    assert got[0].haystack == "pydoc" and not torch.equal(got[0].input_ids, got[1].input_ids)
    for item in got:
        assert abs(item.needle_depth - 0.5) <= niah.MAX_PIECE_TOKENS / item.extra["haystack_tokens"]
        assert "The grass is green" not in tok.decode(item.input_ids.tolist())


def test_bad_arguments(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="depths"):
        niah.build_niah(tok, [512], [1.5])
    with pytest.raises(ValueError, match="unknown NIAH kinds"):
        niah.build_niah(tok, [512], [0.5], kinds=["triple"])
    with pytest.raises(ValueError, match="too short"):
        niah.build_niah(tok, [120], [0.5])


@pytest.mark.parametrize("prediction, correct", [
    (" 4821907.", True),
    ("The pass key is 4821907 indeed", True),
    ("48219070", False),      # inside a longer number
    ("x4821907", False),      # glued to a letter
    ("4821 907", False),
    ("", False),
])
def test_answer_found(prediction, correct):
    assert niah.answer_found(prediction, "4821907") is correct


def _fake_rows():
    """Hand-made results: single is right at depth 0 only, multikey always wrong."""
    rows = []
    for kind in ("single", "multikey"):
        for length in (512, 1024):
            for depth in (0.0, 1.0):
                ok = kind == "single" and depth == 0.0
                rows.append({"kind": kind, "length": length, "depth": depth, "score": float(ok), "correct": ok})
    return rows


def test_score_predictions_right_and_wrong(items):
    chosen = items[:4]
    preds = [f" {chosen[0].answer}.", "no idea", chosen[1].answer + "1", f"it is {chosen[3].answer}"]
    rows = niah.score_predictions(chosen, preds)
    assert [r["correct"] for r in rows] == [True, False, False, True]
    assert rows[0]["prediction"] == preds[0] and rows[0]["answer"] == chosen[0].answer
    assert "input_ids" not in rows[0]
    json.dumps(rows)  # serialisable
    with pytest.raises(ValueError):
        niah.score_predictions(chosen, preds[:2])


def test_summarize_and_grid():
    summary = niah.summarize_niah(_fake_rows())
    assert summary["accuracy"] == pytest.approx(0.25)
    assert summary["per_kind"] == {"multikey": 0.0, "single": 0.5}
    assert summary["per_length"] == {"512": 0.25, "1024": 0.25}
    assert summary["per_depth"] == {"0": 0.5, "1": 0.0}
    assert summary["grid"]["single"]["1024"] == {"0": 1.0, "1": 0.0}
    lengths, depths, acc = niah.niah_grid(_fake_rows(), kind="single")
    assert lengths == [512, 1024] and depths == [0.0, 1.0] and acc == [[1.0, 1.0], [0.0, 0.0]]


def test_heatmap_written(tmp_path):
    path = niah.niah_heatmap(_fake_rows(), tmp_path / "sub" / "niah.png", "tiny")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    single = niah.niah_heatmap(_fake_rows(), tmp_path / "single.png", "tiny", kind="single")
    assert single.read_bytes() != data
    with pytest.raises(ValueError):
        niah.niah_heatmap(_fake_rows(), tmp_path / "none.png", kind="nope")


def test_greedy_generate_matches_full_recompute(tiny):
    model, _ = tiny
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 259, (2, 40), generator=gen)
    cached = niah.greedy_generate(model, prompt, 5)
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(5):
            nxt = model(ids).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    assert cached == ids[:, 40:].tolist()
    # EOS stops a row: pretend the first generated token of row 0 is EOS
    stopped = niah.greedy_generate(model, prompt, 5, eos_ids=[cached[0][0]])
    assert stopped[0] == []


def test_score_niah_end_to_end_tiny(tiny, items):
    model, tok = tiny
    chosen = [i for i in items if i.length == 512][:4]
    one = niah.score_niah(model, tok, chosen, max_new_tokens=3, batch_size=1)
    two = niah.score_niah(model, tok, chosen, max_new_tokens=3, batch_size=2)
    assert [r["prediction"] for r in one] == [r["prediction"] for r in two]
    assert [r["depth"] for r in one] == [i.depth for i in chosen]
    assert all(r["score"] in (0.0, 1.0) for r in one)


def test_scoring_under_sparge_keep_everything_equals_dense(tiny, items):
    """The greedy loop under the sparge attention (prompt sparse, decode steps dense) with a config
    that keeps every block gives the dense outputs."""
    from sparge_core.integrations.transformers import apply, remove

    model, tok = tiny
    chosen = [i for i in items if i.length == 512][:2]
    dense = niah.score_niah(model, tok, chosen, max_new_tokens=4)
    handle = apply(model, "sparge", cdfthreshd=1.0, collect_stats=True)
    try:
        sparse = niah.score_niah(model, tok, chosen, max_new_tokens=4)
    finally:
        remove(model)
    assert [r["prediction"] for r in sparse] == [r["prediction"] for r in dense]
    layer = handle.sparsity_report()["layers"][0]
    assert layer["sparse_calls"] == 2 and layer["dense_calls"] == 6  # 2 prompts; 3 decode steps each


def test_export_jsonl(tiny, items, tmp_path):
    _, tok = tiny
    path = niah.export_jsonl(items[:3], tok, tmp_path / "niah.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["answer"] for r in rows] == [i.answer for i in items[:3]]
    assert all(r["needle"] in r["text"] and len(r["text"]) == r["length"] for r in rows)  # byte tokenizer


@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_finds_the_needle_densely():
    model, tok = load_model("smollm2")
    got = niah.build_niah(tok, [768], [0.5], seed=0)
    assert got[0].extra["chat"] and tok.decode(got[0].input_ids[:3].tolist()).startswith("<|im_start|>")
    rows = niah.score_niah(model, tok, got, max_new_tokens=10)
    assert rows[0]["correct"], rows[0]["prediction"]  # single pass key (dense: 1.0 up to 4K)
    # multikey is harder for a 135M model; it must at least answer with one of the planted numbers
    planted = [got[1].answer] + [d.rsplit(" ", 1)[1].rstrip(".") for d in got[1].distractors]
    assert any(niah.answer_found(rows[1]["prediction"], v) for v in planted), rows[1]["prediction"]
