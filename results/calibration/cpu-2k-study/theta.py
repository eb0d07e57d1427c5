import sys; sys.path.insert(0,'/work/main')
import torch
from calibrate.capture import load_captured
from calibrate.search import LayerEvaluator, SearchSettings, bisect_budget
layer=int(sys.argv[1])
s=load_captured('/tmp/hs/cap2k',layer)
ev=LayerEvaluator(s[:5],is_causal=True, estimator='pooled'); hv=LayerEvaluator(s[11:],is_causal=True, estimator='pooled'); hv2=LayerEvaluator(s[5:11],is_causal=True, estimator='pooled')
st=SearchSettings()
for th in (-1.0,0.2,0.4,0.55,0.7,0.85):
    theta=torch.full((9,),th)
    b,l1,sp=bisect_budget(ev,theta,st)
    hl,hsp=hv(theta,b.float(),None,'cdf'); ol,osp=hv2(theta,b.float(),None,'cdf')
    print(th, 'cal sp %.3f'%sp.mean(), 'held11 l1 %.3f sp %.3f'%(hl.max(),hsp.mean()), 'other held l1 %.3f'%ol.max(), [round(x,3) for x in hl.tolist()])
