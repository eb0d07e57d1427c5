"""Public functions: ``sparge_attn``, ``predict_block_mask``, ``block_sparse_attn``.

Backends are a string registry: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``),
``"reference"`` (plain PyTorch, float32), ``"fa4"`` (FlashAttention-4's block-sparse kernel, optional
extra ``sparge[fa4]``, sm90, exact attention only) and ``"auto"`` (FA4 when installed, on sm90, for an
exact call: ``pvthreshd=None``, no quantization, no window; otherwise Triton on CUDA, the reference
on CPU). ``resolve_backend`` is the one place that chooses.

The hot path does no host synchronisation: arguments are checked in plain Python (hyperparameters
given as numbers or lists, or pre-validated ``validation.PerHead`` values as the methods hold them),
the per-head values reach the device through a by-value cache, and block counts stay on the device
until a ``SparsityStats`` figure is read. Under ``torch.compile`` each public function is one opaque
``torch.ops.sparge.*`` custom op (``sparge_core.library``), so ``fullgraph=True`` traces a model with
sparge applied; eager calls skip the dispatcher.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from . import validation
from .ops import attention as triton_attention
from .ops import fa4, reference
from .ops import predict as triton_predict
from .ops.blocks import BLOCK_K, BLOCK_Q, LOG2E, BlockCounts
from .registry import Registry
from .stats import SparsityStats

logger = logging.getLogger(__name__)

DEFAULT_SIMTHRESHD1 = 0.6
DEFAULT_CDFTHRESHD = 0.98
# Stage 2 (the PV skip) is off unless asked for: on an H200 (results/kernel/tune-h200.csv, N=32K) the
# decision costs 17-41% at density 1 in every code shape and at best breaks even when it skips ~45% of
# the kept blocks. A calibrated config or an explicit ``pvthreshd`` still turns it on per head.
DEFAULT_PVTHRESHD = None
QUANT_MODES = ("auto", "int8", "int8-fp8", "none")
# What quant="auto" means on a CUDA GPU. "none" until the quantized path meets its accuracy bound
# on real data (see results/kernel/); the CPU paths never quantize under "auto".
AUTO_QUANT_ON_CUDA = "none"


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """How one backend predicts a block map and runs block-sparse attention.

    ``predict(q, k, *, is_causal, scale, simthreshd1, cdfthreshd, topk, estimator, window, local_blocks) -> mask``
    and
    ``attend(q, k, v, mask, *, is_causal, scale, pvthreshd, quant, window=None, prepared=None) -> (out,
    BlockCounts)`` take validated inputs with per-head hyperparameters as device tensors (simthreshd1
    and pvthreshd float32, the cdfthreshd/topk budget float64). ``predict_prepared`` (optional, same
    arguments plus ``quant_multiplier``, None without quantization) returns ``(mask, prepared)``: what
    the predictor's own launches leave for the attention launch of the same call (for Triton a
    ``predict.PreparedCall``: the INT8 Q and K from its passes over them, the map's index lists from its
    selection launch), which ``attend`` then takes as ``prepared``; a backend without it is given
    ``prepared=None`` and computes those itself.
    """

    name: str
    predict: Callable[..., torch.Tensor]
    attend: Callable[..., tuple[torch.Tensor, BlockCounts]]
    predict_prepared: Callable[..., tuple[torch.Tensor, object]] | None = None


def _reference_predict(q, k, **kw) -> torch.Tensor:
    return reference.predict_block_mask(q, k, dtype=torch.float32, **kw)


def _reference_attend(q, k, v, mask, *, is_causal, scale, pvthreshd, quant, window=None, prepared=None):
    if quant != "none":  # simulate INT8 QK^T: attention on the de-quantized Q and smoothed K
        qk_scale = scale * LOG2E
        q_i8, q_s = reference.quantize_per_block(q, BLOCK_Q, multiplier=qk_scale)
        k_i8, k_s = reference.quantize_per_block(reference.smooth_k(k.float()), BLOCK_K)
        q = reference.dequantize_per_block(q_i8, q_s, BLOCK_Q) / qk_scale
        k = reference.dequantize_per_block(k_i8, k_s, BLOCK_K)
    out, counts = reference.masked_attention(
        q, k, v, mask, is_causal=is_causal, scale=scale, pvthreshd=pvthreshd, dtype=torch.float32, window=window
    )
    return out.to(v.dtype), counts


BACKENDS: Registry[Backend] = Registry("backend")
BACKENDS.add("reference", Backend("reference", _reference_predict, _reference_attend))
BACKENDS.add("triton", Backend("triton", triton_predict.predict_block_mask, triton_attention.attend,
                               predict_prepared=triton_predict.predict_and_prepare))
BACKENDS.add("fa4", Backend("fa4", triton_predict.predict_block_mask, fa4.attend))


def resolve_backend(backend: str, device: torch.device, *, fa4_ok: bool = False) -> Backend:
    """The backend object for a name (``"auto"``: FA4 when ``fa4_ok`` (see ``fa4.auto_eligible``),
    else Triton on CUDA, the reference elsewhere)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        if device.type == "cuda" and fa4_ok:
            return BACKENDS.get("fa4")
        return BACKENDS.get("triton" if device.type == "cuda" else "reference")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {['auto', *BACKENDS.names()]}")
    return BACKENDS.get(backend)


