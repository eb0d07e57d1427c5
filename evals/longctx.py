"""Long-context quality: a generated LongBench substitute (RULER-style tasks) and a loader/scorer for
the real LongBench v1 files when a user has them locally.

lm-eval's own RULER tasks that run offline (multi-key NIAH, vt, cwe, fwe) are the ``ruler`` suite
(``evals.ruler``); this generator stays for what they lack offline (multi-value NIAH and QA, whose
RULER versions download essays / SQuAD / HotpotQA), exact token lengths, filler from a local corpus,
and the committed ``longctx`` results.

**LongBench substitute (generated).** LongBench cannot be downloaded here, so ``build_tasks``
generates long-context tasks in the style of RULER, each prompt exactly ``length`` tokens of the
model's tokenizer, deterministic for a seed:

=========  =====================================================================  ==========
task       what the model must do                                                 metric
=========  =====================================================================  ==========
mk_niah    the context is nothing but "secret number for <key>" lines; return      substring
           the number of one key (all other lines are distractors)
mv_niah    one key has four numbers scattered through filler text (plus two        recall
           distractor keys); return all four
vt         variable tracking: follow chains ``VAR A = 12345``, ``VAR B = VAR A``    recall
           planted in filler; list every variable that ends up holding a value
cwe        common-word extraction: a list of made-up words in which ten occur      recall
           many times and the rest rarely; name the ten
fwe        frequent-word extraction: made-up words drawn from a Zipf law; name     recall
           the three most frequent
qa         question answering over template facts about fictional people           qa_f1
           planted in filler text (with same-template distractor facts)
=========  =====================================================================  ==========

Metrics (``METRICS``): ``substring`` is 1 when any gold answer occurs in the output as a whole word
(case-insensitive); ``recall`` is the fraction of the gold items that occur (RULER's
``string_match_all``); ``qa_f1`` is the token F1 after lower-casing and removing punctuation and
articles, maximised over gold answers. Scores are reported as 100 x the mean per task, and
``average`` is the unweighted mean over tasks, labelled ``LABEL``. Filler (``haystack``, for mv_niah,
vt and qa) is the classic pass-key filler by default, or a ``calibrate.data`` corpus: SmolLM2-135M
(dense, CPU, 2 items per task at 1K tokens) averaged 45.6 with the classic filler and 21.4 with
pydoc, so the default leaves more room to see a sparse method lose accuracy. Words for cwe/fwe are
pronounceable made-up words from a seeded syllable generator, so no word list is needed.

**LongBench (real data, when present).** ``load_longbench`` reads LongBench v1 JSONL files
(fields ``input``, ``context``, ``answers``, ``all_classes``, ``length``, ``dataset``, ``_id``)
through ``datasets`` (offline) when it is installed, plain ``json`` otherwise; builds each task's
prompt (our own wording of the official per-task instructions); cuts the middle of prompts longer
than ``max_length`` tokens (keeping the first and last halves); and uses the chat template except
for the few-shot and code tasks. ``score_longbench`` decodes greedily with the official per-task
generation budgets and scores with our implementations of the per-task metrics: qa_f1, ROUGE-L
(LCS-based F1), classification, retrieval, count and code edit similarity (difflib's ratio instead
of fuzzywuzzy's). Chinese tasks are tokenised by character instead of jieba words, so their
numbers differ slightly from the official ones.

Neither part changes the model's attention: wrap calls in the method you want to measure.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import string
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

import torch

from evals.niah import (
    Haystack,
    answer_found,
    assemble,
    encode,
    generate_texts,
    prompt_frame,
    random_number,
    special_prefix,
    uses_chat,
)
from sparge_core.atomic import atomic_open

logger = logging.getLogger(__name__)

LABEL = "LongBench substitute (generated)"
TASKS = ("mk_niah", "mv_niah", "vt", "cwe", "fwe", "qa")

# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop ASCII punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token sequences."""
    common = Counter(prediction_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(prediction_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best token F1 over the gold answers, after ``normalize_answer``."""
    pred = normalize_answer(prediction).split()
    return max((token_f1(pred, normalize_answer(a).split()) for a in answers), default=0.0)


def substring_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when any gold answer occurs in the prediction as a whole word, else 0.0."""
    return float(any(answer_found(prediction, a) for a in answers))


def recall_match(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of the gold items that occur in the prediction as whole words."""
    if not answers:
        raise ValueError("recall needs at least one gold item")
    return sum(answer_found(prediction, a) for a in answers) / len(answers)


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "substring": substring_match,
    "recall": recall_match,
    "qa_f1": qa_f1,
}


def score_answer(metric: str, prediction: str, answers: Sequence[str]) -> float:
    """A generated task's metric, in [0, 1]."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(METRICS)}")
    return METRICS[metric](prediction, answers)


# --------------------------------------------------------------------------------------------
# generated tasks
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskItem:
    """One generated long-context prompt of exactly ``length`` tokens, its gold answers and metric."""

    task: str
    input_ids: torch.Tensor  # (length,) int64
    answers: list[str]
    metric: str
    length: int
    max_new_tokens: int
    question: str
    haystack: str
    seed: int
    index: int
    extra: dict[str, Any] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "input_ids"}


@dataclass(frozen=True)
class _Spec:
    """What a task generator returns before assembly."""

    instruction: str
    question: str
    lead: str
    answers: list[str]
    planted: list[tuple[float, str]] = field(default_factory=list)  # (depth, sentence) into the filler
    #: own context instead of filler: n tokens -> (pieces of exactly n tokens, answers or None to keep ``answers``)
    body: Callable[[int], tuple[list[list[int]], list[str] | None]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


#: (metric, generation budget in tokens) per task
TASK_SETTINGS: dict[str, tuple[str, int]] = {
    "mk_niah": ("substring", 16),
    "mv_niah": ("recall", 48),
    "vt": ("recall", 40),
    "cwe": ("recall", 96),
    "fwe": ("recall", 40),
    "qa": ("qa_f1", 24),
}

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def made_up_words(rng: random.Random, count: int, exclude: Iterable[str] = ()) -> list[str]:
    """``count`` distinct pronounceable non-words of two or three consonant-vowel syllables."""
    seen, out = set(exclude), []
    while len(out) < count:
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 3))))
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def _distinct_numbers(rng: random.Random, count: int, digits: int = 7) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        v = random_number(rng, digits)
        if v not in values:
            values.append(v)
    return values


