"""evals.longctx: the generated LongBench substitute (exact lengths, answers recoverable from the
prompt text, determinism, metrics on hand-made outputs) and the LongBench v1 loader and metrics on a
small fake fixture in the LongBench schema (tests/fixtures/longbench; no real data).
"""

import os
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from calibrate.models import load_model
from evals import longctx as L

FIXTURE = Path(__file__).parent / "fixtures" / "longbench"
LENGTH = 700


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def items(tiny):
    _, tok = tiny
    return L.build_tasks(tok, LENGTH, 2, seed=5, haystack="classic")


def _context(tok, item) -> str:
    text = tok.decode(item.input_ids.tolist())
    return text[:text.rindex(item.question)]


# ---------------------------------------------------------------------------------------------
# generated tasks
# ---------------------------------------------------------------------------------------------
def test_every_task_has_the_exact_length(items):
    assert [i.task for i in items] == [t for t in L.TASKS for _ in range(2)]
    for item in items:
        assert item.input_ids.numel() == LENGTH == item.length, item.task
        assert item.metric == L.TASK_SETTINGS[item.task][0] and item.answers


def test_retrieval_and_qa_answers_are_in_the_text(tiny, items):
    _, tok = tiny
    for item in (i for i in items if i.task in ("mk_niah", "mv_niah", "qa")):
        context = _context(tok, item)
        for answer in item.answers:
            assert answer in context, (item.task, answer)
    for item in (i for i in items if i.task == "mk_niah"):
        context = _context(tok, item)
        key = item.extra["key"]
        assert context.count(f"The secret number for {key} is {item.answers[0]}.") == 1
        assert len(re.findall(r"The secret number for \w+ is \d+\.", context)) > 3  # distractors


def test_variable_tracking_answers_follow_the_chain(tiny, items):
    _, tok = tiny
    for item in (i for i in items if i.task == "vt"):
        value_of: dict[str, str] = {}
        for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", _context(tok, item)):
            value_of[name] = value_of[rhs[4:]] if rhs.startswith("VAR ") else rhs
        holders = sorted(n for n, v in value_of.items() if v == item.extra["value"])
        assert holders == sorted(item.answers) and len(holders) == 5
        assert len(value_of) == 10  # plus a distractor chain


def test_word_extraction_answers_are_the_most_frequent_words(tiny, items):
    _, tok = tiny
    for item in (i for i in items if i.task in ("cwe", "fwe")):
        words = re.findall(r"[a-z]+", _context(tok, item).split("\n\n", 1)[1])
        counts = Counter(words)
        top = [w for w, _ in counts.most_common(len(item.answers))]
        assert sorted(top) == sorted(item.answers), item.task
        least_answer = min(counts[a] for a in item.answers)
        others = [c for w, c in counts.items() if w not in item.answers]
        assert least_answer > max(others)


def test_deterministic_by_seed(tiny, items):
    _, tok = tiny
    again = L.build_tasks(tok, LENGTH, 2, seed=5, haystack="classic")
    assert all(torch.equal(a.input_ids, b.input_ids) and a.answers == b.answers for a, b in zip(items, again))
    other = L.build_tasks(tok, LENGTH, 2, seed=6, haystack="classic")
    assert [a.answers for a in items] != [b.answers for b in other]


def test_corpus_filler_and_task_subset(tiny):
    _, tok = tiny
    got = L.build_tasks(tok, 640, 1, tasks=["qa", "vt"], haystack="pydoc")
    assert [g.task for g in got] == ["qa", "vt"] and all(g.input_ids.numel() == 640 for g in got)
    assert got[0].haystack == "pydoc"
    with pytest.raises(ValueError, match="unknown long-context tasks"):
        L.build_tasks(tok, 640, 1, tasks=["summarise"])


