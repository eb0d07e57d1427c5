"""End-to-end prefill benchmark: time to first token (TTFT) of whole models, dense SDPA vs sparge.

Parts (``--parts``, both by default):

(a) ``llama8b``: a SYSTEM BENCHMARK ON RANDOM WEIGHTS (speed only; its outputs mean nothing). A
    Llama-3.1-8B-shaped model (hidden 4096, 32 layers, 32 query / 8 KV heads, head dim 128,
    intermediate 14336, vocabulary 128256), bf16, random token ids, at 8K/32K/64K/128K tokens. Rows:
    ``dense`` (transformers' SDPA on cuDNN, flash if cuDNN refuses a shape), then ``sparge-topk`` at
    fixed top-k budgets (``--topk``, default 0.5/0.3/0.2: about 25/50/64% block sparsity under causal
    masking; simthreshd1=-1 so every block is selected by top-k alone) through
    ``apply(model, "sparge-topk", ...)`` at the executor's shipped defaults (the headline rows, named
    ``sparge-topk<k>``), and with its fastest variant (``--fast-quant``, ``--fast-pvthreshd``,
    ``--fast-backend``; rows ``sparge-topk<k>-fast``).
(b) ``smollm2``: SmolLM2-135M with the committed calibrated config (``--config``, default
    ``results/calibration/smollm2-h100.json``) on pydoc text at 2K/4K/8K: ``dense``, ``sparge-config``
    (shipped defaults) and ``sparge-config-fast``.
(c) For every row: the attention share and the ideal TTFT. Dense attention time is measured alone on
    the Q/K/V captured from the model (SDPA, the same backend; for (a) one layer times 32, all layers
    being the same shape; for (b) every layer); ``non-attention = TTFT(dense) - attention(dense)``;
    ``ideal TTFT = density * attention(dense) + non-attention`` with the row's measured block density
    (kept over allowed block pairs, all layers); ``ideal_speedup = TTFT(dense) / ideal TTFT``.

TTFT: one forward pass without KV cache (``use_cache=False``, ``logits_to_keep=1``, so the 128K x
128256 logits are never formed), CUDA events, median of ``--repeats`` (>= 3) runs after ``--warmup``
runs. With ``--whole-graph`` every row also gets a ``<row>-cudagraph`` twin: the same prefill captured
in one CUDA graph and replayed (no host work; its speed-up is over the faster of ``dense-cudagraph``,
every layer dense SDPA routed through sparge's attention interface, and ``dense-sdpa-cudagraph``,
transformers' own SDPA path, which builds a full mask under capture), which shows what the model's GPU
work alone gains where the eager rows are bound by the host (a small model).
sparge's own per-layer graphs (``apply(..., cuda_graphs=True)``, the default) replay in the headline
rows after the warm-up passes (at least 2: the first call of a length runs eagerly, the second
captures); ``--eager-rows`` adds ``<row>-eager`` twins with them off (a length seen for the first time). Attention-only times: ``triton.testing.do_bench`` medians. The block sparsity is measured in one
extra, untimed run with statistics on.

Output: ``results/e2e/<gpu-slug>.csv`` with columns ``gpu,model,n,method,sparsity,ms,speedup,
ideal_speedup`` (``sparsity`` = 1 - block density; ``speedup`` = TTFT(dense) / ms), rewritten atomically
after every row, and ``<csv>.log`` beside it with the command, the versions, and per row the attention
time and share, the ideal TTFT, the paper's sparsity (with stage 2) and the peak GPU memory.

Memory (a): 16 GB of bf16 weights; a prefill without cache keeps one layer's activations at a time
(at 128K: hidden states 1 GB, the MLP's gate/up/product 3.7 GB each, Q/K/V 1.5 GB), plus sparge's
per-layer block map, scores and index list (~0.6 GB at 128K); the peak is logged per row. No MLP
chunking is needed on a 141 GB H200; a row that runs out of memory is logged and skipped.

    python scripts/bench_e2e.py                         # both parts -> results/e2e/<gpu>.csv + .log
    python scripts/bench_e2e.py --parts llama8b --lengths 32768 65536
    python scripts/bench_e2e.py --smoke --out /tmp/e2e.csv   # CPU: tiny models, a check of the script

Without a CUDA GPU the script refuses (exit 2) unless ``--smoke`` is given: then it runs tiny random
models (tiny-llama for (a), tiny-qwen2 with a generated per-layer config for (b)) at 256/384 tokens
with the reference kernels, which checks the script, not any speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibrate.cli import HelpFormatter  # noqa: E402
from sparge_core.params import write_text_atomic  # noqa: E402

COLUMNS = ["gpu", "model", "n", "method", "sparsity", "ms", "speedup", "ideal_speedup"]
LLAMA8B_NAME = "llama3.1-8b-shape-random-weights"
LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
               rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
DEFAULT_LLAMA_LENGTHS = [8192, 32768, 65536, 131072]
DEFAULT_SMOLLM2_LENGTHS = [2048, 4096, 8192]
SMOKE_LENGTHS = [256, 384]
SMOLLM2_MAX = 8192
PARTS = ("llama8b", "smollm2")


class UsageError(ValueError):
    """A bad command line; reported before any work starts (exit 2)."""


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------
def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def gpu_slug(name: str) -> str:
    """``NVIDIA H200`` -> ``h200``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "cpu"


