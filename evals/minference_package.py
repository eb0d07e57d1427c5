"""The original MInference / FlexPrefill code of the ``minference`` PyPI package (0.1.6.0), called on
our Q/K/V, with hooks that record the indices it builds; and the mask/token accounting that
compares its masks with ours on the 128 x 64 block grid (``scripts/crosscheck_minference.py``).

The package is never modified: hooks wrap its index functions, record their results and call them
unchanged. When importing ``minference`` as a whole fails (its model-patching modules import many
transformers internals), the needed submodules are imported under a bare parent package
(``import_mode`` records which). The package needs CUDA and its compiled ``minference.cuda``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sparge_core.methods import _blockmaps as bm
from sparge_core.ops import reference as R

PKG_BLOCK = 64  # the package's vertical-slash and block-sparse tiles are 64 x 64
FLEX_BLOCK = 128


def mask_overlap(ours: torch.Tensor, pkg: torch.Tensor, allowed: torch.Tensor) -> dict[str, float]:
    a, b = ours & allowed, pkg & allowed
    inter, union = (a & b).sum().item(), (a | b).sum().item()
    return {
        "mask_iou": inter / union if union else 1.0,
        "pkg_in_ours": inter / b.sum().item() if b.any() else 1.0,
        "ours_in_pkg": inter / a.sum().item() if a.any() else 1.0,
    }


def set_jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over (batch, head) of |a & b| / |a | b| for bool ``(B, H, L)``."""
    inter = (a & b).sum(-1).double()
    union = (a | b).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean().item()


_PAIR_CACHE: dict[tuple, torch.Tensor] = {}


def block_pair_counts(nq: int, nk: int, device) -> torch.Tensor:
    """``(nqb, nkb)``: causal (query, key) pairs inside every block of the 128 x 64 grid."""
    key = (nq, nk, str(device))
    if key not in _PAIR_CACHE:
        pos = torch.arange(nq, device=device) + (nk - nq)  # last key each row sees
        k_first = torch.arange(R.num_blocks(nk, R.BLOCK_K), device=device) * R.BLOCK_K
        k_last = torch.clamp(k_first + R.BLOCK_K, max=nk) - 1
        per_row = (torch.minimum(pos[:, None], k_last[None, :]) - k_first[None, :] + 1).clamp(
            min=0
        )  # (nq, nkb)
        pad = R.num_blocks(nq, R.BLOCK_Q) * R.BLOCK_Q - nq
        per_row = torch.nn.functional.pad(per_row, (0, 0, 0, pad))
        _PAIR_CACHE[key] = per_row.reshape(-1, R.BLOCK_Q, per_row.shape[-1]).sum(1)
    return _PAIR_CACHE[key]


def token_density_of_blocks(mask: torch.Tensor, nq: int, nk: int) -> float:
    """Computed causal pairs of a block map over all causal pairs."""
    pairs = block_pair_counts(nq, nk, mask.device)
    total = pairs.sum().item() * mask.shape[0] * mask.shape[1]
    return (mask.long() * pairs).sum().item() / total