def resolve_quant(quant: str, device: torch.device) -> str:
    """Kernel quantization variant for a public ``quant`` value on a device.

    "int8": per-block INT8 Q/K (QK^T in INT8), P.V in the input's 16-bit type.
    "int8-fp8": INT8 QK^T and FP8 e4m3 P.V (GPUs with FP8, sm89+). Measured on an H100 it adds about
      0.025 relative L1 on Gaussian inputs (FP8 P alone), so it is never chosen automatically.
    "none": no quantization. "auto": ``AUTO_QUANT_ON_CUDA`` on CUDA, "none" elsewhere.
    """
    validation.check_choice("quant", quant, QUANT_MODES)
    if quant == "auto":
        quant = AUTO_QUANT_ON_CUDA if device.type == "cuda" else "none"
    if quant == "int8-fp8" and not (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)):
        raise ValueError("quant='int8-fp8' needs a CUDA GPU with FP8 (sm89 or newer); use quant='int8'")
    return quant


_warned_fp32 = False


def _note_fp32(dtype: torch.dtype, device: torch.device) -> None:
    global _warned_fp32
    if dtype == torch.float32 and device.type == "cuda" and not _warned_fp32:
        logger.warning("sparge: float32 inputs are computed with bfloat16 operands (fp32 accumulation); "
                       "the output is returned in float32")
        _warned_fp32 = True


