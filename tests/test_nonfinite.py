"""Non-finite inputs propagate exactly as in dense attention over the kept blocks, on every backend.

The oracle is plain softmax attention in float64 over the kept blocks: a NaN or Inf logit (from Q or
K) reaches exactly the rows that attend that key (kept block and causal triangle); a NaN or Inf in V
reaches the rows of every query block that computes its key block (P.V is a block product, and a
zero probability times NaN is NaN, as in any dense kernel; torch's SDPA spreads it to every row),
and never a row whose query block does not compute that key block. The PV skip (stage 2) must not
hide a NaN: a block in which a row has a NaN logit is always computed.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import rand_qkv
from sparge_core import block_sparse_attn, sparge_attn
from sparge_core.ops import reference as R

BACKENDS = ["reference", "triton"]
# The Triton backend runs compiled on a GPU when there is one (fp16 operands there: fp32 inputs would
# compute in bf16), else under the interpreter on CPU in fp32.
GPU = torch.cuda.is_available()
NQ = NK = 320  # 3 query blocks (the last partial), 5 key blocks
SCALE = 0.125


def oracle(q, k, v, mask, *, is_causal):
    """Dense float64 attention over the kept blocks; a key block a query block does not compute
    contributes nothing at all to its rows."""
    b, hq, nq, d = q.shape
    group = hq // k.shape[1]
    kf = k.double().repeat_interleave(group, 1)
    vf = v.double().repeat_interleave(group, 1)
    nk = k.shape[2]
    if is_causal:
        mask = mask & R.causal_block_mask(nq, nk, R.BLOCK_Q, R.BLOCK_K)
    computed = mask.repeat_interleave(R.BLOCK_Q, 2)[:, :, :nq].repeat_interleave(R.BLOCK_K, 3)[..., :nk]
    allowed = computed & R.causal_token_mask(nq, nk) if is_causal else computed
    scores = (q.double() @ kf.transpose(-1, -2)) * SCALE
    scores = scores.masked_fill(~allowed, -math.inf)
    p = torch.softmax(scores, dim=-1)
    p = torch.where(allowed.any(-1, keepdim=True), p, torch.zeros_like(p))  # rows that see nothing: zeros
    terms = torch.where(computed[..., None], p[..., None] * vf[:, :, None], torch.zeros((), dtype=torch.float64))
    return terms.sum(dim=3)


def _mask(seed: int = 0) -> torch.Tensor:
    """Query block 0 keeps key blocks 0, 1; block 1 keeps 0, 2, 3; block 2 keeps 0, 1, 4 (2 heads)."""
    m = torch.zeros(1, 2, 3, 5, dtype=torch.bool)
    m[..., 0, [0, 1]] = True
    m[..., 1, [0, 2, 3]] = True
    m[..., 2, [0, 1, 4]] = True
    return m


def _inputs(seed=0):
    return rand_qkv(1, 2, 1, NQ, NK, 64, dtype=torch.float32, seed=seed)


def _on_backend(backend, *tensors):
    """The tensors as the backend computes on them: CUDA fp16 for Triton on a GPU, unchanged otherwise."""
    if backend != "triton" or not GPU:
        return tensors
    return tuple(t.cuda() if t.dtype == torch.bool else t.to("cuda", torch.float16) for t in tensors)


def _tolerance(backend):
    return {"rtol": 1e-2, "atol": 2e-3} if backend == "triton" and GPU else {"rtol": 2e-3, "atol": 2e-4}


def _run(backend, q, k, v, mask, *, causal, pv, **kw):
    q, k, v, mask = _on_backend(backend, q, k, v, mask)
    if isinstance(pv, torch.Tensor):
        pv = pv.to(q.device)
    res = block_sparse_attn(q, k, v, mask, is_causal=causal, scale=SCALE, pvthreshd=pv, quant="none",
                            backend=backend, **kw)
    return (res[0].float().cpu(), res[1]) if kw.get("return_stats") else res.float().cpu()


def _same_nonfinite_pattern(out, want):
    out, want = out.double(), want
    assert torch.equal(torch.isnan(out), torch.isnan(want)), "NaN entries differ from dense attention"
    assert torch.equal(torch.isposinf(out), torch.isposinf(want)), "+inf entries differ from dense attention"
    assert torch.equal(torch.isneginf(out), torch.isneginf(want)), "-inf entries differ from dense attention"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("where,value", [("v", math.nan), ("v", math.inf), ("v", -math.inf), ("k", math.nan),
                                         ("k", math.inf), ("q", math.nan)])
def test_non_finite_input_reaches_exactly_the_rows_that_attend_it(backend, causal, where, value):
    q, k, v = _inputs()
    # key 200 sits in key block 3, which only query block 1 keeps; query row 150 is in block 1
    {"q": q, "k": k, "v": v}[where][0, 0, 150 if where == "q" else 200, 5] = value
    mask = _mask()
    want = oracle(q, k, v, mask, is_causal=causal)
    assert not torch.isfinite(want).all()  # the case is not vacuous
    for pv in (None, 50.0):
        out = _run(backend, q, k, v, mask, causal=causal, pv=pv)
        _same_nonfinite_pattern(out, want)
        finite = torch.isfinite(want)
        torch.testing.assert_close(out.double()[finite], want[finite], **_tolerance(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_v_outside_the_kept_blocks_changes_nothing(backend, causal):
    q, k, v = _inputs(seed=1)
    mask = _mask()
    clean = _run(backend, q, k, v, mask, causal=causal, pv=None)
    for value in (math.nan, math.inf):
        bad = v.clone()
        bad[0, 0, 200:256] = value  # key block 3: only query block 1 keeps it
        out = _run(backend, q, k, bad, mask, causal=causal, pv=None)
        assert torch.isfinite(out[:, :, :128]).all() and torch.isfinite(out[:, :, 256:]).all()
        torch.testing.assert_close(out[:, :, :128], clean[:, :, :128], **_tolerance(backend))
        torch.testing.assert_close(out[:, :, 256:], clean[:, :, 256:], **_tolerance(backend))
        assert not torch.isfinite(out[:, :, 128:256]).all()


def _skip_friendly_inputs():
    """Key block 0 carries logits ~29 (base 2) above the rest for every query, so a PV skip threshold
    of 12 drops every later key block (2 query blocks x 4 key blocks, non-causal)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 256, 64, generator=g) * 0.3
    q[..., 0] += 4.0
    k = torch.randn(1, 1, 256, 64, generator=g) * 0.3
    k[:, :, :64, 0] += 40.0
    v = torch.randn(1, 1, 256, 64, generator=g)
    return q, k, v


