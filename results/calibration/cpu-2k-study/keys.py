import sys; sys.path.insert(0,'/work/main')
import torch, math
from calibrate.capture import load_captured
import calibrate.search as S
from sparge_core.ops import reference as R
mode = sys.argv[2]
orig_select = R.select_blocks
def keyres(q, k, *, is_causal, scale, simthreshd1, cdfthreshd=None, topk=None, estimator=None, dtype=torch.float64):
    qb = R.pool_and_similarity(q, R.BLOCK_Q, smooth=False, dtype=dtype)
    kb = R.pool_and_similarity(k, R.BLOCK_K, smooth=True, dtype=dtype)
    b, hq, nqb, d = qb.pooled.shape; hk = k.shape[1]; g = hq // hk; n = k.shape[2]
    kk = R._pad_tokens(k.to(dtype), R.BLOCK_K); nkb = kk.shape[2] // R.BLOCK_K
    s = (qb.pooled.reshape(b, hk, g * nqb, d) @ kk.transpose(-1, -2)) * scale
    s = s.view(b, hk, g * nqb, nkb * R.BLOCK_K)
    s[..., n:] = -math.inf
    lse = torch.logsumexp(s.view(b, hk, g * nqb, nkb, R.BLOCK_K), -1) / scale
    fake_q = R.PooledBlocks(lse.view(b, hq, nqb, nkb), qb.sim) if False else None
    # inject: pooled_q @ pooled_k^T must equal lse -> use identity trick
    eye = torch.eye(nkb, dtype=dtype).expand(b, hk, nkb, nkb)
    Pq = R.PooledBlocks(lse.view(b, hq, nqb, nkb), qb.sim)
    Pk = R.PooledBlocks(eye, kb.sim)
    return orig_select(Pq, Pk, nq=q.shape[-2], nk=n, is_causal=is_causal, scale=scale, simthreshd1=simthreshd1, cdfthreshd=cdfthreshd, topk=topk)
if mode == 'keys':
    R.predict_block_mask = keyres
layer=int(sys.argv[1])
s = load_captured('/tmp/hs/all2k', layer)
for seed in (0, 2):
    g = torch.Generator().manual_seed(seed); perm = torch.randperm(55, generator=g).tolist(); cal=sorted(perm[:5])
    ev = S.LayerEvaluator([s[i] for i in cal], is_causal=True, backend='reference', estimator='pooled')
    st=S.SearchSettings(backend='reference')
    r_ = S.search_layer(ev, 9, st)
    th=torch.tensor([h.simthreshd1 for h in r_.heads]).float(); b=torch.tensor([h.budget for h in r_.heads]).float(); pv=torch.tensor([h.pvthreshd for h in r_.heads]).float()
    held = [i for i in range(55) if i not in cal][::2]
    errs = torch.tensor([float(S.LayerEvaluator([s[i]], is_causal=True, backend='reference', estimator='pooled')(th, b, pv, 'cdf')[0].max()) for i in held])
    print(f'{mode} layer {layer} seed {seed} sparsity {r_.sparsity:.3f} calib {r_.l1:.3f} held max {errs.max():.3f} p90 {errs.quantile(0.9):.3f} >0.1: {(errs>0.1).sum().item()} >0.1125: {(errs>0.1125).sum().item()}/{len(held)}', flush=True)
