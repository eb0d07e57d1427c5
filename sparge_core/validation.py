"""Input checks for the public API: every bad input gets an error that names the argument."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_qkv(q, k, v) -> None:
    """Validate attention inputs: q ``(B, Hq, Nq, D)``, k/v ``(B, Hkv, Nk, D)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); every dimension must be >= 1")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[3]} and {k.shape[3]}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM}, got {q.shape[3]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"the number of query heads ({q.shape[1]}) must be a multiple of the number of key/value heads "
            f"({k.shape[1]}) for grouped-query attention"
        )


def check_qk(q, k) -> None:
    """Validate predictor inputs (q and k only)."""
    check_qkv(q, k, k)


def resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return float(scale)


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_window(window, is_causal: bool) -> int | None:
    """A sliding window: None, or an integer >= 1 with causal attention (query at position p sees keys
    p - window < j <= p)."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be None or an integer >= 1 (tokens), got {window!r}")
    if not is_causal:
        raise ValueError("window (a sliding window) is supported with is_causal=True only")
    return window


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def per_head(
    name: str, value, num_heads: int, *, low: float, high: float, device, low_open: bool = False
) -> torch.Tensor:
    """A hyperparameter as a float32 ``(num_heads,)`` tensor on ``device``: a number, or a 1-D
    list/tuple/tensor of length ``num_heads``. Values must be finite and in ``[low, high]``
    (``(low, high]`` if low_open). Device copies are cached by value, so calling this every forward
    pass costs no host-to-device copy (a copy from pageable memory would wait for the GPU)."""
    values = per_head_cpu(name, value, num_heads, low=low, high=high, low_open=low_open)
    return on_device(values, device)


def on_device(values: torch.Tensor, device) -> torch.Tensor:
    """A float32 copy of CPU ``values`` on ``device``, cached by value."""
    return _cached_copy(tuple(values.tolist()), str(torch.device(device)))


@functools.lru_cache(maxsize=4096)
def _cached_copy(values: tuple, device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def per_head_cpu(
    name: str, value, num_heads: int, *, low: float, high: float, low_open: bool = False
) -> torch.Tensor:
    """``per_head``'s validation, returning a float64 CPU tensor."""
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{name} must be a number or a per-head list/tensor of length {num_heads}, got {value!r}")
    if isinstance(value, (int, float)):
        values = torch.full((num_heads,), float(value), dtype=torch.float64)
    elif isinstance(value, torch.Tensor) or isinstance(value, Sequence):
        try:
            values = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must hold numbers, got {value!r}") from err
        if values.ndim == 0:
            values = values.expand(num_heads).clone()
        elif values.ndim != 1 or values.numel() != num_heads:
            raise ValueError(
                f"{name} must be a number or hold one value per query head ({num_heads}), got shape {tuple(values.shape)}"
            )
    else:
        raise TypeError(f"{name} must be a number or a per-head list/tensor, got {type(value).__name__}")
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} must be finite, got {values.tolist()}")
    too_low = (values <= low) if low_open else (values < low)
    if too_low.any() or (values > high).any():
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {values.tolist()}")
    return values


def check_block_mask(mask, expected_shape: tuple[int, int, int, int], device) -> torch.Tensor:
    """A bool block map of ``expected_shape``; batch and head dims of size 1 broadcast."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True = compute the block pair), got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"mask must be on the same device as q ({device}), got {mask.device}")
    ok = mask.ndim == 4 and mask.shape[2:] == expected_shape[2:] and all(
        m in (1, e) for m, e in zip(mask.shape[:2], expected_shape[:2])
    )
    if not ok:
        raise ValueError(
            f"mask must have shape (B, Hq, ceil(Nq/BLOCK_Q), ceil(Nk/BLOCK_K)) = {expected_shape} "
            f"(B and Hq may be 1), got {tuple(mask.shape)}"
        )
    return mask.expand(*expected_shape)
