"""``python -m calibrate`` / ``sparge-calibrate``: per-layer SpargeAttn hyperparameters for a model.

    sparge-calibrate --model smollm2 --data pydoc --samples 5 --seq-len 8192 --device cuda --out runs/smollm2.json

Steps: load the model, cut ``--samples`` (+ ``--holdout``) windows of ``--seq-len`` tokens from
``--data``, capture each layer's post-RoPE Q/K/V once (dense run, to ``<out>.capture/``), then search
every layer offline (``calibrate.search``; ``calibrate.objective`` for the time objective), recording
each evaluation in an Optuna study (``calibrate.study``); finally write the config JSON (atomically), a
per-layer sparsity/L1 plot and a summary. Interrupt and rerun the same command to resume; ``--devices
cuda:0,cuda:1`` (or ``all``, or ``cpu,cpu``) runs one worker process per device and ``--workers N``
cycles over them (``calibrate.workers``); ``--join`` adds this machine as a worker to a run in a
shared ``--storage`` (PostgreSQL URL).

Objective: ``--objective time`` (the default when a cost model for the GPU is found, see
``calibrate.cost``) minimises each layer's predicted attention time over dense SDPA and the sparse
executors; ``--objective sparsity`` maximises block sparsity as the paper does.

A capture and a study belong to the inputs they were made from: rerunning with other --data,
--seed, --samples, --holdout or --seq-len (or another model) for the same --out is refused with the
commands that start afresh.

Exit codes: 0 done, 2 bad input or a fixable fault (the message says what to change), 1 unexpected
failure.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sqlite3
import sys
import time
from pathlib import Path

from .cli import HelpFormatter, InputError, check_device, check_finite, check_output_folder, exit_code_for
from .workers import Plan, run_workers, search_settings

logger = logging.getLogger("calibrate")

#: how long the storage probe waits for a SQLite file that another process has locked
SQLITE_LOCK_WAIT_S = 30.0


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------
def parse_layers(text: str | None) -> list[int] | None:
    """``"0-3,7"`` -> [0, 1, 2, 3, 7]; an empty or reversed range (``1-0``) is an error."""
    if not text:
        return None
    out: set[int] = set()
    for part in text.split(","):
        lo_text, dash, hi_text = part.strip().partition("-") if "-" in part.strip()[1:] else (part, "", "")
        try:
            lo, hi = int(lo_text), int(hi_text) if dash else int(lo_text)
        except ValueError as err:
            raise InputError(f"--layers must look like '0-3,7', got {text!r}") from err
        if hi < lo:
            raise InputError(f"--layers range {part!r} is empty (the first index must not exceed the last, "
                             f"e.g. '{hi}-{lo}')")
        out.update(range(lo, hi + 1))
    if any(x < 0 for x in out):
        raise InputError(f"--layers must be layer indices >= 0, got {text!r}")
    return sorted(out)


def _models_epilog() -> str:
    from .models import available_models

    rows = "\n".join(f"  {name:<12} {desc}" for name, desc in available_models().items())
    return (f"bundled models (--model):\n{rows}\n  or a local Hugging Face model folder (with config.json) or a .gguf "
            f"file\n\nexit codes: 0 done, 2 bad input or a fixable fault (the message says what to do), 1 unexpected")


def build_parser() -> argparse.ArgumentParser:
    from .data import corpus_names
    from .search import DEFAULT_THETAS

    p = argparse.ArgumentParser(prog="sparge-calibrate", description=__doc__, formatter_class=HelpFormatter,
                                epilog=_models_epilog())
    p.add_argument("--model", default="smollm2", help="a bundled model name (listed below) or a local HF folder / "
                   ".gguf file")
    p.add_argument("--data", default="pydoc", help=f"corpus name ({', '.join(corpus_names())}) or a local "
                   ".txt/.jsonl file")
    p.add_argument("--samples", type=int, default=5, help="calibration windows (the bound must hold on all of them)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per window")
    p.add_argument("--l1", type=float, default=0.08, help="stage-1 bound on the relative L1 error of each layer's attention")
    p.add_argument("--pv-l1", type=float, default=0.09, help="stage-2 (PV skip) bound; must be >= --l1")
    p.add_argument("--margin", type=float, default=0.8,
                   help="safety factor in (0, 1]: the search holds the calibration windows' worst L1 to margin x "
                   "--l1 (and --pv-l1), leaving headroom for text it has not seen (0.8 kept every SmolLM2 layer "
                   "within 1.25x the bound on held-out and other-domain text, see results/calibration/); the "
                   "config keeps the bounds themselves and records the margin")
    p.add_argument("--mode", choices=["cdf", "topk"], default="cdf", help="block selection: top-CDF (cdfthreshd) or top-k")
    p.add_argument("--granularity", choices=["head", "layer"], default="head", help="one value per head, or per layer")
    p.add_argument("--layers", default=None, help="only these layers, e.g. '0-3,7' (others stay dense; default: all)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: <out stem>.optuna.db, SQLite, next "
                   "to --out); a postgresql:// URL lets workers on several machines share the run")
    p.add_argument("--workers", type=int, default=None, help="worker processes on this machine (default: one per "
                   "--devices entry, else 1)")
    p.add_argument("--join", action="store_true", help="join an existing run in --storage as an extra worker "
                   "(e.g. from another machine); writes no config")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed choosing the calibration windows")
    p.add_argument("--holdout", type=int, default=1, help="extra windows, not used for the search, on which the "
                   "written config is validated per layer (0 to skip)")
    p.add_argument("--no-pv", action="store_true", help="skip stage 2: the config runs without the PV check "
                   "(pvthreshd=None; version-1 readers see pvthreshd=50)")
    p.add_argument("--non-causal", action="store_true", help="the captured attention is bidirectional (e.g. a "
                   "diffusion transformer captured with evals.dit.capture); LLMs are causal")
    p.add_argument("--estimator", type=_estimator_list, default="keys",
                   help="block-score estimator of the predictor: 'keys' (the pooled query against every key, "
                   "summed per key block; a lone dominant key is not averaged away) or 'pooled' (the paper's "
                   "pooled query . pooled key); written into the config. With --objective time a list "
                   "('keys,pooled') lets each layer take the faster one that meets the bound")
    p.add_argument("--local-blocks", type=int, default=None, metavar="N",
                   help="causal only: the predictor also keeps the N key blocks (64 tokens each) just before each "
                   "query block's diagonal, so the first rows of every 128-row query block keep their nearest "
                   "context (beyond the paper; 0: the paper's forced set, sink + diagonal). The search runs "
                   "with them, so the bound accounts for them; written into every layer of the config. Default: "
                   "1 for causal attention (measured better than 0 at equal sparsity on held-out text and another "
                   "corpus, see README), 0 with --non-causal")
    p.add_argument("--objective", choices=["time", "sparsity"], default=None,
                   help="what to optimise under the bounds: predicted attention time (default when a cost model "
                   "for the GPU exists: results/kernel/<gpu>-cost.json or --cost-model) or block sparsity")
    p.add_argument("--cost-model", default=None, help="cost model JSON of the GPU the config is for (sparge-profile)")
    p.add_argument("--quants", default=None, help="time objective: quantization variants to consider, e.g. "
                   "'none,int8' (default: those the cost model and the device have)")
    p.add_argument("--devices", default=None, help="search workers' devices: 'cuda:0,cuda:1', 'all' (every visible "
                   "GPU) or 'cpu,cpu'; one worker process per device (--workers N cycles over them)")
    p.add_argument("--query-blocks", type=int, default=None, help="capture only this many 128-row query blocks "
                   "per window (position-stratified runs; K/V stay whole): bounded disk and memory for long "
                   "windows; the bound then holds on those rows (docs/calibration-scaling.md)")
    p.add_argument("--bisect-steps", type=int, default=8, help="bisection steps on cdfthreshd/topk per simthreshd1")
    p.add_argument("--thetas", type=float, nargs="+", default=None,
                   help=f"simthreshd1 grid, values in [-1, 1] (default: {' '.join(map(str, DEFAULT_THETAS))})")
    p.add_argument("--capture-dir", default=None, help="where captured Q/K/V go (default: <out stem>.capture/ next "
                   "to --out)")
    p.add_argument("--out", default="sparge-config.json", help="the config JSON to write (its plot goes beside it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-layer log lines: only the "
                   "summary, warnings and errors")
    return p


def _estimator_list(text: str) -> str:
    from sparge_core.ops.blocks import ESTIMATORS

    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in ESTIMATORS]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected estimators from {list(ESTIMATORS)} separated by commas, got {text!r}")
    return ",".join(names)


def validate_args(args: argparse.Namespace) -> Plan:
    """Every check that needs neither the model nor the capture; raises InputError."""
    from .search import DEFAULT_THETAS

    check_finite("--l1", args.l1, hint="e.g. 0.08")
    check_finite("--pv-l1", args.pv_l1, hint="e.g. 0.09")
    if args.pv_l1 < args.l1:
        raise InputError(f"--pv-l1 ({args.pv_l1}) must be >= --l1 ({args.l1})")
    if not (0 < args.margin <= 1):
        raise InputError(f"--margin must be in (0, 1], got {args.margin} (0.8 searches to 80% of the bounds)")
    if args.samples < 1:
        raise InputError(f"--samples must be >= 1, got {args.samples}")
    if args.seq_len < 128:
        raise InputError(f"--seq-len must be at least one query block (128 tokens), got {args.seq_len}")
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    if args.query_blocks is not None and args.query_blocks < 1:
        raise InputError(f"--query-blocks must be >= 1, got {args.query_blocks}")
    if args.holdout < 0:
        raise InputError(f"--holdout must be >= 0, got {args.holdout}")
    if args.bisect_steps < 1:
        raise InputError(f"--bisect-steps must be >= 1, got {args.bisect_steps}")
    if args.local_blocks is None:
        args.local_blocks = 0 if args.non_causal else 1
    if args.local_blocks < 0:
        raise InputError(f"--local-blocks must be an integer >= 0 (key blocks), got {args.local_blocks}")
    if args.local_blocks and args.non_causal:
        raise InputError(f"--local-blocks {args.local_blocks} forces key blocks before each query block's causal "
                         f"diagonal; with --non-causal nothing is forced: drop --local-blocks")
    for theta in args.thetas or DEFAULT_THETAS:
        if not (math.isfinite(theta) and -1.0 <= theta <= 1.0):
            raise InputError(f"--thetas must be numbers in [-1, 1] (simthreshd1 values), got {theta}")
    if args.join and not args.storage:
        raise InputError("--join needs --storage: the URL of the run to join")
    device = check_device(args.device)
    out = Path(args.out).expanduser()
    if out.suffix != ".json":
        raise InputError(f"--out must name a .json file, got {out}")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; name the config file, e.g. {out / 'config.json'}")
    check_output_folder(out.resolve().parent, "--out")
    capture_dir = Path(args.capture_dir).expanduser() if args.capture_dir else out.with_name(out.stem + ".capture")
    if capture_dir.exists() and not capture_dir.is_dir():
        raise InputError(f"--capture-dir {capture_dir} is a file, not a folder")
    from .study import default_storage_url

    plan = Plan(args, out, capture_dir, args.storage or default_storage_url(out), device)
    try:
        search_settings(args)
    except ValueError as err:
        raise InputError(str(err)) from err
    check_storage_url(plan.storage_url, explicit=args.storage is not None)
    return plan


def check_storage_url(url: str, *, explicit: bool) -> None:
    """The storage URL names a database this machine can open: a known SQLAlchemy dialect whose driver
    is installed; for SQLite, a file in an existing folder that is a readable, unlocked database."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        raise InputError(f"--storage {url!r} is not a database URL this machine can open ({err}); use "
                         f"sqlite:///path/to/file.db or postgresql+psycopg2://user:password@host/db") from err
    except ImportError as err:
        raise InputError(f"--storage {url!r} needs a database driver that is not installed ({err}); for "
                         f"PostgreSQL: pip install psycopg2-binary") from err
    if parsed.get_backend_name() != "sqlite":
        return
    if not parsed.database or parsed.database == ":memory:":
        raise InputError(f"--storage {url!r}: an in-memory SQLite storage cannot be shared or resumed; name a file")
    path = Path(parsed.database)
    if not path.parent.is_dir():
        what = "--storage" if explicit else "--out"
        raise InputError(f"the folder of the SQLite storage {path} does not exist; create it or choose another {what}")
    check_output_folder(path.parent, "--storage" if explicit else "--out")
    if path.exists():
        probe_sqlite(path)


