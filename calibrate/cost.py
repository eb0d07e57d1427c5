"""Per-GPU cost model: the predicted milliseconds of one sparge (or dense SDPA) attention call.

A cost model is a JSON file, ``results/kernel/<gpu-slug>-cost.json``, made by ``python -m
calibrate.profile`` (``sparge-profile``) on the card it describes (or, for the shipped H100 default,
fitted from the committed kernel benchmark). It holds linear fits of measured times, per executor
and head dim. With ``rows`` = heads x query blocks (``BLOCK_Q`` = 128 rows), ``pairs`` = computed
block pairs summed over heads, ``skipped`` = computed pairs whose P.V stage 2 skipped, ``score_pairs``
= heads x query blocks x key blocks:

- ``kernels[<key>][<head_dim>]``: ``block_sparse_attn`` of one variant,
  ``ms = fixed_ms + 1e-6 * (per_row_ns * rows + per_pair_ns * pairs - pv_saved_ns * skipped)``.
  Keys: ``none``, ``int8``, ``int8-fp8`` (stage 2 off: ``pvthreshd=None``), the same with ``+pv``
  (stage 2 on: the check runs on every computed pair, whether or not it skips), and ``dense``
  (SDPA; ``pairs`` = every pair the causal mask allows).
- ``predictors[<estimator>][<head_dim>]``: ``predict_block_mask``,
  ``ms = fixed_ms + 1e-6 * (per_row_ns * rows + per_pair_ns * score_pairs)``.
- ``launch_ms[<quant>]``: what a whole ``sparge_attn`` call costs beyond its predictor and kernel
  timed apart (host checks, the launches between them; negative where the fused path saves work,
  e.g. INT8 quantization done inside the predictor's pass instead of by the kernel call).

- ``host_ms[<key>]`` (optional): the host's time to issue one call of that kernel key (``dense``:
  one SDPA call; a sparse key: a whole ``sparge_attn`` call of that variant as ``apply`` runs a
  repeated layer call, replayed from a CUDA graph, unless the profile was run with
  ``--eager-host-floors``: validation and every launch), measured at a shape whose GPU work is
  negligible. A call cannot finish faster than the
  host issues it, so every prediction is ``max(host_ms[key], GPU time)``: on a small model (SmolLM2:
  9 heads, head dim 64) the host floor, not the kernel, decides whether a sparse layer pays.

A sparse call is ``max(host_ms[quant(+pv)], launch_ms[quant] + predictor + kernel)``; dense is
``max(host_ms["dense"], kernels["dense"])``. Every
fit carries its error on the points it was fitted to (``fit``: relative RMS and worst case), and
every number its ``source``: ``"measured"`` or ``"assumed: <why>"`` (values not measured on the
card, kept until a profile run replaces them). ``CostModel.load`` validates the whole file and
names the offending field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from sparge_core.ops.blocks import BLOCK_K, BLOCK_Q, ESTIMATORS, allowed_block_count, num_blocks
from sparge_core.params import VARIANT_QUANTS, write_json_atomic

COST_FORMAT = "sparge-cost-model"
COST_VERSION = 1
DENSE = "dense"
#: every kernel key a cost model may hold
KERNEL_KEYS = (DENSE, *VARIANT_QUANTS, *(q + "+pv" for q in VARIANT_QUANTS))


class CostModelError(ValueError):
    """A cost model file that does not follow the format, or lacks what a prediction needs."""


def kernel_key(quant: str, stage2: bool) -> str:
    return quant + ("+pv" if stage2 else "")


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3`` (the file name stem of a card's results)."""
    name = name.lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cpu"


# --------------------------------------------------------------------------------------------
# types
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitError:
    """How well a fit reproduces the times it was fitted to (relative to the measured time)."""

    points: int
    rms_rel: float
    max_rel: float
    worst: str = ""  # the point with the largest error, in words

    def to_dict(self) -> dict[str, Any]:
        return {"points": self.points, "rms_rel": round(self.rms_rel, 5), "max_rel": round(self.max_rel, 5),
                "worst": self.worst}


