"""Where the time of one ``sparge_attn`` call goes, at a model's attention shape (GPU).

    python scripts/profile_attention_call.py --shape smollm2 --n 8192 --out runs/profile-call.md
    python scripts/profile_attention_call.py --shape llama8b --n 8192 32768

For each variant (estimator x quantization x stage 2) it prints three numbers per call: the GPU time
(``triton.testing.do_bench`` median, launches included), the host time (wall clock per call over 50
calls queued without synchronising: when it exceeds the GPU time the call is host-bound), and the
kernels the call launches with their CUDA time (``torch.profiler``). Dense SDPA is the first row,
``sparge_attn`` at its shipped defaults the second; the named variants (simthreshd1 0.5, cdfthreshd
0.9) follow, then every sparge row again as ``graph: <row>``: the call replayed from a CUDA graph
(``sparge_core.graphs.GraphCache``, as ``apply`` runs a repeated layer call; the copies of Q/K/V into
the graph's buffers included). (The H200 tables of 2026-12-02 predate the defaults and graph rows.)
Writes the same as Markdown to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.cli import HelpFormatter  # noqa: E402
from calibrate.profile import host_ms_per_call  # noqa: E402
from sparge_core import sparge_attn  # noqa: E402
from sparge_core.atomic import write_text_atomic  # noqa: E402
from sparge_core.graphs import GraphCache  # noqa: E402

SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}  # query heads, KV heads, head dim
VARIANTS = [  # name, sparge_attn keyword arguments
    ("none/keys/pv50", dict(estimator="keys", quant="none", pvthreshd=50)),
    ("none/pooled/pv50", dict(estimator="pooled", quant="none", pvthreshd=50)),
    ("none/pooled/nopv", dict(estimator="pooled", quant="none", pvthreshd=None)),
    ("int8/pooled/pv50", dict(estimator="pooled", quant="int8", pvthreshd=50)),
    ("int8/pooled/nopv", dict(estimator="pooled", quant="int8", pvthreshd=None)),
    ("int8/keys/pv50", dict(estimator="keys", quant="int8", pvthreshd=50)),
]


def kernels(fn, top: int) -> list[tuple[str, float, int]]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            rows.append((ev.key[:70], t / 5 / 1e3, ev.count // 5))
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--n", type=int, nargs="+", default=[8192])
    ap.add_argument("--causal", type=int, choices=[0, 1], default=1)
    ap.add_argument("--top", type=int, default=8, help="kernels listed per variant")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    import triton.testing

    hq, hkv, d = SHAPES[a.shape]
    lines = [f"# one attention call: {a.shape} shape (Hq {hq}, Hkv {hkv}, D {d}), causal={bool(a.causal)}, "
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}",
             f"# python scripts/profile_attention_call.py {' '.join(sys.argv[1:])}", ""]
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in a.n:
        q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        causal = bool(a.causal)
        sparge_calls = [("sparge_attn defaults", lambda q, k, v: sparge_attn(q, k, v, is_causal=causal))]
        # (the headline row above: the public API with every argument at its shipped default)
        for name, kw in VARIANTS:
            sparge_calls.append((name, lambda q, k, v, kw=kw: sparge_attn(q, k, v, is_causal=causal, simthreshd1=0.5,
                                                                          cdfthreshd=0.9, **kw)))
        calls = [("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True))]
        calls += [(name, lambda fn=fn: fn(q, k, v)) for name, fn in sparge_calls]
        # the same calls replayed from a CUDA graph (sparge_core.graphs, as apply() runs a repeated layer)
        graphs = GraphCache()
        calls += [(f"graph: {name}", lambda name=name, fn=fn: graphs.run(name, fn, (q, k, v)))
                  for name, fn in sparge_calls]
        lines += [f"## N = {n}", "", "| variant | GPU ms | host ms/call | kernels (ms per call, launches) |",
                  "| --- | --- | --- | --- |"]
        for name, fn in calls:
            for _ in range(3):
                fn()
            gpu = float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
            host = host_ms_per_call(fn, calls=50, repeats=1)
            ks = "; ".join(f"{kname} {t:.3f} x{c}" for kname, t, c in kernels(fn, a.top))
            lines.append(f"| {name} | {gpu:.3f} | {host:.3f} | {ks} |")
            print(lines[-1], flush=True)
        lines.append("")
    text = "\n".join(lines) + "\n"
    if a.out:
        write_text_atomic(a.out, text)
    print(text)


if __name__ == "__main__":
    main()
