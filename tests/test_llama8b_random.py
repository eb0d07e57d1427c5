"""The llama8b-random model of the registry: Llama-3.1-8B's attention shape, seeded random weights."""

import pytest
import torch

pytest.importorskip("transformers")


def test_llama8b_random_has_the_8b_shape():
    from calibrate.models import (
        LLAMA8B_SHAPE,
        available_models,
        build_llama8b_random,
        llama8b_config,
        model_spec,
    )

    assert "llama8b-random" in available_models()
    cfg = llama8b_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.intermediate_size) == (4096, 32, 32, 8, 128, 14336)
    small = dict(num_hidden_layers=1, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 intermediate_size=512, vocab_size=320)
    a = build_llama8b_random(device="cpu", dtype=torch.float32, seed=3, **small)
    b = build_llama8b_random(device="cpu", dtype=torch.float32, seed=3, **small)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert model_spec(a).num_kv_heads == 2 and LLAMA8B_SHAPE["num_key_value_heads"] == 8


@pytest.mark.gpu
def test_llama8b_random_builds_on_the_gpu():
    from calibrate.models import load_model, model_spec

    model, _ = load_model("llama8b-random", device="cuda")
    spec = model_spec(model)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (32, 32, 8, 128)
    assert next(model.parameters()).dtype == torch.bfloat16
    del model
    torch.cuda.empty_cache()
