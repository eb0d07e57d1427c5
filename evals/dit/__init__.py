"""Self-trained diffusion transformers for the image and video suites (issue 8).

No real text-to-image / text-to-video model, CLIP, Inception or ImageReward weights exist offline,
so the project trains its own small models on procedurally generated, captioned data:

- ``data``: shapes x colours x positions (images) and moving shapes (videos), templated captions,
  a word-level tokenizer, and exact attribute readers for generated samples.
- ``model``: a joint text+visual DiT (adaLN-Zero, QK-norm, 3-D axial RoPE) whose attention goes
  through a swappable ``attention_fn(q, k, v, layer_idx)``; rectified-flow training loss and an
  Euler sampler with classifier-free guidance.
- ``clip_model``: a small contrastive text-image model built from ``clip-anytorch``'s ``CLIP``
  architecture class, for CLIP score / CLIPSIM / CLIP-T.
- ``capture``: writes the Q/K/V recorded by ``sparge_core.integrations.dit`` to disk (safetensors).
- ``train``: the training loops behind ``scripts/train_dit.py`` and ``scripts/train_clip.py``.
"""
