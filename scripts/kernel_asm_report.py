"""Compile the attention kernel's variants for a GPU target without a GPU and report their shape.

For every ``KernelConfig`` variant (``pv_check`` x ``tile_loads`` x warps x stages) and each requested
head dim / quantization, Triton compiles the kernel for the target (default sm90, Hopper) on the host
and this script reads what the compiler made of it: shared memory, registers and spills (from the
cubin, ``cuobjdump --dump-resource-usage``), and counts in the PTX of the instructions that decide
speed on Hopper: ``wgmma.mma_async`` (tensor cores), ``wgmma.wait_group`` (how often the warps wait
for them), ``cp.async.bulk.tensor`` (TMA copies), ``cp.async`` (pointer-path async copies),
``bar.sync`` (block-wide barriers) and plain ``ld.global`` of tiles in the loop. Also, from the TTGIR,
whether a ``tt.load`` or a ``warp_group_dot`` sits inside an ``scf.if`` (a load the software pipeline
cannot prefetch; a tensor-core op it cannot keep in flight).

No timing: this shows *why* a variant might be slow (or fails to compile: out of shared memory) before
a GPU is at hand; ``scripts/tune_kernel.py`` measures.

    python scripts/kernel_asm_report.py                       # D 64/128, bf16 and int8, every variant
    python scripts/kernel_asm_report.py --d 128 --quant none --out report.csv --keep-asm asm/
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from calibrate.cli import HelpFormatter  # noqa: E402
from sparge_core.atomic import write_text_atomic  # noqa: E402
from sparge_core.ops import attention as A  # noqa: E402
from sparge_core.ops.blocks import BLOCK_K, BLOCK_Q  # noqa: E402

COLUMNS = ["target", "d", "quant", "pv", "config", "ok", "shared_bytes", "regs", "stack_bytes",
           "sass_spill_ops",
           "wgmma", "wgmma_wait", "tma_copies", "cp_async", "bar_sync", "loads_in_if", "dots_in_if",
           "compile_s", "error"]

SHOWN = ("shared_bytes", "regs", "stack_bytes", "sass_spill_ops", "wgmma_wait", "tma_copies", "cp_async",
         "bar_sync", "loads_in_if", "dots_in_if")
PTX_COUNTS = {
    "wgmma": r"wgmma\.mma_async",
    "wgmma_wait": r"wgmma\.wait_group",
    "tma_copies": r"cp\.async\.bulk\.tensor",
    "cp_async": r"cp\.async\.(?:ca|cg)",
    "bar_sync": r"\bbar\.sync\b|\bbarrier\.sync\b",
}


def _signature(d: int, quant: str, cfg: A.KernelConfig, pv: bool):
    fn = A._sparge_attn_fwd_kernel
    d_pad = max(16, triton.next_power_of_2(d))
    in_ty = "i8" if quant != "none" else "bf16"
    v_ty = "fp8e4nv" if quant == "int8-fp8" else "bf16"
    qk_dim = d_pad if quant != "none" else d
    desc = cfg.tile_loads == "descriptor"
    v_desc = desc and not (pv and cfg.pv_check == "prefetch")  # as the launcher decides
    ptr = {"Q": f"*{in_ty}", "K": f"*{in_ty}", "V": f"*{v_ty}", "OUT": "*bf16", "Q_SCALE": "*fp32",
           "K_SCALE": "*fp32", "V_SCALE": "*fp32", "LUT": "*i32", "COUNT": "*i32", "NLOW": "*i32",
           "NFULL": "*i32", "PV_THRESH": "*fp32", "PV_COUNT": "*i32"}
    if desc:
        ptr["K"] = f"tensordesc<{in_ty}[1, 1, {BLOCK_K}, {d_pad}]>"
    if v_desc:
        vblock = f"[1, 1, {d_pad}, {BLOCK_K}]" if quant == "int8-fp8" else f"[1, 1, {BLOCK_K}, {d_pad}]"
        ptr["V"] = f"tensordesc<{v_ty}{vblock}>"
    const = dict(HEAD_DIM=d, QK_DIM=qk_dim, D_PAD=d_pad, BLOCK_M=BLOCK_Q, BLOCK_N=BLOCK_K, IS_CAUSAL=False,
                 HAS_WINDOW=False, PV_SKIP=pv, PV_CHECK=A.PV_CHECKS.index(cfg.pv_check),
                 QUANT_QK=quant != "none", FP8_PV=quant == "int8-fp8", UPCAST_QK=False, UPCAST_PV=False,
                 EVEN_QK=qk_dim == d_pad,
                 EVEN_V=d == d_pad, DESC=desc, V_DESC=v_desc)
    sig, consts, attrs = {}, dict(const), {}
    for i, name in enumerate(fn.arg_names):
        if name in ptr:
            sig[name] = ptr[name]
            if not ptr[name].startswith("tensordesc"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in const:
            sig[name] = "constexpr"
        elif name == "qk_scale":
            sig[name] = "fp32"
        elif name.startswith("stride") and name.endswith("d"):  # unit channel strides, as the launcher sees
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, sig, consts, attrs)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True).stdout


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack frame (spilled registers live there) from the cubin, and the number of local
    loads/stores (``LDL``/``STL``: spill traffic) in its SASS."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    out = {}
    for key, pat in (("regs", r"REG:(\d+)"), ("stack_bytes", r"STACK:(\d+)")):
        m = re.search(pat, text)
        if m:
            out[key] = int(m.group(1))
    out["sass_spill_ops"] = len(re.findall(r"\b(?:LDL|STL)\b", _cuobjdump(cubin, "--dump-sass")))
    return out


def _ops_in_if(ttgir: str) -> tuple[int, int]:
    """Count ``tt.load`` of tiles and ``warp_group_dot`` nested inside ``scf.if`` regions of the TTGIR."""
    depth_stack, loads, dots = [], 0, 0
    for line in ttgir.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        while depth_stack and indent <= depth_stack[-1] and stripped.startswith("}"):
            depth_stack.pop()
            break
        if "scf.if" in stripped and stripped.endswith("{"):
            depth_stack.append(indent)
        elif depth_stack:
            if re.search(r"= tt\.load .*tensor<\d+x\d+", stripped):
                loads += 1
            if "warp_group_dot " in stripped or "ttng.warp_group_dot %" in stripped:
                dots += 1
    return loads, dots


def compile_variant(d: int, quant: str, cfg: A.KernelConfig, pv: bool, arch: int, keep: Path | None) -> dict:
    row = dict(target=f"sm{arch}", d=d, quant=quant, pv=pv, config=cfg.name)
    t0 = time.time()
    try:
        kernel = triton.compile(_signature(d, quant, cfg, pv), target=GPUTarget("cuda", arch, 32),
                                options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    except Exception as err:  # out of shared memory, an unsupported layout: record and go on
        row.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}",
                   compile_s=f"{time.time() - t0:.1f}")
        return row
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    row.update(ok=True, compile_s=f"{time.time() - t0:.1f}", shared_bytes=kernel.metadata.shared, error="")
    row.update({k: len(re.findall(p, ptx)) for k, p in PTX_COUNTS.items()})
    usage = _resource_usage(kernel.asm["cubin"])
    row.update({k: usage.get(k, "") for k in ("regs", "stack_bytes", "sass_spill_ops")})
    row["loads_in_if"], row["dots_in_if"] = _ops_in_if(ttgir)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        stem = f"sm{arch}-d{d}-{quant}-pv{int(pv)}-{cfg.name}"
        for ext in ("ttgir", "ptx"):
            write_text_atomic(keep / f"{stem}.{ext}", kernel.asm[ext])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = Hopper)")
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--quant", nargs="+", default=["none", "int8"], choices=["none", "int8", "int8-fp8"])
    ap.add_argument("--pv-check", nargs="+", default=list(A.PV_CHECKS), choices=A.PV_CHECKS)
    ap.add_argument("--tile-loads", nargs="+", default=list(A.TILE_LOADS), choices=A.TILE_LOADS)
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--out", default=None, help="CSV path (default: print only)")
    ap.add_argument("--keep-asm", default=None, help="folder for the TTGIR and PTX of every variant")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("kernel_asm_report.py compiles for a GPU target: unset TRITON_INTERPRET")
    keep = Path(args.keep_asm) if args.keep_asm else None
    rows = []
    print(f"# triton {triton.__version__}, target sm{args.arch}", flush=True)
    for d, quant in itertools.product(args.d, args.quant):
        # the stage-2-off kernel is the baseline each pv_check variant is compared against
        base = [(A.KernelConfig(w, s, "select", t), False)
                for w, s, t in itertools.product(args.warps, args.stages, args.tile_loads)]
        grid = itertools.product(args.warps, args.stages, args.pv_check, args.tile_loads)
        variants = [(A.KernelConfig(w, s, p, t), True) for w, s, p, t in grid]
        for cfg, pv in base + variants:
            row = compile_variant(d, quant, cfg, pv, args.arch, keep)
            rows.append(row)
            shown = {k: row.get(k, "") for k in SHOWN}
            print(f"d={d:<3} {quant:<8} pv={int(pv)} {cfg.name:<26} "
                  + ("ok   " + " ".join(f"{k}={v}" for k, v in shown.items()) if row["ok"]
                     else f"FAIL {row['error']}"),
                  flush=True)
    if args.out:
        text = io.StringIO()
        w = csv.DictWriter(text, COLUMNS)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in COLUMNS} for r in rows)
        write_text_atomic(Path(args.out), text.getvalue())


if __name__ == "__main__":
    main()
