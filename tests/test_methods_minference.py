"""``minference`` method: hand-checked masks for each pattern, the line-to-block cover against a
brute-force token mask, per-head config files in MInference's format, full budgets = dense, batch
vectorisation, and parameter errors."""

import json
import math

import pytest
import torch

from helpers import rand_qkv, rel_l1
from sparge_core import block_sparse_attn
from sparge_core.methods import _blockmaps as bm
from sparge_core.methods import get_method, method_names
from sparge_core.methods.minference import HeadPattern, MInference, load_minference_config
from sparge_core.ops import reference as R
from sparge_core.synthetic import structured_qkv


def rows_to_mask(rows, nkb):
    """Hand-written {query block: key blocks} -> bool (nqb, nkb)."""
    mask = torch.zeros(len(rows), nkb, dtype=torch.bool)
    for r, cols in enumerate(rows):
        mask[r, list(cols)] = True
    return mask


# ----------------------------------------------------------------------------------------------
# line -> block cover
# ----------------------------------------------------------------------------------------------
def test_line_block_cover_hand_checked():
    nq = nk = 256  # 2 query blocks x 4 key blocks
    cols = torch.zeros(1, 2, nk, dtype=torch.bool)
    dists = torch.zeros(1, 2, nq + nk - 1, dtype=torch.bool)
    cols[0, 0, 130] = True  # key block 2, visible only to query block 1
    dists[0, 1, bm.distance_index(100, nq)] = True  # rows 0-127 -> keys 0-27; rows 128-255 -> keys 28-155
    got = bm.line_block_cover(cols, dists, nq, nk, is_causal=True)
    assert torch.equal(got[0, 0], rows_to_mask([[], [2]], 4))
    assert torch.equal(got[0, 1], rows_to_mask([[0], [0, 1, 2]], 4))


def _token_cover(cols, dists, nq, nk, is_causal):
    """Brute force: the token-level line mask, then 'any pair in the block'."""
    pos = torch.arange(nq)[:, None] + (nk - nq)
    key = torch.arange(nk)[None, :]
    tok = cols[..., None, :] | dists.gather(
        -1, (pos - key + nq - 1).reshape(1, 1, -1).expand(*dists.shape[:2], -1)
    ).reshape(*dists.shape[:2], nq, nk)
    if is_causal:
        tok = tok & (key <= pos)
    nqb, nkb = R.num_blocks(nq, R.BLOCK_Q), R.num_blocks(nk, R.BLOCK_K)
    pad = torch.nn.functional.pad(tok, (0, nkb * R.BLOCK_K - nk, 0, nqb * R.BLOCK_Q - nq))
    return pad.reshape(*tok.shape[:2], nqb, R.BLOCK_Q, nkb, R.BLOCK_K).any(-1).any(-2)


@pytest.mark.parametrize(
    "nq,nk,causal", [(300, 300, True), (200, 450, True), (333, 190, False), (129, 129, False)]
)
def test_line_block_cover_matches_token_mask(nq, nk, causal):
    g = torch.Generator().manual_seed(nq + nk)
    cols = torch.rand(2, 3, nk, generator=g) < 0.01
    dists = torch.rand(2, 3, nq + nk - 1, generator=g) < 0.01
    got = bm.line_block_cover(cols, dists, nq, nk, causal)
    assert torch.equal(got, _token_cover(cols, dists, nq, nk, causal))
    assert got.any() and not got.all()


# ----------------------------------------------------------------------------------------------
# hand-checked masks, one per pattern (512 tokens: 4 query blocks x 8 key blocks)
# ----------------------------------------------------------------------------------------------
def _direction(d, seed):
    u = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return u / u.norm()