def probe_sqlite(path: Path) -> None:
    """Open the SQLite file briefly: a corrupt file or one another process keeps locked is an
    InputError (Optuna would otherwise wait two minutes, or fail with a traceback, later)."""
    try:
        con = sqlite3.connect(str(path), timeout=SQLITE_LOCK_WAIT_S)
    except sqlite3.Error as err:
        raise InputError(f"cannot open the Optuna storage {path}: {err}") from err
    try:
        con.execute("PRAGMA schema_version").fetchone()
        con.execute("BEGIN IMMEDIATE")
        con.execute("ROLLBACK")
    except sqlite3.OperationalError as err:
        if "locked" in str(err) or "busy" in str(err):
            raise InputError(f"the Optuna storage {path} stayed locked by another process for {SQLITE_LOCK_WAIT_S:g} "
                             f"s (a hung calibration, or a program holding it open); stop that process, or pass "
                             f"another --storage / --out") from err
        raise InputError(f"the Optuna storage {path} cannot be used ({err}); delete it (its finished layers are "
                         f"lost: they are searched again) or pass another --storage / --out") from err
    except sqlite3.DatabaseError as err:
        raise InputError(f"the Optuna storage {path} is not a readable SQLite database ({err}): it is corrupt or "
                         f"not a storage; delete it (its finished layers are searched again) or pass another "
                         f"--storage / --out") from err
    finally:
        con.close()


