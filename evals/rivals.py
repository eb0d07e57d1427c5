"""Inputs and yardsticks for comparing attention methods on real or synthetic Q/K/V.

Used by the rival cross-checks (``scripts/crosscheck_minference.py``, ``scripts/rivals_l1_table.py``):

- inputs: ``add_input_args`` adds the shared command-line options; ``iter_inputs`` yields ``QKV``
  (layer, sample, q, k, v) from a ``calibrate.capture`` folder (optionally captured first from a
  model, ``--make-capture``) or from structured synthetic inputs (``sparge_core.synthetic``);
- yardsticks: ``dense_reference`` (causal float32 SDPA, GQA by repetition) and ``rel_l1``;
- provenance: ``run_info`` (command line, device, versions) and ``default_out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparge_core.synthetic import structured_qkv

from .environment import REPO, git_state

logger = logging.getLogger(__name__)


@dataclass
class QKV:
    layer: int
    sample: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def add_input_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("inputs")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--capture", type=Path, help="a calibrate.capture folder (meta.json + L###/S###.safetensors)"
    )
    src.add_argument(
        "--synthetic", action="store_true", help="structured synthetic Q/K/V (sparge_core.synthetic)"
    )
    g.add_argument(
        "--make-capture",
        metavar="MODEL",
        default=None,
        help="if --capture has no meta.json, capture it first from this model (calibrate.models name, "
        "e.g. smollm2) with --seq-len, --samples and --corpus",
    )
    g.add_argument("--corpus", default="pydoc", help="corpus for --make-capture")
    g.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="layer indices (capture: default all captured; synthetic: default 0 1)",
    )
    g.add_argument("--samples", type=int, default=None, help="samples per layer (default: all / synthetic 1)")
    g.add_argument("--seq-len", type=int, default=1024, help="synthetic length, or --make-capture length")
    g.add_argument("--heads", type=int, default=4, help="synthetic query heads")
    g.add_argument("--kv-heads", type=int, default=2, help="synthetic key/value heads")
    g.add_argument("--head-dim", type=int, default=64, help="synthetic head dim")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument(
        "--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on CUDA, fp32 on CPU)"
    )
    g.add_argument("--backend", default="auto", help="our kernel backend: auto | triton | reference")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if name not in table:
        raise SystemExit(f"--dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def _make_capture(args, device: torch.device) -> None:
    from calibrate.capture import capture_to_disk
    from calibrate.models import load_model

    logger.info(
        "capturing %s: %d samples x %d tokens of %s into %s",
        args.make_capture,
        args.samples or 1,
        args.seq_len,
        args.corpus,
        args.capture,
    )
    model, tokenizer = load_model(args.make_capture, device=device)
    capture_to_disk(
        model,
        tokenizer,
        args.capture,
        layers=args.layers,
        corpus=args.corpus,
        seq_len=args.seq_len,
        samples=args.samples or 1,
        model_name=args.make_capture,
    )
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def describe_inputs(args) -> dict[str, Any]:
    if args.synthetic:
        return {
            "kind": "synthetic",
            "seq_len": args.seq_len,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "seed": args.seed,
        }
    meta = json.loads((args.capture / "meta.json").read_text())
    return {
        "kind": "capture",
        "dir": str(args.capture),
        **{
            k: meta.get(k)
            for k in (
                "model",
                "num_layers",
                "num_heads",
                "num_kv_heads",
                "head_dim",
                "seq_len",
                "samples",
                "dtype",
                "data",
            )
        },
    }


def iter_inputs(args) -> Iterator[QKV]:
    """The (layer, sample, q, k, v) to evaluate, on ``args.device`` in ``args.dtype``."""
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.synthetic:
        for layer in args.layers if args.layers is not None else [0, 1]:
            for sample in range(args.samples or 1):
                q, k, v = structured_qkv(
                    1,
                    args.heads,
                    args.kv_heads,
                    args.seq_len,
                    args.head_dim,
                    dtype=dtype,
                    device=device,
                    seed=args.seed + 1000 * layer + sample,
                )
                yield QKV(layer, sample, q, k, v)
        return
    if not (args.capture / "meta.json").is_file():
        if args.make_capture is None:
            raise SystemExit(f"{args.capture} has no meta.json; pass --make-capture MODEL to create it")
        _make_capture(args, device)
    from safetensors.torch import load_file

    from calibrate.capture import read_meta, sample_path

    meta = read_meta(args.capture)
    layers = list(meta.layers) if args.layers is None else args.layers
    missing = [x for x in layers if x not in meta.layers]
    if missing:
        raise SystemExit(f"layers {missing} are not in the capture (captured: {list(meta.layers)})")
    for layer in layers:
        for sample in range(min(meta.samples, args.samples or meta.samples)):
            t = load_file(str(sample_path(args.capture, layer, sample)))
            yield QKV(layer, sample, *(t[name].to(device=device, dtype=dtype) for name in ("q", "k", "v")))


def default_out(stem: str) -> Path:
    """``$OUT/<stem>`` if ``$OUT`` is set, else ``runs/rivals/<stem>`` (``results/`` only when asked)."""
    base = os.environ.get("OUT")
    return Path(base) / stem if base else Path("runs") / "rivals" / stem


def run_info(device: torch.device, backend: str, script: str, argv: list[str] | None) -> dict[str, Any]:
    """Command line (as run from the repository root), device and versions, for result files."""
    import triton

    argv = sys.argv[1:] if argv is None else list(argv)
    commit, _dirty = git_state()
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(script, REPO), *argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "backend": backend,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "sparge_git": commit[:12] if commit else None,
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum |a - b| / sum |b| in float64."""
    a, b = a.double(), b.double()
    den = b.abs().sum().item()
    return (a - b).abs().sum().item() / den if den else float("nan")


def dense_reference(q, k, v) -> torch.Tensor:
    """Causal softmax attention in float32 (GQA by repeating K/V), output float32."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q.float(), kf, vf, is_causal=True)
