import sys; sys.path.insert(0,'/work/main')
import torch, math
from calibrate.capture import load_captured
import calibrate.search as S
from sparge_core.ops import reference as R
from sparge_core import sparge_attn
layer=4
s = load_captured('/tmp/hs/all2k', layer)
g = torch.Generator().manual_seed(0); perm = torch.randperm(55, generator=g).tolist(); cal=sorted(perm[:5])
ev = S.LayerEvaluator([s[i] for i in cal], is_causal=True, estimator='pooled')
st=S.SearchSettings(tune_pv=False)
r_ = S.search_layer(ev, 9, st)
th=torch.tensor([h.simthreshd1 for h in r_.heads]).float(); b=torch.tensor([h.budget for h in r_.heads]).float()
print('budget', [round(x,4) for x in b.tolist()], 'theta', th.tolist())
for w in (6, 54, cal[0]):
    q,k,v = s[w]
    e, sp = S.LayerEvaluator([s[w]], is_causal=True, estimator='pooled')(th, b, None, 'cdf')
    print('window', w, 'err', [round(x,3) for x in e.tolist()], 'sp', [round(x,2) for x in sp.tolist()])
    h = int(e.argmax())
    qf=q.float(); kf=k.float().repeat_interleave(3,1); 
    scale=1/math.sqrt(64)
    sc=(qf[0,h]@kf[0,h].T)*scale
    n=sc.shape[0]; sc=sc.masked_fill(torch.ones(n,n,dtype=torch.bool).triu(1), -math.inf)
    p=sc.softmax(-1)  # (n, n)
    mass = p.reshape(16,128,32,64).sum(-1).mean(1)  # (qb, kb) true block mass averaged over rows
    out, stats = sparge_attn(q,k,v,is_causal=True,simthreshd1=th,cdfthreshd=b,return_stats=True)
    # recompute mask via predict
    from sparge_core.ops.predict import predict_block_mask
    m = R.predict_block_mask(q, k, is_causal=True, simthreshd1=th, cdfthreshd=b, scale=scale) if hasattr(R,'predict_block_mask') else None
    mh = m[0,h]
    dropped = (mass * (~mh)).sum(-1)
    print('  head', h, 'dropped true mass per qblock', [round(x,3) for x in dropped.tolist()])
    print('  sink mass per qblock', [round(x,2) for x in mass[:,0].tolist()])