def token_density_of_rows(keys_per_row_block: torch.Tensor, block_m: int, n: int) -> float:
    """Causal pairs computed by a kernel whose row block ``r`` (``block_m`` rows) touches the keys
    ``keys_per_row_block[..., r, :]`` (bool ``(B, H, rows, N)``), over all causal pairs."""
    prefix = torch.nn.functional.pad(
        keys_per_row_block.long().cumsum(-1), (1, 0)
    )  # [..., x] = touched keys < x
    rows = torch.arange(n, device=prefix.device)
    computed = prefix[:, :, rows // block_m, rows + 1].sum().item()  # row i: touched keys <= i
    total = n * (n + 1) // 2 * keys_per_row_block.shape[0] * keys_per_row_block.shape[1]
    return computed / total


def rows_to_grid(keys_per_row_block: torch.Tensor, block_m: int, nq: int, nk: int) -> torch.Tensor:
    """Cover of a per-row-block key set ``(B, H, rows, N)`` (``block_m`` divides BLOCK_Q) on our grid."""
    b, h, rows, n = keys_per_row_block.shape
    nqb, nkb = R.num_blocks(nq, R.BLOCK_Q), R.num_blocks(nk, R.BLOCK_K)
    ratio = R.BLOCK_Q // block_m
    keys = torch.nn.functional.pad(keys_per_row_block, (0, nkb * R.BLOCK_K - n, 0, nqb * ratio - rows))
    grid = keys.reshape(b, h, nqb, ratio, nkb, R.BLOCK_K).any(-1).any(3)
    return grid & R.allowed_block_mask(nq, nk, True, device=keys.device)


@dataclass
class PkgResult:
    """What one package call produced: its output (None if its kernel failed), the cover of the
    (query, key) pairs it computes on our grid, their token density, recorded extras, the error."""

    out: torch.Tensor | None
    grid: torch.Tensor | None
    token_density: float | None
    extra: dict
    error: str | None


class _Availability(tuple):
    """transformers >= 5 returns ``(available, version)`` from ``_is_package_available``; MInference
    0.1.6.0 tests the result for truth (``if _is_package_available("vllm"):``), which a non-empty tuple
    always passes, so it imports vllm / kivi_gemv that are not there. This tuple is falsy when the
    package is absent, and still indexes like the original for transformers' own callers."""

    def __bool__(self) -> bool:
        return bool(self[0])


def _transformers_compat_needed() -> bool:
    try:
        from transformers.utils import import_utils
    except ImportError:
        return False
    return isinstance(import_utils._is_package_available("sparge-no-such-package"), tuple)


class _transformers_compat:
    """While importing the package, make ``_is_package_available`` results falsy for absent packages."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def __enter__(self):
        if self.active:
            from transformers.utils import import_utils

            self.module, self.original = import_utils, import_utils._is_package_available
            original = self.original

            def wrapped(*a, **kw):
                result = original(*a, **kw)
                return _Availability(result) if isinstance(result, tuple) else result

            import_utils._is_package_available = wrapped
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.module._is_package_available = self.original


class MInferencePackage:
    """Entry points of the ``minference`` package, with recording hooks around its index builders."""

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}
        self.version = None
        self.import_mode = None
        try:
            self.version = importlib.metadata.version("minference")
        except importlib.metadata.PackageNotFoundError:
            self.errors["package"] = "minference is not installed"
            return
        self.compat = _transformers_compat_needed()
        with _transformers_compat(self.compat):
            try:
                importlib.import_module("minference")
                self.import_mode = "full"
            except Exception as err:  # noqa: BLE001 (any import-time failure: record it, try the submodules)
                self.errors["import minference"] = f"{type(err).__name__}: {err}"
                self._bare_parent()
                self.import_mode = "submodules"
            self.cuda = self._submodule("minference.cuda")
            self.mf = self._submodule("minference.modules.minference_forward")
            self.bsf = self._submodule("minference.ops.block_sparse_flash_attention")
            self.sk = self._submodule("minference.ops.streaming_kernel")
            self.fp = self._submodule("minference.modules.flexprefill")

    @staticmethod
    def _bare_parent() -> None:
        for name in [m for m in sys.modules if m == "minference" or m.startswith("minference.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("minference")
        parent = types.ModuleType("minference")
        parent.__path__ = list(spec.submodule_search_locations)
        parent.__spec__ = spec
        sys.modules["minference"] = parent

    def _submodule(self, name: str):
        try:
            return importlib.import_module(name)
        except Exception as err:  # noqa: BLE001
            self.errors[name] = f"{type(err).__name__}: {err}"
            return None

    def status(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "import_mode": self.import_mode,
            "errors": self.errors,
            "transformers_compat_shim": getattr(self, "compat", False),
            "available": {
                "vertical_slash": self.mf is not None and self.cuda is not None,
                "block_sparse": self.bsf is not None,
                "a_shape": self.sk is not None,
                "flexprefill": self.fp is not None,
            },
        }

    @staticmethod
    def _hook(module, name: str, record: Callable[[Any, tuple, dict], None]):
        original = getattr(module, name)

        def wrapper(*a, **kw):
            result = original(*a, **kw)
            record(result, a, kw)
            return result

        setattr(module, name, wrapper)
        return original

    # ---- vertical-slash -------------------------------------------------------------------
    def vertical_slash(self, q, k, v, vertical_size: int, slash_size: int) -> PkgResult:
        """Per head through ``minference_prefill_kernel`` (its estimate, then its kernel); the hook
        records the lines each head selected before the kernel runs."""
        n, num_heads, group = q.shape[2], q.shape[1], q.shape[1] // k.shape[1]
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        original = self.mf.vertical_slash_sparse_attention

        def wrapper(query, key, value, v_idx, s_idx, *a, **kw):
            seen.append((v_idx.detach().reshape(-1).clone(), s_idx.detach().reshape(-1).clone()))
            return original(query, key, value, v_idx, s_idx, *a, **kw)

        self.mf.vertical_slash_sparse_attention = wrapper
        config = {
            "best_pattern": [
                {str(h): ["vertical_and_slash", vertical_size, slash_size, 0.0] for h in range(num_heads)}
            ]
        }
        outs, error = [], None
        try:
            for h in range(num_heads):
                kv = h // group
                try:
                    outs.append(
                        self.mf.minference_prefill_kernel(
                            q[:, h : h + 1].contiguous(),
                            k[:, kv : kv + 1].contiguous(),
                            v[:, kv : kv + 1].contiguous(),
                            h,
                            0,
                            config,
                        )
                    )
                except Exception as err:
                    error = error or f"{type(err).__name__}: {err}"
                    if len(seen) <= h:
                        raise
        finally:
            self.mf.vertical_slash_sparse_attention = original
        columns = torch.zeros(1, num_heads, n, dtype=torch.bool, device=q.device)
        distances = torch.zeros(1, num_heads, 2 * n - 1, dtype=torch.bool, device=q.device)
        touched = torch.zeros(1, num_heads, math.ceil(n / PKG_BLOCK), n, dtype=torch.bool, device=q.device)
        for h, (v_idx, s_idx) in enumerate(seen):
            columns[0, h, v_idx.long()] = True
            distances[0, h, bm.distance_index(s_idx.long(), n)] = True
            touched[0, h] = self._vs_kernel_keys(v_idx, s_idx, n)
        out = torch.cat(outs, dim=1) if error is None else None
        return PkgResult(
            out,
            rows_to_grid(touched, PKG_BLOCK, n, n),
            token_density_of_rows(touched, PKG_BLOCK, n),
            {"_columns": columns, "_distances": distances},
            error,
        )

    def _vs_kernel_keys(self, v_idx, s_idx, n: int) -> torch.Tensor:
        """Keys each 64-row block computes, from the package's own index conversion (CUDA):
        64-key ranges starting at ``block_offset`` plus single ``column_index`` columns."""
        v_sorted = v_idx.to(torch.int32).sort().values.reshape(1, 1, -1).contiguous()
        s_sorted = s_idx.to(torch.int32).sort(descending=True).values.reshape(1, 1, -1).contiguous()
        seqlens = torch.tensor([n], dtype=torch.int32, device=v_idx.device)
        block_count, block_offset, column_count, column_index = self.cuda.convert_vertical_slash_indexes(
            seqlens, v_sorted, s_sorted, n, PKG_BLOCK, PKG_BLOCK
        )
        device = v_idx.device
        rows = block_count.shape[-1]
        slot = torch.arange(block_offset.shape[-1], device=device)
        valid = (slot[None, :] < block_count[0, 0][:, None].long()).long()
        starts = block_offset[0, 0].long()
        diff = torch.zeros(rows, n + PKG_BLOCK + 1, dtype=torch.long, device=device)
        diff.scatter_add_(1, starts.clamp(0, n), valid)
        diff.scatter_add_(1, (starts + PKG_BLOCK).clamp(0, n + PKG_BLOCK), -valid)
        touched = diff.cumsum(1)[:, :n] > 0
        cslot = torch.arange(column_index.shape[-1], device=device)
        cvalid = cslot[None, :] < column_count[0, 0][:, None].long()
        cols = torch.where(cvalid, column_index[0, 0].long(), torch.full_like(column_index[0, 0].long(), n))
        extra = torch.zeros(rows, n + 1, dtype=torch.bool, device=device)
        extra.scatter_(1, cols.clamp(0, n), True)
        return touched | extra[:, :n]

    # ---- block-sparse ---------------------------------------------------------------------
    def block_sparse(self, q, k, v, topk: int) -> PkgResult:
        """``block_sparse_attention`` on repeated K/V; the hook records its block index."""
        n, group = q.shape[2], q.shape[1] // k.shape[1]
        seen = []
        original = self._hook(
            self.bsf, "_build_block_index", lambda r, a, kw: seen.append(r.detach().clone())
        )
        out, error = None, None
        try:
            out = self.bsf.block_sparse_attention(
                q.contiguous(),
                k.repeat_interleave(group, 1).contiguous(),
                v.repeat_interleave(group, 1).contiguous(),
                topk,
            )
        except Exception as err:
            if not seen:
                raise
            error = f"{type(err).__name__}: {err}"
        finally:
            self.bsf._build_block_index = original
        rows = math.ceil(n / PKG_BLOCK)
        index = seen[0].long()[:, :, :rows]  # (1, H, rows, topk): key blocks of 64 (drop the padding row)
        # the kernel visits the first min(row + 1, topk) entries of each (ascending) row
        slot = torch.arange(index.shape[-1], device=q.device)
        used = slot[None, None, None, :] < (torch.arange(rows, device=q.device)[None, None, :, None] + 1)
        blocks = torch.zeros(*index.shape[:3], rows + 2, dtype=torch.bool, device=q.device)
        blocks.scatter_(-1, torch.where(used, index.clamp(0, rows), torch.full_like(index, rows + 1)), True)
        touched = blocks[..., :rows].repeat_interleave(PKG_BLOCK, dim=-1)[..., :n]
        return PkgResult(
            out,
            rows_to_grid(touched, PKG_BLOCK, n, n),
            token_density_of_rows(touched, PKG_BLOCK, n),
            {},
            error,
        )

    # ---- A-shape --------------------------------------------------------------------------
    def a_shape(self, q, k, v, n_init: int, n_local: int) -> PkgResult:
        group = q.shape[1] // k.shape[1]
        out = self.sk.streaming_forward(
            q.contiguous(),
            k.repeat_interleave(group, 1).contiguous(),
            v.repeat_interleave(group, 1).contiguous(),
            n_init,
            n_local,
        )
        return PkgResult(out, None, None, {}, None)

    # ---- flexprefill ----------------------------------------------------------------------
    def flexprefill(
        self, q, k, v, gamma: float, tau: float, min_budget: int | None, max_budget: int | None
    ) -> PkgResult:
        """``flex_prefill_attention`` (B, N, H, D layout, ``gqa_interleave=False``, block 128); hooks
        record the active blocks and the per-head JS distances."""
        seen: dict[str, Any] = {}
        gab = self._hook(self.fp, "get_active_blocks", lambda r, a, kw: seen.__setitem__("blocks", r))
        jsd = self._hook(
            self.fp, "square_root_js_divergence", lambda r, a, kw: seen.__setitem__("js", r.detach().clone())
        )
        out, error = None, None
        try:
            out = self.fp.flex_prefill_attention(
                q.transpose(1, 2).contiguous(),
                k.transpose(1, 2).contiguous(),
                v.transpose(1, 2).contiguous(),
                gamma,
                tau,
                min_budget,
                max_budget,
                False,
                None,
                FLEX_BLOCK,
            ).transpose(1, 2)
        except Exception as err:
            if "blocks" not in seen:
                raise
            error = f"{type(err).__name__}: {err}"
        finally:
            self.fp.get_active_blocks, self.fp.square_root_js_divergence = gab, jsd
        if "blocks" not in seen:  # the package ran dense (short input)
            return PkgResult(out, None, None, {}, error)
        n, num_heads = q.shape[2], q.shape[1]
        nb = math.ceil(n / FLEX_BLOCK)
        mask128 = torch.zeros(1, num_heads, nb * nb, dtype=torch.bool, device=q.device)
        for h, idx in enumerate(seen["blocks"][0]):
            mask128[0, h, idx.long()] = True
        grid = mask128.reshape(1, num_heads, nb, nb).repeat_interleave(FLEX_BLOCK // R.BLOCK_K, dim=-1)
        grid = grid[..., : R.num_blocks(n, R.BLOCK_K)] & R.allowed_block_mask(n, n, True, device=q.device)
        extra = {"_decision": seen["js"] < tau} if "js" in seen else {}
        return PkgResult(out, grid, token_density_of_blocks(grid, n, n), extra, error)
