"""Procedural captioned images and videos, their tokenizer, and exact attribute readers.

Images: one filled shape (circle, square, triangle, cross) of one of six colours on a dark
background, centred in one of nine named regions of the canvas (3 x 3: "top left" ... "bottom
right") with a small random jitter in position and size. Caption: "a red circle in the top left".

Videos: the same shapes moving in a straight line (left, right, up, down) across ``frames`` frames;
the start is on the side opposite to the motion, at a random offset across it. Caption: "a red
circle moving left".

Everything is rendered with torch on the requested device (vectorised over the batch, with
anti-aliased edges), so training needs no data loader and no files. Pixel values are in [-1, 1]
(model space); ``to_unit`` maps them to [0, 1].

The attribute readers recover (colour, shape, position, direction) from a rendered or generated
sample without any learned model: colour = nearest palette colour to the mean foreground colour,
position = the 3 x 3 cell of the foreground centroid, shape = the template (rendered at the
measured centre and size) with the highest IoU, direction = the sign of the dominant centroid
displacement from the first to the last frames. On clean rendered data they are exact (tested);
on generated samples they measure whether the sample shows what its caption asks for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "magenta": (0.9, 0.15, 0.85),
    "cyan": (0.1, 0.85, 0.9),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUND = (0.08, 0.08, 0.1)

PAD, NULL, EOT = "<pad>", "<null>", "<eot>"
_WORDS = ["a", "in", "the", "moving", *COLOURS, *SHAPES, "top", "bottom", "left", "right", "center", "up", "down"]
# the end-of-text token has the highest id (clip-anytorch's text encoder reads the feature there)
VOCAB: tuple[str, ...] = (PAD, NULL, *dict.fromkeys(_WORDS), EOT)
TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}
CONTEXT_LENGTH = 8  # "a red circle in the top left" + <eot> = 8 tokens


@dataclass(frozen=True)
class Spec:
    """What one sample shows."""

    colour: str
    shape: str
    position: str | None = None  # images
    direction: str | None = None  # videos

    def caption(self) -> str:
        if self.direction is not None:
            return f"a {self.colour} {self.shape} moving {self.direction}"
        return f"a {self.colour} {self.shape} in the {self.position}"


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------
def tokenize(captions: list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Word ids ``(B, context_length)``: the words, ``<eot>``, then ``<pad>``. An empty caption is
    the unconditional (null) prompt: ``<null> <eot>``."""
    out = torch.full((len(captions), context_length), TOKEN_ID[PAD], dtype=torch.long)
    for i, text in enumerate(captions):
        words = text.split() or [NULL]
        unknown = [w for w in words if w not in TOKEN_ID or w in (PAD, EOT)]
        if unknown:
            raise ValueError(f"caption {text!r} has words outside the vocabulary: {unknown}")
        ids = [TOKEN_ID[w] for w in words] + [TOKEN_ID[EOT]]
        if len(ids) > context_length:
            raise ValueError(f"caption {text!r} needs {len(ids)} tokens, more than {context_length}")
        out[i, :len(ids)] = torch.tensor(ids)
    return out


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------
def random_specs(n: int, *, video: bool, generator: torch.Generator) -> list[Spec]:
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    colours = list(COLOURS)
    if video:
        return [Spec(pick(colours), pick(SHAPES), direction=pick(DIRECTIONS)) for _ in range(n)]
    return [Spec(pick(colours), pick(SHAPES), position=pick(POSITIONS)) for _ in range(n)]


def all_specs(video: bool) -> list[Spec]:
    """Every attribute combination (the prompt set of the evaluation suites), in a fixed order."""
    if video:
        return [Spec(c, s, direction=d) for d in DIRECTIONS for s in SHAPES for c in COLOURS]
    return [Spec(c, s, position=p) for p in POSITIONS for s in SHAPES for c in COLOURS]


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
def _shape_masks(shape_ids: torch.Tensor, cx, cy, r, size: int, soft: float = 0.75) -> torch.Tensor:
    """Anti-aliased coverage ``(B, size, size)`` in [0, 1] of each shape at centre (cx, cy), radius r."""
    device = cx.device
    coords = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    y = coords.view(1, size, 1)
    x = coords.view(1, 1, size)
    dx = x - cx.view(-1, 1, 1)
    dy = y - cy.view(-1, 1, 1)
    r = r.view(-1, 1, 1)
    # signed distance-like fields (negative inside), one per shape
    circle = torch.sqrt(dx ** 2 + dy ** 2) - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.8 * r
    # isosceles triangle pointing up: inside if below the two slanted edges and above the base
    base = dy - 0.8 * r
    slant = (2.0 * dx.abs() - (dy + r)) / math.sqrt(5.0)
    triangle = torch.maximum(base, slant)
    arm = 0.38 * r
    cross = torch.minimum(torch.maximum(dx.abs() - arm, dy.abs() - r), torch.maximum(dy.abs() - arm, dx.abs() - r))
    fields = torch.stack([circle, square, triangle, cross], dim=1)  # (B, 4, size, size)
    field = fields.gather(1, shape_ids.view(-1, 1, 1, 1).expand(-1, 1, size, size)).squeeze(1)
    return torch.clamp(0.5 - field / (2 * soft), 0.0, 1.0)


