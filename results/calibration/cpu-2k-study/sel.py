import sys; sys.path.insert(0,'/work/main'); sys.path.insert(0,'/tmp/hs')
import torch, json
from kc import features, kcenter
from calibrate.capture import load_captured
import calibrate.search as S
ids = torch.load('/tmp/hs/all2k_ids.pt')
feat = features(ids)
kc, r = kcenter(feat, 5)
print('kcenter', kc, 'radius', r)
sels = {'kcenter': kc}
for seed in (0, 1, 2):
    g = torch.Generator().manual_seed(seed); sels[f'random{seed}'] = sorted(torch.randperm(55, generator=g)[:5].tolist())
layers=[int(x) for x in sys.argv[1].split(',')]
res = {}
for layer in layers:
    s = load_captured('/tmp/hs/all2k', layer)
    for name, cal in sels.items():
        ev = S.LayerEvaluator([s[i] for i in cal], is_causal=True, estimator='pooled')
        r_ = S.search_layer(ev, 9, S.SearchSettings())
        th=torch.tensor([h.simthreshd1 for h in r_.heads]).float(); b=torch.tensor([h.budget for h in r_.heads]).float(); pv=torch.tensor([h.pvthreshd for h in r_.heads]).float()
        held = [i for i in range(55) if i not in cal]
        errs = []
        for i in held:
            e,_ = S.LayerEvaluator([s[i]], is_causal=True, estimator='pooled')(th, b, pv, 'cdf'); errs.append(float(e.max()))
        errs = torch.tensor(errs)
        print(f'layer {layer} {name:<8} {cal} sparsity {r_.sparsity:.3f} held max {errs.max():.3f} (win {held[int(errs.argmax())]}) p90 {errs.quantile(0.9):.3f} >0.1125: {(errs>0.1125).sum().item()}/{len(held)}', flush=True)
