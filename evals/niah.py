"""Needle-in-a-haystack (NIAH): retrieval of planted facts from long contexts, length x depth grid.

(lm-eval's RULER NIAH tasks, the ``ruler`` suite, draw needle depths at random; this generator gives
the controlled length x depth grid and its heatmap.)

What is built (``build_niah``): for every context length, needle depth, kind and repeat, one prompt
of **exactly** ``length`` tokens (instruction + haystack with the needle(s) + question + the start
of the answer):

- ``single``: one pass key (a random 7-digit number) planted at ``depth`` of the haystack.
- ``multikey``: ``n_keys`` needles "the secret number for <word> is <7-digit number>", the asked
  one at ``depth`` and the others (distractors) at seeded random depths.

Haystacks: ``"classic"`` repeats the five short sentences of the classic pass-key test ("The grass
is green. ..."), which SmolLM2-135M handles densely (pass-key accuracy 1.0/1.0/0.8 at 2K/4K/7.5K);
a corpus name of ``calibrate.data`` (``pydoc``, ``austen``, ``shakespeare``) or a local file uses its
sentences, starting at a seeded sentence (much harder for small models). Needles go between two
haystack pieces (sentences, or pieces of at most ``MAX_PIECE_TOKENS`` tokens of longer ones), at
the boundary nearest to ``depth`` x haystack tokens; each item records the achieved depth.

Prompt: with a tokenizer that has a chat template (SmolLM2-Instruct), the instruction, haystack and
question form one user turn and the assistant turn starts with the answer's lead-in ("The secret
pass key is"); otherwise the same text without the chat markup. Key words come from a built-in word
list so that items are identical on every machine (``words="system"`` uses ``/usr/share/dict/words``,
e.g. Debian's ``wamerican``, instead).

How it is scored (``score_niah``): greedy decoding (own loop with a KV cache; prompt steps through
the model's current attention, decode steps are single tokens), ``max_new_tokens`` tokens or up to
EOS. An item is correct when the needle's value occurs in the generated text as a whole number
(not inside a longer digit string). Accuracy is reported in [0, 1] as in the SpargeAttn paper.

This is our own generator in the style of the pass-key and MInference needle tests; it is not the
paper's data (Paul Graham / PG-19 haystacks at 128K are not available offline), so absolute numbers
are not comparable with the paper's, only dense-vs-sparse differences on the same items are.
``export_jsonl`` writes the items for the lm-eval task ``sparge_niah`` (``evals/tasks``).

This module never changes the model's attention: wrap calls in the method you want to measure.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparge_core.atomic import atomic_open, atomic_path

logger = logging.getLogger(__name__)

NIAH_KINDS = ("single", "multikey")
CLASSIC_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
#: longer sentences of a corpus haystack are cut into pieces of at most this many tokens
MAX_PIECE_TOKENS = 96
#: a prompt must leave at least this many tokens of haystack
MIN_HAYSTACK_TOKENS = 16
SYSTEM_WORDS = "/usr/share/dict/words"

INSTRUCTION = ("Somewhere in the long text below there is a piece of important information. "
               "Read the text carefully and remember that information: you will be asked about it afterwards.")

# fmt: off
#: built-in key words (common concrete nouns), used unless words="system"
KEY_WORDS = (
    "anchor", "apple", "apron", "arrow", "badge", "bakery", "balcony", "banana", "barrel", "basket", "beacon",
    "bicycle", "blanket", "bottle", "bracelet", "bridge", "bucket", "butter", "cabinet", "camera", "candle",
    "canyon", "carpet", "castle", "cellar", "chimney", "cinnamon", "circus", "compass", "copper", "cottage",
    "crayon", "curtain", "cushion", "dolphin", "donkey", "dragon", "drawer", "eagle", "engine", "falcon",
    "feather", "fiddle", "forest", "fountain", "garden", "garlic", "giraffe", "glacier", "goblet", "granite",
    "guitar", "hammer", "harbor", "helmet", "honey", "island", "jacket", "jasmine", "kettle", "kitten",
    "ladder", "lantern", "lemon", "library", "lizard", "lobster", "magnet", "mango", "marble", "meadow",
    "mirror", "monkey", "mountain", "mustard", "napkin", "needle", "notebook", "oyster", "paddle", "palace",
    "parrot", "peanut", "pebble", "pencil", "pepper", "piano", "pillow", "planet", "pocket", "pumpkin",
    "puzzle", "rabbit", "radish", "ribbon", "river", "rocket", "saddle", "salmon", "sandal", "scarf",
    "shovel", "silver", "spider", "spoon", "squirrel", "stable", "statue", "teapot", "temple", "thimble",
    "tiger", "tomato", "trumpet", "tulip", "turtle", "umbrella", "valley", "velvet", "violin", "wagon",
    "walnut", "window", "wizard", "yogurt", "zebra",
)
# fmt: on


# --------------------------------------------------------------------------------------------
# items
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NiahItem:
    """One NIAH prompt of exactly ``length`` tokens and the value it asks for."""

    input_ids: torch.Tensor  # (length,) int64
    answer: str
    length: int
    depth: float  # requested depth of the asked needle, in [0, 1]
    kind: str
    needle: str  # the sentence that holds the answer
    question: str
    needle_pos: int  # token index of the asked needle's first token in input_ids
    needle_depth: float  # achieved depth: haystack tokens before the needle / haystack tokens
    haystack: str
    seed: int
    repeat: int
    distractors: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        """Everything except the token ids (JSON-serialisable)."""
        out = {k: v for k, v in asdict(self).items() if k != "input_ids"}
        out["distractors"] = list(self.distractors)
        return out


# --------------------------------------------------------------------------------------------
# prompt pieces (shared with evals.longctx)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptFrame:
    """Token ids before the context (``head``) and after it (``tail``, ends with the answer lead-in)."""

    head: list[int]
    tail: list[int]
    chat: bool


_CONTEXT_MARK = "\u2063CONTEXT\u2063"


def uses_chat(tokenizer, chat: bool | None) -> bool:
    """``chat`` if given, else whether the tokenizer has a chat template."""
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else bool(chat)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens added by the tokenizer."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_prefix(tokenizer) -> list[int]:
    """The ids a tokenizer puts in front of text by itself (e.g. BOS), found by probing."""
    with_special = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    plain = encode(tokenizer, "x")
    if with_special[-len(plain):] != plain:
        return []
    return with_special[:len(with_special) - len(plain)]


def prompt_frame(tokenizer, instruction: str, question: str, answer_lead: str, chat: bool | None = None) -> PromptFrame:
    """Split the prompt around the context: chat markup when the tokenizer has a template."""
    use_chat = uses_chat(tokenizer, chat)
    if use_chat:
        user = f"{instruction}\n\n{_CONTEXT_MARK}\n\n{question}"
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                 add_generation_prompt=True)
        if rendered.count(_CONTEXT_MARK) != 1:
            raise ValueError("the chat template did not keep the user message intact; pass chat=False")
        before, after = rendered.split(_CONTEXT_MARK)
        return PromptFrame(encode(tokenizer, before), encode(tokenizer, after + answer_lead), True)
    head = special_prefix(tokenizer) + encode(tokenizer, f"{instruction}\n\n")
    return PromptFrame(head, encode(tokenizer, f"\n\n{question}\nAnswer: {answer_lead}"), False)


# --------------------------------------------------------------------------------------------
# haystacks (shared with evals.longctx)
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def corpus_sentences(name_or_path: str) -> tuple[str, ...]:
    """The sentences of a corpus (whitespace collapsed), split after ``.``, ``!`` or ``?``."""
    from calibrate.data import load_corpus

    text = load_corpus(name_or_path).text
    parts = re.split(r"(?<=[.!?])\s+", text)
    sentences = tuple(s for s in (" ".join(p.split()) for p in parts) if s)
    if not sentences:
        raise ValueError(f"corpus {name_or_path!r} has no sentences")
    return sentences


class Haystack:
    """Token pieces of filler text, taken in order from a seeded start, cached per tokenizer."""

    def __init__(self, tokenizer, source: str = "classic"):
        self.tokenizer = tokenizer
        self.source = source
        self.sentences = CLASSIC_FILLER if source == "classic" else corpus_sentences(str(source))
        self._cache: dict[int, list[list[int]]] = {}

    def _pieces_of(self, index: int) -> list[list[int]]:
        if index not in self._cache:
            ids = encode(self.tokenizer, " " + self.sentences[index])
            self._cache[index] = [ids[i:i + MAX_PIECE_TOKENS] for i in range(0, len(ids), MAX_PIECE_TOKENS)]
        return self._cache[index]

    def take(self, n_tokens: int, rng: random.Random) -> list[list[int]]:
        """Pieces holding exactly ``n_tokens`` tokens (the last one cut short if needed)."""
        start = 0 if self.source == "classic" else rng.randrange(len(self.sentences))
        self._prefetch(start, n_tokens)
        pieces, total, i = [], 0, start
        while total < n_tokens:
            for piece in self._pieces_of(i % len(self.sentences)):
                take = piece[:n_tokens - total]
                pieces.append(take)
                total += len(take)
                if total >= n_tokens:
                    break
            i += 1
        return pieces

    def _prefetch(self, start: int, n_tokens: int) -> None:
        """Tokenize the sentences likely needed in one batched call (corpus haystacks)."""
        if self.source == "classic":
            return
        count = min(len(self.sentences), max(8, n_tokens // 8))
        todo = [(start + j) % len(self.sentences) for j in range(count)]
        todo = [i for i in dict.fromkeys(todo) if i not in self._cache]
        if not todo:
            return
        batch = self.tokenizer([" " + self.sentences[i] for i in todo], add_special_tokens=False)["input_ids"]
        for i, ids in zip(todo, batch):
            self._cache[i] = [ids[j:j + MAX_PIECE_TOKENS] for j in range(0, len(ids), MAX_PIECE_TOKENS)]


@dataclass(frozen=True)
class Assembled:
    """A full prompt and where each planted piece landed."""

    input_ids: list[int]
    positions: list[int]  # token index of each planted piece, in the order given
    depths: list[float]  # achieved depth of each planted piece within the haystack
    haystack_tokens: int


def assemble(frame: PromptFrame, haystack: Haystack, planted: Sequence[tuple[float, list[int]]], length: int,
             rng: random.Random) -> Assembled:
    """Head + haystack with ``planted`` ``(depth, ids)`` pieces + tail, exactly ``length`` tokens.

    Each piece goes to the haystack boundary nearest to ``depth`` x haystack tokens; pieces that
    fall on the same boundary keep the order given.
    """
    fixed = len(frame.head) + len(frame.tail) + sum(len(ids) for _, ids in planted)
    budget = length - fixed
    if budget < MIN_HAYSTACK_TOKENS:
        raise ValueError(f"length {length} is too short: the prompt and planted text take {fixed} tokens, "
                         f"leaving {budget} < {MIN_HAYSTACK_TOKENS} for the haystack")
    pieces = haystack.take(budget, rng)
    bounds = [0]
    for piece in pieces:
        bounds.append(bounds[-1] + len(piece))
    slots = [_nearest_boundary(bounds, depth * budget) for depth, _ in planted]
    by_slot: dict[int, list[int]] = defaultdict(list)
    for order, slot in enumerate(slots):
        by_slot[slot].append(order)
    ids, positions = list(frame.head), [0] * len(planted)
    for slot in range(len(pieces) + 1):
        for order in by_slot.get(slot, ()):
            positions[order] = len(ids)
            ids.extend(planted[order][1])
        if slot < len(pieces):
            ids.extend(pieces[slot])
    ids.extend(frame.tail)
    assert len(ids) == length, (len(ids), length)
    depths = [bounds[s] / budget for s in slots]
    return Assembled(ids, positions, depths, budget)


def _nearest_boundary(bounds: list[int], target: float) -> int:
    lo, hi = 0, len(bounds) - 1
    while lo < hi:  # first boundary >= target
        mid = (lo + hi) // 2
        if bounds[mid] < target:
            lo = mid + 1
        else:
            hi = mid
    if lo > 0 and target - bounds[lo - 1] <= bounds[lo] - target:
        return lo - 1
    return lo


# --------------------------------------------------------------------------------------------
# words and values
# --------------------------------------------------------------------------------------------
def word_list(words: str | Sequence[str] = "builtin") -> tuple[str, ...]:
    """Key words: ``"builtin"``, ``"system"`` (``/usr/share/dict/words``, lowercase a-z only) or a list."""
    if isinstance(words, str):
        if words == "builtin":
            return KEY_WORDS
        if words == "system":
            return _system_words()
        raise ValueError(f"words must be 'builtin', 'system' or a list of words, got {words!r}")
    out = tuple(dict.fromkeys(w.strip() for w in words if w.strip()))
    if len(out) < 2:
        raise ValueError("a word list needs at least two distinct words")
    return out


@functools.lru_cache(maxsize=1)
def _system_words() -> tuple[str, ...]:
    if not os.path.isfile(SYSTEM_WORDS):
        raise ValueError(f"{SYSTEM_WORDS} does not exist (install Debian's wamerican) ; use words='builtin'")
    with open(SYSTEM_WORDS, encoding="utf-8", errors="replace") as f:
        found = sorted({w.strip() for w in f if re.fullmatch(r"[a-z]{4,10}", w.strip())})
    if len(found) < 100:
        raise ValueError(f"{SYSTEM_WORDS} holds only {len(found)} usable words")
    return tuple(found)


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------
def _single_needle(rng: random.Random) -> tuple[str, str, str, str]:
    value = random_number(rng)
    needle = f"The secret pass key is {value}. Remember it: {value} is the secret pass key."
    return value, needle, "What is the secret pass key in the text above?", "The secret pass key is"


def build_niah(tokenizer, lengths: Iterable[int], depths: Iterable[float], kinds: Iterable[str] = NIAH_KINDS,
               seed: int = 0, haystack: str = "classic", *, repeats: int = 1, n_keys: int = 4,
               words: str | Sequence[str] = "builtin", chat: bool | None = None) -> list[NiahItem]:
    """NIAH items for every (kind, length, depth, repeat), in that nesting order.

    Args:
        tokenizer: the model's tokenizer (lengths are in its tokens).
        lengths: context lengths in tokens; each prompt has exactly this many tokens.
        depths: needle depths in [0, 1] (0 = start of the haystack, 1 = its end).
        kinds: ``"single"`` and/or ``"multikey"``.
        seed: the same seed (and tokenizer, haystack, words) gives the same items.
        haystack: ``"classic"`` or a ``calibrate.data`` corpus name or local file.
        repeats: items per grid cell (different needles and haystack starts).
        n_keys: needles in a ``multikey`` prompt (the asked one plus ``n_keys - 1`` distractors).
        words: key-word list for ``multikey`` (see ``word_list``).
        chat: use the chat template (default: when the tokenizer has one).
    """
    lengths, depths, kinds = [int(n) for n in lengths], [float(d) for d in depths], list(kinds)
    _check_grid(lengths, depths, kinds, repeats, n_keys)
    vocab = word_list(words)
    hay = Haystack(tokenizer, haystack)
    items = []
    for kind in kinds:
        for length in lengths:
            for depth in depths:
                for rep in range(repeats):
                    rng = random.Random(f"niah/{seed}/{kind}/{length}/{depth!r}/{rep}/{haystack}")
                    items.append(_build_item(tokenizer, hay, kind, length, depth, rep, seed, rng, vocab,
                                             n_keys, chat))
    logger.info("built %d NIAH items (%s haystack)", len(items), haystack)
    return items


def _check_grid(lengths, depths, kinds, repeats, n_keys) -> None:
    if not lengths or not depths or not kinds:
        raise ValueError("lengths, depths and kinds must each be non-empty")
    if any(n < 1 for n in lengths):
        raise ValueError(f"lengths must be positive, got {lengths}")
    if any(not (0.0 <= d <= 1.0) or math.isnan(d) for d in depths):
        raise ValueError(f"depths must lie in [0, 1], got {depths}")
    unknown = [k for k in kinds if k not in NIAH_KINDS]
    if unknown:
        raise ValueError(f"unknown NIAH kinds {unknown}; choose from {list(NIAH_KINDS)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if n_keys < 2:
        raise ValueError(f"n_keys must be >= 2 (one asked key plus distractors), got {n_keys}")


def _build_item(tokenizer, hay: Haystack, kind: str, length: int, depth: float, rep: int, seed: int,
                rng: random.Random, vocab: tuple[str, ...], n_keys: int, chat: bool | None) -> NiahItem:
    distractors: list[str] = []
    if kind == "single":
        answer, needle, question, lead = _single_needle(rng)
        planted = [(depth, needle)]
    else:
        keys = rng.sample(vocab, n_keys)
        values = [random_number(rng) for _ in keys]
        while len(set(values)) < len(values):
            values = [random_number(rng) for _ in keys]
        sentences = [f"The secret number for {k} is {v}." for k, v in zip(keys, values)]
        answer, needle = values[0], sentences[0]
        question = f"What is the secret number for {keys[0]} in the text above?"
        lead = f"The secret number for {keys[0]} is"
        distractors = sentences[1:]
        planted = [(depth, needle)] + [(rng.random(), s) for s in distractors]
    frame = prompt_frame(tokenizer, INSTRUCTION, question, lead, chat)
    done = assemble(frame, hay, [(d, encode(tokenizer, " " + s)) for d, s in planted], length, rng)
    return NiahItem(torch.tensor(done.input_ids, dtype=torch.long), answer, length, depth, kind, needle, question,
                    done.positions[0], done.depths[0], str(hay.source), seed, rep, tuple(distractors),
                    {"chat": frame.chat, "haystack_tokens": done.haystack_tokens})


# --------------------------------------------------------------------------------------------
# generation (shared with evals.longctx)
# --------------------------------------------------------------------------------------------
def eos_token_ids(model, tokenizer) -> set[int]:
    """EOS ids of the tokenizer and of the model's generation config."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _forward_kwargs(model) -> dict[str, Any]:
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_ids: Iterable[int] = ()) -> list[list[int]]:
    """Greedy continuation of each row of ``input_ids`` ``(B, L)`` (no padding: equal lengths).

    One prompt forward pass, then one token per step with the KV cache. Each returned list stops
    before its first EOS token (or after ``max_new_tokens`` tokens).
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length > 0), got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    ids = input_ids.to(device)
    out = model(input_ids=ids, use_cache=True, **_forward_kwargs(model))
    past, steps = out.past_key_values, []
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(dim=-1)
        steps.append(token)
        if eos.numel():
            done |= torch.isin(token, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        out = model(input_ids=token[:, None], past_key_values=past, use_cache=True)
        past = out.past_key_values
    generated = torch.stack(steps, dim=1).tolist()
    eos_set = set(eos.tolist())
    return [_cut_at_eos(row, eos_set) for row in generated]


def _cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, tok in enumerate(row):
        if tok in eos:
            return row[:i]
    return row


def generate_texts(model, tokenizer, prompts: Sequence[torch.Tensor], max_new_tokens: int | Sequence[int],
                   batch_size: int = 1) -> list[str]:
    """Greedy outputs (decoded, special tokens dropped) for 1-D prompts; equal-length prompts are batched."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    budgets = [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError("max_new_tokens must be an int or one value per prompt")
    eos = eos_token_ids(model, tokenizer)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, ids in enumerate(prompts):
        groups[(int(ids.shape[0]), budgets[i])].append(i)
    texts: list[str] = [""] * len(prompts)
    for (_, budget), members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            rows = greedy_generate(model, torch.stack([prompts[i] for i in chunk]), budget, eos)
            for i, row in zip(chunk, rows):
                texts[i] = tokenizer.decode(row, skip_special_tokens=True)
    return texts


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------
def answer_found(prediction: str, answer: str) -> bool:
    """Whether ``answer`` occurs in ``prediction`` not glued to other letters or digits (case-insensitive)."""
    if not answer:
        raise ValueError("empty answer")
    pattern = rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])"
    return re.search(pattern, prediction, flags=re.IGNORECASE) is not None