def _pad_piece(tokenizer) -> list[int]:
    for text in ("\n", " "):
        ids = encode(tokenizer, text)
        if len(ids) == 1:
            return ids
    raise ValueError("the tokenizer has no single-token newline or space to pad a word list with")


def _fit(entries: list[tuple[str, list[int]]], budget: int, keep: set[str],
         pad: list[int]) -> tuple[list[list[int]], list[str]]:
    """Drop entries whose name is not in ``keep`` from the end until the total fits ``budget``, then pad
    to it exactly. Returns the pieces and the names of the entries kept, in order."""
    entries = list(entries)
    total = sum(len(ids) for _, ids in entries)
    i = len(entries) - 1
    while total > budget and i >= 0:
        if entries[i][0] not in keep:
            total -= len(entries[i][1])
            del entries[i]
        i -= 1
    if total > budget:
        raise ValueError(f"the length is too short: the required entries need {total} > {budget} tokens")
    return [ids for _, ids in entries] + [pad] * (budget - total), [name for name, _ in entries]


def _word_entries(tokenizer, words: Iterable[str], cache: dict[str, list[int]], sep: str) -> list[tuple[str, list[int]]]:
    out = []
    for w in words:
        if w not in cache:
            cache[w] = encode(tokenizer, sep + w)
        out.append((w, cache[w]))
    return out


def _mk_niah(tokenizer, rng: random.Random) -> _Spec:
    key = made_up_words(rng, 1)[0]
    value = random_number(rng)

    def body(budget: int) -> tuple[list[list[int]], None]:
        line = encode(tokenizer, f" The secret number for {key} is {value}.")
        sentences, total = [], len(line)
        used_keys, used_values = {key}, {value}
        while total < budget:
            k = made_up_words(rng, 1, exclude=used_keys)[0]
            v = random_number(rng)
            if v in used_values:
                continue
            used_keys.add(k)
            used_values.add(v)
            ids = encode(tokenizer, f" The secret number for {k} is {v}.")
            sentences.append((k, ids))
            total += len(ids)
        sentences.insert(rng.randrange(len(sentences) + 1), (key, line))
        return _fit(sentences, budget, {key}, _pad_piece(tokenizer))[0], None

    return _Spec(
        instruction="The text below lists many secret numbers, each belonging to a word. Read it carefully: "
                    "you will be asked for one of the numbers afterwards.",
        question=f"What is the secret number for {key} in the text above?",
        lead=f"The secret number for {key} is", answers=[value], body=body, extra={"key": key})


def _mv_niah(tokenizer, rng: random.Random) -> _Spec:
    key, *others = made_up_words(rng, 3)
    values = _distinct_numbers(rng, 6)
    planted = [(rng.random(), f"One of the secret numbers for {key} is {v}.") for v in values[:4]]
    planted += [(rng.random(), f"One of the secret numbers for {k} is {v}.") for k, v in zip(others, values[4:])]
    return _Spec(
        instruction="Some secret numbers are hidden in the long text below; a word can have several of them. "
                    "Read the text carefully: you will be asked for all numbers of one word afterwards.",
        question=f"What are all the secret numbers for {key} in the text above?",
        lead=f"The secret numbers for {key} are:", answers=values[:4], planted=planted, extra={"key": key})


