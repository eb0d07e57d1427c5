"""lm-evaluation-harness adapter: run local lm-eval tasks on a live model with any attention method.

- ``sparge-hf`` is an lm-eval model (a subclass of ``lm_eval.models.huggingface.HFLM``, registered
  when ``model_class()`` is first called) built from a **loaded** model and tokenizer (or a name
  ``calibrate.models.load_model`` knows), optionally with a sparge method or per-layer config applied
  through ``sparge_core.integrations.transformers.apply`` and removed again by ``close()``.
- ``evals/tasks/*.yaml`` are local task definitions that read JSONL files from a data folder
  (their ``data_files`` say ``__SPARGE_DATA_DIR__``, replaced at run time):

  ==========================  ===================================================  ======================
  task                        data file (written by)                               metric
  ==========================  ===================================================  ======================
  ``sparge_ppl``              ``ppl.jsonl`` (``export_corpus_jsonl``)              word/byte perplexity,
                              ``loglikelihood_rolling`` over corpus documents      bits per byte
  ``sparge_niah``             ``niah.jsonl`` (``evals.niah.export_jsonl``)         needle value in output
  ``sparge_longctx_<task>``   ``longctx_<task>.jsonl`` (``evals.longctx``)         the task's metric
  ``sparge_longctx`` (group)  the six tasks above                                  mean of task scores
  ==========================  ===================================================  ======================

  ``prepare_data`` writes all of them. The generated tasks are the same substitutes as
  ``evals.niah`` / ``evals.longctx`` (not LongBench, not the paper's NIAH data); lm-eval
  re-tokenises the decoded prompt text, so prompt lengths can differ from the generators' by a
  few tokens. Perplexities follow lm-eval's definitions (per word and per byte of the documents,
  over ``max_length`` windows), not ``evals.ppl``'s per-token perplexity.
- ``run_lm_eval`` builds the model wrapper, a ``TaskManager(include_path=..., include_defaults=False)``
  and calls ``lm_eval.simple_evaluate``; any other local lm-eval YAML folder works the same way.

lm-eval is optional: importing this module (or ``evals``) does not import it; ``is_available()``
says whether it is installed. Everything runs offline (no Hub access is needed by these tasks).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODEL_NAME = "sparge-hf"
TASKS_DIR = Path(__file__).with_name("tasks")
DATA_PLACEHOLDER = "__SPARGE_DATA_DIR__"
INSTALL_HINT = "pip install 'lm-eval==0.4.13' (tested; its [hf] extra is not needed with this project's models extra)"

_MODEL_CLASS: type | None = None


def is_available() -> bool:
    """Whether lm-eval is installed (found on the import path)."""
    try:
        return importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):
        return False


def _require() -> None:
    if not is_available():
        raise ImportError(f"lm-eval is not installed: {INSTALL_HINT}")


# --------------------------------------------------------------------------------------------
# the lm-eval model
# --------------------------------------------------------------------------------------------
def model_class() -> type:
    """The ``sparge-hf`` lm-eval model class (defined and registered on first call)."""
    global _MODEL_CLASS
    if _MODEL_CLASS is None:
        _MODEL_CLASS = _define_model_class()
    return _MODEL_CLASS


def _define_model_class() -> type:
    _require()
    import lm_eval.models  # noqa: F401  (fills the registry with the built-in names first)
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    class SpargeHFLM(HFLM):
        """lm-eval's HF model around a live causal LM, with an optional sparge method applied.

        Args:
            pretrained: a loaded ``transformers`` model, or a name/path for ``calibrate.models.load_model``.
            tokenizer: its tokenizer (required with a loaded model: nothing is fetched).
            method: ``None`` (evaluate the model's current attention), a method name (``"sparge"``,
                ``"minference"``, ...), a per-layer config file/dict, or an ``AttentionMethod``.
            method_params: hyperparameters for a method name (e.g. ``{"cdfthreshd": 0.9}``).
            sparge_backend: kernel backend passed to ``apply``.
            device, dtype: only used when ``pretrained`` is a name.
            **kwargs: passed to ``HFLM`` (``batch_size``, ``max_length``, ...).
        """

        def __init__(self, pretrained, tokenizer=None, method=None, method_params: dict | None = None,
                     sparge_backend: str = "auto", device: str | None = None, dtype=None, **kwargs):
            if isinstance(pretrained, (str, os.PathLike)):
                pretrained, tokenizer = _load_named(str(pretrained), tokenizer, device, dtype)
            if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
                raise ValueError("sparge-hf needs the tokenizer object of the live model (nothing is downloaded)")
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
            self._sparge_applied = False
            if method is not None:
                from sparge_core.integrations.transformers import apply

                apply(self.model, method, backend=sparge_backend, **(method_params or {}))
                self._sparge_applied = True
                logger.info("sparge-hf: applied %s", method if isinstance(method, str) else type(method).__name__)

        @property
        def sparge_handle(self):
            """The ``SpargeAttention`` handle of the wrapped model (None when no method is applied)."""
            from sparge_core.integrations.transformers import handle_of

            return handle_of(self.model)

        def close(self) -> None:
            """Remove the method this wrapper applied (a method applied by the caller stays)."""
            if self._sparge_applied:
                from sparge_core.integrations.transformers import remove

                remove(self.model)
                self._sparge_applied = False

    try:
        register_model(MODEL_NAME)(SpargeHFLM)
    except ValueError as err:  # registered by an earlier copy of this module
        logger.warning("lm-eval model %r was already registered (%s); using this definition directly",
                       MODEL_NAME, err)
    return SpargeHFLM


def _load_named(name: str, tokenizer, device: str | None, dtype):
    import torch

    from calibrate.models import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, loaded = load_model(name, device=device, dtype=dtype)
    return model, (tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike))
                   else loaded)


# --------------------------------------------------------------------------------------------
# per-document scoring used by the YAML tasks (``!function evals.lm_eval_adapter...``)
# --------------------------------------------------------------------------------------------
def niah_process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """``sparge_niah``: 1 when the needle's value occurs in the output as a whole number."""
    from evals.niah import answer_found

    return {"needle_accuracy": float(answer_found(results[0], str(doc["answer"])))}


