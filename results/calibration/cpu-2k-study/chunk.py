import sys; sys.path.insert(0,'/work/main')
import torch
from calibrate.capture import load_captured
import calibrate.search as S
from sparge_core import sparge_attn
layer=int(sys.argv[1]); chunk=int(sys.argv[2]); cal=[int(x) for x in sys.argv[3].split(',')]
class ChunkEv(S.LayerEvaluator):
    def __call__(self, theta, budget, pv, mode):
        self.calls += 1
        worst = torch.zeros(self.num_heads, dtype=torch.float64); spars = torch.zeros(self.num_heads, dtype=torch.float64)
        for (q, k, v), ref in zip(self.samples, self.dense):
            out, stats = sparge_attn(q, k, v, is_causal=True, simthreshd1=theta, pvthreshd=pv, cdfthreshd=budget, return_stats=True)
            n = q.shape[2]; c = n // chunk
            d = (out.float() - ref).abs()[0].reshape(self.num_heads, c, chunk, -1).sum((2, 3))
            r = ref.abs()[0].reshape(self.num_heads, c, chunk, -1).sum((2, 3))
            err = (d / r).max(1).values
            worst = torch.maximum(worst, err.double()); spars += stats.per_head_sparsity()
        return worst, spars / len(self.samples)
s=load_captured('/tmp/hs/cap2k',layer)
ev=ChunkEv([s[i] for i in cal],is_causal=True)
held=[i for i in range(12) if i not in cal]
hv=[S.LayerEvaluator([s[i]],is_causal=True, estimator='pooled') for i in held]
for tune in (False, True):
    res=S.search_layer(ev,9,S.SearchSettings(tune_pv=tune))
    th=torch.tensor([h.simthreshd1 for h in res.heads]).float(); b=torch.tensor([h.budget for h in res.heads]).float(); pv=torch.tensor([h.pvthreshd for h in res.heads]).float()
    out=[float(h(th,b,pv if tune else None,'cdf')[0].max()) for h in hv]
    print('chunk',chunk,'pv',tune,'sparsity %.3f'%res.sparsity,'held', dict(zip(held,[round(x,3) for x in out])))
