"""``python -m calibrate.crossover``: set each sparse layer's ``min_tokens`` in a calibrated config from
a cost model, without calibrating again.

A sparse call has fixed costs (launches, the predictor, the host's time to issue it) that do not shrink
with the length while dense attention's time does, so a layer calibrated at 8K may be slower than dense
SDPA at 2K. ``min_tokens`` is the length below which the integration runs the layer dense; the time
objective of ``sparge-calibrate`` writes it itself (``calibrate.objective.crossover_tokens``). This
command derives it for a config calibrated before that, or against another GPU's cost model: per
layer, the calibrated block density (1 - the layer's ``sparsity``) is assumed to hold at the shorter
lengths, stage 2 is assumed to skip nothing (its check is paid either way), and the variant is the
layer's own (version-1 layers: the exact kernel with stage 2 on).

    python -m calibrate.crossover results/calibration/smollm2-time-graphs-h200.json \\
        --cost-model results/kernel/h200-cost.json --out my-config.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import torch

from sparge_core.params import ConfigError, LayerConfig, ModelConfig

from .cli import HelpFormatter
from .cost import CallShape, CostModel, CostModelError
from .objective import Family, LayerTimer, crossover_tokens

logger = logging.getLogger(__name__)


def layer_min_tokens(lc: LayerConfig, cost: CostModel, *, seq_len: int, heads: int, head_dim: int,
                     causal: bool = True) -> int:
    """``min_tokens`` of one layer (0 for a dense layer or one without a recorded sparsity)."""
    if lc.is_dense or lc.sparsity is None:
        return 0
    quant = lc.quant or "none"
    family = Family(quant, lc.estimator)
    timer = LayerTimer(cost, CallShape(seq_len, seq_len, heads, head_dim, causal))
    if not timer.available(family, lc.stage2):
        raise CostModelError(f"layer {lc.layer} runs {quant}{'+pv' if lc.stage2 else ''}/{lc.estimator}, which the "
                             f"cost model for {cost.gpu} does not have at head dim {head_dim}")
    density = torch.full((heads,), 1.0 - lc.sparsity, dtype=torch.float64)
    return crossover_tokens(timer, family, lc.stage2, density)


def with_min_tokens(config: ModelConfig, cost: CostModel, *, seq_len: int | None = None,
                    causal: bool = True) -> ModelConfig:
    """``config`` with every sparse layer's ``min_tokens`` set from ``cost`` (the calibration length of
    the config unless ``seq_len`` is given)."""
    seq_len = seq_len or config.calibration.get("seq_len")
    if not seq_len:
        raise ConfigError("the config does not record its calibration length (calibration.seq_len): pass --seq-len")
    info = config.model
    layers = tuple(dataclasses.replace(lc, min_tokens=layer_min_tokens(
        lc, cost, seq_len=int(seq_len), heads=info.num_heads, head_dim=info.head_dim, causal=causal))
        for lc in config.layers)
    return dataclasses.replace(config, layers=layers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m calibrate.crossover", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("config", type=Path, help="a calibrated config JSON")
    ap.add_argument("--cost-model", type=Path, required=True, help="a cost model JSON (sparge-profile)")
    ap.add_argument("--out", type=Path, required=True, help="where to write the config with min_tokens")
    ap.add_argument("--seq-len", type=int, help="the length the densities hold at (default: the calibration's)")
    ap.add_argument("--non-causal", action="store_true", help="the layers attend bidirectionally (a DiT)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.seq_len is not None and args.seq_len < 1:
        print("error: --seq-len must be a positive token count", file=sys.stderr)
        return 2
    try:
        config = ModelConfig.load(args.config)
        cost = CostModel.load(args.cost_model)
        out = with_min_tokens(config, cost, seq_len=args.seq_len, causal=not args.non_causal)
    except (OSError, ConfigError, CostModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.save(args.out)
    gated = {lc.layer: lc.min_tokens for lc in out.layers if lc.min_tokens}
    logger.info("%d of %d sparse layers run dense below their predicted crossover %s; wrote %s", len(gated),
                sum(1 for lc in out.layers if not lc.is_dense), gated, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