def versions() -> dict[str, str]:
    from evals.environment import (
        versions as base_versions,  # the git state from .tree-commit on a copied tree
    )

    return {**base_versions(extra=("transformers",)), "cudnn": str(torch.backends.cudnn.version())}


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def ttft_ms(model, ids: torch.Tensor, *, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` prefill passes after ``warmup`` (CUDA events; a wall clock on CPU)."""
    def run():
        model(ids, use_cache=False, logits_to_keep=1)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if ids.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - t0))
    return times


@torch.no_grad()
def graph_ttft_ms(model, ids: torch.Tensor, *, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` replays of the whole prefill captured in one CUDA graph (what a serving
    stack's graph runner or ``torch.compile(mode="reduce-overhead")`` does for a fixed length): no host
    work at all, so the GPU time of the model alone. ``warmup`` (at least 2) eager passes on a side
    stream come first, as capture needs. These passes keep transformers' default cache: without one,
    transformers cannot rule out packed sequences while a graph is captured and builds a full mask
    (which sends dense SDPA to a masked kernel and sparge to its padding planner)."""
    static = ids.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(2, warmup)):
            model(static, logits_to_keep=1)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(static, logits_to_keep=1)
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return times


def kernel_ms(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn()`` alone (``do_bench`` on CUDA, a wall clock on CPU)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


class SdpaBackend:
    """transformers' SDPA restricted to cuDNN first (then flash) on CUDA; a no-op on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.name = "cudnn>flash" if device.type == "cuda" else "cpu-math"

    def __call__(self):
        from contextlib import nullcontext

        if self.device.type != "cuda":
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True)


# --------------------------------------------------------------------------------------------
# models and settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One sparge row: what ``apply`` gets."""

    method: str  # the row's name in the CSV
    config: object  # apply's config (a method name, or a config path/ModelConfig)
    params: dict
    backend: str = "auto"
    quant: str = "auto"
    cuda_graphs: bool = True  # apply's per-layer graphs (False: the "-eager" rows)


def eager_twins(settings: list[Setting]) -> list[Setting]:
    """The settings followed by an ``-eager`` twin of each headline row (``apply(..., cuda_graphs=False)``:
    what a prefill at a length seen for the first time costs)."""
    out = []
    for s in settings:
        out.append(s)
        if not s.method.endswith("-fast"):
            out.append(Setting(f"{s.method}-eager", s.config, s.params, s.backend, s.quant, cuda_graphs=False))
    return out


def llama8b_model(device: torch.device, smoke: bool):
    """The random-weight Llama-3.1-8B-shaped model (bf16) or, with ``smoke``, tiny-llama (float32)."""
    if smoke:
        from calibrate.models import load_model

        model, _ = load_model("tiny-llama")
        return model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA8B)
    with torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def smollm2_model(device: torch.device, smoke: bool, config_path: Path):
    """SmolLM2 and its calibrated config (a path); with ``smoke`` tiny-qwen2 and a generated config."""
    from calibrate.data import token_windows
    from calibrate.models import load_model

    if smoke:
        from sparge_core.params import LayerConfig, ModelConfig, ModelInfo

        model, tok = load_model("tiny-qwen2")
        heads = model.config.num_attention_heads
        layers = (LayerConfig(0, (-1.0,) * heads, (50.0,) * heads, topk=(0.4,) * heads),
                  LayerConfig.dense(1, heads))
        config = ModelConfig(ModelInfo("tiny-qwen2", 2, heads, model.config.num_key_value_heads, 64), layers,
                             l1=0.1, pv_l1=0.1)
    else:
        model, tok = load_model("smollm2", device=device, dtype=torch.bfloat16)
        config = config_path

    def ids_for(n: int) -> torch.Tensor:
        if smoke:
            return torch.randint(3, 259, (1, n), generator=torch.Generator().manual_seed(n))
        return token_windows(tok, "pydoc", n, 1).input_ids.to(device)

    return model, config, ids_for


