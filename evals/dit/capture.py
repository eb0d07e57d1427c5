"""Capture a DiT's post-RoPE Q/K/V during sampling as calibration samples on disk.

Layout and ``meta.json`` keys are those of the LLM capture (``calibrate.capture``, format
``sparge-qkv-capture``), so calibration reads DiT captures the same way:

    <dir>/L{layer:03d}/S{sample:03d}.safetensors   tensors q, k, v, each (1, heads, tokens, head_dim)
    <dir>/meta.json                                written last (a folder with it is complete)

DiT-specific keys are added beside the shared ones: ``source`` ("dit"), ``is_causal`` (false),
``token_layout`` (text tokens before the visual grid, the grid, the stored order), ``sampler`` and
``sample_info`` (one record per sample). ``data.name`` is "dit-prompts" and ``data.sha256`` hashes
the captions, seed and kept steps.

One sample is one (prompt, denoising step) pair of the conditional branch (the unconditional rows
of classifier-free guidance are not recorded). Samples are numbered in generation order: prompt
chunk, then step, then prompt within the chunk; ``meta.json`` lists each sample's prompt, caption,
step and time ``t``. Tensors are stored in the token order named by
``meta["token_layout"]["order"]`` (``row-major`` = as the model made them; e.g. ``hilbert`` to
calibrate a Hilbert-ordered deployment directly). ``steps`` keeps only some denoising steps
(storage: a video layer sample is about 3 x 2 MB in fp16).

The files are written by ``calibrate.capture.SafetensorsSink`` (safetensors stays outside
``sparge_core``, which imports only torch and triton).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from calibrate.capture import SafetensorsSink, sample_path
from sparge_core.atomic import write_json_atomic
from sparge_core.integrations.dit import QKVCapture, install

from . import data
from .model import DiT, SamplerConfig, sample

logger = logging.getLogger(__name__)

CAPTURE_FORMAT = "sparge-qkv-capture"
CAPTURE_VERSION = 1


def load_sample(root: str | Path, layer: int, sample_id: int, device="cpu") -> tuple[torch.Tensor, ...]:
    """``(q, k, v)`` of one captured sample."""
    from safetensors.torch import load_file

    t = load_file(str(sample_path(root, layer, sample_id)), device=str(device))
    return t["q"], t["k"], t["v"]


@torch.no_grad()
def capture_dit(model: DiT, captions: list[str], out_dir: str | Path, *, sampler: SamplerConfig | None = None,
                seed: int = 0, steps: list[int] | None = None, layers: list[int] | None = None,
                order: str | None = None, batch: int = 8, dtype: torch.dtype = torch.float16,
                model_name: str = "dit") -> dict:
    """Sample ``captions`` densely, recording Q/K/V of the kept steps; returns the meta dict."""
    sampler = sampler or SamplerConfig()
    out = Path(out_dir)
    sink = SafetensorsSink(out, dtype=dtype)
    layout = model.layout
    keep_steps = set(range(sampler.steps)) if steps is None else set(steps)
    bad = sorted(s for s in keep_steps if not 0 <= s < sampler.steps)
    if bad:
        raise ValueError(f"steps {bad} are outside 0..{sampler.steps - 1}")
    hook = QKVCapture(sink, layout=layout if order else None, order=order, layers=set(layers) if layers else None)
    records: list[dict] = []
    for start in range(0, len(captions), batch):
        chunk = captions[start:start + batch]

        def on_step(step: int, t: float, chunk=chunk, start=start) -> None:
            if step not in keep_steps:
                hook.set_context(sample_ids=[], step=step)
                return
            ids = []
            for i, caption in enumerate(chunk):
                ids.append(len(records))
                records.append({"sample": len(records), "prompt": start + i, "caption": caption, "step": step,
                                "t": round(t, 6)})
            hook.set_context(sample_ids=ids, step=step)

        with install(model, hook):
            sample(model, chunk, seed=seed + start, sampler=sampler, on_step=on_step)
    cfg = model.cfg
    digest = hashlib.sha256(json.dumps({"captions": captions, "seed": seed, "steps": sorted(keep_steps)}).encode())
    meta = {
        "format": CAPTURE_FORMAT, "version": CAPTURE_VERSION, "model": model_name, "num_layers": cfg.depth,
        "num_heads": cfg.heads, "num_kv_heads": cfg.heads, "head_dim": cfg.head_dim,
        "seq_len": cfg.context_length + cfg.num_visual_tokens, "samples": len(records),
        "data": {"name": "dit-prompts", "sha256": digest.hexdigest(), "window_starts": []},
        "dtype": str(dtype).replace("torch.", ""),
        "layers": sorted(layers) if layers else list(range(cfg.depth)),
        "source": "dit",
        "is_causal": False,
        "token_layout": {"text_before": layout.text_before, "grid": list(layout.grid),
                         "order": order or "row-major"},
        "sampler": {"steps": sampler.steps, "cfg_scale": sampler.cfg_scale, "seed": seed, "kept_steps": sorted(keep_steps)},
        "sample_info": records,
    }
    write_json_atomic(out / "meta.json", meta)
    logger.info("captured %d samples x %d layers into %s", len(records), len(meta["layers"]), out)
    return meta


def capture_size_bytes(model: DiT, num_samples: int, bytes_per_value: int = 2) -> int:
    """Disk size of a capture of ``num_samples`` samples over all layers (for planning)."""
    cfg = model.cfg
    per = 3 * cfg.heads * (cfg.context_length + cfg.num_visual_tokens) * cfg.head_dim * bytes_per_value
    return per * cfg.depth * num_samples


def default_prompts(video: bool, n: int) -> list[str]:
    """``n`` captions spread over the attribute combinations (deterministic)."""
    specs = data.all_specs(video)
    step = max(1, len(specs) // max(1, n))
    return [specs[(i * step) % len(specs)].caption() for i in range(n)]


__all__ = ["CAPTURE_FORMAT", "SafetensorsSink", "capture_dit", "capture_size_bytes", "default_prompts", "load_sample",
           "sample_path"]


def main(argv=None) -> int:
    """``python -m evals.dit.capture --ckpt evals/dit/checkpoints/t2i.pt --out captures/t2i ...``"""
    import argparse

    from calibrate.cli import HelpFormatter

    from .model import load_checkpoint

    p = argparse.ArgumentParser(description="Capture a DiT's Q/K/V per (prompt, denoising step) for calibration.",
                                formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=5, help="number of captions (spread over the attributes)")
    p.add_argument("--keep-steps", default=None, help="comma-separated denoising steps to record (default: all)")
    p.add_argument("--sampler-steps", type=int, default=SamplerConfig.steps)
    p.add_argument("--cfg-scale", type=float, default=SamplerConfig.cfg_scale)
    p.add_argument("--order", default=None, help="store tensors in this token order (default: the model's)")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model, _ = load_checkpoint(args.ckpt, device=args.device)
    def ints(text):
        return [int(x) for x in text.split(",")] if text else None
    meta = capture_dit(model, default_prompts(model.cfg.is_video, args.prompts), args.out,
                       sampler=SamplerConfig(args.sampler_steps, args.cfg_scale), seed=args.seed,
                       steps=ints(args.keep_steps), layers=ints(args.layers), order=args.order, batch=args.batch,
                       model_name=Path(args.ckpt).stem)
    logger.info("%d samples, %.1f MB", meta["samples"], capture_size_bytes(model, meta["samples"]) / 1e6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
