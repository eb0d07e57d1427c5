"""Record the post-RoPE Q, K, V of a model's attention layers to disk, for calibration.

File layout (a contract other modules rely on)::

    <dir>/meta.json                      model (name, shape, architecture, weights fingerprint), seq_len,
                                         samples, data (name, sha256, seed, window starts), dtype,
                                         query_chunks
    <dir>/L{layer:03d}/S{sample:03d}.safetensors
        q: (1, Hq, M, D)   k, v: (1, Hkv, N, D)   in the model's dtype

``q`` holds every query row (``M = N``, ``query_chunks`` empty) or, with ``query_blocks``, only the
rows of ``query_chunks`` (``[(start, length)]`` in sequence positions, concatenated in that order):
a deterministic, position-stratified subset of the query blocks. K and V are always whole: the
predictor's choice for a query block depends only on that block's rows and on all of K (its
smoothing mean included), so attention on the stored rows is exact for those rows
(``calibrate.search.LayerEvaluator`` places them in a zero query and computes only their blocks).

``capture_to_disk`` runs one window at a time (batch 1, no KV cache) with dense attention through
``sparge_core.integrations.transformers.capture_qkv``; every file is written atomically and
``meta.json`` last, so a folder with a ``meta.json`` is complete. ``load_captured(dir, layer)``
reads one layer back; ``load_layer(dir, layer, device)`` does too without a host copy on CPU (the
files are memory-mapped: worker processes share the page cache) and straight to a GPU otherwise.

Diffusion transformers write the same layout through ``SafetensorsSink`` (the sink of
``sparge_core.integrations.dit.QKVCapture``): ``evals.dit.capture`` for the project's DiTs and
``capture_diffusers`` here for diffusers models; their ``meta.json`` adds ``source``,
``is_causal`` (false), ``token_layout`` and ``sample_info`` (one record per sample).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from sparge_core.atomic import atomic_path, remove_stale_temporaries, write_json_atomic

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
FORMAT = "sparge-qkv-capture"
VERSION = 1


@dataclass(frozen=True)
class CaptureMeta:
    """The contents of ``meta.json``."""

    model: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    seq_len: int
    samples: int
    data_name: str
    data_sha256: str
    dtype: str
    layers: tuple[int, ...]
    window_starts: tuple[int, ...] = ()
    seed: int | None = None  # the window choice's seed (None: first windows, or not recorded)
    architecture: str | None = None  # transformers model_type of the captured model
    fingerprint: str | None = None  # sparge_core.params.weights_fingerprint of the captured model
    source: str = "text"  # "text" (a corpus, this module) or e.g. "dit" (evals.dit.capture)
    query_chunks: tuple[tuple[int, int], ...] = ()  # empty: q holds every row

    @property
    def query_rows(self) -> int:
        return sum(length for _, length in self.query_chunks) if self.query_chunks else self.seq_len

    def to_dict(self) -> dict[str, Any]:
        d = {"format": FORMAT, "version": VERSION, "model": self.model, "num_layers": self.num_layers,
             "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
             "seq_len": self.seq_len, "samples": self.samples,
             "data": {"name": self.data_name, "sha256": self.data_sha256, "seed": self.seed,
                      "window_starts": list(self.window_starts)},
             "dtype": self.dtype, "layers": list(self.layers), "source": self.source,
             "query_chunks": [list(c) for c in self.query_chunks]}
        if self.architecture is not None:
            d["architecture"] = self.architecture
        if self.fingerprint is not None:
            d["weights_fingerprint"] = self.fingerprint
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaptureMeta:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"not a sparge capture meta.json (format {got!r}, expected {FORMAT!r})")
        try:
            data = d["data"]
            return cls(d["model"], d["num_layers"], d["num_heads"], d["num_kv_heads"], d["head_dim"], d["seq_len"],
                       d["samples"], data["name"], data["sha256"], d["dtype"], tuple(d["layers"]),
                       tuple(data.get("window_starts", ())), data.get("seed"), d.get("architecture"),
                       d.get("weights_fingerprint"), d.get("source", "text"),
                       tuple((int(a), int(b)) for a, b in d.get("query_chunks", ())))
        except (KeyError, TypeError) as err:
            raise ValueError(f"capture meta.json lacks or misstates {err}") from err


def layer_dir(out_dir: str | os.PathLike, layer: int) -> Path:
    return Path(out_dir) / f"L{layer:03d}"


def sample_path(out_dir: str | os.PathLike, layer: int, sample: int) -> Path:
    return layer_dir(out_dir, layer) / f"S{sample:03d}.safetensors"


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file, written atomically (``sparge_core.atomic``)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


class SafetensorsSink:
    """``sink(layer, sample, q, k, v)`` writing ``L{layer}/S{sample}.safetensors`` atomically (the
    tensors cast to ``dtype`` on the CPU; None keeps theirs). ``sha256`` hashes everything written,
    in order (the capture's data fingerprint)."""

    def __init__(self, root: str | os.PathLike, dtype: torch.dtype | None = torch.float16):
        self.root = Path(root)
        self.dtype = dtype
        self.written: set[tuple[int, int]] = set()
        self.stored_dtype: torch.dtype | None = None
        self._digest = hashlib.sha256()

    def __call__(self, layer: int, sample: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        tensors = {name: t.detach().to("cpu", self.dtype or t.dtype).contiguous()
                   for name, t in (("q", q), ("k", k), ("v", v))}
        save_tensors_atomic(sample_path(self.root, layer, sample), tensors)
        self._digest.update(f"L{layer}S{sample}".encode())
        for t in tensors.values():
            self._digest.update(t.view(torch.uint8).numpy().tobytes())
        self.stored_dtype = tensors["q"].dtype
        self.written.add((layer, sample))

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


@contextlib.contextmanager
def capture_diffusers(model, out_dir: str | os.PathLike, *, model_name: str, order: str | None = "hilbert",
                      layers: Iterable[int] | None = None, steps: Iterable[int] | None = None,
                      rows: Iterable[int] | None = None, dtype: torch.dtype | None = torch.float16,
                      data_name: str = "diffusers-prompts") -> Iterator[Any]:
    """Capture a diffusers transformer's Q/K/V to ``out_dir`` while the ``with`` block runs it::

        with capture_diffusers(pipe.transformer, "runs/wan.capture", model_name="wan-1.3b", steps=[0, 15]):
            pipe(prompt, num_inference_steps=30)
        # sparge-calibrate --model wan-1.3b --capture-dir runs/wan.capture --non-causal
        #     --samples N-1 --holdout 1 --seq-len <meta seq_len> --out runs/wan.json

    One sample per (transformer call, batch row) of the kept ``steps`` / ``rows`` (see
    ``sparge_core.integrations.diffusers.capture``), stored in ``order`` (Hilbert by default, the order
    ``apply`` deploys). ``meta.json`` is written when the block ends without an error; yields the
    capture handle (``handle.samples`` labels each sample).
    """
    from sparge_core.integrations.diffusers import capture

    out = Path(out_dir)
    if (out / META_FILE).exists():
        raise FileExistsError(f"{out} already holds a capture (meta.json); choose a new folder or delete it")
    sink = SafetensorsSink(out, dtype=dtype)
    handle = capture(model, sink, order=order, layers=layers, steps=steps, rows=rows)
    try:
        yield handle
    finally:
        handle.remove()
    fields = handle.meta()
    if not fields["samples"] or not sink.written:
        raise ValueError("nothing was captured: run the transformer (or its pipeline) inside the with-block, "
                         "and check that steps= / rows= keep some calls")
    from sparge_core.params import weights_fingerprint

    meta = {"format": FORMAT, "version": VERSION, "model": model_name, **fields,
            "data": {"name": data_name, "sha256": sink.sha256, "window_starts": []},
            "dtype": str(sink.stored_dtype).removeprefix("torch."),
            # the identity a config calibrated from this capture records (checked by diffusers' apply)
            "architecture": type(model).__name__, "weights_fingerprint": weights_fingerprint(model)}
    write_json_atomic(out / META_FILE, meta)
    logger.info("captured %d samples x %d layers into %s", meta["samples"], len(meta["layers"]), out)


@dataclass(frozen=True)
class _Windows:
    input_ids: torch.Tensor
    name: str
    sha256: str
    starts: tuple[int, ...]
    seed: int | None = None


def _as_windows(source, corpus, seq_len, samples, seed) -> _Windows:
    """Token windows from a TokenWindows, an id tensor ``(N, L)`` or a tokenizer + corpus."""
    from .data import TokenWindows, token_windows

    if isinstance(source, TokenWindows):
        return _Windows(source.input_ids, source.corpus, source.sha256, source.starts, source.seed)
    if isinstance(source, torch.Tensor):
        if source.ndim != 2 or source.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token ids must be an integer tensor (samples, seq_len), got {source.dtype} "
                             f"{tuple(source.shape)}")
        digest = hashlib.sha256(source.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
        return _Windows(source.to(torch.int64), "token-ids", digest, ())
    if not callable(source):
        raise TypeError(f"expected a tokenizer, TokenWindows or token-id tensor, got {type(source).__name__}")
    if seq_len is None or samples is None:
        raise ValueError("with a tokenizer, pass seq_len and samples (and corpus) to choose the windows")
    w = token_windows(source, corpus, seq_len, samples, seed=seed)
    return _Windows(w.input_ids, w.corpus, w.sha256, w.starts, w.seed)


def query_chunks_for(seq_len: int, query_blocks: int | None, chunk_blocks: int = 8) -> tuple[tuple[int, int], ...]:
    """The stored query rows of a window: ``query_blocks`` of its ``BLOCK_Q``-row blocks in runs of
    ``chunk_blocks``, one run at the end of each of ``ceil(query_blocks / chunk_blocks)`` equal strata
    of the sequence (the last run ends at the last token). Empty (every row) when ``query_blocks`` is
    None or covers the sequence. Deterministic: the same for every sample and every layer."""
    from sparge_core.ops.blocks import BLOCK_Q, num_blocks

    total = num_blocks(seq_len, BLOCK_Q)
    if query_blocks is None or query_blocks >= total:
        return ()
    if query_blocks < 1 or chunk_blocks < 1:
        raise ValueError(f"query_blocks ({query_blocks}) and chunk_blocks ({chunk_blocks}) must be >= 1")
    runs = -(-query_blocks // chunk_blocks)
    chunks, left = [], query_blocks
    for j in range(runs):
        size = min(chunk_blocks, left)
        left -= size
        end_block = round((j + 1) * total / runs)
        start_block = max(end_block - size, chunks[-1][1] if chunks else 0)
        chunks.append((start_block, end_block))
    out = []
    for a, b in chunks:
        start, stop = a * BLOCK_Q, min(b * BLOCK_Q, seq_len)
        if stop > start:
            out.append((start, stop - start))
    return tuple(out)


def select_query_rows(q: torch.Tensor, chunks: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The stored rows of ``q`` (``(B, H, N, D)``) for ``query_chunks_for`` chunks."""
    if not chunks:
        return q
    return torch.cat([q[:, :, start:start + length] for start, length in chunks], dim=2)


@torch.no_grad()
def capture_to_disk(model, tokenizer_or_windows, out_dir: str | os.PathLike, layers: Iterable[int] | None = None, *,
                    corpus: str = "pydoc", seq_len: int | None = None, samples: int | None = None,
                    seed: int | None = None, model_name: str | None = None, query_blocks: int | None = None,
                    chunk_blocks: int = 8) -> CaptureMeta:
    """Run the model on each window and write the Q, K, V of the chosen layers (all by default).

    ``tokenizer_or_windows`` is a ``calibrate.data.TokenWindows``, an int tensor ``(samples, seq_len)``
    of token ids, or a tokenizer (then ``corpus``, ``seq_len``, ``samples`` and ``seed`` pick the
    windows with ``calibrate.data.token_windows``). Returns the metadata written to ``meta.json``.
    """
    from sparge_core.integrations.transformers import capture_qkv
    from sparge_core.params import weights_fingerprint

    from .models import model_spec

    windows = _as_windows(tokenizer_or_windows, corpus, seq_len, samples, seed)
    spec = model_spec(model, model_name)
    chosen = tuple(range(spec.num_layers)) if layers is None else tuple(sorted(set(layers)))
    bad = [x for x in chosen if not 0 <= x < spec.num_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range; the model has layers 0..{spec.num_layers - 1}")
    out_dir = Path(out_dir)
    if (out_dir / META_FILE).exists():
        raise FileExistsError(f"{out_dir} already holds a capture (meta.json); choose a new folder or delete it")
    stale = remove_stale_temporaries(out_dir)
    if stale:
        logger.info("removed %d partial file(s) an interrupted capture left in %s", len(stale), out_dir)
    device = next(model.parameters()).device
    current = {"sample": 0}
    chunks = query_chunks_for(int(windows.input_ids.shape[1]), query_blocks, chunk_blocks)

    def write(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        save_tensors_atomic(sample_path(out_dir, layer, current["sample"]),
                            {"q": select_query_rows(q, chunks).cpu(), "k": k.cpu(), "v": v.cpu()})

    with capture_qkv(model, chosen, sink=write):
        for i, ids in enumerate(windows.input_ids):
            current["sample"] = i
            model(ids[None].to(device), use_cache=False, logits_to_keep=1)  # no (N, vocab) logits
            logger.info("captured sample %d/%d", i + 1, windows.input_ids.shape[0])
    meta = CaptureMeta(spec.name, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                       int(windows.input_ids.shape[1]), int(windows.input_ids.shape[0]), windows.name,
                       windows.sha256, str(next(model.parameters()).dtype).removeprefix("torch."), chosen,
                       windows.starts, windows.seed, spec.model_type, weights_fingerprint(model), query_chunks=chunks)
    write_json_atomic(out_dir / META_FILE, meta.to_dict())
    return meta


def read_meta(out_dir: str | os.PathLike) -> CaptureMeta:
    """The capture's metadata; ``FileNotFoundError`` for an unfinished capture, ``ValueError`` for an
    unreadable ``meta.json``."""
    path = Path(out_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {out_dir} is not a finished capture")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete {out_dir} to capture again") from err
    return CaptureMeta.from_dict(raw)


def load_captured(out_dir: str | os.PathLike, layer: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``[(q, k, v)]`` of one layer, one tuple per sample in sample order."""
    from safetensors.torch import load_file

    meta = read_meta(out_dir)
    if layer not in meta.layers:
        raise ValueError(f"layer {layer} was not captured in {out_dir}; captured layers: {list(meta.layers)}")
    result = []
    for sample in range(meta.samples):
        path = sample_path(out_dir, layer, sample)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the capture")
        t = load_file(str(path))
        result.append((t["q"], t["k"], t["v"]))
    return result


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}


def _mapped_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of a private memory map (no read into the process;
    pages come from the shared page cache, copied only if written)."""
    import mmap
    import struct

    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    (header_len,) = struct.unpack("<Q", mapped[:8])
    header = json.loads(mapped[8:8 + header_len])
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, not one a capture holds")
        start, end = info["data_offsets"]
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        out[name] = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + start).reshape(info["shape"])
    return out


def load_layer(out_dir: str | os.PathLike, layer: int, device: str | torch.device = "cpu",
               samples: Iterable[int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``[(q, k, v)]`` of one layer for the chosen samples (all by default), on ``device``: memory-mapped
    views on the CPU (several worker processes reading one capture share its pages), loaded straight
    to the device otherwise (``safetensors.safe_open``)."""
    meta = read_meta(out_dir)
    if layer not in meta.layers:
        raise ValueError(f"layer {layer} was not captured in {out_dir}; captured layers: {list(meta.layers)}")
    device = torch.device(device)
    result = []
    for sample in range(meta.samples) if samples is None else samples:
        path = sample_path(out_dir, layer, sample)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the capture")
        if device.type == "cpu":
            t = _mapped_tensors(path)
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device=str(device)) as f:
                t = {name: f.get_tensor(name) for name in ("q", "k", "v")}
        result.append((t["q"], t["k"], t["v"]))
    return result