def llama_settings(topks: list[float], fast: dict) -> list[Setting]:
    rows = []
    shipped = "reference" if fast["backend"] == "reference" else "auto"  # (the smoke run: reference)
    for k in topks:
        params = dict(simthreshd1=-1.0, topk=k)
        rows.append(Setting(f"sparge-topk{k:g}", "sparge-topk", params, backend=shipped))
        rows.append(Setting(f"sparge-topk{k:g}-fast", "sparge-topk",
                            {**params, "pvthreshd": fast["pvthreshd"]}, backend=fast["backend"],
                            quant=fast["quant"]))
    return rows


def config_settings(config, fast: dict) -> list[Setting]:
    """Rows for a calibrated config; the fast variant keeps every layer's selection and sets the fast
    quant, backend and stage-2 threshold (``--fast-pvthreshd``, off by default) on all of them."""
    from sparge_core.methods.sparge import Sparge, SpargeTopk
    from sparge_core.params import ModelConfig

    loaded = config if isinstance(config, ModelConfig) else ModelConfig.load(config)
    fast_layers = {}
    for lc in loaded.layers:
        if lc.is_dense:
            fast_layers[lc.layer] = None
            continue
        kw = dict(simthreshd1=list(lc.simthreshd1), estimator=lc.estimator, pvthreshd=fast["pvthreshd"])
        fast_layers[lc.layer] = (SpargeTopk(topk=list(lc.topk), **kw) if lc.topk is not None
                                 else Sparge(cdfthreshd=list(lc.cdfthreshd), **kw))
    shipped = "reference" if fast["backend"] == "reference" else "auto"
    return [Setting("sparge-config", loaded, {}, backend=shipped),
            Setting("sparge-config-fast", fast_layers, {}, backend=fast["backend"], quant=fast["quant"])]


# --------------------------------------------------------------------------------------------
# one model at one length
# --------------------------------------------------------------------------------------------
class Report:
    """The CSV (rewritten atomically after every row) and the log."""

    def __init__(self, csv_path: Path, command: str, env: dict):
        self.csv_path = csv_path
        self.log_path = csv_path.with_suffix(".log")
        self.rows: list[dict] = []
        self.lines = [f"# {command}", f"# {json.dumps(env, sort_keys=True)}",
                      f"# part llama8b ({LLAMA8B_NAME}) is a system benchmark on random weights: speed only"]
        self._flush()

    def row(self, **row) -> None:
        self.rows.append(row)
        self._flush()

    def log(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)
        self._flush()

    def _flush(self) -> None:
        csv = [",".join(COLUMNS)] + [",".join(str(r[c]) for c in COLUMNS) for r in self.rows]
        write_text_atomic(self.csv_path, "\n".join(csv) + "\n")
        write_text_atomic(self.log_path, "\n".join(self.lines) + "\n")


def _peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@torch.no_grad()
def capture(model, ids: torch.Tensor, layers: list[int] | None) -> dict[int, tuple]:
    from sparge_core.integrations.transformers import capture_qkv

    store: dict[int, tuple] = {}

    def sink(layer, q, k, v):
        store[layer] = (q, k, v)

    with capture_qkv(model, layers, sink=sink, device=ids.device):
        model(ids, use_cache=False, logits_to_keep=1)
    return store


def attention_total_ms(layers: dict[int, tuple], run_layer, num_layers: int, device, repeats: int) -> float:
    """Attention time of the whole model: each captured layer timed alone, scaled to ``num_layers``."""
    times = [kernel_ms(lambda q=q, k=k, v=v, i=i: run_layer(i, q, k, v), device, repeats)
             for i, (q, k, v) in sorted(layers.items())]
    return sum(times) * num_layers / len(times)


