"""``python -m calibrate.profile`` / ``sparge-profile``: measure this GPU's cost model.

    sparge-profile                                   # -> results/kernel/<gpu-slug>-cost.json
    sparge-profile --head-dims 128 --n 8192 32768    # a smaller sweep
    sparge-profile --from-bench-csv results/kernel/h100-80gb-hbm3.csv --out results/kernel/h100-80gb-hbm3-cost.json
    sparge-profile --dry-run --out /tmp/c.json       # CPU test of the command: fake timer, tiny shapes
    sparge-profile --merge a.json b.json --out c.json   # one file from runs over different head dims

Times the public API on CUDA (``triton.testing.do_bench`` medians: CUDA events after warm-up, over
rotating input buffers) over a sweep of N, density, causal and head dim, then fits the linear costs
of ``calibrate.cost`` by least squares (relative residuals, non-negative coefficients) and writes
them with each fit's error:

Inputs are ``sparge_core.synthetic.structured_qkv`` (attention that concentrates, as in real layers,
so stage 2 has blocks to skip).

- ``block_sparse_attn`` on random block maps (diagonal kept) per quantization variant with
  ``pvthreshd=None`` (stage 2 off) and ``pvthreshd`` 50 / 4 / 0 (stage 2 on, skipping almost none to
  many pairs; the counts come from ``return_stats``);
- ``predict_block_mask`` per estimator;
- dense ``F.scaled_dot_product_attention``;
- the whole ``sparge_attn`` (top-k maps) per quantization, stage 2 on and off: ``launch_ms`` is what
  it costs beyond the predictor and kernel fits, and its prediction error is reported in ``checks``;
- the host floors ``host_ms``: the host's time to issue one whole call of each variant (and of SDPA)
  at a tiny shape (``HOST_FLOOR_SHAPE``), queued without synchronising; a sparse call is timed as
  ``apply`` runs a repeated layer call, replayed from a CUDA graph (``--eager-host-floors``: issued
  eagerly, the cost of a length seen once or of ``cuda_graphs=False``). ``--host-floor-only``
  replaces the floors of an existing file.

``--replay`` times every sparse call replayed from a CUDA graph (as ``apply`` runs a repeated layer
call) instead of eagerly: at a small model's shape (SmolLM2: 9 heads, head dim 64, 2K-8K tokens) an
eager call is host-bound, so its time is the host's and not the GPU's; profile such a model at its own
shape with ``--replay``.

``--dry-run`` runs the same sweep and fit on CPU at tiny shapes with a fake timer whose costs are
known (``FAKE_COSTS``): a test of the command, not a measurement; the file says so. Without a GPU
and without ``--dry-run``/``--from-bench-csv`` the command exits 2.

``--from-bench-csv`` builds a cost model from ``scripts/bench_kernel.py`` rows instead: ``sparge``
(bf16 kernel, stage 2 off), ``sparge-quant-kernel`` (INT8 kernel on pre-quantized Q/K, as
``sparge_attn`` runs it after its fused pass), ``predict`` (pooled), ``sdpa-cudnn`` and the
``sparge-pipeline`` rows; what the CSV does not measure (stage 2 on, the keys estimator) is written
as labelled assumptions.

Exit codes: 0 done, 2 bad input (no GPU, unknown variant, unreadable CSV), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cli import HelpFormatter
from .cost import DENSE, CostModel, LinearCost, Timing, fit_error, fit_linear, gpu_slug, kernel_key

logger = logging.getLogger("calibrate.profile")

#: the stage-2 check's cost when it is not measured: an earlier H200 measurement found the stage-2-on
#: kernel 1.35-1.6x the stage-2-off one whether or not it skips (midpoint taken)
ASSUMED_STAGE2_FACTOR = 1.5
#: the keys estimator's cost beyond the pooled one, when not measured: the same H200 measurement
#: (N=32K, H=32, D=128: keys 5.66 ms, pooled 0.56 ms) over 32 x 256 x 512 score pairs, taken as
#: proportional to the head dim
ASSUMED_KEYS_EXTRA_NS_PER_SCORE_PAIR_D128 = (5.66 - 0.56) * 1e6 / (32 * 256 * 512)
PV_SETTINGS = (None, 50.0, 4.0, 0.0)
ROTATE = 3


class ProfileInputError(ValueError):
    """Bad input: exit code 2."""


# --------------------------------------------------------------------------------------------
# what one sweep point measures
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One timed call: ``kind`` is "kernel", "predictor", "dense" or "pipeline"."""

    kind: str
    n: int
    head_dim: int
    heads: int
    causal: bool
    density: float = 1.0
    quant: str = "none"
    pvthreshd: float | None = None
    estimator: str = "pooled"

    @property
    def label(self) -> str:
        pv = "off" if self.pvthreshd is None else f"{self.pvthreshd:g}"
        return (f"{self.kind} n={self.n} d={self.head_dim} causal={self.causal} density={self.density:g} "
                f"quant={self.quant} pv={pv} est={self.estimator}")


