"""``python -m evals <suite>``: evaluate attention methods on a model and write result files.

Suites (each writes ``<out>/<suite>/<model>/<label>.json``; schema in results/README.md):

  ppl       perplexity over deterministic windows (2K/4K/8K) of a corpus or local file
  niah      needle in a haystack (single passkey, multi-key with distractors) + heatmap PNG
  longctx   generated long-context tasks (a LongBench substitute, RULER style)
  longbench the real LongBench tasks, from local files (--longbench-dir)
  ruler     lm-eval's own RULER tasks that run offline (evals.ruler; --ruler-tasks, --lengths, --per-task)
  speed     prefill latency and attention-only time per layer
  t2i, t2v  the self-trained text-to-image / text-to-video DiTs (image metrics)
  ablation  the permutation ablation (paper Table 4) on the video DiT
  all       ppl, niah, longctx and speed for every method
  tables    <out>/ -> <out>/TABLES.md

Results go to runs/ unless --out names another folder; the committed results/ is written only when
asked (--out results, as `make tables` and `make paper` do).

Methods: dense, sparge (a calibrated --config, or defaults), sparge-topk, minference, flexprefill.
``--density matched`` sets every rival, layer by layer, to the density the calibrated config reaches
on the captured Q/K/V (``--capture``, default ``<config>.capture``); ``--density 0.5`` sets them all to
0.5. Example:

  python -m evals all --model smollm2 --config runs/smollm2.json --density matched --device cuda

Everything that can be checked before the model loads is (paths, numbers, device, backend, the
config file, the corpus); the config is matched against the loaded model (shape and identity) and
the lengths against its context before the first result is written. Exit codes: 0 done, 2 bad input
or a fixable fault (the message says what to do), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

from calibrate.cli import HelpFormatter, InputError, check_device, check_output_folder, exit_code_for
from sparge_core.registry import Registry

logger = logging.getLogger("evals")

#: the text suites: name -> ``fn(args, model, tokenizer, settings, model_name) -> [result paths]``
LLM_SUITES: Registry[Callable[..., list[Path]]] = Registry("text suite")
#: each text suite's context lengths when --lengths is not given (those beyond the model's context
#: are left out, with a warning; given ones beyond it are an error)
DEFAULT_LENGTHS = {"ppl": [2048, 4096, 8192], "niah": [1024, 2048, 4096, 8192], "longctx": [4096, 8192],
                   "longbench": [8192], "speed": [2048, 4096, 8192], "ruler": [4096]}
ALL_SUITES = ["ppl", "niah", "longctx", "speed"]
CORPUS_SUITES = ("ppl", "speed")
DEFAULT_OUT = "runs"


def build_parser() -> argparse.ArgumentParser:
    from calibrate.data import corpus_names
    from calibrate.models import available_models
    from sparge_core import BACKENDS

    p = argparse.ArgumentParser(prog="python -m evals", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("suite", choices=[*LLM_SUITES.names(), "t2i", "t2v", "ablation", "all", "tables"])
    p.add_argument("--model", default="smollm2", help=f"LLM suites: a bundled model ({', '.join(available_models())}) "
                   "or a local HF folder / .gguf file; t2i/t2v/ablation: a DiT checkpoint")
    p.add_argument("--methods", nargs="+", default=["dense", "sparge", "sparge-topk", "minference", "flexprefill"],
                   help="methods to compare")
    p.add_argument("--method", dest="methods", nargs="+", help="alias of --methods")
    p.add_argument("--config", default=None, help="calibrated sparge config JSON (per layer)")
    p.add_argument("--allow-other-model", action="store_true",
                   help="use --config although it was calibrated for another model of the same shape (its recorded "
                   "architecture or weights fingerprint differ)")
    p.add_argument("--density", default=None, help="'matched' (rivals at the config's per-layer density) or a number")
    p.add_argument("--capture", default=None, help="captured Q/K/V for density matching (default: <config>.capture)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (the committed results/ only when named)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS.names()],
                   help="kernel backend (auto: Triton on CUDA, the PyTorch reference on CPU)")
    p.add_argument("--data", default="pydoc", help=f"corpus for ppl/speed ({', '.join(corpus_names())}, or a "
                   ".txt/.jsonl file)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="context lengths (default per suite: " + "; ".join(
                       f"{k} {' '.join(map(str, v))}" for k, v in DEFAULT_LENGTHS.items()) + ")")
    p.add_argument("--windows", type=int, default=4, help="ppl: windows per length")
    p.add_argument("--seed", type=int, default=1234, help="window choice / task generation seed (calibration uses 0)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="niah: needle depths")
    p.add_argument("--per-task", type=int, default=4, help="longctx: items per task and length")
    p.add_argument("--longbench-dir", default=None, help="longbench: folder of LongBench v1 JSONL files")
    # ruler (evals.ruler): lm-eval's RULER tasks; --per-task items per task and length, --lengths (default 4096)
    p.add_argument("--ruler-tasks", nargs="+", default=None, help="ruler: RULER tasks (default: every offline one)")
    p.add_argument("--max-gen-toks", type=int, default=None, help="ruler: cap on generated tokens (default: RULER's)")
    p.add_argument("--clip", default=None, help="t2i/t2v: the project's CLIP checkpoint")
    p.add_argument("--prompts", type=int, default=None, help="t2i/t2v: number of prompts (default: every attribute "
                   "combination)")
    p.add_argument("--steps", type=int, default=20, help="t2i/t2v: sampling steps")
    p.add_argument("--quiet", action="store_true", help="no per-method log lines: only the written files and errors")
    return p


# --------------------------------------------------------------------------------------------
# checks before the model loads
# --------------------------------------------------------------------------------------------
def _check_common(args) -> str:
    """Device, backend and output folder; returns the device."""
    device = check_device(args.device)
    if args.backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError("--backend triton on the CPU runs Triton's interpreter, which needs TRITON_INTERPRET=1 set "
                         "before the program starts; use --backend reference (or auto), or a GPU")
    check_output_folder(args.out, "--out")
    return device


def _load_config(args):
    """The --config file, loaded and validated (None without --config)."""
    if args.config is None:
        return None
    from sparge_core.params import ConfigError, ModelConfig

    try:
        return ModelConfig.load(args.config)
    except ConfigError as err:
        raise InputError(f"--config: {err}") from err


def _check_llm_args(args, suites: list[str]) -> None:
    if args.lengths is not None and any(n < 2 for n in args.lengths):
        raise InputError(f"--lengths must be token counts >= 2, got {args.lengths}")
    if args.windows < 1:
        raise InputError(f"--windows must be >= 1, got {args.windows}")
    if args.per_task < 1:
        raise InputError(f"--per-task must be >= 1, got {args.per_task}")
    if any(not 0.0 <= d <= 1.0 for d in args.depths):
        raise InputError(f"--depths must be fractions in [0, 1], got {args.depths}")
    if "longbench" in suites:
        if not args.longbench_dir:
            raise InputError("longbench needs --longbench-dir: a folder of LongBench v1 JSONL files (not bundled: "
                             "LongBench cannot be downloaded here; use the longctx suite for the generated substitute)")
        if not Path(args.longbench_dir).is_dir():
            raise InputError(f"--longbench-dir {args.longbench_dir} is not a folder")
    if args.density is not None and args.config is None and args.density == "matched":
        raise InputError("density='matched' needs the calibrated sparge --config whose densities the rivals match")


def _load_corpus(args):
    from calibrate.data import CorpusError, load_corpus

    try:
        return load_corpus(args.data)
    except (CorpusError, OSError) as err:
        raise InputError(f"--data {args.data!r}: {err}") from err


def _settings(args, device: str):
    from .runner import build_settings

    capture = args.capture
    if capture is None and args.config and args.density is not None:
        capture = str(Path(args.config).with_suffix("")) + ".capture"
    try:
        return build_settings(args.methods, config=args.config, density=args.density, capture_dir=capture,
                              device=device, allow_other_model=args.allow_other_model)
    except (ValueError, FileNotFoundError) as err:
        raise InputError(str(err)) from err


# --------------------------------------------------------------------------------------------
# checks against the loaded model (before the first result is written)
# --------------------------------------------------------------------------------------------
def _check_config_fits(config, model, args) -> None:
    from calibrate.models import model_spec
    from sparge_core.params import ConfigError, weights_fingerprint

    spec = model_spec(model, args.model)
    try:
        config.check_matches(num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                             head_dim=spec.head_dim)
        config.check_identity(architecture=spec.model_type, fingerprint=lambda: weights_fingerprint(model),
                              allow_other_model=args.allow_other_model, override_hint="--allow-other-model")
    except ConfigError as err:
        raise InputError(f"--config {args.config}: {err}") from err


def suite_lengths(args, suites: list[str], max_context: int) -> dict[str, list[int]]:
    """Each suite's lengths. Given ones beyond the model's context are an error (a model run past its
    context gives meaningless numbers); default ones beyond it are left out with a warning."""
    out = {}
    for suite in suites:
        if args.lengths is not None:
            beyond = [n for n in args.lengths if max_context and n > max_context]
            if beyond:
                raise InputError(f"--lengths {beyond} are beyond {args.model}'s context of {max_context} tokens; its "
                                 f"results would be meaningless: use lengths <= {max_context}")
            out[suite] = list(args.lengths)
            continue
        lengths = [n for n in DEFAULT_LENGTHS[suite] if not max_context or n <= max_context]
        if len(lengths) < len(DEFAULT_LENGTHS[suite]):
            dropped = sorted(set(DEFAULT_LENGTHS[suite]) - set(lengths))
            logger.warning("%s: leaving out lengths %s, beyond %s's context of %d tokens", suite, dropped, args.model,
                           max_context)
        if not lengths:
            raise InputError(f"{suite}: every default length is beyond {args.model}'s context of {max_context} "
                             f"tokens; pass --lengths")
        out[suite] = lengths
    return out


# --------------------------------------------------------------------------------------------
# LLM suites
# --------------------------------------------------------------------------------------------
@LLM_SUITES.register("ppl")
def suite_ppl(args, model, tokenizer, settings, model_name: str) -> list[Path]:
    from calibrate.data import token_windows

    from .ppl import perplexity
    from .runner import sparsity_summary, write_result

    corpus = _load_corpus(args)
    lengths = args.suite_lengths["ppl"]
    try:
        windows = {L: token_windows(tokenizer, corpus, L, args.windows, seed=args.seed) for L in lengths}
    except ValueError as err:
        raise InputError(f"--data {args.data!r}: {err}") from err
    paths = []
    for s in settings:
        scores, spars, t0 = {}, {}, time.perf_counter()
        for L, w in windows.items():
            with s.applied(model, backend=args.backend) as handle:
                ppl, nll, per_window = perplexity(model, w.input_ids)
                spars[str(L)] = sparsity_summary(handle)
            scores[f"ppl@{L}"] = ppl
            scores[f"nll@{L}"] = nll
            # per-window mean NLL: what a bootstrap interval over the windows needs
            scores[f"window_nll@{L}"] = [math.log(p) for p in per_window]
        logger.info("ppl %s: %s", s.label, {k: round(v, 3) for k, v in scores.items() if k.startswith("ppl")})
        data = {"corpus": corpus.name, "sha256": corpus.sha256, "windows": {str(L): w.describe() for L, w in windows.items()},
                "label": "WikiText substitute" if corpus.name != "wikitext" else "WikiText"}
        paths.append(write_result(args.out, "ppl", model_name, s, scores=scores, sparsity=spars,
                                  timings={"seconds": time.perf_counter() - t0}, data=data))
    return paths


@LLM_SUITES.register("niah")
def suite_niah(args, model, tokenizer, settings, model_name: str) -> list[Path]:
    from . import niah
    from .runner import sparsity_summary, write_result

    lengths = args.suite_lengths["niah"]
    items = niah.build_niah(tokenizer, lengths, args.depths, seed=args.seed)
    paths = []
    for s in settings:
        t0 = time.perf_counter()
        with s.applied(model, backend=args.backend) as handle:
            results = niah.score_niah(model, tokenizer, items)
            spars = sparsity_summary(handle)
        summary = niah.summarize_niah(results)
        png = Path(args.out) / "niah" / model_name / f"{s.label.replace('@', '_at_')}.png"
        niah.niah_heatmap(results, png, f"{model_name} / {s.label}")
        logger.info("niah %s: %.3f", s.label, summary.get("accuracy", float("nan")))
        paths.append(write_result(args.out, "niah", model_name, s, scores=summary, sparsity=spars,
                                  timings={"seconds": time.perf_counter() - t0},
                                  data={"lengths": lengths, "depths": args.depths, "seed": args.seed, "items": len(items)},
                                  extra={"items": results, "heatmap": str(png)}))
    return paths


@LLM_SUITES.register("longctx")
def suite_longctx(args, model, tokenizer, settings, model_name: str) -> list[Path]:
    from . import longctx
    from .runner import sparsity_summary, write_result

    lengths = args.suite_lengths["longctx"]
    items = [it for L in lengths for it in longctx.build_tasks(tokenizer, L, args.per_task, seed=args.seed)]
    paths = []
    for s in settings:
        t0 = time.perf_counter()
        with s.applied(model, backend=args.backend) as handle:
            scores = longctx.score_tasks(model, tokenizer, items)
            spars = sparsity_summary(handle)
        logger.info("longctx %s: %s", s.label, scores.get("average"))
        paths.append(write_result(args.out, "longctx", model_name, s, scores=scores, sparsity=spars,
                                  timings={"seconds": time.perf_counter() - t0},
                                  data={"lengths": lengths, "per_task": args.per_task, "seed": args.seed,
                                        "label": "LongBench substitute (generated)"}))
    return paths


@LLM_SUITES.register("longbench")
def suite_longbench(args, model, tokenizer, settings, model_name: str) -> list[Path]:
    from . import longctx
    from .runner import sparsity_summary, write_result

    items = longctx.load_longbench(args.longbench_dir, max_length=args.suite_lengths["longbench"][0],
                                   tokenizer=tokenizer)
    paths = []
    for s in settings:
        with s.applied(model, backend=args.backend) as handle:
            scores = longctx.score_tasks(model, tokenizer, items)
            spars = sparsity_summary(handle)
        paths.append(write_result(args.out, "longbench", model_name, s, scores=scores, sparsity=spars,
                                  data={"dir": args.longbench_dir, "label": "LongBench"}))
    return paths


@LLM_SUITES.register("speed")
def suite_speed(args, model, tokenizer, settings, model_name: str) -> list[Path]:
    from .runner import write_result
    from .speed import run_speed

    corpus = _load_corpus(args)
    lengths = args.suite_lengths["speed"]
    paths = []
    for s in settings:
        res = run_speed(model, tokenizer, s, lengths, corpus, backend=args.backend)
        logger.info("speed %s: %s", s.label, {L: round(r["prefill_ms"], 2) for L, r in res["lengths"].items()})
        paths.append(write_result(args.out, "speed", model_name, s, scores=res,
                                  data={"corpus": corpus.name, "sha256": corpus.sha256}))
    return paths


@LLM_SUITES.register("ruler")
def suite_ruler(args, model, tokenizer, settings, model_name: str) -> list[Path]:
    from .ruler import suite_ruler as run

    return run(args, model, tokenizer, settings, model_name)


def run_llm(args, suites: list[str]) -> int:
    import torch

    from calibrate.models import ModelLoadError, load_model, model_spec

    device = _check_common(args)
    _check_llm_args(args, suites)
    config = _load_config(args)
    if any(s in CORPUS_SUITES for s in suites):
        _load_corpus(args)
    settings = _settings(args, device)  # density matching reads the capture: no model needed
    try:
        model, tokenizer = load_model(args.model, device=device)
    except ModelLoadError as err:
        raise InputError(str(err)) from err
    model_name = Path(args.model).stem if Path(args.model).exists() else args.model
    if config is not None:
        _check_config_fits(config, model, args)
    args.suite_lengths = suite_lengths(args, suites, model_spec(model, args.model).max_context)
    with torch.no_grad():
        for suite in suites:
            t0 = time.perf_counter()
            paths = LLM_SUITES.get(suite)(args, model, tokenizer, settings, model_name)
            print(f"{suite}: {len(paths)} result files in {time.perf_counter() - t0:.1f} s")
            for p in paths:
                print(f"  {p}")
    return 0


# --------------------------------------------------------------------------------------------
def run_image(args) -> int:
    from . import image

    device = _check_common(args)
    if not Path(args.model).is_file():
        raise InputError(f"--model {args.model}: {args.suite} needs a DiT checkpoint file (e.g. "
                         f"evals/dit/checkpoints/{'t2v' if args.suite != 't2i' else 't2i'}.pt)")
    if args.clip is not None and not Path(args.clip).is_file():
        raise InputError(f"--clip {args.clip} is not a file")
    if args.config is not None:
        _load_config(args)
    out = Path(args.out) / args.suite / Path(args.model).stem / "results.json"
    configs = {"sparge": args.config} if args.config else None
    methods = [m for m in args.methods if m != "sparge" or configs]
    if args.suite == "ablation":
        image.permutation_ablation(args.model, out, device=device, backend=args.backend)
    else:
        run = image.run_t2i if args.suite == "t2i" else image.run_t2v
        target = None if args.density in (None, "matched") else float(args.density)
        run(args.model, methods, configs, out, clip_ckpt=args.clip, n_prompts=args.prompts, steps=args.steps,
            device=device, backend=args.backend, target_density=target)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return _main(args)
    except InputError as err:
        print(f"evals: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evals: interrupted; the result files written so far are complete", file=sys.stderr)
        return 130
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        print(f"evals: error: {err.strerror or err}{where}; the result files written so far are complete",
              file=sys.stderr)
        return exit_code_for(err)


def _main(args) -> int:
    if args.suite == "tables":
        from .tables import write_tables

        if not Path(args.out).is_dir():
            raise InputError(f"--out {args.out} is not a folder of results (python -m evals tables --out results "
                             f"rebuilds the committed tables)")
        check_output_folder(args.out, "--out")
        path = write_tables(args.out)
        print(f"wrote {path}")
        return 0
    if args.suite in ("t2i", "t2v", "ablation"):
        return run_image(args)
    if args.suite == "ruler":  # bad task names and missing packages exit 2 before the model loads
        from .ruler import OFFLINE_TASKS, check_tasks

        try:
            check_tasks(args.ruler_tasks or OFFLINE_TASKS)
        except ValueError as err:
            raise InputError(str(err)) from err
    return run_llm(args, ALL_SUITES if args.suite == "all" else [args.suite])


if __name__ == "__main__":
    sys.exit(main())
