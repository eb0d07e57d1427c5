"""lm-evaluation-harness adapter: lm-eval's own CLI and tasks on a live model with any attention method.

- ``sparge-hf`` is an lm-eval model (a subclass of ``lm_eval.models.huggingface.HFLM``), registered
  in lm-eval's model registry when this module is imported (a lazy entry: lm-eval's HF code loads
  when the model is first built). It takes a **loaded** model and tokenizer, or a name that
  ``calibrate.models.load_model`` knows (``smollm2``, ``tiny-llama``, a local folder or ``.gguf``), and
  applies a sparge method or calibrated per-layer config for the run through
  ``sparge_core.integrations.transformers.apply`` (``close()`` removes it again).
- From lm-eval's own command line: lm-eval 0.4.13 has no plugin mechanism for third-party models
  (the CLI only knows the models its registry holds when it starts), so ``python -m
  evals.lm_eval_cli`` (console script ``sparge-lm-eval``) imports this module and then runs lm-eval's
  own CLI unchanged (the workaround lm-eval's maintainers point to). Every lm-eval option works;
  ``--model_args`` are flat::

      sparge-lm-eval run --model sparge-hf --tasks niah_single_1 --device cuda \
          --model_args pretrained=smollm2,method=sparge,config=runs/smollm2.json,max_length=8192 \
          --metadata max_seq_lengths=[4096,8192]
      ... --model_args pretrained=smollm2,method=sparge-topk,topk=0.5

  ``method`` is a registry name (``sparge``, ``sparge-topk``, ``minference``, ``flexprefill``,
  ``dense``), ``config`` a calibrated config file or a folder holding ``sparge_config.json``; every
  other key that the method's constructor takes (``topk``, ``cdfthreshd``, ``simthreshd1``,
  ``pvthreshd``, ``budget_ratio``, ``gamma`` ...) is a hyperparameter, values parsed as numbers /
  lists; ``sparge_backend`` picks the kernel backend; the remaining keys are ``HFLM``'s
  (``max_length``, ``batch_size``, ``dtype`` ...). Unknown keys are an error.
- RULER (lm-eval's ``ruler`` tasks) sizes its synthetic prompts with a tokenizer it loads by name
  from ``tokenizer`` / ``pretrained``; for a project model name (not loadable by ``AutoTokenizer``)
  ``sparge-hf`` saves the tokenizer to ``tokenizer_folder(name)`` and the wrapper CLI passes that
  folder as ``--metadata tokenizer=...`` unless one is given.
- ``evals/tasks/*.yaml`` are this project's local tasks; they read JSONL files from a data folder
  given through lm-eval's task metadata (``--metadata data_dir=DIR`` or ``run_lm_eval(data_dir=)``;
  ``custom_dataset: !function evals.lm_eval_adapter.jsonl_dataset``):

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
- ``run_lm_eval`` builds the model wrapper and a ``TaskManager`` and calls ``lm_eval.simple_evaluate``
  (the bundled tasks, lm-eval's ``ruler`` folder, or any other local YAML folder).

lm-eval is optional: importing ``evals`` does not import it, and this module imports only lm-eval's
light registry (``is_available()`` says whether it is installed). Everything runs offline.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparge_core.atomic import atomic_dir

logger = logging.getLogger(__name__)

MODEL_NAME = "sparge-hf"
TASKS_DIR = Path(__file__).with_name("tasks")
INSTALL_HINT = "pip install 'sparge[lmeval]' (lm-eval==0.4.13 plus wonderwords and nltk for its RULER tasks)"
#: model_args that sparge-hf itself takes (the rest: the method's hyperparameters and HFLM's arguments)
OWN_ARGS = (
    "pretrained",
    "tokenizer",
    "method",
    "config",
    "method_params",
    "sparge_backend",
    "device",
    "dtype",
)

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
# registration (at import) and the lm-eval model
# --------------------------------------------------------------------------------------------
def register() -> bool:
    """Put ``sparge-hf`` into lm-eval's model registry as a lazy entry (``evals.lm_eval_adapter:SpargeHFLM``);
    False when lm-eval is not installed. Runs at import."""
    if not is_available():
        return False
    from lm_eval.api.registry import model_registry

    try:
        model_registry.register(MODEL_NAME, target=f"{__name__}:SpargeHFLM")
    except ValueError as err:  # held already: by this module's class (a re-import) or by someone else
        if getattr(model_registry.get(MODEL_NAME), "__module__", None) == __name__:
            return True
        logger.warning("lm-eval model %r is already registered by another package (%s)", MODEL_NAME, err)
        return False
    return True


def __getattr__(name: str):
    if name == "SpargeHFLM":  # lm-eval materialises the lazy registry entry through this attribute
        return model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_class() -> type:
    """The ``sparge-hf`` lm-eval model class (defined on first use; registered under ``sparge-hf``)."""
    global _MODEL_CLASS
    if _MODEL_CLASS is None:
        _MODEL_CLASS = _define_model_class()
    return _MODEL_CLASS


def parse_value(value: Any) -> Any:
    """A ``--model_args`` value as lm-eval's CLI would give it: numbers, booleans, None and
    Python literals (lists) from strings; anything else unchanged."""
    if not isinstance(value, str):
        return value
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return value


def _method_parameters(method: str) -> set[str]:
    from sparge_core.methods import method_class

    params = inspect.signature(method_class(method)).parameters
    return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _define_model_class() -> type:
    _require()
    import lm_eval.models  # noqa: F401  (fills the registry with the built-in names first)
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    hflm_args = {n for n in inspect.signature(HFLM.__init__).parameters if n not in ("self", "kwargs")}

    class SpargeHFLM(HFLM):
        """lm-eval's HF model around a live causal LM, with an optional sparge method applied.

        Args:
            pretrained: a loaded ``transformers`` model, or a name/path for ``calibrate.models.load_model``.
            tokenizer: its tokenizer (required with a loaded model: nothing is fetched); with a name,
                the loaded one (a tokenizer folder path may override it).
            method: None (the model's current attention), a method name (``"sparge"``, ``"sparge-topk"``,
                ``"minference"``, ...), an ``AttentionMethod``, or (as before) a config path/dict.
            config: a calibrated config (file, folder with ``sparge_config.json``, dict, ``ModelConfig``);
                ``method`` may then be None or ``"sparge"``.
            method_params: hyperparameters for a method name; flat keys that the method's
                constructor takes (``topk=0.5``) are added to them.
            sparge_backend: kernel backend passed to ``apply``.
            device, dtype: only used when ``pretrained`` is a name (an unavailable CUDA device falls
                back to the CPU with a warning, as lm-eval's HFLM does).
            **kwargs: HFLM's arguments (``batch_size``, ``max_length``, ...).
        """

        def __init__(
            self,
            pretrained,
            tokenizer=None,
            method=None,
            config=None,
            method_params: dict | None = None,
            sparge_backend: str = "auto",
            device: str | None = None,
            dtype=None,
            **kwargs,
        ):
            method, config = parse_value(method), parse_value(config)
            params = dict(method_params or {})
            takes = (
                _method_parameters(method) if isinstance(method, str) and _is_method_name(method) else set()
            )
            for key in list(kwargs):
                if key in takes:
                    params[key] = parse_value(kwargs.pop(key))
            unknown = sorted(k for k in kwargs if k not in hflm_args)
            if unknown:
                raise ValueError(
                    f"sparge-hf: unknown model_args {unknown}; it takes {list(OWN_ARGS)}, the method's "
                    f"hyperparameters ({sorted(takes) if takes else 'none without a method name'}) and "
                    f"HFLM's arguments"
                )
            kwargs = {k: parse_value(v) for k, v in kwargs.items()}
            self._sparge_name = None
            if isinstance(pretrained, (str, os.PathLike)):
                self._sparge_name = str(pretrained)
                pretrained, tokenizer = _load_named(self._sparge_name, tokenizer, device, dtype)
            if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
                raise ValueError(
                    "sparge-hf needs the tokenizer object of the live model (nothing is downloaded)"
                )
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
            self._sparge_applied = False
            self._sparge_description = None
            target = _method_target(method, config, params)
            if target is not None:
                from sparge_core.integrations.transformers import apply

                handle = apply(
                    self.model,
                    target,
                    backend=sparge_backend,
                    collect_stats=True,
                    **(params if isinstance(target, str) and _is_method_name(target) else {}),
                )
                self._sparge_applied = True
                self._sparge_description = handle.description
                logger.info("sparge-hf: applied %s", handle.description)

        @property
        def sparge_handle(self):
            """The ``SpargeAttention`` handle of the wrapped model (None when no method is applied)."""
            from sparge_core.integrations.transformers import handle_of

            return handle_of(self.model)

        def get_model_info(self) -> dict:
            """Model facts for lm-eval's results (``config``), with the sparge method and its measured
            sparsity; no Hub lookups (HFLM asks the Hub for a revision hash)."""
            model = self._model
            info = {
                "model_num_parameters": sum(p.numel() for p in model.parameters()),
                "model_dtype": str(getattr(model, "dtype", "")),
                "pretrained_name": self._sparge_name,
            }
            handle = self.sparge_handle
            info["sparge"] = (
                None
                if handle is None
                else {"method": self._sparge_description, "sparsity": handle.sparsity_report()["total"]}
            )
            return info

        def close(self) -> None:
            """Remove the method this wrapper applied (a method applied by the caller stays)."""
            if self._sparge_applied:
                from sparge_core.integrations.transformers import remove

                remove(self.model)
                self._sparge_applied = False

    SpargeHFLM.__module__ = __name__
    SpargeHFLM.__qualname__ = "SpargeHFLM"
    try:
        register_model(MODEL_NAME)(SpargeHFLM)  # replaces the lazy entry
    except ValueError as err:  # registered by an earlier copy of this module
        logger.warning(
            "lm-eval model %r was already registered (%s); using this definition directly", MODEL_NAME, err
        )
    return SpargeHFLM


def _is_method_name(name: str) -> bool:
    from sparge_core.methods import method_names

    return name in method_names()


def _method_target(method, config, params: dict):
    """What ``apply`` gets: a method name (with ``params``), a config, or None (no method)."""
    if config is not None:
        if method not in (None, "sparge"):
            raise ValueError(
                f"sparge-hf: config= is a calibrated sparge config; method must be 'sparge' or unset, "
                f"got {method!r}"
            )
        if params:
            raise ValueError(
                f"sparge-hf: hyperparameters {sorted(params)} cannot be combined with config= (the config "
                f"holds them per layer)"
            )
        return config
    if (
        isinstance(method, str)
        and not _is_method_name(method)
        and not Path(method).exists()
        and Path(method).suffix != ".json"
    ):
        from sparge_core.methods import method_names

        raise ValueError(f"sparge-hf: unknown method {method!r}; known: {method_names()} (or config=<file>)")
    if params and not isinstance(method, str):
        raise ValueError(f"sparge-hf: hyperparameters {sorted(params)} need a method name (method=...)")
    return method


def _load_named(name: str, tokenizer, device: str | None, dtype):
    import torch

    from calibrate.models import load_model

    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        if device is not None:
            logger.warning("sparge-hf: device %r is not available; using the CPU", device)
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = None if dtype in (None, "auto") else dtype
    model, loaded = load_model(name, device=device, dtype=dtype)
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    elif tokenizer is not None:
        loaded = tokenizer
    if needs_tokenizer_folder(name):
        export_tokenizer(loaded, tokenizer_folder(name))
    return model, loaded


# --------------------------------------------------------------------------------------------
# tokenizers for tasks that load one by name (lm-eval's RULER)
# --------------------------------------------------------------------------------------------
def needs_tokenizer_folder(name: str) -> bool:
    """Whether ``AutoTokenizer.from_pretrained(name)`` cannot load this model's tokenizer offline
    (project model names and ``.gguf`` files; a Hugging Face folder has its own tokenizer files)."""
    path = Path(name).expanduser()
    return not (path.is_dir() and (path / "config.json").is_file())


def tokenizer_folder(name: str) -> Path:
    """Where ``sparge-hf`` saves the tokenizer of a model loaded by name (``<cache>/sparge/tokenizers``)."""
    from calibrate.models import model_cache_dir

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).strip("._") or "model"
    return model_cache_dir().parent / "tokenizers" / safe


def export_tokenizer(tokenizer, folder: str | os.PathLike) -> Path:
    """``tokenizer.save_pretrained`` into ``folder``, replacing what is there (``sparge_core.atomic``:
    a reader never sees a half-written folder)."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        tokenizer.save_pretrained(tmp)
    return folder


register()


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


def prepare_data(
    data_dir: str | os.PathLike,
    tokenizer,
    *,
    corpus: str = "pydoc",
    doc_chars: int = 4000,
    max_docs: int | None = 16,
    niah_lengths: Sequence[int] = (2048,),
    niah_depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    niah_haystack: str = "classic",
    longctx_length: int = 2048,
    longctx_per_task: int = 4,
    longctx_haystack: str = "classic",
    seed: int = 0,
) -> dict[str, Path]:
    """Write every data file the bundled tasks read into ``data_dir``; returns ``{file stem: path}``."""
    from evals import longctx, niah

    data_dir = Path(data_dir)
    out = {"ppl": export_corpus_jsonl(corpus, data_dir / "ppl.jsonl", doc_chars=doc_chars, max_docs=max_docs)}
    items = niah.build_niah(tokenizer, niah_lengths, niah_depths, seed=seed, haystack=niah_haystack)
    out["niah"] = niah.export_jsonl(items, tokenizer, data_dir / "niah.jsonl")
    for task in longctx.TASKS:
        task_items = longctx.build_tasks(
            tokenizer, longctx_length, longctx_per_task, seed=seed, tasks=[task], haystack=longctx_haystack
        )
        out[f"longctx_{task}"] = longctx.export_jsonl(
            task_items, tokenizer, data_dir / f"longctx_{task}.jsonl"
        )
    return out


# --------------------------------------------------------------------------------------------
# the data of the bundled tasks, through lm-eval's task metadata
# --------------------------------------------------------------------------------------------
def jsonl_dataset(data_dir: str | os.PathLike | None = None, file: str | None = None, **_metadata) -> dict:
    """``custom_dataset`` of the bundled tasks: ``{"test": Dataset}`` of ``<data_dir>/<file>``;
    ``data_dir`` comes from the task metadata (``--metadata data_dir=DIR``), ``file`` from the
    task's ``dataset_kwargs``."""
    import datasets

    if not file:
        raise ValueError("the task's dataset_kwargs must name its JSONL file (file: ...)")
    if not data_dir:
        raise ValueError(
            f"this task reads {file} from a data folder: pass --metadata data_dir=<folder> (lm-eval CLI) "
            f"or run_lm_eval(data_dir=...); evals.lm_eval_adapter.prepare_data writes it"
        )
    path = Path(data_dir).expanduser() / file
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist; evals.lm_eval_adapter.prepare_data(data_dir, tokenizer) writes it"
        )
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
def ruler_tasks_dir() -> Path:
    """lm-eval's own ``ruler`` task folder (its YAMLs and generators)."""
    _require()
    spec = importlib.util.find_spec("lm_eval.tasks")
    return Path(next(iter(spec.submodule_search_locations))) / "ruler"


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[Any],
    include_path: str | os.PathLike | None = None,
    limit: float | None = None,
    method=None,
    *,
    method_params: dict | None = None,
    data_dir: str | os.PathLike | None = None,
    metadata: dict | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    gen_kwargs: dict | None = None,
    log_samples: bool = False,
    random_seed: int = 0,
    sparge_backend: str = "auto",
    bootstrap_iters: int = 0,
) -> dict[str, Any]:
    """Evaluate ``tasks`` from a local YAML folder with ``lm_eval.simple_evaluate``.

    Args:
        model, tokenizer: the live model (evaluated with its current attention unless ``method``).
        tasks: task or group names defined under ``include_path``, or lm-eval ``Task`` objects built
            earlier (``evals.ruler.RulerTasks``), which are evaluated as they are.
        include_path: folder of task YAMLs (default: the bundled ``evals/tasks``; ``ruler_tasks_dir()``
            for lm-eval's RULER).
        limit: documents per task (an int) or a fraction (a float below 1).
        method, method_params, sparge_backend: a sparge method to apply for this run only.
        data_dir: folder of the JSONL files the bundled tasks read (``prepare_data``), passed as the
            task metadata ``data_dir``.
        metadata: more task metadata (RULER: ``tokenizer``, ``max_seq_lengths``).
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
    folder = Path(include_path or TASKS_DIR)
    if not folder.is_dir():
        raise ValueError(f"include_path {folder} is not a folder of lm-eval task YAMLs")
    meta = dict(metadata or {})
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser().resolve()
        if not data_dir.is_dir():
            raise ValueError(f"data_dir {data_dir} does not exist (prepare_data writes it)")
        meta["data_dir"] = str(data_dir)
    wrapper = model_class()(
        pretrained=model,
        tokenizer=tokenizer,
        method=method,
        method_params=method_params,
        sparge_backend=sparge_backend,
        batch_size=batch_size,
        max_length=max_length,
    )
    try:
        manager = TaskManager(include_path=str(folder), include_defaults=False, metadata=meta)
        results = lm_eval.simple_evaluate(
            model=wrapper,
            tasks=list(tasks),
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            gen_kwargs=gen_kwargs,
            bootstrap_iters=bootstrap_iters,
            random_seed=random_seed,
            numpy_random_seed=random_seed,
            torch_random_seed=random_seed,
            fewshot_random_seed=random_seed,
        )
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