def bench_length(report: Report, gpu: str, model_name: str, model, ids: torch.Tensor, settings: list[Setting],
                 *, warmup: int, repeats: int, one_layer: bool, sdpa: SdpaBackend,
                 whole_graph: bool = False) -> None:
    device, n = ids.device, ids.shape[1]
    num_layers = model.config.num_hidden_layers
    _reset_peak(device)
    with sdpa():
        dense_times = ttft_ms(model, ids, warmup=warmup, repeats=repeats)
        dense_ms = statistics.median(dense_times)
        captured = capture(model, ids, [0] if one_layer else None)

        def sdpa_layer(_i, q, k, v):
            gqa = q.shape[1] != k.shape[1]
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        attn_dense = attention_total_ms(captured, sdpa_layer, num_layers, device, repeats)
    non_attention = dense_ms - attn_dense
    report.row(gpu=gpu, model=model_name, n=n, method="dense", sparsity="0.0000", ms=f"{dense_ms:.3f}",
               speedup="1.000", ideal_speedup="1.000")
    report.log(f"{model_name} n={n} dense ({sdpa.name}): ttft {dense_ms:.3f} ms (runs "
               f"{[round(t, 3) for t in dense_times]}), attention {attn_dense:.3f} ms = "
               f"{attn_dense / dense_ms:.1%} of it, non-attention {non_attention:.3f} ms, "
               f"peak {_peak_gb(device):.1f} GB")
    if whole_graph:
        dense_graph_ms = _dense_graph_rows(report, gpu, model_name, model, ids, sdpa, attn_dense,
                                           warmup=warmup, repeats=repeats)

    for s in settings:
        _reset_peak(device)
        try:
            with sdpa():  # (the layers a config leaves dense)
                measured = _sparse_row(model, ids, s, captured, sdpa_layer, num_layers, device, warmup,
                                       repeats, whole_graph)
        except torch.cuda.OutOfMemoryError as err:
            report.log(f"{model_name} n={n} {s.method}: out of memory ({str(err).splitlines()[0][:120]}); "
                       f"skipped")
            torch.cuda.empty_cache()
            continue
        total, times, attn_sparse, graph_times = measured
        ms = statistics.median(times)
        density = 1.0 - total["qk_sparsity"]
        ideal = density * attn_dense + non_attention
        report.row(gpu=gpu, model=model_name, n=n, method=s.method, sparsity=f"{total['qk_sparsity']:.4f}",
                   ms=f"{ms:.3f}", speedup=f"{dense_ms / ms:.3f}",
                   ideal_speedup=f"{dense_ms / ideal:.3f}" if ideal > 0 else "nan")
        report.log(f"{model_name} n={n} {s.method} (backend={s.backend} quant={s.quant} {s.params or ''}): "
                   f"ttft {ms:.3f} ms (runs {[round(t, 3) for t in times]}), speedup {dense_ms / ms:.3f}, "
                   f"block sparsity {total['qk_sparsity']:.4f}, paper sparsity {total['sparsity']:.4f}, "
                   f"attention {attn_sparse:.3f} ms = {attn_sparse / ms:.1%} of the ttft, ideal ttft "
                   f"{ideal:.3f} ms (ideal speedup {dense_ms / ideal:.3f}; measured/ideal "
                   f"{ideal / ms:.1%}), peak {_peak_gb(device):.1f} GB")
        if graph_times:
            gms = statistics.median(graph_times)
            gideal = density * attn_dense + (dense_graph_ms - attn_dense)
            report.row(gpu=gpu, model=model_name, n=n, method=f"{s.method}-cudagraph",
                       sparsity=f"{total['qk_sparsity']:.4f}", ms=f"{gms:.3f}", speedup=f"{dense_graph_ms / gms:.3f}",
                       ideal_speedup=f"{dense_graph_ms / gideal:.3f}" if gideal > 0 else "nan")
            report.log(f"{model_name} n={n} {s.method}-cudagraph: ttft {gms:.3f} ms (runs "
                       f"{[round(t, 3) for t in graph_times]}), speedup over the faster dense graph "
                       f"{dense_graph_ms / gms:.3f}, ideal {dense_graph_ms / gideal:.3f}")
    del captured


