"""``minference``: MInference's three sparse patterns (arXiv 2407.02490), as block maps for the
shared block-sparse kernel.

Sources: the MInference paper (section 3, appendix C) and its code as shipped in the ``minference``
0.1.6.0 sdist (``modules/minference_forward.py``: the per-head prefill kernel and its index estimation;
``ops/block_sparse_flash_attention.py``: the block-sparse index; ``ops/streaming_kernel.py``: A-shape),
with that code's defaults. This is a re-implementation, not a copy.

Patterns (``pattern=``; per head when a MInference config is loaded):

- ``"vertical_slash"`` (MInference's ``vertical_and_slash``, its default and almost the only pattern its
  shipped configs use). The last ``last_q = 64`` queries attend to every key (scaled, causal on the
  final corner, softmax in float32). Vertical score of key ``j`` = sum of those rows' probabilities in
  column ``j``; slash score of distance ``d`` = sum along that diagonal. The first ``sink_columns = 30``
  columns and the ``local_slashes = 100`` nearest diagonals are forced in (ranked first). The top
  ``max(vertical_size, 30)`` columns and ``max(slash_size, 50)`` distances (each capped at the number
  of candidates) are selected. Defaults (1000, 6096): MInference's fallback for a head that its
  config does not list.
- ``"block_sparse"`` (the pattern the SpargeAttn paper ran as "MInference"): mean-pooled Q and K
  blocks, pooled scores ``q_blk . k_blk * scale``, causal blocks only, the ``topk = 100`` best key
  blocks per query block.
  On this grid the selection is the same as sparge's top-k mode when every block counts as
  self-similar (K smoothing shifts each pooled score row by a constant, which keeps the ranking),
  so against ``sparge-topk`` this rival differs only in how the number of blocks is given.
- ``"a_shape"`` (``stream_llm`` in configs; StreamingLLM shape): key columns ``[0, n_init)`` plus the
  local window ``0 <= p(i) - j < n_local``. Defaults (128, 3968) as MInference's ``a_shape`` type.

``budget_ratio`` multiplies every head's budgets before the floors are applied, as MInference's
``minference_ratio`` does for vertical/slash (and, because it rescales the config fields before
dispatch, for A-shape's (n_init, n_local)). It is the knob that density matching adjusts.

Per-head configs (``config=``, ``layer=``): MInference's JSON format, a list with one dict per layer
mapping the head index (a string) to ``[pattern, vertical_size, slash_size, score]``; A-shape heads
reuse the two sizes as ``(n_init, n_local)``; block-sparse heads ignore them (top-k as ``topk``). A head
missing from its layer falls back to ``("vertical_and_slash", 1000, 6096)`` as in MInference.
``load_minference_config`` parses and validates the format.

Deviations from the original (all forced by, or chosen for, the shared 128 x 64 block kernel):

- Vertical-slash at block granularity. MInference selects token-level lines and its kernel computes
  64 x 64 tiles along the slashes plus single gathered columns. Here the same token-level lines are
  selected, then every 128-query x 64-key block through which a selected line passes is computed
  whole (``_blockmaps.line_block_cover``). The computed set is a superset of MInference's, so the
  output is at least as accurate at the same budgets, but the block density is higher; compare
  methods at matched block density, not at matched budgets.
- Block-sparse pools queries in 128-row blocks (MInference: 64) and keys in 64-key blocks (same), so
  ``topk`` key blocks per query block is the same number of keys per query as MInference's. The last
  partial block is averaged over its true length (MInference zero-pads and averages the padding).
  Ties in the top-k go to the lower block index.
- Every query block keeps the key blocks that hold its own positions (as the sparge predictor does),
  so no query row is left without keys when budgets are tiny; MInference's local slashes and top-k
  almost always include them anyway.
- ``budget_ratio`` also scales block-sparse ``topk`` (MInference leaves it at 100).
- Non-causal attention (``is_causal=False``, e.g. video models) is an extension: the estimate uses the
  last queries without a causal mask, distances are signed, and the local window is ``|d| < local``.
- Ties among forced lines (more forced lines than budget) keep the nearest diagonals / first columns.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import validation
from ..ops import reference
from ..ops.blocks import BLOCK_K, BLOCK_Q
from . import _blockmaps as bm
from . import register_method
from .base import AttentionMethod

logger = logging.getLogger(__name__)

PATTERNS = ("vertical_slash", "block_sparse", "a_shape")
# accepted spellings -> canonical name (MInference's config names included)
PATTERN_ALIASES = {
    "vertical_slash": "vertical_slash",
    "vertical_and_slash": "vertical_slash",
    "vs": "vertical_slash",
    "block_sparse": "block_sparse",
    "bs": "block_sparse",
    "a_shape": "a_shape",
    "stream_llm": "a_shape",
    "streaming": "a_shape",
}
# the names MInference's config files use
CONFIG_PATTERN_NAMES = {
    "vertical_and_slash": "vertical_slash",
    "stream_llm": "a_shape",
    "block_sparse": "block_sparse",
}

DEFAULT_VERTICAL_SIZE = 1000
DEFAULT_SLASH_SIZE = 6096
DEFAULT_TOPK = 100
DEFAULT_N_INIT = 128
DEFAULT_N_LOCAL = 3968
DEFAULT_LAST_Q = 64
DEFAULT_SINK_COLUMNS = 30
DEFAULT_LOCAL_SLASHES = 100
MIN_VERTICAL = 30
MIN_SLASH = 50


# --------------------------------------------------------------------------------------------
# parameter checks
# --------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"minference: {name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"minference: {name} must be >= {low}, got {value}")
    return value


def _check_ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"minference: {name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"minference: {name} must be a finite number >= 0, got {value}")
    return float(value)


def canonical_pattern(pattern: Any) -> str:
    """The canonical pattern name for any accepted spelling; clear errors otherwise."""
    if not isinstance(pattern, str):
        raise TypeError(f"minference: pattern must be a string, got {pattern!r} ({type(pattern).__name__})")
    if pattern not in PATTERN_ALIASES:
        raise ValueError(f"minference: unknown pattern {pattern!r}; choose one of {sorted(PATTERN_ALIASES)}")
    return PATTERN_ALIASES[pattern]


# --------------------------------------------------------------------------------------------
# MInference's per-head config format
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadPattern:
    """One head's pattern. ``size_a``/``size_b``: (vertical_size, slash_size) for vertical_slash,
    (n_init, n_local) for a_shape, unused for block_sparse. ``score``: the search score, if any."""

    pattern: str
    size_a: int
    size_b: int
    score: float | None = None


FALLBACK_HEAD = HeadPattern("vertical_slash", DEFAULT_VERTICAL_SIZE, DEFAULT_SLASH_SIZE)


def _parse_head(layer: int, key: Any, entry: Any) -> tuple[int, HeadPattern]:
    where = f"minference config: layer {layer}, head {key!r}"
    if not isinstance(key, str) or not key.isdigit():
        raise ValueError(f"{where}: head keys must be non-negative integers written as strings")
    if not isinstance(entry, (list, tuple)) or len(entry) not in (3, 4):
        raise ValueError(f"{where}: expected [pattern, vertical_size, slash_size, score], got {entry!r}")
    name, size_a, size_b = entry[0], entry[1], entry[2]
    if name not in CONFIG_PATTERN_NAMES:
        raise ValueError(f"{where}: unknown pattern {name!r}; the format uses {sorted(CONFIG_PATTERN_NAMES)}")
    for field, value in (("vertical_size", size_a), ("slash_size", size_b)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}: {field} must be a non-negative integer, got {value!r}")
    score = None
    if len(entry) == 4:
        if isinstance(entry[3], bool) or not isinstance(entry[3], (int, float)):
            raise ValueError(f"{where}: score must be a number, got {entry[3]!r}")
        score = float(entry[3])
    return int(key), HeadPattern(CONFIG_PATTERN_NAMES[name], size_a, size_b, score)


def load_minference_config(source: str | os.PathLike | list) -> list[dict[int, HeadPattern]]:
    """Parse MInference's per-head pattern config (a path to its JSON file, or the loaded list).

    Returns one dict per layer, ``{head_index: HeadPattern}``. Raises ``ValueError`` naming the layer,
    head and field of anything malformed.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"minference config {os.fspath(source)!r} is not valid JSON: {err}") from err
    else:
        data = source
    if not isinstance(data, list) or not data:
        raise ValueError(
            "minference config: expected a non-empty JSON list with one {head: [...]} dict per layer"
        )
    layers = []
    for index, layer in enumerate(data):
        if not isinstance(layer, dict):
            raise ValueError(
                f"minference config: layer {index} must be a dict of head -> pattern, "
                f"got {type(layer).__name__}"
            )
        layers.append(dict(_parse_head(index, key, entry) for key, entry in layer.items()))
    return layers


