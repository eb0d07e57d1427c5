"""Image and video sample grids for training/evaluation previews, saved as PNG with Pillow."""

from __future__ import annotations

from pathlib import Path

import torch

from sparge_core.atomic import atomic_path


def save_png(path: str | Path, image01: torch.Tensor, scale: int = 1) -> None:
    """Write ``image01`` ``(3, H, W)`` in [0, 1] as an 8-bit RGB PNG; ``scale`` repeats pixels
    (nearest) for visibility. Written through a temporary file and an atomic rename."""
    from PIL import Image

    if image01.ndim != 3 or image01.shape[0] != 3:
        raise ValueError(f"expected an RGB image (3, H, W), got shape {tuple(image01.shape)}")
    img = (image01.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    if scale > 1:
        img = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    picture = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy())  # uint8 (H, W, 3): RGB
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def image_grid(images01: torch.Tensor, cols: int, pad: int = 1) -> torch.Tensor:
    """``(B, 3, H, W)`` -> one ``(3, H', W')`` grid with ``cols`` columns and white padding."""
    b, c, h, w = images01.shape
    rows = (b + cols - 1) // cols
    out = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(b):
        r, q = divmod(i, cols)
        out[
            :, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w
        ] = images01[i]
    return out


def video_grid(videos01: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """``(B, 3, T, H, W)`` -> a grid with one video per row, frames left to right."""
    b, c, t, h, w = videos01.shape
    frames = videos01.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    return image_grid(frames, cols=t, pad=pad)
