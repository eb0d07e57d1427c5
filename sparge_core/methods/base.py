"""The method interface: every attention method turns (q, k, v, its params) into a block mask that
the shared block-sparse kernel executes, so comparisons measure masks, not kernel quality.

Every method takes ``window`` (a causal sliding window, query at position p sees keys
p - window < j <= p): its block map is intersected with the window's block band and the kernel masks
the partial blocks token by token, so sliding-window layers stay sparse.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..api import block_sparse_attn
from ..stats import SparsityStats


class AttentionMethod(ABC):
    """One configured attention method (treat it as immutable: hyperparameters are validated when it
    is built, not on every call).

    Subclasses implement ``block_mask``; ``pvthreshd`` (stage-2 skip) is None unless the method
    uses it. ``__call__`` runs the method end to end on the shared kernel.
    """

    name: ClassVar[str]
    #: the parameter that ``with_density`` adjusts (None: the method cannot match a density)
    budget_param: ClassVar[str | None] = None

    pvthreshd: Any = None

    @abstractmethod
    def block_mask(self, q: torch.Tensor, k: torch.Tensor, *, is_causal: bool, scale: float | None = None,
                   window: int | None = None) -> torch.Tensor:
        """bool ``(B, Hq, ceil(Nq/BLOCK_Q), ceil(Nk/BLOCK_K))``; True = compute."""

    def params(self) -> dict[str, Any]:
        """The method's hyperparameters, for result files."""
        return {}

    def pipeline_kwargs(self) -> dict[str, Any] | None:
        """Keyword arguments of ``sparge_attn`` (hyperparameters only) that compute exactly this method,
        or None when it is not a ``sparge_attn`` configuration. Used where a method must be described by
        numbers alone (the integrations' custom op for padded batches under ``torch.compile``)."""
        return None

    def _stage2(self):
        """The ``pvthreshd`` passed to the kernel (validated once where the method validates)."""
        return self.pvthreshd

    def __call__(self, q, k, v, *, is_causal: bool = False, scale: float | None = None, backend: str = "auto",
                 quant: str = "auto", return_stats: bool = False, window: int | None = None):
        mask = self.block_mask(q, k, is_causal=is_causal, scale=scale, window=window)
        return block_sparse_attn(q, k, v, mask, is_causal=is_causal, scale=scale, pvthreshd=self._stage2(),
                                 quant=quant, backend=backend, return_stats=return_stats, window=window)

    def attend(self, q, k, v, *, is_causal: bool = False, scale: float | None = None, backend: str = "auto",
               quant: str = "auto", window: int | None = None) -> tuple[torch.Tensor, SparsityStats]:
        """``(out, stats)``."""
        return self(q, k, v, is_causal=is_causal, scale=scale, backend=backend, quant=quant,
                    return_stats=True, window=window)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({inner})"
