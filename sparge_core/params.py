"""Typed hyperparameters and the per-layer config file (docs/design.md, "Config file").

``ModelConfig`` is what calibration writes and what integrations load: one ``LayerConfig`` per
attention layer, each holding per-query-head ``simthreshd1``, ``cdfthreshd`` (or ``topk``) and
``pvthreshd``. Loading validates everything and names the offending field on error; writing is
atomic (temporary file + rename).

Format versions: 1 (the model section holds the shape only) and 2, which adds the model's identity
(``architecture`` and a weights ``fingerprint`` in the model section, recorded at calibration and
checked by ``check_identity`` before a config is applied) and two optional objects per layer:
``"variant"`` (the executor the layer runs: ``{"dense": true}`` or ``{"dense": false, "quant":
"none"|"int8"|"int8-fp8", "stage2": bool}``; stage 2 off means ``pvthreshd=None``, no PV check at
all) and ``"predicted"`` (the cost model's attention time of the layer and of dense SDPA at the
calibration length). Version 2 layers may also hold ``"local_blocks"`` (an integer >= 0, default 0 and
then not written: the predictor's forced key blocks before each query block's causal diagonal,
``sparge_core.ops.reference.select_blocks`` rule 5) and ``"min_tokens"`` (an integer >= 0, default 0
and then not written: calls with fewer query tokens run dense SDPA; time-objective calibration sets it
where the cost model predicts the sparse call slower than dense at shorter lengths). Version 1 files (no identity, no variant: the
caller's ``quant``, stage 2 as the ``pvthreshd`` list says) load; ``save`` writes version 2.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .atomic import write_json_atomic, write_text_atomic  # noqa: F401  (write_text_atomic: older import path)
from .ops.blocks import BLOCK_K, BLOCK_Q

CONFIG_FORMAT = "sparge-config"
CONFIG_VERSION = 2  # what save() writes
CONFIG_VERSIONS = (1, 2)  # what load() reads
#: how ``weights_fingerprint`` samples each parameter tensor
FINGERPRINT_SAMPLES = 4096
FINGERPRINT_SCHEME = "sha256-bf16-sample"
#: the file name a config has inside a model folder (``save_pretrained`` / ``load(folder)``)
CONFIG_FILE_NAME = "sparge_config.json"
#: quantization variants a layer's variant may name (``sparge_core.api.QUANT_MODES`` without "auto")
VARIANT_QUANTS = ("none", "int8", "int8-fp8")


class ConfigError(ValueError):
    """A config file or dict that does not follow the format; the message names the field."""


@dataclass(frozen=True)
class SpargeParams:
    """Global (all layers, all heads) SpargeAttn hyperparameters; per-head lists are allowed."""

    simthreshd1: float | tuple[float, ...] = 0.6
    cdfthreshd: float | tuple[float, ...] | None = 0.98
    topk: float | tuple[float, ...] | None = None
    pvthreshd: float | tuple[float, ...] | None = 50.0
    estimator: str = "pooled"
    local_blocks: int = 0  # causal only: key blocks forced before each query block's diagonal

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``sparge_attn``."""
        return dict(simthreshd1=self.simthreshd1, cdfthreshd=None if self.topk is not None else self.cdfthreshd,
                    topk=self.topk, pvthreshd=self.pvthreshd, estimator=self.estimator,
                    local_blocks=self.local_blocks)


@dataclass(frozen=True)
class LayerVariant:
    """The executor a calibrated layer runs: dense SDPA, or the sparse kernel with one quantization
    variant and stage 2 (the PV skip check) on or off. Per call, so per layer, not per head."""

    dense: bool = False
    quant: str = "none"
    stage2: bool = True

    @property
    def key(self) -> str:
        """``"dense"`` or the kernel key of ``calibrate.cost``: ``<quant>`` or ``<quant>+pv``."""
        if self.dense:
            return "dense"
        return self.quant + ("+pv" if self.stage2 else "")

    def to_dict(self) -> dict[str, Any]:
        return {"dense": True} if self.dense else {"dense": False, "quant": self.quant, "stage2": self.stage2}


@dataclass(frozen=True)
class LayerPrediction:
    """What the cost model predicted for a layer at the calibration length: milliseconds of one
    attention call (batch 1) with the layer's variant and of dense SDPA."""

    ms: float
    dense_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.ms if self.ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {"ms": self.ms, "dense_ms": self.dense_ms, "speedup": round(self.speedup, 6)}