# --------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------
def _capture_differences(meta, plan: Plan, layers: list[int], corpus) -> list[str]:
    """What differs between the capture on disk and the one these arguments ask for."""
    a = plan.args
    diffs = []
    wanted = [("model", meta.model, a.model), ("windows (--samples + --holdout)", meta.samples, a.samples + a.holdout),
              ("--seq-len", meta.seq_len, a.seq_len)]
    if meta.source == "text":
        wanted += [("--data (corpus sha256)", meta.data_sha256[:12], corpus.sha256[:12] if corpus else "?"),
                   ("--seed", meta.seed, a.seed)]
    for name, have, want in wanted:
        if have != want:
            diffs.append(f"{name}: {have} there, {want} asked")
    from .capture import query_chunks_for

    if tuple(meta.query_chunks) != query_chunks_for(a.seq_len, a.query_blocks):
        diffs.append(f"--query-blocks: {len(meta.query_chunks) or 'every'} stored query chunks there, "
                     f"{a.query_blocks or 'every block'} asked")
    missing = sorted(set(layers) - set(meta.layers))
    if missing:
        diffs.append(f"layers {missing} are not in it (captured: {list(meta.layers)})")
    return diffs


def _start_afresh(plan: Plan) -> str:
    items = [str(plan.capture_dir)]
    if plan.storage_url.startswith("sqlite:///"):
        items.append(plan.storage_url.removeprefix("sqlite:///"))
    return (f"to calibrate with these inputs, choose another --out, or delete the old run first "
            f"(rm -r {' '.join(items)})")


