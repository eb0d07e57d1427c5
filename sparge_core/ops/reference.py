"""Plain-PyTorch reference of every SpargeAttn piece: the ground truth for all tests.

Written for clarity, not speed: every step is the formula of the paper (arXiv 2502.18137, sections
3.2-3.5) as docs/design.md (sections 5 and 6) pins it down. The Triton code in ``predict.py`` and
``attention.py`` must compute the same functions; the tests compare them on random inputs.

Shapes: ``q`` is ``(B, Hq, Nq, D)``, ``k``/``v`` are ``(B, Hkv, Nk, D)`` with ``Hq % Hkv == 0``
(grouped-query attention: query head ``h`` reads key/value head ``h // (Hq // Hkv)``). Block maps are
bool ``(B, Hq, ceil(Nq / BLOCK_Q), ceil(Nk / BLOCK_K))``, True = compute this block pair.

Pieces:
- ``smooth_k``: K minus its mean over tokens (changes no softmax, raises K self-similarity).
- ``block_mean_pool``: mean of each block of tokens; a partial last block divides by its true length.
- ``block_self_similarity``: mean pairwise cosine of a block's rows (its Gram matrix of L2-normalised
  rows, diagonal included, averaged over the true rows).
- ``select_blocks``: the compressed attention map and the top-CDF / top-k selection, fix rows and
  columns for non-self-similar blocks, causal blocks (sink, diagonal and, with ``local_blocks``, the
  key blocks just before the diagonal: ``causal_forced_block_mask``).
- ``key_resolved_scores``: the ``"keys"`` estimator (beyond the paper): block scores of the pooled
  query against every key of a block (log-sum-exp), instead of against the block's mean key.
- ``masked_attention``: softmax attention restricted to a block map (and the causal triangle), with
  the stage-2 PV skip simulated exactly as the kernel decides it (see that function).
- ``quantize_per_block``: symmetric per-block INT8 (scale = max|x| / 127, round half away from zero).

Causal attention with ``Nq != Nk`` is bottom-right aligned: query ``i`` sees keys ``j <= i + Nk - Nq``.
A sliding ``window`` (causal only) also drops keys ``j <= i + Nk - Nq - window``.
"""

from __future__ import annotations

import math

import torch

from .blocks import (  # noqa: F401  (re-exported: the reference is read with these names)
    BLOCK_K,
    BLOCK_Q,
    ESTIMATORS,
    LOG2E,
    QUANT_SCALE_EPS,
    BlockCounts,
    PooledBlocks,
    allowed_block_count,
    num_blocks,
)


# --------------------------------------------------------------------------------------------
# Stage 1: the block predictor
# --------------------------------------------------------------------------------------------
def smooth_k(k: torch.Tensor) -> torch.Tensor:
    """K minus its mean over the token axis, per batch and head."""
    return k - k.mean(dim=-2, keepdim=True)


def _pad_tokens(x: torch.Tensor, block: int) -> torch.Tensor:
    n = x.shape[-2]
    pad = num_blocks(n, block) * block - n
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


def _block_lengths(n: int, block: int, device) -> torch.Tensor:
    nb = num_blocks(n, block)
    lengths = torch.full((nb,), block, device=device)
    lengths[-1] = n - (nb - 1) * block
    return lengths


def block_mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, H, N, D) -> (B, H, ceil(N / block), D)``: the mean token of each block."""
    b, h, n, d = x.shape
    blocks = _pad_tokens(x, block).view(b, h, -1, block, d)
    lengths = _block_lengths(n, block, x.device).to(x.dtype)
    return blocks.sum(dim=3) / lengths[:, None]


def block_self_similarity(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, H, N, D) -> (B, H, ceil(N / block))``: mean pairwise cosine of each block's rows.

    Rows are L2-normalised (an all-zero row stays zero), the block's Gram matrix is formed over its
    true rows, diagonal included, and averaged over ``len * len`` entries. The value lies in [0, 1]
    (the mean of a Gram matrix of unit vectors is the squared norm of their mean).
    """
    b, h, n, d = x.shape
    norms = x.norm(dim=-1, keepdim=True)
    unit = x / torch.where(norms > 0, norms, torch.ones_like(norms))
    blocks = _pad_tokens(unit, block).view(b, h, -1, block, d)  # padded rows are zero
    gram = blocks @ blocks.transpose(-1, -2)  # (B, H, nb, block, block)
    lengths = _block_lengths(n, block, x.device).to(x.dtype)
    return gram.sum(dim=(-1, -2)) / (lengths * lengths)


