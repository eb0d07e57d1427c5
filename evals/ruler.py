"""The ``ruler`` suite: lm-eval's own RULER tasks (0.4.13) on a live model, one run per context length.

Which RULER tasks run offline (``OFFLINE_TASKS``, the default): those whose haystacks lm-eval
generates itself.

- ``niah_single_1`` (a repeated sentence haystack, a numeric needle), ``niah_multikey_2`` and
  ``niah_multikey_3`` (haystacks of other needles; numbers / UUIDs), ``ruler_fwe`` (frequent words,
  a Zipf-sampled vocabulary) run on any tokenizer;
- ``ruler_vt`` (variable tracking) and ``ruler_cwe`` (common words; ``wonderwords``' word lists) need a
  subword tokenizer and lengths of 2K tokens or more: with the tests' byte-level tokenizer their
  few-shot example alone exceeds the length (lm-eval's ``ruler_vt`` generator then loops forever,
  ``ruler_cwe`` produces empty answers and fails in scoring), so the tests leave them out.

``DOWNLOAD_TASKS`` are refused, by name: ``niah_single_2``, ``niah_single_3``, ``niah_multikey_1``,
``niah_multivalue`` and ``niah_multiquery`` use Paul Graham's essays as haystack (the Hugging Face
dataset ``baber/paul_graham_essays``, plus nltk's ``punkt_tab`` sentence model to insert needles at
sentence boundaries); ``ruler_qa_squad`` and ``ruler_qa_hotpot`` download SQuAD v2 / HotpotQA.
lm-eval's RULER module also tries to download ``punkt_tab`` when it is imported; offline that
attempt fails at once and the tasks above do not need it.

What the project's own generators (``evals.niah``, ``evals.longctx``) still give that lm-eval lacks:
the needle-depth x length grid and its heatmap (RULER draws depths at random), multi-key retrieval
with distractors at a controlled depth, multi-value and QA tasks that run offline (RULER's need the
essay / SQuAD / HotpotQA downloads), the classic / corpus haystacks, and exact token lengths (RULER
fits prompts under each length); and they produced the committed ``niah`` / ``longctx`` results.

Scores are RULER's string-match accuracies in [0, 1], per task and length, plus their mean.

Items: lm-eval's generators make 500 samples per task and length whatever ``limit`` is (minutes per
length at 16K-32K, most of a run's time). ``RulerTasks(..., num_samples=N)`` (the suite passes
``--per-task``) has lm-eval's own generator functions make only N, by capping their ``num_samples``
argument while the tasks are built; prompts, answers and scoring are lm-eval's. The generators draw
from Python's and NumPy's global random generators, which are seeded with ``--seed`` before each
length is built, so a run's items are reproducible and every method of a run sees the same items.
Needs the ``lmeval`` extra (lm-eval 0.4.13, wonderwords, nltk); with another lm-eval whose task files
differ, the cap may not apply (a warning says so) and the full 500 are generated.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

logger = logging.getLogger(__name__)

OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
DOWNLOAD_TASKS = {
    **dict.fromkeys(
        ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"),
        "its haystack is Paul Graham's essays (Hugging Face dataset baber/paul_graham_essays) and it "
        "needs nltk's punkt_tab",
    ),
    "ruler_qa_squad": "it downloads SQuAD v2 (rajpurkar.github.io)",
    "ruler_qa_hotpot": "it downloads HotpotQA (huggingface.co)",
    "ruler": "the group includes the tasks that download data; name the offline tasks instead",
}
LABEL = "RULER (lm-eval synthetic tasks)"


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """The tasks, or ValueError naming one that needs a download or that RULER does not have."""
    tasks = list(tasks)
    for task in tasks:
        if task in DOWNLOAD_TASKS:
            raise ValueError(
                f"RULER task {task!r} does not run offline: {DOWNLOAD_TASKS[task]}; offline tasks: "
                f"{list(OFFLINE_TASKS)}"
            )
        if task not in OFFLINE_TASKS:
            raise ValueError(f"unknown RULER task {task!r}; offline tasks: {list(OFFLINE_TASKS)}")
    missing = [m for m in ("lm_eval", "wonderwords", "nltk") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"the ruler suite needs {missing}: pip install 'sparge[lmeval]'")
    return tasks


#: lm-eval's RULER sample generators (globals of its task modules) whose ``num_samples`` is capped
GENERATORS = ("generate_samples", "sys_vartrack_w_noise_random", "sys_word_pair_random", "sys_kwext")


def capped_generator(generator: Callable, num_samples: int) -> Callable | None:
    """``generator`` making at most ``num_samples`` samples (None if it takes no ``num_samples``)."""
    sig = inspect.signature(generator)
    if "num_samples" not in sig.parameters:
        return None

    @functools.wraps(generator)
    def capped(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        bound.arguments["num_samples"] = min(int(bound.arguments["num_samples"]), num_samples)
        return generator(*bound.args, **bound.kwargs)

    return capped


@contextlib.contextmanager
def generating_at_most(tasks: Sequence[str], num_samples: int):
    """While active, lm-eval's RULER task modules of ``tasks`` generate at most ``num_samples`` samples
    per length. lm-eval loads a task file's module once per process and reuses it when it builds the
    task; the generators are replaced in that module for the duration (restored after); where nothing
    matches (another lm-eval layout) nothing is replaced."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from .lm_eval_adapter import ruler_tasks_dir

    wanted, patches = set(tasks), []
    for path in sorted(ruler_tasks_dir().glob("*.yaml")):
        task = load_yaml(path, resolve_func=False, recursive=False).get("task")
        if not isinstance(task, str) or task not in wanted:  # a group file lists its tasks
            continue
        module_globals = getattr(load_yaml(path, recursive=False).get("custom_dataset"), "__globals__", None)
        for name in GENERATORS:
            capped = capped_generator(module_globals[name], num_samples) if module_globals and callable(
                module_globals.get(name)) else None
            if capped is not None:
                patches.append(mock.patch.dict(module_globals, {name: capped}))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def _seed_generators(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)


