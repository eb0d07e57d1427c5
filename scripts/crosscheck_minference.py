"""Cross-check our ``minference`` and ``flexprefill`` methods against the original code in the
``minference`` PyPI package (0.1.6.0), on the same Q/K/V.

For every layer and sample of a Q/K/V capture (``calibrate.capture`` layout:
``<dir>/L{layer:03d}/S{sample:03d}.safetensors`` with ``q (1, Hq, N, D)``, ``k``/``v (1, Hkv, N, D)`` and
``<dir>/meta.json``), or of structured synthetic inputs (``--synthetic``), and for every setting:

- minference vertical-slash ``--vs V:S`` (package: ``minference_prefill_kernel`` per head, which
  estimates the lines from the last 64 queries and runs its Triton kernel), block-sparse
  ``--bs-topk K`` (package: ``block_sparse_attention``), A-shape ``--a-shape INIT:LOCAL`` (package:
  ``streaming_forward``), and flexprefill ``--flex GAMMA:TAU:MIN_BUDGET`` (package:
  ``modules.flexprefill.flex_prefill_attention`` with ``gqa_interleave=False``);
- ours: the registry method with the same settings, its block map run by ``block_sparse_attn``
  (Triton on CUDA);

it records mask agreement and output errors:

- ``density_ours`` / ``density_pkg``: block density on our 128 x 64 grid (the package's mask is the
  cover of every (query, key) pair its kernel computes, read from the indices it builds: hooks wrap
  its index functions and record their results, then call them unchanged);
- ``token_density_ours`` / ``token_density_pkg``: computed causal (query, key) pairs over all causal
  pairs (vertical-slash: from the package's own ``convert_vertical_slash_indexes``);
- ``mask_iou``, ``pkg_in_ours`` (share of the package's blocks ours keeps), ``ours_in_pkg``;
- vertical-slash: ``vertical_jaccard`` / ``slash_jaccard`` between our selected columns / distances
  and the package's; flexprefill: ``decision_agreement`` (query-aware vs vertical-slash per head);
- ``l1_ours_dense``, ``l1_pkg_dense``, ``l1_ours_pkg`` (relative L1, float64), ``l1_pkgmask_dense``
  (our kernel run on the package's mask cover, vs dense) and ``l1_ours_on_pkg_mask_vs_pkg`` (the same
  vs the package output): the last two isolate the block-granularity effect from estimation
  differences. If a package kernel fails (e.g. a Triton version it was not written for) after its
  index was recorded, the mask metrics and ``l1_pkgmask_dense`` are still reported, with
  ``package_error``.

Without the package (e.g. on CPU: it needs CUDA and its compiled ``minference.cuda``), only our side
is computed and ``package`` in the output says why. The package is never modified: when importing
``minference`` as a whole fails (its model-patching modules import many transformers internals), the
needed submodules are imported under a bare parent package and the output records
``import_mode``.

Writes ``<out>.json`` (meta, one row per layer x sample x setting, a summary per setting) and
``<out>.csv`` (rows); prints the summary. Default ``<out>``: ``$OUT/crosscheck_minference`` if ``$OUT``
is set, else ``results/rivals/crosscheck_minference``.

Examples::

    # CPU smoke test (ours only)
    python scripts/crosscheck_minference.py --synthetic --seq-len 1024 --heads 4 --kv-heads 2 --layers 0 1
    # GPU, smollm2 at 8K (the capture is made first if runs/cap-smollm2-8k has no meta.json)
    python scripts/crosscheck_minference.py --capture runs/cap-smollm2-8k --make-capture smollm2 \\
        --seq-len 8192 --samples 2
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sparge_core import block_sparse_attn
from sparge_core.methods import _blockmaps as bm
from sparge_core.methods.flexprefill import FlexPrefill
from sparge_core.methods.minference import MInference
from sparge_core.ops import reference as R
from sparge_core.synthetic import structured_qkv

logger = logging.getLogger("crosscheck_minference")
PKG_BLOCK = 64  # the package's vertical-slash and block-sparse tiles are 64 x 64
FLEX_BLOCK = 128


# ============================================================================================
# inputs (shared with rivals_l1_table.py)
# ============================================================================================
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
        help="if --capture has no meta.json, capture it first from this model (evals.models name, "
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
    from evals.models import load_model

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
    base = os.environ.get("OUT")
    return Path(base) / stem if base else ROOT / "results" / "rivals" / stem


def run_info(device: torch.device, backend: str, script: str, argv: list[str] | None) -> dict[str, Any]:
    """Command line (as run from the repository root), device and versions, for result files."""
    argv = sys.argv[1:] if argv is None else list(argv)
    rev = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(script, ROOT), *argv]),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()})",
        "backend": backend,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton_version,
            "sparge_git": rev.stdout.strip() or None,
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ============================================================================================
# metrics
# ============================================================================================
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


def mask_overlap(ours: torch.Tensor, pkg: torch.Tensor, allowed: torch.Tensor) -> dict[str, float]:
    a, b = ours & allowed, pkg & allowed
    inter, union = (a & b).sum().item(), (a | b).sum().item()
    return {
        "mask_iou": inter / union if union else 1.0,
        "pkg_in_ours": inter / b.sum().item() if b.any() else 1.0,
        "ours_in_pkg": inter / a.sum().item() if a.any() else 1.0,
    }


def set_jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over (batch, head) of |a & b| / |a | b| for bool ``(B, H, L)``."""
    inter = (a & b).sum(-1).double()
    union = (a | b).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean().item()