def test_vertical_slash_hand_checked():
    n, d = 512, 32
    g = torch.Generator().manual_seed(11)
    u = _direction(d, 12)
    q = 0.05 * torch.randn(1, 1, n, d, generator=g) + 4.0 * u
    k = 0.05 * torch.randn(1, 1, n, d, generator=g)
    k[0, 0, 200] += 4.0 * u  # every query attends key 200
    # vertical budget 31 = the 30 forced sink columns + column 200; slash 50 = the 50 nearest diagonals
    m = get_method("minference", pattern="vertical_slash", vertical_size=31, slash_size=50)
    lines = m.line_selection(q, k, is_causal=True, scale=1.0)
    assert torch.equal(lines.columns[0, 0].nonzero().flatten(), torch.tensor(list(range(30)) + [200]))
    assert torch.equal(lines.distances[0, 0].nonzero().flatten() - (n - 1), torch.arange(50))
    want = rows_to_mask([[0, 1], [0, 1, 2, 3], [0, 3, 4, 5], [0, 3, 5, 6, 7]], 8)
    assert torch.equal(m.block_mask(q, k, is_causal=True, scale=1.0)[0, 0], want)


def test_block_sparse_hand_checked():
    n, d = 512, 32
    g = torch.Generator().manual_seed(21)
    u = _direction(d, 22)
    noise = torch.randn(1, 1, n, d, generator=g)
    noise = noise - R.block_mean_pool(noise, R.BLOCK_K).repeat_interleave(
        R.BLOCK_K, dim=2
    )  # zero block means
    k = noise.clone()
    k[0, 0, 320:384] += 10.0 * u  # key block 5: best everywhere it is allowed
    k[0, 0, 0:64] += 5.0 * u  # key block 0: second best
    q = torch.randn(1, 1, n, d, generator=g) * 0.1 + u
    m = get_method("minference", pattern="block_sparse", topk=1)
    got = m.block_mask(q, k, is_causal=True)[0, 0]
    # top-1 allowed block per query block, plus the blocks holding the query block's own positions
    assert torch.equal(got, rows_to_mask([[0, 1], [0, 2, 3], [4, 5], [5, 6, 7]], 8))


def test_a_shape_hand_checked():
    q, k, _ = rand_qkv(1, 2, 1, 512, 512, 32, dtype=torch.float32, seed=3)
    m = get_method("minference", pattern="a_shape", n_init=64, n_local=128)
    got = m.block_mask(q, k, is_causal=True)
    want = rows_to_mask([[0, 1], [0, 1, 2, 3], [0, 2, 3, 4, 5], [0, 4, 5, 6, 7]], 8)
    assert torch.equal(got[0, 0], want) and torch.equal(got[0, 1], want)


# ----------------------------------------------------------------------------------------------
# estimator vs a direct loop re-derivation (random inputs, GQA)
# ----------------------------------------------------------------------------------------------
def test_vertical_slash_scores_match_loop_derivation():
    n, d = 300, 16
    q, k, _ = rand_qkv(1, 2, 1, n, n, d, dtype=torch.float32, seed=5, scale=2.0)
    m = MInference("vertical_slash", vertical_size=40, slash_size=60, sink_columns=3, local_slashes=5)
    lines = m.line_selection(q, k, is_causal=True)
    for h in range(2):
        rows = q[0, h, -64:].double() @ k[0, 0].double().T / math.sqrt(d)
        for i in range(64):
            rows[i, n - 64 + i + 1 :] = -math.inf
        p = torch.softmax(rows, -1)
        vertical = p.sum(0)
        vertical[:3] = math.inf
        slash = torch.zeros(n, dtype=torch.float64)  # by distance 0..n-1
        for i in range(64):
            for j in range(n - 64 + i + 1):
                slash[n - 64 + i - j] += p[i, j]
        slash[:5] = math.inf
        want_cols = set(torch.topk(vertical, 40).indices.tolist())
        want_dists = set(torch.topk(slash, 60).indices.tolist())
        assert set(lines.columns[0, h].nonzero().flatten().tolist()) == want_cols
        assert set((lines.distances[0, h].nonzero().flatten() - (n - 1)).tolist()) == want_dists