def test_metrics_on_hand_made_outputs():
    assert L.qa_f1("The plum and walnut tart.", ["plum and walnut tart"]) == 1.0
    # prediction tokens: plum, tart, with, cream (4); gold: plum, walnut, tart (3, "the" dropped); overlap 2
    assert L.qa_f1("plum tart with cream", ["the plum walnut tart"]) == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    assert L.qa_f1("nothing relevant", ["plum tart"]) == 0.0
    assert L.recall_match("AAAAA, CCCCC and DDDDD", ["AAAAA", "BBBBB", "CCCCC", "DDDDD"]) == 0.75
    assert L.recall_match("AAAAAB", ["AAAAA"]) == 0.0
    assert L.substring_match("it is 1234567.", ["1234567"]) == 1.0
    assert L.substring_match("it is 12345678.", ["1234567"]) == 0.0
    with pytest.raises(ValueError):
        L.score_answer("bleu", "x", ["x"])


def test_score_task_predictions_right_and_wrong(items):
    preds = []
    for i, item in enumerate(items):
        right = ", ".join(item.answers)
        preds.append(right if i % 2 == 0 else "I do not know.")
    result = L.score_task_predictions(items, preds)
    assert result["label"] == L.LABEL
    assert result["scores"] == {t: 50.0 for t in L.TASKS}
    assert result["average"] == pytest.approx(50.0) and result["n"] == {t: 2 for t in L.TASKS}
    assert result["samples"][0]["score"] == 1.0 and result["samples"][1]["score"] == 0.0


def test_score_tasks_runs_the_tiny_model(tiny, items):
    model, tok = tiny
    result = L.score_tasks(model, tok, items[::2], max_new_tokens=3)
    assert set(result["scores"]) == set(L.TASKS)
    assert all(0.0 <= s <= 100.0 for s in result["scores"].values())
    assert all(isinstance(r["prediction"], str) for r in result["samples"])


# ---------------------------------------------------------------------------------------------
# LongBench v1 loader and metrics (fake fixture)
# ---------------------------------------------------------------------------------------------
def test_longbench_metrics():
    assert L.lcs_length("abcbdab", "bdcaba") == 4
    assert L.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert L.rouge_l("", "anything") == 0.0
    classes = ["Numeric", "Numeric value", "Human", "Location"]
    assert L.classification_score("Location", "Location", classes) == 1.0
    assert L.classification_score("Human or Location", "Location", classes) == 0.5
    assert L.classification_score("Numeric value", "Numeric value", classes) == 1.0  # "Numeric" is part of gold
    assert L.classification_score("Human", "Location", classes) == 0.0
    assert L.retrieval_score("Paragraph 2", "Paragraph 2") == 1.0
    assert L.retrieval_score("Paragraph 2 or 3", "Paragraph 2") == 0.5
    assert L.retrieval_score("段落5", "段落5", zh=True) == 1.0
    assert L.count_score("There are 2 paragraphs", "2") == 1.0
    assert L.count_score("3", "2") == 0.0
    assert L.code_sim_score("# comment\n    return width * height\n", "    return width * height") == 1.0
    assert 0.0 < L.code_sim_score("return w * h", "return width * height") < 1.0
    assert L.qa_f1_zh("1911年。", "1911年") == 1.0
    assert L.truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
    assert L.truncate_middle(list(range(10)), 5) == [0, 1, 7, 8, 9]
    assert L.truncate_middle([1, 2], 4) == [1, 2]


def _by_id(items):
    return {i.record_id: i for i in items}