def _compose(coverage: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """``coverage (B, ..., H, W)`` and ``colours (B, 3)`` -> images in [-1, 1], ``(B, 3, ..., H, W)``."""
    bg = torch.tensor(BACKGROUND, device=coverage.device).view(1, 3, *([1] * (coverage.dim() - 1)))
    col = colours.view(colours.shape[0], 3, *([1] * (coverage.dim() - 1)))
    cov = coverage.unsqueeze(1)
    return (bg * (1 - cov) + col * cov) * 2 - 1


def _ids(specs, attr, options) -> torch.Tensor:
    return torch.tensor([options.index(getattr(s, attr)) for s in specs])


def render_images(specs: list[Spec], size: int = 32, *, generator: torch.Generator | None = None,
                  device="cpu", jitter: bool = True) -> torch.Tensor:
    """Images ``(B, 3, size, size)`` in [-1, 1] for image specs (with position)."""
    g = generator or torch.Generator().manual_seed(0)
    b = len(specs)
    pos = _ids(specs, "position", POSITIONS)
    cell = size / 3.0
    cx = (pos % 3).float() * cell + cell / 2
    cy = (pos // 3).float() * cell + cell / 2
    r = torch.full((b,), 0.17 * size)
    if jitter:
        cx = cx + (torch.rand(b, generator=g) - 0.5) * 0.25 * cell
        cy = cy + (torch.rand(b, generator=g) - 0.5) * 0.25 * cell
        r = r * (0.85 + 0.3 * torch.rand(b, generator=g))
    shapes = _ids(specs, "shape", SHAPES)
    colours = torch.tensor([COLOURS[s.colour] for s in specs])
    cov = _shape_masks(shapes.to(device), cx.to(device), cy.to(device), r.to(device), size)
    return _compose(cov, colours.to(device))


_DIR_VEC = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


def render_videos(specs: list[Spec], frames: int = 16, size: int = 16, *, generator: torch.Generator | None = None,
                  device="cpu", jitter: bool = True) -> torch.Tensor:
    """Videos ``(B, 3, frames, size, size)`` in [-1, 1] for video specs (with direction)."""
    g = generator or torch.Generator().manual_seed(0)
    b = len(specs)
    r = torch.full((b,), 0.26 * size)
    across = torch.full((b,), size / 2)
    if jitter:
        r = r * (0.85 + 0.3 * torch.rand(b, generator=g))
        across = across + (torch.rand(b, generator=g) - 0.5) * 0.4 * size
    vec = torch.tensor([_DIR_VEC[s.direction] for s in specs])
    travel = size - 2.0 * r  # from one edge to the other
    t = torch.linspace(-0.5, 0.5, frames).view(1, frames)
    sign = vec.sum(1, keepdim=True)  # +1 right/down, -1 left/up
    along = size / 2 + sign * t * travel.view(-1, 1)  # (B, frames)
    horizontal = (vec[:, 0] != 0).view(-1, 1)
    cx = torch.where(horizontal, along, across.view(-1, 1).expand(-1, frames))
    cy = torch.where(horizontal, across.view(-1, 1).expand(-1, frames), along)
    shapes = _ids(specs, "shape", SHAPES).repeat_interleave(frames)
    cov = _shape_masks(shapes.to(device), cx.reshape(-1).to(device), cy.reshape(-1).to(device),
                       r.repeat_interleave(frames).to(device), size)
    cov = cov.view(b, frames, size, size)
    colours = torch.tensor([COLOURS[s.colour] for s in specs])
    return _compose(cov, colours.to(device))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> [0, 1], clamped."""
    return ((x + 1) / 2).clamp(0, 1)


# --------------------------------------------------------------------------------------------
# attribute readers
# --------------------------------------------------------------------------------------------
def _foreground(img01: torch.Tensor, thresh: float = 0.25) -> torch.Tensor:
    """Soft foreground weight ``(..., H, W)`` from the distance to the background colour."""
    bg = torch.tensor(BACKGROUND, device=img01.device).view(3, 1, 1)
    dist = (img01 - bg).abs().amax(dim=-3)
    return (dist > thresh).float()


def read_image_attributes(images: torch.Tensor) -> list[dict[str, str | None]]:
    """Colour, shape and position of each image ``(B, 3, H, W)`` in [-1, 1] (None if empty)."""
    img = to_unit(images.float().cpu())
    b, _, h, w = img.shape
    palette = torch.tensor(list(COLOURS.values()))
    fg = _foreground(img)  # (B, H, W)
    area = fg.sum((1, 2))
    safe = area.clamp(min=1)
    mean_col = (img * fg.unsqueeze(1)).sum((2, 3)) / safe.unsqueeze(1)
    colour_ids = torch.cdist(mean_col, palette).argmin(1)
    ys = torch.arange(h).float().view(1, h, 1) + 0.5
    xs = torch.arange(w).float().view(1, 1, w) + 0.5
    cy, cx = (fg * ys).sum((1, 2)) / safe, (fg * xs).sum((1, 2)) / safe
    cols = (cx / (w / 3)).long().clamp(0, 2)
    rows = (cy / (h / 3)).long().clamp(0, 2)
    shape_ids = _best_shapes(fg, cx, cy, h)
    out = []
    for i in range(b):
        if area[i] < 2:
            out.append({"colour": None, "shape": None, "position": None})
            continue
        out.append({"colour": list(COLOURS)[int(colour_ids[i])], "shape": SHAPES[int(shape_ids[i])],
                    "position": POSITIONS[int(rows[i]) * 3 + int(cols[i])]})
    return out


def _best_shapes(fg: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, size: int) -> torch.Tensor:
    """Index of the shape whose template (over a range of radii, centred on the foreground
    centroid) has the highest IoU with each foreground mask ``fg (B, H, W)``."""
    b = fg.shape[0]
    radii = torch.linspace(0.1, 0.3, 11) * size
    n, k = radii.numel(), len(SHAPES)
    ids = torch.arange(k).repeat_interleave(n).repeat(b)
    r = radii.repeat(k * b)
    ccx = cx.repeat_interleave(k * n)
    # the triangle's centroid sits below the centre of its bounding box
    ccy = cy.repeat_interleave(k * n) - torch.where(ids == SHAPES.index("triangle"), 0.2 * r, torch.zeros_like(r))
    tpl = (_shape_masks(ids, ccx, ccy, r, size) > 0.5).float().view(b, k * n, size, size)
    inter = (tpl * fg.unsqueeze(1)).sum((2, 3))
    union = ((tpl + fg.unsqueeze(1)) > 0).float().sum((2, 3))
    iou = (inter / union.clamp(min=1)).view(b, k, n).amax(2)
    return iou.argmax(1)


def read_video_attributes(videos: torch.Tensor) -> list[dict[str, str | None]]:
    """Colour, shape (from the middle frame) and motion direction of videos ``(B, 3, T, H, W)``."""
    vid = to_unit(videos.float().cpu())
    b, _, t, h, w = vid.shape
    out = []
    ys = torch.arange(h).float().view(h, 1) + 0.5
    xs = torch.arange(w).float().view(1, w) + 0.5
    q = max(1, t // 4)
    for i in range(b):
        mid = read_image_attributes(videos[i:i + 1, :, t // 2].float().cpu())[0]

        def centroid(frames):
            fg = _foreground(frames)  # (T', H, W)
            area = fg.sum()
            if area < 2:
                return None
            return float((fg * xs).sum() / area), float((fg * ys).sum() / area)

        first, last = centroid(vid[i, :, :q].transpose(0, 1)), centroid(vid[i, :, -q:].transpose(0, 1))
        direction = None
        if first is not None and last is not None:
            dx, dy = last[0] - first[0], last[1] - first[1]
            if abs(dx) >= abs(dy):
                direction = "right" if dx > 0 else "left"
            else:
                direction = "down" if dy > 0 else "up"
        out.append({"colour": mid["colour"], "shape": mid["shape"], "direction": direction})
    return out


def attribute_accuracy(specs: list[Spec], read: list[dict[str, str | None]]) -> dict[str, float]:
    """Share of samples whose read attribute equals the spec's, per attribute and all at once."""
    keys = [k for k in ("colour", "shape", "position", "direction") if getattr(specs[0], k) is not None]
    acc = {k: sum(getattr(s, k) == r[k] for s, r in zip(specs, read)) / len(specs) for k in keys}
    acc["all"] = sum(all(getattr(s, k) == r[k] for k in keys) for s, r in zip(specs, read)) / len(specs)
    return acc
