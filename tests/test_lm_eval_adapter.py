"""evals.lm_eval_adapter: the ``sparge-hf`` lm-eval model on the tiny Llama through lm-eval's own
CLI (``python -m evals.lm_eval_cli``: flat ``--model_args``, RULER's synthetic tasks, the bundled
tasks' data folder through ``--metadata``), the bundled local task YAMLs (perplexity over corpus
documents, NIAH and the generated long-context tasks), the ``ruler`` suite of ``python -m evals`` and
the per-document scoring hooks. Tests that need lm-eval skip when it is not installed; importing
``evals`` must never need it.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from calibrate.models import load_model
from evals import lm_eval_adapter as A
from evals import niah

REPO = Path(__file__).resolve().parents[1]

needs_lm_eval = pytest.mark.skipif(
    not A.is_available(), reason="lm-eval is not installed (pip install lm-eval)"
)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def data_dir(tiny, tmp_path_factory):
    _, tok = tiny
    folder = tmp_path_factory.mktemp("lm_eval_data")
    A.prepare_data(
        folder,
        tok,
        doc_chars=300,
        max_docs=2,
        niah_lengths=[512],
        niah_depths=[0.5],
        longctx_length=600,
        longctx_per_task=1,
    )
    return folder


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    # a fresh Arrow cache so a stale one cannot hide a bug
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_datasets"))


def test_importing_evals_does_not_import_lm_eval():
    code = (
        "import sys, evals, evals.niah, evals.longctx, evals.ruler; "
        "assert 'lm_eval' not in sys.modules, 'lm_eval imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO)


@needs_lm_eval
def test_importing_the_adapter_registers_sparge_hf_lazily():
    code = (
        "import sys, evals.lm_eval_adapter as A; from lm_eval.api.registry import get_model, model_registry; "
        "assert 'sparge-hf' in model_registry; "
        "assert 'lm_eval.models.huggingface' not in sys.modules and 'transformers' not in sys.modules; "
        "cls = get_model('sparge-hf'); assert cls is A.model_class() and cls.__name__ == 'SpargeHFLM'; "
        "assert get_model('hf') is not cls"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO)


def test_process_results_hooks():
    assert A.niah_process_results({"answer": "4821907"}, [" 4821907."]) == {"needle_accuracy": 1.0}
    assert A.niah_process_results({"answer": "4821907"}, [" 48219070"]) == {"needle_accuracy": 0.0}
    doc = {"metric": "recall", "answers": ["AAAAA", "BBBBB"]}
    assert A.longctx_process_results(doc, ["AAAAA only"]) == {"score": 50.0}
    doc = {"metric": "qa_f1", "answers": ["lemon barley cake"]}
    assert A.longctx_process_results(doc, ["The lemon barley cake."]) == {"score": 100.0}


def test_data_files(data_dir):
    names = sorted(p.name for p in data_dir.iterdir())
    assert names == sorted(
        ["ppl.jsonl", "niah.jsonl"]
        + [f"longctx_{t}.jsonl" for t in ("mk_niah", "mv_niah", "vt", "cwe", "fwe", "qa")]
    )
    docs = [json.loads(line) for line in (data_dir / "ppl.jsonl").read_text().splitlines()]
    assert len(docs) == 2 and all(0 < len(d["text"]) <= 300 for d in docs) and docs[0]["corpus"] == "pydoc"
    assert A.corpus_documents("aaa bbb ccc ddd", 8) == ["aaa bbb", "ccc ddd"]


def test_bundled_tasks_read_their_folder_from_task_metadata(data_dir, tmp_path):
    assert not any("__SPARGE_DATA_DIR__" in p.read_text() for p in A.TASKS_DIR.glob("*.yaml"))
    pytest.importorskip("datasets")
    ds = A.jsonl_dataset(data_dir=str(data_dir), file="niah.jsonl", pretrained="ignored")["test"]
    assert len(ds) == 2 and "answer" in ds.column_names  # single + multi-key at one length and depth
    with pytest.raises(ValueError, match="--metadata data_dir="):
        A.jsonl_dataset(file="ppl.jsonl")
    with pytest.raises(ValueError, match="prepare_data"):
        A.jsonl_dataset(data_dir=str(tmp_path), file="ppl.jsonl")


def test_model_args_values_are_parsed():
    assert [A.parse_value(v) for v in ("0.5", "3", "true", "None", "[0.5, 0.6]", "runs/x.json", 0.25)] == [
        0.5,
        3,
        True,
        None,
        [0.5, 0.6],
        "runs/x.json",
        0.25,
    ]


@needs_lm_eval
def test_flat_model_args_pick_the_method_and_bad_ones_are_refused(tmp_path):
    from sparge_core.params import LayerConfig, ModelConfig, ModelInfo

    cls = A.model_class()
    lm = cls(pretrained="tiny-llama", method="sparge-topk", topk="0.25", simthreshd1="-1", device="cpu")
    try:
        method = lm.sparge_handle.method_for(0)
        assert (type(method).__name__, method.topk, method.simthreshd1) == ("SpargeTopk", 0.25, -1)
        assert (A.tokenizer_folder("tiny-llama") / "tokenizer_config.json").is_file()  # for RULER's tokenizer
    finally:
        lm.close()
    config = ModelConfig(
        ModelInfo("tiny-llama", 2, 4, 2, 64),
        (LayerConfig.dense(0, 4), LayerConfig(1, (-1.0,) * 4, (50.0,) * 4, topk=(0.2,) * 4)),
        l1=0.1,
        pv_l1=0.1,
    )
    config.save_pretrained(tmp_path)
    lm = cls(
        pretrained="tiny-llama", method="sparge", config=str(tmp_path), device="cuda:0"
    )  # no GPU: the CPU
    try:
        assert lm.sparge_handle.method_for(0) is None and lm.sparge_handle.method_for(1).topk == [0.2] * 4
    finally:
        lm.close()
    with pytest.raises(ValueError, match=r"unknown model_args \['top_k'\]"):
        cls(pretrained="tiny-llama", method="sparge-topk", top_k=0.5)
    with pytest.raises(ValueError, match="cannot be combined with config"):
        cls(pretrained="tiny-llama", config=str(tmp_path), method="sparge", cdfthreshd=0.5)
    with pytest.raises(ValueError, match="unknown method 'sparse'"):
        cls(pretrained="tiny-llama", method="sparse")


@needs_lm_eval
def test_lm_eval_cli_runs_ruler_and_bundled_tasks_through_sparge_hf(tiny, tmp_path):
    """lm-eval's own CLI (python -m evals.lm_eval_cli = lm_eval + the sparge-hf registration):
    RULER's niah_single_1 (its tokenizer: the folder sparge-hf saves) and the bundled sparge_niah
    (its data folder: --metadata data_dir) in one run, with flat hyperparameters."""
    _, tok = tiny
    data = tmp_path / "data"
    A.prepare_data(
        data,
        tok,
        doc_chars=300,
        max_docs=1,
        niah_lengths=[512],
        niah_depths=[0.5],
        longctx_length=600,
        longctx_per_task=1,
    )
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "evals.lm_eval_cli",
        "--model",
        "sparge-hf",
        "--tasks",
        "niah_single_1",
        "sparge_niah",
        "--include_path",
        str(A.TASKS_DIR),
        "--model_args",
        "pretrained=tiny-llama,method=sparge-topk,topk=0.5,max_length=1100",
        "--metadata",
        f"max_seq_lengths=[1024],data_dir={data}",
        "--limit",
        "1",
        "--device",
        "cpu",
        "--gen_kwargs",
        "max_gen_toks=3",
        "--output_path",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(next(out.rglob("results_*.json")).read_text())
    assert 0.0 <= doc["results"]["niah_single_1"]["1024,none"] <= 1.0
    assert 0.0 <= doc["results"]["sparge_niah"]["needle_accuracy,none"] <= 1.0
    config = doc["config"]
    assert config["model"] == "sparge-hf" and config["model_args"]["topk"] == 0.5
    assert (
        config["sparge"]["method"].startswith("SpargeTopk(")
        and config["sparge"]["sparsity"]["sparse_calls"] > 0
    )


@needs_lm_eval
def test_ruler_suite_writes_results(tmp_path):
    from evals.__main__ import main as evals_main

    pytest.importorskip("wonderwords")
    args = [
        "ruler",
        "--model",
        "tiny-llama",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
        "--quiet",
        "--methods",
        "dense",
        "sparge-topk",
        "--lengths",
        "1024",
        "--per-task",
        "1",
        "--ruler-tasks",
        "niah_single_1",
        "niah_multikey_3",
        "--max-gen-toks",
        "2",
    ]
    assert evals_main(args) == 0
    for label in ("dense", "sparge-topk"):
        doc = json.loads((tmp_path / "ruler" / "tiny-llama" / f"{label}.json").read_text())
        scores = doc["scores"]
        assert set(scores) == {"niah_single_1@1024", "niah_multikey_3@1024", "average@1024", "average"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
        assert doc["data"]["tasks"] == ["niah_single_1", "niah_multikey_3"] and doc["data"][
            "label"
        ].startswith("RULER")
    assert doc["sparsity"]["mean"] > 0  # sparge-topk ran sparse


def test_ruler_tasks_generate_only_the_items_asked_for_and_are_seeded(tiny):
    """lm-eval makes 500 RULER samples per task and length; with num_samples its own generators make only
    those, reproducibly for a seed, and the first task's items are the first ones a full build makes."""
    pytest.importorskip("wonderwords")
    from evals.ruler import RulerTasks, capped_generator

    _, tok = tiny
    names = ["niah_single_1", "niah_multikey_3"]

    def inputs(num_samples, seed):
        with RulerTasks(tok, names, num_samples=num_samples, seed=seed) as built:
            return [[doc["input"] for doc in task.dataset["test"]] for task in built.at(1024)]

    first = inputs(3, seed=5)
    assert [len(docs) for docs in first] == [3, 3]
    assert inputs(3, seed=5) == first  # seeded: the same items again
    assert inputs(3, seed=6)[1] != first[1]  # another seed, other keys and values
    full = inputs(None, seed=5)
    assert [len(docs) for docs in full] == [500, 500]  # lm-eval's own count without the cap
    assert full[0][:3] == first[0]
    with pytest.raises(ValueError, match="num_samples"):
        RulerTasks(tok, names, num_samples=0)
    assert capped_generator(lambda x: x, 2) is None  # nothing to cap
    assert capped_generator(lambda *, num_samples=500: num_samples, 2)() == 2


