"""Kernel variant sweep on a GPU: every ``KernelConfig`` (num_warps x num_stages x pv_check x
tile_loads) for bf16 P.V and INT8 QK^T, stage 2 off and on, D 64/128, causal or not, dense and sparse
random maps, in one run.

Rows (CSV ``results/kernel/tune-<gpu>.csv``):
- ``pv=off``: ``pvthreshd=None`` (the exact kernel; pv_check does not apply, one row per tile_loads);
- ``pv=50``: stage 2 on at the shipped default threshold, which on these inputs skips (almost)
  nothing: the cost of the decision alone, to hold against the pv=off row of the same config;
- ``pv=4``: on ``structured_qkv`` inputs (local attention and sinks, as real layers) at a low
  threshold that skips a large share of blocks: what each stage-2 shape buys when it does skip
  (the ``pv_skip`` column says how much was skipped).
Inputs are pre-quantized for the INT8 rows, so the rows time the attention kernel alone.

Compilation dominates a sweep this wide (several hundred specializations). ``--compile-workers N``
first compiles every variant in N spawned processes (they fill Triton's on-disk cache, each running
every one of its variants once at the real shapes), so the timing pass only loads binaries.

At the end a summary: per (N, D, quant, causal) the fastest config with stage 2 off, the fastest with
stage 2 on at pv=50, and the ratio of the best pv=50 config to the best pv=off one (target <= 1.05),
plus the same ratio for each pv_check. ``--recommend`` prints a ``default_kernel_config`` choice.

    python scripts/tune_kernel.py --compile-workers 12          # the full sweep
    python scripts/tune_kernel.py --n 8192 --d 128 --quant none --warps 8 --stages 2
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibrate.cli import HelpFormatter  # noqa: E402
from evals.environment import CsvLog, bench_ms, gpu_name, gpu_slug, versions  # noqa: E402
from sparge_core.ops import attention as A  # noqa: E402
from sparge_core.ops import predict as P  # noqa: E402
from sparge_core.ops import reference as R  # noqa: E402
from sparge_core.synthetic import structured_qkv  # noqa: E402

COLUMNS = ["gpu", "n", "d", "heads", "causal", "density", "quant", "pv", "pv_check", "tile_loads",
           "num_warps", "num_stages", "config", "ms", "tops", "pv_skip"]
PV_DEFAULT = 50.0  # the shipped pvthreshd
PV_LOW = 4.0  # low enough that structured inputs skip a large share of blocks


@dataclass(frozen=True)
class Case:
    """One timed call: a shape, a map, a quantization, a stage-2 setting and a kernel config."""

    n: int
    d: int
    causal: bool
    density: float
    quant: str
    pv: float | None
    cfg: A.KernelConfig
    structured: bool = False


def cases(args) -> list[Case]:
    out = []
    for n, d, quant, causal in itertools.product(args.n, args.d, args.quant, args.causal):
        launch = list(itertools.product(args.warps, args.stages))
        for density in args.densities:
            for (w, s), tl in itertools.product(launch, args.tile_loads):
                out.append(Case(n, d, causal, density, quant, None, A.KernelConfig(w, s, "select", tl)))
                for pv_check in args.pv_check:
                    cfg = A.KernelConfig(w, s, pv_check, tl)
                    out.append(Case(n, d, causal, density, quant, PV_DEFAULT, cfg))
        if args.skip_heavy:
            for (w, s), tl, pv_check in itertools.product(launch, args.tile_loads, args.pv_check):
                out.append(Case(n, d, causal, 1.0, quant, PV_LOW, A.KernelConfig(w, s, pv_check, tl), True))
            for (w, s), tl in itertools.product(launch, args.tile_loads):
                out.append(Case(n, d, causal, 1.0, quant, None, A.KernelConfig(w, s, "select", tl), True))
    return sorted(out, key=lambda c: (c.n, c.d, c.structured))  # stable: inputs are built once per shape


class Inputs:
    """Inputs per (n, d, structured), built once and reused by every case of that shape."""

    def __init__(self, heads: int, seed: int = 0):
        self.heads = heads
        self.seed = seed
        self._key = None
        self._val = None

    def get(self, n: int, d: int, structured: bool):
        key = (n, d, structured)
        if key != self._key:
            self._val = None
            torch.cuda.empty_cache()
            if structured:
                q, k, v = structured_qkv(1, self.heads, self.heads, n, d, dtype=torch.bfloat16, device="cuda",
                                         seed=self.seed + n + d)
            else:
                g = torch.Generator(device="cuda").manual_seed(self.seed + n + d)
                q, k, v = (torch.randn(1, self.heads, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
                           for _ in range(3))
            scale = d ** -0.5
            _, qi, qs = P.pool_and_similarity(q, R.BLOCK_Q, smooth=False, quant_multiplier=scale * R.LOG2E)
            _, ki, ks = P.pool_and_similarity(k, R.BLOCK_K, smooth=True, quant_multiplier=1.0)
            self._key, self._val = key, (q, k, v, (qi, qs, ki, ks), {})
        return self._val

    def mask(self, n: int, density: float, causal: bool):
        q, k, v, quantized, masks = self._val
        if density not in masks:
            g = torch.Generator(device="cuda").manual_seed(self.seed + int(density * 1000))
            nqb, nkb = R.num_blocks(n, R.BLOCK_Q), R.num_blocks(n, R.BLOCK_K)
            m = torch.rand(1, self.heads, nqb, nkb, device="cuda", generator=g) < density
            masks[density] = m | R.causal_diagonal_block_mask(n, n, R.BLOCK_Q, R.BLOCK_K, device="cuda")
        return masks[density]


def call(case: Case, inputs: Inputs):
    q, k, v, quantized, _ = inputs.get(case.n, case.d, case.structured)
    mask = inputs.mask(case.n, case.density, case.causal)
    pv = None if case.pv is None else torch.full((inputs.heads,), case.pv, device="cuda")

    def fn():
        return A.block_sparse_attn(q, k, v, mask, is_causal=case.causal, scale=case.d ** -0.5, pvthreshd=pv,
                                   quant=case.quant, quantized=None if case.quant == "none" else quantized,
                                   config=case.cfg)

    return fn


def _compile_worker(job):
    """Run each case once (compiles it into Triton's on-disk cache); returns the failures."""
    heads, chunk = job
    inputs = Inputs(heads)
    failed = []
    for case in chunk:
        try:
            call(case, inputs)()
        except Exception as err:  # out of resources: the timing pass records it too
            failed.append((case, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"))
    torch.cuda.synchronize()
    return failed


def precompile(all_cases: list[Case], heads: int, workers: int) -> None:
    # one representative per specialization: the map and threshold values do not change the binary
    unique = {}
    for c in all_cases:
        unique.setdefault((c.n, c.d, c.causal, c.quant, c.pv is None, c.cfg), c)
    todo = sorted(unique.values(), key=lambda c: (c.n, c.d, c.structured))  # few input shapes per worker
    chunks = [todo[i::workers] for i in range(workers)]
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        parts = pool.map(_compile_worker, [(heads, ch) for ch in chunks if ch])
    failures = [f for part in parts for f in part]
    print(f"# compiled {len(todo)} specializations in {time.time() - t0:.0f}s with {workers} workers "
          f"({len(failures)} failed)", flush=True)


def summarise(rows: list[dict]) -> None:
    from collections import defaultdict

    groups = defaultdict(list)
    for r in rows:
        if r["density"] == 1.0 and r["pv"] in ("off", "50") and not r["structured"]:
            groups[(r["n"], r["d"], r["quant"], r["causal"])].append(r)
    print("\n# stage-2 cost at density 1 (best pv=50 config / best pv=off config; target <= 1.05)")
    print(f"{'n':>6} {'d':>4} {'quant':<6} {'causal':<6} {'best off':<28} {'ms':>8} {'best pv=50':<28} "
          f"{'ms':>8} {'ratio':>6}  per pv_check")
    for key, rs in sorted(groups.items()):
        off = [r for r in rs if r["pv"] == "off"]
        on = [r for r in rs if r["pv"] == "50"]
        if not off or not on:
            continue
        b_off = min(off, key=lambda r: r["ms"])
        b_on = min(on, key=lambda r: r["ms"])
        per = []
        for pv_check in A.PV_CHECKS:
            sel = [r for r in on if r["pv_check"] == pv_check]
            if sel:
                per.append(f"{pv_check} {min(r['ms'] for r in sel) / b_off['ms']:.3f}")
        print(f"{key[0]:>6} {key[1]:>4} {key[2]:<6} {str(key[3]):<6} {b_off['config']:<28} "
              f"{b_off['ms']:>8.3f} {b_on['config']:<28} {b_on['ms']:>8.3f} "
              f"{b_on['ms'] / b_off['ms']:>6.3f}  " + ", ".join(per))
    skip = defaultdict(list)
    for r in rows:
        if r["structured"]:
            skip[(r["n"], r["d"], r["quant"], r["causal"])].append(r)
    if skip:
        print("\n# structured inputs, pv=4 (skips) vs pv=off: best time per pv_check / best pv=off")
        for key, rs in sorted(skip.items()):
            off = [r["ms"] for r in rs if r["pv"] == "off"]
            if not off:
                continue
            parts = []
            for pv_check in A.PV_CHECKS:
                sel = [r for r in rs if r["pv"] == "4" and r["pv_check"] == pv_check]
                if sel:
                    best = min(sel, key=lambda r: r["ms"])
                    parts.append(f"{pv_check} {best['ms'] / min(off):.3f} (skip {best['pv_skip']:.2f})")
            print(f"{key[0]:>6} {key[1]:>4} {key[2]:<6} {str(key[3]):<6} " + ", ".join(parts))


def recommend(rows: list[dict]) -> None:
    """The config with the lowest summed time per (d, quant), over the stage-2-on rows at pv=50 (what
    the shipped defaults run), and the best pv=off config next to it."""
    from collections import defaultdict

    total = defaultdict(lambda: defaultdict(float))
    count = defaultdict(lambda: defaultdict(int))
    for r in rows:
        if r["structured"] or r["pv"] not in ("off", "50"):
            continue
        key = (r["d"], r["quant"], r["pv"])
        total[key][r["config"]] += r["ms"]
        count[key][r["config"]] += 1
    print("\n# recommended configs (lowest total time over every N, causal setting and density)")
    for key in sorted(total):
        full = max(count[key].values())
        ok = {c: t for c, t in total[key].items() if count[key][c] == full}  # configs that ran everywhere
        best = min(ok, key=ok.get)
        print(f"d={key[0]} quant={key[1]} pv={key[2]}: {best} (total {ok[best]:.2f} ms over {full} rows)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[32768])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--causal", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="+",
                    default=[False, True])
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--quant", nargs="+", default=["none", "int8"], choices=["none", "int8", "int8-fp8"])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--pv-check", nargs="+", default=list(A.PV_CHECKS), choices=A.PV_CHECKS)
    ap.add_argument("--tile-loads", nargs="+", default=list(A.TILE_LOADS), choices=A.TILE_LOADS)
    ap.add_argument("--no-skip-heavy", dest="skip_heavy", action="store_false",
                    help="leave out the structured-input rows at pvthreshd=4")
    ap.add_argument("--compile-workers", type=int, default=0,
                    help="compile every variant first in N processes")
    ap.add_argument("--recommend", action="store_true", help="print default_kernel_config choices at the end")
    ap.add_argument("--out", default=None, help="CSV path (default results/kernel/tune-<gpu>.csv)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_kernel.py needs a CUDA GPU")
    bad = [d for d in args.d if d > 256 or d < 1]
    if bad:
        sys.exit(f"--d must be in 1..256, got {bad}")
    all_cases = cases(args)
    print(f"# {gpu_name()} {versions()} heads={args.heads}: {len(all_cases)} timed cases", flush=True)
    if args.compile_workers > 0:
        precompile(all_cases, args.heads, args.compile_workers)
    log = CsvLog(args.out or f"results/kernel/tune-{gpu_slug()}.csv", COLUMNS)
    gpu = gpu_name()
    inputs = Inputs(args.heads)
    rows = []
    t0 = time.time()
    for i, case in enumerate(all_cases):
        fn = call(case, inputs)
        try:
            _, counts = fn()
            ms = bench_ms(fn)
        except Exception as err:  # an out-of-resources config: record and go on
            print(f"  {case.cfg.name} d={case.d} {case.quant}: failed ({type(err).__name__}: "
                  f"{str(err)[:100]})")
            continue
        flops = 4.0 * case.n * case.n * case.d * args.heads / (2 if case.causal else 1)
        skip = (counts.pv_skipped.sum() / counts.computed.sum().clamp(min=1)).item()
        pv = "off" if case.pv is None else f"{case.pv:g}"
        row = dict(gpu=gpu, n=case.n, d=case.d, heads=args.heads, causal=case.causal, density=case.density,
                   quant=case.quant, pv=pv, pv_check=case.cfg.pv_check if case.pv is not None else "",
                   tile_loads=case.cfg.tile_loads, num_warps=case.cfg.num_warps,
                   num_stages=case.cfg.num_stages,
                   config=case.cfg.name, ms=ms, tops=flops / (ms * 1e-3) / 1e12, pv_skip=skip,
                   structured=case.structured)
        rows.append(row)
        log.add(**{**{c: row[c] for c in row if c in COLUMNS}, "ms": f"{ms:.4f}", "tops": f"{row['tops']:.1f}", "pv_skip": f"{skip:.4f}",
                   "density": "structured" if case.structured else case.density})
        if i % 25 == 0:
            print(f"  [{i}/{len(all_cases)}, {time.time() - t0:.0f}s] n={case.n} d={case.d} {case.quant} "
                  f"causal={case.causal} dens={case.density} pv={pv} {case.cfg.name}: {ms:.3f} ms",
                  flush=True)
    summarise(rows)
    if args.recommend:
        recommend(rows)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