def _load_corpus(plan: Plan):
    from .data import CorpusError, load_corpus

    try:
        return load_corpus(plan.args.data)
    except (CorpusError, OSError) as err:
        raise InputError(f"--data {plan.args.data!r}: {err}") from err


def _read_timing(capture_dir: Path) -> dict:
    """The capture's timing record; a damaged one is dropped with a warning (it only annotates)."""
    import json

    path = capture_dir / "timing.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return data
    except (ValueError, OSError) as err:
        logger.warning("ignoring %s (%s); the config will not carry model-load and capture times", path, err)
        return {}


def ensure_capture(plan: Plan, layers: list[int] | None):
    """Capture Q/K/V once (samples + holdout windows); reuse a capture of exactly these inputs."""
    from sparge_core.atomic import write_json_atomic

    from .capture import read_meta
    from .data import CorpusError, token_windows
    from .models import ModelLoadError, load_model, model_spec

    a = plan.args
    if (plan.capture_dir / "meta.json").exists():
        try:
            meta = read_meta(plan.capture_dir)
        except ValueError as err:
            raise InputError(f"{plan.capture_dir} holds an unreadable capture ({err})") from err
        corpus = _load_corpus(plan) if meta.source == "text" else None
        diffs = _capture_differences(meta, plan, layers or list(meta.layers), corpus)
        if diffs:
            raise InputError(f"{plan.capture_dir} holds a capture of other inputs ({'; '.join(diffs)}); "
                             + _start_afresh(plan))
        logger.info("reusing the capture in %s", plan.capture_dir)
        return meta
    corpus = _load_corpus(plan)  # before the model: a missing or bad --data fails in a second
    if plan.capture_dir.exists():
        check_output_folder(plan.capture_dir, "--capture-dir")
    else:
        check_output_folder(plan.capture_dir.parent, "--capture-dir")
    t0 = time.perf_counter()
    try:
        model, tokenizer = load_model(a.model, device=plan.device)
    except ModelLoadError as err:
        raise InputError(str(err)) from err
    spec = model_spec(model, a.model)
    if spec.max_context and a.seq_len > spec.max_context:
        raise InputError(f"--seq-len {a.seq_len} is beyond {a.model}'s context of {spec.max_context} tokens")
    bad = [x for x in (layers or []) if not 0 <= x < spec.num_layers]
    if bad:
        raise InputError(f"--layers {bad} are out of range: {a.model} has layers 0-{spec.num_layers - 1}")
    load_s = time.perf_counter() - t0
    try:
        windows = token_windows(tokenizer, corpus, a.seq_len, a.samples + a.holdout, seed=a.seed)
    except (CorpusError, ValueError) as err:
        raise InputError(f"--data {a.data!r}: {err}") from err
    _check_free_space(plan, spec, layers, next(model.parameters()).element_size())
    from .capture import capture_to_disk

    t1 = time.perf_counter()
    try:
        meta = capture_to_disk(model, windows, plan.capture_dir, layers, model_name=a.model,
                               query_blocks=a.query_blocks)
        from .workers import capture_memory

        write_json_atomic(plan.capture_dir / "timing.json",
                          {"model_load_s": round(load_s, 2), "capture_s": round(time.perf_counter() - t1, 2),
                           **capture_memory(plan.device)})
    except OSError as err:
        raise InputError(f"writing the capture to {plan.capture_dir} failed ({err.strerror or err}); free disk "
                         f"space or pass --capture-dir on another disk, then rerun (the partial capture is "
                         f"cleaned up then)") from err
    del model
    return meta


