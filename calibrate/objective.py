"""What calibration optimises, and the time-optimal search of one layer.

Two objectives (``sparge-calibrate --objective``):

- ``sparsity`` (the paper's): per head, the highest block sparsity whose worst relative L1 over the
  samples stays within the bounds (``calibrate.search.search_layer``); the layer runs the exact
  kernel with stage 2 on.
- ``time`` (the default when a cost model is available for the device, ``calibrate.cost``): per
  layer the executor and per head the hyperparameters that minimise the *predicted attention time*
  under the same bounds. Candidates are dense SDPA and every *family* (quantization x estimator) the
  cost model and the device support, each with stage 2 off or on.

The time search of a layer (``search_layer_time``):

1. Dense SDPA's predicted time is the first incumbent (error 0, always feasible).
2. Families are tried cheapest fixed cost first. A family is skipped before any evaluation when its
   fixed costs alone (launch, predictor, the kernel's per-call and per-row terms, at zero density)
   are not below the incumbent; a quantized family also when its predicted time at the densities the
   exact family of the same estimator reached is not below it (quantization adds error, so it needs
   at least about those densities: a heuristic, logged), and when one evaluation at keep-everything
   (the quantization error alone) already exceeds the stage-1 bound on some head.
3. Stage 1 of a family is today's search: the simthreshd1 grid with a bisection of cdfthreshd /
   topk per head (exact: error and density are monotone in the budget). With stage 2 off a layer's
   time is ``fixed + per_pair x sum over heads of density``, so per head the fewest computed pairs is
   the time-optimal choice, and the per-head optimum is what stage 1 already finds.
4. Stage 2 of a family runs only if skipping *every* computed pair could beat the incumbent (the
   check is paid on every computed pair; the saving is ``pv_saved_ns`` per skipped pair): then the
   lowest feasible pvthreshd per head is the time-optimal one (skips grow as pvthreshd falls).
5. The layer takes the fastest candidate. Every evaluated point is reported (and recorded as an
   Optuna trial) with its predicted time as the value; so is the dense candidate and the chosen
   point, whose per-head values are those measured where each head sat (heads are independent).
6. A sparse layer also gets ``min_tokens`` (``crossover_tokens``): its fixed costs do not shrink with
   the length as dense attention's time does, so below some length the chosen call is predicted
   slower than dense SDPA; calls with fewer query tokens then run dense. The calibrated per-head
   density is assumed to hold at the shorter lengths (an assumption: a top-CDF budget keeps a
   similar share of a shorter row, a top-k budget exactly the same share).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cost import DENSE, CallShape, CostModel, CostModelError, default_cost_model_path, kernel_key
from .search import (
    DENSE_BELOW,
    PV_MAX,
    Evaluation,
    HeadResult,
    LayerResult,
    SearchSettings,
    bisect_pv_stats,
    stage1_over_thetas,
)

logger = logging.getLogger(__name__)

OBJECTIVES = ("time", "sparsity")


class ObjectiveError(ValueError):
    """An objective that cannot be used as asked (bad input: the CLI exits 2)."""


@dataclass(frozen=True)
class Family:
    """What one stage-1 search runs: a quantization variant and a block-score estimator."""

    quant: str
    estimator: str

    @property
    def key(self) -> str:
        return f"{self.quant}/{self.estimator}"


@dataclass(frozen=True)
class ObjectiveChoice:
    """The objective of a calibration run and what it needs (picklable: workers get a copy)."""

    name: str
    reason: str
    estimators: tuple[str, ...]
    quants: tuple[str, ...] = ("none",)
    cost_model: CostModel | None = None

    @property
    def families(self) -> tuple[Family, ...]:
        return tuple(Family(q, e) for q in self.quants for e in self.estimators)

    def fingerprint(self) -> dict[str, Any]:
        out: dict[str, Any] = {"objective": self.name}
        if self.name == "time":
            out["families"] = [f.key for f in self.families]
        if self.cost_model is not None:
            out["cost_model_sha256"] = self.cost_model.sha256()
        return out

    def describe(self) -> dict[str, Any]:
        """What the config's ``calibration`` section records."""
        out: dict[str, Any] = {"objective": self.name, "objective_reason": self.reason}
        if self.name == "time":
            out["families"] = [f.key for f in self.families]
        if self.cost_model is not None:
            out["cost_model"] = {"gpu": self.cost_model.gpu, "file": Path(self.cost_model.path).name
                                 if self.cost_model.path else None, "sha256": self.cost_model.sha256(),
                                 "assumptions": len(self.cost_model.assumptions)}
        return out


