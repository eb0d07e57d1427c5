"""A config saved beside a model (``<model_dir>/sparge_config.json``, save_pretrained style) loads by
the folder's path, through ModelConfig.load and through apply."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from calibrate.models import build_tiny_model, byte_tokenizer, load_model  # noqa: E402
from sparge_core.integrations.transformers import apply, remove  # noqa: E402
from sparge_core.params import (  # noqa: E402
    CONFIG_FILE_NAME,
    ConfigError,
    LayerConfig,
    ModelConfig,
    ModelInfo,
)


def _config(heads: int, kv_heads: int) -> ModelConfig:
    sparse = LayerConfig(1, (-1.0,) * heads, (50.0,) * heads, topk=(0.2,) * heads)
    return ModelConfig(
        ModelInfo("tiny-folder", 2, heads, kv_heads, 64),
        (LayerConfig.dense(0, heads), sparse),
        l1=0.1,
        pv_l1=0.1,
    )


def test_config_saved_beside_a_model_loads_from_the_folder(tmp_path):
    folder = tmp_path / "tiny-model"
    model = build_tiny_model("llama")
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    config = _config(model.config.num_attention_heads, model.config.num_key_value_heads)
    path = config.save_pretrained(folder)
    assert path == folder / CONFIG_FILE_NAME and path.is_file()
    assert ModelConfig.load(folder) == ModelConfig.load(path) == config

    loaded, _ = load_model(folder)
    ids = torch.randint(3, 259, (1, 400), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = loaded(ids).logits
        handle = apply(loaded, folder, collect_stats=True)
        try:
            sparse = loaded(ids).logits
        finally:
            remove(loaded)
    layers = handle.sparsity_report()["layers"]
    assert layers[0]["dense_calls"] == 1 and layers[1]["sparse_calls"] == 1 and layers[1]["qk_sparsity"] > 0.3
    assert (sparse - dense).abs().max() > 1e-3


def test_a_folder_without_a_config_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=f"is a folder without {CONFIG_FILE_NAME}"):
        ModelConfig.load(tmp_path)