@dataclass(frozen=True)
class LayerConfig:
    """Calibrated hyperparameters of one attention layer, one value per query head."""

    layer: int
    simthreshd1: tuple[float, ...]
    pvthreshd: tuple[float, ...]
    cdfthreshd: tuple[float, ...] | None = None
    topk: tuple[float, ...] | None = None
    sparsity: float | None = None
    l1: float | None = None
    estimator: str = "pooled"  # block-score estimator of the predictor (sparge_core.ops.reference.ESTIMATORS)
    variant: LayerVariant | None = None  # None (version 1): the caller's quant, stage 2 on
    predicted: LayerPrediction | None = None
    #: causal only: the predictor also keeps this many key blocks before each query block's diagonal
    local_blocks: int = 0
    #: calls with fewer query tokens than this run dense SDPA (the length below which the cost model
    #: predicts the sparse call slower than dense at the calibrated density; 0: no such length)
    min_tokens: int = 0

    @property
    def num_heads(self) -> int:
        return len(self.simthreshd1)

    @property
    def is_dense(self) -> bool:
        """True when the layer runs dense attention: its variant says so, or every head keeps every block."""
        if self.variant is not None and self.variant.dense:
            return True
        values = self.topk if self.topk is not None else self.cdfthreshd
        return all(v >= 1.0 for v in values)

    @property
    def quant(self) -> str | None:
        """The quantization the layer was calibrated with (None: not fixed, version 1)."""
        return None if self.variant is None or self.variant.dense else self.variant.quant

    @property
    def stage2(self) -> bool:
        """Whether the layer runs the stage-2 PV check (version 1 configs always do)."""
        return self.variant is None or (not self.variant.dense and self.variant.stage2)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``sparge_attn`` (``quant`` only when the variant fixes it)."""
        out = dict(simthreshd1=list(self.simthreshd1),
                   cdfthreshd=None if self.topk is not None else list(self.cdfthreshd),
                   topk=None if self.topk is None else list(self.topk),
                   pvthreshd=list(self.pvthreshd) if self.stage2 else None, estimator=self.estimator)
        if self.quant is not None:
            out["quant"] = self.quant
        if self.local_blocks:
            out["local_blocks"] = self.local_blocks
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {"layer": self.layer, "simthreshd1": list(self.simthreshd1)}
        if self.topk is not None:
            d["topk"] = list(self.topk)
        else:
            d["cdfthreshd"] = list(self.cdfthreshd)
        d["pvthreshd"] = list(self.pvthreshd)
        if self.estimator != "pooled":
            d["estimator"] = self.estimator
        if self.local_blocks:  # 0 (the default) is not written: a file without the option stays as it was
            d["local_blocks"] = self.local_blocks
        if self.min_tokens:
            d["min_tokens"] = self.min_tokens
        if self.sparsity is not None:
            d["sparsity"] = self.sparsity
        if self.l1 is not None:
            d["l1"] = self.l1
        if self.variant is not None:
            d["variant"] = self.variant.to_dict()
        if self.predicted is not None:
            d["predicted"] = self.predicted.to_dict()
        return d

    @classmethod
    def dense(cls, layer: int, num_heads: int) -> LayerConfig:
        """A layer that keeps every block (simthreshd1 = cdfthreshd = 1, stage 2 off)."""
        return cls(layer, (1.0,) * num_heads, (50.0,) * num_heads, cdfthreshd=(1.0,) * num_heads)


@dataclass(frozen=True)
class ModelInfo:
    """The model a config was calibrated for: its attention shape and (format 2) its identity."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    architecture: str | None = None  # transformers model_type ("llama", "qwen2", ...), or e.g. "dit"
    fingerprint: str | None = None  # weights_fingerprint() of the calibrated model

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def weights_fingerprint(model) -> str:
    """A fingerprint of a model's weights that does not depend on device or floating dtype:
    ``"sha256-bf16-sample:<hex>"``, the sha256 of every parameter's name and shape and of up to
    ``FINGERPRINT_SAMPLES`` evenly spaced values of it, rounded to bfloat16 (so a model loaded in
    float32 on a CPU and in bfloat16 on a GPU match, and models of one shape but other weights do
    not). Costs one small gather per parameter tensor."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(f"{name}:{tuple(param.shape)};".encode())
            flat = param.detach().reshape(-1)
            if flat.numel() > FINGERPRINT_SAMPLES:
                steps = torch.arange(FINGERPRINT_SAMPLES, dtype=torch.int64, device=flat.device)
                index = steps * (flat.numel() - 1) // (FINGERPRINT_SAMPLES - 1)  # exact in int64
                flat = flat[index]
            values = flat.to(torch.bfloat16).to(torch.float32).cpu() if flat.is_floating_point() else flat.cpu()
            digest.update(values.contiguous().numpy().tobytes())
    return f"{FINGERPRINT_SCHEME}:{digest.hexdigest()}"


@dataclass(frozen=True)
class ModelConfig:
    """A whole calibrated model: the config JSON document (docs/design.md, "Config file")."""

    model: ModelInfo
    layers: tuple[LayerConfig, ...]
    l1: float
    pv_l1: float
    calibration: dict[str, Any] = field(default_factory=dict)
    block_q: int = BLOCK_Q
    block_k: int = BLOCK_K

    def with_local_blocks(self, local_blocks: int) -> ModelConfig:
        """This config with ``local_blocks`` set in every layer (the predictor's forced key blocks before
        each query block's causal diagonal); everything else unchanged, so its recorded errors and
        sparsities are those of the config as calibrated, not of the new setting."""
        _int(local_blocks, "local_blocks", low=0)
        return replace(self, layers=tuple(replace(lc, local_blocks=local_blocks) for lc in self.layers))

    def layer(self, index: int) -> LayerConfig:
        for lc in self.layers:
            if lc.layer == index:
                return lc
        raise KeyError(f"the config has no entry for layer {index}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CONFIG_FORMAT,
            "version": CONFIG_VERSION,
            "model": self.model.to_dict(),
            "kernel": {"block_q": self.block_q, "block_k": self.block_k},
            "l1": self.l1,
            "pv_l1": self.pv_l1,
            "calibration": self.calibration,
            "layers": [lc.to_dict() for lc in self.layers],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the config, after checking it as ``load`` will (ConfigError: nothing is written), so a
        saved file always loads back."""
        data = self.to_dict()
        _parse_model_config(data)
        write_json_atomic(path, data)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the config as ``<folder>/sparge_config.json`` (beside a model's own files, as
        ``save_pretrained`` does for weights); ``ModelConfig.load(folder)`` reads it back."""
        path = Path(folder) / CONFIG_FILE_NAME
        self.save(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        """A config from a JSON file, or from a folder holding ``sparge_config.json``."""
        path = Path(path)
        if path.is_dir():
            if not (path / CONFIG_FILE_NAME).is_file():
                raise ConfigError(f"config path {path} is a folder without {CONFIG_FILE_NAME}; pass the config file "
                                  f"itself, or "
                                  f"save one there with ModelConfig.save_pretrained({str(path)!r})")
            path = path / CONFIG_FILE_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"config file {path} does not exist") from err
        except IsADirectoryError as err:
            raise ConfigError(f"config path {path} is a folder; give the config JSON file inside it") from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not a text file ({err.reason})") from err
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON: {err}") from err
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from err
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> ModelConfig:
        return _parse_model_config(data)

    def check_identity(self, *, architecture: str | None, fingerprint: str | Callable[[], str] | None,
                       allow_other_model: bool = False, override_hint: str = "allow_other_model=True") -> None:
        """Raise ConfigError if this config was calibrated for another model than the one described
        by ``architecture`` and ``fingerprint`` (a ``weights_fingerprint`` string, or a function
        computing it, called only when the config carries one). A format-1 config carries no
        identity: nothing to compare. ``allow_other_model`` skips the check (deliberate reuse of a
        config on a model of the same shape); ``override_hint`` names that switch in the message."""
        if allow_other_model:
            return
        want = self.model
        if want.architecture is not None and architecture is not None and want.architecture != architecture:
            raise ConfigError(
                f"the config was calibrated for {want.name!r}, a {want.architecture!r} model, but this model is a "
                f"{architecture!r} model; calibrate this model (sparge-calibrate --model ...) or, to reuse the "
                f"config deliberately, pass {override_hint}")
        if want.fingerprint is None or fingerprint is None:
            return
        have = fingerprint() if callable(fingerprint) else fingerprint
        if have != want.fingerprint:
            raise ConfigError(
                f"the config was calibrated for {want.name!r} whose weights differ from this model's (fingerprint "
                f"{want.fingerprint[-12:]} in the config, {have[-12:]} here): calibrate this model "
                f"(sparge-calibrate --model ...) or, to reuse the config deliberately, pass {override_hint}")

    def check_bidirectional(self, what: str) -> None:
        """Raise ConfigError if a sparse layer sets ``local_blocks``, which only causal attention has:
        called where the config is applied to bidirectional attention (``what``: e.g. "a DiT")."""
        bad = [lc.layer for lc in self.layers if lc.local_blocks and not lc.is_dense]
        if bad:
            raise ConfigError(f"layers {bad} set local_blocks (key blocks forced before each query block's causal "
                              f"diagonal), but {what} attends bidirectionally (non-causal); set local_blocks to 0 "
                              f"or calibrate without --local-blocks")

    def check_matches(self, *, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """Raise ConfigError if this config was made for a model of another shape."""
        for name, want in (("num_layers", num_layers), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                           ("head_dim", head_dim)):
            have = getattr(self.model, name)
            if have != want:
                raise ConfigError(f"model.{name} is {have} in the config but the model has {want}; "
                                  f"calibrate this model (sparge-calibrate) or pick its config")


# --------------------------------------------------------------------------------------------
# parsing with field-naming errors
# --------------------------------------------------------------------------------------------
_TOP_KEYS = {"format", "version", "model", "kernel", "l1", "pv_l1", "calibration", "layers"}
#: per format version: the keys the model section must have, and those it may have
_MODEL_REQUIRED = {"name", "num_layers", "num_heads", "num_kv_heads", "head_dim"}
_MODEL_KEYS = {1: _MODEL_REQUIRED, 2: _MODEL_REQUIRED | {"architecture", "fingerprint"}}
_LAYER_KEYS_V1 = {"layer", "simthreshd1", "cdfthreshd", "topk", "pvthreshd", "sparsity", "l1", "estimator"}
_LAYER_KEYS = {1: _LAYER_KEYS_V1, 2: _LAYER_KEYS_V1 | {"variant", "predicted", "local_blocks", "min_tokens"}}


def _require_dict(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be an object, got {type(value).__name__}")
    return value


def _check_keys(d: dict, allowed: set, required: set, where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(d))
    if missing:
        raise ConfigError(f"{where} is missing {missing}")


def _number(value, where: str, low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if (value <= low if low_open else value < low) or value > high:
        raise ConfigError(f"{where} must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return float(value)


def _int(value, where: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where} must be an integer >= {low}, got {value!r}")
    return value


def _head_list(value, where: str, num_heads: int, low: float, high: float) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of {num_heads} numbers (one per query head), got {value!r}")
    if len(value) != num_heads:
        raise ConfigError(f"{where} has {len(value)} values but the model has {num_heads} query heads")
    return tuple(_number(x, f"{where}[{i}]", low, high) for i, x in enumerate(value))


def _estimator(value, where: str) -> str:
    from .ops.blocks import ESTIMATORS

    if value not in ESTIMATORS:
        raise ConfigError(f"{where} must be one of {list(ESTIMATORS)}, got {value!r}")
    return value


def _variant(value, where: str) -> LayerVariant:
    v = _require_dict(value, where)
    if not isinstance(v.get("dense"), bool):
        raise ConfigError(f"{where}.dense must be true or false, got {v.get('dense')!r}")
    if v["dense"]:
        _check_keys(v, {"dense"}, {"dense"}, where)
        return LayerVariant(dense=True)
    _check_keys(v, {"dense", "quant", "stage2"}, {"dense", "quant", "stage2"}, where)
    if v["quant"] not in VARIANT_QUANTS:
        raise ConfigError(f"{where}.quant must be one of {list(VARIANT_QUANTS)}, got {v['quant']!r}")
    if not isinstance(v["stage2"], bool):
        raise ConfigError(f"{where}.stage2 must be true or false, got {v['stage2']!r}")
    return LayerVariant(dense=False, quant=v["quant"], stage2=v["stage2"])


def _prediction(value, where: str) -> LayerPrediction:
    p = _require_dict(value, where)
    _check_keys(p, {"ms", "dense_ms", "speedup"}, {"ms", "dense_ms"}, where)
    return LayerPrediction(_number(p["ms"], f"{where}.ms", 0.0, low_open=True),
                           _number(p["dense_ms"], f"{where}.dense_ms", 0.0, low_open=True))


def _parse_model_config(data: Any) -> ModelConfig:
    d = _require_dict(data, "config")
    _check_keys(d, _TOP_KEYS, {"format", "version", "model", "layers", "l1", "pv_l1"}, "config")
    if d["format"] != CONFIG_FORMAT:
        raise ConfigError(f"format must be {CONFIG_FORMAT!r}, got {d['format']!r}")
    version = d["version"]
    if isinstance(version, bool) or version not in CONFIG_VERSIONS:
        raise ConfigError(f"version must be one of {list(CONFIG_VERSIONS)}, got {version!r}")
    m = _require_dict(d["model"], "model")
    _check_keys(m, _MODEL_KEYS[version], _MODEL_REQUIRED, "model")
    for key in ("name", "architecture", "fingerprint"):
        if key in m and not (isinstance(m[key], str) and m[key]):
            raise ConfigError(f"model.{key} must be a non-empty string, got {m[key]!r}")
    info = ModelInfo(m["name"], *(_int(m[k], f"model.{k}") for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim")),
                     architecture=m.get("architecture"), fingerprint=m.get("fingerprint"))
    if info.num_heads % info.num_kv_heads:
        raise ConfigError(f"model.num_heads ({info.num_heads}) must be a multiple of model.num_kv_heads ({info.num_kv_heads})")
    kernel = _require_dict(d.get("kernel", {"block_q": BLOCK_Q, "block_k": BLOCK_K}), "kernel")
    _check_keys(kernel, {"block_q", "block_k"}, {"block_q", "block_k"}, "kernel")
    if (kernel["block_q"], kernel["block_k"]) != (BLOCK_Q, BLOCK_K):
        raise ConfigError(f"kernel blocks are {kernel['block_q']}x{kernel['block_k']} in the config but this sparge "
                          f"uses {BLOCK_Q}x{BLOCK_K}; thresholds depend on block size: recalibrate")
    l1 = _number(d["l1"], "l1", 0.0, math.inf, low_open=True)
    pv_l1 = _number(d["pv_l1"], "pv_l1", 0.0, math.inf, low_open=True)
    if pv_l1 < l1:
        raise ConfigError(f"pv_l1 ({pv_l1}) must be >= l1 ({l1})")
    calibration = _require_dict(d.get("calibration", {}), "calibration")
    if not isinstance(d["layers"], list):
        raise ConfigError("layers must be a list")
    layers = []
    seen = set()
    for i, raw in enumerate(d["layers"]):
        where = f"layers[{i}]"
        ld = _require_dict(raw, where)
        _check_keys(ld, _LAYER_KEYS[version], {"layer", "simthreshd1", "pvthreshd"}, where)
        idx = _int(ld["layer"], f"{where}.layer", low=0)
        if idx >= info.num_layers:
            raise ConfigError(f"{where}.layer is {idx} but the model has {info.num_layers} layers")
        if idx in seen:
            raise ConfigError(f"{where}.layer {idx} appears twice")
        seen.add(idx)
        if ("cdfthreshd" in ld) == ("topk" in ld):
            raise ConfigError(f"{where} needs exactly one of cdfthreshd and topk")
        h = info.num_heads
        lc = LayerConfig(
            layer=idx,
            simthreshd1=_head_list(ld["simthreshd1"], f"{where}.simthreshd1", h, -1.0, 1.0),
            pvthreshd=_head_list(ld["pvthreshd"], f"{where}.pvthreshd", h, 0.0, math.inf),
            cdfthreshd=_head_list(ld["cdfthreshd"], f"{where}.cdfthreshd", h, 0.0, 1.0) if "cdfthreshd" in ld else None,
            topk=_head_list(ld["topk"], f"{where}.topk", h, 0.0, 1.0) if "topk" in ld else None,
            sparsity=_number(ld["sparsity"], f"{where}.sparsity", 0.0, 1.0) if "sparsity" in ld else None,
            l1=_number(ld["l1"], f"{where}.l1", 0.0) if "l1" in ld else None,
            estimator=_estimator(ld.get("estimator", "pooled"), f"{where}.estimator"),
            variant=_variant(ld["variant"], f"{where}.variant") if "variant" in ld else None,
            predicted=_prediction(ld["predicted"], f"{where}.predicted") if "predicted" in ld else None,
            local_blocks=_int(ld.get("local_blocks", 0), f"{where}.local_blocks", low=0),
            min_tokens=_int(ld.get("min_tokens", 0), f"{where}.min_tokens", low=0),
        )
        if lc.variant is not None and lc.variant.dense and not all(
                v >= 1.0 for v in (lc.topk if lc.topk is not None else lc.cdfthreshd)):
            raise ConfigError(f"{where}.variant says dense but its cdfthreshd/topk keep only part of the blocks; "
                              f"a dense layer keeps every block (1.0 for every head)")
        layers.append(lc)
    return ModelConfig(model=info, layers=tuple(sorted(layers, key=lambda lc: lc.layer)), l1=l1, pv_l1=pv_l1,
                       calibration=calibration)