_PAIR_CACHE: dict[tuple, torch.Tensor] = {}


def block_pair_counts(nq: int, nk: int, device) -> torch.Tensor:
    """``(nqb, nkb)``: causal (query, key) pairs inside every block of the 128 x 64 grid."""
    key = (nq, nk, str(device))
    if key not in _PAIR_CACHE:
        pos = torch.arange(nq, device=device) + (nk - nq)  # last key each row sees
        k_first = torch.arange(R.num_blocks(nk, R.BLOCK_K), device=device) * R.BLOCK_K
        k_last = torch.clamp(k_first + R.BLOCK_K, max=nk) - 1
        per_row = (torch.minimum(pos[:, None], k_last[None, :]) - k_first[None, :] + 1).clamp(
            min=0
        )  # (nq, nkb)
        pad = R.num_blocks(nq, R.BLOCK_Q) * R.BLOCK_Q - nq
        per_row = torch.nn.functional.pad(per_row, (0, 0, 0, pad))
        _PAIR_CACHE[key] = per_row.reshape(-1, R.BLOCK_Q, per_row.shape[-1]).sum(1)
    return _PAIR_CACHE[key]


def token_density_of_blocks(mask: torch.Tensor, nq: int, nk: int) -> float:
    """Computed causal pairs of a block map over all causal pairs."""
    pairs = block_pair_counts(nq, nk, mask.device)
    total = pairs.sum().item() * mask.shape[0] * mask.shape[1]
    return (mask.long() * pairs).sum().item() / total


