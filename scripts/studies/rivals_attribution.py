"""Why does calibrated sparge lose to MInference at the same per-layer density? (CPU study)

On captured Q/K/V (``calibrate.capture`` layout), per layer and window, every block map is put at the
same density: the density the calibrated sparge config reaches on that window (``target``). Maps:

- ``sparge-cal``: the calibrated config as it is (per-head simthreshd1 / cdfthreshd, its estimator).
- ``sparge-pooled`` / ``sparge-keys``: sparge with the config's per-head simthreshd1 and one cdfthreshd
  for the layer, bisected to the target (``match_density``), paper estimator / keys estimator.
- ``minference`` (vertical-slash) and ``flexprefill``: the rivals, bisected to the target.
- ``top-<est>-<alloc>``: a density-targeted selection: the estimated block probabilities of estimator
  ``est`` (``pooled``: pooled query . pooled smoothed key; ``keys``: pooled query against every key;
  ``true``: the exact attention mass, an oracle) ranked within each ``alloc`` (``row``: the same number
  of blocks in every query block; ``head``: the same density in every head; ``layer``: one ranking for
  all heads), sink column and diagonal blocks always kept, the top blocks taken until the target.
- ``top-keys-layer+vs``: as ``top-keys-layer`` with MInference-style column and diagonal priors
  (the last 64 queries' attention summed per key block and per block diagonal) mixed into the score.
- ``sparge-budget[-head][-local<N>]``: the library method ``sparge_core.methods.sparge_budget`` at the
  target density (its mask equals ``top-keys-layer``); ``-local<N>`` also forces the N key blocks
  before each query block's diagonal, ``-head`` allocates per head.
- ``sparge-cal-nopv`` (``ppl`` only): the calibrated config with its stage-2 PV skip off.
- ``config:<path>`` (``ppl`` only): a config file applied as a user applies it, through the product
  path (``sparge_core.integrations.transformers.apply(model, path)``: the identity check, then every
  layer's fields, ``local_blocks`` included, read by ``Sparge.from_layer_config``); ``local-config``
  writes a config with ``local_blocks`` set in every layer.

For each map: relative L1 of the layer's attention output against dense (all heads; and the worst
head), the attention mass it keeps, and, against ``minference``, the blocks one keeps that the other
drops and the true mass in them. ``masked_attention`` of ``sparge_core.ops.reference`` (float32) is
the ground truth. Subcommands:

    capture  --model smollm2 --corpus austen --seq-len 2048 --samples 3 --out DIR
    attribute --capture DIR --config CFG [--samples 3 4 5] --out CSV     (per layer x head x window)
    ppl      --model smollm2 --config CFG --capture DIR --maps ... --data pydoc --windows 2 --out JSON
    local-config --config CFG --local-blocks 1 --out CFG2                 (CFG with local_blocks in every layer)

The ``ppl`` subcommand applies each map layer by layer through ``sparge_core.integrations.transformers``;
rivals get the knob matched on calibration window 0 (as ``python -m evals --density matched`` does),
the ``top-*`` maps take the target density of that window directly.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from calibrate.capture import capture_to_disk, load_captured, read_meta  # noqa: E402
from calibrate.cli import HelpFormatter  # noqa: E402
from sparge_core.atomic import atomic_open, write_text_atomic  # noqa: E402
from sparge_core.methods import _blockmaps as bm  # noqa: E402
from sparge_core.methods import get_method  # noqa: E402
from sparge_core.methods.base import AttentionMethod  # noqa: E402
from sparge_core.methods.density import match_density  # noqa: E402
from sparge_core.methods.sparge import Sparge  # noqa: E402
from sparge_core.ops import reference as R  # noqa: E402
from sparge_core.params import ModelConfig  # noqa: E402

logger = logging.getLogger("rivals_attribution")
DT = torch.float32
LAST_Q = 64


# --------------------------------------------------------------------------------------------
# block scores
# --------------------------------------------------------------------------------------------
def true_block_mass(q, k, scale) -> torch.Tensor:
    """Mean over each query block's rows of the exact causal attention mass in each key block:
    ``(B, Hq, nqb, nkb)``; each row sums to 1."""
    b, hq, n, d = q.shape
    nqb, nkb = R.num_blocks(n, R.BLOCK_Q), R.num_blocks(n, R.BLOCK_K)
    out = torch.zeros(b, hq, nqb, nkb, dtype=DT)
    kk = R._expand_kv_heads(k.to(DT), hq)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for h in range(hq):
        s = (q[:, h].to(DT) @ kk[:, h].transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~causal, -math.inf), dim=-1)  # (B, n, n)
        p = torch.nn.functional.pad(p, (0, nkb * R.BLOCK_K - n, 0, nqb * R.BLOCK_Q - n))
        blocks = p.view(b, nqb, R.BLOCK_Q, nkb, R.BLOCK_K).sum(dim=-1)  # (B, nqb, BQ, nkb)
        rows = torch.clamp(
            torch.tensor([min(R.BLOCK_Q, n - i * R.BLOCK_Q) for i in range(nqb)], dtype=DT), min=1
        )
        out[:, h] = blocks.sum(dim=2) / rows[None, :, None]
    return out


def estimated_block_probs(q, k, scale, estimator: str) -> torch.Tensor:
    """The predictor's row-softmax block probabilities (no self-similarity filter): ``(B, Hq, nqb, nkb)``."""
    n = q.shape[2]
    pq = R.block_mean_pool(q.to(DT), R.BLOCK_Q)
    if estimator == "keys":
        scores = R.key_resolved_scores(pq, k, scale=scale, dtype=DT)
    else:
        pk = R._expand_kv_heads(R.block_mean_pool(R.smooth_k(k.to(DT)), R.BLOCK_K), q.shape[1])
        scores = pq @ pk.transpose(-1, -2)
    allowed = R.causal_block_mask(n, n, R.BLOCK_Q, R.BLOCK_K)
    s = (scores.to(DT) * scale).masked_fill(~allowed, -math.inf)
    return torch.softmax(s, dim=-1)


