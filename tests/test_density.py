"""Density matching: every registered method reaches 0.5 and 0.7 within 0.02 on random and
structured inputs where its knob allows it; unreachable targets are reported (or raised); the
density definition; bad arguments."""

import logging

import pytest
import torch

from sparge_core import block_sparse_attn
from sparge_core.methods import _blockmaps as bm
from sparge_core.methods import method_names
from sparge_core.methods.density import DensityNotReachable, budget_knob, match_density, method_density
from sparge_core.ops import reference as R
from sparge_core.synthetic import structured_qkv

N = 4096  # 32 query blocks x 64 key blocks: one block column changes the causal density by <= 0.03


def _random_qk(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, N, 32, generator=g), torch.randn(1, 1, N, 32, generator=g)


def _structured_qk(seed):
    q, k, _ = structured_qkv(1, 2, 1, N, 32, dtype=torch.float32, seed=seed)
    return q, k


INPUTS = {"random": _random_qk, "structured": _structured_qk}
CASES = [
    ("sparge", {"simthreshd1": -1.0}),  # every block self-similar: the cdf knob decides everything
    ("sparge-topk", {}),
    ("minference", {"pattern": "vertical_slash"}),
    ("minference", {"pattern": "block_sparse"}),
    ("minference", {"pattern": "a_shape"}),
    ("flexprefill", {"min_budget": None}),
]


@pytest.mark.parametrize("inputs", sorted(INPUTS))
@pytest.mark.parametrize(
    "name,fixed", CASES, ids=[f"{n}-{'-'.join(map(str, f.values())) or 'default'}" for n, f in CASES]
)
def test_reaches_targets_within_tolerance(inputs, name, fixed):
    q, k = INPUTS[inputs](seed=len(name) + len(fixed))
    for target in (0.5, 0.7):
        method, reached = match_density(name, q, k, target, True, strict=True, **fixed)
        assert abs(reached - target) <= 0.02, (name, fixed, target, reached)
        # the reported density is the method's real density, with the knob it was given
        assert method_density(method, q, k, is_causal=True) == pytest.approx(reached)
        assert method.params()[method.budget_param] is not None
        for key, value in fixed.items():
            assert method.params()[key] == value


def test_flexprefill_default_min_budget_reaches_07_not_005():
    q, k = _structured_qk(seed=1)
    _, reached = match_density("flexprefill", q, k, 0.7, True, strict=True)
    assert abs(reached - 0.7) <= 0.02
    with pytest.raises(DensityNotReachable, match="gamma in \\[0, 1\\] gives densities in \\[0.4"):
        match_density("flexprefill", q, k, 0.05, True, strict=True)


def test_non_causal_matching():
    q, k = _structured_qk(seed=2)
    q, k = q[:, :, :2048], k[:, :, :2048]
    for name in ("minference", "flexprefill"):
        method, reached = match_density(
            name, q, k, 0.5, False, strict=True, **({"min_budget": None} if name == "flexprefill" else {})
        )
        assert abs(reached - 0.5) <= 0.02
        assert bm.mask_density(method.block_mask(q, k, is_causal=False), 2048, 2048, False) == pytest.approx(
            reached
        )


def test_unreachable_is_reported(caplog):
    q, k = _random_qk(seed=3)
    # random K blocks are not self-similar: with the default simthreshd1 sparge keeps everything
    with caplog.at_level(logging.WARNING, logger="sparge_core.methods.density"):
        method, reached = match_density("sparge", q, k, 0.5, True)
    assert reached == 1.0 and "not reachable" in caplog.text and "cdfthreshd" in caplog.text
    with pytest.raises(DensityNotReachable, match="dense.*no budget knob"):
        match_density("dense", q, k, 0.5, True, strict=True)
    method, reached = match_density("dense", q, k, 1.0, True, strict=True)
    assert reached == 1.0


def test_density_definition_matches_kernel_stats():
    q, k = _structured_qk(seed=4)
    q, k = q[:, :, :640], k[:, :, :640]
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(5))
    method, reached = match_density("minference", q, k, 0.6, True, pattern="block_sparse")
    _, stats = block_sparse_attn(
        q,
        k,
        v,
        method.block_mask(q, k, is_causal=True),
        is_causal=True,
        backend="reference",
        return_stats=True,
    )
    assert stats.density == pytest.approx(reached)
    # hand count: a causal 2 x 4 grid allows 2 + 4 = 6 pairs; keeping 3 of them (and a future one) is 0.5
    mask = torch.tensor([[True, False, True, False], [True, True, False, False]])[None, None]
    assert bm.mask_density(mask, 256, 256, True) == pytest.approx(3 / 6)
    assert bm.mask_density(mask, 256, 256, False) == pytest.approx(4 / 8)
    assert R.allowed_block_mask(256, 256, True).sum() == 6


def test_knobs_for_every_registered_method():
    knobs = {name: budget_knob(name) for name in method_names()}
    assert knobs["dense"] is None
    assert knobs["sparge"].name == "cdfthreshd" and knobs["sparge-topk"].name == "topk"
    assert knobs["minference"].name == "budget_ratio" and knobs["minference"].high is None
    assert knobs["flexprefill"].name == "gamma" and knobs["flexprefill"].high == 1.0


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda q, k: match_density("nope", q, k, 0.5, True), ValueError, "unknown attention method.*known: .*'flexprefill'"),
        (lambda q, k: match_density("flexprefill", q, k, 1.5, True), ValueError, "target_density must be in"),
        (
            lambda q, k: match_density("flexprefill", q, k, "0.5", True),
            TypeError,
            "target_density must be a number",
        ),
        (
            lambda q, k: match_density("flexprefill", q, k, 0.5, True, gamma=0.9),
            TypeError,
            "budget parameter 'gamma'",
        ),
        (lambda q, k: match_density("flexprefill", q, k, 0.5, True, tol=0), ValueError, "tol must be"),
        (lambda q, k: match_density("flexprefill", q, k, 0.5, "yes"), TypeError, "is_causal"),
        (
            lambda q, k: match_density("minference", q, k, 0.5, True, pattern="zigzag"),
            ValueError,
            "unknown pattern",
        ),
    ],
)
def test_bad_arguments(call, exc, match):
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 2, 300, 16, generator=g), torch.randn(1, 1, 300, 16, generator=g)
    with pytest.raises(exc, match=match):
        call(q, k)