# ----------------------------------------------------------------------------------------------
# config files in MInference's format
# ----------------------------------------------------------------------------------------------
CONFIG = [
    {
        "0": ["vertical_and_slash", 40, 120, 0.91],
        "1": ["stream_llm", 64, 128, 0.5],
        "2": ["block_sparse", 0, 0, 0.3],
    },
    {"0": ["vertical_and_slash", 1000, 6096, 12], "2": ["vertical_and_slash", 30, 800, 0.7]},
]


def test_config_file_parses(tmp_path):
    path = tmp_path / "model_best_pattern.json"
    path.write_text(json.dumps(CONFIG))
    layers = load_minference_config(path)
    assert len(layers) == 2
    assert layers[0][1] == HeadPattern("a_shape", 64, 128, 0.5)
    assert layers[0][2].pattern == "block_sparse"
    assert layers[1][2] == HeadPattern("vertical_slash", 30, 800, 0.7)
    assert 1 not in layers[1]


def test_config_per_head_masks_match_single_patterns(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(CONFIG))
    q, k, _ = structured_qkv(2, 3, 1, 640, 32, dtype=torch.float32, seed=7)
    got = get_method("minference", config=str(path), layer=0, topk=3).block_mask(q, k, is_causal=True)
    singles = [
        MInference("vertical_slash", vertical_size=40, slash_size=120),
        MInference("a_shape", n_init=64, n_local=128),
        MInference("block_sparse", topk=3),
    ]
    for h, single in enumerate(singles):
        want = single.block_mask(q, k, is_causal=True)[:, h]
        assert torch.equal(got[:, h], want), f"head {h}"
    # layer 1: head 1 is missing -> MInference's fallback (1000, 6096)
    got1 = MInference(config=path, layer=1).block_mask(q, k, is_causal=True)
    fallback = MInference("vertical_slash", vertical_size=1000, slash_size=6096).block_mask(
        q, k, is_causal=True
    )
    assert torch.equal(got1[:, 1], fallback[:, 1])
    assert not torch.equal(got[:, 0], got[:, 1])


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"x": 1}, "JSON list"),
        ([{"0": ["diagonal", 1, 2, 0.0]}], "unknown pattern 'diagonal'"),
        ([{"0": ["vertical_and_slash", -5, 2, 0.0]}], "vertical_size"),
        ([{"0": ["vertical_and_slash", 5, 2.5, 0.0]}], "slash_size"),
        ([{"zero": ["vertical_and_slash", 5, 2, 0.0]}], "head keys"),
        ([{"0": ["vertical_and_slash", 5]}], "expected \\[pattern"),
        ([{"0": ["vertical_and_slash", 5, 2, "high"]}], "score"),
        ([["vertical_and_slash", 5, 2, 0.0]], "layer 0"),
    ],
)
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        load_minference_config(bad)


def test_config_head_count_and_layer_checks(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(CONFIG))
    q, k, _ = rand_qkv(1, 2, 1, 256, 256, 16, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="lists heads \\[2\\]"):
        MInference(config=path, layer=0).block_mask(q, k, is_causal=True)
    with pytest.raises(ValueError, match="layer=5"):
        MInference(config=path, layer=5)
    with pytest.raises(ValueError, match="needs layer="):
        MInference(config=path)
    with pytest.raises(ValueError, match="do not also pass"):
        MInference(config=path, layer=0, vertical_size=10)
    bad = tmp_path / "broken.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_minference_config(bad)


# ----------------------------------------------------------------------------------------------
# full budgets = dense; batch vectorisation; kernel
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        dict(pattern="vertical_slash", vertical_size=4096, slash_size=4096),
        dict(pattern="block_sparse", topk=64),
        dict(pattern="a_shape", n_init=0, n_local=4096),
        dict(pattern="vertical_slash", budget_ratio=100.0),
    ],
)
@pytest.mark.parametrize("causal", [True, False])
def test_full_budgets_give_dense(params, causal):
    q, k, v = rand_qkv(1, 4, 2, 700, 700, 32, dtype=torch.float32, seed=9)
    m = get_method("minference", **params)
    mask = m.block_mask(q, k, is_causal=causal)
    assert torch.equal(mask, bm.full_mask(q, k, causal))
    out = m(q, k, v, is_causal=causal, backend="reference")
    dense = R.dense_attention(q, k, v, is_causal=causal, scale=32**-0.5)
    assert rel_l1(out, dense) < 1e-5


