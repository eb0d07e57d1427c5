"""What every text suite shares: the attention methods to compare (at matched densities) and the
result files they write.

A ``MethodSetting`` is one row of a results table: ``dense`` (the model's own SDPA), ``sparge`` with a
calibrated per-layer config (or global hyperparameters), ``sparge-topk``, ``minference``,
``flexprefill``. Rivals are put at the **same density as sparge, layer by layer** (``density="matched"``:
each layer's density is the one the calibrated config reaches on captured Q/K/V of that layer) or at
a fixed density (``density=0.5``), by bisection on each method's own budget knob
(``sparge_core.methods.density.match_density``) on captured Q/K/V, so that every method runs the same
kernel on masks of the same size and only the choice of blocks differs.

Result files (schema in ``results/README.md``): ``<out>/<suite>/<model>/<label>.json`` (``python -m evals``
writes to ``runs/`` unless ``--out`` says otherwise).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .environment import environment

logger = logging.getLogger(__name__)

DENSE = "dense"
METHODS = ("dense", "sparge", "sparge-topk", "minference", "flexprefill")


@dataclass
class MethodSetting:
    """One attention method, configured for one model (per layer where it matters)."""

    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    per_layer: dict[int, Any] | None = None  # layer -> AttentionMethod or None (dense)
    config_path: str | None = None
    target: str | None = None  # "matched", a float as text, or None
    densities: dict[int, float] = field(default_factory=dict)  # per layer, measured on the capture
    allow_other_model: bool = False  # apply config_path although it was calibrated for another model

    @property
    def is_dense(self) -> bool:
        return self.method == DENSE

    def describe(self) -> dict[str, Any]:
        d = {"label": self.label, "method": self.method, "params": self.params, "config": self.config_path,
             "density_target": self.target}
        if self.densities:
            d["capture_density_per_layer"] = {str(k): round(v, 4) for k, v in sorted(self.densities.items())}
            d["capture_density_mean"] = round(sum(self.densities.values()) / len(self.densities), 4)
        if self.per_layer is not None:
            d["per_layer_params"] = {str(k): (None if m is None else _jsonable(m.params()))
                                     for k, m in sorted(self.per_layer.items())}
        return d

    @contextlib.contextmanager
    def applied(self, model, *, backend: str = "auto", collect_stats: bool = True) -> Iterator[Any]:
        """Route the model's attention through this method for the duration; yields the handle
        (None for dense)."""
        if self.is_dense:
            yield None
            return
        from sparge_core.integrations.transformers import apply, remove

        if self.per_layer is not None:
            handle = apply(model, self.per_layer, backend=backend, collect_stats=collect_stats)
        elif self.config_path is not None:
            handle = apply(model, self.config_path, backend=backend, collect_stats=collect_stats,
                           allow_other_model=self.allow_other_model)
        else:
            handle = apply(model, self.method, backend=backend, collect_stats=collect_stats, **self.params)
        try:
            yield handle
        finally:
            remove(model)


def parse_method_spec(text: str) -> tuple[str, dict[str, float]]:
    """``NAME[:key=value,...]`` (e.g. ``sparge:cdfthreshd=0.9``) -> ``(NAME, {key: float(value)})``;
    ``sdpa`` is the model's own dense attention (``evals.ppl.run_methods``)."""
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bad method spec {text!r}: expected NAME:key=value,...")
        try:
            params[key] = float(value)
        except ValueError as err:
            raise ValueError(f"bad method spec {text!r}: {key}={value!r} is not a number") from err
    if not name:
        raise ValueError(f"bad method spec {text!r}: the method name is missing")
    return name, params


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# building settings
# --------------------------------------------------------------------------------------------
def _capture_layers(capture_dir: str | Path) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """(q, k) of the first captured sample of every layer."""
    from calibrate.capture import load_captured, read_meta

    meta = read_meta(capture_dir)
    out = {}
    for layer in meta.layers:
        q, k, _ = load_captured(capture_dir, layer)[0]
        out[layer] = (q, k)
    return out


def _density_of(method, q, k) -> float:
    from sparge_core.methods.density import method_density

    return float(method_density(method, q, k, is_causal=True))