def _check_free_space(plan: Plan, spec, layers: list[int] | None, bytes_per_value: int) -> None:
    """Refuse a capture that cannot fit on its disk (with 10% to spare)."""
    from .capture import query_chunks_for

    a = plan.args
    chunks = query_chunks_for(a.seq_len, a.query_blocks)
    query_rows = sum(length for _, length in chunks) if chunks else a.seq_len
    per_layer = (spec.num_heads * query_rows + 2 * spec.num_kv_heads * a.seq_len) * spec.head_dim * bytes_per_value
    need = int(1.1 * per_layer * (a.samples + a.holdout) * len(layers or range(spec.num_layers)))
    folder = plan.capture_dir if plan.capture_dir.exists() else plan.capture_dir.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise InputError(f"the capture needs about {need / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free; "
                         f"free space, pass --capture-dir on another disk, or capture fewer --samples / --layers")


# --------------------------------------------------------------------------------------------
# the run's fingerprint (a storage belongs to one model, capture and setting)
# --------------------------------------------------------------------------------------------
def fingerprint(meta, plan: Plan, layers: list[int], objective=None) -> dict:
    a = plan.args
    extra = {} if objective is None else {**objective.fingerprint(), "query_chunks": [list(c) for c in meta.query_chunks]}
    return {**extra, "model": meta.model, "num_layers": meta.num_layers, "num_heads": meta.num_heads,
            "num_kv_heads": meta.num_kv_heads, "head_dim": meta.head_dim, "seq_len": meta.seq_len,
            "samples": a.samples, "data_sha256": meta.data_sha256, "seed": meta.seed,
            "window_starts": list(meta.window_starts[: a.samples]), "architecture": meta.architecture,
            "weights_fingerprint": meta.fingerprint, "l1": a.l1, "pv_l1": a.pv_l1, "mode": a.mode,
            "granularity": a.granularity, "layers": layers, "thetas": list(search_settings(a).thetas),
            "bisect_steps": a.bisect_steps, "tune_pv": not a.no_pv, "causal": not a.non_causal,
            "estimator": a.estimator, "margin": a.margin,
            **({"local_blocks": a.local_blocks} if a.local_blocks else {})}  # (0: the fingerprint of older runs)


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def build_config(plan: Plan, meta, layers: list[int], run: str, timing: dict, objective=None):
    import dataclasses

    import torch
    import triton

    from sparge_core.params import LayerConfig, ModelConfig, ModelInfo

    from .report import layer_config, predicted_speedup, search_costs
    from .study import CalibrationStore, open_storage

    store = CalibrationStore(open_storage(plan.storage_url), run)
    a = plan.args
    entries = []
    results = []
    total_evals = 0
    for layer in range(meta.num_layers):
        res = store.result(layer) if layer in layers else None
        if res is None:
            entries.append(dataclasses.replace(LayerConfig.dense(layer, meta.num_heads), local_blocks=a.local_blocks))
            continue
        total_evals += res.evaluations
        results.append(res)
        entries.append(layer_config(layer, res, search_settings(a).estimator, a.local_blocks))
    device_name = torch.cuda.get_device_name() if plan.device.startswith("cuda") else "cpu"
    # the inputs as captured (ensure_capture refuses a capture of other inputs than the arguments)
    calibration = {"samples": a.samples, "seq_len": meta.seq_len, "seed": meta.seed,
                   "data": a.data if meta.source == "text" else meta.data_name, "data_sha256": meta.data_sha256,
                   "window_starts": list(meta.window_starts[: a.samples]),
                   "device": device_name, "seconds": round(timing["search_s"], 2),
                   "model_load_seconds": timing.get("model_load_s"), "capture_seconds": timing.get("capture_s"),
                   "evaluations": total_evals, "margin": a.margin, "estimator": a.estimator, "mode": a.mode,
                   "granularity": a.granularity,
                   "versions": {"torch": torch.__version__, "triton": triton.__version__}}
    if a.local_blocks:
        calibration["local_blocks"] = a.local_blocks
    if objective is not None:
        calibration.update(objective.describe())
    calibration.update({k: v for k, v in timing.items() if k in ("workers", "devices", "worker_exit_codes",
                                                                 "capture_peak_rss_bytes", "capture_peak_gpu_bytes")})
    calibration.update(search_costs(results))
    if meta.query_chunks:
        calibration["query_chunks"] = [list(c) for c in meta.query_chunks]
    calibration["capture_bytes"] = sum(f.stat().st_size for f in plan.capture_dir.rglob("*") if f.is_file())
    info = ModelInfo(meta.model, meta.num_layers, meta.num_heads, meta.num_kv_heads, meta.head_dim,
                     architecture=meta.architecture, fingerprint=meta.fingerprint)
    config = ModelConfig(model=info, layers=tuple(entries), l1=a.l1, pv_l1=a.pv_l1, calibration=calibration)
    model = predicted_speedup(config)
    if model is not None:
        calibration["predicted_attention"] = model
    return config


