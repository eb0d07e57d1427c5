"""Small helpers shared by the Triton launchers: where a kernel can run, and constexpr sizes."""

from __future__ import annotations

import os

import torch
import triton


def interpreter_enabled() -> bool:
    """True when Triton was imported in interpreter mode (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_runnable(x: torch.Tensor) -> None:
    """Raise a clear error when a Triton kernel cannot run on ``x``'s device."""
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu":
        if interpreter_enabled():
            return
        raise RuntimeError(
            "backend='triton' got CPU tensors, but Triton runs on CPU only through its interpreter: "
            "set TRITON_INTERPRET=1 in the environment before Python imports triton, or use "
            "backend='reference' (the default 'auto' picks it on CPU)."
        )
    raise RuntimeError(f"backend='triton' supports CUDA tensors (and CPU under TRITON_INTERPRET=1), got {x.device}")


def padded_head_dim(head_dim: int) -> int:
    """The power-of-two tile width (at least 16) that holds ``head_dim`` channels."""
    return max(16, triton.next_power_of_2(head_dim))