@dataclass(frozen=True)
class Sweep:
    ns: tuple[int, ...]
    head_dims: tuple[int, ...]
    heads: int
    densities: tuple[float, ...]
    quants: tuple[str, ...]
    estimators: tuple[str, ...]
    causal: tuple[bool, ...] = (False, True)

    def cases(self) -> list[Case]:
        out = []
        for d in self.head_dims:
            for n in self.ns:
                for causal in self.causal:
                    out.append(Case("dense", n, d, self.heads, causal))
                    for est in self.estimators:
                        out.append(Case("predictor", n, d, self.heads, causal, estimator=est))
                    for quant in self.quants:
                        for dens in self.densities:
                            for pv in PV_SETTINGS:
                                out.append(Case("kernel", n, d, self.heads, causal, dens, quant, pv))
                        for dens in self.densities[1:] or self.densities:
                            for pv in (None, 50.0):
                                out.append(Case("pipeline", n, d, self.heads, causal, dens, quant, pv,
                                                self.estimators[0]))
        return out


@dataclass(frozen=True)
class Measured:
    case: Case
    ms: float
    rows: int
    pairs: int  # computed block pairs (kernel, pipeline), allowed pairs (dense), score pairs (predictor)
    skipped: int = 0


# --------------------------------------------------------------------------------------------
# running the public API
# --------------------------------------------------------------------------------------------
def _inputs(case: Case, device, cache: dict):
    """Rotating input buffers of a shape (``structured_qkv``: attention that concentrates, so stage 2
    finds blocks to skip and predicted maps look like real ones), made once per shape."""
    import torch

    from sparge_core.synthetic import structured_qkv

    key = (case.n, case.head_dim, case.heads)
    if key not in cache:
        cache.clear()  # one shape at a time on the device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
        cache[key] = [structured_qkv(1, case.heads, case.heads, case.n, case.head_dim, dtype=dtype, device=device,
                                     seed=1000 * case.n + case.head_dim + i)
                      for i in range(ROTATE if device.type == "cuda" else 1)]
    return cache[key]


def _random_mask(case: Case, device, generator):
    import torch

    from sparge_core.ops import reference as R

    nqb, nkb = R.num_blocks(case.n, R.BLOCK_Q), R.num_blocks(case.n, R.BLOCK_K)
    mask = torch.rand(1, case.heads, nqb, nkb, device=device, generator=generator) < case.density
    mask |= R.causal_diagonal_block_mask(case.n, case.n, R.BLOCK_Q, R.BLOCK_K, device=device)
    return mask & R.allowed_block_mask(case.n, case.n, case.causal, device=device)


def _call(case: Case, qkv, mask) -> Callable:
    import torch.nn.functional as F

    from sparge_core import block_sparse_attn, predict_block_mask, sparge_attn

    q, k, v = qkv
    if case.kind == "dense":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
    if case.kind == "predictor":
        return lambda: predict_block_mask(q, k, is_causal=case.causal, simthreshd1=0.4, cdfthreshd=0.9,
                                          estimator=case.estimator)
    if case.kind == "kernel":
        return lambda: block_sparse_attn(q, k, v, mask, is_causal=case.causal, pvthreshd=case.pvthreshd,
                                         quant=case.quant, return_stats=False)
    kw = _pipeline_kwargs(case)
    return lambda: sparge_attn(q, k, v, is_causal=case.causal, quant=case.quant, estimator=case.estimator, **kw)


def _pipeline_kwargs(case: Case) -> dict:
    """Per-head lists, as a calibrated layer passes them (their host-to-device copies are part of the cost)."""
    h = case.heads
    return {"simthreshd1": [-1.0] * h, "cdfthreshd": None, "topk": [case.density] * h,
            "pvthreshd": None if case.pvthreshd is None else [case.pvthreshd] * h}


def _counts(case: Case, qkv, mask) -> tuple[int, int, int]:
    """``(rows, pairs, skipped)`` of a case (the API's own block counts where it has them)."""
    from sparge_core import block_sparse_attn, sparge_attn
    from sparge_core.ops.blocks import BLOCK_K, BLOCK_Q, allowed_block_count, num_blocks

    rows = case.heads * num_blocks(case.n, BLOCK_Q)
    if case.kind == "dense":
        return rows, case.heads * allowed_block_count(case.n, case.n, case.causal), 0
    if case.kind == "predictor":
        return rows, rows * num_blocks(case.n, BLOCK_K), 0
    q, k, v = qkv
    if case.kind == "kernel":
        _, st = block_sparse_attn(q, k, v, mask, is_causal=case.causal, pvthreshd=case.pvthreshd, quant=case.quant,
                                  return_stats=True)
    else:
        _, st = sparge_attn(q, k, v, is_causal=case.causal, quant=case.quant, estimator=case.estimator,
                            return_stats=True, **_pipeline_kwargs(case))
    return rows, int(st.computed_blocks.sum()), int(st.pv_skipped_blocks.sum())