def validate_holdout(plan: Plan, meta, config) -> dict[int, dict[str, float]]:
    """Per layer, the written config's relative L1 on the held-out windows (worst window): ``layer``
    (all heads' outputs together) and ``worst_head``."""
    from .capture import load_captured
    from .search import config_window_errors

    out = {}
    for lc in config.layers:
        if lc.layer not in meta.layers or lc.is_dense:
            continue
        samples = load_captured(plan.capture_dir, lc.layer)[plan.args.samples:]
        if not samples:
            return {}
        layer_l1, head_l1 = config_window_errors(samples, lc, is_causal=not plan.args.non_causal, device=plan.device,
                                                 query_chunks=meta.query_chunks)
        out[lc.layer] = {"layer": max(layer_l1), "worst_head": max(max(h) for h in head_l1)}
    return out


def plot_layers(config, path: Path, holdout: dict[int, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparge_core.atomic import atomic_path

    layers = [lc.layer for lc in config.layers]
    spars = [lc.sparsity or 0.0 for lc in config.layers]
    l1s = [lc.l1 or 0.0 for lc in config.layers]
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.3), 3.5))
    ax.bar(layers, spars, color="tab:blue", label="sparsity")
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(layers, l1s, "o-", color="tab:red", label="L1 (calibration)")
    if holdout:
        ax2.plot(list(holdout), [h["layer"] for h in holdout.values()], "x", color="black", label="L1 (held out, layer)")
        ax2.plot(list(holdout), [h["worst_head"] for h in holdout.values()], "+", color="gray",
                 label="L1 (held out, worst head)")
    ax2.axhline(config.l1, color="tab:red", linestyle="--", linewidth=0.8)
    ax2.axhline(config.pv_l1, color="tab:red", linestyle=":", linewidth=0.8)
    ax2.set_ylabel("relative L1")
    fig.legend(loc="upper right", fontsize=7)
    ax.set_title(f"{config.model.name}: calibrated sparsity per layer")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def summary(config, holdout: dict[int, dict[str, float]]) -> str:
    """One screen per calibration (``calibrate.report.summary``), and a plain word when no layer could
    be made sparse."""
    from .report import summary as report_summary

    text = report_summary(config, holdout)
    if all(lc.is_dense for lc in config.layers):
        cal = config.calibration
        if cal.get("objective") == "time" and cal.get("pruned_candidates"):
            gpu = (cal.get("cost_model") or {}).get("gpu", "the GPU")
            text += "\n" + DENSE_IS_FASTER.format(gpu=gpu, seq_len=cal.get("seq_len"), pruned=cal["pruned_candidates"])
        else:
            text += "\n" + NO_SPARSE_LAYER.format(l1=config.l1, pv_l1=config.pv_l1)
    return text