class RulerTasks:
    """lm-eval's RULER task objects, built once per context length and reused for every method.

    lm-eval's RULER generators make their whole sample set (500 per task and length) when a task is
    built, whatever ``limit`` is; building the tasks afresh for every method repeated that work (at 4K
    and 8K on the H200 it took most of the suite's time). The task objects hold only the generated
    documents; each evaluation builds its own requests from them, so reusing them gives the same items.
    Use it inside ``with``: the exported tokenizer folder RULER sizes its prompts with is removed after.
    """

    def __init__(self, tokenizer, tasks: Sequence[str], *, num_samples: int | None = None, seed: int = 0):
        self.tokenizer = tokenizer
        self.tasks = check_tasks(tasks)
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
            raise ValueError(f"num_samples must be a positive integer or None, got {num_samples!r}")
        self.num_samples = num_samples  # None: lm-eval's own 500 per task and length
        self.seed = int(seed)
        self._by_length: dict[int, list] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._folder: Path | None = None

    def __enter__(self) -> RulerTasks:
        from .lm_eval_adapter import export_tokenizer

        self._tmp = tempfile.TemporaryDirectory(prefix="sparge-ruler-tok-")
        # RULER sizes its prompts with a tokenizer it loads by name: hand it this model's
        self._folder = export_tokenizer(self.tokenizer, Path(self._tmp.name) / "tokenizer")
        return self

    def __exit__(self, *exc) -> None:
        self._by_length.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
        self._tmp = self._folder = None

    def at(self, length: int) -> list:
        """The task objects at ``length`` (built on first use)."""
        if self._folder is None:
            raise RuntimeError("RulerTasks is used outside its `with` block")
        length = int(length)
        if length not in self._by_length:
            from lm_eval.tasks import TaskManager, get_task_dict

            from .lm_eval_adapter import ruler_tasks_dir

            manager = TaskManager(include_path=str(ruler_tasks_dir()), include_defaults=False,
                                  metadata={"tokenizer": str(self._folder), "max_seq_lengths": [length]})
            cap = (generating_at_most(self.tasks, self.num_samples) if self.num_samples
                   else contextlib.nullcontext())
            with cap:
                _seed_generators(self.seed)
                built = get_task_dict(list(self.tasks), manager)
            self._by_length[length] = [built[name] for name in self.tasks]
            if self.num_samples:
                sizes = {name: _num_docs(built[name]) for name in self.tasks}
                over = {name: n for name, n in sizes.items() if n is not None and n > self.num_samples}
                if over:
                    logger.warning("RULER at %d: lm-eval generated %s samples where %d were asked (the cap did "
                                   "not apply to this lm-eval version); the run is slower, the items alike",
                                   length, over, self.num_samples)
        return self._by_length[length]


