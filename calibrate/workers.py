"""Search workers: processes that claim layers through the study and search them, one per device.

``run_workers(plan, layers, run, devices, objective)`` runs the search of every layer with one
worker per entry of ``devices`` (``--devices cuda:0,cuda:1`` or ``cpu,cpu``; ``--workers N`` cycles
over them): this process is worker 0 on ``devices[0]``, the others are spawned processes whose entry
point is ``worker_main`` (importable, so a spawned child can unpickle it). Each worker claims an
unfinished layer (``calibrate.study``: the lowest live claim owns it; a dead worker's claim is failed
and its layer claimed again), loads only that layer's samples from the capture (``load_layer``:
memory-mapped on CPU, straight to the GPU otherwise, so N workers never hold N copies of the
capture), searches it on its device and stores the result. Results are deterministic per layer,
so any number of workers on devices of one kind gives the config of a one-worker run.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("calibrate")


class DeviceError(ValueError):
    """A ``--devices`` value that names no usable device (bad input: the CLI exits 2)."""


@dataclass(frozen=True)
class Plan:
    """A validated calibration run: the parsed arguments and the resolved paths and device."""

    args: Any  # argparse.Namespace
    out: Path
    capture_dir: Path
    storage_url: str
    device: str


@dataclass(frozen=True)
class WorkerPlan:
    """What a worker needs of a ``Plan`` (the parts a spawned child unpickles)."""

    args: Any  # the argparse.Namespace (plain values)
    capture_dir: Path
    storage_url: str

    @classmethod
    def of(cls, plan) -> WorkerPlan:
        return cls(plan.args, Path(plan.capture_dir), plan.storage_url)


def parse_devices(text: str | None, default: str) -> list[str]:
    """``"cuda:0,cuda:1"`` / ``"cpu,cpu"`` / ``"all"`` (every visible GPU) -> device strings; None:
    ``[default]``. Checks that each CUDA index exists."""
    import torch

    if not text:
        return ["cuda:0" if default == "cuda" else default]
    if text == "all":
        count = torch.cuda.device_count()
        if count == 0:
            raise DeviceError("--devices all: no CUDA GPU is visible; use --devices cpu (or cpu,cpu)")
        return [f"cuda:{i}" for i in range(count)]
    out = []
    for part in (p.strip() for p in text.split(",")):
        if part == "cpu":
            out.append("cpu")
            continue
        if part == "cuda":
            part = "cuda:0"
        if not part.startswith("cuda:") or not part[5:].isdigit():
            raise DeviceError(f"--devices: {part!r} is not a device; use cpu, cuda:<index> or all")
        index = int(part[5:])
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--devices: {part} does not exist ({torch.cuda.device_count()} CUDA GPU(s) visible)")
        out.append(part)
    if len({d.split(":")[0] for d in out}) > 1:
        raise DeviceError(f"--devices mixes CPU and GPU ({text}): results would differ between workers")
    return out


def assign_devices(workers: int, devices: list[str]) -> list[str]:
    """The device of each worker: ``devices`` cycled over ``workers`` (worker 0 is this process)."""
    if workers < 1:
        raise DeviceError(f"--workers must be >= 1, got {workers}")
    if workers < len(devices):
        raise DeviceError(f"--workers {workers} is fewer than the {len(devices)} devices of --devices; one worker "
                          f"per device at least (or leave --workers out)")
    return [devices[i % len(devices)] for i in range(workers)]


# --------------------------------------------------------------------------------------------
# one worker
# --------------------------------------------------------------------------------------------
def search_settings(args):
    """``SearchSettings`` of the command line (bounds scaled by ``--margin``)."""
    from .search import DEFAULT_THETAS, SearchSettings

    return SearchSettings(l1=args.l1 * args.margin, pv_l1=args.pv_l1 * args.margin, mode=args.mode,
                          granularity=args.granularity, thetas=tuple(args.thetas) if args.thetas else DEFAULT_THETAS,
                          bisect_steps=args.bisect_steps, tune_pv=not args.no_pv, is_causal=not args.non_causal,
                          estimator=estimators_of(args)[0], local_blocks=getattr(args, "local_blocks", 0))


def estimators_of(args) -> tuple[str, ...]:
    return tuple(e for e in str(args.estimator).split(",") if e)


class StoreWriter:
    """Runs the study writes of a worker in order on one thread, so the search goes on while the
    database commits its trials (tens of ms each on SQLite). ``drain`` waits for every write and
    re-raises the first failure; a killed worker loses only writes still queued (the layer is then
    redone from what reached the database, as after any kill)."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    fn, args, kwargs = item
                    fn(*args, **kwargs)
            except BaseException as err:  # noqa: BLE001 - kept and re-raised in the worker thread by drain()
                self._error = err
            finally:
                self._queue.task_done()

    def submit(self, fn: Callable, *args, **kwargs) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((fn, args, kwargs))

    def drain(self) -> None:
        self._queue.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def capture_memory(device: str) -> dict[str, int]:
    """Peak host RSS (and GPU memory) of this process so far: called right after the capture."""
    out = {"capture_peak_rss_bytes": _peak_rss_bytes()}
    if device.startswith("cuda"):
        import torch

        out["capture_peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def search_one_layer(plan, store, layer: int, device: str, objective, settings, meta, *, quiet: bool,
                     writer: StoreWriter | None = None):
    """Search one claimed layer on ``device``; returns its ``LayerResult`` (not yet saved; its trials
    are written through ``writer``, drained before returning)."""
    import torch
    from tqdm import tqdm

    from .capture import load_layer
    from .cost import CallShape
    from .objective import (
        LayerTimer,
        chosen_evaluation,
        credited_sparsity,
        predict_result,
        search_layer_time,
        sparsity_variant,
    )
    from .search import LayerEvaluator, search_layer

    t0, cpu0 = time.perf_counter(), time.process_time()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    samples = load_layer(plan.capture_dir, layer, device, range(plan.args.samples))
    evaluator = LayerEvaluator(samples, is_causal=settings.is_causal, device=device, estimator=settings.estimator,
                               query_chunks=meta.query_chunks, local_blocks=settings.local_blocks)
    del samples
    load_s = time.perf_counter() - t0
    timer = None
    if objective.cost_model is not None:
        shape = CallShape(meta.seq_len, meta.seq_len, meta.num_heads, meta.head_dim, settings.is_causal)
        timer = LayerTimer(objective.cost_model, shape)
    bar = tqdm(total=None, desc=f"layer {layer:>3}", leave=False, disable=quiet, unit="eval")
    batch: list = []
    record = {"bound": settings.l1, "mode": settings.mode, "pv_bound": settings.pv_l1}

    own_writer = writer is None
    writer = writer or StoreWriter()

    def flush():
        writer.submit(store.record_evaluations, layer, list(batch), **record)
        batch.clear()

    def on_eval(ev):
        bar.update(1)
        if ev.value is None and objective.name == "sparsity":
            import dataclasses

            ev = dataclasses.replace(ev, value=credited_sparsity(ev.sparsity))
        batch.append(ev)

    if objective.name == "time":
        def on_theta(family, theta, budget, l1, sp, dens):
            flush()
            writer.submit(store.save_stage1, layer, theta, budget.tolist(), l1.tolist(), sp.tolist(), dens.tolist(),
                          family=family)

        resume = {"stage1": {f.key: store.stage1_done(layer, f.key) for f in objective.families},
                  "probe": store.probes_done(layer)}
        result = search_layer_time(lambda f, ev=evaluator: ev.variant(quant=f.quant, estimator=f.estimator).evaluate,
                                   evaluator.num_heads, settings, timer, objective.families, on_evaluation=on_eval,
                                   resume=resume, on_theta_done=on_theta,
                                   on_probe=lambda key, l1: writer.submit(store.save_probe, layer, key, l1))
    else:
        def on_theta(theta, budget, l1, sp, dens):
            flush()
            writer.submit(store.save_stage1, layer, theta, budget.tolist(), l1.tolist(), sp.tolist(), dens.tolist())

        resumed = store.stage1_done(layer)
        result = search_layer(evaluator.evaluate, evaluator.num_heads, settings, on_evaluation=on_eval,
                              done_thetas=resumed, on_theta_done=on_theta)
        result.variant = sparsity_variant(result, settings)
        result.estimator = settings.estimator
        if timer is not None:
            result.predicted = predict_result(timer, result, settings.estimator) or None
        batch.append(chosen_evaluation(result, settings, credited_sparsity([x.sparsity for x in result.heads])))
    flush()
    bar.close()
    writer.drain()
    if own_writer:
        writer.close()
    result.evaluations = evaluator.evaluations
    result.cost.update({"seconds": round(time.perf_counter() - t0, 3), "load_seconds": round(load_s, 3),
                        "cpu_seconds": round(time.process_time() - cpu0, 3),
                        "device": device, "peak_host_rss_bytes": _peak_rss_bytes()})
    if cuda:
        result.cost["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
    del evaluator
    if cuda:
        torch.cuda.empty_cache()
    return result


def run_worker(plan, layers: list[int], run: str, quiet: bool, device: str, objective) -> list[int]:
    """Work on unclaimed, unfinished layers until every layer has a result. Returns the layers done here."""
    from .capture import read_meta
    from .study import CalibrationStore, open_storage, worker_id

    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)
    store = CalibrationStore(open_storage(plan.storage_url), run,
                             direction="minimize" if objective.name == "time" else "maximize")
    settings = search_settings(plan.args)
    meta = read_meta(plan.capture_dir)
    me = worker_id()
    done_here: list[int] = []
    writer = StoreWriter()
    try:
        return _claim_and_search(plan, layers, store, me, device, objective, settings, meta, quiet, writer, done_here)
    finally:
        writer.close()


