"""Token orders for visual tokens on 2-D (H, W) and 3-D (T, H, W) grids.

SpargeAttn (paper section 3.7) reorders the visual tokens of image and video models along a
Hilbert curve before attention, so that a block of 64 or 128 consecutive tokens is a compact patch
of the image or video and its queries/keys are similar (more self-similar blocks, higher sparsity).
The same permutation is applied to Q, K and V after positional encoding, and its inverse to the
attention output; attention itself is invariant to a common permutation of the keys and values, so
the result equals that of the unpermuted tokens up to the sparse approximation.

Orders (one string registry, ``get_order(name, grid)``):

- ``hilbert``: a generalized Hilbert curve for boxes of ANY size (not only powers of two).
- ``row-major``: the model's own order (time, then row, then column; the identity).
- ``column-major``: time, then column, then row (rows vary fastest).
- ``time-major``: row, then column, then time (time varies fastest; on a 2-D grid the same as
  ``row-major``).
- ``random``: a seeded uniform permutation (the paper's worst case).

Generalized Hilbert curve (our own construction from the "split the box, keep the endpoints on a
corner" idea of gilbert-style curves). A box is an origin cell plus three signed axes; the main axis
``a`` is the one along which the path travels: it starts at the origin corner and ends at the corner
one main-axis length away (``origin + (La - 1) * a``). A box is split recursively:

- ``split2``: the main axis is long: two halves along it, each traversed the same way.
- ``split3``: main axis ``a`` and one secondary ``b`` comparable: a U of three boxes in the a-b plane
  (down the first half of ``a`` along ``b``, across the far part along ``a``, back along ``-b``),
  the third axis kept whole; in 2-D this is the classic Hilbert step.
- ``split5``: all three comparable: five boxes (the 3-D Hilbert octant tour with some octants
  merged).

Consecutive boxes always meet at adjacent cells. A box admits a path between those two corners
with unit steps only if the colouring parity allows it: its main length is even, or all three
lengths are odd (and the main length is > 1 unless the box is a single line). Half lengths are
therefore rounded to even where that keeps every child admissible, and among the candidate
splits (best aspect ratio first) the first whose children are all admissible is used; the whole
grid starts on an even axis when it has one. Every step is between grid neighbours (Manhattan
distance 1) on all sizes checked: exhaustively all 2-D grids up to 40 x 40 and all 3-D boxes up to
9 x 9 x 9, 300 random boxes up to 40 x 40 x 40, and real latent grids such as 13 x 30 x 45 and
21 x 60 x 90 (the unit tests re-check all grids up to 12 x 12 and 5 x 5 x 5 plus a list of odd and
large sizes). We have no proof for every size: should some unchecked size fall through to a split
with an inadmissible child, the curve is still a bijection (checked on every build) and a warning
names the grid; only locality would suffer there.

Permutations are computed once per (order, grid, seed) on the CPU and cached per device.
``permute_tokens`` / ``unpermute_tokens`` apply an order to the token range
``[start, start + grid volume)`` of a ``(B, H, N, D)`` tensor, leaving text tokens before and after
that range untouched (joint text+image attention).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .registry import Registry

logger = logging.getLogger(__name__)

Grid = tuple[int, ...]
Vec = tuple[int, int, int]


@dataclass(frozen=True)
class TokenOrder:
    """A permutation of the cells of a grid.

    ``perm[i]`` is the row-major index of the i-th token in the new order, so
    ``x_new = x[..., perm, :]``; ``inv`` undoes it: ``x = x_new[..., inv, :]``.
    """

    name: str
    grid: Grid
    perm: torch.Tensor  # int64 (N,)
    inv: torch.Tensor  # int64 (N,)

    @property
    def num_tokens(self) -> int:
        return self.perm.numel()


# --------------------------------------------------------------------------------------------
# the generalized Hilbert curve
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Axis:
    unit: Vec  # a signed unit vector
    length: int

    def resized(self, length: int) -> _Axis:
        return _Axis(self.unit, length)

    def flipped(self, length: int | None = None) -> _Axis:
        return _Axis(_scale(self.unit, -1), self.length if length is None else length)


@dataclass(frozen=True)
class _Box:
    origin: Vec
    main: _Axis
    side1: _Axis
    side2: _Axis

    @property
    def lengths(self) -> tuple[int, int, int]:
        return self.main.length, self.side1.length, self.side2.length


def _scale(v: Vec, s: int) -> Vec:
    return (v[0] * s, v[1] * s, v[2] * s)


def _add(*vs: Vec) -> Vec:
    return (sum(v[0] for v in vs), sum(v[1] for v in vs), sum(v[2] for v in vs))


def _admissible(box: _Box) -> bool:
    """Whether a unit-step path from the origin to the far main-axis corner can exist (parity)."""
    la, lb, lc = box.lengths
    if min(la, lb, lc) < 1:
        return False
    if lb == 1 and lc == 1:
        return True
    if la % 2 == 0:
        return True
    return la > 1 and lb % 2 == 1 and lc % 2 == 1


def _halves(length: int) -> list[int]:
    """Candidate first-part lengths near ``length / 2`` (in 1..length-1), even ones first."""
    half = length // 2
    cands = {x for x in (half, half + 1, half - 1) if 1 <= x <= length - 1}
    return sorted(cands, key=lambda x: (x % 2, abs(2 * x - length), x))


def _split2(box: _Box, a2: int) -> list[_Box]:
    a, b, c = box.main, box.side1, box.side2
    return [_Box(box.origin, a.resized(a2), b, c),
            _Box(_add(box.origin, _scale(a.unit, a2)), a.resized(a.length - a2), b, c)]


def _split3(box: _Box, b: _Axis, c: _Axis, a2: int, b2: int) -> list[_Box]:
    """U-turn in the (main, b) plane; c is kept whole."""
    o, a = box.origin, box.main
    far_a = _scale(a.unit, a.length - 1)
    return [
        _Box(o, b.resized(b2), a.resized(a2), c),
        _Box(_add(o, _scale(b.unit, b2)), a, b.resized(b.length - b2), c),
        _Box(_add(o, far_a, _scale(b.unit, b2 - 1)), b.flipped(b2), a.flipped(a.length - a2), c),
    ]


def _split5(box: _Box, b: _Axis, c: _Axis, a2: int, b2: int, c2: int) -> list[_Box]:
    """Five boxes covering the eight octants (two pairs merged), a 3-D Hilbert step."""
    o, a = box.origin, box.main
    far_a, far_c = _scale(a.unit, a.length - 1), _scale(c.unit, c.length - 1)
    return [
        _Box(o, b.resized(b2), c.resized(c2), a.resized(a2)),
        _Box(_add(o, _scale(b.unit, b2)), c, a.resized(a2), b.resized(b.length - b2)),
        _Box(_add(o, _scale(b.unit, b2 - 1), far_c), a, b.flipped(b2), c.flipped(c.length - c2)),
        _Box(_add(o, far_a, _scale(b.unit, b2), far_c), c.flipped(), a.flipped(a.length - a2),
             b.resized(b.length - b2)),
        _Box(_add(o, far_a, _scale(b.unit, b2 - 1)), b.flipped(b2), a.flipped(a.length - a2), c.resized(c2)),
    ]


def _candidate_splits(box: _Box) -> list[list[_Box]]:
    """Every split worth trying for a box, the best-shaped (most cube-like children) first."""
    a, s1, s2 = box.main, box.side1, box.side2
    b, c = (s1, s2) if s1.length >= s2.length else (s2, s1)
    la, lb, lc = a.length, b.length, c.length
    two = [_split2(box, a2) for a2 in _halves(la)] if la >= 2 else []
    three = [_split3(box, b, c, a2, b2) for b2 in _halves(lb) for a2 in _halves(la)] if la >= 2 and lb >= 2 else []
    three_c = [_split3(box, c, b, a2, c2) for c2 in _halves(lc) for a2 in _halves(la)] if la >= 2 and lc >= 2 else []
    five = ([_split5(box, b, c, a2, b2, c2) for b2 in _halves(lb) for c2 in _halves(lc) for a2 in _halves(la)]
            if la >= 2 and lb >= 2 and lc >= 2 else [])
    if 2 * la > 3 * lb:  # long main axis: cut it
        return two + three + five + three_c
    if lc == 1 or 2 * lb > 3 * lc:  # flat in c: a 2-D Hilbert step
        return three + five + two + three_c
    return five + three + three_c + two


def _walk(box: _Box, out: list[Vec], grid_name: Grid) -> None:
    la, lb, lc = box.lengths
    if lb == 1 and lc == 1:
        out.extend(_add(box.origin, _scale(box.main.unit, i)) for i in range(la))
        return
    candidates = _candidate_splits(box)
    if not candidates:  # main length 1 with a wider side: cannot end where it started
        logger.warning("hilbert order for grid %s: a %s box cannot be walked corner to corner; "
                       "using a line sweep there (locality degrades locally)", grid_name, box.lengths)
        _sweep(box, out)
        return
    chosen = next((kids for kids in candidates if all(_admissible(k) for k in kids)), None)
    if chosen is None:
        logger.warning("hilbert order for grid %s: no parity-admissible split of a %s box; "
                       "a non-unit step follows", grid_name, box.lengths)
        chosen = candidates[0]
    for kid in chosen:
        _walk(kid, out, grid_name)


def _sweep(box: _Box, out: list[Vec]) -> None:
    """A boustrophedon over a box (fallback only)."""
    a, b, c = box.main, box.side1, box.side2
    for k in range(c.length):
        for j in range(b.length):
            rng = range(a.length) if (j + k) % 2 == 0 else range(a.length - 1, -1, -1)
            for i in rng:
                out.append(_add(box.origin, _scale(a.unit, i), _scale(b.unit, j), _scale(c.unit, k)))


def hilbert_cells(grid: Grid) -> list[Vec]:
    """The cells ``(t, h, w)`` of a 2-D ``(H, W)`` or 3-D ``(T, H, W)`` grid along the curve."""
    dims = _grid3(grid)
    units = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    # start along an even axis when there is one (else all are odd and any axis is admissible);
    # among those, the longest, which gives the best-shaped first split
    order = sorted(range(3), key=lambda i: (dims[i] % 2, -dims[i]))
    axes = [_Axis(units[i], dims[i]) for i in order]
    box = _Box((0, 0, 0), axes[0], axes[1], axes[2])
    out: list[Vec] = []
    _walk(box, out, tuple(grid))
    return out


# --------------------------------------------------------------------------------------------
# the orders and their registry
# --------------------------------------------------------------------------------------------
def _grid3(grid: Grid) -> tuple[int, int, int]:
    grid = tuple(grid)
    if len(grid) == 2:
        grid = (1, *grid)
    if len(grid) != 3 or any(not isinstance(g, int) or isinstance(g, bool) or g < 1 for g in grid):
        raise ValueError(f"grid must be (H, W) or (T, H, W) of positive ints, got {grid!r}")
    return grid  # type: ignore[return-value]


def _hilbert_perm(grid: Grid, seed: int) -> torch.Tensor:
    _, h, w = _grid3(grid)
    cells = torch.tensor(hilbert_cells(grid), dtype=torch.int64).reshape(-1, 3)
    return (cells[:, 0] * h + cells[:, 1]) * w + cells[:, 2]


def _axis_perm(*fastest_last: int) -> Callable[[Grid, int], torch.Tensor]:
    """Lexicographic order over the axes listed (indices into (T, H, W)), the last varying fastest."""

    def build(grid: Grid, seed: int) -> torch.Tensor:
        dims = _grid3(grid)
        idx = torch.arange(math.prod(dims)).reshape(dims)
        return idx.permute(*fastest_last).reshape(-1).clone()

    return build


def _random_perm(grid: Grid, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(math.prod(_grid3(grid)), generator=g)


ORDERS: Registry[Callable[[Grid, int], torch.Tensor]] = Registry("token order")
ORDERS.add("hilbert", _hilbert_perm)
ORDERS.add("row-major", _axis_perm(0, 1, 2))
ORDERS.add("column-major", _axis_perm(0, 2, 1))
ORDERS.add("time-major", _axis_perm(1, 2, 0))
ORDERS.add("random", _random_perm)

_CACHE: dict[tuple, TokenOrder] = {}


def order_names() -> list[str]:
    return ORDERS.names()


def get_order(name: str, grid: Grid, *, device: torch.device | str | None = None, seed: int = 0) -> TokenOrder:
    """The ``name`` order of a ``(H, W)`` or ``(T, H, W)`` grid, cached per grid, seed and device."""
    build = ORDERS.get(name)  # unknown names raise, listing the known orders
    grid = tuple(grid)
    _grid3(grid)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (name, grid, seed if name == "random" else 0, str(dev))
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    cpu_key = (*key[:3], "cpu")
    base = _CACHE.get(cpu_key)
    if base is None:
        perm = build(grid, seed)
        _check_bijection(perm, math.prod(_grid3(grid)), name, grid)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        base = _CACHE[cpu_key] = TokenOrder(name, grid, perm, inv)
    if dev.type == "cpu":
        return base
    order = _CACHE[key] = TokenOrder(name, grid, base.perm.to(dev), base.inv.to(dev))
    return order


def clear_cache() -> None:
    _CACHE.clear()


def _check_bijection(perm: torch.Tensor, n: int, name: str, grid: Grid) -> None:
    if perm.numel() != n or not torch.equal(torch.sort(perm).values, torch.arange(n)):
        raise RuntimeError(f"order {name!r} on grid {grid} is not a permutation of {n} tokens (a bug)")


# --------------------------------------------------------------------------------------------
# applying an order to (B, H, N, D) tensors
# --------------------------------------------------------------------------------------------
def _apply(x: torch.Tensor, index: torch.Tensor, start: int) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"expected a (B, H, N, D) tensor, got shape {tuple(x.shape)}")
    n = index.numel()
    if start < 0 or start + n > x.shape[2]:
        raise ValueError(f"visual-token range [{start}, {start + n}) does not fit in {x.shape[2]} tokens")
    index = index.to(x.device)
    if start == 0 and n == x.shape[2]:
        return x.index_select(2, index)
    visual = x[:, :, start:start + n].index_select(2, index)
    return torch.cat([x[:, :, :start], visual, x[:, :, start + n:]], dim=2)


def permute_tokens(x: torch.Tensor, order: TokenOrder, start: int = 0) -> torch.Tensor:
    """Reorder tokens ``[start, start + order.num_tokens)`` of ``x (B, H, N, D)``; others stay put."""
    return _apply(x, order.perm, start)


def unpermute_tokens(x: torch.Tensor, order: TokenOrder, start: int = 0) -> torch.Tensor:
    """Undo ``permute_tokens`` with the same ``order`` and ``start``."""
    return _apply(x, order.inv, start)


__all__ = ["TokenOrder", "clear_cache", "get_order", "hilbert_cells", "order_names", "permute_tokens",
           "unpermute_tokens"]
