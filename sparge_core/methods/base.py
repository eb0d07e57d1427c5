"""The method interface: every attention method turns (q, k, v, its params) into a block mask that
the shared block-sparse kernel executes, so comparisons measure masks, not kernel quality."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..api import block_sparse_attn
from ..stats import SparsityStats


class AttentionMethod(ABC):
    """One configured attention method.

    Subclasses implement ``block_mask``; ``pvthreshd`` (stage-2 skip) is None unless the method
    uses it. ``__call__`` runs the method end to end on the shared kernel.
    """

    name: ClassVar[str]
    #: the parameter that ``with_density`` adjusts (None: the method cannot match a density)
    budget_param: ClassVar[str | None] = None

    pvthreshd: Any = None

    @abstractmethod
    def block_mask(self, q: torch.Tensor, k: torch.Tensor, *, is_causal: bool, scale: float | None = None) -> torch.Tensor:
        """bool ``(B, Hq, ceil(Nq/BLOCK_Q), ceil(Nk/BLOCK_K))``; True = compute."""

    def params(self) -> dict[str, Any]:
        """The method's hyperparameters, for result files."""
        return {}

    def __call__(self, q, k, v, *, is_causal: bool = False, scale: float | None = None, backend: str = "auto",
                 quant: str = "auto", return_stats: bool = False):
        mask = self.block_mask(q, k, is_causal=is_causal, scale=scale)
        return block_sparse_attn(q, k, v, mask, is_causal=is_causal, scale=scale, pvthreshd=self.pvthreshd,
                                 quant=quant, backend=backend, return_stats=return_stats)

    def attend(self, q, k, v, *, is_causal: bool = False, scale: float | None = None, backend: str = "auto",
               quant: str = "auto") -> tuple[torch.Tensor, SparsityStats]:
        """``(out, stats)``."""
        return self(q, k, v, is_causal=is_causal, scale=scale, backend=backend, quant=quant, return_stats=True)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({inner})"
