"""Public functions: ``sparge_attn``, ``predict_block_mask``, ``block_sparse_attn``.

Backends are a string registry: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``),
``"reference"`` (plain PyTorch, float32), ``"fa4"`` (FlashAttention-4's block-sparse kernel, optional
extra ``sparge[fa4]``, sm90, exact attention only) and ``"auto"`` (FA4 when installed, on sm90, for an
exact call: ``pvthreshd=None``, no quantization, no window; otherwise Triton on CUDA, the reference
on CPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from . import validation
from .ops import attention as triton_attention
from .ops import fa4
from .ops import predict as triton_predict
from .ops import reference
from .ops.blocks import BLOCK_K, BLOCK_Q, BlockCounts
from .registry import Registry
from .stats import SparsityStats

logger = logging.getLogger(__name__)

DEFAULT_SIMTHRESHD1 = 0.6
DEFAULT_CDFTHRESHD = 0.98
DEFAULT_PVTHRESHD = 50.0
QUANT_MODES = ("auto", "int8", "int8-fp8", "none")
# What quant="auto" means on a CUDA GPU. "none" until the quantized path meets its accuracy bound
# on real data (see results/kernel/); the CPU paths never quantize under "auto".
AUTO_QUANT_ON_CUDA = "none"


# --------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """How one backend predicts a block map and runs block-sparse attention."""

    name: str
    predict: Callable[..., torch.Tensor]
    attend: Callable[..., tuple[torch.Tensor, BlockCounts]]


def _reference_predict(q, k, **kw) -> torch.Tensor:
    return reference.predict_block_mask(q, k, dtype=torch.float32, **kw)


def _reference_attend(q, k, v, mask, *, is_causal, scale, pvthreshd, quant, window=None):
    if quant != "none":  # simulate INT8 QK^T: attention on the de-quantized Q and smoothed K
        qk_scale = scale * reference.LOG2E
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
BACKENDS.add("triton", Backend("triton", triton_predict.predict_block_mask, triton_attention.block_sparse_attn))
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
# hyperparameters
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Selection:
    simthreshd1: torch.Tensor
    cdfthreshd: torch.Tensor | None
    topk: torch.Tensor | None
    keeps_everything: bool  # decided on the CPU values: no device sync


def _selection(num_heads: int, device, simthreshd1, cdfthreshd, topk) -> _Selection:
    if topk is not None:
        if cdfthreshd is not None and not (isinstance(cdfthreshd, float) and cdfthreshd == DEFAULT_CDFTHRESHD):
            raise ValueError("pass either cdfthreshd (top-CDF mode) or topk (top-k mode), not both; "
                             "set cdfthreshd=None when giving topk")
        budget = validation.per_head_cpu("topk", topk, num_heads, low=0.0, high=1.0)
    else:
        if cdfthreshd is None:
            raise ValueError("one of cdfthreshd (top-CDF mode) or topk (top-k mode) is needed; both are None")
        budget = validation.per_head_cpu("cdfthreshd", cdfthreshd, num_heads, low=0.0, high=1.0)
    theta = validation.per_head("simthreshd1", simthreshd1, num_heads, low=-1.0, high=1.0, device=device)
    on_dev = validation.on_device(budget, device)
    return _Selection(theta, None if topk is not None else on_dev, on_dev if topk is not None else None,
                      bool((budget >= 1).all()))


def _pv_threshold(pvthreshd, num_heads: int, device) -> torch.Tensor | None:
    if pvthreshd is None:
        return None
    return validation.per_head("pvthreshd", pvthreshd, num_heads, low=0.0, high=float("inf"), device=device)


def _full_mask(q, k) -> torch.Tensor:  # every block pair; the executors drop the disallowed ones
    return torch.ones(
        q.shape[0], q.shape[1], reference.num_blocks(q.shape[2], BLOCK_Q), reference.num_blocks(k.shape[2], BLOCK_K),
        dtype=torch.bool, device=q.device,
    )


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
) -> torch.Tensor:
    """Stage-1 SpargeAttn block predictor.

    Args:
        q: ``(B, Hq, Nq, D)``; k: ``(B, Hkv, Nk, D)`` with ``Hq % Hkv == 0``.
        simthreshd1: a block is self-similar iff its mean pairwise cosine > simthreshd1 (in [-1, 1]).
        cdfthreshd: top-CDF mode: keep the most probable key blocks whose cumulative pooled
            probability is <= cdfthreshd (at least one); >= 1 keeps everything.
        topk: top-k mode (instead of cdfthreshd): keep max(1, floor(topk * nk_blocks)) blocks.
        Each hyperparameter is a float or a per-query-head list/1-D tensor of length Hq.
        estimator: how a block pair's score is estimated: ``"pooled"`` (the paper: pooled query .
            pooled key) or ``"keys"`` (the pooled query against every key of the block, summed per
            block: a dominant single key inside a block is not averaged away; costs 1/BLOCK_Q of
            ``Q K^T``). See ``reference.key_resolved_scores``.
        window: a causal sliding window (query at position p sees keys p - window < j <= p): blocks
            wholly outside it are never kept.

    Returns:
        bool ``(B, Hq, ceil(Nq / BLOCK_Q), ceil(Nk / BLOCK_K))``; True = compute this block pair.
    """
    validation.check_qk(q, k)
    validation.check_flag("is_causal", is_causal)
    window = validation.check_window(window, is_causal)
    sm_scale = validation.resolve_scale(scale, q.shape[-1])
    validation.check_choice("estimator", estimator, reference.ESTIMATORS)
    sel = _selection(q.shape[1], q.device, simthreshd1, cdfthreshd, topk)
    impl = resolve_backend(backend, q.device)
    if sel.keeps_everything:
        return _full_mask(q, k) & reference.allowed_block_mask(q.shape[2], k.shape[2], is_causal, device=q.device,
                                                               window=window)
    return impl.predict(q, k, is_causal=is_causal, scale=sm_scale, simthreshd1=sel.simthreshd1,
                        cdfthreshd=sel.cdfthreshd, topk=sel.topk, estimator=estimator, window=window)


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
            None turns stage 2 off. 50 (the default) almost never skips.
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
    pv = _pv_threshold(pvthreshd, q.shape[1], q.device)
    variant = resolve_quant(quant, q.device)
    fa4_ok = fa4.auto_eligible(q, pvthreshd=pv, quant=variant, window=window)
    impl = resolve_backend(backend, q.device, fa4_ok=fa4_ok)
    _note_fp32(q.dtype, q.device)
    out, counts = impl.attend(q, k, v, mask, is_causal=is_causal, scale=sm_scale, pvthreshd=pv, quant=variant,
                              window=window)
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
):
    """SpargeAttn: predict the block map, then run block-sparse attention with the stage-2 skip.

    A drop-in for ``F.scaled_dot_product_attention(q, k, v, is_causal=..., scale=...)`` on
    ``(B, H, N, D)`` tensors, with GQA (``Hq % Hkv == 0``) and any lengths. See
    ``predict_block_mask`` and ``block_sparse_attn`` for the hyperparameters (``window``: a causal
    sliding window, intersected with the predicted map). With ``return_stats`` returns
    ``(out, SparsityStats)``.
    """
    validation.check_qkv(q, k, v)
    validation.check_flag("is_causal", is_causal)
    validation.check_flag("return_stats", return_stats)
    window = validation.check_window(window, is_causal)
    sm_scale = validation.resolve_scale(scale, q.shape[-1])
    validation.check_choice("estimator", estimator, reference.ESTIMATORS)
    sel = _selection(q.shape[1], q.device, simthreshd1, cdfthreshd, topk)
    pv = _pv_threshold(pvthreshd, q.shape[1], q.device)
    variant = resolve_quant(quant, q.device)
    fa4_ok = fa4.auto_eligible(q, pvthreshd=pv, quant=variant, window=window)
    impl = resolve_backend(backend, q.device, fa4_ok=fa4_ok)
    _note_fp32(q.dtype, q.device)

    quantized = None
    if sel.keeps_everything:
        mask = _full_mask(q, k)
    elif impl.name == "triton":
        # one pass over Q and K gives the predictor's blocks and, if quantizing, the INT8 tensors
        qk_scale = sm_scale * reference.LOG2E
        q_mult, k_mult = (qk_scale, 1.0) if variant != "none" else (None, None)
        q_blocks, q_i8, q_s = triton_predict.pool_and_similarity(q, BLOCK_Q, smooth=False, quant_multiplier=q_mult)
        k_blocks, k_i8, k_s = triton_predict.pool_and_similarity(k, BLOCK_K, smooth=True, quant_multiplier=k_mult)
        mask = triton_predict.select_blocks(
            q_blocks, k_blocks, nq=q.shape[2], nk=k.shape[2], is_causal=is_causal, scale=sm_scale,
            simthreshd1=sel.simthreshd1, cdfthreshd=sel.cdfthreshd, topk=sel.topk,
            scores=triton_predict.estimator_scores(estimator, q_blocks, k, sm_scale), window=window,
        )
        if variant != "none":
            quantized = (q_i8, q_s, k_i8, k_s)
    else:
        mask = impl.predict(q, k, is_causal=is_causal, scale=sm_scale, simthreshd1=sel.simthreshd1,
                            cdfthreshd=sel.cdfthreshd, topk=sel.topk, estimator=estimator, window=window)
    if quantized is not None:
        out, counts = impl.attend(q, k, v, mask, is_causal=is_causal, scale=sm_scale, pvthreshd=pv,
                                  quant=variant, quantized=quantized, window=window)
    else:
        out, counts = impl.attend(q, k, v, mask, is_causal=is_causal, scale=sm_scale, pvthreshd=pv, quant=variant,
                                  window=window)
    return (out, SparsityStats.from_counts(counts)) if return_stats else out