def causal_block_mask(nq: int, nk: int, block_q: int, block_k: int, device=None, window: int | None = None
                      ) -> torch.Tensor:
    """``(ceil(nq/block_q), ceil(nk/block_k))`` bool: True where the block pair holds at least one
    (query, key) pair that bottom-right-aligned causal attention allows (with ``window``: also inside
    the sliding window, see ``causal_token_mask``)."""
    offset = nk - nq
    q_last = torch.clamp(torch.arange(1, num_blocks(nq, block_q) + 1, device=device) * block_q, max=nq) - 1
    k_first = torch.arange(num_blocks(nk, block_k), device=device) * block_k
    allowed = k_first[None, :] <= (q_last + offset)[:, None]
    if window is not None:
        q_first = torch.arange(num_blocks(nq, block_q), device=device) * block_q
        k_last = torch.clamp(k_first + block_k, max=nk) - 1
        allowed &= k_last[None, :] > (q_first + offset - window)[:, None]
    return allowed


def causal_diagonal_block_mask(nq: int, nk: int, block_q: int, block_k: int, device=None,
                               local_blocks: int = 0) -> torch.Tensor:
    """``(nqb, nkb)`` bool: the key blocks that hold the query block's own positions (bottom-right
    aligned: query i sits at key position i + nk - nq). Causal selection always keeps them, so every
    query row sees at least its own token. With ``local_blocks`` > 0 also the ``local_blocks`` key
    blocks just before the first of them (the query block's first row sits in that first block, so
    these are the keys right before it; blocks before key 0 do not exist). The causal mask is not
    applied here (``causal_forced_block_mask`` does)."""
    offset = nk - nq
    nqb, nkb = num_blocks(nq, block_q), num_blocks(nk, block_k)
    first = torch.arange(nqb, device=device) * block_q + offset
    last = torch.clamp(torch.arange(1, nqb + 1, device=device) * block_q, max=nq) - 1 + offset
    lo = torch.div(first.clamp(min=0), block_k, rounding_mode="floor") - local_blocks
    hi = torch.div(last, block_k, rounding_mode="floor")  # < 0 when the whole block sees no key
    cols = torch.arange(nkb, device=device)[None, :]
    return (cols >= lo[:, None]) & (cols <= hi[:, None])


def causal_forced_block_mask(nq: int, nk: int, block_q: int, block_k: int, *, local_blocks: int = 0, device=None,
                             window: int | None = None) -> torch.Tensor:
    """``(nqb, nkb)`` bool: what causal selection always keeps (``select_blocks`` rule 5): key block 0
    (the attention sink), the diagonal key blocks and the ``local_blocks`` key blocks just before them
    (``causal_diagonal_block_mask``), restricted to the blocks the causal mask (and a sliding
    ``window``) allows. The one definition of the forced set: ``sparge-budget`` uses it too, and the
    Triton selection (``predict._score_select_kernel``) computes the same formula per row."""
    forced = causal_diagonal_block_mask(nq, nk, block_q, block_k, device=device, local_blocks=local_blocks)
    forced[:, 0] = True  # the attention sink
    return forced & causal_block_mask(nq, nk, block_q, block_k, device=device, window=window)


def causal_token_mask(nq: int, nk: int, device=None, window: int | None = None) -> torch.Tensor:
    """``(nq, nk)`` bool: query i may attend key j iff ``j <= i + nk - nq`` and, with a sliding
    ``window``, ``j > i + nk - nq - window`` (the query's own position and the ``window - 1`` before it,
    as transformers' sliding-window masks)."""
    pos = torch.arange(nq, device=device)[:, None] + (nk - nq)
    keys = torch.arange(nk, device=device)[None, :]
    allowed = keys <= pos
    if window is not None:
        allowed &= keys > pos - window
    return allowed