def cuda_timer(fns: list[Callable]) -> float:
    """Median ms of the calls (rotating over input buffers), CUDA events after warm-up."""
    import triton.testing

    it = [0]

    def step():
        it[0] = (it[0] + 1) % len(fns)
        return fns[it[0]]()

    return float(triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"))


#: the fake timer's costs (``--dry-run``): per kind, ``fixed_ms, per_row_ns, per_pair_ns, pv_saved_ns``;
#: sized so every term matters at the tiny dry-run shapes, so a fit can be checked against them
FAKE_COSTS = {
    "dense": (0.05, 2000.0, 20000.0, 0.0),
    "predictor/pooled": (0.2, 5000.0, 3000.0, 0.0),
    "predictor/keys": (0.3, 5000.0, 8000.0, 0.0),
    "kernel/none": (0.1, 3000.0, 40000.0, 0.0),
    "kernel/none+pv": (0.1, 4500.0, 60000.0, 15000.0),
    "kernel/int8": (0.15, 4000.0, 25000.0, 0.0),
    "kernel/int8+pv": (0.15, 6000.0, 37500.0, 10000.0),
    "launch/none": 0.08,
    "launch/int8": 0.04,
}


def fake_ms(m: Measured) -> float:
    """The dry run's 'time' of a measured case: known costs plus a deterministic 1% wobble."""
    c = m.case
    wobble = 1.0 + 0.01 * math.sin(7.0 * m.rows + 3.0 * m.pairs + (c.pvthreshd or 0.0))
    kern = "kernel/" + kernel_key(c.quant, c.pvthreshd is not None)
    if c.kind == "dense":
        key = "dense"
    elif c.kind == "predictor":
        key = "predictor/" + c.estimator
    elif c.kind == "kernel":
        key = kern
    else:
        from sparge_core.ops.blocks import BLOCK_K

        pred = fake_ms(Measured(Case("predictor", c.n, c.head_dim, c.heads, c.causal, estimator=c.estimator),
                                0.0, m.rows, m.rows * (c.n + BLOCK_K - 1) // BLOCK_K)) / wobble
        kernel = fake_ms(Measured(Case("kernel", c.n, c.head_dim, c.heads, c.causal, c.density, c.quant, c.pvthreshd),
                                  0.0, m.rows, m.pairs, m.skipped)) / wobble
        return (FAKE_COSTS["launch/" + c.quant] + pred + kernel) * wobble
    fixed, per_row, per_pair, saved = FAKE_COSTS[key]
    return (fixed + 1e-6 * (per_row * m.rows + per_pair * m.pairs - saved * m.skipped)) * wobble


def measure(sweep: Sweep, device, *, dry_run: bool, replay: bool = False) -> list[Measured]:
    """Time every case of the sweep. ``replay``: each sparse call (kernel, predictor, pipeline) is timed
    replayed from a CUDA graph, as ``apply`` runs a repeated layer call (``sparge_core.graphs``, Q/K/V
    copied in), so the times are the GPU's and not the host's issue time: the profile to take at a
    small model's shape, where an eager call is host-bound. Dense SDPA stays eager (``apply`` hands
    dense layers to the model's own SDPA)."""
    import torch

    from sparge_core.graphs import GraphCache

    gen = torch.Generator(device=device).manual_seed(0)
    graphs = GraphCache() if replay else None
    out = []
    cases = sweep.cases()
    cache: dict = {}
    t0 = time.perf_counter()
    for i, case in enumerate(cases):
        sets = _inputs(case, device, cache)
        mask = _random_mask(case, device, gen) if case.kind == "kernel" else None
        rows, pairs, skipped = _counts(case, sets[0], mask)
        m = Measured(case, 0.0, rows, pairs, skipped)
        if dry_run:
            ms = fake_ms(m)
        elif replay and case.kind != "dense":
            ms = cuda_timer([_replayed_call(graphs, case, s, mask) for s in sets])
        else:
            ms = cuda_timer([_call(case, s, mask) for s in sets])
        out.append(Measured(case, ms, rows, pairs, skipped))
        logger.info("[%d/%d %.0fs] %s: %.4f ms (pairs %d, skipped %d)", i + 1, len(cases), time.perf_counter() - t0,
                    case.label, ms, pairs, skipped)
        del sets, mask
    return out


#: the host-floor shape: small enough that the GPU work is negligible next to issuing the call
HOST_FLOOR_SHAPE = dict(heads=4, n=1024)
#: the dry run's host floors (ms), per kernel key
FAKE_GRAPH_FACTOR = 0.2  # the dry run's replayed call, x its eager fake floor
FAKE_HOST_MS = {"dense": 0.01, "none": 0.3, "none+pv": 0.35, "int8": 0.32, "int8+pv": 0.37,
                "int8-fp8": 0.33, "int8-fp8+pv": 0.38}


def host_ms_per_call(fn: Callable, calls: int = 50, repeats: int = 3) -> float:
    """The host's ms to issue one call: wall clock over ``calls`` calls queued without synchronising
    (after warm-up), the least of ``repeats``; on a shape whose GPU work is negligible this is the
    floor below which no call of that kind finishes."""
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) * 1e3 / calls)
        torch.cuda.synchronize()
    return best


def _replayed_call(graphs, case: Case, qkv, mask) -> Callable:
    """``case``'s call (with its block map, for a kernel case) as ``apply`` runs a repeated layer call:
    replayed from a CUDA graph of ``graphs``."""
    def call(q, k, v):
        return _call(case, (q, k, v), mask)()

    return lambda: graphs.run(case.label, call, qkv, keep=(mask,))


def measure_host_floor(sweep: Sweep, device, *, dry_run: bool, graphs: bool = True) -> dict[str, float]:
    """``host_ms`` of the cost model: per kernel key (dense and each quantization with stage 2 off and
    on), the host time of one whole call at ``HOST_FLOOR_SHAPE`` (the largest over the head dims).
    ``graphs``: a sparse call is timed as ``apply`` runs a repeated layer call, replayed from a CUDA
    graph (``sparge_core.graphs``; copies of Q/K/V in); False: issued eagerly. Dense SDPA is always
    eager (``apply`` hands dense layers to the model's own SDPA)."""
    from sparge_core.graphs import GraphCache

    cache_graphs = GraphCache()
    floors: dict[str, float] = {}
    for head_dim in sweep.head_dims:
        cases = [Case("dense", HOST_FLOOR_SHAPE["n"], head_dim, HOST_FLOOR_SHAPE["heads"], True)]
        cases += [Case("pipeline", HOST_FLOOR_SHAPE["n"], head_dim, HOST_FLOOR_SHAPE["heads"], True, 0.5, quant, pv,
                       estimator=sweep.estimators[0])
                  for quant in sweep.quants for pv in (None, 50.0)]
        cache: dict = {}
        for case in cases:
            key = DENSE if case.kind == "dense" else kernel_key(case.quant, case.pvthreshd is not None)
            if dry_run:
                ms = FAKE_HOST_MS[key] * (FAKE_GRAPH_FACTOR if graphs and key != DENSE else 1.0)
            else:
                qkv = _inputs(case, device, cache)[0]
                fn = _call(case, qkv, None)
                if graphs and key != DENSE:
                    fn = _replayed_call(cache_graphs, case, qkv, None)
                ms = host_ms_per_call(fn)
            floors[key] = max(floors.get(key, 0.0), ms)
            logger.info("host floor %s d=%d: %.4f ms per call", key, head_dim, ms)
    return floors


# --------------------------------------------------------------------------------------------
# fitting the measured sweep
# --------------------------------------------------------------------------------------------
def _timings(points: list[Measured]) -> list[Timing]:
    return [Timing(p.ms, p.rows, p.pairs, p.skipped, p.case.label) for p in points]


def fit_sweep(points: list[Measured], *, gpu: str, source: str, versions: dict | None = None) -> CostModel:
    """The cost model of a measured sweep (see the module docstring)."""
    kernels: dict[str, dict[int, LinearCost]] = {}
    predictors: dict[str, dict[int, LinearCost]] = {}
    dims = sorted({p.case.head_dim for p in points})
    for d in dims:
        at = [p for p in points if p.case.head_dim == d]
        dense = [p for p in at if p.case.kind == "dense"]
        if dense:
            kernels.setdefault(DENSE, {})[d] = fit_linear(_timings(dense))
        for est in sorted({p.case.estimator for p in at if p.case.kind == "predictor"}):
            sel = [p for p in at if p.case.kind == "predictor" and p.case.estimator == est]
            predictors.setdefault(est, {})[d] = fit_linear(_timings(sel))
        for quant in sorted({p.case.quant for p in at if p.case.kind == "kernel"}):
            for stage2 in (False, True):
                sel = [p for p in at if p.case.kind == "kernel" and p.case.quant == quant
                       and (p.case.pvthreshd is not None) == stage2]
                if sel:
                    kernels.setdefault(kernel_key(quant, stage2), {})[d] = fit_linear(_timings(sel), with_skip=stage2)
    partial = CostModel(gpu, kernels, predictors, {q: 0.0 for q in {p.case.quant for p in points}})
    launch, checks = _fit_launch(partial, [p for p in points if p.case.kind == "pipeline"])
    return CostModel(gpu, kernels, predictors, launch, source=source, checks=checks, versions=versions or {})


def _fit_launch(model: CostModel, pipeline: list[Measured]) -> tuple[dict[str, float], dict]:
    """``launch_ms[quant]``: the relative-weighted mean of (pipeline - predictor - kernel), and the
    whole-call prediction error on the pipeline points."""
    launch: dict[str, float] = {}
    checks: dict = {}
    for quant in sorted({p.case.quant for p in pipeline}):
        sel = [p for p in pipeline if p.case.quant == quant]
        base = [_base_ms(model, p) for p in sel]
        w = [1.0 / p.ms ** 2 for p in sel]
        launch[quant] = sum(wi * (p.ms - b) for wi, p, b in zip(w, sel, base)) / sum(w)
        err = fit_error([b + launch[quant] for b in base], [p.ms for p in sel], [p.case.label for p in sel])
        checks[f"sparge_attn.{quant}"] = {**err.to_dict(), "what": "whole sparge_attn calls (top-k maps) vs "
                                          "launch_ms + predictor + kernel"}
    for quant in model.launch_ms:
        launch.setdefault(quant, 0.0)
    return launch, checks


def _base_ms(model: CostModel, p: Measured) -> float:
    from sparge_core.ops.blocks import BLOCK_K

    c = p.case
    pred = model.predictor(c.estimator, c.head_dim).ms(p.rows, p.rows * ((c.n + BLOCK_K - 1) // BLOCK_K))
    kern = model.kernel(kernel_key(c.quant, c.pvthreshd is not None), c.head_dim).ms(p.rows, p.pairs, p.skipped)
    return pred + kern


# --------------------------------------------------------------------------------------------
# the cost model of a scripts/bench_kernel.py CSV
# --------------------------------------------------------------------------------------------
BENCH_ROWS = {"sparge": "none", "sparge-quant-kernel": "int8"}


def _read_csv(path: Path, need: set[str], what: str) -> list[dict]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise ProfileInputError(f"cannot read {path}: {err}") from err
    if not rows or not need <= set(rows[0]):
        raise ProfileInputError(f"{path} is not a {what} CSV (columns {sorted(need)} expected)")
    return rows


def stage2_factors_from_tune_csv(path: str | Path) -> dict[int, float]:
    """Per head dim, the measured cost of stage 2 on: the shipped bf16 launch config's time at
    ``pv=50`` (which skips almost nothing) over its time with stage 2 off, dense maps, mean over the
    causal settings (``scripts/tune_kernel.py`` rows)."""
    import torch

    from sparge_core.ops.attention import default_kernel_config

    rows = _read_csv(Path(path), {"d", "quant", "pv", "config", "density", "causal", "ms"}, "tune_kernel.py")
    out = {}
    for d in sorted({int(r["d"]) for r in rows}):
        cfg = default_kernel_config(d, torch.device("cuda"), "none").name
        ratios = []
        for causal in ("False", "True"):
            at = {r["pv"]: float(r["ms"]) for r in rows if int(r["d"]) == d and r["config"] == cfg
                  and r["quant"] == "none" and r["density"] in ("1.0", "1") and r["causal"] == causal}
            if "off" in at and "50" in at:
                ratios.append(at["50"] / at["off"])
        if ratios:
            out[d] = sum(ratios) / len(ratios)
    if not out:
        raise ProfileInputError(f"{path} has no pv=off / pv=50 pair of the shipped launch config at density 1")
    return out


def cost_model_from_bench_csv(path: str | Path, *, stage2_factor: float = ASSUMED_STAGE2_FACTOR,
                              predictor_csv: str | Path | None = None,
                              tune_csv: str | Path | None = None) -> CostModel:
    """Fit a cost model from ``scripts/bench_kernel.py`` output; the parts it lacks are assumptions.
    ``predictor_csv`` (``scripts/bench_predictor.py`` rows) measures both estimators and the whole
    ``sparge_attn``; ``tune_csv`` (``scripts/tune_kernel.py`` rows) measures stage 2's cost."""
    from sparge_core.ops.blocks import BLOCK_K, BLOCK_Q, allowed_block_count, num_blocks

    path = Path(path)
    rows = _read_csv(path, {"gpu", "n", "d", "heads", "causal", "density", "method", "ms"}, "bench_kernel.py")
    gpu = rows[0]["gpu"]
    prow = []
    if predictor_csv is not None:
        prow = _read_csv(Path(predictor_csv), {"gpu", "n", "d", "heads", "causal", "density", "method", "ms"},
                         "bench_predictor.py")
        if prow[0]["gpu"] != gpu:
            raise ProfileInputError(f"{predictor_csv} was measured on {prow[0]['gpu']}, {path} on {gpu}")
    factors = stage2_factors_from_tune_csv(tune_csv) if tune_csv is not None else {}

    def feats(r, kind):
        n, h, causal, dens = int(r["n"]), int(r["heads"]), r["causal"] == "True", float(r["density"])
        rws = h * num_blocks(n, BLOCK_Q)
        label = f"{r['method']} n={n} d={r['d']} causal={causal} density={dens:.3f} {r.get('mask', '')}"
        if kind == "dense":
            return Timing(float(r["ms"]), rws, h * allowed_block_count(n, n, causal), 0, label)
        if kind == "predictor":
            return Timing(float(r["ms"]), rws, rws * num_blocks(n, BLOCK_K), 0, label)
        return Timing(float(r["ms"]), rws, dens * h * allowed_block_count(n, n, causal), 0, label)

    kernels: dict[str, dict[int, LinearCost]] = {}
    predictors: dict[str, dict[int, LinearCost]] = {}
    dims = sorted({int(r["d"]) for r in rows})
    assumptions = [] if factors else [
        (f"stage 2 on ('<quant>+pv'): not in the CSV; per_pair_ns and per_row_ns = {stage2_factor} x the "
         f"stage-2-off kernel's, pv_saved_ns = 0 (an earlier H200 measurement found the stage-2 check costs "
         f"1.35-1.6x the stage-2-off kernel whether or not it skips); replace by running sparge-profile on this card"),
    ]
    if factors:
        assumptions.append(
            f"stage 2 on ('<quant>+pv'): per head dim, the shipped launch config's pv=50 / pv=off time at density 1 "
            f"from {Path(tune_csv).name} ({', '.join(f'D={d}: {f:.2f}x' for d, f in factors.items())}), applied to "
            f"the int8 kernel too (not measured for it); pv_saved_ns = 0 (where stage 2 skips ~45% of the blocks "
            f"the best shape only breaks even)")
    if not any(r["method"] == "predict-keys" for r in prow):
        assumptions.append(
        (f"predictor 'keys': not in the CSV; the pooled fit plus {ASSUMED_KEYS_EXTRA_NS_PER_SCORE_PAIR_D128:.3f} ns "
         f"per score pair at head dim 128, proportional to the head dim (an earlier H200 measurement: keys 5.66 ms "
         f"vs pooled 0.56 ms at N=32K, H=32, D=128)"))
    assumptions += [
        ("int8: the 'sparge-quant-kernel' rows (the INT8 kernel on Q/K quantized beforehand, which is what "
         "sparge_attn runs after its predictor pass quantizes them); the quantization inside that pass is in "
         "launch_ms.int8") if any(r["method"] == "sparge-quant-kernel" for r in rows) else
        ("int8: the 'sparge-quant' rows (block_sparse_attn quant='int8': its own quantization pass included, "
         "which sparge_attn instead fuses into the predictor's pass, so this over-counts a sparse call a little)"),
        "int8-fp8: not in the CSV (no entry: calibration does not consider it with this file)",
    ]
    for d in dims:
        at = [r for r in rows if int(r["d"]) == d]
        dense = [feats(r, "dense") for r in at if r["method"] == "sdpa-cudnn"]
        if dense:
            kernels.setdefault(DENSE, {})[d] = fit_linear(dense, source="measured")
        pat = [r for r in prow if int(r["d"]) == d]
        keys = [feats(r, "predictor") for r in pat if r["method"] == "predict-keys"]
        pred = [feats(r, "predictor") for r in at + pat if r["method"] in ("predict", "predict-topk")]
        if keys:
            predictors.setdefault("keys", {})[d] = fit_linear(keys, source="measured")
        if pred and keys:
            predictors.setdefault("pooled", {})[d] = fit_linear(pred, source="measured")
        elif pred:
            pooled = fit_linear(pred, source="measured")
            predictors.setdefault("pooled", {})[d] = pooled
            extra = ASSUMED_KEYS_EXTRA_NS_PER_SCORE_PAIR_D128 * d / 128
            predictors.setdefault("keys", {})[d] = LinearCost(
                pooled.fixed_ms, pooled.per_row_ns, pooled.per_pair_ns + extra,
                source="assumed: the pooled fit plus the keys estimator's extra cost measured on an H200 "
                       "(see assumptions)")
        for method, quant in BENCH_ROWS.items():
            sel = [feats(r, "kernel") for r in at if r["method"] == method]
            if not sel and method == "sparge-quant-kernel":  # newer CSVs: the INT8 row with its quantization
                sel = [feats(r, "kernel") for r in at if r["method"] == "sparge-quant"]
            if not sel:
                continue
            off = fit_linear(sel, source="measured")
            kernels.setdefault(quant, {})[d] = off
            factor = factors.get(d, stage2_factor)
            kernels.setdefault(quant + "+pv", {})[d] = LinearCost(
                off.fixed_ms, off.per_row_ns * factor, off.per_pair_ns * factor, 0.0,
                source=(f"fitted: {factor:.2f} x the stage-2-off kernel, the factor measured (see assumptions)" if d in factors
                        else f"assumed: {stage2_factor} x the stage-2-off kernel (see assumptions)"))
    partial = CostModel(gpu, kernels, predictors, {"none": 0.0, "int8": 0.0})
    launch, checks = {}, {}
    for method, quant in (("sparge-pipeline-bf16", "none"), ("sparge-pipeline", "int8")):
        sel = [r for r in rows if r["method"] == method]
        stage2 = "+pv"  # these bench_kernel rows ran sparge_attn with stage 2 on (pvthreshd 50)
        if not sel:  # bench_predictor's rows: sparge_attn(topk=0.5) at its defaults, stage 2 off
            sel = [r for r in prow if r["method"] == {"none": "pipeline", "int8": "pipeline-int8"}[quant]]
            stage2 = ""
        if not sel:
            launch[quant] = 0.0
            continue
        base, preds, base_off, meas, labels = [], [], [], [], []
        for r in sel:
            t = feats(r, "kernel")
            d = int(r["d"])
            p = partial.predictor("pooled", d).ms(t.rows, t.rows * num_blocks(int(r["n"]), BLOCK_K))
            preds.append(p)
            base.append(p + partial.kernel(quant + stage2, d).ms(t.rows, t.pairs))
            base_off.append(partial.kernel(quant, d).ms(t.rows, t.pairs))
            meas.append(t.ms)
            labels.append(t.label)
        w = [1.0 / m ** 2 for m in meas]
        # non-negative, as every other coefficient: a negative residual means the parts overlap
        launch[quant] = max(0.0, sum(wi * (m - b) for wi, m, b in zip(w, meas, base)) / sum(w))
        err = fit_error([b + launch[quant] for b in base], meas, labels)
        checks[f"sparge_attn.{quant}"] = {
            **err.to_dict(), "what": (f"'{method}' rows (sparge_attn topk=0.5, pooled, pvthreshd 50 = stage 2 on) "
                                      f"vs launch_ms + predictor + assumed stage-2-on kernel") if stage2 else
                                     ("bench_predictor 'pipeline' rows (sparge_attn topk=0.5, pooled, stage 2 off) "
                                      "vs launch_ms + predictor + stage-2-off kernel")}
        if stage2:
            checks[f"implied_stage2_factor.{quant}"] = _implied_stage2_factor(meas, preds, base_off)
    model = CostModel(
        gpu, kernels, predictors, launch,
        source=f"fitted from {path.name} (scripts/bench_kernel.py, B=1, H=32, bf16) by "
               f"python -m calibrate.profile --from-bench-csv {path.as_posix()}"
               + (f" --predictor-csv {Path(predictor_csv).as_posix()}" if predictor_csv is not None else "")
               + (f" --tune-csv {Path(tune_csv).as_posix()}" if tune_csv is not None else ""),
        assumptions=tuple(assumptions), checks=checks)
    return model


def _implied_stage2_factor(measured, predictor, kernel_off) -> dict:
    """Least squares of ``measured - predictor = launch + f * kernel_off`` for ``f``: what the
    pipeline rows (stage 2 on) say about the stage-2 factor. A check of the assumption, not used for
    predictions: the launch overhead and the factor are fitted together from few rows."""
    import numpy as np

    y = np.array(measured) - np.array(predictor)
    x = np.stack([np.ones(len(kernel_off)), np.array(kernel_off)], axis=1)
    w = 1.0 / np.array(measured)
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    return {"launch_ms": round(float(coef[0]), 4), "factor": round(float(coef[1]), 3), "points": len(measured),
            "what": "least squares of pipeline = launch + predictor + factor x stage-2-off kernel on the "
                    "sparge-pipeline rows (stage 2 on, pvthreshd 50)"}


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparge-profile", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--out", default=None, help="cost model JSON (default results/kernel/<gpu-slug>-cost.json)")
    p.add_argument("--n", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="sequence lengths")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    p.add_argument("--quants", nargs="+", default=None, help="kernel variants (default: none int8, plus int8-fp8 "
                   "on sm89+)")
    p.add_argument("--estimators", nargs="+", default=["pooled", "keys"])
    p.add_argument("--device", default="cuda", help="the CUDA device to profile (cuda, cuda:1, ...)")
    p.add_argument("--dry-run", action="store_true", help="CPU test of the command: tiny shapes, fake timer "
                   "(known costs), file marked as such")
    p.add_argument("--from-bench-csv", default=None, help="fit from a scripts/bench_kernel.py CSV instead of "
                   "measuring (no GPU needed)")
    p.add_argument("--predictor-csv", default=None, help="with --from-bench-csv: scripts/bench_predictor.py rows "
                   "of the same GPU (measures both estimators and the whole sparge_attn)")
    p.add_argument("--tune-csv", default=None, help="with --from-bench-csv: scripts/tune_kernel.py rows of the same "
                   "GPU (measures stage 2's cost instead of --stage2-factor)")
    p.add_argument("--stage2-factor", type=float, default=ASSUMED_STAGE2_FACTOR,
                   help="with --from-bench-csv: the assumed cost of stage 2 on, x the stage-2-off kernel")
    p.add_argument("--merge", nargs="+", default=None, help="combine cost models of one GPU made by separate runs "
                   "(e.g. one per head dim) into --out; later files win where both have an entry")
    p.add_argument("--host-floor-only", action="store_true", help="measure only the host floors (host_ms: the "
                   "host's time to issue one call) and write them into the existing cost model --out, replacing "
                   "the floors it had")
    p.add_argument("--eager-host-floors", action="store_true", help="time the sparse calls' host floors issued "
                   "eagerly (as apply(..., cuda_graphs=False) or a length seen once runs them) instead of replayed "
                   "from a CUDA graph (as apply runs a repeated layer call, the default)")
    p.add_argument("--replay", action="store_true", help="time the sparse calls replayed from CUDA graphs, as apply "
                   "runs a repeated layer call: the GPU's time, not the host's (take it at a small model's shape, "
                   "e.g. --heads 9 --head-dims 64 --n 2048 4096 8192, where eager calls are host-bound)")
    p.add_argument("--quiet", action="store_true")
    return p


def merge_models(models: list[CostModel]) -> CostModel:
    """One cost model from several of the same GPU (per kernel/predictor and head dim, later wins)."""
    gpus = {m.gpu for m in models}
    if len(gpus) != 1:
        raise ProfileInputError(f"--merge: the files describe different GPUs {sorted(gpus)}")
    kernels: dict = {}
    predictors: dict = {}
    launch: dict = {}
    host: dict = {}
    checks: dict = {}
    for m in models:
        for key, table in m.kernels.items():
            kernels.setdefault(key, {}).update(table)
        for key, table in m.predictors.items():
            predictors.setdefault(key, {}).update(table)
        launch.update(m.launch_ms)
        for key, ms in m.host_ms.items():
            host[key] = max(host.get(key, 0.0), ms)
        checks.update(m.checks)
    assumptions = tuple(dict.fromkeys(a for m in models for a in m.assumptions))
    source = " + ".join(dict.fromkeys(m.source for m in models))
    return CostModel(models[0].gpu, kernels, predictors, launch, host, source=source, assumptions=assumptions,
                     checks=checks, versions=models[-1].versions)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return _main(args)
    except ProfileInputError as err:
        print(f"sparge-profile: error: {err}", file=sys.stderr)
        return 2


def _versions() -> dict[str, str]:
    import torch
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": str(torch.version.cuda)}


def _main(args) -> int:
    import torch

    from sparge_core.ops.blocks import ESTIMATORS
    from sparge_core.params import VARIANT_QUANTS

    bad = [e for e in args.estimators if e not in ESTIMATORS]
    if bad:
        raise ProfileInputError(f"--estimators {bad} unknown; choose from {list(ESTIMATORS)}")
    if args.quants is not None:
        bad = [q for q in args.quants if q not in VARIANT_QUANTS]
        if bad:
            raise ProfileInputError(f"--quants {bad} unknown; choose from {list(VARIANT_QUANTS)}")
    if any(d < 1 for d in args.head_dims) or any(n < 128 for n in args.n) or args.heads < 1:
        raise ProfileInputError("--head-dims and --heads must be >= 1 and --n >= 128")
    if any(not 0 < x <= 1 for x in args.densities):
        raise ProfileInputError(f"--densities must be in (0, 1], got {args.densities}")
    if args.merge:
        from .cost import CostModelError

        if not args.out:
            raise ProfileInputError("--merge needs --out")
        try:
            model = merge_models([CostModel.load(p) for p in args.merge])
        except CostModelError as err:
            raise ProfileInputError(str(err)) from err
        model.save(args.out)
        CostModel.load(args.out)
        print(f"wrote {args.out}")
        return 0
    if args.from_bench_csv:
        if not args.stage2_factor >= 1:
            raise ProfileInputError(f"--stage2-factor must be >= 1, got {args.stage2_factor}")
        model = cost_model_from_bench_csv(args.from_bench_csv, stage2_factor=args.stage2_factor,
                                          predictor_csv=args.predictor_csv, tune_csv=args.tune_csv)
        out = Path(args.out or Path(args.from_bench_csv).with_name(gpu_slug(model.gpu) + "-cost.json"))
        model.save(out)
        CostModel.load(out)
        print(f"wrote {out}")
        return 0
    if args.dry_run:
        device = torch.device("cpu")
        sweep = Sweep((128, 256, 384, 512), (64,), 2, (1.0, 0.5, 0.25), tuple(args.quants or ("none", "int8")),
                      tuple(args.estimators))
        gpu = "dry-run (fake timer)"
        source = ("dry run of python -m calibrate.profile on CPU: FAKE times from calibrate.profile.FAKE_COSTS, "
                  "not a measurement")
    else:
        if not torch.cuda.is_available():
            raise ProfileInputError("sparge-profile times the kernels on a CUDA GPU and none is visible (the CPU "
                                    "path is the Triton interpreter or the PyTorch reference: not a benchmark). "
                                    "Run it on the GPU you calibrate for; --dry-run tests the command on CPU")
        device = torch.device(args.device)
        if device.type != "cuda":
            raise ProfileInputError(f"--device must be a CUDA device, got {args.device}")
        quants = args.quants
        if quants is None:
            quants = ["none", "int8"] + (["int8-fp8"] if torch.cuda.get_device_capability(device) >= (8, 9) else [])
        sweep = Sweep(tuple(args.n), tuple(args.head_dims), args.heads, tuple(sorted(args.densities, reverse=True)),
                      tuple(quants), tuple(args.estimators))
        torch.cuda.set_device(device.index if device.index is not None else torch.cuda.current_device())
        gpu = torch.cuda.get_device_name(device)
        source = (f"python -m calibrate.profile on {gpu}, {_dt.date.today().isoformat()}: n {list(sweep.ns)}, "
                  f"head dims {list(sweep.head_dims)}, heads {sweep.heads}, densities {list(sweep.densities)}")
    t0 = time.perf_counter()
    out = Path(args.out or f"results/kernel/{gpu_slug(gpu)}-cost.json")
    if args.host_floor_only:
        from .cost import CostModelError

        try:
            model = CostModel.load(out)
        except CostModelError as err:
            raise ProfileInputError(f"--host-floor-only updates an existing cost model: {err}") from err
        if not args.dry_run and model.gpu != gpu:
            raise ProfileInputError(f"{out} describes {model.gpu}, not this {gpu}; profile this card first")
        host = measure_host_floor(sweep, device, dry_run=args.dry_run, graphs=not args.eager_host_floors)
        how = "eager" if args.eager_host_floors else "CUDA-graph replay"
        note = f"host_ms ({how}): python -m calibrate.profile --host-floor-only, {_dt.date.today().isoformat()}"
        model = CostModel(**{**model.__dict__, "host_ms": host,
                             "source": f"{model.source} + {note}" if model.source else note})
        model.save(out)
        CostModel.load(out)
        print(f"wrote host floors {', '.join(f'{k} {v:.3f} ms' for k, v in sorted(host.items()))} into {out}")
        return 0
    points = measure(sweep, device, dry_run=args.dry_run, replay=args.replay)
    if args.replay:
        source += "; sparse calls timed replayed from CUDA graphs (--replay)"
    model = fit_sweep(points, gpu=gpu, source=source, versions=_versions())
    host = measure_host_floor(sweep, device, dry_run=args.dry_run, graphs=not args.eager_host_floors)
    model = CostModel(**{**model.__dict__, "host_ms": host,
                         "checks": {**model.checks, "profile_seconds": round(time.perf_counter() - t0, 1)}})
    model.save(out)
    CostModel.load(out)
    print(f"wrote {out} ({len(points)} timings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