DENSE_IS_FASTER = (
    "the time objective kept every layer dense: on {gpu} the cost model predicts dense SDPA at this shape "
    "({seq_len} tokens, batch 1) faster than the least a sparse call costs ({pruned} executor candidates ruled out "
    "before any evaluation: the host's time to issue a sparse call, or the predictor, launch and per-row kernel "
    "costs, alone exceed the dense time). Sparse attention pays there from longer sequences or more heads per "
    "layer; --objective sparsity gives the sparsest "
    "config within the bound regardless of time.")

NO_SPARSE_LAYER = (
    "no layer could be made sparse within the bound (l1 {l1:g}, pv_l1 {pv_l1:g}): every head stays dense, so the "
    "config changes nothing. Random-weight models (tiny-llama, tiny-qwen2) have no attention structure to exploit; "
    "with a trained model, longer --seq-len windows or a looser --l1 leave room for sparsity.")


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return _main(args)
    except InputError as err:
        print(f"sparge-calibrate: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparge-calibrate: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        print(f"sparge-calibrate: error: {err.strerror or err}{where}; finished layers are kept in the storage: "
              f"fix this and rerun the same command to resume", file=sys.stderr)
        return exit_code_for(err)


def _open_store(plan: Plan, run: str):
    """The run's ``CalibrationStore``; a storage that cannot be opened or used is an InputError."""
    from sqlalchemy.exc import SQLAlchemyError

    from .study import CalibrationStore, open_storage

    try:
        return CalibrationStore(open_storage(plan.storage_url), run)
    except (SQLAlchemyError, RuntimeError, ValueError) as err:
        raise InputError(f"cannot use the Optuna storage {plan.storage_url}: {str(err).splitlines()[0]}; check the URL "
                         f"and the server, or (a damaged SQLite file) delete it or pass another --storage") from err