def _expand_kv_heads(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Repeat a per-KV-head tensor ``(B, Hkv, ...)`` along dim 1 to ``(B, Hq, ...)``."""
    return x.repeat_interleave(num_q_heads // x.shape[1], dim=1)


def _per_head(value: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-query-head 1-D tensor ``(Hq,)`` shaped to broadcast against ``(B, Hq, ...)`` of ndim."""
    return value.reshape((1, -1) + (1,) * (ndim - 2))


def pool_and_similarity(x: torch.Tensor, block: int, *, smooth: bool, dtype=torch.float64) -> PooledBlocks:
    """Reference of the predictor's fused pass: optional K smoothing, pooling, self-similarity."""
    x = x.to(dtype)
    if smooth:
        x = smooth_k(x)
    return PooledBlocks(block_mean_pool(x, block), block_self_similarity(x, block))


def key_resolved_scores(
    pooled_q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    block_k: int = BLOCK_K,
    dtype=torch.float64,
    max_elements: int = 1 << 26,
) -> torch.Tensor:
    """Block scores of the ``"keys"`` estimator: ``(B, Hq, nqb, nkb)`` float32 (float64 if ``dtype`` is).

    ``score[qb, kb] = log(sum_{j in kb} exp(scale * pooled_q[qb] . k_j)) / scale``, so the row softmax of
    ``score * scale`` (what ``select_blocks`` takes) is each key block's exact share of the pooled
    query's attention over the individual keys. Unlike the pooled key (the paper), a single
    dominant key inside a block (a secondary attention sink, a copied token) is not averaged away.
    Cost: ``Hq * nqb * Nk * D`` multiply-adds, 1/BLOCK_Q of ``Q K^T``; rows are processed in chunks of at
    most ``max_elements`` scores. ``dtype`` is the matmul dtype (half types accumulate in float32).
    """
    b, hq, nqb, d = pooled_q.shape
    hk, n = k.shape[1], k.shape[2]
    group = hq // hk
    nkb = num_blocks(n, block_k)
    keys = _pad_tokens(k, block_k).to(dtype)  # (B, Hkv, nkb * block_k, D)
    rows = pooled_q.to(dtype).reshape(b, hk, group * nqb, d)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty(b, hk, group * nqb, nkb, dtype=out_dtype, device=k.device)
    pad = nkb * block_k - n
    step = max(1, max_elements // max(1, b * hk * nkb * block_k))
    for r0 in range(0, group * nqb, step):
        s = (rows[:, :, r0:r0 + step] @ keys.transpose(-1, -2)).to(out_dtype) * scale
        if pad:
            s[..., n:] = -math.inf
        out[:, :, r0:r0 + step] = torch.logsumexp(s.view(b, hk, -1, nkb, block_k), dim=-1) / scale
    return out.view(b, hq, nqb, nkb)


def estimator_scores(estimator: str, pooled_q: torch.Tensor, k: torch.Tensor, *, scale: float,
                     dtype=torch.float64) -> torch.Tensor | None:
    """The ``scores`` argument of ``select_blocks`` for an estimator: None for ``"pooled"``
    (``select_blocks`` forms the pooled map itself), ``key_resolved_scores`` for ``"keys"``."""
    return key_resolved_scores(pooled_q, k, scale=scale, dtype=dtype) if estimator == "keys" else None


def select_blocks(
    q_blocks: PooledBlocks,
    k_blocks: PooledBlocks,
    *,
    nq: int,
    nk: int,
    is_causal: bool,
    scale: float,
    simthreshd1: torch.Tensor,
    cdfthreshd: torch.Tensor | None = None,
    topk: torch.Tensor | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    scores: torch.Tensor | None = None,
    window: int | None = None,
    local_blocks: int = 0,
) -> torch.Tensor:
    """The block map from pooled Q/K blocks (docs/design.md, "Predictor semantics").

    ``simthreshd1`` and ``cdfthreshd`` / ``topk`` are per-query-head 1-D tensors ``(Hq,)``; exactly one
    of ``cdfthreshd`` / ``topk`` is given. Returns bool ``(B, Hq, nqb, nkb)``. ``scores`` (``(B, Hq, nqb,
    nkb)``, before the softmax scale) replaces the pooled ``pooled_q @ pooled_k^T`` in step 2, e.g. with
    ``key_resolved_scores``.

    1. A block is self-similar iff its mean pairwise cosine is strictly greater than simthreshd1.
    2. Scores ``pooled_q @ pooled_k^T * scale``; columns of non-self-similar K blocks and causal
       fully-future blocks are -inf, then a row softmax (a row with no finite score is all zero).
    3. cdf mode: sort each row descending, keep the leading blocks whose cumulative probability is
       <= cdfthreshd (at least one). topk mode: keep max(1, floor(topk * nkb)) blocks by score, where
       nkb counts every K block. cdfthreshd >= 1 or topk >= 1 keeps every block.
    4. Rows of non-self-similar Q blocks and columns of non-self-similar K blocks are always kept.
    5. Causal: key block 0 (the attention sink), the diagonal key blocks (those holding the query
       block's own positions) and the ``local_blocks`` key blocks just before them are always kept,
       and fully-future blocks never are (``causal_forced_block_mask``). With a sliding ``window``
       (causal only), blocks wholly outside the window count as fully-future ones: -inf in step 2,
       never kept (so the sink and local blocks are kept only while they are inside the window).
       ``local_blocks`` (default 0: the rule as described, beyond the paper already) is a causal
       rule: with non-causal attention nothing is forced and ``local_blocks`` > 0 is a ValueError.

    Rule 5's first half goes beyond the paper's predictor: without the diagonal a query block whose
    pooled row favours an older key block can drop its own block, and its first rows then see no key
    at all (zeros); without the sink, causal LLMs lose the first tokens that every head leans on (the
    official tuned inference forces block 0 too, with ``attention_sink=True``). ``local_blocks`` goes
    further: the first rows of a query block sit at the start of its first diagonal key block, so
    the diagonal gives them almost no context; a "sink + local" head needs the keys just before them
    (results/studies/rivals-cpu/README.md: one local block cut SmolLM2's 2K perplexity loss from
    +9.1% to +0.7%).
    """
    if (cdfthreshd is None) == (topk is None):
        raise ValueError("select_blocks needs exactly one of cdfthreshd and topk")
    if local_blocks and not is_causal:
        raise ValueError("local_blocks is a causal-attention rule (key blocks before each query block's "
                         "diagonal); non-causal selection forces no block: use local_blocks=0")
    pooled_q = q_blocks.pooled
    num_q_heads = pooled_q.shape[1]
    pooled_k = _expand_kv_heads(k_blocks.pooled, num_q_heads)
    sim_k = _expand_kv_heads(k_blocks.sim, num_q_heads)
    theta = _per_head(simthreshd1.to(pooled_q.dtype), 3)
    q_similar = q_blocks.sim > theta  # (B, Hq, nqb)
    k_similar = sim_k > theta  # (B, Hq, nkb)

    if scores is None:
        scores = pooled_q @ pooled_k.transpose(-1, -2)
    scores = scores.to(pooled_q.dtype) * scale  # (B, Hq, nqb, nkb)
    scores = scores.masked_fill(~k_similar[:, :, None, :], -math.inf)
    allowed = None
    if is_causal:
        allowed = causal_block_mask(nq, nk, block_q, block_k, device=scores.device, window=window)
        scores = scores.masked_fill(~allowed, -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # exp(-inf) = 0
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))

    nkb = scores.shape[-1]
    # Sorting is stable so that equal scores keep the lower block index first.
    order_key = probs if cdfthreshd is not None else scores
    sorted_vals, order = torch.sort(order_key, dim=-1, descending=True, stable=True)
    if cdfthreshd is not None:
        tau = _per_head(cdfthreshd.to(probs.dtype), 4)
        cdf = torch.cumsum(sorted_vals, dim=-1)
        n_keep = (cdf <= tau).sum(dim=-1, keepdim=True).clamp(min=1)
        n_keep = torch.where(tau >= 1, torch.full_like(n_keep, nkb), n_keep)
    else:
        frac = _per_head(topk.to(torch.float64), 4)
        n_keep = torch.floor(frac * nkb).to(torch.long).clamp(min=1)
        n_keep = torch.where(frac >= 1, torch.full_like(n_keep, nkb), n_keep)
        n_keep = n_keep.expand(*scores.shape[:-1], 1)
    keep_sorted = torch.arange(nkb, device=scores.device) < n_keep
    mask = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)

    mask |= ~q_similar[..., :, None]
    mask |= ~k_similar[..., None, :]
    if allowed is not None:
        mask |= causal_forced_block_mask(nq, nk, block_q, block_k, local_blocks=local_blocks, device=scores.device,
                                         window=window)
        mask &= allowed
    return mask