def test_load_longbench_fixture_with_datasets_and_plain_json(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    via_datasets = L.load_longbench(FIXTURE, cache_dir=tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    via_json = L.load_longbench(FIXTURE)
    assert [i.record_id for i in via_datasets] == [i.record_id for i in via_json]
    assert [i.answers for i in via_datasets] == [i.answers for i in via_json]
    assert [i.prompt for i in via_datasets] == [i.prompt for i in via_json]


def test_load_longbench_prompts_and_fields():
    items = _by_id(L.load_longbench(FIXTURE))
    assert len(items) == 10
    hqa = items["fake-hqa-1"]
    assert hqa.task == "hotpotqa" and hqa.metric == "qa_f1" and hqa.max_new_tokens == 32
    assert "Orrin Ford is a market town" in hqa.prompt and hqa.prompt.rstrip().endswith(
        "Question: Which river flows past the town where the glass museum of Vellmark stands?\nAnswer:")
    assert items["fake-hqae-1"].task == "hotpotqa_e" and items["fake-hqae-1"].metric == "qa_f1"
    assert items["fake-trec-1"].first_line and "Location" in items["fake-trec-1"].all_classes
    assert items["fake-pc-1"].answers == ["2"] and items["fake-pc-1"].metric == "count"
    assert items["fake-mfzh-1"].metric == "qa_f1_zh"
    assert items["fake-hqa-1"].input_ids is None


def test_load_longbench_task_filter_and_errors():
    got = L.load_longbench(FIXTURE, tasks=["trec", "lcc"])
    assert sorted({i.task for i in got}) == ["lcc", "trec"]
    with pytest.raises(ValueError, match="unknown LongBench task"):
        L.load_longbench(FIXTURE, tasks=["nonsense"])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        L.load_longbench(FIXTURE, max_length=64)
    single = L.load_longbench(FIXTURE / "gov_report.jsonl")
    assert [i.task for i in single] == ["gov_report"] and single[0].metric == "rouge_l"


def test_load_longbench_truncates_the_middle(tiny):
    _, tok = tiny
    items = _by_id(L.load_longbench(FIXTURE, tasks=["hotpotqa"], max_length=96, tokenizer=tok))
    hqa = items["fake-hqa-1"]
    assert hqa.truncated and hqa.prompt_tokens == len(hqa.prompt.encode()) > 96
    assert hqa.input_ids.numel() == 96  # byte tokenizer, no chat template
    text = tok.decode(hqa.input_ids.tolist())
    assert text.startswith(hqa.prompt[:48]) and text.endswith(hqa.prompt[-48:])
    lcc = L.load_longbench(FIXTURE, tasks=["lcc"], max_length=400, tokenizer=tok)[0]
    assert not lcc.truncated and tok.decode(lcc.input_ids.tolist()) == lcc.prompt


def test_score_longbench_predictions_right_and_wrong():
    items = _by_id(L.load_longbench(FIXTURE))
    order = ["fake-hqa-1", "fake-hqa-2", "fake-trec-1", "fake-trec-2", "fake-pre-1", "fake-pc-1", "fake-lcc-1"]
    chosen = [items[k] for k in order]
    preds = ["Teller", "Someone else", "Location\nHuman", "Entity", "Paragraph 2", "3", "    return width * height"]
    result = L.score_longbench_predictions(chosen, preds)
    assert result["scores"]["hotpotqa"] == pytest.approx(50.0)
    assert result["scores"]["trec"] == pytest.approx(50.0)  # first line only: "Location"
    assert result["scores"]["passage_retrieval_en"] == 100.0
    assert result["scores"]["passage_count"] == 0.0
    assert result["scores"]["lcc"] == 100.0
    assert result["average"] == pytest.approx((50 + 50 + 100 + 0 + 100) / 5)


def test_score_longbench_runs_the_tiny_model(tiny):
    model, tok = tiny
    items = L.load_longbench(FIXTURE, tasks=["hotpotqa", "trec", "passage_count"], max_length=128, tokenizer=tok)
    short = [L.LongBenchItem(**{**i.__dict__, "max_new_tokens": 3}) for i in items]
    result = L.score_longbench(model, tok, short)
    assert set(result["scores"]) == {"hotpotqa", "trec", "passage_count"}
    assert all(0.0 <= s <= 100.0 for s in result["scores"].values())
    with pytest.raises(ValueError, match="no input_ids"):
        L.score_longbench(model, tok, L.load_longbench(FIXTURE, tasks=["lcc"]))
    # score_tasks hands LongBench items to score_longbench
    via_tasks = L.score_tasks(model, tok, short)
    assert via_tasks["scores"] == result["scores"] and via_tasks["label"] == L.LONGBENCH_LABEL
