"""evals.lm_eval_adapter: the ``sparge-hf`` lm-eval model on the tiny Llama, the bundled local task
YAMLs (perplexity over corpus documents, NIAH and the generated long-context tasks), the data-folder
templating and the per-document scoring hooks. Tests that need lm-eval skip when it is not
installed; importing the adapter must never need it.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from calibrate.models import load_model
from evals import lm_eval_adapter as A
from evals import niah

needs_lm_eval = pytest.mark.skipif(not A.is_available(), reason="lm-eval is not installed (pip install lm-eval)")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def data_dir(tiny, tmp_path_factory):
    _, tok = tiny
    folder = tmp_path_factory.mktemp("lm_eval_data")
    A.prepare_data(folder, tok, doc_chars=300, max_docs=2, niah_lengths=[512], niah_depths=[0.5],
                   longctx_length=600, longctx_per_task=1)
    return folder


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    # a fresh Arrow cache so a stale one cannot hide a bug
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


def test_importing_evals_does_not_import_lm_eval():
    code = ("import sys, evals, evals.niah, evals.longctx, evals.lm_eval_adapter; "
            "assert 'lm_eval' not in sys.modules, 'lm_eval imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_process_results_hooks():
    assert A.niah_process_results({"answer": "4821907"}, [" 4821907."]) == {"needle_accuracy": 1.0}
    assert A.niah_process_results({"answer": "4821907"}, [" 48219070"]) == {"needle_accuracy": 0.0}
    doc = {"metric": "recall", "answers": ["AAAAA", "BBBBB"]}
    assert A.longctx_process_results(doc, ["AAAAA only"]) == {"score": 50.0}
    doc = {"metric": "qa_f1", "answers": ["lemon barley cake"]}
    assert A.longctx_process_results(doc, ["The lemon barley cake."]) == {"score": 100.0}


def test_data_files(data_dir):
    names = sorted(p.name for p in data_dir.iterdir())
    assert names == sorted(["ppl.jsonl", "niah.jsonl"] + [f"longctx_{t}.jsonl" for t in
                                                         ("mk_niah", "mv_niah", "vt", "cwe", "fwe", "qa")])
    docs = [json.loads(line) for line in (data_dir / "ppl.jsonl").read_text().splitlines()]
    assert len(docs) == 2 and all(0 < len(d["text"]) <= 300 for d in docs) and docs[0]["corpus"] == "pydoc"
    assert A.corpus_documents("aaa bbb ccc ddd", 8) == ["aaa bbb", "ccc ddd"]


def test_task_folder_templating(data_dir, tmp_path):
    with A.task_folder(A.TASKS_DIR, data_dir) as folder:
        text = (folder / "sparge_ppl.yaml").read_text()
        assert A.DATA_PLACEHOLDER not in text and f"{data_dir.resolve().as_posix()}/ppl.jsonl" in text
        assert (folder / "_longctx_template.yaml").is_file()
    assert not folder.exists()
    with pytest.raises(ValueError, match="data_dir"), A.task_folder(A.TASKS_DIR, None):
        pass
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "t.yaml").write_text("task: t\n")
    with A.task_folder(plain, None) as folder:
        assert folder == plain


@needs_lm_eval
def test_model_is_registered():
    from lm_eval.api.registry import get_model

    cls = A.model_class()
    assert get_model(A.MODEL_NAME) is cls
    assert get_model("hf") is not cls  # the built-in names are still there


def _expected_byte_perplexity(model, tok, docs):
    """exp(total NLL / total bytes), each document predicted from a BOS prefix (lm-eval's rolling
    log-likelihood for documents shorter than the context; the byte tokenizer has one token per byte)."""
    nll, n_bytes = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([[tok.bos_token_id] + niah.encode(tok, doc)])
            logits = model(ids).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            n_bytes += len(doc.encode("utf-8"))
    return math.exp(nll / n_bytes)


@needs_lm_eval
def test_perplexity_task_matches_a_direct_computation(tiny, data_dir):
    model, tok = tiny
    results = A.run_lm_eval(model, tok, ["sparge_ppl"], data_dir=data_dir)
    scores = A.lm_eval_scores(results)["sparge_ppl"]
    docs = [json.loads(line)["text"] for line in (data_dir / "ppl.jsonl").read_text().splitlines()]
    assert scores["byte_perplexity"] == pytest.approx(_expected_byte_perplexity(model, tok, docs), rel=1e-4)
    assert scores["bits_per_byte"] == pytest.approx(math.log2(scores["byte_perplexity"]), rel=1e-6)
    assert math.isfinite(scores["word_perplexity"]) and scores["word_perplexity"] > scores["byte_perplexity"]


@needs_lm_eval
def test_method_is_applied_for_the_run_only(tiny, data_dir):
    from sparge_core.integrations.transformers import handle_of

    model, tok = tiny
    seen = []
    cls = A.model_class()
    original = cls.close

    def spy(self):
        seen.append(handle_of(self.model) is not None)
        original(self)

    cls.close = spy
    try:
        results = A.run_lm_eval(model, tok, ["sparge_ppl"], data_dir=data_dir, limit=1, method="sparge",
                                method_params={"cdfthreshd": 0.5})
    finally:
        cls.close = original
    assert seen == [True]  # applied during the run
    assert handle_of(model) is None and model.config._attn_implementation == "sdpa"
    assert math.isfinite(A.lm_eval_scores(results)["sparge_ppl"]["byte_perplexity"])


@needs_lm_eval
def test_generation_tasks_run(tiny, data_dir):
    model, tok = tiny
    results = A.run_lm_eval(model, tok, ["sparge_niah", "sparge_longctx"], data_dir=data_dir, limit=1,
                            gen_kwargs={"max_gen_toks": 3})
    scores = A.lm_eval_scores(results)
    assert 0.0 <= scores["sparge_niah"]["needle_accuracy"] <= 1.0
    for task in ("mk_niah", "mv_niah", "vt", "cwe", "fwe", "qa"):
        assert 0.0 <= scores[f"sparge_longctx_{task}"]["score"] <= 100.0
    assert "score" in scores["sparge_longctx"]