def vertical_slash_block_prior(q, k, scale) -> torch.Tensor:
    """MInference-style priors at block level from the last ``LAST_Q`` queries: per key block the summed
    attention of those queries (vertical), per block diagonal offset the summed attention along it
    (slash); both normalised to sum 1 per head, broadcast to ``(B, Hq, nqb, nkb)``."""
    b, hq, n, d = q.shape
    nqb, nkb = R.num_blocks(n, R.BLOCK_Q), R.num_blocks(n, R.BLOCK_K)
    kk = R._expand_kv_heads(k.to(DT), hq)
    last = q[:, :, -LAST_Q:].to(DT)
    s = (last @ kk.transpose(-1, -2)) * scale  # (B, H, LAST_Q, n)
    pos = torch.arange(n - LAST_Q, n)[:, None]
    s = s.masked_fill(torch.arange(n)[None, :] > pos, -math.inf)
    p = torch.softmax(s, dim=-1)
    col = torch.nn.functional.pad(p.sum(dim=2), (0, nkb * R.BLOCK_K - n)).view(b, hq, nkb, R.BLOCK_K).sum(-1)
    dist = pos - torch.arange(n)[None, :]  # token distance of each (last query, key)
    slash_tok = torch.zeros(b, hq, n, dtype=DT)
    slash_tok.scatter_add_(
        2, dist.clamp(min=0).expand(b, hq, -1, -1).reshape(b, hq, -1), p.reshape(b, hq, -1)
    )
    # block diagonal offset of (qb, kb): distance between block centres, in key blocks
    qc = (torch.arange(nqb) * R.BLOCK_Q + R.BLOCK_Q / 2)[:, None]
    kc = (torch.arange(nkb) * R.BLOCK_K + R.BLOCK_K / 2)[None, :]
    offset = ((qc - kc) // R.BLOCK_K).clamp(min=0).long()  # (nqb, nkb)
    slash_blk = (
        torch.nn.functional.pad(slash_tok, (0, nkb * R.BLOCK_K - n)).view(b, hq, nkb, R.BLOCK_K).sum(-1)
    )
    vertical = col / col.sum(-1, keepdim=True)
    slash = slash_blk / slash_blk.sum(-1, keepdim=True)
    return vertical[:, :, None, :] + slash[:, :, offset.clamp(max=nkb - 1)]


# --------------------------------------------------------------------------------------------
# density-targeted selection
# --------------------------------------------------------------------------------------------
def forced_blocks(n: int) -> torch.Tensor:
    """Sink column and diagonal blocks (what every map here keeps), within the causal triangle."""
    forced = R.causal_diagonal_block_mask(n, n, R.BLOCK_Q, R.BLOCK_K).clone()
    forced[:, 0] = True
    return forced & R.causal_block_mask(n, n, R.BLOCK_Q, R.BLOCK_K)


def top_select(score: torch.Tensor, target: float, alloc: str) -> torch.Tensor:
    """Keep the forced blocks plus the best-scoring allowed blocks until ``target`` density, ranked
    within each row / head / layer (``alloc``)."""
    b, hq, nqb, nkb = score.shape
    allowed_tri = R.causal_block_mask(nqb * R.BLOCK_Q, nkb * R.BLOCK_K, R.BLOCK_Q, R.BLOCK_K)
    allowed = allowed_tri.expand(b, hq, -1, -1)
    s = score.masked_fill(~allowed, -math.inf)
    total = int(allowed.sum())
    mask = torch.zeros_like(allowed)
    if alloc == "layer":
        want = int(round(target * total))
        flat = s.reshape(-1)
        idx = torch.topk(flat, min(want, total)).indices
        mask.view(-1)[idx] = True
    elif alloc == "head":
        per = int(round(target * total / (b * hq)))
        flat = s.reshape(b * hq, -1)
        idx = torch.topk(flat, min(per, flat.shape[1]), dim=-1).indices
        mask.view(b * hq, -1).scatter_(1, idx, True)
    elif alloc == "row":
        row_allowed = allowed_tri.sum(-1)  # (nqb,)
        for qb in range(nqb):
            keep = max(1, int(round(target * int(row_allowed[qb]))))
            idx = torch.topk(s[:, :, qb], min(keep, nkb), dim=-1).indices
            mask[:, :, qb].scatter_(-1, idx, True)
    else:
        raise ValueError(f"alloc must be row, head or layer, got {alloc!r}")
    return mask & allowed


def with_forced(score: torch.Tensor, n: int) -> torch.Tensor:
    return score.masked_fill(forced_blocks(n), math.inf)


class TopSelect(AttentionMethod):
    """A density-targeted block map (study only): see the module docstring."""

    name = "top-select"

    def __init__(self, estimator: str, alloc: str, target: float, prior: float = 0.0):
        self.estimator, self.alloc, self.target, self.prior = estimator, alloc, float(target), float(prior)

    def params(self):
        return {"estimator": self.estimator, "alloc": self.alloc, "target": self.target, "prior": self.prior}

    def block_mask(self, q, k, *, is_causal, scale=None):
        assert is_causal and q.shape[2] == k.shape[2], "study maps are for causal prefill"
        scale = scale or 1.0 / math.sqrt(q.shape[-1])
        score = block_score(q, k, scale, self.estimator, self.prior)
        return top_select(with_forced(score, q.shape[2]), self.target, self.alloc)


def block_score(q, k, scale, estimator: str, prior: float = 0.0) -> torch.Tensor:
    if estimator == "true":
        score = true_block_mass(q, k, scale)
    else:
        score = estimated_block_probs(q, k, scale, estimator)
    if prior:
        score = score + prior * vertical_slash_block_prior(q, k, scale) / score.shape[-1]
    allowed = R.causal_block_mask(q.shape[2], k.shape[2], R.BLOCK_Q, R.BLOCK_K)
    return score.masked_fill(~allowed, -math.inf)


# --------------------------------------------------------------------------------------------
# the maps of one layer at one target density
# --------------------------------------------------------------------------------------------
TOP_MAPS = {f"top-{e}-{a}": (e, a, 0.0) for e in ("pooled", "keys", "true") for a in ("row", "head", "layer")}
TOP_MAPS["top-keys-layer+vs"] = ("keys", "layer", 1.0)
TOP_MAPS["top-keys-head+vs"] = ("keys", "head", 1.0)


class WithLocal(AttentionMethod):
    """Another method's map plus the sink, diagonal and ``local`` key blocks before each diagonal."""

    name = "with-local"

    def __init__(self, inner: AttentionMethod, local: int):
        self.inner, self.local = inner, local
        self.pvthreshd = getattr(inner, "pvthreshd", None)

    def params(self):
        return {"inner": self.inner.params(), "local_blocks": self.local}

    def block_mask(self, q, k, *, is_causal, scale=None):
        from sparge_core.methods.sparge_budget import forced_blocks

        mask = self.inner.block_mask(q, k, is_causal=is_causal, scale=scale)
        return mask | forced_blocks(q.shape[2], k.shape[2], self.local, device=q.device)


def budget_method(name: str, target: float) -> AttentionMethod:
    """``sparge-budget[-head][-local<N>]``: the library method at the target density."""
    parts = name.split("-")[2:]
    local = next((int(p[5:]) for p in parts if p.startswith("local")), 0)
    alloc = "head" if "head" in parts else "layer"
    return get_method("sparge-budget", density=target, alloc=alloc, local_blocks=local)


def layer_maps(
    q, k, lc, names: list[str], scale: float
) -> tuple[dict[str, torch.Tensor], float, dict[str, float]]:
    """``{name: mask}`` with every map at the calibrated config's density on (q, k); the target; the
    knob values found."""
    n = q.shape[2]
    cal = Sparge.from_layer_config(lc)
    maps = {"sparge-cal": cal.block_mask(q, k, is_causal=True, scale=scale)}
    target = bm.mask_density(maps["sparge-cal"], n, n, True)
    knobs = {}
    for name in names:
        if name in ("sparge-cal",):
            continue
        if name in ("sparge-pooled", "sparge-keys"):
            method, _ = match_density(
                "sparge",
                q,
                k,
                target,
                True,
                scale=scale,
                simthreshd1=list(lc.simthreshd1),
                estimator=name.split("-")[1],
                pvthreshd=50.0,
            )
            knobs[name] = float(method.cdfthreshd)
        elif name in ("minference", "flexprefill"):
            method, _ = match_density(name, q, k, target, True, scale=scale)
            knobs[name] = float(getattr(method, method.budget_param))
        elif name in TOP_MAPS:
            est, alloc, prior = TOP_MAPS[name]
            method = TopSelect(est, alloc, target, prior)
        elif name.startswith("sparge-budget"):
            method = budget_method(name, target)
        else:
            raise ValueError(f"unknown map {name!r}")
        maps[name] = method.block_mask(q, k, is_causal=True, scale=scale)
    return maps, target, knobs


def rel_l1(a: torch.Tensor, b: torch.Tensor, dims) -> torch.Tensor:
    return (a.double() - b.double()).abs().sum(dim=dims) / b.double().abs().sum(dim=dims).clamp_min(1e-30)


def cmd_attribute(args) -> int:
    meta = read_meta(args.capture)
    cfg = ModelConfig.load(args.config)
    by_layer = {lc.layer: lc for lc in cfg.layers}
    layers = args.layers or list(meta.layers)
    samples = args.samples or list(range(meta.samples))
    names = args.maps
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.perf_counter()
    for layer in layers:
        lc = by_layer[layer]
        if lc.is_dense:
            continue
        captured = load_captured(args.capture, layer)
        for s in samples:
            q, k, v = captured[s]
            scale = 1.0 / math.sqrt(q.shape[-1])
            n = q.shape[2]
            maps, target, knobs = layer_maps(q, k, lc, names, scale)
            dense = R.dense_attention(q, k, v, is_causal=True, scale=scale, dtype=DT).to(DT)
            mass = true_block_mass(q, k, scale)  # (1, H, nqb, nkb)
            allowed = R.causal_block_mask(n, n, R.BLOCK_Q, R.BLOCK_K)
            ref = maps.get("minference")
            nqb = mass.shape[2]
            for name, mask in maps.items():
                mask = mask & allowed
                o = R.masked_attention(q, k, v, mask, is_causal=True, scale=scale, dtype=DT)[0].to(DT)
                layer_l1 = float(rel_l1(o, dense, (0, 1, 2, 3)))
                head_l1 = rel_l1(o, dense, (0, 2, 3))
                kept_mass = (mass * mask).sum(-1).mean(-1)[0]  # per head: mean over query blocks
                for h in range(q.shape[1]):
                    row = {
                        "layer": layer,
                        "window": s,
                        "map": name,
                        "head": h,
                        "target": round(target, 4),
                        "density": round(bm.mask_density(mask[:, h : h + 1], n, n, True), 4),
                        "layer_density": round(bm.mask_density(mask, n, n, True), 4),
                        "layer_l1": round(layer_l1, 5),
                        "head_l1": round(float(head_l1[h]), 5),
                        "kept_mass": round(float(kept_mass[h]), 5),
                        "knob": knobs.get(name, ""),
                    }
                    if ref is not None:
                        only_this = mask[0, h] & ~ref[0, h] & allowed
                        only_ref = ref[0, h] & ~mask[0, h] & allowed
                        row.update(
                            {
                                "blocks_only_this": int(only_this.sum()),
                                "blocks_only_minference": int(only_ref.sum()),
                                "mass_only_this": round(float((mass[0, h] * only_this).sum() / nqb), 5),
                                "mass_only_minference": round(float((mass[0, h] * only_ref).sum() / nqb), 5),
                            }
                        )
                    rows.append(row)
            logger.info(
                "layer %d window %d: target %.3f  %s  (%.0f s)",
                layer,
                s,
                target,
                " ".join(
                    f"{r['map']}={r['layer_l1']:.4f}" for r in rows[-len(maps) * q.shape[1] :: q.shape[1]]
                ),
                time.perf_counter() - started,
            )
        _write_csv(out, rows)
    _write_csv(out, rows)
    print(f"wrote {out} ({len(rows)} rows) in {time.perf_counter() - started:.0f} s")
    return 0


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


# --------------------------------------------------------------------------------------------
# capture and perplexity
# --------------------------------------------------------------------------------------------
def cmd_capture(args) -> int:
    from calibrate.data import token_windows
    from calibrate.models import load_model

    model, tok = load_model(args.model)
    windows = token_windows(tok, args.corpus, args.seq_len, args.samples, seed=args.seed)
    meta = capture_to_disk(model, windows, args.out, args.layers, model_name=args.model)
    print(f"captured {meta.samples} x {meta.seq_len} tokens of {meta.data_name} into {args.out}")
    return 0


def per_layer_methods(name: str, cfg: ModelConfig, capture: str, window: int) -> tuple[dict, dict]:
    """``{layer: AttentionMethod}`` for a map, tuned on one capture window, and the densities there."""
    methods, dens = {}, {}
    for lc in cfg.layers:
        if lc.is_dense:
            methods[lc.layer] = None
            continue
        q, k, _ = load_captured(capture, lc.layer)[window]
        scale = 1.0 / math.sqrt(q.shape[-1])
        cal = Sparge.from_layer_config(lc)
        target = bm.mask_density(
            cal.block_mask(q, k, is_causal=True, scale=scale), q.shape[2], q.shape[2], True
        )
        if name == "sparge-cal":
            method = cal
        elif name == "sparge-cal-nopv":
            method = Sparge.from_layer_config(lc)
            method.pvthreshd = 50.0
        elif name.startswith("sparge-cal-local"):  # the calibrated map plus forced local blocks
            method = WithLocal(cal, int(name[len("sparge-cal-local"):]))
        elif name in ("minference", "flexprefill"):
            method, _ = match_density(name, q, k, target, True, scale=scale)
        elif name in ("sparge-pooled", "sparge-keys"):
            method, _ = match_density(
                "sparge",
                q,
                k,
                target,
                True,
                scale=scale,
                simthreshd1=list(lc.simthreshd1),
                estimator=name.split("-")[1],
                pvthreshd=50.0,
            )
        elif name in TOP_MAPS:
            est, alloc, prior = TOP_MAPS[name]
            method = TopSelect(est, alloc, target, prior)
        elif name.startswith("sparge-budget"):  # the library version of top-keys-layer (+ options)
            method = budget_method(name, target)
        else:
            raise ValueError(f"unknown map {name!r}")
        methods[lc.layer] = method
        dens[lc.layer] = round(target, 4)
    return methods, dens


def cmd_ppl(args) -> int:
    from calibrate.data import token_windows
    from calibrate.models import load_model
    from evals.ppl import perplexity
    from sparge_core.integrations.transformers import apply, remove

    cfg = ModelConfig.load(args.config)
    model, tok = load_model(args.model)
    report = {
        "command": " ".join(sys.argv),
        "config": args.config,
        "capture": args.capture,
        "tune_window": args.tune_window,
        "results": {},
    }
    for data in args.data:
        windows = token_windows(tok, data, args.seq_len, args.windows, seed=args.seed)
        entry = {"starts": list(windows.starts), "maps": {}}
        ppl, nll, per = perplexity(model, windows.input_ids)
        entry["maps"]["dense"] = {"ppl": ppl, "window_ppl": list(per)}
        logger.info("%s dense %.3f", data, ppl)
        for name in args.maps:
            if name.startswith("config:"):  # the product path: the file itself, as a user applies it
                handle = apply(model, name[len("config:"):], backend="reference", collect_stats=True)
            else:
                methods, dens = per_layer_methods(name, cfg, args.capture, args.tune_window)
                handle = apply(model, methods, backend="reference", collect_stats=True)
            t0 = time.perf_counter()
            try:
                ppl, nll, per = perplexity(model, windows.input_ids)
            finally:
                remove(model)
            rep = handle.sparsity_report()
            local = sorted({getattr(m, "local_blocks", 0) for m in handle.methods.values() if m is not None})
            entry["maps"][name] = {
                "local_blocks": local,
                "ppl": ppl,
                "window_ppl": list(per),
                "qk_sparsity": rep["total"].get("qk_sparsity"),
                "sparsity": rep["total"].get("sparsity"),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            logger.info("%s %s %.3f (sparsity %s)", data, name, ppl, rep["total"].get("qk_sparsity"))
        report["results"][data] = entry
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(args.out), json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


def cmd_local_config(args) -> int:
    cfg = ModelConfig.load(args.config)
    out = cfg.with_local_blocks(args.local_blocks)
    out.calibration["local_blocks_set_after_calibration"] = {
        "local_blocks": args.local_blocks,
        "from": args.config,
        "note": "the search ran without it: l1/sparsity per layer are the calibrated config's",
    }
    out.save(args.out)
    print(f"wrote {args.out} (local_blocks={args.local_blocks} in {len(out.layers)} layers)")
    return 0


def cmd_fixed_config(args) -> int:
    """One set of hyperparameters in every layer and head of a model (no calibration): a config for
    A/B runs of the predictor's options on a model that has no calibrated config."""
    from calibrate.models import ModelSpec, load_model
    from sparge_core.params import LayerConfig

    model, _ = load_model(args.model)
    spec = ModelSpec.from_model(model, name=args.model)
    h = spec.num_heads
    layers = tuple(LayerConfig(i, (args.simthreshd1,) * h, (50.0,) * h, cdfthreshd=(args.cdfthreshd,) * h,
                               estimator=args.estimator, local_blocks=args.local_blocks)
                   for i in range(spec.num_layers))
    cfg = ModelConfig(spec.model_info(), layers, l1=1.0, pv_l1=1.0, calibration={  # no bound: l1 is a placeholder
        "fixed_hyperparameters": {"simthreshd1": args.simthreshd1, "cdfthreshd": args.cdfthreshd,
                                  "estimator": args.estimator, "local_blocks": args.local_blocks},
        "note": "not calibrated: the same hyperparameters in every layer and head (no bound was searched)"})
    cfg.save(args.out)
    print(f"wrote {args.out} ({spec.num_layers} layers x {h} heads, not calibrated)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture", formatter_class=HelpFormatter)
    c.add_argument("--model", default="smollm2")
    c.add_argument("--corpus", default="austen")
    c.add_argument("--seq-len", type=int, default=2048)
    c.add_argument("--samples", type=int, default=3)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--layers", type=int, nargs="*")
    c.add_argument("--out", required=True)
    a = sub.add_parser("attribute", formatter_class=HelpFormatter)
    a.add_argument("--capture", required=True)
    a.add_argument("--config", required=True)
    a.add_argument("--samples", type=int, nargs="*", help="capture windows to evaluate (default: all)")
    a.add_argument("--layers", type=int, nargs="*")
    a.add_argument(
        "--maps", nargs="+", default=["sparge-pooled", "sparge-keys", "minference", "flexprefill", *TOP_MAPS]
    )
    a.add_argument("--out", required=True)
    p = sub.add_parser("ppl", formatter_class=HelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--config", required=True)
    p.add_argument(
        "--capture", required=True, help="capture whose window --tune-window sets the rivals' knobs"
    )
    p.add_argument("--tune-window", type=int, default=0)
    p.add_argument("--maps", nargs="+", default=["sparge-cal", "minference", "top-keys-layer"])
    p.add_argument("--data", nargs="+", default=["pydoc"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seed", type=int, default=1, help="window choice (calibration used seed 0)")
    p.add_argument("--out", required=True)
    lc = sub.add_parser("local-config", formatter_class=HelpFormatter)
    lc.add_argument("--config", required=True)
    lc.add_argument("--local-blocks", type=int, default=1, help="key blocks forced before each query block's diagonal")
    lc.add_argument("--out", required=True)
    fc = sub.add_parser("fixed-config", formatter_class=HelpFormatter,
                        help="one set of hyperparameters in every layer (no calibration), for A/B runs")
    fc.add_argument("--model", required=True)
    fc.add_argument("--simthreshd1", type=float, default=0.6)
    fc.add_argument("--cdfthreshd", type=float, default=0.9)
    fc.add_argument("--estimator", default="keys")
    fc.add_argument("--local-blocks", type=int, default=0)
    fc.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cmds = {"capture": cmd_capture, "attribute": cmd_attribute, "ppl": cmd_ppl, "local-config": cmd_local_config,
            "fixed-config": cmd_fixed_config}
    return cmds[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