def _dense_graph_rows(report, gpu: str, model_name: str, model, ids, sdpa, attn_dense: float, *,
                      warmup: int, repeats: int) -> float:
    """The two dense whole-prefill graphs, and the faster one's milliseconds (what the ``-cudagraph``
    rows are compared with). ``dense-sdpa-cudagraph``: transformers' own SDPA path, which under capture
    cannot tell that the padding mask is all ones and builds a full float mask (a masked SDPA kernel).
    ``dense-cudagraph``: every layer routed to dense SDPA through sparge's attention interface, whose
    mask builder implies the causal mask (``is_causal`` SDPA, cuDNN) as eager transformers does."""
    from sparge_core.integrations.transformers import apply, remove

    best = float("inf")
    for label, routed in (("dense-sdpa-cudagraph", False), ("dense-cudagraph", True)):
        if routed:
            apply(model, {i: None for i in range(model.config.num_hidden_layers)}, cuda_graphs=False)
        try:
            with sdpa():
                times = graph_ttft_ms(model, ids, warmup=warmup, repeats=repeats)
        finally:
            if routed:
                remove(model)
        ms = statistics.median(times)
        best = min(best, ms)
        report.row(gpu=gpu, model=model_name, n=ids.shape[1], method=label, sparsity="0.0000", ms=f"{ms:.3f}",
                   speedup="1.000", ideal_speedup="1.000")
        report.log(f"{model_name} n={ids.shape[1]} {label}: ttft {ms:.3f} ms (runs {[round(t, 3) for t in times]}), "
                   f"attention {attn_dense / ms:.1%} of it")
    return best