def device_quants(device: str) -> tuple[str, ...]:
    """Quantization variants the device runs: FP8 P.V needs CUDA sm89+; the CPU reference simulates INT8."""
    if device.startswith("cuda"):
        import torch as _t

        fp8 = _t.cuda.is_available() and _t.cuda.get_device_capability(torch.device(device)) >= (8, 9)
        return ("none", "int8", "int8-fp8") if fp8 else ("none", "int8")
    return ("none", "int8")


def resolve_objective(objective: str | None, cost_model_path: str | None, *, device: str, head_dim: int | None,
                      estimators: Sequence[str], quants: Sequence[str] | None = None) -> ObjectiveChoice:
    """The objective to use. ``objective`` None: ``time`` if a cost model is given or found for the
    device (``results/kernel/<gpu-slug>-cost.json``), else ``sparsity`` (with the reason logged).
    ``head_dim`` None (before the capture says it): every check except the head dim's."""
    if objective is not None and objective not in OBJECTIVES:
        raise ObjectiveError(f"--objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    estimators = tuple(estimators)
    model, where = None, None
    if cost_model_path:
        try:
            model = CostModel.load(cost_model_path)
        except CostModelError as err:
            raise ObjectiveError(f"--cost-model: {err}") from err
        where = f"--cost-model {cost_model_path}"
    elif device.startswith("cuda"):
        gpu = torch.cuda.get_device_name(torch.device(device))
        found = default_cost_model_path(gpu)
        if found is not None:
            model = CostModel.load(found)
            where = str(found)
    if objective == "sparsity" or (objective is None and model is None):
        if len(estimators) != 1:
            raise ObjectiveError(f"--estimator {','.join(estimators)}: the sparsity objective uses one estimator; "
                                 f"several are choices of the time objective (--objective time)")
        if objective == "sparsity":
            reason = "asked for (--objective sparsity)"
        elif device.startswith("cuda"):
            reason = ("no cost model for this GPU (results/kernel/<gpu>-cost.json; make one with sparge-profile, "
                      "or pass --cost-model): maximising sparsity")
        else:
            reason = "no cost model on CPU (pass --cost-model for time): maximising sparsity"
        return ObjectiveChoice("sparsity", reason, estimators, ("none",), model)
    if model is None:
        raise ObjectiveError("--objective time needs a cost model: pass --cost-model PATH (made by sparge-profile on "
                             "the GPU you calibrate for), or --objective sparsity")
    runnable = device_quants(device)
    wanted = tuple(quants) if quants else runnable
    bad = [q for q in wanted if q not in runnable]
    if bad:
        raise ObjectiveError(f"--quants {bad} cannot run on {device} (it runs {list(runnable)})")
    if head_dim is None:
        return ObjectiveChoice("time", f"cost model {where}", estimators, wanted, model)
    have = tuple(q for q in wanted if any(model.has(q, False, e, head_dim) for e in estimators))
    if not have:
        raise ObjectiveError(f"the cost model {where} has none of the variants {list(wanted)} with estimators "
                             f"{list(estimators)} at head dim {head_dim}; profile this head dim (sparge-profile "
                             f"--head-dims {head_dim}) or use --objective sparsity")
    if not model.has_dense(head_dim):
        raise ObjectiveError(f"the cost model {where} has no dense SDPA time at head dim {head_dim}: profile it")
    missing = sorted(set(wanted) - set(have))
    note = f"; variants {missing} are not in the cost model" if missing else ""
    return ObjectiveChoice("time", f"predicted attention time, cost model {where} ({model.gpu}){note}", estimators,
                           have, model)


# --------------------------------------------------------------------------------------------
# predicted time of one layer
# --------------------------------------------------------------------------------------------
class LayerTimer:
    """The cost model at one layer's call shape (batch 1, the calibration length)."""

    def __init__(self, cost: CostModel, shape: CallShape):
        self.cost = cost
        self.shape = shape
        self.allowed_per_head = shape.allowed_pairs / shape.heads

    def available(self, family: Family, stage2: bool) -> bool:
        return self.cost.has(family.quant, stage2, family.estimator, self.shape.head_dim)

    def dense_ms(self) -> float:
        return self.cost.dense_ms(self.shape)

    def fixed_ms(self, family: Family, stage2: bool) -> float:
        """The least time any call of this variant takes (its fixed GPU costs, or the host floor)."""
        return self.cost.sparse_lower_bound_ms(self.shape, family.quant, stage2, family.estimator)

    def sparse_ms(self, family: Family, stage2: bool, density: torch.Tensor, pv_skip: torch.Tensor | None = None) -> float:
        """Predicted ms with per-head ``density`` and ``pv_skip`` (fractions, ``(Hq,)``)."""
        density = torch.as_tensor(density, dtype=torch.float64)
        pairs = float(density.sum()) * self.allowed_per_head
        skipped = 0.0 if pv_skip is None or not stage2 else float((density * torch.as_tensor(
            pv_skip, dtype=torch.float64)).sum()) * self.allowed_per_head
        return self.cost.sparse_ms(self.shape, family.quant, stage2, family.estimator, pairs, skipped)

    def ms_of(self, family: Family, ev: Evaluation) -> float:
        stage2 = ev.pvthreshd is not None
        density = ev.density if ev.density is not None else tuple(1.0 - s for s in ev.sparsity)
        return self.sparse_ms(family, stage2, torch.tensor(density), torch.tensor(ev.pv_skip) if ev.pv_skip else None)


def credited_sparsity(sparsity: Sequence[float]) -> float:
    """The sparsity objective's value of a point: mean over heads, a head at or below ``DENSE_BELOW``
    counting 0 (it would run dense)."""
    return sum(s if s > DENSE_BELOW else 0.0 for s in sparsity) / len(sparsity)


# --------------------------------------------------------------------------------------------
# the time search of one layer
# --------------------------------------------------------------------------------------------
@dataclass
class _Candidate:
    family: Family | None  # None: dense SDPA
    stage2: bool
    ms: float
    theta: torch.Tensor | None = None
    budget: torch.Tensor | None = None
    pv: torch.Tensor | None = None
    l1: torch.Tensor | None = None
    sparsity: torch.Tensor | None = None
    density: torch.Tensor | None = None
    pv_skip: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return DENSE if self.family is None else f"{kernel_key(self.family.quant, self.stage2)}/{self.family.estimator}"


def _ones(h: int) -> torch.Tensor:
    return torch.ones(h, dtype=torch.float64)


def search_layer_time(evaluator_for: Callable[[Family], Callable], num_heads: int, settings: SearchSettings,
                      timer: LayerTimer, families: Sequence[Family], *,
                      on_evaluation: Callable[[Evaluation], None] | None = None,
                      resume: dict | None = None,
                      on_theta_done: Callable[..., None] | None = None,
                      on_probe: Callable[[str, list[float]], None] | None = None) -> LayerResult:
    """The time-optimal executor and per-head hyperparameters of one layer (module docstring).

    ``evaluator_for(family)`` returns the evaluator of that executor (``LayerEvaluator.variant``).
    ``resume`` holds ``{"stage1": {family key: {theta: (budget, l1, sparsity, density)}}, "probe":
    {family key: per-head l1}}`` from an interrupted run; ``on_theta_done(family_key, theta, budget,
    l1, sparsity, density)`` and ``on_probe(family_key, l1)`` report what to keep for that.
    """
    resume = resume or {}
    history: list[Evaluation] = []
    calls = [0]
    pruned: list[str] = []
    h = num_heads

    def report(ev: Evaluation, counted: bool = True) -> None:
        if counted:
            calls[0] += 1
        history.append(ev)
        if on_evaluation is not None:
            on_evaluation(ev)

    def recorder(family: Family) -> Callable[[Evaluation], None]:
        def rec(ev: Evaluation) -> None:
            report(dataclasses.replace(ev, quant=family.quant, estimator=family.estimator,
                                       value=timer.ms_of(family, ev)))
        return rec

    dense = _Candidate(None, False, timer.dense_ms())
    report(Evaluation((1.0,) * h, (1.0,) * h, None, (0.0,) * h, (0.0,) * h, "dense", 0, (1.0,) * h, (0.0,) * h,
                      DENSE, "", dense.ms), counted=False)
    best = dense
    exact_density: dict[str, torch.Tensor] = {}

    def prune(family: Family, why: str) -> None:
        pruned.append(f"{family.key}: {why}")
        logger.debug("pruned %s: %s", family.key, why)

    order = sorted((f for f in families if timer.available(f, False)), key=lambda f: timer.fixed_ms(f, False))
    for family in families:
        if not timer.available(family, False):
            prune(family, "not in the cost model")
    for family in order:
        fixed = timer.fixed_ms(family, False)
        if fixed >= best.ms:
            prune(family, f"fixed costs {fixed:.4g} ms >= best {best.ms:.4g} ms ({best.name})")
            continue
        evaluate = evaluator_for(family)
        top_l1 = torch.zeros(h, dtype=torch.float64)
        if family.quant != "none":
            if family.estimator in exact_density:
                optimistic = timer.sparse_ms(family, False, exact_density[family.estimator])
                if optimistic >= best.ms:
                    prune(family, f"at the exact kernel's densities {optimistic:.4g} ms >= best {best.ms:.4g} ms")
                    continue
            probe = resume.get("probe", {}).get(family.key)
            if probe is None:
                theta1 = torch.ones(h, dtype=torch.float32)
                out = evaluate(theta1, torch.ones(h, dtype=torch.float32), None, settings.mode)
                probe = [float(x) for x in out[0].tolist()]
                report(Evaluation((1.0,) * h, (1.0,) * h, None, tuple(probe), (0.0,) * h, "probe", 0, (1.0,) * h,
                                  (0.0,) * h, family.quant, family.estimator,
                                  timer.sparse_ms(family, False, _ones(h))))
                if on_probe is not None:
                    on_probe(family.key, probe)
            top_l1 = torch.tensor(probe, dtype=torch.float64)
            over = [i for i, x in enumerate(probe) if x > settings.l1]
            if over:
                prune(family, f"quantization error at keep-everything exceeds the bound on heads {over}")
                continue

        def theta_done(theta, budget, l1, sp, dens, _key=family.key):
            if on_theta_done is not None:
                on_theta_done(_key, theta, budget, l1, sp, dens)

        st = stage1_over_thetas(evaluate, h, settings, on_evaluation=recorder(family),
                                done_thetas=resume.get("stage1", {}).get(family.key), on_theta_done=theta_done)
        kept_all = st.budget >= 1.0
        l1 = torch.where(kept_all, torch.maximum(st.l1, top_l1), st.l1)  # a keep-everything head has the probe's error
        sparsity = torch.where(kept_all, torch.zeros_like(st.sparsity), st.sparsity)
        if family.quant == "none":
            exact_density[family.estimator] = st.density
        off = _Candidate(family, False, timer.sparse_ms(family, False, st.density), st.theta, st.budget,
                         torch.full((h,), PV_MAX, dtype=torch.float64), l1, sparsity, st.density,
                         torch.zeros(h, dtype=torch.float64))
        if off.ms < best.ms:
            best = off
        if not settings.tune_pv:
            continue
        if not timer.available(family, True):
            prune(family, "stage 2: not in the cost model")
            continue
        ceiling = timer.sparse_ms(family, True, st.density, _ones(h))
        if ceiling >= best.ms:
            prune(family, f"stage 2 cannot pay for its check: skipping every computed pair {ceiling:.4g} ms "
                          f">= best {best.ms:.4g} ms")
            continue
        pv = bisect_pv_stats(evaluate, st.theta.float(), st.budget, settings, on_evaluation=recorder(family))
        on = _Candidate(family, True, timer.sparse_ms(family, True, pv.density, pv.pv_skip), st.theta, st.budget,
                        pv.value, pv.l1, pv.sparsity, pv.density, pv.pv_skip)
        if on.ms < best.ms:
            best = on
    return _result(best, dense, h, settings, history, calls[0], pruned, report, timer)


def _result(best: _Candidate, dense: _Candidate, h: int, settings: SearchSettings, history, calls: int,
            pruned: list[str], report, timer: LayerTimer) -> LayerResult:
    from sparge_core.params import LayerVariant

    if best.family is None:
        heads = [HeadResult(1.0, 1.0, PV_MAX, 0.0, 0.0, 1.0, 0.0) for _ in range(h)]
        variant = LayerVariant(dense=True)
        estimator = settings.estimator
    else:
        heads = [HeadResult(float(best.theta[i]), float(best.budget[i]), float(best.pv[i]), float(best.sparsity[i]),
                            float(best.l1[i]), float(best.density[i]), float(best.pv_skip[i])) for i in range(h)]
        variant = LayerVariant(dense=False, quant=best.family.quant, stage2=best.stage2)
        estimator = best.family.estimator
        chosen = Evaluation(tuple(x.simthreshd1 for x in heads), tuple(x.budget for x in heads),
                            tuple(x.pvthreshd for x in heads) if best.stage2 else None, tuple(x.l1 for x in heads),
                            tuple(x.sparsity for x in heads), "chosen", 0, tuple(x.density for x in heads),
                            tuple(x.pv_skip for x in heads), best.family.quant, best.family.estimator)
        # the value computed as for every evaluation (same floats), so ties with the point it came from are exact
        best.ms = timer.ms_of(best.family, chosen)
        report(dataclasses.replace(chosen, value=best.ms), counted=False)
    predicted = {"ms": best.ms, "dense_ms": dense.ms}
    if best.family is not None:
        predicted["min_tokens"] = crossover_tokens(timer, best.family, best.stage2, best.density,
                                                   best.pv_skip if best.stage2 else None)
    result = LayerResult(heads, calls, settings.mode, history, variant=variant.to_dict(), estimator=estimator,
                         predicted=predicted)
    result.cost["pruned"] = pruned
    result.cost["chosen"] = best.name
    return result


def crossover_lengths(n_q: int) -> list[int]:
    """The query lengths below ``n_q`` at which ``crossover_tokens`` compares a layer with dense:
    ``BLOCK_Q`` x 1, 2, 3, 4, 6, 8, 12, 16, ... (two per octave)."""
    from sparge_core.ops.blocks import BLOCK_Q

    out, k = [], 1
    while BLOCK_Q * k < n_q:
        out.append(BLOCK_Q * k)
        k = k + 1 if k < 2 else (k * 3 // 2 if k & (k - 1) == 0 else k * 4 // 3)
    return out


def crossover_tokens(timer: LayerTimer, family: Family, stage2: bool, density, pv_skip=None) -> int:
    """The fewest query tokens from which this sparse call is predicted faster than dense SDPA at every
    length of ``crossover_lengths`` up to the calibration length (prefill: as many keys as queries),
    at the calibrated per-head ``density``; 0 when it is faster at all of them."""
    shape = timer.shape
    min_tokens = 0
    for n in reversed(crossover_lengths(shape.n_q)):
        at = LayerTimer(timer.cost, CallShape(n, n, shape.heads, shape.head_dim, shape.causal))
        if at.sparse_ms(family, stage2, density, pv_skip) >= at.dense_ms():
            return min_tokens or shape.n_q
        min_tokens = n
    return 0


def chosen_evaluation(result: LayerResult, settings: SearchSettings, value: float) -> Evaluation:
    """The trial that holds a sparsity-objective layer's config (per-head values as measured)."""
    heads = result.heads
    stage2 = settings.tune_pv and not all(x.dense for x in heads)
    return Evaluation(tuple(x.simthreshd1 for x in heads), tuple(x.budget for x in heads),
                      tuple(x.pvthreshd for x in heads) if stage2 else None, tuple(x.l1 for x in heads),
                      tuple(x.sparsity for x in heads), "chosen", 0,
                      tuple(x.density if x.density is not None else 1.0 - x.sparsity for x in heads),
                      tuple(x.pv_skip or 0.0 for x in heads), "none", settings.estimator, value)


def sparsity_variant(result: LayerResult, settings: SearchSettings) -> dict:
    """The executor a sparsity-objective layer runs: dense if every head keeps every block, else the
    exact kernel with stage 2 as searched (``--no-pv``: off, as its points were evaluated)."""
    from sparge_core.params import LayerVariant

    if all(x.dense for x in result.heads):
        return LayerVariant(dense=True).to_dict()
    return LayerVariant(dense=False, quant="none", stage2=settings.tune_pv).to_dict()


def predict_result(timer: LayerTimer, result: LayerResult, estimator: str) -> dict:
    """``{"ms", "dense_ms"}`` of a layer result under a cost model (the sparsity objective's report)."""
    from sparge_core.params import LayerVariant

    variant = LayerVariant(**result.variant) if result.variant else LayerVariant()
    dense_ms = timer.dense_ms()
    if variant.dense:
        return {"ms": dense_ms, "dense_ms": dense_ms}
    family = Family(variant.quant, estimator)
    if not timer.available(family, variant.stage2):
        return {}
    density = torch.tensor([x.density if x.density is not None else 1.0 - x.sparsity for x in result.heads])
    skip = torch.tensor([x.pv_skip or 0.0 for x in result.heads])
    return {"ms": timer.sparse_ms(family, variant.stage2, density, skip), "dense_ms": dense_ms}
