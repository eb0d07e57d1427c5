import torch
def features(ids_2d, buckets=4096):
    n = ids_2d.shape[0]
    h = torch.zeros(n, buckets, dtype=torch.float64)
    h.scatter_add_(1, (ids_2d.long() * 2654435761 % buckets), torch.ones_like(ids_2d, dtype=torch.float64))
    h = (h / h.sum(1, keepdim=True)).sqrt()  # Hellinger embedding: unit vectors
    return h
def kcenter(feat, count):
    mean = feat.mean(0, keepdim=True)
    d0 = (feat - mean).norm(dim=1)
    chosen = [int(d0.argmax())]
    mind = (feat - feat[chosen[0]]).norm(dim=1)
    while len(chosen) < count:
        i = int(mind.argmax()); chosen.append(i)
        mind = torch.minimum(mind, (feat - feat[i]).norm(dim=1))
    return chosen, float(mind.max())
