"""The project's small CLIP: clip-anytorch's ``CLIP`` architecture class, trained on our captions.

Why the class is loaded from ``clip/model.py`` by file path: ``import clip`` runs the package
``__init__``, which imports ``clip.clip``, which imports torchvision (the PyPI torchvision wheels do
not work beside this machine's torch 2.13 CPU build) and ``pkg_resources`` (removed in
setuptools >= 82). ``clip/model.py`` itself needs only torch and numpy, so loading that one file
gives the real architecture (ViT image tower, causal text transformer reading the end-of-text
token, learned logit scale) with none of those imports, and no BPE tokenizer either: the captions
are templated, so ``data.tokenize``'s word ids are the text input (``<eot>`` has the highest id, as
``CLIP.encode_text`` expects). Needs ``pip install --no-deps clip-anytorch==2.6.0``.

Scores (``clip_score`` etc. in ``evals.image``) use ``encode_image`` / ``encode_text``. Images are
given in [-1, 1] at 32 x 32 (16 x 16 video frames are upsampled by 2, nearest).

Training targets: captions repeat within a batch (there are only a few hundred distinct ones), so
the contrastive loss uses soft targets: a (frame, caption) pair is positive when the caption
describes what a single image shows: colour, shape and position for image captions; colour and
shape for video captions (a single frame cannot show the direction of motion).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from sparge_core.atomic import atomic_path

from . import data

logger = logging.getLogger(__name__)

_MODULE_NAME = "_sparge_clip_anytorch_model"


def clip_architecture() -> ModuleType:
    """clip-anytorch's ``clip/model.py`` as a module, without running ``clip/__init__.py``."""
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the CLIP architecture comes from clip-anytorch: pip install --no-deps clip-anytorch==2.6.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.py"
    if not path.is_file():
        raise ImportError(f"clip-anytorch is installed but {path} is missing")
    mod_spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[_MODULE_NAME] = module
    mod_spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class ClipConfig:
    """Arguments of clip-anytorch's ``CLIP`` (a ViT image tower; heads = vision_width // 64)."""

    embed_dim: int = 128
    image_resolution: int = 32
    vision_layers: int = 4
    vision_width: int = 128
    vision_patch_size: int = 4
    context_length: int = data.CONTEXT_LENGTH
    vocab_size: int = len(data.VOCAB)
    transformer_width: int = 128
    transformer_heads: int = 2
    transformer_layers: int = 3

    def __post_init__(self):
        if self.vision_width % 64:
            raise ValueError(f"vision_width must be a multiple of 64 (CLIP uses width // 64 heads), got {self.vision_width}")


def build_clip(cfg: ClipConfig) -> torch.nn.Module:
    return clip_architecture().CLIP(**asdict(cfg))


def prepare_images(images: torch.Tensor, resolution: int = 32) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-1, 1] -> the CLIP input (nearest upsampling to ``resolution``)."""
    if images.shape[-1] != resolution:
        images = F.interpolate(images.float(), size=(resolution, resolution), mode="nearest")
    return images


def visible_key(spec: data.Spec) -> tuple:
    """What a single image of ``spec`` shows (the positive-pair key of the contrastive loss)."""
    if spec.direction is not None:
        return ("video", spec.colour, spec.shape)
    return ("image", spec.colour, spec.shape, spec.position)


def contrastive_loss(model, images: torch.Tensor, text: torch.Tensor, keys: list[tuple]) -> torch.Tensor:
    """Symmetric cross-entropy over the batch with soft targets for repeated captions."""
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(text), dim=-1)
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    kid = torch.tensor([ids[k] for k in keys], device=images.device)
    target = (kid[:, None] == kid[None, :]).float()
    loss_i = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(target.t() / target.t().sum(1, keepdim=True) * logits.t().log_softmax(1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def save_clip(model, cfg: ClipConfig, path: str | Path, info: dict | None = None) -> None:
    state = {k: v.detach().cpu().half() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": "sparge-clip", "version": 1, "config": asdict(cfg), "state_dict": state,
                    "info": info or {}}, tmp)


def load_clip(path: str | Path, device="cpu") -> tuple[torch.nn.Module, ClipConfig, dict]:
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "sparge-clip":
        raise ValueError(f"{path} is not a sparge CLIP checkpoint (format 'sparge-clip')")
    cfg = ClipConfig(**blob["config"])
    model = build_clip(cfg)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    return model.to(device).eval(), cfg, blob.get("info", {})