def predict_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    simthreshd1: torch.Tensor,
    cdfthreshd: torch.Tensor | None = None,
    topk: torch.Tensor | None = None,
    estimator: str = "pooled",
    dtype=torch.float64,
    window: int | None = None,
    local_blocks: int = 0,
) -> torch.Tensor:
    """The whole stage-1 predictor in plain PyTorch (inputs already validated, params per head)."""
    q_blocks = pool_and_similarity(q, BLOCK_Q, smooth=False, dtype=dtype)
    k_blocks = pool_and_similarity(k, BLOCK_K, smooth=True, dtype=dtype)
    return select_blocks(
        q_blocks, k_blocks, nq=q.shape[-2], nk=k.shape[-2], is_causal=is_causal, scale=scale,
        simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk,
        scores=estimator_scores(estimator, q_blocks.pooled, k, scale=scale, dtype=dtype), window=window,
        local_blocks=local_blocks,
    )


# --------------------------------------------------------------------------------------------
# Masked attention and the stage-2 PV skip
# --------------------------------------------------------------------------------------------
def allowed_block_mask(nq: int, nk: int, is_causal: bool, device=None, window: int | None = None) -> torch.Tensor:
    """``(nqb, nkb)`` bool: the block pairs that attention may touch at all (``window``: causal only)."""
    if is_causal:
        return causal_block_mask(nq, nk, BLOCK_Q, BLOCK_K, device=device, window=window)
    return torch.ones(num_blocks(nq, BLOCK_Q), num_blocks(nk, BLOCK_K), dtype=torch.bool, device=device)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    is_causal: bool,
    scale: float,
    pvthreshd: torch.Tensor | None = None,
    dtype=torch.float64,
    max_chunk_elements: int = 1 << 26,
    window: int | None = None,
) -> tuple[torch.Tensor, BlockCounts]:
    """Softmax attention restricted to the True blocks of ``mask`` and, if causal, to the triangle
    (with a sliding ``window``, causal only: to the band of ``causal_token_mask``).

    A query row with no allowed key gets zeros. With ``pvthreshd`` (per query head, ``(Hq,)``) the
    stage-2 skip is simulated as the kernel decides it: for each BLOCK_Q block of query rows, the kept
    key blocks are visited in ascending order; in base-2 logits ``s = q.k * scale * log2(e)``, a block
    is skipped (its exp, row sum and P.V) when, over the block's real query rows that see at least one
    key in it, ``max(rowmax_block(s) - running_max) <= -pvthreshd``; the running max covers the kept
    blocks before it (a skipped block cannot raise it). The first block a row sees is never skipped
    (its running max is -inf). Skipped blocks simply drop out of numerator and denominator.

    Non-finite inputs propagate as in dense attention over the computed blocks. A NaN or +inf logit
    (from Q or K) reaches exactly the rows that attend that key (their output is NaN), and stage 2
    never skips a block in which a real row has a NaN logit; a row whose output is already NaN (it
    computed a NaN or +inf logit) no longer takes part in the skip decisions. A non-finite value in V
    reaches every row of the query blocks that compute its key block, causally visible or not (P.V is a
    block product and ``0 * NaN`` is NaN, as in a dense kernel); key blocks a query block does not
    compute (outside the mask, or skipped) never touch its rows.

    Returns the output in ``q.dtype`` and the block counts. Work is chunked over query blocks so that
    long sequences fit in memory.
    """
    bsz, num_q_heads, nq, head_dim = q.shape
    num_kv_heads, nk = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    nkb = num_blocks(nk, BLOCK_K)
    allowed_blocks = allowed_block_mask(nq, nk, is_causal, device=q.device, window=window)
    kept = mask & allowed_blocks

    # keys padded to whole blocks (zeros, masked below), so scores can be viewed block by block
    nk_pad = nkb * BLOCK_K
    kd = torch.nn.functional.pad(k.to(dtype), (0, 0, 0, nk_pad - nk))
    vd = torch.nn.functional.pad(v.to(dtype), (0, 0, 0, nk_pad - nk))
    key_pos = torch.arange(nk_pad, device=q.device)
    out = torch.empty(bsz, num_q_heads, nq, head_dim, dtype=dtype, device=q.device)
    pv_skipped = torch.zeros(bsz, num_q_heads, dtype=torch.long, device=q.device)
    if pvthreshd is not None:
        lam = _per_head(pvthreshd.to(dtype), 4)  # (1, Hq, 1, 1)
    # one check per call: the exact non-finite-V product below is only needed when V has such values
    v_finite = bool(torch.isfinite(vd).all())

    rows_per_chunk = max(1, max_chunk_elements // max(1, bsz * num_q_heads * nk_pad * BLOCK_Q)) * BLOCK_Q
    for r0 in range(0, nq, rows_per_chunk):
        r1 = min(nq, r0 + rows_per_chunk)
        qb0, qb1 = r0 // BLOCK_Q, num_blocks(r1, BLOCK_Q)
        rows = (qb1 - qb0) * BLOCK_Q  # whole query blocks; rows beyond nq are padding
        qc = torch.nn.functional.pad(q[:, :, r0:r1].to(dtype), (0, 0, 0, rows - (r1 - r0)))
        qc = qc.reshape(bsz, num_kv_heads, group, rows, head_dim)
        s = (qc @ kd[:, :, None].transpose(-1, -2)).reshape(bsz, num_q_heads, rows, nk_pad)
        s = s * (scale * LOG2E)
        blocks = s.view(bsz, num_q_heads, qb1 - qb0, BLOCK_Q, nkb, BLOCK_K)  # a view: fills below act on s
        blocks.masked_fill_(~kept[:, :, qb0:qb1, None, :, None], -math.inf)
        row_pos = torch.arange(r0, r0 + rows, device=q.device)[:, None]
        token_ok = (key_pos[None, :] < nk) & (row_pos < nq)  # real keys, real query rows
        if is_causal:
            token_ok = token_ok & (key_pos[None, :] <= row_pos + (nk - nq))
            if window is not None:
                token_ok = token_ok & (key_pos[None, :] > row_pos + (nk - nq) - window)
        s.masked_fill_(~token_ok, -math.inf)

        computed = kept[:, :, qb0:qb1]  # (B, Hq, qb, nkb): the key blocks each query block computes
        if pvthreshd is not None:
            skip = _pv_skip_blocks(blocks, computed, lam)  # (B, Hq, qb, nkb)
            pv_skipped += skip.sum(dim=(2, 3))
            blocks.masked_fill_(skip[:, :, :, None, :, None], -math.inf)
            computed = computed & ~skip

        row_max = s.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        p = torch.exp2(s - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        if v_finite:
            pv = (p.reshape(bsz, num_kv_heads, group, rows, nk_pad) @ vd[:, :, None]).reshape(bsz, num_q_heads, rows, -1)
        else:
            pv = _pv_non_finite_v(p, vd, computed)
        out[:, :, r0:r1] = (pv / torch.where(denom > 0, denom, torch.ones_like(denom)))[:, :, : r1 - r0]

    counts = BlockCounts(
        allowed=allowed_blocks.sum().expand(bsz, num_q_heads).to(torch.long).clone(),
        computed=kept.sum(dim=(2, 3)).to(torch.long),
        pv_skipped=pv_skipped,
    )
    return out.to(q.dtype), counts


def _pv_non_finite_v(p: torch.Tensor, v: torch.Tensor, computed: torch.Tensor) -> torch.Tensor:
    """``P @ V`` where V holds NaN/Inf: each query block sums only over the key blocks it computes
    (``computed``: ``(B, Hq, qb, nkb)``), with IEEE products for those (``0 * inf`` is NaN), and
    nothing at all from the others. ``p``: ``(B, Hq, qb * BLOCK_Q, Nk_pad)``; ``v``: ``(B, Hkv, Nk_pad, D)``."""
    bsz, num_q_heads, rows, nk_pad = p.shape
    vq = _expand_kv_heads(v, num_q_heads)  # (B, Hq, Nk_pad, D)
    live = computed.repeat_interleave(BLOCK_Q, dim=2).repeat_interleave(BLOCK_K, dim=3)  # (B, Hq, rows, Nk_pad)
    finite_v = torch.isfinite(vq)
    pv = torch.where(live, p, torch.zeros_like(p)) @ torch.where(finite_v, vq, torch.zeros_like(vq))

    def count(weights: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        return weights.to(p.dtype) @ which.to(p.dtype)

    nan_terms = count(live, torch.isnan(vq)) + count(live & (p == 0), torch.isinf(vq)) + \
        count(live & torch.isnan(p), ~finite_v)
    positive = live & (p > 0)
    pos, neg = count(positive, torch.isposinf(vq)), count(positive, torch.isneginf(vq))
    inf = torch.full_like(pv, math.inf)
    pv = torch.where(pos > 0, pv + inf, pv)
    pv = torch.where(neg > 0, pv - inf, pv)  # +inf - inf: NaN, as in the dense sum
    return torch.where(nan_terms > 0, torch.full_like(pv, math.nan), pv)


def _pv_skip_blocks(blocks: torch.Tensor, kept: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Which kept blocks stage 2 skips. ``blocks``: the masked base-2 logits viewed per block,
    ``(B, H, qb, BLOCK_Q, nkb, BLOCK_K)`` (-inf where a row sees no key, and for padding rows);
    ``kept``: ``(B, H, qb, nkb)``.

    Each real row votes ``rowmax_block - running_max`` (-inf if it sees no key of the block); a row
    with a NaN logit in the block votes +inf (its NaN must reach the output, as in dense attention);
    a row that already computed a NaN or +inf logit in an earlier kept block votes -inf (its output
    is NaN whatever follows). The block is skipped when the largest vote is <= -pvthreshd."""
    block_max = blocks.amax(dim=-1)  # (B, H, qb, BLOCK_Q, nkb); NaN where the row has a NaN logit
    row_nan = torch.isnan(block_max)
    if bool(row_nan.any()):  # only then: the largest non-NaN logit of those rows
        block_max = blocks.masked_fill(torch.isnan(blocks), -math.inf).amax(dim=-1)
    running = torch.cummax(block_max, dim=-1).values
    before = torch.cat([torch.full_like(running[..., :1], -math.inf), running[..., :-1]], dim=-1)
    diff = block_max - before  # +inf where the row saw nothing before
    diff = torch.where(block_max == -math.inf, torch.full_like(diff, -math.inf), diff)
    diff = torch.where(row_nan, torch.full_like(diff, math.inf), diff)
    # a NaN or +inf logit in a kept block (never skipped: it votes +inf) makes the row's sum NaN
    poisons = (row_nan | (block_max == math.inf)) & kept[:, :, :, None, :]
    poisoned = (torch.cumsum(poisons.to(torch.int32), dim=-1) - poisons.to(torch.int32)) > 0
    diff = torch.where(poisoned | torch.isnan(diff), torch.full_like(diff, -math.inf), diff)
    worst = diff.amax(dim=3)  # (B, H, qb, nkb): the row that most wants this block
    return kept & (worst <= -lam)


def dense_attention(q, k, v, *, is_causal: bool, scale: float, dtype=torch.float64,
                    window: int | None = None) -> torch.Tensor:
    """Plain softmax attention (GQA, bottom-right causal, optional sliding ``window``) in ``dtype``;
    output in ``q.dtype``."""
    full = torch.ones(
        q.shape[0], q.shape[1], num_blocks(q.shape[2], BLOCK_Q), num_blocks(k.shape[2], BLOCK_K),
        dtype=torch.bool, device=q.device,
    )
    return masked_attention(q, k, v, full, is_causal=is_causal, scale=scale, dtype=dtype, window=window)[0]


# --------------------------------------------------------------------------------------------
# INT8 quantization
# --------------------------------------------------------------------------------------------
def quantize_per_block(x: torch.Tensor, block: int, *, multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-block INT8 of ``(B, H, N, D)`` (after multiplying by ``multiplier``).

    scale = max|x_block| / 127 + 1e-7; ``x_int8 = round_half_away(x / scale)``. Returns the int8
    tensor ``(B, H, N, D)`` and the float32 scales ``(B, H, ceil(N / block))``.
    """
    b, h, n, d = x.shape
    xs = _pad_tokens(x.to(torch.float32) * multiplier, block).view(b, h, -1, block, d)
    scales = xs.abs().amax(dim=(-1, -2)) / 127.0 + QUANT_SCALE_EPS
    y = xs / scales[..., None, None]
    y = torch.sign(y) * torch.floor(y.abs() + 0.5)
    y = y.clamp(-127, 127).to(torch.int8).view(b, h, -1, d)[:, :, :n]
    return y, scales


def dequantize_per_block(x_int8: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of :func:`quantize_per_block` (up to rounding), in float32."""
    n = x_int8.shape[-2]
    return x_int8.to(torch.float32) * scales.repeat_interleave(block, dim=-1)[..., :n, None]