def longctx_process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """``sparge_longctx_<task>``: the document's own metric (substring / recall / qa_f1), x 100."""
    from evals.longctx import score_answer

    return {"score": 100.0 * score_answer(doc["metric"], results[0], list(doc["answers"]))}


# --------------------------------------------------------------------------------------------
# data files for the bundled tasks
# --------------------------------------------------------------------------------------------
def corpus_documents(text: str, doc_chars: int, max_docs: int | None = None) -> list[str]:
    """Cut a text into consecutive documents of about ``doc_chars`` characters, at whitespace."""
    if doc_chars < 1:
        raise ValueError(f"doc_chars must be positive, got {doc_chars}")
    docs, start = [], 0
    while start < len(text) and (max_docs is None or len(docs) < max_docs):
        end = min(len(text), start + doc_chars)
        if end < len(text):
            cut = text.rfind(" ", start + doc_chars // 2, end)
            end = cut if cut > start else end
        doc = text[start:end].strip()
        if doc:
            docs.append(doc)
        start = end
    return docs


def export_corpus_jsonl(corpus: str | os.PathLike, path: str | os.PathLike, *, doc_chars: int = 4000,
                        max_docs: int | None = None) -> Path:
    """Write ``{"text": ...}`` lines of consecutive documents of a corpus (``calibrate.data`` name or file)."""
    from calibrate.data import load_corpus

    loaded = load_corpus(corpus)
    docs = corpus_documents(loaded.text, doc_chars, max_docs)
    from sparge_core.atomic import atomic_open

    path = Path(path)
    with atomic_open(path, "w") as f:
        f.writelines(json.dumps({"text": doc, "corpus": loaded.name, "sha256": loaded.sha256, "index": i},
                               ensure_ascii=False) + "\n" for i, doc in enumerate(docs))
    logger.info("wrote %d documents of %s to %s", len(docs), loaded.name, path)
    return path


def prepare_data(data_dir: str | os.PathLike, tokenizer, *, corpus: str = "pydoc", doc_chars: int = 4000,
                 max_docs: int | None = 16, niah_lengths: Sequence[int] = (2048,),
                 niah_depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), niah_haystack: str = "classic",
                 longctx_length: int = 2048, longctx_per_task: int = 4, longctx_haystack: str = "classic",
                 seed: int = 0) -> dict[str, Path]:
    """Write every data file the bundled tasks read into ``data_dir``; returns ``{file stem: path}``."""
    from evals import longctx, niah

    data_dir = Path(data_dir)
    out = {"ppl": export_corpus_jsonl(corpus, data_dir / "ppl.jsonl", doc_chars=doc_chars, max_docs=max_docs)}
    items = niah.build_niah(tokenizer, niah_lengths, niah_depths, seed=seed, haystack=niah_haystack)
    out["niah"] = niah.export_jsonl(items, tokenizer, data_dir / "niah.jsonl")
    for task in longctx.TASKS:
        task_items = longctx.build_tasks(tokenizer, longctx_length, longctx_per_task, seed=seed, tasks=[task],
                                         haystack=longctx_haystack)
        out[f"longctx_{task}"] = longctx.export_jsonl(task_items, tokenizer, data_dir / f"longctx_{task}.jsonl")
    return out


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def task_folder(include_path: str | os.PathLike, data_dir: str | os.PathLike | None) -> Iterator[Path]:
    """``include_path`` itself, or (when its YAMLs mention ``__SPARGE_DATA_DIR__``) a temporary copy
    with the placeholder replaced by the absolute ``data_dir``."""
    include = Path(include_path)
    if not include.is_dir():
        raise ValueError(f"include_path {include} is not a folder of lm-eval task YAMLs")
    files = [p for p in sorted(include.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    templated = [p for p in files if p.suffix == ".yaml" and DATA_PLACEHOLDER in p.read_text(encoding="utf-8")]
    if not templated:
        yield include
        return
    if data_dir is None:
        raise ValueError(f"the tasks in {include} read their data from {DATA_PLACEHOLDER}: pass data_dir "
                         f"(prepare_data writes the files)")
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        raise ValueError(f"data_dir {data_dir} does not exist (prepare_data writes it)")
    with tempfile.TemporaryDirectory(prefix="sparge-lm-eval-") as tmp:
        for src in files:
            dst = Path(tmp) / src.relative_to(include)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src in templated:
                dst.write_text(src.read_text(encoding="utf-8").replace(DATA_PLACEHOLDER, data_dir.as_posix()),
                               encoding="utf-8")
            else:
                shutil.copyfile(src, dst)
        yield Path(tmp)


def run_lm_eval(model, tokenizer, tasks: Sequence[str], include_path: str | os.PathLike | None = None,
                limit: float | None = None, method=None, *, method_params: dict | None = None,
                data_dir: str | os.PathLike | None = None, batch_size: int = 1, max_length: int | None = None,
                gen_kwargs: dict | None = None, log_samples: bool = False, random_seed: int = 0,
                sparge_backend: str = "auto", bootstrap_iters: int = 0) -> dict[str, Any]:
    """Evaluate ``tasks`` from a local YAML folder with ``lm_eval.simple_evaluate``.

    Args:
        model, tokenizer: the live model (evaluated with its current attention unless ``method``).
        tasks: task or group names defined under ``include_path``.
        include_path: folder of task YAMLs (default: the bundled ``evals/tasks``).
        limit: documents per task (an int) or a fraction (a float below 1).
        method, method_params, sparge_backend: a sparge method to apply for this run only.
        data_dir: folder of the JSONL files the bundled tasks read (see ``prepare_data``).
        batch_size, max_length: passed to HFLM (``max_length`` defaults to the model's context).
        gen_kwargs: generation overrides for generate_until tasks.
        log_samples: keep per-document records in the result (``"samples"``).
        random_seed: seeds Python, numpy, torch and few-shot sampling.
        bootstrap_iters: lm-eval's bootstrap for standard errors (0: skip it).

    Returns lm-eval's results dict (``results[task]["<metric>,none"]``, ``configs``, ``versions``...);
    ``lm_eval_scores`` flattens it.
    """
    _require()
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("no tasks given")
    wrapper = model_class()(pretrained=model, tokenizer=tokenizer, method=method, method_params=method_params,
                            sparge_backend=sparge_backend, batch_size=batch_size, max_length=max_length)
    try:
        with task_folder(include_path or TASKS_DIR, data_dir) as folder:
            manager = TaskManager(include_path=str(folder), include_defaults=False)
            results = lm_eval.simple_evaluate(
                model=wrapper, tasks=list(tasks), limit=limit, task_manager=manager, log_samples=log_samples,
                gen_kwargs=gen_kwargs, bootstrap_iters=bootstrap_iters, random_seed=random_seed,
                numpy_random_seed=random_seed, torch_random_seed=random_seed, fewshot_random_seed=random_seed)
    finally:
        wrapper.close()
    if results is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return results


def lm_eval_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results, without filter suffixes and stderr entries."""
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name, _, _ = key.partition(",")
            if name.endswith("_stderr") or key == "alias" or not isinstance(value, (int, float)):
                continue
            scores.setdefault(task, {})[name] = float(value)
    return scores
