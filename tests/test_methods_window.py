"""Every method with a causal sliding window: maps inside the window's block band, keep-everything
configurations equal to SDPA with the same window, sparse ones skipping blocks; hyperparameters
validated when a method is built, and a call that reads no tensor on the host."""

import pytest
import torch

from helpers import rand_qkv, rel_l1
from sparge_core import block_sparse_attn
from sparge_core.methods import get_method, method_names
from sparge_core.ops import reference as R
from sparge_core.synthetic import structured_qkv

N, WINDOW = 1100, 300
KEEP_ALL = {
    "dense": {},
    "sparge": dict(cdfthreshd=1.0),
    "sparge-topk": dict(topk=1.0),
    "minference": dict(budget_ratio=1e6),
    "flexprefill": dict(gamma=1.0),
    "sparge-budget": dict(density=1.0),
}
SPARSE = {
    "sparge": dict(simthreshd1=-1.0, cdfthreshd=0.5),
    "sparge-topk": dict(simthreshd1=-1.0, topk=0.3),
    "minference": dict(vertical_size=64, slash_size=64),
    "flexprefill": dict(gamma=0.5, min_budget=128),
    "sparge-budget": dict(density=0.4, local_blocks=1),
}


def _sdpa_window(q, k, v, window):
    group = q.shape[1] // k.shape[1]
    allowed = R.causal_token_mask(q.shape[2], k.shape[2], window=window)
    return torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1),
        attn_mask=allowed)


def test_every_registered_method_is_covered():
    assert set(KEEP_ALL) == set(method_names()) and set(SPARSE) == set(method_names()) - {"dense"}


@pytest.mark.parametrize("name", sorted(KEEP_ALL))
def test_keep_everything_with_window_equals_sdpa(name):
    q, k, v = rand_qkv(1, 4, 2, N, N, 64, dtype=torch.float32, seed=5)
    method = get_method(name, **KEEP_ALL[name])
    mask = method.block_mask(q, k, is_causal=True, window=WINDOW)
    band = R.allowed_block_mask(N, N, True, window=WINDOW)
    assert torch.equal(mask, band.expand_as(mask))
    out, stats = method.attend(q, k, v, is_causal=True, window=WINDOW, backend="reference")
    torch.testing.assert_close(out.double(), _sdpa_window(q, k, v, WINDOW), rtol=1e-4, atol=1e-5)
    assert stats.qk_sparsity == 0.0  # counted against the band, not the causal triangle


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_sparse_methods_with_window_stay_in_the_band_and_skip_blocks(name):
    q, k, v = structured_qkv(1, 4, 2, 2048, 64, dtype=torch.float32, seed=3)
    window = 700
    method = get_method(name, **SPARSE[name])
    mask = method.block_mask(q, k, is_causal=True, window=window)
    band = R.allowed_block_mask(2048, 2048, True, window=window)
    assert not (mask & ~band).any()
    diagonal = R.causal_diagonal_block_mask(2048, 2048, R.BLOCK_Q, R.BLOCK_K)
    assert mask[..., diagonal].all()
    out, stats = method.attend(q, k, v, is_causal=True, window=window, backend="reference")
    assert stats.qk_sparsity > 0.1
    # exactly sliding-window attention restricted to the method's map
    again = block_sparse_attn(q, k, v, mask, is_causal=True, window=window, pvthreshd=method._stage2(),
                              backend="reference")
    assert rel_l1(out, again) < 1e-6


def test_window_needs_causal_for_every_method():
    q, k, _ = rand_qkv(1, 2, 2, 256, 256, 64, dtype=torch.float32)
    for name in ("minference", "flexprefill", "sparge", "sparge-budget"):
        with pytest.raises(ValueError, match="is_causal=True only"):
            get_method(name).block_mask(q, k, is_causal=False, window=64)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(cdfthreshd=1.5), r"cdfthreshd must be in \[0.0, 1.0\]"),
    (dict(simthreshd1=[0.1, float("nan")]), "simthreshd1 must be finite"),
    (dict(pvthreshd=-1.0), "pvthreshd must be in"),
    (dict(estimator="max"), "estimator must be one of"),
])
def test_sparge_validates_when_built(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        get_method("sparge", **kwargs)


def test_a_method_call_reads_no_tensor_on_the_host(monkeypatch, device):
    """The per-call path of a built method (validation, hyperparameters, prediction, attention with the
    reference kernels) never calls .item/.tolist/bool()/int()/float()/nonzero on a tensor from
    sparge_core: on a GPU each would wait for the device."""
    import sys

    calls = []

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            if "sparge_core" in frame.f_code.co_filename:
                calls.append(f"{name} at {frame.f_code.co_filename}:{frame.f_lineno}")
            return original(self, *args, **kwargs)
        return wrapper

    method = get_method("sparge-topk", simthreshd1=[-0.1, 0.2, 0.3, 0.0], topk=[0.3, 0.5, 0.2, 0.4],
                        pvthreshd=[20.0] * 4)
    # the Triton executor is the GPU hot path (on a CPU-only machine under the interpreter); the reference
    # executor is a float32 oracle that checks its inputs for non-finite values on the host
    q, k, v = (t.to(device) for t in structured_qkv(1, 4, 2, 700, 64, dtype=torch.float16, seed=1))
    method(q, k, v, is_causal=True, backend="triton", window=300)  # fills the device-value cache
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    out, stats = method(q, k, v, is_causal=True, backend="triton", return_stats=True, window=300)
    method(q, k, v, is_causal=True, backend="triton")
    assert calls == []
    monkeypatch.undo()
    assert torch.isfinite(out).all() and stats.qk_sparsity > 0