# --------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LineSelection:
    """Token-level lines of the vertical_slash / a_shape heads (block_sparse heads: all False).

    ``columns``: bool ``(B, Hq, Nk)``; ``distances``: bool ``(B, Hq, Nq + Nk - 1)``, distance ``d`` at
    index ``d + Nq - 1`` (``_blockmaps.distance_index``)."""

    columns: torch.Tensor
    distances: torch.Tensor


@register_method("minference")
class MInference(AttentionMethod):
    """MInference's vertical-slash, block-sparse and A-shape patterns (see the module docstring)."""

    budget_param = "budget_ratio"
    #: (low, high) of the budget knob; None: unbounded (density matching grows it until dense)
    budget_range: ClassVar[tuple[float, float | None]] = (0.0, None)

    def __init__(
        self,
        pattern: str | None = None,
        *,
        vertical_size: int | None = None,
        slash_size: int | None = None,
        topk: int = DEFAULT_TOPK,
        n_init: int | None = None,
        n_local: int | None = None,
        budget_ratio: float = 1.0,
        config: str | os.PathLike | list | None = None,
        layer: int | None = None,
        last_q: int = DEFAULT_LAST_Q,
        sink_columns: int = DEFAULT_SINK_COLUMNS,
        local_slashes: int = DEFAULT_LOCAL_SLASHES,
    ):
        sizes = dict(vertical_size=vertical_size, slash_size=slash_size, n_init=n_init, n_local=n_local)
        if config is not None:
            given = [name for name, value in sizes.items() if value is not None]
            if pattern is not None or given:
                raise ValueError(
                    "minference: with config=, the per-head patterns and sizes come from the config; "
                    f"do not also pass {['pattern'] if pattern is not None else given}"
                )
            if layer is None:
                raise ValueError(
                    "minference: config= needs layer= (the index of the layer this method serves)"
                )
            self._config_source = config if isinstance(config, (str, os.PathLike)) else "<in-memory>"
            layers = load_minference_config(config)
            _check_int("layer", layer)
            if layer >= len(layers):
                raise ValueError(f"minference: layer={layer} but the config has {len(layers)} layers")
            self.layer_patterns: dict[int, HeadPattern] | None = layers[layer]
            self.pattern = "per-head"
        else:
            if layer is not None:
                raise ValueError("minference: layer= is only meaningful with config=")
            self._config_source = None
            self.layer_patterns = None
            self.pattern = canonical_pattern("vertical_slash" if pattern is None else pattern)
        self.layer = layer
        self.vertical_size = _check_int(
            "vertical_size", DEFAULT_VERTICAL_SIZE if vertical_size is None else vertical_size
        )
        self.slash_size = _check_int("slash_size", DEFAULT_SLASH_SIZE if slash_size is None else slash_size)
        self.n_init = _check_int("n_init", DEFAULT_N_INIT if n_init is None else n_init)
        self.n_local = _check_int("n_local", DEFAULT_N_LOCAL if n_local is None else n_local)
        self.topk = _check_int("topk", topk)
        self.budget_ratio = _check_ratio("budget_ratio", budget_ratio)
        self.last_q = _check_int("last_q", last_q, low=1)
        self.sink_columns = _check_int("sink_columns", sink_columns)
        self.local_slashes = _check_int("local_slashes", local_slashes)

    # ---------------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pattern": self.pattern, "budget_ratio": self.budget_ratio, "topk": self.topk}
        if self.layer_patterns is None:
            if self.pattern == "vertical_slash":
                out.update(vertical_size=self.vertical_size, slash_size=self.slash_size)
            elif self.pattern == "a_shape":
                out.update(n_init=self.n_init, n_local=self.n_local)
        else:
            out.update(
                config=os.fspath(self._config_source)
                if self._config_source != "<in-memory>"
                else self._config_source,
                layer=self.layer,
            )
        out.update(last_q=self.last_q, sink_columns=self.sink_columns, local_slashes=self.local_slashes)
        return out

    def head_patterns(self, num_heads: int) -> list[HeadPattern]:
        """The pattern of each query head, before ``budget_ratio``."""
        if self.layer_patterns is None:
            if self.pattern == "a_shape":
                head = HeadPattern("a_shape", self.n_init, self.n_local)
            else:
                head = HeadPattern(self.pattern, self.vertical_size, self.slash_size)
            return [head] * num_heads
        extra = [h for h in self.layer_patterns if h >= num_heads]
        if extra:
            raise ValueError(
                f"minference: config layer {self.layer} lists heads {sorted(extra)} but the input has "
                f"{num_heads} query heads"
            )
        missing = [h for h in range(num_heads) if h not in self.layer_patterns]
        if missing:
            logger.debug(
                "minference: layer %s heads %s are not in the config; using %s",
                self.layer,
                missing,
                FALLBACK_HEAD,
            )
        return [self.layer_patterns.get(h, FALLBACK_HEAD) for h in range(num_heads)]

    def _budgets(self, heads: list[HeadPattern], device) -> dict[str, torch.Tensor]:
        """Per-head pattern ids and budgets after ``budget_ratio`` (as MInference: ``int(size * ratio)``)."""
        ratio = self.budget_ratio
        ids = torch.tensor([PATTERNS.index(h.pattern) for h in heads], device=device)
        size_a = torch.tensor([int(h.size_a * ratio) for h in heads], device=device)
        size_b = torch.tensor([int(h.size_b * ratio) for h in heads], device=device)
        topk = torch.full((len(heads),), int(self.topk * ratio), device=device)
        return {"ids": ids, "size_a": size_a, "size_b": size_b, "topk": topk}

    # ---------------------------------------------------------------------------------------
    def line_selection(
        self, q: torch.Tensor, k: torch.Tensor, *, is_causal: bool, scale: float | None = None,
        window: int | None = None,
    ) -> LineSelection:
        """The token-level vertical and slash lines of every vertical_slash / a_shape head."""
        validation.check_qk(q, k)
        validation.check_flag("is_causal", is_causal)
        window = validation.check_window(window, is_causal)
        sm_scale = validation.resolve_scale(scale, q.shape[-1])
        budgets = self._budgets(self.head_patterns(q.shape[1]), q.device)
        return self._lines(q, k, budgets, is_causal, sm_scale, window)

    def _lines(self, q, k, budgets, is_causal: bool, scale: float,
               window: int | None = None) -> LineSelection:
        bsz, num_heads, nq = q.shape[:3]
        nk = k.shape[2]
        ids = budgets["ids"]
        columns = torch.zeros(bsz, num_heads, nk, dtype=torch.bool, device=q.device)
        distances = torch.zeros(bsz, num_heads, nq + nk - 1, dtype=torch.bool, device=q.device)
        is_vs = ids == PATTERNS.index("vertical_slash")
        if bool(is_vs.any()):
            vs = self._vertical_slash_lines(q, k, budgets, is_causal, scale, window)
            columns = torch.where(is_vs[None, :, None], vs.columns, columns)
            distances = torch.where(is_vs[None, :, None], vs.distances, distances)
        is_a = ids == PATTERNS.index("a_shape")
        if bool(is_a.any()):
            a = self._a_shape_lines(nq, nk, budgets, is_causal, q.device)
            columns = torch.where(is_a[None, :, None], a.columns, columns)
            distances = torch.where(is_a[None, :, None], a.distances, distances)
        return LineSelection(columns, distances)

    def _signed_distances(self, nq: int, nk: int, device) -> torch.Tensor:
        return torch.arange(1 - nq, nk, device=device)  # the value of each index on the distance axis

    def _vertical_slash_lines(self, q, k, budgets, is_causal: bool, scale: float,
                              window: int | None = None) -> LineSelection:
        nq, nk = q.shape[2], k.shape[2]
        probs, positions = bm.last_rows_probs(q, k, self.last_q, scale, is_causal, window)
        vertical = probs.sum(dim=-2)  # (B, H, Nk)
        slash = bm.diagonal_sums(probs, positions, nq)  # (B, H, Nq + Nk - 1)
        cols = torch.arange(nk, device=q.device)
        vertical = vertical.masked_fill(cols < self.sink_columns, math.inf)

        dist = self._signed_distances(nq, nk, q.device)
        if is_causal:
            candidate = (dist >= 0) & (dist <= int(positions[-1]))
            if window is not None:  # distances the window never allows are not candidates
                candidate &= dist < window
            local = (dist >= 0) & (dist < self.local_slashes)
        else:
            candidate = (dist >= 1 - nq) & (dist <= nk - 1)
            local = dist.abs() < self.local_slashes
        slash = slash.masked_fill(local, math.inf).masked_fill(~candidate, -math.inf)

        n_cand = int(candidate.sum())
        v_count = budgets["size_a"].clamp(min=MIN_VERTICAL).clamp(max=nk)
        s_count = budgets["size_b"].clamp(min=MIN_SLASH).clamp(max=n_cand)
        columns = bm.top_count_select(vertical, v_count[None, :])
        distances = bm.top_count_select(slash, s_count[None, :])
        return LineSelection(columns, distances)

    def _a_shape_lines(self, nq: int, nk: int, budgets, is_causal: bool, device) -> LineSelection:
        n_init = budgets["size_a"][None, :, None]
        n_local = budgets["size_b"][None, :, None]
        columns = torch.arange(nk, device=device)[None, None, :] < n_init
        dist = self._signed_distances(nq, nk, device)[None, None, :]
        if is_causal:
            distances = (dist >= 0) & (dist < n_local)
        else:
            distances = dist.abs() < n_local
        return LineSelection(columns, distances)

    def _block_sparse_mask(self, q, k, budgets, is_causal: bool, scale: float,
                           window: int | None = None) -> torch.Tensor:
        nq, nk = q.shape[2], k.shape[2]
        pooled_q = reference.block_mean_pool(q.float(), BLOCK_Q)
        pooled_k = bm.expand_kv(reference.block_mean_pool(k.float(), BLOCK_K), q.shape[1])
        scores = (pooled_q @ pooled_k.transpose(-1, -2)) * scale  # (B, H, nqb, nkb)
        allowed = reference.allowed_block_mask(nq, nk, is_causal, device=q.device, window=window)
        scores = scores.masked_fill(~allowed, -math.inf)
        return bm.top_count_select(scores, budgets["topk"][None, :, None])

    # ---------------------------------------------------------------------------------------
    def block_mask(
        self, q: torch.Tensor, k: torch.Tensor, *, is_causal: bool, scale: float | None = None,
        window: int | None = None,
    ) -> torch.Tensor:
        validation.check_qk(q, k)
        validation.check_flag("is_causal", is_causal)
        window = validation.check_window(window, is_causal)
        sm_scale = validation.resolve_scale(scale, q.shape[-1])
        nq, nk = q.shape[2], k.shape[2]
        budgets = self._budgets(self.head_patterns(q.shape[1]), q.device)
        ids = budgets["ids"]
        is_bs = ids == PATTERNS.index("block_sparse")
        mask = None
        if not bool(is_bs.all()):
            lines = self._lines(q, k, budgets, is_causal, sm_scale, window)
            mask = bm.line_block_cover(lines.columns, lines.distances, nq, nk, is_causal)
        if bool(is_bs.any()):
            bs_mask = self._block_sparse_mask(q, k, budgets, is_causal, sm_scale, window)
            mask = bs_mask if mask is None else torch.where(is_bs[None, :, None, None], bs_mask, mask)
        mask = mask | bm.diagonal_blocks(nq, nk, q.device)
        return mask & reference.allowed_block_mask(nq, nk, is_causal, device=q.device, window=window)
