"""``sparge`` (top-CDF, calibrated or global hyperparameters) and ``sparge-topk`` (tuning-free top-k).

Hyperparameters are validated when the method is built (``api.Selection``, ``api.parse_pvthreshd``,
``validation.check_local_blocks``); a call only checks the per-head lengths against the input (and that
``local_blocks`` > 0 comes with causal attention), in plain Python.

``local_blocks`` (beyond the paper, default 0 = the paper's method as this project runs it): under causal
masking also keep the ``local_blocks`` key blocks just before each query block's diagonal
(``reference.select_blocks`` rule 5). A calibrated layer carries it as the config field ``local_blocks``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..api import (
    DEFAULT_CDFTHRESHD,
    DEFAULT_PVTHRESHD,
    DEFAULT_SIMTHRESHD1,
    Selection,
    parse_pvthreshd,
    predict_block_mask,
    sparge_attn,
)
from ..ops.blocks import ESTIMATORS
from ..params import VARIANT_QUANTS, LayerConfig
from ..validation import check_choice, check_local_blocks
from . import register_method
from .base import AttentionMethod


@register_method("sparge")
class Sparge(AttentionMethod):
    """SpargeAttn with top-CDF selection. Hyperparameters are floats or per-head lists."""

    budget_param = "cdfthreshd"

    def __init__(self, simthreshd1=DEFAULT_SIMTHRESHD1, cdfthreshd=DEFAULT_CDFTHRESHD,
                 pvthreshd=DEFAULT_PVTHRESHD, estimator: str = "pooled", quant: str | None = None,
                 local_blocks: int = 0):
        self.simthreshd1 = simthreshd1
        self.cdfthreshd = cdfthreshd
        self.pvthreshd = pvthreshd
        self.estimator = estimator
        self.quant = quant  # None: the caller's quant; else fixed (a calibrated layer's variant)
        self.local_blocks = local_blocks
        self._validate(cdfthreshd=cdfthreshd, topk=None)

    def _validate(self, *, cdfthreshd, topk) -> None:
        check_choice("estimator", self.estimator, ESTIMATORS)
        if self.quant is not None:
            check_choice("quant", self.quant, VARIANT_QUANTS)
        try:
            check_local_blocks(self.local_blocks)
        except ValueError as err:
            raise ValueError(f"{self.name}: {err}") from None
        sel = Selection.parse(self.simthreshd1, cdfthreshd, topk)
        self._checked = dict(simthreshd1=sel.simthreshd1, cdfthreshd=None if sel.topk_mode else sel.budget,
                             topk=sel.budget if sel.topk_mode else None, estimator=self.estimator,
                             local_blocks=self.local_blocks)
        self._pv = parse_pvthreshd(self.pvthreshd)

    @classmethod
    def from_layer_config(cls, lc: LayerConfig) -> AttentionMethod:
        """The layer's method, running exactly what the config says: its hyperparameters, estimator,
        ``local_blocks`` and (version 2) its quantization and stage 2 on or off (off: ``pvthreshd=None``)."""
        pv = list(lc.pvthreshd) if lc.stage2 else None
        if lc.topk is not None:
            return SpargeTopk(simthreshd1=list(lc.simthreshd1), topk=list(lc.topk), pvthreshd=pv,
                              estimator=lc.estimator, quant=lc.quant, local_blocks=lc.local_blocks)
        return cls(simthreshd1=list(lc.simthreshd1), cdfthreshd=list(lc.cdfthreshd), pvthreshd=pv,
                   estimator=lc.estimator, quant=lc.quant, local_blocks=lc.local_blocks)

    def _quant(self, quant: str) -> str:
        if self.quant is None or quant == "auto":
            return quant if self.quant is None else self.quant
        if quant != self.quant:
            raise ValueError(f"this layer was calibrated with quant={self.quant!r} and its error bound holds for "
                             f"that; quant={quant!r} was asked for. Pass quant='auto' (run what the config says) "
                             f"or recalibrate with that quantization")
        return quant

    def _selection(self) -> dict[str, Any]:
        return dict(simthreshd1=self.simthreshd1, cdfthreshd=self.cdfthreshd, estimator=self.estimator)

    def params(self) -> dict[str, Any]:
        out = {**self._selection(), "pvthreshd": self.pvthreshd}
        if self.quant is not None:
            out["quant"] = self.quant
        if self.local_blocks:  # (0, the default, is not written: result files stay as they were)
            out["local_blocks"] = self.local_blocks
        return out

    def pipeline_kwargs(self) -> dict[str, Any]:
        # "quant": the layer's fixed quantization (a calibrated variant), None for the caller's
        return {**self._checked, "pvthreshd": self._pv, "quant": self.quant}

    def _stage2(self):
        return self._pv

    def block_mask(self, q, k, *, is_causal, scale=None, window=None) -> torch.Tensor:
        return predict_block_mask(q, k, is_causal=is_causal, scale=scale, window=window, **self._checked)

    def __call__(self, q, k, v, *, is_causal=False, scale=None, backend="auto", quant="auto",
                 return_stats=False, window=None):
        # the fused path: one pass over Q and K for prediction (and quantization)
        return sparge_attn(q, k, v, is_causal=is_causal, scale=scale, pvthreshd=self._pv, backend=backend,
                           quant=self._quant(quant), return_stats=return_stats, window=window, **self._checked)


@register_method("sparge-topk")
class SpargeTopk(Sparge):
    """SpargeAttn with top-k selection (the official plug-and-play default: simthreshd1=-0.1, topk=0.5)."""

    budget_param = "topk"

    def __init__(self, simthreshd1=-0.1, topk=0.5, pvthreshd=DEFAULT_PVTHRESHD, estimator: str = "pooled",
                 quant: str | None = None, local_blocks: int = 0):
        self.simthreshd1 = simthreshd1
        self.topk = topk
        self.pvthreshd = pvthreshd
        self.estimator = estimator
        self.quant = quant
        self.local_blocks = local_blocks
        self._validate(cdfthreshd=None, topk=topk)

    def _selection(self) -> dict[str, Any]:
        return dict(simthreshd1=self.simthreshd1, topk=self.topk, cdfthreshd=None, estimator=self.estimator)