def _vt(tokenizer, rng: random.Random, hops: int = 4, chains: int = 2) -> _Spec:
    names: list[str] = []
    while len(names) < (hops + 1) * chains:
        name = _var_name(rng)
        if name not in names:
            names.append(name)
    values = _distinct_numbers(rng, chains, digits=5)
    planted = []
    for c in range(chains):
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        depths = sorted(rng.random() for _ in chain)
        planted.append((depths[0], f"VAR {chain[0]} = {values[c]}."))
        planted += [(d, f"VAR {cur} = VAR {prev}.") for d, prev, cur in zip(depths[1:], chain, chain[1:])]
    answers = names[:hops + 1]
    return _Spec(
        instruction="The long text below contains variable assignments of the form 'VAR X = ...'. "
                    "Keep track of which value each variable ends up holding.",
        question=f"Which variables in the text above hold the value {values[0]}, assigned directly or through "
                 f"other variables? List all of them.",
        lead=f"The variables that hold the value {values[0]} are:", answers=answers, planted=planted,
        extra={"value": values[0]})


def _cwe(tokenizer, rng: random.Random, n_common: int = 10) -> _Spec:
    common = made_up_words(rng, n_common)

    def body(budget: int) -> tuple[list[list[int]], None]:
        cache: dict[str, list[int]] = {}
        sample = _word_entries(tokenizer, common, cache, "\n")
        per_entry = max(1.0, sum(len(ids) for _, ids in sample) / len(sample))
        entries_fit = int(budget / per_entry)
        freq_common = max(3, min(30, entries_fit // 40))
        freq_rare = max(1, freq_common // 10)
        words = common * freq_common
        used = set(common)
        total = sum(len(cache[w]) for w in words)
        while total < budget:
            rare = made_up_words(rng, 1, exclude=used)[0]
            used.add(rare)
            words += [rare] * freq_rare
            total += freq_rare * len(_word_entries(tokenizer, [rare], cache, "\n")[0][1])
        rng.shuffle(words)
        return _fit(_word_entries(tokenizer, words, cache, "\n"), budget, set(common), _pad_piece(tokenizer))[0], None

    return _Spec(
        instruction="Below is a list of made-up words, one per line. Some words occur much more often "
                    "than the others.",
        question=f"Which {n_common} words occur most often in the list above?",
        lead=f"The {n_common} most common words in the list are:", answers=common, body=body)


def _fwe(tokenizer, rng: random.Random, vocab: int = 30, alpha: float = 2.0, top: int = 3) -> _Spec:
    words = made_up_words(rng, vocab)
    weights = [1.0 / (r + 1) ** alpha for r in range(vocab)]
    norm = sum(weights)

    def body(budget: int) -> tuple[list[list[int]], list[str]]:
        cache: dict[str, list[int]] = {}
        entries = _word_entries(tokenizer, words, cache, " ")
        per_word = sum(w / norm * len(ids) for w, (_, ids) in zip(weights, entries))
        n = int(budget / max(per_word, 1.0)) + vocab
        counts = [max(1, int(n * w / norm)) for w in weights]
        seq = [w for w, c in zip(words, counts) for _ in range(c)]
        rng.shuffle(seq)
        pieces, kept = _fit(_word_entries(tokenizer, seq, cache, " "), budget, set(), _pad_piece(tokenizer))
        ranked = Counter(kept).most_common()
        if len(ranked) <= top or ranked[top - 1][1] <= ranked[top][1]:
            raise ValueError("the length is too short for a clear top-3 in the fwe task")
        return pieces, [w for w, _ in ranked[:top]]

    return _Spec(
        instruction="Below is a text in a made-up language. Some of its words are much more frequent than others.",
        question=f"Which {top} words occur most often in the text above?",
        lead=f"The {top} most frequent words in the text are:", answers=[], body=body)


# fmt: off
_FIRST = ("Alma", "Bruno", "Celia", "Dorian", "Edith", "Felix", "Greta", "Hector", "Ines", "Jasper", "Kira",
          "Lionel", "Marta", "Nils", "Olga", "Piers", "Rosa", "Silas", "Tilda", "Ulric", "Vera", "Walter",
          "Yvonne", "Zeno")
_LAST = ("Ashdown", "Brightwater", "Calloway", "Dunmore", "Everly", "Fairbanks", "Greenhalgh", "Hollis",
         "Ingram", "Jessop", "Kettering", "Lockhart", "Merriweather", "Northcott", "Oakley", "Pemberton",
         "Quarrie", "Radcliffe", "Stanhope", "Thornbury", "Underwood", "Vickery", "Whitlock", "Yardley")
_JOBS = ("clock maker", "lighthouse keeper", "bee keeper", "ship carpenter", "map engraver", "glass blower",
         "piano tuner", "rope maker", "bridge inspector", "cheese merchant", "train conductor", "book binder")
_TOWNS = ("Port Ellery", "Marrow Bay", "Highcombe Vale", "Saltmere", "Fenwick Cross", "Oldbridge Hollow",
          "Kestrel Point", "Larkspur Green", "Mossley Ford", "Wrenfield", "Ambergate", "Thistle Down")
_DISHES = ("roasted pumpkin soup", "lemon barley cake", "smoked trout pie", "plum and walnut tart",
           "spiced lentil stew", "honey glazed parsnips", "mushroom barley risotto", "pear and ginger crumble")
# fmt: on


def _qa(tokenizer, rng: random.Random, n_people: int = 6) -> _Spec:
    people: list[str] = []
    while len(people) < n_people:
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        if name not in people and name.split()[0] not in {p.split()[0] for p in people}:
            people.append(name)
    template = rng.choice(("job", "town", "dish"))
    facts, gold = [], ""
    for i, person in enumerate(people):
        job, town, dish = rng.choice(_JOBS), rng.choice(_TOWNS), rng.choice(_DISHES)
        facts.append(f"{person} works as a {job} in {town}." if template != "dish"
                     else f"The favourite dish of {person} is {dish}.")
        if i == 0:
            gold = {"job": job, "town": town, "dish": dish}[template]
    person = people[0]
    question, lead = {
        "job": (f"What does {person} work as?", f"{person} works as a"),
        "town": (f"In which town does {person} work?", f"{person} works in"),
        "dish": (f"What is the favourite dish of {person}?", f"The favourite dish of {person} is"),
    }[template]
    return _Spec(
        instruction="The long text below mentions some facts about a few people. Read it carefully and "
                    "answer the question after it briefly, using the text.",
        question=question, lead=lead, answers=[gold], planted=[(rng.random(), f) for f in facts],
        extra={"template": template, "person": person})


_GENERATORS: dict[str, Callable[[Any, random.Random], _Spec]] = {
    "mk_niah": _mk_niah, "mv_niah": _mv_niah, "vt": _vt, "cwe": _cwe, "fwe": _fwe, "qa": _qa,
}


def build_tasks(tokenizer, length: int, n_per_task: int, seed: int = 0, tasks: Sequence[str] | None = None, *,
                haystack: str = "classic", chat: bool | None = None) -> list[TaskItem]:
    """``n_per_task`` prompts of exactly ``length`` tokens for each task (default: all of ``TASKS``).

    Args:
        tokenizer: the model's tokenizer.
        length: prompt length in tokens.
        n_per_task: items per task.
        seed: the same seed (tokenizer, length, haystack) gives the same items.
        tasks: a subset of ``TASKS``.
        haystack: filler for mv_niah, vt and qa: ``"classic"`` or a ``calibrate.data`` corpus.
        chat: use the chat template (default: when the tokenizer has one).
    """
    tasks = list(TASKS if tasks is None else tasks)
    unknown = [t for t in tasks if t not in _GENERATORS]
    if unknown:
        raise ValueError(f"unknown long-context tasks {unknown}; choose from {list(TASKS)}")
    if length < 1 or n_per_task < 1:
        raise ValueError(f"length and n_per_task must be positive, got {length} and {n_per_task}")
    hay = Haystack(tokenizer, haystack)
    items = []
    for task in tasks:
        for index in range(n_per_task):
            rng = random.Random(f"longctx/{seed}/{task}/{length}/{index}/{haystack}")
            items.append(_build_one(tokenizer, hay, task, length, seed, index, rng, chat))
    logger.info("built %d long-context items (%s), %d tokens each", len(items), LABEL, length)
    return items


def _build_one(tokenizer, hay: Haystack, task: str, length: int, seed: int, index: int, rng: random.Random,
               chat: bool | None) -> TaskItem:
    spec = _GENERATORS[task](tokenizer, rng)
    frame = prompt_frame(tokenizer, spec.instruction, spec.question, spec.lead, chat)
    answers = None
    if spec.body is not None:
        budget = length - len(frame.head) - len(frame.tail)
        if budget < 16:
            raise ValueError(f"length {length} is too short for {task}: the prompt alone takes "
                             f"{len(frame.head) + len(frame.tail)} tokens")
        pieces, answers = spec.body(budget)
        ids = frame.head + [t for piece in pieces for t in piece] + frame.tail
    else:
        planted = [(d, encode(tokenizer, " " + s)) for d, s in spec.planted]
        ids = assemble(frame, hay, planted, length, rng).input_ids
    metric, budget_new = TASK_SETTINGS[task]
    assert len(ids) == length, (task, len(ids), length)
    return TaskItem(task, torch.tensor(ids, dtype=torch.long), list(answers or spec.answers), metric, length, budget_new,
                    spec.question, hay.source if spec.body is None else "own", seed, index,
                    {**spec.extra, "chat": frame.chat})


def _task_scores(rows: Sequence[dict[str, Any]], label: str) -> dict[str, Any]:
    per_task: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        per_task[row["task"]].append(row["score"])
    scores = {t: 100.0 * sum(v) / len(v) for t, v in per_task.items()}
    return {
        "label": label,
        "scores": scores,
        "average": sum(scores.values()) / len(scores) if scores else float("nan"),
        "n": {t: len(v) for t, v in per_task.items()},
        "samples": list(rows),
    }


def score_task_predictions(items: Sequence[TaskItem], predictions: Sequence[str]) -> dict[str, Any]:
    """Per-task scores (100 x mean) and their average for given outputs (no model involved)."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    rows = [{**item.meta(), "prediction": pred, "score": score_answer(item.metric, pred, item.answers)}
            for item, pred in zip(items, predictions)]
    result = _task_scores(rows, LABEL)
    result["metrics"] = {item.task: item.metric for item in items}
    return result


def score_tasks(model, tokenizer, items: Sequence[TaskItem], max_new_tokens: int | dict[str, int] | None = None,
                batch_size: int = 1) -> dict[str, Any]:
    """Greedy-decode every item with the model's current attention and score it.

    ``max_new_tokens``: one budget for all tasks, a ``{task: budget}`` override, or None for the
    per-task defaults in ``TASK_SETTINGS``. Items from ``load_longbench`` are handed to
    ``score_longbench`` (with their per-task budgets), so one call scores either kind.
    """
    if items and all(isinstance(item, LongBenchItem) for item in items):
        if max_new_tokens is not None:
            raise ValueError("LongBench items carry their per-task generation budgets; leave max_new_tokens None")
        return score_longbench(model, tokenizer, items, batch_size)
    if any(not isinstance(item, TaskItem) for item in items):
        raise ValueError("score_tasks takes the items of build_tasks (or only those of load_longbench)")
    budgets = []
    for item in items:
        if isinstance(max_new_tokens, int):
            budgets.append(max_new_tokens)
        elif isinstance(max_new_tokens, dict):
            budgets.append(int(max_new_tokens.get(item.task, item.max_new_tokens)))
        else:
            budgets.append(item.max_new_tokens)
    predictions = generate_texts(model, tokenizer, [item.input_ids for item in items], budgets, batch_size)
    result = score_task_predictions(items, predictions)
    logger.info("%s: average %.1f %s", LABEL, result["average"], result["scores"])
    return result


def export_jsonl(items: Sequence[TaskItem], tokenizer, path: str | os.PathLike) -> Path:
    """One JSON line per item (``text``, ``answers``, ``metric``, ``task``, ``max_new_tokens``): the
    input of the lm-eval tasks ``sparge_longctx_<task>``."""
    path = Path(path)
    with atomic_open(path, "w") as f:
        for item in items:
            row = {"text": tokenizer.decode(item.input_ids.tolist(), skip_special_tokens=False),
                   "answers": item.answers, "metric": item.metric, "task": item.task, "length": item.length,
                   "max_new_tokens": item.max_new_tokens}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# ============================================================================================
# LongBench v1 (real files, when the user has them)
# ============================================================================================
LONGBENCH_LABEL = "LongBench v1"


@dataclass(frozen=True)
class LongBenchTask:
    """How one LongBench task is prompted, decoded and scored."""

    prompt: str  # with {context} and {input}
    metric: str
    max_new_tokens: int
    chat: bool = True  # wrap in the chat template (not for few-shot and code-completion tasks)
    first_line: bool = False  # score only the first line of the output


# Prompts: our own wording of each task's instruction (same structure: instruction, context, question).
# fmt: off
_EN_QA = ("Read the text below and answer the question with as few words as possible. "
          "Do not explain.\n\nText:\n{context}\n\n")
_EN_MULTIDOC = ("Here are several passages. Answer the question using them; give only the answer, "
                "with no other words.\n\n{context}\n\n")
LONGBENCH_TASKS: dict[str, LongBenchTask] = {
    "narrativeqa": LongBenchTask(
        "A story follows. Answer the question about it as briefly as you can, in one phrase if possible.\n\n"
        "Story:\n{context}\n\nAnswer the question as briefly as you can, in one phrase if possible.\n\n"
        "Question: {input}\n\nAnswer:", "qa_f1", 128),
    "qasper": LongBenchTask(
        "A scientific paper follows. Answer the question with one phrase or sentence. If the paper does not "
        "say, write \"unanswerable\"; for a yes/no question write \"yes\", \"no\" or \"unanswerable\". "
        "Do not explain.\n\nPaper:\n{context}\n\nAnswer the question with one phrase or sentence; write "
        "\"unanswerable\" if the paper does not say, and only \"yes\", \"no\" or \"unanswerable\" for yes/no "
        "questions. Do not explain.\n\nQuestion: {input}\n\nAnswer:", "qa_f1", 128),
    "multifieldqa_en": LongBenchTask(
        _EN_QA + "Now answer the question with as few words as possible; do not explain.\n\n"
        "Question: {input}\nAnswer:", "qa_f1", 64),
    "multifieldqa_zh": LongBenchTask(
        "请阅读下面的文字，然后只依据文字内容回答问题，回答要尽量简短。\n\n文字：\n{context}\n\n"
        "请只依据上面的文字简短地回答问题。\n\n问题：{input}\n回答：", "qa_f1_zh", 64),
    "hotpotqa": LongBenchTask(
        _EN_MULTIDOC + "Answer using the passages above; give only the answer.\n\nQuestion: {input}\nAnswer:",
        "qa_f1", 32),
    "2wikimqa": LongBenchTask(
        _EN_MULTIDOC + "Answer using the passages above; give only the answer.\n\nQuestion: {input}\nAnswer:",
        "qa_f1", 32),
    "musique": LongBenchTask(
        _EN_MULTIDOC + "Answer using the passages above; give only the answer.\n\nQuestion: {input}\nAnswer:",
        "qa_f1", 32),
    "dureader": LongBenchTask(
        "请阅读下面的几篇文章，然后回答问题。\n\n文章：\n{context}\n\n请根据上面的文章回答问题。\n\n"
        "问题：{input}\n回答：", "rouge_l_zh", 128),
    "gov_report": LongBenchTask(
        "A report by a government agency follows. Summarize it.\n\nReport:\n{context}\n\n"
        "Write a one-page summary of the report above.\n\nSummary:", "rouge_l", 512),
    "qmsum": LongBenchTask(
        "A meeting transcript follows, then a query about it. Answer the query in one or more sentences.\n\n"
        "Transcript:\n{context}\n\nAnswer the query about the transcript above in one or more sentences.\n\n"
        "Query: {input}\nAnswer:", "rouge_l", 512),
    "multi_news": LongBenchTask(
        "Several news articles follow. Summarize them together.\n\nArticles:\n{context}\n\n"
        "Write a one-page summary of all the articles above.\n\nSummary:", "rouge_l", 512),
    "vcsum": LongBenchTask(
        "下面是一段会议记录，请阅读后写出会议的摘要。\n\n会议记录：\n{context}\n\n请写出上面这段会议记录的摘要。\n\n"
        "会议摘要：", "rouge_l_zh", 512),
    "trec": LongBenchTask(
        "Decide the type of the question. Some examples follow.\n\n{context}\n{input}", "classification", 64,
        chat=False, first_line=True),
    "triviaqa": LongBenchTask(
        "Answer the question using the passage. Some examples follow.\n\n{context}\n\n{input}", "qa_f1", 32,
        chat=False, first_line=True),
    "samsum": LongBenchTask(
        "Summarize the dialogue in a few sentences. Some examples follow.\n\n{context}\n\n{input}", "rouge_l",
        128, chat=False, first_line=True),
    "lsht": LongBenchTask(
        "请判断新闻所属的类别。下面给出一些例子。\n\n{context}\n{input}", "classification", 64, chat=False,
        first_line=True),
    "passage_count": LongBenchTask(
        "Below are a number of paragraphs; some of them may repeat others. Read them all and work out how "
        "many distinct paragraphs there are.\n\n{context}\n\nHow many distinct paragraphs are there once "
        "repeats are removed? Reply with the number only.\n\nThe answer is: ", "count", 32),
    "passage_retrieval_en": LongBenchTask(
        "Below are 30 paragraphs and then an abstract. Find the paragraph the abstract was written from.\n\n"
        "{context}\n\nAbstract:\n\n{input}\n\nReply with the paragraph's label, in the form \"Paragraph 1\" "
        "or \"Paragraph 2\".\n\nThe answer is: ", "retrieval", 32),
    "passage_retrieval_zh": LongBenchTask(
        "下面有30个段落和一段摘要。请找出摘要出自哪个段落。\n\n{context}\n\n摘要：\n\n{input}\n\n"
        "请回答段落的编号，格式如\"段落1\"或\"段落2\"。\n\n答案是：", "retrieval_zh", 32),
    "lcc": LongBenchTask("Complete the code below; reply with the next line only.\n{context}Next line of code:\n",
                         "code_sim", 64, chat=False),
    "repobench-p": LongBenchTask(
        "Complete the code below; reply with the next line only.\n{context}{input}Next line of code:\n",
        "code_sim", 64, chat=False),
}
# fmt: on


def _base_task(name: str) -> str:
    """LongBench-E files are named ``<task>_e``; they share the task's prompt and metric."""
    return name[:-2] if name.endswith("_e") and name[:-2] in LONGBENCH_TASKS else name


# ---- metrics ------------------------------------------------------------------------------
_ZH_PUNCT = set("，。！？；：、“”‘’（）《》【】「」『』…—·～")


def _zh_chars(text: str) -> list[str]:
    """Characters of a Chinese text, without whitespace and punctuation (our stand-in for jieba words)."""
    return [ch for ch in text.lower() if not ch.isspace() and ch not in _PUNCT and ch not in _ZH_PUNCT]


def qa_f1_zh(prediction: str, gold: str) -> float:
    return token_f1(_zh_chars(prediction), _zh_chars(gold))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (two-row dynamic programme)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_tokens(prediction: Sequence[str], gold: Sequence[str]) -> float:
    """ROUGE-L F1: precision and recall of the LCS length over the prediction and gold lengths."""
    if not prediction or not gold:
        return 0.0
    lcs = lcs_length(prediction, gold)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(prediction), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens."""
    return rouge_l_tokens(re.findall(r"\w+", prediction.lower()), re.findall(r"\w+", gold.lower()))


def rouge_l_zh(prediction: str, gold: str) -> float:
    return rouge_l_tokens(_zh_chars(prediction), _zh_chars(gold))


def classification_score(prediction: str, gold: str, all_classes: Sequence[str]) -> float:
    """1 / (number of class names mentioned) when the gold class is among them, else 0.

    A mentioned name that is only part of the gold name (e.g. "city" inside "city name") does not
    count as a separate mention.
    """
    mentioned = {c for c in all_classes if c and c in prediction}
    mentioned = {c for c in mentioned if c == gold or c not in gold}
    return 1.0 / len(mentioned) if gold in mentioned else 0.0


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+", text)


def retrieval_score(prediction: str, gold: str, zh: bool = False) -> float:
    """Share of the numbers in the prediction that equal the gold paragraph number."""
    match = re.search(r"段落(\d+)" if zh else r"Paragraph (\d+)", gold)
    if match is None:
        raise ValueError(f"gold answer {gold!r} names no paragraph")
    found = _numbers(prediction)
    return sum(n == match.group(1) for n in found) / len(found) if found else 0.0


def count_score(prediction: str, gold: str) -> float:
    """Share of the numbers in the prediction that equal the gold count."""
    found = _numbers(prediction)
    return sum(n == str(gold).strip() for n in found) / len(found) if found else 0.0


def code_sim_score(prediction: str, gold: str) -> float:
    """Similarity (difflib ratio, 0..1) of the first line of code in the prediction to the gold line."""
    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if not ln.lstrip().startswith(("`", "#", "//"))), "")
    return SequenceMatcher(None, line.strip(), gold.strip(), autojunk=False).ratio()


def longbench_metric(metric: str, prediction: str, gold: str, all_classes: Sequence[str] = ()) -> float:
    """One LongBench metric on one (prediction, gold answer) pair, in [0, 1]."""
    if metric == "qa_f1":
        return qa_f1(prediction, [gold])
    if metric == "qa_f1_zh":
        return qa_f1_zh(prediction, gold)
    if metric == "rouge_l":
        return rouge_l(prediction, gold)
    if metric == "rouge_l_zh":
        return rouge_l_zh(prediction, gold)
    if metric == "classification":
        return classification_score(prediction, gold, all_classes)
    if metric in ("retrieval", "retrieval_zh"):
        return retrieval_score(prediction, gold, zh=metric == "retrieval_zh")
    if metric == "count":
        return count_score(prediction, gold)
    if metric == "code_sim":
        return code_sim_score(prediction, gold)
    raise ValueError(f"unknown LongBench metric {metric!r}")


# ---- loading ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LongBenchItem:
    """One LongBench record, prompted (and tokenised, middle-truncated, when a tokenizer was given)."""

    task: str  # as in the file (``hotpotqa``, ``hotpotqa_e``, ...)
    prompt: str
    answers: list[str]
    all_classes: list[str]
    length: int  # the record's own ``length`` field (words or characters, as LongBench counts)
    metric: str
    max_new_tokens: int
    first_line: bool
    record_id: str
    input_ids: torch.Tensor | None = None
    prompt_tokens: int | None = None  # before truncation
    truncated: bool = False

    def meta(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("input_ids", "prompt")}


def truncate_middle(ids: Sequence[int], max_length: int) -> list[int]:
    """Keep the first ``max_length // 2`` and the last ``max_length - max_length // 2`` tokens."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    head = max_length // 2
    return ids[:head] + ids[len(ids) - (max_length - head):]


def _longbench_files(path: Path, tasks: Sequence[str] | None) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"LongBench path {path} is neither a .jsonl file nor a folder")
    files = sorted(path.glob("*.jsonl"))
    if tasks is not None:
        files = [f for f in files if f.stem in tasks]
        missing = sorted(set(tasks) - {f.stem for f in files})
        if missing:
            raise ValueError(f"no LongBench file for {missing} in {path} (expected <task>.jsonl)")
    if not files:
        raise ValueError(f"no .jsonl files in {path}")
    return files


def _read_jsonl(path: Path, cache_dir: str | os.PathLike | None) -> list[dict[str, Any]]:
    """Records of a JSONL file: through ``datasets`` (offline) when installed, else plain json."""
    try:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        data = datasets.load_dataset("json", data_files=str(path), split="train",
                                     cache_dir=None if cache_dir is None else str(cache_dir))
        return [dict(row) for row in data]
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_longbench(path: str | os.PathLike, tasks: Sequence[str] | None = None, max_length: int | None = None,
                   tokenizer=None, *, chat: bool | None = None,
                   cache_dir: str | os.PathLike | None = None) -> list[LongBenchItem]:
    """LongBench v1 records from local JSONL files, prompted per task.

    Args:
        path: a folder of ``<task>.jsonl`` files (as in LongBench's data.zip) or one ``.jsonl`` file.
        tasks: task names to load (default: every file, or every ``dataset`` in a single file).
        max_length: middle-truncate prompts to this many tokens (needs ``tokenizer``).
        tokenizer: tokenise prompts (``input_ids``); without it, items carry text only.
        chat: use the chat template for the tasks that take it (default: when the tokenizer has one).
        cache_dir: ``datasets`` cache folder (default: its own).
    """
    if max_length is not None and tokenizer is None:
        raise ValueError("max_length needs a tokenizer (truncation is in tokens)")
    wanted = None if tasks is None else list(tasks)
    for name in wanted or []:
        if _base_task(name) not in LONGBENCH_TASKS:
            raise ValueError(f"unknown LongBench task {name!r}; known: {sorted(LONGBENCH_TASKS)} (and their _e versions)")
    items = []
    for file in _longbench_files(Path(path), wanted if Path(path).is_dir() else None):
        for record in _read_jsonl(file, cache_dir):
            name = record.get("dataset") or file.stem
            if wanted is not None and name not in wanted:
                continue
            items.append(_longbench_item(record, name, tokenizer, max_length, chat))
    logger.info("loaded %d LongBench records from %s", len(items), path)
    return items


def _longbench_item(record: dict[str, Any], name: str, tokenizer, max_length: int | None,
                    chat: bool | None) -> LongBenchItem:
    base = _base_task(name)
    if base not in LONGBENCH_TASKS:
        raise ValueError(f"record {record.get('_id')!r} has unknown LongBench dataset {name!r}")
    spec = LONGBENCH_TASKS[base]
    for key in ("context", "input", "answers"):
        if key not in record:
            raise ValueError(f"LongBench record {record.get('_id')!r} of {name} lacks the field {key!r}")
    prompt = spec.prompt.format(context=record["context"], input=record["input"] or "")
    answers = [str(a) for a in (record["answers"] or [])]
    if not answers:
        raise ValueError(f"LongBench record {record.get('_id')!r} of {name} has no answers")
    ids, n_prompt, truncated = None, None, False
    if tokenizer is not None:
        ids, n_prompt, truncated = _longbench_ids(tokenizer, prompt, spec, max_length, chat)
    return LongBenchItem(name, prompt, answers, [str(c) for c in (record.get("all_classes") or [])],
                         int(record.get("length") or 0), spec.metric, spec.max_new_tokens, spec.first_line,
                         str(record.get("_id", "")), ids, n_prompt, truncated)


def _longbench_ids(tokenizer, prompt: str, spec: LongBenchTask, max_length: int | None,
                   chat: bool | None) -> tuple[torch.Tensor, int, bool]:
    ids = encode(tokenizer, prompt)
    n_prompt = len(ids)
    truncated = max_length is not None and n_prompt > max_length
    if truncated:
        ids = truncate_middle(ids, max_length)
    if spec.chat and uses_chat(tokenizer, chat):
        text = tokenizer.decode(ids, skip_special_tokens=False) if truncated else prompt
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        ids = encode(tokenizer, rendered)
    else:
        ids = special_prefix(tokenizer) + ids
    return torch.tensor(ids, dtype=torch.long), n_prompt, truncated


# ---- scoring ------------------------------------------------------------------------------
def score_longbench_predictions(items: Sequence[LongBenchItem], predictions: Sequence[str]) -> dict[str, Any]:
    """Per-task scores (100 x mean of the best score over gold answers) and their unweighted average."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    rows = []
    for item, pred in zip(items, predictions):
        used = pred.lstrip("\n").split("\n")[0] if item.first_line else pred
        best = max(longbench_metric(item.metric, used, gold, item.all_classes) for gold in item.answers)
        rows.append({**item.meta(), "prediction": pred, "score": best})
    result = _task_scores(rows, LONGBENCH_LABEL)
    result["metrics"] = {item.task: item.metric for item in items}
    return result


def score_longbench(model, tokenizer, items: Sequence[LongBenchItem], batch_size: int = 1) -> dict[str, Any]:
    """Greedy-decode LongBench items (per-task budgets) with the model's current attention and score them."""
    missing = [item.record_id for item in items if item.input_ids is None]
    if missing:
        raise ValueError(f"{len(missing)} items have no input_ids; load them with a tokenizer")
    predictions = generate_texts(model, tokenizer, [item.input_ids for item in items],
                                 [item.max_new_tokens for item in items], batch_size)
    result = score_longbench_predictions(items, predictions)
    logger.info("%s: average %.1f %s", LONGBENCH_LABEL, result["average"], result["scores"])
    return result
