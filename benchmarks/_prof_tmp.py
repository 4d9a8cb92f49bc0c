import torch, sys, time, statistics
sys.path.insert(0, "benchmarks")
from polar import gradient_like, block_shapes
from specscope.optim import Muon
gen = torch.Generator().manual_seed(0)
mats = [gradient_like(m, n, gen) for m, n in block_shapes(768)]
def mk(cls, **kw):
    ps = [torch.nn.Parameter(torch.zeros_like(G)) for G in mats]
    for p, G in zip(ps, mats): p.grad = G.clone()
    return cls(ps, lr=0.01, **kw)
b, a = mk(Muon, polar="newton_schulz"), mk(torch.optim.Muon)
for o in (a, b): o.step()
from torch.profiler import profile
for name, o in (("ours", b), ("torch", a)):
    with profile() as prof:
        for _ in range(5): o.step()
    print(name); print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