# --------------------------------------------------------------------------------------------
# hyperparameters: validated in Python, per query head
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """The predictor's hyperparameters, validated (``validation.PerHead``): self-similarity threshold
    and either a top-CDF or a top-k budget. ``Selection.parse`` once, then ``for_heads`` per call (plain
    Python, no tensor work)."""

    simthreshd1: validation.PerHead
    budget: validation.PerHead  # cdfthreshd (top-CDF) or topk (top-k)
    topk_mode: bool

    @classmethod
    def parse(cls, simthreshd1, cdfthreshd, topk) -> Selection:
        if topk is not None:
            default_cdf = isinstance(cdfthreshd, float) and cdfthreshd == DEFAULT_CDFTHRESHD
            if cdfthreshd is not None and not default_cdf:
                raise ValueError("pass either cdfthreshd (top-CDF mode) or topk (top-k mode), not both; "
                                 "set cdfthreshd=None when giving topk")
            budget = validation.per_head_values("topk", topk, low=0.0, high=1.0)
        else:
            if cdfthreshd is None:
                raise ValueError("one of cdfthreshd (top-CDF mode) or topk (top-k mode) is needed; "
                                 "both are None")
            budget = validation.per_head_values("cdfthreshd", cdfthreshd, low=0.0, high=1.0)
        theta = validation.per_head_values("simthreshd1", simthreshd1, low=-1.0, high=1.0)
        return cls(theta, budget, topk is not None)

    @property
    def keeps_everything(self) -> bool:
        """Every head keeps every block (budget >= 1): the predictor need not run."""
        return self.budget.all_at_least(1.0)

    def for_heads(self, num_heads: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.simthreshd1.for_heads(num_heads), self.budget.for_heads(num_heads)


def parse_pvthreshd(pvthreshd) -> validation.PerHead | None:
    """The stage-2 threshold, validated (None: stage 2 off)."""
    if pvthreshd is None:
        return None
    return validation.per_head_values("pvthreshd", pvthreshd, low=0.0, high=float("inf"))


def _pv_values(pvthreshd, num_heads: int) -> tuple[float, ...] | None:
    parsed = parse_pvthreshd(pvthreshd)
    return None if parsed is None else parsed.for_heads(num_heads)


def _full_mask(q, k) -> torch.Tensor:  # every block pair; the executors drop the disallowed ones
    return torch.ones(
        q.shape[0], q.shape[1], reference.num_blocks(q.shape[2], BLOCK_Q), reference.num_blocks(k.shape[2], BLOCK_K),
        dtype=torch.bool, device=q.device,
    )


def _on_device(values, device, dtype=torch.float32) -> torch.Tensor | None:
    return None if values is None else validation.device_values(values, device, dtype)


# --------------------------------------------------------------------------------------------
# implementations (validated arguments; the custom ops of sparge_core.library call these too)
# --------------------------------------------------------------------------------------------
def _predict_impl(q, k, *, is_causal: bool, scale: float, simthreshd1: tuple, budget: tuple, topk_mode: bool,
                  estimator: str, window: int | None, backend: str, local_blocks: int = 0) -> torch.Tensor:
    if all(b >= 1.0 for b in budget):
        allowed = reference.allowed_block_mask(q.shape[2], k.shape[2], is_causal, device=q.device, window=window)
        return _full_mask(q, k) & allowed
    impl = resolve_backend(backend, q.device)
    theta_t, budget_t = _on_device(simthreshd1, q.device), _on_device(budget, q.device, torch.float64)
    return impl.predict(q, k, is_causal=is_causal, scale=scale, simthreshd1=theta_t,
                        cdfthreshd=None if topk_mode else budget_t, topk=budget_t if topk_mode else None,
                        estimator=estimator, window=window, local_blocks=local_blocks)


def _attend_impl(q, k, v, mask, *, is_causal: bool, scale: float, pvthreshd: tuple | None, quant: str,
                 window: int | None, backend: str, prepared=None) -> tuple[torch.Tensor, BlockCounts]:
    impl = resolve_backend(backend, q.device)
    _note_fp32(q.dtype, q.device)
    return impl.attend(q, k, v, mask, is_causal=is_causal, scale=scale,
                       pvthreshd=_on_device(pvthreshd, q.device), quant=quant, window=window, prepared=prepared)


def _sparge_attn_impl(q, k, v, *, is_causal: bool, scale: float, simthreshd1: tuple, budget: tuple,
                      topk_mode: bool, pvthreshd: tuple | None, quant: str, estimator: str,
                      window: int | None, backend: str, local_blocks: int = 0) -> tuple[torch.Tensor, BlockCounts]:
    impl = resolve_backend(backend, q.device)
    prepared = None
    if all(b >= 1.0 for b in budget):
        mask = _full_mask(q, k)
    else:
        theta_t, budget_t = _on_device(simthreshd1, q.device), _on_device(budget, q.device, torch.float64)
        kw = dict(is_causal=is_causal, scale=scale, simthreshd1=theta_t,
                  cdfthreshd=None if topk_mode else budget_t, topk=budget_t if topk_mode else None,
                  estimator=estimator, window=window, local_blocks=local_blocks)
        if impl.predict_prepared is not None:
            # the predictor's launches also leave the INT8 tensors (one pass over Q and K) and the map's
            # index lists (its selection launch) for the attention launch
            mask, prepared = impl.predict_prepared(
                q, k, quant_multiplier=scale * LOG2E if quant != "none" else None, **kw)
        else:
            mask = impl.predict(q, k, **kw)
    return _attend_impl(q, k, v, mask, is_causal=is_causal, scale=scale, pvthreshd=pvthreshd, quant=quant,
                        window=window, backend=impl.name, prepared=prepared)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _counts(allowed, computed, pv_skipped) -> BlockCounts:
    return BlockCounts(allowed=allowed, computed=computed, pv_skipped=pv_skipped)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------
def predict_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    simthreshd1=DEFAULT_SIMTHRESHD1,
    cdfthreshd=DEFAULT_CDFTHRESHD,
    topk=None,
    backend: str = "auto",
    estimator: str = "pooled",
    window: int | None = None,
    local_blocks: int = 0,
) -> torch.Tensor:
    """Stage-1 SpargeAttn block predictor.

    Args:
        q: ``(B, Hq, Nq, D)``; k: ``(B, Hkv, Nk, D)`` with ``Hq % Hkv == 0``.
        simthreshd1: a block is self-similar iff its mean pairwise cosine > simthreshd1 (in [-1, 1]).
        cdfthreshd: top-CDF mode: keep the most probable key blocks whose cumulative pooled
            probability is <= cdfthreshd (at least one); >= 1 keeps everything.
        topk: top-k mode (instead of cdfthreshd): keep max(1, floor(topk * nk_blocks)) blocks.
        Each hyperparameter is a float, a per-query-head list/1-D tensor of length Hq, or a
        ``validation.PerHead`` (validated once; a tensor is read with ``.tolist()`` on every call).
        estimator: how a block pair's score is estimated: ``"pooled"`` (the paper: pooled query .
            pooled key) or ``"keys"`` (the pooled query against every key of the block, summed per
            block: a dominant single key inside a block is not averaged away; costs 1/BLOCK_Q of
            ``Q K^T``). See ``reference.key_resolved_scores``.
        window: a causal sliding window (query at position p sees keys p - window < j <= p): blocks
            wholly outside it are never kept.
        local_blocks: causal only (an integer >= 0; > 0 with ``is_causal=False`` is a ValueError): also
            force the ``local_blocks`` key blocks just before each query block's diagonal key blocks
            (beside the sink and the diagonal, which causal selection always keeps), so the first rows
            of every query block keep their nearest context; never outside the causal mask or the
            window. 0 (the default) is the map without the option, bit for bit. See
            ``reference.select_blocks`` rule 5.

    Returns:
        bool ``(B, Hq, ceil(Nq / BLOCK_Q), ceil(Nk / BLOCK_K))``; True = compute this block pair.
    """
    validation.check_qk(q, k)
    validation.check_flag("is_causal", is_causal)
    window = validation.check_window(window, is_causal)
    sm_scale = validation.resolve_scale(scale, q.shape[-1])
    validation.check_choice("estimator", estimator, reference.ESTIMATORS)
    local_blocks = validation.check_local_blocks(local_blocks, is_causal)
    sel = Selection.parse(simthreshd1, cdfthreshd, topk)
    theta, budget = sel.for_heads(q.shape[1])
    backend = resolve_backend(backend, q.device).name
    kw = dict(is_causal=is_causal, scale=sm_scale, simthreshd1=theta, budget=budget, topk_mode=sel.topk_mode,
              estimator=estimator, window=window, backend=backend, local_blocks=local_blocks)
    if _compiling():
        kw.update(simthreshd1=list(theta), budget=list(budget))
        return torch.ops.sparge.predict_block_mask(q, k, **kw)
    return _predict_impl(q, k, **kw)