def _sparse_row(model, ids, s: Setting, captured, sdpa_layer, num_layers: int, device, warmup: int,
                repeats: int, whole_graph: bool = False):
    """``(sparsity totals, TTFT runs, attention-only ms, whole-graph TTFT runs or None)`` of one sparge
    setting."""
    from sparge_core.integrations.transformers import apply, remove

    handle = apply(model, s.config, backend=s.backend, quant=s.quant, collect_stats=True,
                   cuda_graphs=s.cuda_graphs, **s.params)
    try:
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)  # untimed: the block statistics
        total = handle.sparsity_report()["total"]
        handle.collect_stats = False
        handle.reset_stats()
        times = ttft_ms(model, ids, warmup=warmup, repeats=repeats)

        def sparse_layer(i, q, k, v):
            method = handle.method_for(i)
            if method is None:
                return sdpa_layer(i, q, k, v)
            return method(q, k, v, is_causal=True, backend=s.backend, quant=s.quant)

        attn_sparse = attention_total_ms(captured, sparse_layer, num_layers, device, repeats)
        graph_times = graph_ttft_ms(model, ids, warmup=warmup, repeats=repeats) if whole_graph else None
    finally:
        remove(model)
    return total, times, attn_sparse, graph_times


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def _pv(value: str):
    if value.lower() in ("none", "off"):
        return None
    try:
        x = float(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--fast-pvthreshd must be a number >= 0 or 'none', got {value!r}") from err
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"--fast-pvthreshd must be a number >= 0 or 'none', got {value!r}")
    return x


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--parts", nargs="+", default=list(PARTS), help=f"any of {list(PARTS)}")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help=f"part llama8b (default {DEFAULT_LLAMA_LENGTHS})")
    ap.add_argument("--smollm2-lengths", type=int, nargs="+", default=None,
                    help=f"part smollm2 (default {DEFAULT_SMOLLM2_LENGTHS}, at most {SMOLLM2_MAX})")
    ap.add_argument("--topk", type=float, nargs="+", default=[0.5, 0.3, 0.2], help="part llama8b budgets")
    ap.add_argument("--config", type=Path, default=ROOT / "results/calibration/smollm2-h100.json",
                    help="part smollm2: the calibrated config")
    ap.add_argument("--fast-quant", default="int8", help="the fastest variant's quant (rows *-fast)")
    ap.add_argument("--fast-pvthreshd", type=_pv, default=None, help="its stage-2 threshold ('none': off)")
    ap.add_argument("--fast-backend", default="auto", help="its backend")
    ap.add_argument("--whole-graph", action="store_true",
                    help="also rows '<row>-cudagraph': the whole prefill captured in one CUDA graph and "
                         "replayed (speed-up over the faster dense graph; CUDA only)")
    ap.add_argument("--eager-rows", action="store_true",
                    help="also rows '<row>-eager': the headline rows with apply(..., cuda_graphs=False)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (median; at least 3)")
    ap.add_argument("--out", type=Path, default=None, help="CSV path (default results/e2e/<gpu>.csv)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny models on any device, reference kernels: checks the script, measures nothing")
    args = ap.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    from sparge_core.api import BACKENDS, QUANT_MODES

    bad = [p for p in args.parts if p not in PARTS]
    if bad or not args.parts:
        raise UsageError(f"--parts takes {list(PARTS)}, got {args.parts}")
    if args.smoke:
        args.lengths = args.lengths or SMOKE_LENGTHS
        args.smollm2_lengths = args.smollm2_lengths or SMOKE_LENGTHS
    else:
        if not torch.cuda.is_available():
            raise UsageError("bench_e2e.py measures GPU prefill time and needs a CUDA GPU; on a CPU only the "
                             "check of the script runs: add --smoke")
        if args.repeats < 3:
            raise UsageError(f"--repeats must be at least 3 (the median of three runs), got {args.repeats}")
        args.lengths = args.lengths or DEFAULT_LLAMA_LENGTHS
        args.smollm2_lengths = args.smollm2_lengths or DEFAULT_SMOLLM2_LENGTHS
        if "smollm2" in args.parts and not args.config.is_file():
            raise UsageError(f"--config {args.config} does not exist (the calibrated SmolLM2 config)")
    for name, values in (("--lengths", args.lengths), ("--smollm2-lengths", args.smollm2_lengths)):
        if any(n < 1 for n in values):
            raise UsageError(f"{name} must be positive token counts, got {values}")
    if not args.smoke and any(n > SMOLLM2_MAX for n in args.smollm2_lengths):
        raise UsageError(f"--smollm2-lengths: SmolLM2's context is {SMOLLM2_MAX} tokens, "
                         f"got {args.smollm2_lengths}")
    if any(not (0 < k <= 1) for k in args.topk):
        raise UsageError(f"--topk budgets must be in (0, 1], got {args.topk}")
    if args.fast_quant not in QUANT_MODES:
        raise UsageError(f"--fast-quant must be one of {QUANT_MODES}, got {args.fast_quant!r}")
    if args.fast_backend != "auto" and args.fast_backend not in BACKENDS:
        raise UsageError(f"--fast-backend must be 'auto' or one of {BACKENDS.names()}, "
                         f"got {args.fast_backend!r}")
    if args.whole_graph and args.smoke:
        raise UsageError("--whole-graph replays CUDA graphs and cannot run with --smoke")
    if args.warmup < 0 or args.repeats < 1:
        raise UsageError("--warmup must be >= 0 and --repeats >= 1")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as err:
        print(f"bench_e2e.py: error: {err}", file=sys.stderr)
        return 2
    import sparge_core.integrations.transformers  # noqa: F401  (registers "sparge")

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    gpu = gpu_name() if device.type == "cuda" else "cpu-smoke"
    out = args.out or ROOT / "results" / "e2e" / f"{gpu_slug(gpu)}.csv"
    words = [os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)]
    command = "python " + " ".join(shlex.quote(a) for a in words)
    report = Report(out, command, {"gpu": gpu, **versions()})
    sdpa = SdpaBackend(device)
    fast = dict(quant=args.fast_quant, pvthreshd=args.fast_pvthreshd, backend=args.fast_backend)
    if args.smoke:  # the reference kernels (they simulate INT8 too, slowly: the smoke run skips it)
        fast.update(quant="none", backend="reference")
    timing = dict(warmup=0 if args.smoke else args.warmup, repeats=1 if args.smoke else args.repeats)

    if "llama8b" in args.parts:
        model = llama8b_model(device, args.smoke)
        name = "tiny-llama-smoke" if args.smoke else LLAMA8B_NAME
        settings = llama_settings(args.topk, fast)
        settings = eager_twins(settings) if args.eager_rows else settings
        vocab = model.config.vocab_size
        for n in args.lengths:
            ids = torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
            bench_length(report, gpu, name, model, ids, settings, one_layer=not args.smoke, sdpa=sdpa,
                         whole_graph=args.whole_graph, **timing)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if "smollm2" in args.parts:
        model, config, ids_for = smollm2_model(device, args.smoke, args.config)
        name = "tiny-qwen2-smoke" if args.smoke else "smollm2-135m"
        settings = config_settings(config, fast)
        settings = eager_twins(settings) if args.eager_rows else settings
        for n in args.smollm2_lengths:
            bench_length(report, gpu, name, model, ids_for(n), settings, one_layer=False, sdpa=sdpa,
                         whole_graph=args.whole_graph, **timing)
    report.log(f"# done: {len(report.rows)} rows in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