def _main(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from sparge_core.params import ModelConfig

    from .objective import ObjectiveError, resolve_objective
    from .study import StorageMismatch
    from .workers import DeviceError, assign_devices, estimators_of, parse_devices

    plan = validate_args(args)
    try:
        devices = parse_devices(args.devices, plan.device)
        devices = assign_devices(args.workers or len(devices), devices)
    except DeviceError as err:
        raise InputError(str(err)) from err
    if args.devices and not args.device:  # capture (and the held-out check) on the workers' kind of device
        import dataclasses

        plan = dataclasses.replace(plan, device=devices[0])
    layers_arg = parse_layers(args.layers)
    quants = args.quants.split(",") if args.quants else None
    try:  # before any work: the objective's inputs (the head dim is checked once the capture gives it)
        resolve_objective(args.objective, args.cost_model, device=devices[0], head_dim=None,
                          estimators=estimators_of(args), quants=quants)
    except ObjectiveError as err:
        raise InputError(str(err)) from err
    _open_store(plan, f"sparge/{args.model}")  # before the model loads: a bad storage fails in seconds
    meta = ensure_capture(plan, layers_arg)
    layers = layers_arg or list(meta.layers)
    try:
        objective = resolve_objective(args.objective, args.cost_model, device=devices[0], head_dim=meta.head_dim,
                                      estimators=estimators_of(args), quants=quants)
    except ObjectiveError as err:
        raise InputError(str(err)) from err
    logger.info("objective: %s (%s)", objective.name, objective.reason)
    run = f"sparge/{meta.model}"
    store = _open_store(plan, run)
    try:
        store.check_fingerprint(fingerprint(meta, plan, layers, objective), create=not args.join)
    except StorageMismatch as err:
        raise InputError(str(err)) from err
    except SQLAlchemyError as err:
        raise InputError(f"cannot use the Optuna storage {plan.storage_url}: {str(err).splitlines()[0]}") from err
    done, search_s, worker_info = run_workers(plan, layers, run, devices, objective)
    if args.join:
        print(f"joined {plan.storage_url}: worked on layers {done}; every layer is finished")
        return 0
    timing = {"search_s": search_s, **worker_info, **_read_timing(plan.capture_dir)}
    config = build_config(plan, meta, layers, run, timing, objective)
    config.save(plan.out)  # written before the hold-out check and the plot: a late error loses nothing
    holdout = validate_holdout(plan, meta, config) if args.holdout else {}
    if holdout:
        config.calibration["holdout_windows"] = args.holdout
        config.calibration["holdout_l1"] = {str(k): round(v["layer"], 6) for k, v in holdout.items()}
        config.calibration["holdout_l1_worst_head"] = {str(k): round(v["worst_head"], 6) for k, v in holdout.items()}
        config.save(plan.out)
    ModelConfig.load(plan.out)  # what we wrote must load
    plot_layers(config, plan.out.with_suffix(".png"), holdout)
    print(summary(config, holdout))
    print(f"wrote {plan.out} and {plan.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
