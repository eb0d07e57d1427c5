"""Training loops for the DiTs and the CLIP (the scripts in ``scripts/`` are thin CLIs over these).

Both loops draw fresh procedural batches on the training device every step (no data loader), stop
at ``steps`` or after ``minutes`` of wall time, whichever comes first, and use AdamW with a linear
warm-up and a cosine decay over the progress ``max(step / steps, elapsed / budget)``, so a time
budget still ends with a decayed learning rate. The DiT keeps an exponential moving average of its
weights (what is saved). On CUDA they run in bfloat16 autocast with TF32 matmuls.

Presets (``DIT_PRESETS``): ``image`` (32 x 32 pixels, patch 1: 1024 visual tokens + 8 text tokens)
and ``video`` (16 frames x 16 x 16, patch 1: 4096 visual tokens + 8 text tokens), dim 256, 6 blocks,
4 heads of 64 (about 7.3 M parameters, 15 MB as fp16); ``*-tiny`` variants for CPU smoke tests.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from sparge_core.atomic import write_json_atomic
from sparge_core.registry import Registry

from . import data
from .clip_model import ClipConfig, build_clip, contrastive_loss, prepare_images, save_clip, visible_key
from .grid import image_grid, save_png, video_grid
from .model import DiT, DiTConfig, SamplerConfig, rectified_flow_loss, sample, save_checkpoint

logger = logging.getLogger(__name__)

DIT_PRESETS: Registry[DiTConfig] = Registry("DiT preset")
DIT_PRESETS.add("image", DiTConfig(frames=1, size=32, patch=1, dim=256, depth=6, heads=4))
DIT_PRESETS.add("video", DiTConfig(frames=16, size=16, patch=1, dim=256, depth=6, heads=4))
DIT_PRESETS.add("image-small", DiTConfig(frames=1, size=32, patch=1, dim=128, depth=4, heads=2))
DIT_PRESETS.add("image-tiny", DiTConfig(frames=1, size=16, patch=1, dim=64, depth=2, heads=2))
DIT_PRESETS.add("video-tiny", DiTConfig(frames=4, size=8, patch=1, dim=64, depth=2, heads=2))
CLIP_PRESETS: Registry[ClipConfig] = Registry("CLIP preset")
CLIP_PRESETS.add("base", ClipConfig())
CLIP_PRESETS.add("tiny", ClipConfig(embed_dim=32, vision_layers=1, vision_width=64, transformer_width=32,
                                    transformer_heads=2, transformer_layers=1))


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    minutes: float = 3.0
    batch: int = 128
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.0
    ema: float = 0.999
    seed: int = 0
    log_every: int = 50


def _lr_factor(step: int, progress: float, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _setup(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def dit_batch(cfg: DiTConfig, n: int, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor, list]:
    specs = data.random_specs(n, video=cfg.is_video, generator=g)
    if cfg.is_video:
        x = data.render_videos(specs, frames=cfg.frames, size=cfg.size, generator=g, device=device)
    else:
        x = data.render_images(specs, size=cfg.size, generator=g, device=device)
    return x, data.tokenize([s.caption() for s in specs], cfg.context_length).to(device), specs


def train_dit(model_cfg: DiTConfig, train: TrainConfig, out: str | Path, device: str = "cpu",
              preset: str = "custom", eval_samples: int = 24, eval_steps: int = 20) -> dict:
    """Train a DiT, save ``out`` (EMA weights, fp16) plus ``<out>.samples.png`` and ``<out>.json``."""
    dev = torch.device(device)
    _setup(dev)
    torch.manual_seed(train.seed)
    g = torch.Generator().manual_seed(train.seed)
    model = DiT(model_cfg).to(dev)
    ema = DiT(model_cfg).to(dev).eval()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    logger.info("DiT %s: %.2f M parameters, grid %s, %d tokens per sample", preset, params / 1e6, model_cfg.grid,
                model_cfg.num_visual_tokens + model_cfg.context_length)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(0.9, 0.99), weight_decay=train.weight_decay)
    budget = train.minutes * 60.0
    t0 = time.time()
    step, losses, history = 0, [], []
    while step < train.steps and time.time() - t0 < budget:
        progress = max(step / train.steps, (time.time() - t0) / budget)
        for group in opt.param_groups:
            group["lr"] = train.lr * _lr_factor(step, progress, train.warmup)
        x, text, _ = dit_batch(model_cfg, train.batch, g, dev)
        with _autocast(dev):
            loss = rectified_flow_loss(model, x, text)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(train.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.detach())  # synchronised only when logged
        step += 1
        if step % train.log_every == 0:
            mean = float(torch.stack(losses[-train.log_every:]).mean())
            history.append({"step": step, "loss": mean, "seconds": round(time.time() - t0, 1)})
            logger.info("step %d  loss %.4f  %.1f s", step, mean, time.time() - t0)
    seconds = time.time() - t0
    info = {"preset": preset, "steps": step, "seconds": round(seconds, 1), "device": _device_name(dev),
            "train": asdict(train), "params": params,
            "final_loss": float(torch.stack(losses[-50:]).mean()) if losses else None,
            "history": history, "torch": str(torch.__version__)}
    info["eval"] = _quick_eval(ema, dev, Path(out), n=eval_samples, steps=eval_steps)
    save_checkpoint(ema, out, info)
    write_json_atomic(str(out) + ".json", info)
    logger.info("saved %s after %d steps in %.0f s: %s", out, step, seconds, info["eval"])
    return info


@torch.no_grad()
def _quick_eval(model: DiT, dev: torch.device, out: Path, n: int = 24, steps: int = 20) -> dict:
    """Samples for every colour/shape (one seed each) -> a PNG next to the checkpoint and accuracy."""
    specs = data.all_specs(model.cfg.is_video)
    g = torch.Generator().manual_seed(1234)
    pick = torch.randperm(len(specs), generator=g)[:n].tolist()
    specs = [specs[i] for i in pick]
    x = sample(model, [s.caption() for s in specs], seed=1234, sampler=SamplerConfig(steps=steps))
    if model.cfg.is_video:
        acc = data.attribute_accuracy(specs, data.read_video_attributes(x))
        save_png(str(out) + ".samples.png", video_grid(data.to_unit(x[:8])), scale=4)
    else:
        acc = data.attribute_accuracy(specs, data.read_image_attributes(x))
        save_png(str(out) + ".samples.png", image_grid(data.to_unit(x), cols=6), scale=4)
    return {"attribute_accuracy": acc, "n": n, "captions": [s.caption() for s in specs]}


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------
def clip_batch(n: int, g: torch.Generator, device, image_size: int = 32, video_frames: int = 16,
               video_size: int = 16) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
    """Half images, half single video frames, with their captions and positive-pair keys."""
    n_img = n - n // 2
    img_specs = data.random_specs(n_img, video=False, generator=g)
    vid_specs = data.random_specs(n // 2, video=True, generator=g)
    images = data.render_images(img_specs, size=image_size, generator=g, device=device)
    parts = [prepare_images(images)]
    if vid_specs:
        vids = data.render_videos(vid_specs, frames=video_frames, size=video_size, generator=g, device=device)
        which = torch.randint(video_frames, (len(vid_specs),), generator=g).to(device)
        frames = vids[torch.arange(len(vid_specs), device=device), :, which]
        parts.append(prepare_images(frames))
    specs = img_specs + vid_specs
    text = data.tokenize([s.caption() for s in specs]).to(device)
    return torch.cat(parts), text, [visible_key(s) for s in specs]


def train_clip(cfg: ClipConfig, train: TrainConfig, out: str | Path, device: str = "cpu", preset: str = "custom") -> dict:
    dev = torch.device(device)
    _setup(dev)
    torch.manual_seed(train.seed)
    g = torch.Generator().manual_seed(train.seed)
    model = build_clip(cfg).to(dev)
    params = sum(p.numel() for p in model.parameters())
    logger.info("CLIP %s: %.2f M parameters", preset, params / 1e6)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(0.9, 0.98), weight_decay=train.weight_decay)
    budget = train.minutes * 60.0
    t0 = time.time()
    step, losses, history = 0, [], []
    while step < train.steps and time.time() - t0 < budget:
        progress = max(step / train.steps, (time.time() - t0) / budget)
        for group in opt.param_groups:
            group["lr"] = train.lr * _lr_factor(step, progress, train.warmup)
        images, text, keys = clip_batch(train.batch, g, dev)
        with _autocast(dev):
            loss = contrastive_loss(model, images, text, keys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())  # synchronised only when logged
        step += 1
        if step % train.log_every == 0:
            mean = float(torch.stack(losses[-train.log_every:]).mean())
            history.append({"step": step, "loss": mean, "seconds": round(time.time() - t0, 1)})
            logger.info("step %d  loss %.4f  %.1f s", step, mean, time.time() - t0)
    model.eval()
    info = {"preset": preset, "steps": step, "seconds": round(time.time() - t0, 1), "device": _device_name(dev),
            "train": asdict(train), "params": params, "history": history, "torch": str(torch.__version__),
            "eval": clip_zero_shot_accuracy(model, dev)}
    save_clip(model, cfg, out, info)
    write_json_atomic(str(out) + ".json", info)
    logger.info("saved %s after %d steps: %s", out, step, info["eval"])
    return info


@torch.no_grad()
def clip_zero_shot_accuracy(model, device, seed: int = 99) -> dict:
    """Retrieval accuracy on fresh rendered data: each image (video frame) against every caption of
    its family; correct if the best caption shows what the image shows (see ``visible_key``)."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    result = {}
    for video in (False, True):
        specs = data.all_specs(video)
        captions = sorted({s.caption() for s in specs})
        txt = torch.nn.functional.normalize(model.encode_text(data.tokenize(captions).to(dev)).float(), dim=-1)
        if video:
            vids = data.render_videos(specs, generator=g, device=dev)
            imgs = prepare_images(vids[:, :, vids.shape[2] // 2])
        else:
            imgs = prepare_images(data.render_images(specs, generator=g, device=dev))
        emb = torch.nn.functional.normalize(model.encode_image(imgs).float(), dim=-1)
        best = (emb @ txt.t()).argmax(1).tolist()
        by_caption = {s.caption(): s for s in specs}
        correct = sum(visible_key(by_caption[captions[j]]) == visible_key(s) for s, j in zip(specs, best))
        result["video_frames" if video else "images"] = correct / len(specs)
    return result


def preset_with(cfg, **overrides):
    """A preset with some fields replaced (None values ignored)."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