def test_small_budget_is_sparse_and_runs_on_triton(device):
    q, k, v = structured_qkv(1, 2, 1, 640, 32, dtype=torch.float16, device=device, seed=4)
    m = get_method("minference", pattern="vertical_slash", budget_ratio=0.0)
    mask = m.block_mask(q, k, is_causal=True)
    assert bm.mask_density(mask, 640, 640, True) < 0.8
    out = block_sparse_attn(q, k, v, mask, is_causal=True, backend="triton")
    ref = block_sparse_attn(q, k, v, mask, is_causal=True, backend="reference")  # float32 math
    assert torch.isfinite(out).all() and rel_l1(out, ref) < 2e-3  # fp16 P.V in the kernel


@pytest.mark.parametrize("pattern", ["vertical_slash", "block_sparse", "a_shape"])
def test_batch_matches_per_sample(pattern):
    q, k, _ = structured_qkv(3, 4, 2, 520, 32, dtype=torch.float32, seed=8)
    q = q + 0.3 * torch.randn_like(q)  # samples differ
    m = MInference(pattern, budget_ratio=0.05, n_init=32, n_local=100, topk=3)
    batched = m.block_mask(q, k, is_causal=True)
    for b in range(3):
        assert torch.equal(batched[b : b + 1], m.block_mask(q[b : b + 1], k[b : b + 1], is_causal=True))


def test_chunked_prefill_keeps_diagonal_and_causality():
    q, k, _ = rand_qkv(1, 2, 2, 200, 600, 32, dtype=torch.float32, seed=2)
    for pattern in ("vertical_slash", "block_sparse", "a_shape"):
        mask = MInference(pattern, budget_ratio=0.0).block_mask(q, k, is_causal=True)
        allowed = R.allowed_block_mask(200, 600, True)
        diag = R.causal_diagonal_block_mask(200, 600, R.BLOCK_Q, R.BLOCK_K)
        assert not (mask & ~allowed).any() and (mask | ~diag).all(), pattern


# ----------------------------------------------------------------------------------------------
# registry and parameter errors
# ----------------------------------------------------------------------------------------------
def test_registered_and_unknown_names_list_known():
    assert "minference" in method_names()
    with pytest.raises(ValueError, match="unknown attention method.*known: .*'minference'"):
        get_method("minfrence")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(pattern="diagonal"), ValueError, "unknown pattern 'diagonal'"),
        (dict(pattern=3), TypeError, "pattern must be a string"),
        (dict(vertical_size=-1), ValueError, "vertical_size must be >= 0"),
        (dict(slash_size=10.5), TypeError, "slash_size must be an int"),
        (dict(topk=True), TypeError, "topk must be an int"),
        (dict(budget_ratio=-0.5), ValueError, "budget_ratio must be a finite number >= 0"),
        (dict(budget_ratio=float("nan")), ValueError, "budget_ratio"),
        (dict(budget_ratio="1"), TypeError, "budget_ratio must be a number"),
        (dict(last_q=0), ValueError, "last_q must be >= 1"),
        (dict(layer=2), ValueError, "layer= is only meaningful"),
    ],
)
def test_bad_parameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        get_method("minference", **kwargs)


def test_bad_inputs_are_rejected():
    q, k, _ = rand_qkv(1, 3, 2, 128, 128, 16, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        MInference().block_mask(q, k, is_causal=True)
    with pytest.raises(TypeError, match="is_causal"):
        MInference().block_mask(q, q, is_causal=1)


def test_params_round_trip():
    m = get_method("minference", pattern="a_shape", n_init=10, n_local=20, budget_ratio=0.5)
    again = get_method("minference", **{k: v for k, v in m.params().items()})
    assert again.params() == m.params()
