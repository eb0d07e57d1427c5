"""A small joint text+visual diffusion transformer (DiT), its rectified-flow loss and sampler.

Architecture (one class for images and videos; an image is a one-frame video):

- Visual tokens: the ``(frames, size, size)`` pixel grid cut into ``patch x patch`` patches (one
  frame deep), linearly embedded. Row-major token order (frame, row, column).
- Text tokens: the caption's word ids (``data.tokenize``) through a learned embedding plus a
  learned position embedding. Text tokens come FIRST in the joint sequence
  ``[text (context_length); visual (T*H*W)]`` and go through the same blocks (a simplified MM-DiT /
  CogVideoX-style joint attention), so the attention is non-causal over text and image together.
- Conditioning: adaLN-Zero from the timestep embedding plus the mean caption embedding.
- Attention: QK-RMSNorm per head, then 3-D axial rotary position embedding on the visual tokens
  only (head dim split time/rows/columns; text tokens are not rotated), then
  ``attention_fn(q, k, v, layer_idx)`` on ``(B, heads, tokens, head_dim)`` tensors. The default is
  PyTorch SDPA; ``DiT.set_attention_fn`` swaps it (``sparge_core.integrations.dit`` uses this), so
  an adapter always sees post-RoPE Q/K/V, which is where SpargeAttn permutes tokens.
- Output: the velocity of the visual tokens (text outputs are discarded).

Objective: rectified flow. ``x_t = (1 - t) x_0 + t eps`` with ``t`` drawn logit-normal, the model
predicts ``v = eps - x_0``; captions are replaced by the null caption with probability
``cond_drop`` so that sampling can use classifier-free guidance. Sampler: Euler steps from t=1 to
t=0 on a fixed uniform grid, guidance on the conditional/unconditional pair computed in one batch
(rows ``[0, B)`` conditional, ``[B, 2B)`` unconditional).

Checkpoints hold the config and fp16 weights (``save_checkpoint`` / ``load_checkpoint``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparge_core.atomic import atomic_path
from sparge_core.integrations.dit import TokenLayout

from . import data

logger = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """The default attention: dense, non-causal softmax attention (PyTorch SDPA)."""
    return F.scaled_dot_product_attention(q, k, v)


@dataclass(frozen=True)
class DiTConfig:
    """Shape of a DiT. ``frames == 1`` makes an image model."""

    frames: int = 1
    size: int = 32
    channels: int = 3
    patch: int = 1
    dim: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    context_length: int = data.CONTEXT_LENGTH
    vocab_size: int = len(data.VOCAB)
    rope_theta: float = 100.0

    def __post_init__(self):
        if self.size % self.patch:
            raise ValueError(f"size {self.size} is not a multiple of patch {self.patch}")
        if self.dim % self.heads or (self.dim // self.heads) % 8:
            raise ValueError(f"dim {self.dim} / heads {self.heads} must give a head_dim that is a multiple of 8")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def grid(self) -> tuple[int, int, int]:
        side = self.size // self.patch
        return (self.frames, side, side)

    @property
    def num_visual_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def layout(self) -> TokenLayout:
        grid = self.grid if self.frames > 1 else self.grid[1:]
        return TokenLayout(text_before=self.context_length, grid=grid)

    @property
    def is_video(self) -> bool:
        return self.frames > 1


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------
def _rope_parts(cfg: DiTConfig) -> tuple[tuple[int, int], ...]:
    """``(grid axis, head-dim width)`` of each rotary part: time/rows/columns (rows/columns for images)."""
    d = cfg.head_dim
    if cfg.frames > 1:
        dt = (d // 4) // 2 * 2
        dh = ((d - dt) // 2) // 2 * 2
        return ((0, dt), (1, dh), (2, d - dt - dh))
    dh = (d // 2) // 2 * 2
    return ((1, dh), (2, d - dh))


def _rope_tables(cfg: DiTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(N_visual, head_dim)`` for 3-D axial RoPE (rotate-half layout per axis part)."""
    t, h, w = cfg.grid
    pos = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    pos = pos.reshape(-1, 3).float()
    angles = []
    for axis, part in _rope_parts(cfg):
        freqs = cfg.rope_theta ** (-torch.arange(0, part, 2).float() / part)
        ang = pos[:, axis:axis + 1] * freqs  # (N, part/2)
        angles.append(torch.cat([ang, ang], dim=-1))
    ang = torch.cat(angles, dim=-1)
    return ang.cos(), ang.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, parts: tuple[int, ...]) -> torch.Tensor:
    """Rotate-half RoPE applied to each axis part of the head dimension separately."""
    outs, start = [], 0
    for p in parts:
        seg = x[..., start:start + p]
        c, s = cos[..., start:start + p], sin[..., start:start + p]
        half = p // 2
        rot = torch.cat([-seg[..., half:], seg[..., :half]], dim=-1)
        outs.append(seg * c + rot * s)
        start += p
    return torch.cat(outs, dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attention_fn: AttentionFn = sdpa_attention

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, tuple[int, ...]], n_text: int):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        cos, sin, parts = rope
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = torch.cat([q[:, :, :n_text], _rotate(q[:, :, n_text:], cos, sin, parts)], dim=2)
        k = torch.cat([k[:, :, :n_text], _rotate(k[:, :, n_text:], cos, sin, parts)], dim=2)
        q, k = q.to(v.dtype), k.to(v.dtype)
        out = self.attention_fn(q, k, v, self.layer_idx)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, layer_idx: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg, layer_idx)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.dim))
        self.ada = nn.Linear(cfg.dim, 6 * cfg.dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c, rope, n_text):
        s1, sc1, g1, s2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = x + g1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), s1, sc1), rope, n_text)
        return x + g2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), s2, sc2))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of ``t`` in [0, 1] (scaled by 1000), ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        pdim = cfg.channels * cfg.patch * cfg.patch
        self.patch_embed = nn.Linear(pdim, cfg.dim)
        self.word_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.text_pos = nn.Parameter(torch.randn(cfg.context_length, cfg.dim) * 0.02)
        self.text_pool = nn.Linear(cfg.dim, cfg.dim)
        self.t_mlp = nn.Sequential(nn.Linear(256, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.blocks = nn.ModuleList(DiTBlock(cfg, i) for i in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.out = nn.Linear(cfg.dim, pdim)
        for m in (self.ada_out, self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        cos, sin = _rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # the hook point for sparse attention and capture ------------------------------------------
    @property
    def layout(self) -> TokenLayout:
        return self.cfg.layout

    @property
    def attention_modules(self) -> list[Attention]:
        return [blk.attn for blk in self.blocks]

    def set_attention_fn(self, fn: AttentionFn | None) -> None:
        """Route every layer's attention through ``fn(q, k, v, layer_idx)`` (None: back to SDPA)."""
        for attn in self.attention_modules:
            attn.attention_fn = fn if fn is not None else sdpa_attention

    # --------------------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` or ``(B, C, T, H, W)`` -> ``(B, N, C*p*p)`` in row-major token order."""
        if x.dim() == 4:
            x = x.unsqueeze(2)
        b, c, t, h, w = x.shape
        p = self.cfg.patch
        x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(b, t * (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg, p = self.cfg, self.cfg.patch
        t, gh, gw = cfg.grid
        b = tokens.shape[0]
        x = tokens.view(b, t, gh, gw, cfg.channels, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        x = x.reshape(b, cfg.channels, t, gh * p, gw * p)
        return x if cfg.is_video else x[:, :, 0]

    def _rope(self):
        return self.rope_cos, self.rope_sin, tuple(part for _, part in _rope_parts(self.cfg))

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Velocity for noisy samples ``x`` at times ``t`` (B,) given caption ids ``text`` (B, L)."""
        vis = self.patch_embed(self.patchify(x.to(self.patch_embed.weight.dtype)))
        words = self.word_embed(text) + self.text_pos[: text.shape[1]]
        keep = (text != data.TOKEN_ID[data.PAD]).to(words.dtype).unsqueeze(-1)
        pooled = (words * keep).sum(1) / keep.sum(1).clamp(min=1)
        c = self.t_mlp(timestep_embedding(t, 256).to(vis.dtype)) + self.text_pool(pooled)
        h = torch.cat([words, vis], dim=1)
        rope = self._rope()
        for blk in self.blocks:
            h = blk(h, c, rope, text.shape[1])
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=-1)
        out = self.out(_modulate(self.norm_out(h[:, text.shape[1]:]), shift, scale))
        return self.unpatchify(out)


# --------------------------------------------------------------------------------------------
# objective and sampler
# --------------------------------------------------------------------------------------------
def rectified_flow_loss(model: DiT, x0: torch.Tensor, text: torch.Tensor, *, cond_drop: float = 0.1,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    b = x0.shape[0]
    dev = x0.device
    t = torch.sigmoid(torch.randn(b, device=dev, generator=generator))  # logit-normal
    eps = torch.randn(x0.shape, device=dev, generator=generator)
    tt = t.view(b, *([1] * (x0.dim() - 1)))
    xt = (1 - tt) * x0 + tt * eps
    drop = torch.rand(b, device=dev, generator=generator) < cond_drop
    null = data.tokenize([""] * 1, text.shape[1]).to(dev).expand(b, -1)
    text = torch.where(drop.unsqueeze(1), null, text)
    return F.mse_loss(model(xt, t, text), eps - x0)


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 20
    cfg_scale: float = 3.0


@torch.no_grad()
def sample(model: DiT, captions: list[str], *, seed: int = 0, sampler: SamplerConfig = SamplerConfig(),
           on_step: Callable[[int, float], None] | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Generate samples in [-1, 1] for ``captions`` (one per caption), Euler steps from t=1 to 0.

    The initial noise depends only on ``seed`` (drawn on the CPU), so two runs with the same seed
    but different attention methods start from the same noise. ``on_step(step, t)`` is called
    before each model evaluation (capture uses it to label samples).
    """
    cfg = model.cfg
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    b = len(captions)
    shape = (b, cfg.channels, cfg.frames, cfg.size, cfg.size) if cfg.is_video else (b, cfg.channels, cfg.size, cfg.size)
    if noise is None:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = noise.to(dev, torch.float32)
    text = data.tokenize(captions, cfg.context_length).to(dev)
    guided = sampler.cfg_scale != 1.0
    if guided:
        text = torch.cat([text, data.tokenize([""] * b, cfg.context_length).to(dev)])
    ts = torch.linspace(1.0, 0.0, sampler.steps + 1)
    for i in range(sampler.steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        if on_step is not None:
            on_step(i, t)
        xin = torch.cat([x, x]) if guided else x
        tin = torch.full((xin.shape[0],), t, device=dev)
        v = model(xin.to(dtype), tin, text).float()
        if guided:
            vc, vu = v[:b], v[b:]
            v = vu + sampler.cfg_scale * (vc - vu)
        x = x + (t_next - t) * v
    return x.clamp(-1, 1)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
#: the self-trained checkpoints shipped with the package (``t2i``, ``t2v``, ``clip``; see its README.md)
CHECKPOINTS_DIR = Path(__file__).with_name("checkpoints")


def bundled_checkpoint(name: str) -> Path:
    """The path of a shipped checkpoint (``"t2i"``, ``"t2v"`` or ``"clip"``), in a checkout or an
    installed wheel alike."""
    path = CHECKPOINTS_DIR / f"{name}.pt"
    if not path.is_file():
        known = sorted(p.stem for p in CHECKPOINTS_DIR.glob("*.pt"))
        raise FileNotFoundError(f"no bundled checkpoint {name!r} in {CHECKPOINTS_DIR}; bundled: {known}")
    return path


@dataclass
class Checkpoint:
    config: DiTConfig
    state_dict: dict
    info: dict = field(default_factory=dict)


def save_checkpoint(model: DiT, path: str | Path, info: dict | None = None) -> None:
    state = {k: v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.cpu()
             for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": "sparge-dit", "version": 1, "config": asdict(model.cfg), "state_dict": state,
                    "info": info or {}}, tmp)


def load_checkpoint(path: str | Path, device="cpu", dtype=torch.float32) -> tuple[DiT, dict]:
    """``(model in eval mode, info)`` from a ``save_checkpoint`` file."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "sparge-dit":
        raise ValueError(f"{path} is not a sparge DiT checkpoint (format 'sparge-dit')")
    model = DiT(DiTConfig(**blob["config"]))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    return model.to(device, dtype).eval(), blob.get("info", {})