def block_sparse_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    pvthreshd=DEFAULT_PVTHRESHD,
    quant: str = "auto",
    backend: str = "auto",
    return_stats: bool = False,
    window: int | None = None,
):
    """Softmax attention restricted to the True blocks of ``mask`` (and the causal triangle).

    Args:
        q, k, v: ``(B, Hq, Nq, D)``, ``(B, Hkv, Nk, D)``, ``(B, Hkv, Nk, D)``; fp16/bf16/fp32.
        mask: bool ``(B, Hq, ceil(Nq/BLOCK_Q), ceil(Nk/BLOCK_K))``; B and Hq may be 1 (broadcast).
        is_causal: bottom-right aligned causal mask (query i sees keys j <= i + Nk - Nq).
        pvthreshd: stage-2 skip threshold (lambda = -pvthreshd, base-2 units), float or per head;
            None (the default) turns stage 2 off; 50 almost never skips but still pays for the check.
        quant: "auto" | "int8" | "none" (see ``resolve_quant``).
        backend: "auto" | "triton" | "reference" | "fa4" (see the module docstring; "auto" picks FA4 only
            for exact calls, ``pvthreshd=None``, when it is installed and the GPU is sm90).
        return_stats: also return a ``SparsityStats``.
        window: a causal sliding window (query at position p sees keys p - window < j <= p), or None.

    A query row with no allowed key gets zeros.
    """
    validation.check_qkv(q, k, v)
    validation.check_flag("is_causal", is_causal)
    validation.check_flag("return_stats", return_stats)
    window = validation.check_window(window, is_causal)
    sm_scale = validation.resolve_scale(scale, q.shape[-1])
    nqb, nkb = reference.num_blocks(q.shape[2], BLOCK_Q), reference.num_blocks(k.shape[2], BLOCK_K)
    mask = validation.check_block_mask(mask, (q.shape[0], q.shape[1], nqb, nkb), q.device)
    pv = _pv_values(pvthreshd, q.shape[1])
    variant = resolve_quant(quant, q.device)
    fa4_ok = fa4.auto_eligible(q, pvthreshd=pv, quant=variant, window=window, nk=k.shape[2],
                                is_causal=is_causal)
    backend = resolve_backend(backend, q.device, fa4_ok=fa4_ok).name
    kw = dict(is_causal=is_causal, scale=sm_scale, pvthreshd=pv, quant=variant, window=window,
              backend=backend)
    if _compiling():
        kw.update(pvthreshd=None if pv is None else list(pv))
        out, *counts = torch.ops.sparge.block_sparse_attn(q, k, v, mask, **kw)
        counts = _counts(*counts)
    else:
        out, counts = _attend_impl(q, k, v, mask, **kw)
    return (out, SparsityStats.from_counts(counts)) if return_stats else out


