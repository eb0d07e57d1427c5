"""BlockCounts: given or computed on first read, once."""

import torch

from sparge_core.ops.blocks import BlockCounts
from sparge_core.stats import SparsityStats


def test_lazy_counts_are_computed_once_and_only_when_read():
    calls = []
    gen = torch.Generator().manual_seed(7)
    computed = torch.randint(1, 50, (2, 3), generator=gen)

    def make():
        calls.append(1)
        return torch.full_like(computed, 60), computed, computed // 4

    counts = BlockCounts.lazy(make)
    assert calls == [] and "not computed" in repr(counts)
    assert torch.equal(counts.computed, computed)
    assert torch.equal(counts.allowed, torch.full_like(computed, 60))
    assert torch.equal(counts.pv_skipped, computed // 4)
    assert calls == [1]
    stats = SparsityStats.from_counts(counts)
    assert abs(stats.qk_sparsity - float((60 - computed).sum()) / (60 * computed.numel())) < 1e-12
    assert calls == [1]


def test_given_counts_are_returned_as_given():
    a, c, p = (torch.arange(6).view(2, 3) + i for i in range(3))
    counts = BlockCounts(allowed=a, computed=c, pv_skipped=p)
    assert counts.allowed is a and counts.computed is c and counts.pv_skipped is p
