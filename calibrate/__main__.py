"""``python -m calibrate`` / ``sparge-calibrate``: per-layer SpargeAttn hyperparameters for a model.

    sparge-calibrate --model smollm2 --data pydoc --samples 5 --seq-len 8192 --device cuda --out smollm2.json

Steps: load the model, cut ``--samples`` windows of ``--seq-len`` tokens from ``--data``, capture each
layer's post-RoPE Q/K/V once (dense run, to ``<out>.capture/``), then search every layer offline
(``calibrate.search``), recording each evaluation in an Optuna study (``calibrate.study``); finally
write the config JSON (atomically), a per-layer sparsity/L1 plot and a summary. Interrupt and rerun
the same command to resume; ``--workers N`` runs N processes; ``--join`` adds this machine as a
worker to a run in a shared ``--storage`` (PostgreSQL URL).

Exit codes: 0 done, 2 bad input (the message says what to change), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("calibrate")


class InputError(ValueError):
    """Bad user input: exit code 2 with this message."""


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------
def parse_layers(text: str | None) -> list[int] | None:
    """``"0-3,7"`` -> [0, 1, 2, 3, 7]."""
    if not text:
        return None
    out: set[int] = set()
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
    except ValueError as err:
        raise InputError(f"--layers must look like '0-3,7', got {text!r}") from err
    return sorted(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparge-calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model name (smollm2, tiny-llama, ...) or a local HF folder / .gguf file")
    p.add_argument("--data", default="pydoc", help="corpus name (pydoc, shakespeare, austen) or a local .txt/.jsonl file")
    p.add_argument("--samples", type=int, default=5, help="calibration windows (the bound must hold on all of them)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per window")
    p.add_argument("--l1", type=float, default=0.08, help="stage-1 bound on the relative L1 error of each layer's attention")
    p.add_argument("--pv-l1", type=float, default=0.09, help="stage-2 (PV skip) bound; must be >= --l1")
    p.add_argument("--margin", type=float, default=0.8,
                   help="safety factor in (0, 1]: the search holds the calibration windows' worst L1 to margin x "
                   "--l1 (and --pv-l1), leaving headroom for text it has not seen (default 0.8: on SmolLM2 it kept "
                   "every layer within 1.25x the bound on held-out and other-domain text, see "
                   "results/calibration/); the config keeps the bounds themselves and records the margin")
    p.add_argument("--mode", choices=["cdf", "topk"], default="cdf", help="block selection: top-CDF (cdfthreshd) or top-k")
    p.add_argument("--granularity", choices=["head", "layer"], default="head", help="one value per head, or per layer")
    p.add_argument("--layers", default=None, help="only these layers, e.g. '0-3,7' (others stay dense)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite file next to --out); "
                   "a postgresql:// URL lets workers on several machines share the run")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--join", action="store_true", help="join an existing run in --storage as an extra worker "
                   "(e.g. from another machine); writes no config")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed choosing the calibration windows")
    p.add_argument("--holdout", type=int, default=1, help="extra windows, not used for the search, on which the "
                   "written config is validated per layer (0 to skip)")
    p.add_argument("--no-pv", action="store_true", help="skip stage 2 (keep pvthreshd=50, i.e. off)")
    p.add_argument("--non-causal", action="store_true", help="the captured attention is bidirectional (e.g. a "
                   "diffusion transformer captured with evals.dit.capture); LLMs are causal")
    p.add_argument("--estimator", choices=["keys", "pooled"], default="keys",
                   help="block-score estimator of the predictor: 'keys' (the pooled query against every key, "
                   "summed per key block; a lone dominant key is not averaged away) or 'pooled' (the paper's "
                   "pooled query . pooled key); written into the config")
    p.add_argument("--bisect-steps", type=int, default=8, help="bisection steps on cdfthreshd/topk per simthreshd1")
    p.add_argument("--thetas", type=float, nargs="+", default=None, help="simthreshd1 grid (default: -1 0.2 0.4 0.55 0.7 0.85)")
    p.add_argument("--capture-dir", default=None, help="where captured Q/K/V go (default: <out>.capture/)")
    p.add_argument("--out", default="sparge-config.json", help="the config JSON to write")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


@dataclass(frozen=True)
class Plan:
    args: argparse.Namespace
    out: Path
    capture_dir: Path
    storage_url: str
    device: str


def validate_args(args: argparse.Namespace) -> Plan:
    import torch

    if not (args.l1 > 0):
        raise InputError(f"--l1 must be > 0, got {args.l1}")
    if args.pv_l1 < args.l1:
        raise InputError(f"--pv-l1 ({args.pv_l1}) must be >= --l1 ({args.l1})")
    if not (0 < args.margin <= 1):
        raise InputError(f"--margin must be in (0, 1], got {args.margin} (0.8 searches to 80% of the bounds)")
    if args.samples < 1:
        raise InputError(f"--samples must be >= 1, got {args.samples}")
    if args.seq_len < 128:
        raise InputError(f"--seq-len must be at least one query block (128 tokens), got {args.seq_len}")
    if args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    if args.holdout < 0:
        raise InputError(f"--holdout must be >= 0, got {args.holdout}")
    if args.bisect_steps < 1:
        raise InputError(f"--bisect-steps must be >= 1, got {args.bisect_steps}")
    if args.join and not args.storage:
        raise InputError("--join needs --storage: the URL of the run to join")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    out = Path(args.out).expanduser()
    if out.suffix != ".json":
        raise InputError(f"--out must name a .json file, got {out}")
    folder = out.resolve().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the output folder {folder}: {err}") from err
    if not os.access(folder, os.W_OK):
        raise InputError(f"the output folder {folder} is not writable; choose another --out")
    if out.exists() and not os.access(out, os.W_OK):
        raise InputError(f"{out} exists and is not writable; choose another --out")
    capture_dir = Path(args.capture_dir) if args.capture_dir else out.with_name(out.stem + ".capture")
    from .study import default_storage_url

    return Plan(args, out, capture_dir, args.storage or default_storage_url(out), device)


# --------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------
def _capture_matches(meta, plan: Plan, layers: list[int]) -> bool:
    a = plan.args
    return (meta.samples == a.samples + a.holdout and meta.seq_len == a.seq_len and meta.model == a.model
            and set(layers) <= set(meta.layers))


def ensure_capture(plan: Plan, layers: list[int] | None):
    """Capture Q/K/V once (samples + holdout windows); reuse a matching capture."""
    from .data import CorpusError, token_windows
    from .models import ModelLoadError, load_model, model_spec

    from .capture import read_meta

    a = plan.args
    if (plan.capture_dir / "meta.json").exists():
        meta = read_meta(plan.capture_dir)
        if _capture_matches(meta, plan, layers or list(range(meta.num_layers))):
            logger.info("reusing the capture in %s", plan.capture_dir)
            return meta
        raise InputError(f"{plan.capture_dir} holds a capture of other settings (model {meta.model}, "
                         f"{meta.samples} x {meta.seq_len} tokens); delete it or pass --capture-dir")
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
        windows = token_windows(tokenizer, a.data, a.seq_len, a.samples + a.holdout, seed=a.seed)
    except (CorpusError, ValueError) as err:
        raise InputError(f"--data {a.data!r}: {err}") from err
    from .capture import capture_to_disk

    t1 = time.perf_counter()
    meta = capture_to_disk(model, windows, plan.capture_dir, layers, model_name=a.model)
    timing = {"model_load_s": round(load_s, 2), "capture_s": round(time.perf_counter() - t1, 2)}
    (plan.capture_dir / "timing.json").write_text(json.dumps(timing))
    del model
    return meta


# --------------------------------------------------------------------------------------------
# search workers
# --------------------------------------------------------------------------------------------
def fingerprint(meta, plan: Plan, layers: list[int]) -> dict:
    a = plan.args
    return {"model": meta.model, "num_layers": meta.num_layers, "num_heads": meta.num_heads,
            "num_kv_heads": meta.num_kv_heads, "head_dim": meta.head_dim, "seq_len": meta.seq_len,
            "samples": a.samples, "data_sha256": meta.data_sha256, "l1": a.l1, "pv_l1": a.pv_l1, "mode": a.mode,
            "granularity": a.granularity, "layers": layers, "thetas": list(settings_of(plan).thetas),
            "bisect_steps": a.bisect_steps, "tune_pv": not a.no_pv, "causal": not a.non_causal,
            "estimator": a.estimator, "margin": a.margin}


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


def _worker_process(plan: Plan, layers: list[int], run: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    run_worker(plan, layers, run, quiet=True)


def run_search(plan: Plan, layers: list[int], run: str) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    procs = []
    if plan.args.workers > 1:
        ctx = mp.get_context("spawn")
        for _ in range(plan.args.workers - 1):
            proc = ctx.Process(target=_worker_process, args=(plan, layers, run), daemon=False)
            proc.start()
            procs.append(proc)
    try:
        done = run_worker(plan, layers, run, quiet=plan.args.quiet)
    finally:
        for proc in procs:
            proc.join()
    return done, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def build_config(plan: Plan, meta, layers: list[int], run: str, timing: dict):
    import torch
    import triton

    from sparge_core.params import LayerConfig, ModelConfig, ModelInfo

    from .study import CalibrationStore, open_storage

    store = CalibrationStore(open_storage(plan.storage_url), run)
    a = plan.args
    entries = []
    total_evals = 0
    for layer in range(meta.num_layers):
        res = store.result(layer) if layer in layers else None
        if res is None:
            entries.append(LayerConfig.dense(layer, meta.num_heads))
            continue
        total_evals += res.evaluations
        key = "topk" if res.mode == "topk" else "cdfthreshd"
        entries.append(LayerConfig(
            layer=layer, simthreshd1=tuple(h.simthreshd1 for h in res.heads), pvthreshd=tuple(h.pvthreshd for h in res.heads),
            sparsity=round(res.sparsity, 6), l1=round(res.l1, 6), estimator=a.estimator,
            **{key: tuple(h.budget for h in res.heads)}))
    device_name = torch.cuda.get_device_name() if plan.device.startswith("cuda") else "cpu"
    calibration = {"samples": a.samples, "seq_len": a.seq_len, "seed": a.seed, "data": a.data,
                   "data_sha256": meta.data_sha256, "device": device_name, "seconds": round(timing["search_s"], 2),
                   "model_load_seconds": timing.get("model_load_s"), "capture_seconds": timing.get("capture_s"),
                   "evaluations": total_evals, "margin": a.margin, "estimator": a.estimator, "mode": a.mode, "granularity": a.granularity,
                   "versions": {"torch": torch.__version__, "triton": triton.__version__}}
    info = ModelInfo(meta.model, meta.num_layers, meta.num_heads, meta.num_kv_heads, meta.head_dim)
    return ModelConfig(model=info, layers=tuple(entries), l1=a.l1, pv_l1=a.pv_l1, calibration=calibration)


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
        layer_l1, head_l1 = config_window_errors(samples, lc, is_causal=not plan.args.non_causal, device=plan.device)
        out[lc.layer] = {"layer": max(layer_l1), "worst_head": max(max(h) for h in head_l1)}
    return out


def plot_layers(config, path: Path, holdout: dict[int, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(config, holdout: dict[int, dict[str, float]]) -> str:
    """One screen: per layer sparsity, calibration L1 (worst head, worst window) and, with held-out
    windows, their L1 for the whole layer and for its worst head."""
    lines = [f"{'layer':>5} {'sparsity':>8} {'L1':>7} {'heldout':>8} {'(head)':>7} {'dense heads':>11}"]
    for lc in config.layers:
        dense = sum(1 for v in (lc.topk or lc.cdfthreshd) if v >= 1.0)
        h = holdout.get(lc.layer)
        held = f"{'':>8} {'':>7}" if h is None else f"{h['layer']:>8.4f} {h['worst_head']:>7.4f}"
        lines.append(f"{lc.layer:>5} {lc.sparsity or 0:>8.3f} {lc.l1 or 0:>7.4f} {held} {dense:>5}/{lc.num_heads}")
    mean = sum(lc.sparsity or 0 for lc in config.layers) / len(config.layers)
    cal = config.calibration
    lines.append(f"mean sparsity {mean:.3f} over {len(config.layers)} layers; search {cal['seconds']} s, "
                 f"{cal['evaluations']} evaluations on {cal['device']}")
    return "\n".join(lines)


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


def _main(args: argparse.Namespace) -> int:
    from .study import CalibrationStore, StorageMismatch, open_storage

    plan = validate_args(args)
    layers_arg = parse_layers(args.layers)
    meta = ensure_capture(plan, layers_arg)
    layers = layers_arg or list(meta.layers)
    run = f"sparge/{meta.model}"
    store = CalibrationStore(open_storage(plan.storage_url), run)
    try:
        store.check_fingerprint(fingerprint(meta, plan, layers), create=not args.join)
    except StorageMismatch as err:
        raise InputError(str(err)) from err
    done, search_s = run_search(plan, layers, run)
    if args.join:
        print(f"joined {plan.storage_url}: worked on layers {done}; every layer is finished")
        return 0
    timing = {"search_s": search_s}
    timing_file = plan.capture_dir / "timing.json"
    if timing_file.exists():
        timing.update(json.loads(timing_file.read_text()))
    config = build_config(plan, meta, layers, run, timing)
    holdout = validate_holdout(plan, meta, config) if args.holdout else {}
    if holdout:
        config.calibration["holdout_windows"] = args.holdout
        config.calibration["holdout_l1"] = {str(k): round(v["layer"], 6) for k, v in holdout.items()}
        config.calibration["holdout_l1_worst_head"] = {str(k): round(v["worst_head"], 6) for k, v in holdout.items()}
    config.save(plan.out)
    from sparge_core.params import ModelConfig

    ModelConfig.load(plan.out)  # what we wrote must load
    plot_layers(config, plan.out.with_suffix(".png"), holdout)
    print(summary(config, holdout))
    print(f"wrote {plan.out} and {plan.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