@dataclass(frozen=True)
class LinearCost:
    """``ms = fixed_ms + 1e-6 * (per_row_ns * rows + per_pair_ns * pairs - pv_saved_ns * skipped)``."""

    fixed_ms: float
    per_row_ns: float
    per_pair_ns: float
    pv_saved_ns: float = 0.0
    source: str = "measured"
    fit: FitError | None = None

    def ms(self, rows: float, pairs: float, skipped: float = 0.0) -> float:
        return self.fixed_ms + 1e-6 * (self.per_row_ns * rows + self.per_pair_ns * pairs - self.pv_saved_ns * skipped)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"fixed_ms": _r(self.fixed_ms), "per_row_ns": _r(self.per_row_ns),
                             "per_pair_ns": _r(self.per_pair_ns)}
        if self.pv_saved_ns:
            d["pv_saved_ns"] = _r(self.pv_saved_ns)
        d["source"] = self.source
        if self.fit is not None:
            d["fit"] = self.fit.to_dict()
        return d


def _r(x: float) -> float:
    return float(f"{x:.6g}")


@dataclass(frozen=True)
class CallShape:
    """The geometry of one attention call (batch 1)."""

    n_q: int
    n_k: int
    heads: int
    head_dim: int
    causal: bool

    @property
    def rows(self) -> int:
        return self.heads * num_blocks(self.n_q, BLOCK_Q)

    @property
    def allowed_pairs(self) -> int:
        """Block pairs attention may touch, summed over heads."""
        return self.heads * allowed_block_count(self.n_q, self.n_k, self.causal)

    @property
    def score_pairs(self) -> int:
        """Block pairs the predictor scores (every pair: its cost does not halve with causal)."""
        return self.heads * num_blocks(self.n_q, BLOCK_Q) * num_blocks(self.n_k, BLOCK_K)


