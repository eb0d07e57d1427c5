"""Kernel benchmark: block-sparse attention vs the fastest dense kernels and FlexAttention.

For each N, D and causal setting (B=1, H=32, bf16), random block masks at the given densities
(diagonal blocks kept) and the predicted mask of ``sparge_attn``'s defaults on structured inputs,
timed in the same run:

- ``sparge``        block_sparse_attn, bf16 P.V (includes building the block index list)
- ``sparge-quant``  block_sparse_attn(quant="int8"): INT8 QK^T (+ FP8 P.V on sm89+), quantization included
- ``sparge-quant-kernel``  the same kernel on pre-quantized Q/K/V (attention alone)
- ``flex``          FlexAttention (torch.compile'd) on the same block mask, kept blocks marked full
- ``sdpa-cudnn``, ``sdpa-flash``   dense SDPA backends (density 1.0 rows; flat lines in the plot)
- ``predict``       the predictor alone (sparge_attn defaults), on structured inputs
- ``sparge-pipeline``  the whole sparge_attn (predict + quantize + attend) at topk=0.5

Times are ``triton.testing.do_bench`` medians (CUDA events, warm-up first) over rotating input
buffers. ``tops`` is dense-equivalent: 4 n^2 d heads / time, halved for causal.

    python scripts/bench_kernel.py                      # the full grid -> results/kernel/<gpu>.csv + .png
    python scripts/bench_kernel.py --n 32768 --d 128    # a subset
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_info import CsvLog, bench_ms, gpu_name, gpu_slug, versions  # noqa: E402
from sparge_core import block_sparse_attn, predict_block_mask, sparge_attn  # noqa: E402
from sparge_core.export import to_flex_block_mask  # noqa: E402
from sparge_core.ops import attention as A  # noqa: E402
from sparge_core.ops import predict as P  # noqa: E402
from sparge_core.ops import reference as R  # noqa: E402
from sparge_core.synthetic import structured_qkv  # noqa: E402

COLUMNS = ["gpu", "n", "d", "heads", "causal", "density", "method", "ms", "tops", "mask"]
ROTATE = 3


def dense_flops(n: int, d: int, heads: int, causal: bool) -> float:
    f = 4.0 * n * n * d * heads
    return f / 2 if causal else f


def random_mask(heads: int, n: int, density: float, causal: bool, gen) -> torch.Tensor:
    """Random block map with about ``density`` of the allowed pairs kept, diagonal blocks always kept."""
    nqb, nkb = R.num_blocks(n, R.BLOCK_Q), R.num_blocks(n, R.BLOCK_K)
    mask = torch.rand(1, heads, nqb, nkb, device="cuda", generator=gen) < density
    mask |= R.causal_diagonal_block_mask(n, n, R.BLOCK_Q, R.BLOCK_K, device="cuda")
    return mask & R.allowed_block_mask(n, n, causal, device="cuda")


def band_mask(heads: int, n: int, density: float, causal: bool) -> torch.Tensor:
    """Each query block keeps a contiguous band of key blocks around its diagonal (the shape real
    predicted masks often have), about ``density`` of the allowed pairs."""
    nqb, nkb = R.num_blocks(n, R.BLOCK_Q), R.num_blocks(n, R.BLOCK_K)
    width = max(1, round(density * nkb * (0.5 if causal else 1.0)))
    centre = (torch.arange(nqb, device="cuda") * R.BLOCK_Q // R.BLOCK_K)[:, None]
    cols = torch.arange(nkb, device="cuda")[None, :]
    lo = (centre - (width if causal else width // 2)).clamp(min=0)
    mask = (cols >= lo) & (cols < lo + width + (2 if causal else 0))
    mask = mask | R.causal_diagonal_block_mask(n, n, R.BLOCK_Q, R.BLOCK_K, device="cuda")
    return (mask & R.allowed_block_mask(n, n, causal, device="cuda")).expand(1, heads, -1, -1)


def measured_density(mask: torch.Tensor, n: int, causal: bool) -> float:
    allowed = R.allowed_block_mask(n, n, causal, device=mask.device)
    return (mask & allowed).sum().item() / (allowed.sum().item() * mask.shape[0] * mask.shape[1])


class Flex:
    """FlexAttention on a block map (``sparge_core.export.to_flex_block_mask``: kept blocks full, causal
    diagonal blocks partial)."""

    def __init__(self):
        from torch.nn.attention.flex_attention import flex_attention

        # every block map brings a new mask_mod closure, hence a recompile; past dynamo's default limit
        # flex would silently fall back to eager (materialising the whole score matrix)
        torch._dynamo.config.recompile_limit = 10_000
        torch._dynamo.config.accumulated_recompile_limit = 100_000
        self.fn = torch.compile(flex_attention, dynamic=False)

    @staticmethod
    def block_mask(mask: torch.Tensor, n: int, causal: bool):
        return to_flex_block_mask(mask, n, n, is_causal=causal)

    def __call__(self, q, k, v, block_mask):
        # flex's own tiles must divide the 128x64 blocks
        return self.fn(q, k, v, block_mask=block_mask, kernel_options={"BLOCK_M": R.BLOCK_Q, "BLOCK_N": R.BLOCK_K})


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name])


def run(args) -> None:
    gpu, slug = gpu_name(), gpu_slug()
    out_csv = Path(args.out or f"results/kernel/{slug}.csv")
    log = CsvLog(out_csv, COLUMNS)
    heads = args.heads
    gen = torch.Generator(device="cuda").manual_seed(0)
    flex = Flex() if "flex" in args.methods else None
    print(f"# {gpu} {versions()} heads={heads} dtype=bf16", flush=True)

    def timed(fn):
        try:
            return bench_ms(fn)
        except Exception as err:  # keep going: one failing method must not lose the rest of the run
            print(f"  failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}", flush=True)
            return None

    def record(n, d, causal, density, method, ms, kind="dense"):
        if ms is None:
            return
        tops = dense_flops(n, d, heads, causal) / (ms * 1e-3) / 1e12
        log.add(gpu=gpu, n=n, d=d, heads=heads, causal=causal, density=f"{density:.4f}", method=method,
                ms=f"{ms:.4f}", tops=f"{tops:.1f}", mask=kind)
        print(f"{n:>6} {d:>4} {str(causal):>5} {density:>6.3f} {method:<20} {ms:>9.3f} ms {tops:>7.1f} TOPS {kind}",
              flush=True)

    for n in args.n:
        for d in args.d:
            for causal in args.causal:
                t_shape = time.time()
                sets = [tuple(torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                              for _ in range(3)) for _ in range(ROTATE)]
                it = [0]

                def nxt():
                    it[0] = (it[0] + 1) % ROTATE
                    return sets[it[0]]

                for name in ("cudnn", "flash"):
                    if f"sdpa-{name}" in args.methods:
                        with sdpa_backend(name):
                            ms = timed(lambda: F.scaled_dot_product_attention(*nxt(), is_causal=causal))
                        record(n, d, causal, 1.0, f"sdpa-{name}", ms)

                # structured inputs: predictor, predicted masks, whole pipeline
                sq, sk, sv = structured_qkv(1, heads, heads, n, d, dtype=torch.bfloat16, device="cuda", seed=n + d)
                pred = predict_block_mask(sq, sk, is_causal=causal)
                masks = [("random", random_mask(heads, n, dens, causal, gen)) for dens in args.densities]
                masks.append(("band", band_mask(heads, n, 0.5, causal)))
                masks.append(("predicted", pred))
                masks = [(kind, measured_density(m, n, causal), m) for kind, m in masks]
                if "predict" in args.methods:
                    ms = timed(lambda: predict_block_mask(sq, sk, is_causal=causal))
                    record(n, d, causal, masks[-1][1], "predict", ms, "predicted")
                if "sparge-pipeline" in args.methods:
                    _, st = sparge_attn(sq, sk, sv, is_causal=causal, topk=0.5, quant="int8", return_stats=True)
                    ms = timed(lambda: sparge_attn(sq, sk, sv, is_causal=causal, topk=0.5, quant="int8"))
                    record(n, d, causal, st.density, "sparge-pipeline", ms, "predicted-topk0.5")
                    _, st = sparge_attn(sq, sk, sv, is_causal=causal, topk=0.5, quant="none", return_stats=True)
                    ms = timed(lambda: sparge_attn(sq, sk, sv, is_causal=causal, topk=0.5, quant="none"))
                    record(n, d, causal, st.density, "sparge-pipeline-bf16", ms, "predicted-topk0.5")
                del sq, sk, sv

                for kind, density, mask in masks:
                    if "sparge" in args.methods:
                        ms = timed(lambda: block_sparse_attn(*nxt(), mask, is_causal=causal, pvthreshd=None,
                                                             quant="none"))
                        record(n, d, causal, density, "sparge", ms, kind)
                    if "sparge-quant" in args.methods:
                        ms = timed(lambda: block_sparse_attn(*nxt(), mask, is_causal=causal, pvthreshd=None,
                                                             quant="int8"))
                        record(n, d, causal, density, "sparge-quant", ms, kind)
                    if "sparge-quant-kernel" in args.methods:
                        pre = []
                        for q, k, v in sets:
                            _, qi, qs = P.pool_and_similarity(q, R.BLOCK_Q, smooth=False,
                                                              quant_multiplier=d ** -0.5 * R.LOG2E)
                            _, ki, ks = P.pool_and_similarity(k, R.BLOCK_K, smooth=True, quant_multiplier=1.0)
                            pre.append((q, k, v, (qi, qs, ki, ks)))
                        j = [0]

                        def quant_kernel():
                            j[0] = (j[0] + 1) % ROTATE
                            q, k, v, qq = pre[j[0]]
                            return A.block_sparse_attn(q, k, v, mask, is_causal=causal, scale=d ** -0.5,
                                                       pvthreshd=None, quant=args.quant_variant, quantized=qq)

                        record(n, d, causal, density, "sparge-quant-kernel", timed(quant_kernel), kind)
                        del pre
                    if flex is not None:
                        bm = Flex.block_mask(mask, n, causal)
                        ms = timed(lambda: flex(*nxt(), bm))
                        record(n, d, causal, density, "flex", ms, kind)
                del sets, masks
                torch.cuda.empty_cache()
                print(f"# shape done in {time.time() - t_shape:.1f}s", flush=True)
    if args.plot:
        plot(out_csv, out_csv.with_suffix(".png"))


def plot(csv_path: Path, png_path: Path) -> None:
    """TOPS vs density per (D, causal) at the largest N, dense kernels as flat lines (paper Fig. 10)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(csv_path)))
    if not rows:
        return
    n_max = max(int(r["n"]) for r in rows)
    combos = sorted({(int(r["d"]), r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(combos), figsize=(5 * len(combos), 4), squeeze=False)
    for ax, (d, causal) in zip(axes[0], combos):
        sel = [r for r in rows if int(r["n"]) == n_max and int(r["d"]) == d and r["causal"] == causal
               and r.get("mask", "random") in ("random", "dense")]
        for method in sorted({r["method"] for r in sel}):
            pts = sorted((1 - float(r["density"]), float(r["tops"])) for r in sel if r["method"] == method)
            if method.startswith("sdpa"):
                ax.axhline(pts[0][1], linestyle="--", label=method, color="gray" if "flash" in method else "black")
            elif method not in ("predict",):
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_title(f"N={n_max} D={d} causal={causal}")
        ax.set_xlabel("sparsity (1 - density)")
        ax.set_ylabel("dense-equivalent TOPS")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(rows[0]["gpu"])
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--causal", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="+", default=[False, True])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    ap.add_argument("--methods", nargs="+", default=["sdpa-cudnn", "sdpa-flash", "sparge", "sparge-quant",
                                                     "sparge-quant-kernel", "flex", "predict", "sparge-pipeline"])
    ap.add_argument("--quant-variant", default="int8", help="kernel variant for sparge-quant-kernel")
    ap.add_argument("--out", default=None, help="CSV path (default results/kernel/<gpu>.csv)")
    ap.add_argument("--no-plot", dest="plot", action="store_false")
    ap.add_argument("--plot-only", default=None, help="only draw the plot of an existing CSV")
    args = ap.parse_args()
    if args.plot_only:
        plot(Path(args.plot_only), Path(args.plot_only).with_suffix(".png"))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_kernel.py needs a CUDA GPU (the CPU path is the Triton interpreter: not a benchmark)")
    run(args)


if __name__ == "__main__":
    main()
