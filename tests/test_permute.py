"""Token orders (sparge_core.permute): bijection, Hilbert locality on any grid size, inverses,
the visual-token range of joint text+image sequences, caching."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sparge_core import permute as P

ODD_AND_EVEN_2D = [(1, 1), (1, 7), (7, 1), (2, 2), (3, 5), (5, 3), (4, 6), (6, 9), (13, 30), (30, 13), (32, 32),
                   (17, 17), (2, 31), (64, 48)]
GRIDS_3D = [(1, 1, 1), (1, 4, 5), (2, 2, 2), (3, 3, 3), (5, 7, 9), (4, 6, 8), (2, 9, 3), (16, 16, 16), (13, 30, 45),
            (9, 2, 2)]


def _coords(grid):
    t, h, w = (1, *grid) if len(grid) == 2 else grid
    idx = torch.arange(t * h * w)
    return torch.stack([idx // (h * w), (idx // w) % h, idx % w], dim=1)


def _steps(order):
    """Manhattan length of every step between consecutive tokens of an order, on its grid."""
    c = _coords(order.grid)[order.perm]
    return (c[1:] - c[:-1]).abs().sum(dim=1)


@pytest.mark.parametrize("name", P.order_names())
@pytest.mark.parametrize("grid", ODD_AND_EVEN_2D + GRIDS_3D)
def test_every_order_is_a_bijection_with_its_inverse(name, grid):
    o = P.get_order(name, grid, seed=3)
    n = math.prod(grid)
    assert o.perm.dtype == torch.int64 and o.perm.shape == (n,)
    assert torch.equal(torch.sort(o.perm).values, torch.arange(n))
    assert torch.equal(o.perm[o.inv], torch.arange(n))
    assert torch.equal(o.inv[o.perm], torch.arange(n))


@pytest.mark.parametrize("grid", ODD_AND_EVEN_2D + GRIDS_3D)
def test_hilbert_steps_are_between_grid_neighbours(grid):
    steps = _steps(P.get_order("hilbert", grid))
    if steps.numel():
        assert int(steps.max()) == 1 and int(steps.min()) == 1


def test_hilbert_is_local_on_all_small_boxes():
    # every 2-D grid up to 12 x 12 and every 3-D box up to 5 x 5 x 5: unit steps only
    sizes = [(h, w) for h in range(1, 13) for w in range(1, 13)]
    sizes += list(itertools.product(range(1, 6), repeat=3))
    for grid in sizes:
        cells = P.hilbert_cells(grid)
        assert len(set(cells)) == len(cells) == math.prod(grid), grid
        for a, b in itertools.pairwise(cells):
            assert sum(abs(x - y) for x, y in zip(a, b)) == 1, (grid, a, b)


def test_hilbert_on_power_of_two_square_is_the_hilbert_curve():
    # 4 x 4 quadrant structure: each run of 4 tokens fills one 2 x 2 quadrant, and the curve ends on
    # the corner next to its start (the classic U shape)
    o = P.get_order("hilbert", (4, 4))
    c = _coords((4, 4))[o.perm][:, 1:]
    for q in range(4):
        quad = c[4 * q:4 * q + 4] // 2
        assert (quad == quad[0]).all()
    assert c[0].tolist() == [0, 0] and (c[-1] - c[0]).abs().sum() == 3


@pytest.mark.parametrize("grid", [(32, 32), (16, 16, 16), (13, 30, 45)])
def test_hilbert_blocks_are_more_compact_than_row_major(grid):
    def mean_extent(order, block=64):
        c = _coords(grid)[order.perm].float()
        ext = [(c[s:s + block].amax(0) - c[s:s + block].amin(0) + 1).sum() for s in range(0, len(c), block)]
        return float(torch.stack(ext).mean())

    assert mean_extent(P.get_order("hilbert", grid)) < 0.7 * mean_extent(P.get_order("row-major", grid))


def test_axis_orders_match_their_definition():
    t, h, w = 2, 3, 4
    idx = torch.arange(t * h * w).reshape(t, h, w)
    assert torch.equal(P.get_order("row-major", (t, h, w)).perm, idx.reshape(-1))
    assert torch.equal(P.get_order("column-major", (t, h, w)).perm, idx.permute(0, 2, 1).reshape(-1))
    assert torch.equal(P.get_order("time-major", (t, h, w)).perm, idx.permute(1, 2, 0).reshape(-1))
    # consecutive tokens of column-major differ by one row; of time-major by one frame
    assert set(_steps(P.get_order("column-major", (1, 5, 1))).tolist()) == {1}
    assert _steps(P.get_order("time-major", (t, h, w)))[0] == 1


def test_random_order_depends_on_seed_only():
    a, b = P.get_order("random", (5, 7), seed=1), P.get_order("random", (5, 7), seed=1)
    c = P.get_order("random", (5, 7), seed=2)
    assert torch.equal(a.perm, b.perm) and not torch.equal(a.perm, c.perm)


@pytest.mark.parametrize("name", ["hilbert", "random", "column-major"])
def test_permute_tokens_touches_only_the_visual_range(name):
    g = torch.Generator().manual_seed(0)
    grid, n_text_before, n_text_after = (3, 5, 7), 11, 4
    n_vis = math.prod(grid)
    x = torch.randn(2, 3, n_text_before + n_vis + n_text_after, 8, generator=g)
    o = P.get_order(name, grid, seed=5)
    y = P.permute_tokens(x, o, start=n_text_before)
    assert torch.equal(y[:, :, :n_text_before], x[:, :, :n_text_before])
    assert torch.equal(y[:, :, n_text_before + n_vis:], x[:, :, n_text_before + n_vis:])
    vis = x[:, :, n_text_before:n_text_before + n_vis]
    assert torch.equal(y[:, :, n_text_before:n_text_before + n_vis], vis[:, :, o.perm])
    assert not torch.equal(y, x)
    assert torch.equal(P.unpermute_tokens(y, o, start=n_text_before), x)


def test_permutation_commutes_with_attention():
    # permuting q, k, v by the same order and un-permuting the output is exact for dense attention
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 35, 16, generator=g, dtype=torch.float64) for _ in range(3))
    o = P.get_order("hilbert", (5, 7))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = torch.nn.functional.scaled_dot_product_attention(*(P.permute_tokens(t, o) for t in (q, k, v)))
    assert torch.allclose(P.unpermute_tokens(out, o), ref, atol=1e-12)


def test_orders_are_cached_per_grid_and_device():
    P.clear_cache()
    a = P.get_order("hilbert", (13, 30))
    assert P.get_order("hilbert", (13, 30)) is a
    assert P.get_order("hilbert", [13, 30], device="cpu") is a
    assert P.get_order("hilbert", (30, 13)) is not a
    assert P.get_order("random", (13, 30), seed=1) is not P.get_order("random", (13, 30), seed=2)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown token order"):
        P.get_order("zigzag", (4, 4))
    with pytest.raises(ValueError, match="grid must be"):
        P.get_order("hilbert", (4, 0))
    with pytest.raises(ValueError, match="does not fit"):
        P.permute_tokens(torch.randn(1, 1, 10, 4), P.get_order("hilbert", (3, 3)), start=2)
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        P.permute_tokens(torch.randn(9, 4), P.get_order("hilbert", (3, 3)))