@dataclass(frozen=True)
class CostModel:
    """Fitted costs of one GPU (see the module docstring for the formulas)."""

    gpu: str
    kernels: dict[str, dict[int, LinearCost]]
    predictors: dict[str, dict[int, LinearCost]]
    launch_ms: dict[str, float]
    host_ms: dict[str, float] = field(default_factory=dict)  # kernel key -> host floor of one call
    source: str = ""
    assumptions: tuple[str, ...] = ()
    checks: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    path: str | None = field(default=None, compare=False)

    # ---------------------------------------------------------------- lookups
    def kernel(self, key: str, head_dim: int) -> LinearCost:
        if key not in self.kernels:
            raise CostModelError(f"the cost model of {self.gpu} has no kernel variant {key!r} (it has "
                                 f"{sorted(self.kernels)}); profile this card: python -m calibrate.profile")
        return _by_head_dim(self.kernels[key], head_dim, f"kernels.{key}", self.gpu)

    def predictor(self, estimator: str, head_dim: int) -> LinearCost:
        if estimator not in self.predictors:
            raise CostModelError(f"the cost model of {self.gpu} has no predictor {estimator!r} (it has "
                                 f"{sorted(self.predictors)}); profile this card: python -m calibrate.profile")
        return _by_head_dim(self.predictors[estimator], head_dim, f"predictors.{estimator}", self.gpu)

    def launch(self, quant: str) -> float:
        if quant not in self.launch_ms:
            raise CostModelError(f"the cost model of {self.gpu} has no launch_ms.{quant}")
        return self.launch_ms[quant]

    def has(self, quant: str, stage2: bool, estimator: str, head_dim: int) -> bool:
        """Whether every part of this sparse variant's prediction is in the file."""
        key = kernel_key(quant, stage2)
        return (head_dim in self.kernels.get(key, {}) and head_dim in self.predictors.get(estimator, {})
                and quant in self.launch_ms)

    def has_dense(self, head_dim: int) -> bool:
        return head_dim in self.kernels.get(DENSE, {})

    def host_floor(self, key: str) -> float:
        """The host's time to issue one call of kernel key ``key`` (0 when the file has none)."""
        return self.host_ms.get(key, 0.0)

    # ---------------------------------------------------------------- predictions
    def dense_ms(self, shape: CallShape) -> float:
        return max(self.host_floor(DENSE), self.kernel(DENSE, shape.head_dim).ms(shape.rows, shape.allowed_pairs))

    def sparse_fixed_ms(self, shape: CallShape, quant: str, stage2: bool, estimator: str) -> float:
        """Everything of a sparse call's GPU time that does not scale with the computed pairs (the
        host floor not applied: ``predict_ms`` and ``sparse_lower_bound_ms`` apply it)."""
        kern = self.kernel(kernel_key(quant, stage2), shape.head_dim)
        pred = self.predictor(estimator, shape.head_dim)
        return (self.launch(quant) + pred.ms(shape.rows, shape.score_pairs) + kern.fixed_ms
                + 1e-6 * kern.per_row_ns * shape.rows)

    def predict_ms(self, variant: str, n_q: int, n_k: int, heads: int, head_dim: int, causal: bool,
                   density: float, estimator: str = "pooled", pv_skip: float = 0.0) -> float:
        """Milliseconds of one call. ``variant``: a kernel key (``"dense"``, ``"int8"``, ``"none+pv"``,
        ...); ``density``: computed / allowed block pairs (mean over heads); ``pv_skip``: the fraction
        of computed pairs stage 2 skips (``+pv`` variants only)."""
        shape = CallShape(n_q, n_k, heads, head_dim, causal)
        if variant == DENSE:
            return self.dense_ms(shape)
        quant, _, pv = variant.partition("+")
        if quant not in VARIANT_QUANTS or pv not in ("", "pv"):
            raise CostModelError(f"unknown variant {variant!r}; use one of {list(KERNEL_KEYS)}")
        if not 0.0 <= density <= 1.0 or not 0.0 <= pv_skip <= 1.0:
            raise ValueError(f"density ({density}) and pv_skip ({pv_skip}) must be in [0, 1]")
        pairs = density * shape.allowed_pairs
        return self.sparse_ms(shape, quant, bool(pv), estimator, pairs, pv_skip * pairs)

    def sparse_ms(self, shape: CallShape, quant: str, stage2: bool, estimator: str, pairs: float,
                  skipped: float = 0.0) -> float:
        """One sparse call computing ``pairs`` block pairs (all heads), ``skipped`` of them skipped by
        stage 2: ``max(host floor, fixed + per_pair * pairs - pv_saved * skipped)``."""
        kern = self.kernel(kernel_key(quant, stage2), shape.head_dim)
        gpu = (self.sparse_fixed_ms(shape, quant, stage2, estimator)
               + 1e-6 * (kern.per_pair_ns * pairs - kern.pv_saved_ns * skipped))
        return max(self.host_floor(kernel_key(quant, stage2)), gpu)

    def sparse_lower_bound_ms(self, shape: CallShape, quant: str, stage2: bool, estimator: str) -> float:
        """No call of this variant is faster than this, whatever its density (pruning in the search)."""
        return max(self.host_floor(kernel_key(quant, stage2)), self.sparse_fixed_ms(shape, quant, stage2, estimator))

    # ---------------------------------------------------------------- file
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": COST_FORMAT, "version": COST_VERSION, "gpu": self.gpu, "source": self.source,
            "assumptions": list(self.assumptions),
            "formulas": {
                "sparse_call_ms": "max(host_ms[quant(+pv)], launch_ms[quant] + predictors[estimator] + kernels[quant(+pv)])",
                "kernel_ms": "fixed_ms + 1e-6*(per_row_ns*rows + per_pair_ns*pairs - pv_saved_ns*pv_skipped_pairs)",
                "predictor_ms": "fixed_ms + 1e-6*(per_row_ns*rows + per_pair_ns*score_pairs)",
                "rows": "heads * ceil(n_q/128)", "pairs": "computed block pairs (128x64), all heads",
                "score_pairs": "heads * ceil(n_q/128) * ceil(n_k/64)",
                "dense_ms": "max(host_ms.dense, kernels.dense with pairs = every block pair the causal mask allows)",
                "host_ms": "the host's time to issue one call (0 when absent)"},
            "kernels": {k: {str(d): c.to_dict() for d, c in sorted(v.items())} for k, v in sorted(self.kernels.items())},
            "predictors": {k: {str(d): c.to_dict() for d, c in sorted(v.items())}
                           for k, v in sorted(self.predictors.items())},
            "launch_ms": {k: _r(v) for k, v in sorted(self.launch_ms.items())},
            **({"host_ms": {k: _r(v) for k, v in sorted(self.host_ms.items())}} if self.host_ms else {}),
            "checks": self.checks,
            "versions": self.versions,
        }

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> CostModel:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise CostModelError(f"cost model file {path} does not exist") from err
        except json.JSONDecodeError as err:
            raise CostModelError(f"cost model file {path} is not valid JSON: {err}") from err
        model = cls.from_dict(data, where=str(path))
        return CostModel(**{**model.__dict__, "path": str(path)})

    @classmethod
    def from_dict(cls, data: Any, where: str = "cost model") -> CostModel:
        return _parse(data, where)

    def sha256(self) -> str:
        """Digest of the content (what a calibration's fingerprint records)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _by_head_dim(table: dict[int, LinearCost], head_dim: int, where: str, gpu: str) -> LinearCost:
    if head_dim not in table:
        raise CostModelError(f"the cost model of {gpu} has no head_dim {head_dim} in {where} (it has "
                             f"{sorted(table)}); profile it: python -m calibrate.profile --head-dims {head_dim}")
    return table[head_dim]


# --------------------------------------------------------------------------------------------
# parsing with field-naming errors
# --------------------------------------------------------------------------------------------
def _obj(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise CostModelError(f"{where} must be an object, got {type(value).__name__}")
    return value


def _num(value, where: str, *, low: float = -math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CostModelError(f"{where} must be a finite number, got {value!r}")
    if value < low:
        raise CostModelError(f"{where} must be >= {low}, got {value}")
    return float(value)


def _keys(d: dict, allowed: set, required: set, where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise CostModelError(f"{where} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(d))
    if missing:
        raise CostModelError(f"{where} is missing {missing}")


def _fit(value, where: str) -> FitError:
    d = _obj(value, where)
    _keys(d, {"points", "rms_rel", "max_rel", "worst"}, {"points", "rms_rel", "max_rel"}, where)
    if isinstance(d["points"], bool) or not isinstance(d["points"], int) or d["points"] < 0:
        raise CostModelError(f"{where}.points must be a non-negative integer, got {d['points']!r}")
    return FitError(d["points"], _num(d["rms_rel"], f"{where}.rms_rel", low=0), _num(d["max_rel"], f"{where}.max_rel",
                                                                                     low=0), str(d.get("worst", "")))


def _linear(value, where: str) -> LinearCost:
    d = _obj(value, where)
    _keys(d, {"fixed_ms", "per_row_ns", "per_pair_ns", "pv_saved_ns", "source", "fit"},
          {"fixed_ms", "per_row_ns", "per_pair_ns", "source"}, where)
    if not isinstance(d["source"], str) or not (d["source"] == "measured" or d["source"].startswith("assumed")
                                                or d["source"].startswith("fitted")):
        raise CostModelError(f"{where}.source must be 'measured', 'fitted: ...' or 'assumed: ...', got {d['source']!r}")
    return LinearCost(_num(d["fixed_ms"], f"{where}.fixed_ms", low=0), _num(d["per_row_ns"], f"{where}.per_row_ns", low=0),
                      _num(d["per_pair_ns"], f"{where}.per_pair_ns", low=0),
                      _num(d.get("pv_saved_ns", 0.0), f"{where}.pv_saved_ns", low=0), d["source"],
                      _fit(d["fit"], f"{where}.fit") if "fit" in d else None)


def _table(value, where: str) -> dict[int, LinearCost]:
    d = _obj(value, where)
    if not d:
        raise CostModelError(f"{where} must hold at least one head dim")
    out = {}
    for key, entry in d.items():
        if not key.isdigit() or int(key) <= 0:
            raise CostModelError(f"{where} keys must be head dims (positive integers as strings), got {key!r}")
        out[int(key)] = _linear(entry, f"{where}.{key}")
    return out


def _parse(data: Any, where: str) -> CostModel:
    d = _obj(data, where)
    _keys(d, {"format", "version", "gpu", "source", "assumptions", "formulas", "kernels", "predictors", "launch_ms",
              "host_ms", "checks", "versions"}, {"format", "version", "gpu", "kernels", "predictors", "launch_ms"}, where)
    if d["format"] != COST_FORMAT:
        raise CostModelError(f"{where}: format must be {COST_FORMAT!r}, got {d['format']!r}")
    if d["version"] != COST_VERSION:
        raise CostModelError(f"{where}: version must be {COST_VERSION}, got {d['version']!r}")
    if not isinstance(d["gpu"], str) or not d["gpu"]:
        raise CostModelError(f"{where}: gpu must be the card's name, got {d['gpu']!r}")
    kernels = {}
    for key, table in _obj(d["kernels"], "kernels").items():
        if key not in KERNEL_KEYS:
            raise CostModelError(f"kernels.{key} is not a kernel variant; use {list(KERNEL_KEYS)}")
        kernels[key] = _table(table, f"kernels.{key}")
    if DENSE not in kernels:
        raise CostModelError("kernels.dense is missing: dense SDPA is every layer's alternative")
    if not any(k != DENSE for k in kernels):
        raise CostModelError("kernels holds no sparse variant (none, int8, ...)")
    predictors = {}
    for key, table in _obj(d["predictors"], "predictors").items():
        if key not in ESTIMATORS:
            raise CostModelError(f"predictors.{key} is not an estimator; use {list(ESTIMATORS)}")
        predictors[key] = _table(table, f"predictors.{key}")
    if not predictors:
        raise CostModelError("predictors must hold at least one estimator (pooled, keys)")
    launch = {}
    for key, value in _obj(d["launch_ms"], "launch_ms").items():
        if key not in VARIANT_QUANTS:
            raise CostModelError(f"launch_ms.{key} is not a quantization variant; use {list(VARIANT_QUANTS)}")
        launch[key] = _num(value, f"launch_ms.{key}")
    for key in kernels:
        quant = key.split("+")[0]
        if key != DENSE and quant not in launch:
            raise CostModelError(f"launch_ms.{quant} is missing (kernels.{key} needs it)")
    host = {}
    for key, value in _obj(d.get("host_ms", {}), "host_ms").items():
        if key not in KERNEL_KEYS:
            raise CostModelError(f"host_ms.{key} is not a kernel key; use {list(KERNEL_KEYS)}")
        host[key] = _num(value, f"host_ms.{key}", low=0)
    assumptions = d.get("assumptions", [])
    if not isinstance(assumptions, list) or not all(isinstance(a, str) for a in assumptions):
        raise CostModelError("assumptions must be a list of strings")
    return CostModel(gpu=d["gpu"], kernels=kernels, predictors=predictors, launch_ms=launch, host_ms=host,
                     source=str(d.get("source", "")), assumptions=tuple(assumptions),
                     checks=_obj(d.get("checks", {}), "checks"), versions=_obj(d.get("versions", {}), "versions"))


# --------------------------------------------------------------------------------------------
# fitting
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """One measured time and the features the linear model uses."""

    ms: float
    rows: float
    pairs: float
    skipped: float = 0.0
    label: str = ""


def fit_linear(timings: Sequence[Timing], *, with_skip: bool = False, source: str = "measured",
               huber: float = 0.15) -> LinearCost:
    """Least squares of ``ms`` on ``[1, rows, pairs(, -skipped)]`` with every coefficient >= 0.

    Residuals are relative (each point weighted by 1 / its time: the sweep spans 0.1 to 100 ms), and
    a few Huber re-weighting rounds keep one noisy point (a host-bound small call) from pulling the
    fit; the reported error covers every point.
    """
    import numpy as np

    if len(timings) < (4 if with_skip else 3):
        raise ValueError(f"a fit needs at least {4 if with_skip else 3} timings, got {len(timings)}")
    y = np.array([t.ms for t in timings], dtype=np.float64)
    if (y <= 0).any() or not np.isfinite(y).all():
        raise ValueError("every timing must be a positive finite number of milliseconds")
    cols = [np.ones_like(y), np.array([t.rows for t in timings]) * 1e-6, np.array([t.pairs for t in timings]) * 1e-6]
    if with_skip:
        cols.append(-np.array([t.skipped for t in timings]) * 1e-6)
    x = np.stack(cols, axis=1)
    weight = 1.0 / y
    coef = _nnls(x * weight[:, None], y * weight)
    for _ in range(10):
        rel = (x @ coef - y) / y
        robust = np.where(np.abs(rel) <= huber, 1.0, huber / np.maximum(np.abs(rel), 1e-12))
        coef = _nnls(x * (weight * np.sqrt(robust))[:, None], y * weight * np.sqrt(robust))
    rel = (x @ coef - y) / y
    worst = int(np.argmax(np.abs(rel)))
    err = FitError(len(y), float(np.sqrt(np.mean(rel ** 2))), float(np.abs(rel).max()),
                   f"{timings[worst].label} measured {y[worst]:.4g} ms, fit {float(x[worst] @ coef):.4g} ms")
    return LinearCost(float(coef[0]), float(coef[1]), float(coef[2]), float(coef[3]) if with_skip else 0.0,
                      source, err)


def _nnls(a, b):
    """Non-negative least squares by trying every support (at most 4 columns: 15 small solves)."""
    import numpy as np

    k = a.shape[1]
    best, best_res = np.zeros(k), float(np.sum(b ** 2))
    for size in range(1, k + 1):
        for support in combinations(range(k), size):
            cols = list(support)
            sol, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if (sol < 0).any():
                continue
            full = np.zeros(k)
            full[cols] = sol
            res = float(np.sum((a @ full - b) ** 2))
            if res < best_res - 1e-15:
                best, best_res = full, res
    return best


def fit_error(predicted: Sequence[float], measured: Sequence[float], labels: Sequence[str]) -> FitError:
    """Relative error of predictions against measurements (a check on points not fitted)."""
    rel = [(p - m) / m for p, m in zip(predicted, measured)]
    if not rel:
        return FitError(0, 0.0, 0.0)
    worst = max(range(len(rel)), key=lambda i: abs(rel[i]))
    return FitError(len(rel), math.sqrt(sum(r * r for r in rel) / len(rel)), abs(rel[worst]),
                    f"{labels[worst]} measured {measured[worst]:.4g} ms, predicted {predicted[worst]:.4g} ms")


# --------------------------------------------------------------------------------------------
# finding a card's cost model
# --------------------------------------------------------------------------------------------
def default_cost_model_path(gpu_name: str, search: Sequence[Path] | None = None) -> Path | None:
    """``results/kernel/<slug>-cost.json`` under the working folder or this checkout, if it exists."""
    name = f"{gpu_slug(gpu_name)}-cost.json"
    roots = list(search) if search is not None else [Path.cwd(), Path(__file__).resolve().parents[1]]
    for root in roots:
        path = root / "results" / "kernel" / name
        if path.is_file():
            return path
    return None
