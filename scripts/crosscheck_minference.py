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
is set, else ``runs/rivals/crosscheck_minference``.

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
import io
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from calibrate.cli import HelpFormatter  # noqa: E402
from evals.minference_package import (  # noqa: E402
    MInferencePackage,
    PkgResult,
    mask_overlap,
    set_jaccard,
    token_density_of_blocks,
)
from evals.rivals import (  # noqa: E402
    QKV,
    add_input_args,
    default_out,
    dense_reference,
    describe_inputs,
    iter_inputs,
    rel_l1,
    run_info,
)
from sparge_core import block_sparse_attn  # noqa: E402
from sparge_core.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from sparge_core.methods import _blockmaps as bm  # noqa: E402
from sparge_core.methods.flexprefill import FlexPrefill  # noqa: E402
from sparge_core.methods.minference import MInference  # noqa: E402
from sparge_core.ops import reference as R  # noqa: E402

logger = logging.getLogger("crosscheck_minference")


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


def rows_csv(rows: list[dict]) -> str:
    """The rows as CSV text (columns: every key that occurs, in first-seen order)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_outputs(stem: Path, record: dict, rows: list[dict]) -> None:
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    write_json_atomic(json_path, record, default=str)
    write_text_atomic(csv_path, rows_csv(rows))
    print(f"wrote {json_path} and {csv_path}")


# ============================================================================================
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=HelpFormatter
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