def test_ruler_suite_refuses_tasks_that_need_downloads(capsys):
    from evals.__main__ import main as evals_main

    assert evals_main(["ruler", "--model", "tiny-llama", "--ruler-tasks", "niah_single_2"]) == 2
    assert "Paul Graham's essays" in capsys.readouterr().err
    assert evals_main(["ruler", "--model", "tiny-llama", "--ruler-tasks", "ruler_qa_squad"]) == 2
    assert evals_main(["ruler", "--model", "tiny-llama", "--ruler-tasks", "nope"]) == 2


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
        results = A.run_lm_eval(
            model,
            tok,
            ["sparge_ppl"],
            data_dir=data_dir,
            limit=1,
            method="sparge",
            method_params={"cdfthreshd": 0.5},
        )
    finally:
        cls.close = original
    assert seen == [True]  # applied during the run
    assert handle_of(model) is None and model.config._attn_implementation == "sdpa"
    assert math.isfinite(A.lm_eval_scores(results)["sparge_ppl"]["byte_perplexity"])


@needs_lm_eval
def test_generation_tasks_run(tiny, data_dir):
    model, tok = tiny
    results = A.run_lm_eval(
        model,
        tok,
        ["sparge_niah", "sparge_longctx"],
        data_dir=data_dir,
        limit=1,
        gen_kwargs={"max_gen_toks": 3},
    )
    scores = A.lm_eval_scores(results)
    assert 0.0 <= scores["sparge_niah"]["needle_accuracy"] <= 1.0
    for task in ("mk_niah", "mv_niah", "vt", "cwe", "fwe", "qa"):
        assert 0.0 <= scores[f"sparge_longctx_{task}"]["score"] <= 100.0
    assert "score" in scores["sparge_longctx"]