def _claim_and_search(plan, layers, store, me, device, objective, settings, meta, quiet, writer, done_here):
    from .study import wait_poll_seconds

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
                    result = search_one_layer(plan, store, layer, device, objective, settings, meta, quiet=quiet,
                                              writer=writer)
                    store.save_result(layer, result)
                    done_here.append(layer)
                    ok = True
                    pred = result.predicted or {}
                    logger.info("layer %d on %s: %s, sparsity %.3f, worst L1 %.4f, %d evaluations, %.1f s%s", layer,
                                device, _variant_text(result.variant), result.sparsity, result.l1, result.evaluations,
                                result.cost["seconds"],
                                f", predicted {pred['dense_ms'] / pred['ms']:.2f}x dense" if pred.get("ms") else "")
            finally:
                store.release(claim, ok)
        if not progressed:
            mp.active_children()  # reap finished children, so a killed one is seen dead at once
            time.sleep(wait_poll_seconds())  # the rest is claimed by live workers: wait for them or their death


def _variant_text(variant: dict | None) -> str:
    if not variant:
        return "sparse"
    if variant.get("dense"):
        return "dense"
    return f"{variant['quant']}{', stage 2' if variant['stage2'] else ''}"


def worker_main(plan, layers: list[int], run: str, device: str, objective) -> None:
    """Entry point of a spawned worker process."""
    logging.basicConfig(level=logging.WARNING)
    run_worker(plan, layers, run, quiet=True, device=device, objective=objective)


