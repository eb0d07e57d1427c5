"""Input checks for the public API: every bad input gets an error that names the argument.

Everything here is plain Python on shapes, dtypes and numbers: no tensor is read, so the checks cost no
device work and ``torch.compile`` traces through them (the one exception, a hyperparameter given as a
tensor, is read once by ``per_head_values``)."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

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


def check_local_blocks(local_blocks, is_causal: bool | None = None) -> int:
    """The predictor's ``local_blocks``: an integer >= 0 (key blocks forced before each query block's
    diagonal). With ``is_causal`` given, a value > 0 also needs causal attention: non-causal selection
    forces no block, so the option has no meaning there and is refused rather than ignored."""
    if isinstance(local_blocks, bool) or not isinstance(local_blocks, int) or local_blocks < 0:
        raise ValueError(f"local_blocks must be an integer >= 0 (key blocks), got {local_blocks!r}")
    if local_blocks and is_causal is False:
        raise ValueError(f"local_blocks={local_blocks} needs is_causal=True: it forces the key blocks just before "
                         f"each query block's causal diagonal, and non-causal selection forces no block; use "
                         f"local_blocks=0 for bidirectional attention")
    return local_blocks


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


@dataclass(frozen=True)
class PerHead:
    """A validated hyperparameter: one float for every query head (``values`` of length 1) or one per
    query head. Build it once (``per_head_values``) and pass it wherever a hyperparameter is taken: it is
    not checked again, so the forward pass does no validation work and no host synchronisation."""

    name: str
    values: tuple[float, ...]

    def for_heads(self, num_heads: int) -> tuple[float, ...]:
        """The values of ``num_heads`` query heads (a single value repeated)."""
        if len(self.values) == 1:
            return self.values * num_heads
        if len(self.values) != num_heads:
            raise ValueError(f"{self.name} must be a number or hold one value per query head ({num_heads}), "
                             f"got shape ({len(self.values)},)")
        return self.values

    def all_at_least(self, bound: float) -> bool:
        return all(v >= bound for v in self.values)

    def plain(self) -> float | list[float]:
        """The value as given: a float, or a list of per-head floats."""
        return self.values[0] if len(self.values) == 1 else list(self.values)


def per_head_values(name: str, value, *, low: float, high: float, low_open: bool = False) -> PerHead:
    """Validate a hyperparameter once: a number, or a 1-D list/tuple/tensor with one value per query
    head (its length is checked against the heads when it is used, ``PerHead.for_heads``). Values must
    be finite and in ``[low, high]`` (``(low, high]`` if low_open). A ``PerHead`` is returned as it is.
    A tensor is read with ``.tolist()``: on a GPU that waits for it, so validate tensors once, not per
    call (methods and ``apply`` do)."""
    if isinstance(value, PerHead):
        return value
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{name} must be a number or a per-head list/tensor, got {value!r}")
    if isinstance(value, (int, float)):
        values = (float(value),)
    elif isinstance(value, torch.Tensor):
        if value.ndim > 1:
            raise ValueError(f"{name} must be a number or hold one value per query head, got shape "
                             f"{tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got a {value.dtype} tensor")
        raw = value.detach().cpu().tolist()
        values = tuple(float(x) for x in (raw if isinstance(raw, list) else [raw]))
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in value):
            raise TypeError(f"{name} must hold numbers, got {value!r}")
        values = tuple(float(x) for x in value)
    elif isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must hold numbers, got {value!r}")
    else:
        raise TypeError(f"{name} must be a number or a per-head list/tensor, got {type(value).__name__}")
    if not values:
        raise ValueError(f"{name} is empty; give a number or one value per query head")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite, got {list(values)}")
    if any((v <= low if low_open else v < low) or v > high for v in values):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {list(values)}")
    return PerHead(name, values)


def device_values(values: tuple[float, ...], device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``values`` as a ``dtype`` tensor on ``device``, cached by value: after the first call no
    host-to-device copy happens (a copy from pageable memory would wait for the GPU, and is not allowed
    while a CUDA graph is being captured: run once before capturing). Inside ``pinned_device_values``
    every tensor handed out is also recorded, so that a graph which reads it can keep it alive after
    the cache drops it."""
    tensor = _cached_copy(tuple(values), str(torch.device(device)), dtype)
    if _pins:
        _pins[-1].append(tensor)
    return tensor


_pins: list[list[torch.Tensor]] = []


@contextlib.contextmanager
def pinned_device_values():
    """Collect the tensors ``device_values`` returns while active (a list, yielded)."""
    pinned: list[torch.Tensor] = []
    _pins.append(pinned)
    try:
        yield pinned
    finally:
        _pins.pop()


@functools.lru_cache(maxsize=4096)
def _cached_copy(values: tuple, device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


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