def sparge_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    simthreshd1=DEFAULT_SIMTHRESHD1,
    cdfthreshd=DEFAULT_CDFTHRESHD,
    topk=None,
    pvthreshd=DEFAULT_PVTHRESHD,
    quant: str = "auto",
    backend: str = "auto",
    return_stats: bool = False,
    estimator: str = "pooled",
    window: int | None = None,
    local_blocks: int = 0,
):
    """SpargeAttn: predict the block map, then run block-sparse attention with the stage-2 skip.

    A drop-in for ``F.scaled_dot_product_attention(q, k, v, is_causal=..., scale=...)`` on
    ``(B, H, N, D)`` tensors, with GQA (``Hq % Hkv == 0``) and any lengths. See
    ``predict_block_mask`` and ``block_sparse_attn`` for the hyperparameters (``window``: a causal
    sliding window, intersected with the predicted map; ``local_blocks``: causal only, key blocks
    forced before each query block's diagonal). With ``return_stats`` returns
    ``(out, SparsityStats)``; its counts stay on the device until a figure is read.
    """
    validation.check_qkv(q, k, v)
    validation.check_flag("is_causal", is_causal)
    validation.check_flag("return_stats", return_stats)
    window = validation.check_window(window, is_causal)
    sm_scale = validation.resolve_scale(scale, q.shape[-1])
    validation.check_choice("estimator", estimator, reference.ESTIMATORS)
    local_blocks = validation.check_local_blocks(local_blocks, is_causal)
    sel = Selection.parse(simthreshd1, cdfthreshd, topk)
    theta, budget = sel.for_heads(q.shape[1])
    pv = _pv_values(pvthreshd, q.shape[1])
    variant = resolve_quant(quant, q.device)
    fa4_ok = fa4.auto_eligible(q, pvthreshd=pv, quant=variant, window=window, nk=k.shape[2],
                                is_causal=is_causal)
    backend = resolve_backend(backend, q.device, fa4_ok=fa4_ok).name
    kw = dict(is_causal=is_causal, scale=sm_scale, simthreshd1=theta, budget=budget, topk_mode=sel.topk_mode,
              pvthreshd=pv, quant=variant, estimator=estimator, window=window, backend=backend,
              local_blocks=local_blocks)
    if _compiling():
        kw.update(simthreshd1=list(theta), budget=list(budget), pvthreshd=None if pv is None else list(pv))
        out, *counts = torch.ops.sparge.sparge_attn(q, k, v, **kw)
        counts = _counts(*counts)
    else:
        out, counts = _sparge_attn_impl(q, k, v, **kw)
    return (out, SparsityStats.from_counts(counts)) if return_stats else out


from . import library  # noqa: E402,F401  (registers the torch.ops.sparge custom ops)