def run_workers(plan, layers: list[int], run: str, devices: list[str], objective) -> tuple[list[int], float, dict]:
    """Run one worker per entry of ``devices`` (this process is the first); returns the layers done
    in this process, the search's wall time and what happened to the spawned workers."""
    t0 = time.perf_counter()
    plan = WorkerPlan.of(plan)
    procs = []
    ctx = mp.get_context("spawn")
    for device in devices[1:]:
        proc = ctx.Process(target=worker_main, args=(plan, layers, run, device, objective), daemon=False)
        proc.start()
        procs.append((device, proc))
    if procs:
        logger.info("started %d extra worker process%s (%s); this process works on %s", len(procs),
                    "" if len(procs) == 1 else "es", ", ".join(d for d, _ in procs), devices[0])
    try:
        done = run_worker(plan, layers, run, quiet=plan.args.quiet, device=devices[0], objective=objective)
    finally:
        for _, proc in procs:
            proc.join()
    info: dict[str, Any] = {"workers": len(devices), "devices": devices,
                            "worker_exit_codes": [proc.exitcode for _, proc in procs]}
    for device, proc in procs:
        if proc.exitcode != 0:
            logger.warning("worker on %s exited with code %s; its layers were finished by the others", device,
                           proc.exitcode)
    return done, time.perf_counter() - t0, info
