"""Write image grids as PNG with the standard library only (zlib), so that training and
evaluation can show samples without Pillow or torchvision."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch

from sparge_core.atomic import write_bytes_atomic


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def write_png(path: str | Path, image01: torch.Tensor, scale: int = 1) -> None:
    """``image01``: ``(3, H, W)`` in [0, 1]; ``scale`` repeats pixels (nearest) for visibility."""
    img = (image01.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    if scale > 1:
        img = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    _, h, w = img.shape
    rows = img.permute(1, 2, 0).contiguous().numpy()
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    write_bytes_atomic(path, b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6))
                           + _chunk(b"IEND", b""))


def image_grid(images01: torch.Tensor, cols: int, pad: int = 1) -> torch.Tensor:
    """``(B, 3, H, W)`` -> one ``(3, H', W')`` grid with ``cols`` columns and white padding."""
    b, c, h, w = images01.shape
    rows = (b + cols - 1) // cols
    out = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(b):
        r, q = divmod(i, cols)
        out[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images01[i]
    return out


def video_grid(videos01: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """``(B, 3, T, H, W)`` -> a grid with one video per row, frames left to right."""
    b, c, t, h, w = videos01.shape
    frames = videos01.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    return image_grid(frames, cols=t, pad=pad)