def score_predictions(items: Sequence[NiahItem], predictions: Sequence[str]) -> list[dict[str, Any]]:
    """One result row per item: its metadata, the prediction, ``correct`` and ``score`` (0/1)."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    rows = []
    for item, pred in zip(items, predictions):
        ok = answer_found(pred, item.answer)
        rows.append({**item.meta(), "prediction": pred, "correct": ok, "score": float(ok)})
    return rows


def score_niah(model, tokenizer, items: Sequence[NiahItem], max_new_tokens: int = 16,
               batch_size: int = 1) -> list[dict[str, Any]]:
    """Greedy-decode every item with the model's current attention and score it by exact match."""
    predictions = generate_texts(model, tokenizer, [item.input_ids for item in items], max_new_tokens, batch_size)
    rows = score_predictions(items, predictions)
    if rows:
        logger.info("NIAH accuracy %.3f over %d items", sum(r["score"] for r in rows) / len(rows), len(rows))
    return rows


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _depth_key(depth: float) -> str:
    return f"{depth:g}"


def summarize_niah(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall accuracy and accuracy per kind, length, depth and grid cell (keys are strings)."""
    if not results:
        raise ValueError("no NIAH results to summarize")
    by_kind, by_length, by_depth = defaultdict(list), defaultdict(list), defaultdict(list)
    grid: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for row in results:
        score = float(row["score"])
        by_kind[row["kind"]].append(score)
        by_length[str(row["length"])].append(score)
        by_depth[_depth_key(row["depth"])].append(score)
        grid[row["kind"]][str(row["length"])][_depth_key(row["depth"])].append(score)
    return {
        "metric": "exact match of the needle value in the greedy output (accuracy in [0, 1])",
        "accuracy": _mean(float(r["score"]) for r in results),
        "n": len(results),
        "per_kind": {k: _mean(v) for k, v in sorted(by_kind.items())},
        "per_length": {k: _mean(v) for k, v in sorted(by_length.items(), key=lambda kv: int(kv[0]))},
        "per_depth": {k: _mean(v) for k, v in sorted(by_depth.items(), key=lambda kv: float(kv[0]))},
        "grid": {kind: {n: {d: _mean(v) for d, v in cells.items()} for n, cells in lengths.items()}
                 for kind, lengths in grid.items()},
    }


# --------------------------------------------------------------------------------------------
# heatmap
# --------------------------------------------------------------------------------------------
def _length_label(n: int) -> str:
    return f"{n / 1024:g}K" if n >= 1024 and n % 128 == 0 else str(n)


def niah_grid(results: Sequence[dict[str, Any]], kind: str | None = None):
    """``(lengths, depths, accuracy[depth][length])`` with NaN for empty cells."""
    rows = [r for r in results if kind is None or r["kind"] == kind]
    if not rows:
        raise ValueError(f"no NIAH results{'' if kind is None else f' of kind {kind!r}'}")
    lengths = sorted({int(r["length"]) for r in rows})
    depths = sorted({float(r["depth"]) for r in rows})
    cells: dict[tuple[float, int], list[float]] = defaultdict(list)
    for r in rows:
        cells[(float(r["depth"]), int(r["length"]))].append(float(r["score"]))
    acc = [[_mean(cells.get((d, n), [])) for n in lengths] for d in depths]
    return lengths, depths, acc


def niah_heatmap(results: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None, *,
                 kind: str | None = None) -> Path:
    """Write the paper-style heatmap PNG (x: context length, y: needle depth, colour: accuracy)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    lengths, depths, acc = niah_grid(results, kind)
    grid = np.array(acc, dtype=float)
    cmap = LinearSegmentedColormap.from_list("niah", ["#d7301f", "#fdd49e", "#31a354"]).with_extremes(bad="#bdbdbd")
    fig = Figure(figsize=(max(4.0, 0.9 * len(lengths) + 2.0), max(3.0, 0.45 * len(depths) + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    overall = _mean(float(r["score"]) for r in results if kind is None or r["kind"] == kind)
    ax.set_title(f"{title or 'Needle in a haystack'} (mean {overall:.3f})", fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format=path.suffix.lstrip(".") or "png")
    return path


# --------------------------------------------------------------------------------------------
# export for lm-eval
# --------------------------------------------------------------------------------------------
def export_jsonl(items: Sequence[NiahItem], tokenizer, path: str | os.PathLike) -> Path:
    """Write one JSON line per item: ``text`` (the decoded prompt, special-token markup kept),
    ``answer`` and the item's grid coordinates; the input of the lm-eval task ``sparge_niah``.

    lm-eval re-tokenizes ``text``, so its prompt length can differ from ``length`` by a few tokens.
    """
    path = Path(path)
    with atomic_open(path, "w") as f:
        for item in items:
            row = {"text": tokenizer.decode(item.input_ids.tolist(), skip_special_tokens=False),
                   "answer": item.answer, "kind": item.kind, "length": item.length, "depth": item.depth,
                   "needle": item.needle, "haystack": item.haystack, "seed": item.seed, "repeat": item.repeat}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
