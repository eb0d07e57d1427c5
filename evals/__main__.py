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
  tables    results/ -> results/TABLES.md

Methods: dense, sparge (a calibrated --config, or defaults), sparge-topk, minference, flexprefill.
``--density matched`` sets every rival, layer by layer, to the density the calibrated config reaches
on the captured Q/K/V (``--capture``, default ``<config>.capture``); ``--density 0.5`` sets them all to
0.5. Example:

  python -m evals all --model smollm2 --config runs/smollm2.json --density matched --device cuda
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("evals")

LLM_SUITES = ("ppl", "niah", "longctx", "longbench", "speed", "ruler")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=[*LLM_SUITES, "t2i", "t2v", "ablation", "all", "tables"])
    p.add_argument("--model", default="smollm2", help="model name or local path (LLM suites); DiT checkpoint (t2i/t2v)")
    p.add_argument("--methods", nargs="+", default=["dense", "sparge", "sparge-topk", "minference", "flexprefill"],
                   help="methods to compare")
    p.add_argument("--method", dest="methods", nargs="+", help="alias of --methods")
    p.add_argument("--config", default=None, help="calibrated sparge config JSON (per layer)")
    p.add_argument("--density", default=None, help="'matched' (rivals at the config's per-layer density) or a number")
    p.add_argument("--capture", default=None, help="captured Q/K/V for density matching (default: <config>.capture)")
    p.add_argument("--out", default="results", help="results folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--backend", default="auto", help="kernel backend: auto, triton, reference")
    p.add_argument("--data", default="pydoc", help="corpus for ppl/speed (pydoc, shakespeare, austen, or a file)")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="context lengths (default per suite)")
    p.add_argument("--windows", type=int, default=4, help="ppl: windows per length")
    p.add_argument("--seed", type=int, default=1234, help="window choice / task generation seed (calibration uses 0)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="niah: needle depths")
    p.add_argument("--per-task", type=int, default=4, help="longctx: items per task and length")
    p.add_argument("--longbench-dir", default=None, help="longbench: folder of LongBench v1 JSONL files")
    # ruler (evals.ruler): lm-eval's RULER tasks; --per-task items per task and length, --lengths (default 4096)
    p.add_argument("--ruler-tasks", nargs="+", default=None, help="ruler: RULER tasks (default: every offline one)")
    p.add_argument("--max-gen-toks", type=int, default=None, help="ruler: cap on generated tokens (default: RULER's)")
    p.add_argument("--clip", default=None, help="t2i/t2v: the project's CLIP checkpoint")
    p.add_argument("--prompts", type=int, default=None, help="t2i/t2v: number of prompts")
    p.add_argument("--steps", type=int, default=20, help="t2i/t2v: sampling steps")
    p.add_argument("--quiet", action="store_true")
    return p


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _settings(args, device: str):
    from .runner import build_settings

    capture = args.capture
    if capture is None and args.config and args.density is not None:
        capture = str(Path(args.config).with_suffix("")) + ".capture"
    return build_settings(args.methods, config=args.config, density=args.density, capture_dir=capture, device=device)


# --------------------------------------------------------------------------------------------
# LLM suites
# --------------------------------------------------------------------------------------------
def suite_ppl(args, model, tokenizer, settings, model_name: str) -> list[Path]:
    from .data import load_corpus, token_windows
    from .ppl import perplexity
    from .runner import sparsity_summary, write_result

    corpus = load_corpus(args.data)
    lengths = args.lengths or [2048, 4096, 8192]
    windows = {L: token_windows(tokenizer, corpus, L, args.windows, seed=args.seed) for L in lengths}
    paths = []
    for s in settings:
        scores, spars, t0 = {}, {}, time.perf_counter()
        for L, w in windows.items():
            with s.applied(model, backend=args.backend) as handle:
                ppl, nll, per_window = perplexity(model, w.input_ids)
                spars[str(L)] = sparsity_summary(handle)
            scores[f"ppl@{L}"] = ppl
            scores[f"nll@{L}"] = nll
        logger.info("ppl %s: %s", s.label, {k: round(v, 3) for k, v in scores.items() if k.startswith("ppl")})
        data = {"corpus": corpus.name, "sha256": corpus.sha256, "windows": {str(L): w.describe() for L, w in windows.items()},
                "label": "WikiText substitute" if corpus.name != "wikitext" else "WikiText"}
        paths.append(write_result(args.out, "ppl", model_name, s, scores=scores, sparsity=spars,
                                  timings={"seconds": time.perf_counter() - t0}, data=data))
    return paths


def suite_niah(args, model, tokenizer, settings, model_name: str) -> list[Path]:
    from . import niah
    from .runner import sparsity_summary, write_result

    lengths = args.lengths or [1024, 2048, 4096, 8192]
    items = niah.build_niah(tokenizer, lengths, args.depths, seed=args.seed)
    paths = []
    for s in settings:
        t0 = time.perf_counter()
        with s.applied(model, backend=args.backend) as handle:
            results = niah.score_niah(model, tokenizer, items)
            spars = sparsity_summary(handle)
        summary = niah.summarize_niah(results)
        png = Path(args.out) / "niah" / model_name / f"{s.label.replace('@', '_at_')}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        niah.niah_heatmap(results, png, f"{model_name} / {s.label}")
        logger.info("niah %s: %.3f", s.label, summary.get("accuracy", float("nan")))
        paths.append(write_result(args.out, "niah", model_name, s, scores=summary, sparsity=spars,
                                  timings={"seconds": time.perf_counter() - t0},
                                  data={"lengths": lengths, "depths": args.depths, "seed": args.seed, "items": len(items)},
                                  extra={"items": results, "heatmap": str(png)}))
    return paths


def suite_longctx(args, model, tokenizer, settings, model_name: str) -> list[Path]:
    from . import longctx
    from .runner import sparsity_summary, write_result

    lengths = args.lengths or [4096, 8192]
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


def suite_longbench(args, model, tokenizer, settings, model_name: str) -> list[Path]:
    from . import longctx
    from .runner import sparsity_summary, write_result

    if not args.longbench_dir:
        raise SystemExit("longbench needs --longbench-dir: a folder of LongBench v1 JSONL files (not bundled: "
                         "LongBench cannot be downloaded here; use the longctx suite for the generated substitute)")
    items = longctx.load_longbench(args.longbench_dir, max_length=(args.lengths or [8192])[0], tokenizer=tokenizer)
    paths = []
    for s in settings:
        with s.applied(model, backend=args.backend) as handle:
            scores = longctx.score_tasks(model, tokenizer, items)
            spars = sparsity_summary(handle)
        paths.append(write_result(args.out, "longbench", model_name, s, scores=scores, sparsity=spars,
                                  data={"dir": args.longbench_dir, "label": "LongBench"}))
    return paths


def suite_speed(args, model, tokenizer, settings, model_name: str) -> list[Path]:
    from .data import load_corpus
    from .runner import write_result
    from .speed import run_speed

    corpus = load_corpus(args.data)
    lengths = args.lengths or [2048, 4096, 8192]
    paths = []
    for s in settings:
        res = run_speed(model, tokenizer, s, lengths, corpus, backend=args.backend)
        logger.info("speed %s: %s", s.label, {L: round(r["prefill_ms"], 2) for L, r in res["lengths"].items()})
        paths.append(write_result(args.out, "speed", model_name, s, scores=res,
                                  data={"corpus": corpus.name, "sha256": corpus.sha256}))
    return paths


def suite_ruler(args, model, tokenizer, settings, model_name: str) -> list[Path]:
    from .ruler import suite_ruler as run

    return run(args, model, tokenizer, settings, model_name)


SUITES = {"ppl": suite_ppl, "niah": suite_niah, "longctx": suite_longctx, "longbench": suite_longbench,
          "speed": suite_speed, "ruler": suite_ruler}


def run_llm(args, suites: list[str]) -> int:
    import torch

    from .models import ModelLoadError, load_model

    device = _device(args)
    try:
        model, tokenizer = load_model(args.model, device=device)
    except ModelLoadError as err:
        print(f"evals: error: {err}", file=sys.stderr)
        return 2
    model_name = Path(args.model).stem if Path(args.model).exists() else args.model
    try:
        settings = _settings(args, device)
    except (ValueError, FileNotFoundError) as err:
        print(f"evals: error: {err}", file=sys.stderr)
        return 2
    with torch.no_grad():
        for suite in suites:
            t0 = time.perf_counter()
            paths = SUITES[suite](args, model, tokenizer, settings, model_name)
            print(f"{suite}: {len(paths)} result files in {time.perf_counter() - t0:.1f} s")
            for p in paths:
                print(f"  {p}")
    return 0


# --------------------------------------------------------------------------------------------
def run_image(args) -> int:
    from . import image

    device = _device(args)
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
    if args.suite == "tables":
        from .tables import write_tables

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
            print(f"evals: error: {err}", file=sys.stderr)
            return 2
    suites = ["ppl", "niah", "longctx", "speed"] if args.suite == "all" else [args.suite]
    return run_llm(args, suites)


if __name__ == "__main__":
    sys.exit(main())