def _num_docs(task) -> int | None:
    try:
        return len(task.dataset["test"])
    except (AttributeError, KeyError, TypeError):
        return None


def run_ruler(
    model,
    tokenizer,
    tasks: Sequence[str] | RulerTasks,
    lengths: Sequence[int],
    *,
    per_task: int,
    max_gen_toks: int | None = None,
) -> dict[str, Any]:
    """Scores ``{"<task>@<length>": accuracy, "average@<length>": ..., "average": ...}`` of the model
    with its current attention (apply a method around this call). ``tasks``: names, or a
    ``RulerTasks`` (inside its ``with``) to reuse tasks built for an earlier method."""
    if not isinstance(tasks, RulerTasks):
        with RulerTasks(tokenizer, tasks, num_samples=per_task) as built:
            return run_ruler(model, tokenizer, built, lengths, per_task=per_task, max_gen_toks=max_gen_toks)
    from .lm_eval_adapter import lm_eval_scores, ruler_tasks_dir, run_lm_eval

    names = tasks.tasks
    scores: dict[str, float] = {}
    for length in lengths:
        results = run_lm_eval(
            model,
            tokenizer,
            tasks.at(length),
            include_path=ruler_tasks_dir(),
            limit=per_task,
            max_length=int(length),
            gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
        )
        flat = lm_eval_scores(results)
        per_length = []
        for task in names:
            value = flat.get(task, {}).get(str(length))
            if value is None or value < 0:
                raise RuntimeError(f"RULER task {task} gave no score at length {length}: {flat.get(task)}")
            scores[f"{task}@{length}"] = value
            per_length.append(value)
        scores[f"average@{length}"] = sum(per_length) / len(per_length)
    scores["average"] = sum(scores[f"average@{length}"] for length in lengths) / len(lengths)
    return scores


def suite_ruler(args, model, tokenizer, settings, model_name: str) -> list[Path]:
    """``python -m evals ruler``: one result file per method setting."""
    from .runner import sparsity_summary, write_result

    tasks = check_tasks(args.ruler_tasks or OFFLINE_TASKS)
    lengths = args.suite_lengths["ruler"]
    paths = []
    # built once per length (only the items evaluated, seeded), shared by every method
    with RulerTasks(tokenizer, tasks, num_samples=args.per_task, seed=args.seed) as built:
        for s in settings:
            t0 = time.perf_counter()
            with s.applied(model, backend=args.backend) as handle:
                scores = run_ruler(
                    model, tokenizer, built, lengths, per_task=args.per_task, max_gen_toks=args.max_gen_toks
                )
                spars = sparsity_summary(handle)
            logger.info("ruler %s: %.3f", s.label, scores["average"])
            paths.append(
                write_result(
                    args.out,
                    "ruler",
                    model_name,
                    s,
                    scores=scores,
                    sparsity=spars,
                    timings={"seconds": time.perf_counter() - t0},
                    data={
                        "tasks": tasks,
                        "lengths": lengths,
                        "per_task": args.per_task,
                        "seed": args.seed,
                        "max_gen_toks": args.max_gen_toks,
                        "label": LABEL,
                    },
                )
            )
    return paths
