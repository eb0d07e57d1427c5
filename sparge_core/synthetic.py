"""Random attention inputs with the structure real models show, for tests, demos and benchmarks.

Plain Gaussian Q/K have no block self-similarity and a flat attention map, so a predictor keeps
everything. Real layers have smooth token trajectories (neighbouring tokens look alike) and
attention that concentrates on nearby and "sink" tokens. ``structured_qkv`` imitates that: each
head follows a smooth random trajectory through feature space; K and Q are noisy, scaled copies of it,
so q_i . k_j is large when i and j are close, and a few sink tokens attract every query.
"""

from __future__ import annotations

import torch


def _smooth_walk(bsz: int, heads: int, n: int, dim: int, correlation_length: float, generator,
                 device="cpu") -> torch.Tensor:
    """Unit-variance features that decorrelate over ``correlation_length`` tokens (AR(1) process)."""
    rho = float(torch.exp(torch.tensor(-1.0 / max(correlation_length, 1e-3))))
    steps = torch.randn(bsz, heads, n, dim, generator=generator).to(device)
    # AR(1) via a cumulative recurrence in chunks: x_t = rho x_{t-1} + sqrt(1-rho^2) e_t
    out = torch.empty_like(steps)
    x = steps[:, :, 0]
    out[:, :, 0] = x
    coef = (1 - rho * rho) ** 0.5
    powers = rho ** torch.arange(1, 257, dtype=torch.float64)
    for t0 in range(1, n, 256):
        t1 = min(n, t0 + 256)
        e = steps[:, :, t0:t1] * coef
        m = t1 - t0
        # x_{t0+i} = rho^{i+1} x_{t0-1} + sum_{j<=i} rho^{i-j} e_{t0+j}
        idx = torch.arange(m)
        kernel = torch.where(idx[:, None] >= idx[None, :],
                             torch.tensor(rho, dtype=torch.float64) ** (idx[:, None] - idx[None, :]).clamp(min=0).double(),
                             torch.zeros((), dtype=torch.float64)).float().to(device)
        decay = powers[:m].float().to(device)[None, None, :, None]
        block = torch.einsum("ij,bhjd->bhid", kernel, e) + decay * x[:, :, None, :]
        out[:, :, t0:t1] = block
        x = block[:, :, -1]
    return out


def structured_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    n: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    correlation_length: float = 256.0,
    logit_scale: float = 8.0,
    noise: float = 0.5,
    num_sinks: int = 4,
    nk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Structured ``(q, k, v)``: q ``(B, Hq, n, D)``, k/v ``(B, Hkv, nk or n, D)``, never zeros."""
    gen = torch.Generator().manual_seed(seed)
    nk = n if nk is None else nk
    length = max(n, nk)
    walk = _smooth_walk(batch, kv_heads, length, head_dim, correlation_length, gen, device)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    k = walk[:, :, length - nk:] + noise * randn(batch, kv_heads, nk, head_dim)
    k[:, :, :num_sinks] += 2.0 * randn(batch, kv_heads, 1, head_dim)  # shared sink direction
    group = q_heads // kv_heads
    q = walk[:, :, length - n:].repeat_interleave(group, dim=1)
    q = q + noise * randn(batch, q_heads, n, head_dim)
    # per-head sharpness so heads differ, as in real models
    sharp = torch.linspace(0.5, 1.5, q_heads, device=device)[None, :, None, None]
    q = q * sharp * (logit_scale / head_dim ** 0.5)  # logits q.k/sqrt(D) span about +-logit_scale
    v = randn(batch, kv_heads, nk, head_dim)
    return q.to(dtype), k.to(dtype), v.to(dtype)
