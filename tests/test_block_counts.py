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


def test_counts_from_rows_sum_each_rows_counts():
    gen = torch.Generator().manual_seed(11)
    a, b = (torch.randint(0, 9, (2, 3, 5), generator=gen, dtype=torch.int32) for _ in range(2))
    skipped = torch.randint(0, 3, (2, 3, 5), generator=gen, dtype=torch.int32)
    counts = BlockCounts.from_rows(40, (a, b), skipped)
    assert torch.equal(counts.computed, a.long().sum(-1) + b.long().sum(-1))
    assert torch.equal(counts.pv_skipped, skipped.long().sum(-1))
    assert torch.equal(counts.allowed, torch.full((2, 3), 40, dtype=torch.long))
    assert counts.computed.dtype == counts.allowed.dtype == counts.pv_skipped.dtype == torch.long
    no_stage2 = BlockCounts.from_rows(40, (a,))
    assert torch.equal(no_stage2.pv_skipped, torch.zeros(2, 3, dtype=torch.long))