def build_settings(methods: list[str], *, config: str | None = None, density: str | None = None,
                   capture_dir: str | None = None, device: str = "cpu",
                   allow_other_model: bool = False) -> list[MethodSetting]:
    """The settings to compare. ``density``: None (each method's defaults), ``"matched"`` (per layer,
    the density of the calibrated ``config``) or a number (every layer at that density). Matching
    needs ``capture_dir`` (Q/K/V captured by calibration)."""
    from sparge_core.methods import method_names
    from sparge_core.methods.density import match_density
    from sparge_core.methods.sparge import Sparge
    from sparge_core.params import ModelConfig

    unknown = [m for m in methods if m != DENSE and m not in method_names()]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {[DENSE, *method_names()]}")
    if density not in (None, "matched"):
        try:
            value = float(density)
        except ValueError as err:
            raise ValueError(f"density must be 'matched' or a number in (0, 1], got {density!r}") from err
        if not 0 < value <= 1:
            raise ValueError(f"density must be in (0, 1], got {value}")
    if density == "matched" and config is None:
        raise ValueError("density='matched' needs the calibrated sparge --config whose densities the rivals match")
    if density is not None and capture_dir is None:
        raise ValueError("density matching needs captured Q/K/V: pass --capture (the calibration's <config>.capture)")
    cfg = ModelConfig.load(config) if config else None
    captured = _capture_layers(capture_dir) if density is not None else {}
    captured = {i: (q.to(device), k.to(device)) for i, (q, k) in captured.items()}

    # per-layer target densities
    targets: dict[int, float] = {}
    if density == "matched":
        for lc in cfg.layers:
            if lc.layer in captured and not lc.is_dense:
                targets[lc.layer] = _density_of(Sparge.from_layer_config(lc), *captured[lc.layer])
    elif density is not None:
        targets = {i: float(density) for i in captured}

    settings = []
    for name in methods:
        if name == DENSE:
            settings.append(MethodSetting(DENSE, DENSE))
            continue
        if name == "sparge" and cfg is not None:
            s = MethodSetting("sparge", "sparge", config_path=str(config), target="calibrated",
                              allow_other_model=allow_other_model)
            if captured:
                s.densities = {lc.layer: _density_of(Sparge.from_layer_config(lc), *captured[lc.layer])
                               for lc in cfg.layers if lc.layer in captured and not lc.is_dense}
            settings.append(s)
            continue
        if not targets:
            settings.append(MethodSetting(name, name))
            continue
        per_layer: dict[int, Any] = {}
        reached: dict[int, float] = {}
        for layer, (q, k) in captured.items():
            if layer not in targets:
                per_layer[layer] = None  # the calibrated config keeps this layer dense: so do the rivals
                continue
            method, got = match_density(name, q, k, targets[layer], True)
            per_layer[layer] = method
            reached[layer] = float(got)
        label = f"{name}@{density if density == 'matched' else f'{float(density):.2f}'}"
        settings.append(MethodSetting(label, name, per_layer=per_layer, target=str(density), densities=reached))
        logger.info("%s: mean density %.3f over %d layers", label, sum(reached.values()) / max(1, len(reached)),
                    len(reached))
    return settings


# --------------------------------------------------------------------------------------------
# result files
# --------------------------------------------------------------------------------------------
def file_sha256(path: str | Path | None) -> str | None:
    if not path:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_result(out_dir: str | Path, suite: str, model: str, setting: MethodSetting, *, scores: dict,
                 sparsity: dict | None = None, timings: dict | None = None, data: dict | None = None,
                 extra: dict | None = None, name: str | None = None) -> Path:
    """Write ``<out_dir>/<suite>/<model>/<name or label>.json`` atomically and return its path."""
    from sparge_core.params import write_json_atomic

    doc = {
        "suite": suite,
        "model": model,
        "method": setting.method,
        "label": setting.label,
        "setting": setting.describe(),
        "scores": scores,
        "sparsity": sparsity or {},
        "timings": timings or {},
        "data": data or {},
        "config_sha256": file_sha256(setting.config_path),
        "command": " ".join(sys.argv),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **environment(),
        **(extra or {}),
    }
    safe = (name or setting.label).replace("/", "_").replace("@", "_at_")
    path = Path(out_dir) / suite / model / f"{safe}.json"
    write_json_atomic(path, _jsonable(doc))
    return path


def sparsity_summary(handle) -> dict[str, Any]:
    """Per-layer and mean sparsity from an applied handle's statistics."""
    if handle is None:
        return {"mean": 0.0, "qk_mean": 0.0, "layers": {}}
    report = handle.sparsity_report()
    layers = report["layers"]
    sparse = [v for v in layers.values() if v.get("sparse_calls")]
    mean = sum(v["sparsity"] for v in layers.values()) / len(layers) if layers else 0.0
    qk = sum(v["qk_sparsity"] for v in layers.values()) / len(layers) if layers else 0.0
    return {"mean": mean, "qk_mean": qk, "total": report["total"], "sparse_layers": len(sparse),
            "layers": {str(k): v for k, v in layers.items()}}


def save_json(path: str | Path, doc: dict) -> None:
    from sparge_core.params import write_json_atomic

    write_json_atomic(path, _jsonable(doc))


def load_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