PV = torch.tensor([12.0])
FULL = torch.ones(1, 1, 2, 4, dtype=torch.bool)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["nan", "posinf"])
def test_pv_skip_never_hides_a_non_finite_logit(backend, what):
    q, k, v = _skip_friendly_inputs()
    _, counts = R.masked_attention(q, k, v, FULL, is_causal=False, scale=SCALE, pvthreshd=PV)
    assert counts.pv_skipped.item() == 6, "the inputs must make stage 2 skip every later block"
    bad_k = k.clone()
    bad_k[0, 0, 150] = 0.0
    bad_k[0, 0, 150, 0] = math.nan if what == "nan" else math.inf  # key 150 (block 2): NaN / +inf logit in every row
    want = oracle(q, bad_k, v, FULL, is_causal=False)
    assert torch.isnan(want).all()  # every row attends key 150: dense attention is NaN everywhere
    out = _run(backend, q, bad_k, v, FULL, causal=False, pv=PV)
    _same_nonfinite_pattern(out, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_already_nan_does_not_change_the_other_rows_skips(backend):
    q, k, v = _skip_friendly_inputs()
    q[0, 0, 10] = math.nan  # one row of query block 0 is NaN from its first block on: it no longer votes
    ref, counts = R.masked_attention(q, k, v, FULL, is_causal=False, scale=SCALE, pvthreshd=PV)
    out, stats = _run(backend, q, k, v, FULL, causal=False, pv=PV, return_stats=True)
    assert counts.pv_skipped.item() == 6  # both query blocks still skip their 3 later blocks
    assert torch.equal(stats.pv_skipped_blocks.cpu(), counts.pv_skipped)
    assert torch.isnan(out[0, 0, 10]).all() and torch.isfinite(out[0, 0, :10]).all()
    assert torch.isfinite(out[0, 0, 11:]).all()
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], **_tolerance(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparge_attn_end_to_end_propagates_a_nan_in_k(backend):
    q, k, v = rand_qkv(1, 2, 1, NQ, NK, 64, dtype=torch.float32, seed=4)
    k[0, 0, 200, 3] = math.nan
    q, k, v = _on_backend(backend, q, k, v)
    out = sparge_attn(q, k, v, is_causal=True, backend=backend).float().cpu()
    q, k, v = (t.float().cpu() for t in (q, k, v))
    full = torch.ones(1, 2, 3, 5, dtype=torch.bool)
    want = oracle(q, k, v, full, is_causal=True)
    _same_nonfinite_pattern(out, want)