def token_density_of_rows(keys_per_row_block: torch.Tensor, block_m: int, n: int) -> float:
    """Causal pairs computed by a kernel whose row block ``r`` (``block_m`` rows) touches the keys
    ``keys_per_row_block[..., r, :]`` (bool ``(B, H, rows, N)``), over all causal pairs."""
    prefix = torch.nn.functional.pad(
        keys_per_row_block.long().cumsum(-1), (1, 0)
    )  # [..., x] = touched keys < x
    rows = torch.arange(n, device=prefix.device)
    computed = prefix[:, :, rows // block_m, rows + 1].sum().item()  # row i: touched keys <= i
    total = n * (n + 1) // 2 * keys_per_row_block.shape[0] * keys_per_row_block.shape[1]
    return computed / total


def rows_to_grid(keys_per_row_block: torch.Tensor, block_m: int, nq: int, nk: int) -> torch.Tensor:
    """Cover of a per-row-block key set ``(B, H, rows, N)`` (``block_m`` divides BLOCK_Q) on our grid."""
    b, h, rows, n = keys_per_row_block.shape
    nqb, nkb = R.num_blocks(nq, R.BLOCK_Q), R.num_blocks(nk, R.BLOCK_K)
    ratio = R.BLOCK_Q // block_m
    keys = torch.nn.functional.pad(keys_per_row_block, (0, nkb * R.BLOCK_K - n, 0, nqb * ratio - rows))
    grid = keys.reshape(b, h, nqb, ratio, nkb, R.BLOCK_K).any(-1).any(3)
    return grid & R.allowed_block_mask(nq, nk, True, device=keys.device)


# ============================================================================================
# the package
# ============================================================================================
@dataclass
class PkgResult:
    """What one package call produced: its output (None if its kernel failed), the cover of the
    (query, key) pairs it computes on our grid, their token density, recorded extras, the error."""

    out: torch.Tensor | None
    grid: torch.Tensor | None
    token_density: float | None
    extra: dict
    error: str | None


class _Availability(tuple):
    """transformers >= 5 returns ``(available, version)`` from ``_is_package_available``; MInference
    0.1.6.0 tests the result for truth (``if _is_package_available("vllm"):``), which a non-empty tuple
    always passes, so it imports vllm / kivi_gemv that are not there. This tuple is falsy when the
    package is absent, and still indexes like the original for transformers' own callers."""

    def __bool__(self) -> bool:
        return bool(self[0])


def _transformers_compat_needed() -> bool:
    try:
        from transformers.utils import import_utils
    except ImportError:
        return False
    return isinstance(import_utils._is_package_available("sparge-no-such-package"), tuple)


class _transformers_compat:
    """While importing the package, make ``_is_package_available`` results falsy for absent packages."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def __enter__(self):
        if self.active:
            from transformers.utils import import_utils

            self.module, self.original = import_utils, import_utils._is_package_available
            original = self.original

            def wrapped(*a, **kw):
                result = original(*a, **kw)
                return _Availability(result) if isinstance(result, tuple) else result

            import_utils._is_package_available = wrapped
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.module._is_package_available = self.original


class MInferencePackage:
    """Entry points of the ``minference`` package, with recording hooks around its index builders."""

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}
        self.version = None
        self.import_mode = None
        try:
            self.version = importlib.metadata.version("minference")
        except importlib.metadata.PackageNotFoundError:
            self.errors["package"] = "minference is not installed"
            return
        self.compat = _transformers_compat_needed()
        with _transformers_compat(self.compat):
            try:
                importlib.import_module("minference")
                self.import_mode = "full"
            except Exception as err:  # noqa: BLE001 (any import-time failure: record it, try the submodules)
                self.errors["import minference"] = f"{type(err).__name__}: {err}"
                self._bare_parent()
                self.import_mode = "submodules"
            self.cuda = self._submodule("minference.cuda")
            self.mf = self._submodule("minference.modules.minference_forward")
            self.bsf = self._submodule("minference.ops.block_sparse_flash_attention")
            self.sk = self._submodule("minference.ops.streaming_kernel")
            self.fp = self._submodule("minference.modules.flexprefill")

    @staticmethod
    def _bare_parent() -> None:
        for name in [m for m in sys.modules if m == "minference" or m.startswith("minference.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("minference")
        parent = types.ModuleType("minference")
        parent.__path__ = list(spec.submodule_search_locations)
        parent.__spec__ = spec
        sys.modules["minference"] = parent

    def _submodule(self, name: str):
        try:
            return importlib.import_module(name)
        except Exception as err:  # noqa: BLE001
            self.errors[name] = f"{type(err).__name__}: {err}"
            return None

    def status(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "import_mode": self.import_mode,
            "errors": self.errors,
            "transformers_compat_shim": getattr(self, "compat", False),
            "available": {
                "vertical_slash": self.mf is not None and self.cuda is not None,
                "block_sparse": self.bsf is not None,
                "a_shape": self.sk is not None,
                "flexprefill": self.fp is not None,
            },
        }

    @staticmethod
    def _hook(module, name: str, record: Callable[[Any, tuple, dict], None]):
        original = getattr(module, name)

        def wrapper(*a, **kw):
            result = original(*a, **kw)
            record(result, a, kw)
            return result

        setattr(module, name, wrapper)
        return original

    # ---- vertical-slash -------------------------------------------------------------------
    def vertical_slash(self, q, k, v, vertical_size: int, slash_size: int) -> PkgResult:
        """Per head through ``minference_prefill_kernel`` (its estimate, then its kernel); the hook
        records the lines each head selected before the kernel runs."""
        n, num_heads, group = q.shape[2], q.shape[1], q.shape[1] // k.shape[1]
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        original = self.mf.vertical_slash_sparse_attention

        def wrapper(query, key, value, v_idx, s_idx, *a, **kw):
            seen.append((v_idx.detach().reshape(-1).clone(), s_idx.detach().reshape(-1).clone()))
            return original(query, key, value, v_idx, s_idx, *a, **kw)

        self.mf.vertical_slash_sparse_attention = wrapper
        config = {
            "best_pattern": [
                {str(h): ["vertical_and_slash", vertical_size, slash_size, 0.0] for h in range(num_heads)}
            ]
        }
        outs, error = [], None
        try:
            for h in range(num_heads):
                kv = h // group
                try:
                    outs.append(
                        self.mf.minference_prefill_kernel(
                            q[:, h : h + 1].contiguous(),
                            k[:, kv : kv + 1].contiguous(),
                            v[:, kv : kv + 1].contiguous(),
                            h,
                            0,
                            config,
                        )
                    )
                except Exception as err:
                    error = error or f"{type(err).__name__}: {err}"
                    if len(seen) <= h:
                        raise
        finally:
            self.mf.vertical_slash_sparse_attention = original
        columns = torch.zeros(1, num_heads, n, dtype=torch.bool, device=q.device)
        distances = torch.zeros(1, num_heads, 2 * n - 1, dtype=torch.bool, device=q.device)
        touched = torch.zeros(1, num_heads, math.ceil(n / PKG_BLOCK), n, dtype=torch.bool, device=q.device)
        for h, (v_idx, s_idx) in enumerate(seen):
            columns[0, h, v_idx.long()] = True
            distances[0, h, bm.distance_index(s_idx.long(), n)] = True
            touched[0, h] = self._vs_kernel_keys(v_idx, s_idx, n)
        out = torch.cat(outs, dim=1) if error is None else None
        return PkgResult(
            out,
            rows_to_grid(touched, PKG_BLOCK, n, n),
            token_density_of_rows(touched, PKG_BLOCK, n),
            {"_columns": columns, "_distances": distances},
            error,
        )

    def _vs_kernel_keys(self, v_idx, s_idx, n: int) -> torch.Tensor:
        """Keys each 64-row block computes, from the package's own index conversion (CUDA):
        64-key ranges starting at ``block_offset`` plus single ``column_index`` columns."""
        v_sorted = v_idx.to(torch.int32).sort().values.reshape(1, 1, -1).contiguous()
        s_sorted = s_idx.to(torch.int32).sort(descending=True).values.reshape(1, 1, -1).contiguous()
        seqlens = torch.tensor([n], dtype=torch.int32, device=v_idx.device)
        block_count, block_offset, column_count, column_index = self.cuda.convert_vertical_slash_indexes(
            seqlens, v_sorted, s_sorted, n, PKG_BLOCK, PKG_BLOCK
        )
        device = v_idx.device
        rows = block_count.shape[-1]
        slot = torch.arange(block_offset.shape[-1], device=device)
        valid = (slot[None, :] < block_count[0, 0][:, None].long()).long()
        starts = block_offset[0, 0].long()
        diff = torch.zeros(rows, n + PKG_BLOCK + 1, dtype=torch.long, device=device)
        diff.scatter_add_(1, starts.clamp(0, n), valid)
        diff.scatter_add_(1, (starts + PKG_BLOCK).clamp(0, n + PKG_BLOCK), -valid)
        touched = diff.cumsum(1)[:, :n] > 0
        cslot = torch.arange(column_index.shape[-1], device=device)
        cvalid = cslot[None, :] < column_count[0, 0][:, None].long()
        cols = torch.where(cvalid, column_index[0, 0].long(), torch.full_like(column_index[0, 0].long(), n))
        extra = torch.zeros(rows, n + 1, dtype=torch.bool, device=device)
        extra.scatter_(1, cols.clamp(0, n), True)
        return touched | extra[:, :n]

    # ---- block-sparse ---------------------------------------------------------------------
    def block_sparse(self, q, k, v, topk: int) -> PkgResult:
        """``block_sparse_attention`` on repeated K/V; the hook records its block index."""
        n, group = q.shape[2], q.shape[1] // k.shape[1]
        seen = []
        original = self._hook(
            self.bsf, "_build_block_index", lambda r, a, kw: seen.append(r.detach().clone())
        )
        out, error = None, None
        try:
            out = self.bsf.block_sparse_attention(
                q.contiguous(),
                k.repeat_interleave(group, 1).contiguous(),
                v.repeat_interleave(group, 1).contiguous(),
                topk,
            )
        except Exception as err:
            if not seen:
                raise
            error = f"{type(err).__name__}: {err}"
        finally:
            self.bsf._build_block_index = original
        rows = math.ceil(n / PKG_BLOCK)
        index = seen[0].long()[:, :, :rows]  # (1, H, rows, topk): key blocks of 64 (drop the padding row)
        # the kernel visits the first min(row + 1, topk) entries of each (ascending) row
        slot = torch.arange(index.shape[-1], device=q.device)
        used = slot[None, None, None, :] < (torch.arange(rows, device=q.device)[None, None, :, None] + 1)
        blocks = torch.zeros(*index.shape[:3], rows + 2, dtype=torch.bool, device=q.device)
        blocks.scatter_(-1, torch.where(used, index.clamp(0, rows), torch.full_like(index, rows + 1)), True)
        touched = blocks[..., :rows].repeat_interleave(PKG_BLOCK, dim=-1)[..., :n]
        return PkgResult(
            out,
            rows_to_grid(touched, PKG_BLOCK, n, n),
            token_density_of_rows(touched, PKG_BLOCK, n),
            {},
            error,
        )

    # ---- A-shape --------------------------------------------------------------------------
    def a_shape(self, q, k, v, n_init: int, n_local: int) -> PkgResult:
        group = q.shape[1] // k.shape[1]
        out = self.sk.streaming_forward(
            q.contiguous(),
            k.repeat_interleave(group, 1).contiguous(),
            v.repeat_interleave(group, 1).contiguous(),
            n_init,
            n_local,
        )
        return PkgResult(out, None, None, {}, None)

    # ---- flexprefill ----------------------------------------------------------------------
    def flexprefill(
        self, q, k, v, gamma: float, tau: float, min_budget: int | None, max_budget: int | None
    ) -> PkgResult:
        """``flex_prefill_attention`` (B, N, H, D layout, ``gqa_interleave=False``, block 128); hooks
        record the active blocks and the per-head JS distances."""
        seen: dict[str, Any] = {}
        gab = self._hook(self.fp, "get_active_blocks", lambda r, a, kw: seen.__setitem__("blocks", r))
        jsd = self._hook(
            self.fp, "square_root_js_divergence", lambda r, a, kw: seen.__setitem__("js", r.detach().clone())
        )
        out, error = None, None
        try:
            out = self.fp.flex_prefill_attention(
                q.transpose(1, 2).contiguous(),
                k.transpose(1, 2).contiguous(),
                v.transpose(1, 2).contiguous(),
                gamma,
                tau,
                min_budget,
                max_budget,
                False,
                None,
                FLEX_BLOCK,
            ).transpose(1, 2)
        except Exception as err:
            if "blocks" not in seen:
                raise
            error = f"{type(err).__name__}: {err}"
        finally:
            self.fp.get_active_blocks, self.fp.square_root_js_divergence = gab, jsd
        if "blocks" not in seen:  # the package ran dense (short input)
            return PkgResult(out, None, None, {}, error)
        n, num_heads = q.shape[2], q.shape[1]
        nb = math.ceil(n / FLEX_BLOCK)
        mask128 = torch.zeros(1, num_heads, nb * nb, dtype=torch.bool, device=q.device)
        for h, idx in enumerate(seen["blocks"][0]):
            mask128[0, h, idx.long()] = True
        grid = mask128.reshape(1, num_heads, nb, nb).repeat_interleave(FLEX_BLOCK // R.BLOCK_K, dim=-1)
        grid = grid[..., : R.num_blocks(n, R.BLOCK_K)] & R.allowed_block_mask(n, n, True, device=q.device)
        extra = {"_decision": seen["js"] < tau} if "js" in seen else {}
        return PkgResult(out, grid, token_density_of_blocks(grid, n, n), extra, error)


# ============================================================================================
# settings and the per-input comparison
# ============================================================================================
@dataclass(frozen=True)
class Setting:
    method: str  # minference-vs | minference-bs | minference-ashape | flexprefill
    label: str
    params: dict

    def ours(self):
        p = self.params
        if self.method == "minference-vs":
            return MInference("vertical_slash", vertical_size=p["vertical_size"], slash_size=p["slash_size"])
        if self.method == "minference-bs":
            return MInference("block_sparse", topk=p["topk"])
        if self.method == "minference-ashape":
            return MInference("a_shape", n_init=p["n_init"], n_local=p["n_local"])
        return FlexPrefill(
            gamma=p["gamma"], tau=p["tau"], min_budget=p["min_budget"], max_budget=p["max_budget"]
        )


def _pair(text: str, names: tuple[str, str]) -> dict:
    a, sep, b = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected A:B, got {text!r}")
    return {names[0]: int(a), names[1]: int(b)}


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "") else int(text)


def settings_from_args(args) -> list[Setting]:
    out = []
    for text in args.vs:
        p = _pair(text, ("vertical_size", "slash_size"))
        out.append(Setting("minference-vs", f"vs {text}", p))
    for topk in args.bs_topk:
        out.append(Setting("minference-bs", f"bs top{topk}", {"topk": topk}))
    for text in args.a_shape:
        out.append(Setting("minference-ashape", f"a-shape {text}", _pair(text, ("n_init", "n_local"))))
    for text in args.flex:
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise SystemExit(f"--flex expects GAMMA:TAU:MIN_BUDGET[:MAX_BUDGET], got {text!r}")
        p = {
            "gamma": float(parts[0]),
            "tau": float(parts[1]),
            "min_budget": _optional_int(parts[2]),
            "max_budget": _optional_int(parts[3]) if len(parts) == 4 else None,
        }
        out.append(Setting("flexprefill", f"flex {text}", p))
    return out


def _ours(setting: Setting, x: QKV, backend: str):
    method = setting.ours()
    extra: dict[str, Any] = {}
    if isinstance(method, FlexPrefill):
        plan = method.plan(x.q, x.k, is_causal=True)
        mask = plan.mask
        extra["query_aware_ours"] = plan.query_aware.float().mean().item()
        extra["_decision"] = plan.query_aware
        extra["flex_dense"] = plan.dense
    else:
        mask = method.block_mask(x.q, x.k, is_causal=True)
    if setting.method == "minference-vs":
        extra["_lines"] = method.line_selection(x.q, x.k, is_causal=True)
    out = block_sparse_attn(x.q, x.k, x.v, mask, is_causal=True, pvthreshd=None, backend=backend)
    return mask, out, extra


def _package(pkg: MInferencePackage, setting: Setting, x: QKV) -> PkgResult:
    p = setting.params
    if setting.method == "minference-vs":
        return pkg.vertical_slash(x.q, x.k, x.v, p["vertical_size"], p["slash_size"])
    if setting.method == "minference-bs":
        return pkg.block_sparse(x.q, x.k, x.v, p["topk"])
    if setting.method == "minference-ashape":
        return pkg.a_shape(x.q, x.k, x.v, p["n_init"], p["n_local"])
    return pkg.flexprefill(x.q, x.k, x.v, p["gamma"], p["tau"], p["min_budget"], p["max_budget"])


def _available(pkg: MInferencePackage | None, setting: Setting) -> bool:
    if pkg is None:
        return False
    key = {
        "minference-vs": "vertical_slash",
        "minference-bs": "block_sparse",
        "minference-ashape": "a_shape",
        "flexprefill": "flexprefill",
    }[setting.method]
    return pkg.status()["available"][key]


def compare(
    setting: Setting, x: QKV, dense: torch.Tensor, pkg: MInferencePackage | None, backend: str
) -> dict:
    n = x.q.shape[2]
    allowed = R.allowed_block_mask(n, n, True, device=x.q.device)
    mask, out, extra = _ours(setting, x, backend)
    row: dict[str, Any] = {
        "layer": x.layer,
        "sample": x.sample,
        "method": setting.method,
        "setting": setting.label,
        "n": n,
        "heads": x.q.shape[1],
        "density_ours": bm.mask_density(mask, n, n, True),
        "token_density_ours": token_density_of_blocks(mask, n, n),
        "l1_ours_dense": rel_l1(out, dense),
    }
    row.update({k: v for k, v in extra.items() if not k.startswith("_")})
    if not _available(pkg, setting):
        return row
    try:
        res = _package(pkg, setting, x)
    except Exception as err:
        logger.exception("package %s failed", setting.label)
        row["package_error"] = f"{type(err).__name__}: {err}"
        return row
    if res.error:
        row["package_error"] = res.error
    if res.out is not None:
        row.update(l1_pkg_dense=rel_l1(res.out, dense), l1_ours_pkg=rel_l1(out, res.out))
    if res.grid is not None:
        row.update(
            density_pkg=bm.mask_density(res.grid, n, n, True),
            token_density_pkg=res.token_density,
            **mask_overlap(mask, res.grid, allowed),
        )
        on_pkg = block_sparse_attn(x.q, x.k, x.v, res.grid, is_causal=True, pvthreshd=None, backend=backend)
        row["l1_pkgmask_dense"] = rel_l1(on_pkg, dense)
        if res.out is not None:
            row["l1_ours_on_pkg_mask_vs_pkg"] = rel_l1(on_pkg, res.out)
    if "_columns" in res.extra and "_lines" in extra:
        lines = extra["_lines"]
        row["vertical_jaccard"] = set_jaccard(lines.columns, res.extra["_columns"])
        row["slash_jaccard"] = set_jaccard(lines.distances, res.extra["_distances"])
    if "_decision" in res.extra and "_decision" in extra:
        row["query_aware_pkg"] = res.extra["_decision"].float().mean().item()
        row["decision_agreement"] = (res.extra["_decision"] == extra["_decision"]).float().mean().item()
    return row


# ============================================================================================
# output
# ============================================================================================
SUMMARY_KEYS = [
    "density_ours",
    "density_pkg",
    "token_density_ours",
    "token_density_pkg",
    "mask_iou",
    "pkg_in_ours",
    "ours_in_pkg",
    "vertical_jaccard",
    "slash_jaccard",
    "query_aware_ours",
    "query_aware_pkg",
    "decision_agreement",
    "l1_ours_dense",
    "l1_pkg_dense",
    "l1_pkgmask_dense",
    "l1_ours_pkg",
    "l1_ours_on_pkg_mask_vs_pkg",
]


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for label in dict.fromkeys(r["setting"] for r in rows):
        group = [r for r in rows if r["setting"] == label]
        entry = {"setting": label, "method": group[0]["method"], "count": len(group)}
        for key in SUMMARY_KEYS:
            values = [r[key] for r in group if r.get(key) is not None]
            entry[key] = sum(values) / len(values) if values else None
        errors = [r["package_error"] for r in group if r.get("package_error")]
        entry["package_errors"] = len(errors)
        entry["first_package_error"] = errors[0] if errors else None
        out.append(entry)
    return out


TABLE_COLUMNS = [
    ("setting", "setting", 18),
    ("dens", "density_ours", 6),
    ("dens_p", "density_pkg", 6),
    ("tok", "token_density_ours", 6),
    ("tok_p", "token_density_pkg", 6),
    ("iou", "mask_iou", 6),
    ("vJ", "vertical_jaccard", 5),
    ("sJ", "slash_jaccard", 5),
    ("agree", "decision_agreement", 5),
    ("L1 ours", "l1_ours_dense", 8),
    ("L1 pkg", "l1_pkg_dense", 8),
    ("L1 pkgM", "l1_pkgmask_dense", 8),
    ("ours~pkg", "l1_ours_pkg", 8),
    ("onP~pkg", "l1_ours_on_pkg_mask_vs_pkg", 8),
    ("err", "package_errors", 3),
]


def format_table(summary: list[dict]) -> str:
    """Fixed-width summary: densities (block / token), overlaps, and relative L1 errors."""
    lines = [" ".join(f"{name:>{w}}" for name, _, w in TABLE_COLUMNS)]
    for entry in summary:
        cells = []
        for _, key, w in TABLE_COLUMNS:
            value = entry.get(key)
            if value is None:
                cells.append(f"{'-':>{w}}")
            elif isinstance(value, (str, int)):
                cells.append(f"{value:>{w}}")
            else:
                cells.append(f"{value:>{w}.4f}" if w >= 8 else f"{value:>{w}.3f}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def write_outputs(stem: Path, record: dict, rows: list[dict]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    json_path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {json_path} and {csv_path}")


# ============================================================================================
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_input_args(parser)
    s = parser.add_argument_group("settings (the same for ours and the package)")
    s.add_argument(
        "--vs", nargs="*", default=["1000:6096", "512:2048", "100:800"], help="VERTICAL:SLASH budgets"
    )
    s.add_argument(
        "--bs-topk", type=int, nargs="*", default=[100, 32], help="block-sparse top-k (64-key blocks)"
    )
    s.add_argument("--a-shape", nargs="*", default=["128:3968", "128:1024"], help="N_INIT:N_LOCAL")
    s.add_argument(
        "--flex",
        nargs="*",
        default=["0.95:0.1:1024", "0.9:0.1:none"],
        help="GAMMA:TAU:MIN_BUDGET[:MAX_BUDGET] (budgets in tokens or none)",
    )
    parser.add_argument(
        "--package",
        choices=["auto", "off", "require"],
        default="auto",
        help="run the minference package too (auto: when importable on a CUDA device)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output stem (.json and .csv are written)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    device = torch.device(args.device)
    settings = settings_from_args(args)
    pkg, pkg_status = None, {"used": False}
    if args.package != "off":
        if device.type != "cuda":
            pkg_status["reason"] = "the minference package needs a CUDA device"
        else:
            pkg = MInferencePackage()
            pkg_status = {"used": True, **pkg.status()}
            if pkg.version is None:
                pkg = None
        if args.package == "require" and (pkg is None or not all(pkg_status["available"].values())):
            raise SystemExit(f"--package require: the minference package is not usable: {pkg_status}")
    logger.info("package: %s", pkg_status)

    rows = []
    with torch.no_grad():
        for x in iter_inputs(args):
            if x.q.shape[2] != x.k.shape[2]:
                raise SystemExit("the cross-check needs Nq == Nk (prefill)")
            dense = dense_reference(x.q, x.k, x.v)
            for setting in settings:
                t0 = time.perf_counter()
                row = compare(setting, x, dense, pkg, args.backend)
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
                logger.info(
                    "L%03d S%03d %-18s dens %.3f L1 %.4f%s",
                    x.layer,
                    x.sample,
                    setting.label,
                    row["density_ours"],
                    row["l1_ours_dense"],
                    f" | pkg dens {row['density_pkg']:.3f} L1 {row.get('l1_pkg_dense', math.nan):.4f}"
                    f" iou {row['mask_iou']:.3f}"
                    if row.get("density_pkg") is not None
                    else "",
                )
            del dense
    summary = summarize(rows)
    record = {
        "suite": "crosscheck_minference",
        **run_info(device, args.backend, __file__, argv),
        "inputs": describe_inputs(args),
        "package": pkg_status,
        "settings": [s.__dict__ for s in settings],
        "summary": summary,
        "rows": rows,
    }
    print(format_table(summary))
    write_outputs(args.out or default_out("crosscheck_minference"), record, rows)
    return record


if __name__ == "__main__":
    main()
