"""Import the tuned hyperparameters of the official SpargeAttn code into this project's config format.

The official tuner (``thu-ml/SpargeAttn``) puts a tuning module inside every attention module it
patches (``<module>.inner_attention``) and saves the model's state-dict entries of those modules
with ``torch.save``: a flat ``{name: tensor}`` dict such as ::

    transformer_blocks.0.attn1.inner_attention.cdfthreshd    float32 (heads,)
    transformer_blocks.0.attn1.inner_attention.simthreshd1   float32 (heads,)
    transformer_blocks.0.attn1.inner_attention.pvthreshd     float32 (heads,)
    transformer_blocks.0.attn1.inner_attention.is_sparse     bool    (heads,)
    transformer_blocks.0.attn1.inner_attention.simthreshd2   float32 (heads,)   (not used at inference)
    transformer_blocks.1.attn1.inner_attention.cdfthreshd    ...

``import_state_dict`` / ``load_official`` turn such a dict (or ``.pt`` file) into a ``ModelConfig``:
one ``LayerConfig`` per tuned module, per-head ``simthreshd1``, ``cdfthreshd`` (or ``topk``, for
files of the top-k variant) and ``pvthreshd``, taken as the official inference uses them (it passes
exactly these three to its kernel; heads it tuned dense already carry ``simthreshd1 = cdfthreshd =
1``, this project's marking of a dense head). Layers are numbered in the order the modules appear in
the file (the tuner writes them in the model's module order) or, with ``module_names`` (e.g. the
documented attention-module order of ``sparge_core.integrations.diffusers.attention_module_names``),
by the position of each module's name in that list. ``rename`` maps name components of the tuned
model onto the target's (the official Wan files name the original Wan code's ``self_attn``, which
diffusers calls ``attn1``).

What cannot be mapped is refused with ``ConfigError`` naming the key: a key that is not one of the
tuned hyperparameters, a module without ``simthreshd1`` / ``pvthreshd`` or with both or neither of
``cdfthreshd`` / ``topk``, a non-zero ``simthreshd2`` (a second similarity threshold this project's
predictor does not have), tensors that are not 1-D per-head vectors, modules with different head
counts, out-of-range values, and module names missing from ``module_names``.

Caveats, recorded in the config's ``calibration`` section: the official kernel uses 128 x 64 blocks
on sm80/sm89 GPUs but 64 x 128 on sm90 (H100), and thresholds depend on the block geometry, so a file
tuned on an H100 is only approximately right for this project's 128 x 64 blocks; the official
estimator is the paper's pooled one (``estimator="pooled"``), and its inference always keeps the
first key block (attention sink), which this project does only for causal attention. Check an
imported config's L1 on your own data (``calibrate``'s held-out check) before relying on it.

``python -m sparge_core.official IN.pt --out config.json --head-dim 64 --model NAME`` converts a file.
Imports only torch.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .params import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

#: the tuned per-head hyperparameters a module of the official tuner holds
KNOWN_PARAMS = ("simthreshd1", "cdfthreshd", "topk", "pvthreshd", "is_sparse", "simthreshd2")
#: the submodule the official tuner adds to each attention module it tunes
INNER_MODULE = "inner_attention"
_RANGES = {
    "simthreshd1": (-1.0, 1.0),
    "cdfthreshd": (0.0, 1.0),
    "topk": (0.0, 1.0),
    "pvthreshd": (0.0, math.inf),
}
_BOUNDS_IN_NAME = re.compile(r"_(\d*\.?\d+)_(\d*\.?\d+)$")
SOURCE = "SpargeAttn (thu-ml) tuned state dict"


def bounds_from_file_name(path: str | os.PathLike) -> tuple[float, float] | None:
    """``(l1, pv_l1)`` from a name like ``CogVideoX-2b_0.06_0.07.pt`` (the official naming), or None."""
    match = _BOUNDS_IN_NAME.search(Path(path).stem)
    return (float(match.group(1)), float(match.group(2))) if match else None


def _module_of(key: str) -> tuple[str, str]:
    prefix, _, param = key.rpartition(".")
    if not prefix or param not in KNOWN_PARAMS:
        raise ConfigError(
            f"key {key!r} is not a SpargeAttn tuned hyperparameter (expected "
            f"'<module>.{INNER_MODULE}.<name>' with <name> one of {list(KNOWN_PARAMS)})"
        )
    return prefix, param


def _target_name(prefix: str, rename: Mapping[str, str] | None) -> str:
    parts = prefix.split(".")
    if parts[-1] == INNER_MODULE:
        parts = parts[:-1]
    return ".".join((rename or {}).get(p, p) for p in parts)


def _per_head(key: str, value, heads: int | None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"{key} must be a tensor, got {type(value).__name__}")
    if value.ndim != 1 or value.numel() == 0:
        raise ConfigError(f"{key} must be a 1-D per-head tensor, got shape {tuple(value.shape)}")
    if heads is not None and value.numel() != heads:
        raise ConfigError(
            f"{key} has {value.numel()} heads but other modules have {heads}; a config holds one head "
            f"count for every layer"
        )
    return value.detach().cpu()


def _values(key: str, value: torch.Tensor, name: str) -> list[float]:
    if value.dtype == torch.bool or value.is_complex():
        raise ConfigError(f"{key} must hold numbers, got {value.dtype}")
    low, high = _RANGES[name]
    out = [float(x) for x in value.double().tolist()]
    bad = [(i, x) for i, x in enumerate(out) if not math.isfinite(x) or not low <= x <= high]
    if bad:
        head, x = bad[0]
        raise ConfigError(f"{key}[{head}] is {x}, outside [{low}, {high}]")
    return out


def import_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    model_name: str,
    head_dim: int,
    l1: float,
    pv_l1: float,
    num_kv_heads: int | None = None,
    module_names: Sequence[str] | None = None,
    rename: Mapping[str, str] | None = None,
    source: str | None = None,
) -> ModelConfig:
    """A ``ModelConfig`` from an official tuned state dict (see the module docstring).

    Args:
        state: ``{"<module>.inner_attention.<param>": tensor (heads,)}``.
        model_name, head_dim, num_kv_heads: the model section of the config (the file does not hold
            them; ``num_kv_heads`` defaults to the head count: diffusion transformers have no GQA).
        l1, pv_l1: the bounds the file was tuned for (the official file names carry them).
        module_names: the target model's attention modules in layer order; without it, layers follow
            the order of the modules in the file.
        rename: name components to replace in the file's module names (``{"self_attn": "attn1"}``).
        source: where the state dict came from (recorded in the config).
    """
    if not isinstance(state, Mapping) or not state:
        raise ConfigError(f"expected a non-empty dict of tuned tensors, got {type(state).__name__}")
    modules: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    heads: int | None = None
    for key, value in state.items():
        if not isinstance(key, str):
            raise ConfigError(f"state dict keys must be strings, got {key!r}")
        prefix, param = _module_of(key)
        tensor = _per_head(key, value, heads)
        heads = tensor.numel()
        modules.setdefault(prefix, {})[param] = (key, tensor)

    names = {prefix: _target_name(prefix, rename) for prefix in modules}
    if module_names is not None:
        index = {name: i for i, name in enumerate(module_names)}
        unknown = [prefix for prefix, name in names.items() if name not in index]
        if unknown:
            raise ConfigError(
                f"tuned module {unknown[0]!r} (as {names[unknown[0]]!r}) is not one of the target's "
                f"attention modules {list(module_names)[:4]}...; pass rename= to map its names"
            )
        layer_of = {prefix: index[name] for prefix, name in names.items()}
        num_layers = len(module_names)
    else:
        layer_of = {prefix: i for i, prefix in enumerate(modules)}
        num_layers = len(modules)

    layers, dense_heads = [], 0
    for prefix, params in modules.items():
        for required in ("simthreshd1", "pvthreshd"):
            if required not in params:
                raise ConfigError(f"module {prefix!r} has no {required} (keys: {sorted(params)})")
        if ("cdfthreshd" in params) == ("topk" in params):
            raise ConfigError(
                f"module {prefix!r} needs exactly one of cdfthreshd and topk (keys: {sorted(params)})"
            )
        if "simthreshd2" in params:
            key, value = params["simthreshd2"]
            if value.double().abs().max().item() != 0:
                raise ConfigError(
                    f"{key} is non-zero: a second similarity threshold has no counterpart in this "
                    f"project's predictor, so this file cannot be imported faithfully"
                )
        if "is_sparse" in params:
            key, value = params["is_sparse"]
            if value.dtype != torch.bool:
                raise ConfigError(f"{key} must be a bool tensor, got {value.dtype}")
            dense_heads += int((~value).sum())
        entry = {"layer": layer_of[prefix]}
        for name in ("simthreshd1", "cdfthreshd", "topk", "pvthreshd"):
            if name in params:
                entry[name] = _values(*params[name], name)
        layers.append(entry)

    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    calibration = {
        "source": source or SOURCE,
        "state_dict_sha256": digest.hexdigest(),
        "estimator": "pooled",
        "modules": {str(layer_of[p]): names[p] for p in modules},
        "heads_tuned_dense": dense_heads,
        "note": (
            "imported from the official SpargeAttn tuner: its kernel uses 128x64 blocks on sm80/sm89 and "
            "64x128 "
            "on sm90, and always keeps the first key block; check the L1 of this config on your data"
        ),
    }
    doc = {
        "format": "sparge-config",
        "version": 1,
        "model": {
            "name": model_name,
            "num_layers": num_layers,
            "num_heads": heads,
            "num_kv_heads": num_kv_heads or heads,
            "head_dim": head_dim,
        },
        "l1": l1,
        "pv_l1": pv_l1,
        "calibration": calibration,
        "layers": layers,
    }
    config = ModelConfig.from_dict(doc)
    logger.info(
        "imported %d tuned modules x %d heads (%d heads tuned dense)", len(layers), heads, dense_heads
    )
    return config


def load_official(
    path: str | os.PathLike,
    *,
    model_name: str,
    head_dim: int,
    l1: float | None = None,
    pv_l1: float | None = None,
    **kwargs,
) -> ModelConfig:
    """``import_state_dict`` of a ``.pt`` file written by the official tuner (``torch.save`` of the
    tuned entries). ``l1`` / ``pv_l1`` default to the bounds in the official file name
    (``<model>_<l1>_<pv_l1>.pt``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    if l1 is None or pv_l1 is None:
        named = bounds_from_file_name(path)
        if named is None:
            raise ConfigError(
                f"the file name {path.name} does not carry the tuning bounds (<model>_<l1>_<pv_l1>.pt); "
                f"pass l1 and pv_l1"
            )
        l1 = named[0] if l1 is None else l1
        pv_l1 = named[1] if pv_l1 is None else pv_l1
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (a pickle that is not plain tensors, or not a torch file)
        raise ConfigError(
            f"{path} is not a torch.save file of plain tensors: {type(err).__name__}: {err}"
        ) from err
    kwargs.setdefault("source", f"{SOURCE}: {path.name}")
    return import_state_dict(state, model_name=model_name, head_dim=head_dim, l1=l1, pv_l1=pv_l1, **kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sparge_core.official",
        description="Convert an official SpargeAttn tuned .pt file into a sparge config JSON.",
    )
    p.add_argument("file", help="the .pt file the official tuner saved")
    p.add_argument(
        "--out", required=True, help="a .json file, or a folder (written as <folder>/sparge_config.json)"
    )
    p.add_argument("--model", required=True, help="model name recorded in the config")
    p.add_argument("--head-dim", type=int, required=True, help="attention head dimension of the model")
    p.add_argument("--num-kv-heads", type=int, default=None, help="KV heads (default: the head count)")
    p.add_argument("--l1", type=float, default=None, help="stage-1 bound (default: from the file name)")
    p.add_argument("--pv-l1", type=float, default=None, help="stage-2 bound (default: from the file name)")
    p.add_argument(
        "--rename", nargs="*", default=[], metavar="OLD=NEW", help="module name components to rename"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        rename = dict(item.split("=", 1) for item in args.rename)
    except ValueError:
        print(f"error: --rename takes OLD=NEW pairs, got {args.rename}", file=sys.stderr)
        return 2
    try:
        config = load_official(
            args.file,
            model_name=args.model,
            head_dim=args.head_dim,
            l1=args.l1,
            pv_l1=args.pv_l1,
            num_kv_heads=args.num_kv_heads,
            rename=rename or None,
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.suffix == ".json":
        config.save(out)
        written = out
    else:  # a model folder
        written = config.save_pretrained(out)
    print(f"wrote {written}: {len(config.layers)} layers x {config.model.num_heads} heads")
    return 0


__all__ = ["KNOWN_PARAMS", "bounds_from_file_name", "import_state_dict", "load_official", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
