"""The search workers of a calibration run: each claims unfinished layers in the Optuna storage and
searches them until every layer has a result (``calibrate.study`` holds the claims and results).

This is an importable module, not ``__main__``: ``--workers N`` starts N - 1 extra processes with
the ``spawn`` method, which re-imports the worker's entry point by module name.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("calibrate")


@dataclass(frozen=True)
class Plan:
    """A validated calibration run: the parsed arguments and the resolved paths and device."""

    args: argparse.Namespace
    out: Path
    capture_dir: Path
    storage_url: str
    device: str


def settings_of(plan: Plan):
    from .search import DEFAULT_THETAS, SearchSettings

    a = plan.args
    return SearchSettings(l1=a.l1 * a.margin, pv_l1=a.pv_l1 * a.margin, mode=a.mode, granularity=a.granularity,
                          thetas=tuple(a.thetas) if a.thetas else DEFAULT_THETAS, bisect_steps=a.bisect_steps,
                          tune_pv=not a.no_pv, is_causal=not a.non_causal, estimator=a.estimator)


def run_worker(plan: Plan, layers: list[int], run: str, quiet: bool) -> list[int]:
    """Work on unclaimed, unfinished layers until every layer has a result. Returns the layers done here."""
    import torch
    from tqdm import tqdm

    from .capture import load_captured
    from .search import LayerEvaluator, search_layer
    from .study import CalibrationStore, open_storage, wait_poll_seconds, worker_id

    store = CalibrationStore(open_storage(plan.storage_url), run)
    settings = settings_of(plan)
    me = worker_id()
    done_here = []
    expected = len(settings.thetas) * (settings.bisect_steps + 1) + (settings.pv_steps + 1 if settings.tune_pv else 0)
    while True:
        pending = [x for x in layers if store.result(x) is None]
        if not pending:
            return done_here
        progressed = False
        for layer in pending:
            if store.result(layer) is not None:
                continue
            claim = store.try_claim(layer, me)
            if claim is None:
                continue
            if store.result(layer) is not None:
                # another worker finished it between our check and our claim (results are saved before
                # a claim is released, so this second look closes that gap)
                store.release(claim, False)
                continue
            progressed = True
            ok = False
            try:
                with store.heartbeat(claim):
                    samples = load_captured(plan.capture_dir, layer)[: plan.args.samples]
                    evaluator = LayerEvaluator(samples, is_causal=settings.is_causal, device=plan.device,
                                               estimator=settings.estimator)
                    bar = tqdm(total=expected, desc=f"layer {layer:>3}", leave=False, disable=quiet)
                    batch: list = []

                    def on_eval(ev, _bar=bar, _batch=batch):
                        _bar.update(1)
                        _batch.append(ev)

                    def on_theta(theta, budget, l1, sp, _layer=layer, _batch=batch):
                        store.record_evaluations(_layer, _batch, settings.l1)
                        _batch.clear()
                        store.save_stage1(_layer, theta, budget.tolist(), l1.tolist(), sp.tolist())

                    resumed = {t: tuple(torch.tensor(x, dtype=torch.float64) for x in v)
                               for t, v in store.stage1_done(layer).items()}
                    result = search_layer(evaluator, evaluator.num_heads, settings, on_evaluation=on_eval,
                                          done_thetas=resumed, on_theta_done=on_theta)
                    store.record_evaluations(layer, batch, settings.pv_l1)
                    bar.close()
                    store.save_result(layer, result)
                    done_here.append(layer)
                    ok = True
                    logger.info("layer %d: sparsity %.3f, worst L1 %.4f, %d evaluations", layer, result.sparsity,
                                result.l1, result.evaluations)
                    del evaluator, samples
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            finally:
                store.release(claim, ok)
        if not progressed:
            time.sleep(wait_poll_seconds())  # the rest is claimed by live workers: wait for them or their death


def worker_process(plan: Plan, layers: list[int], run: str) -> None:
    """Entry point of an extra worker process (``--workers N``): a function of an importable module,
    so that the ``spawn`` start method can find it whether the CLI runs as ``python -m calibrate`` or
    as the ``sparge-calibrate`` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    run_worker(plan, layers, run, quiet=True)


class WorkerFailed(RuntimeError):
    """An extra worker process ended with a non-zero exit code."""


def run_search(plan: Plan, layers: list[int], run: str) -> tuple[list[int], float]:
    """This process and ``--workers - 1`` spawned ones work until every layer has a result. Returns the
    layers done here and the wall time; raises ``WorkerFailed`` if a spawned worker failed."""
    t0 = time.perf_counter()
    procs = []
    if plan.args.workers > 1:
        ctx = mp.get_context("spawn")
        for _ in range(plan.args.workers - 1):
            proc = ctx.Process(target=worker_process, args=(plan, layers, run), daemon=False)
            proc.start()
            procs.append(proc)
        logger.info("started %d extra worker process(es): %s", len(procs), [p.pid for p in procs])
    try:
        done = run_worker(plan, layers, run, quiet=plan.args.quiet)
    finally:
        for proc in procs:
            proc.join()
    failed = [(p.pid, p.exitcode) for p in procs if p.exitcode != 0]
    if failed:
        raise WorkerFailed(f"worker process(es) {failed} (pid, exit code) failed; their output is above. Finished "
                           f"layers are kept: rerun the same command to resume")
    return done, time.perf_counter() - t0
