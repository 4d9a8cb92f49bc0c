"""Does batching the coupling's perturbation directions with torch.func.vmap pay on this model?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/coupling_batching.py [--batch 8] [--rounds 3] [--kernel sdpa]

One coupling checkpoint evaluates the centroids μ_x(θ ± εv) (a forward and a backward on 1,024 probes) for
20 random and 6 SED directions, 52 evaluations. Candidates, each computing the centroids at `batch`
perturbed θ_attn: `loop` (one evaluation after another, what `coupling_ratios` does) and `vmap`
(torch.func.vmap of a functional_call over the stacked perturbed weights). `--kernel`: the model's attention
(the lab's default `explicit`, or `sdpa`). Ratios to `loop`, interleaved rounds (benchmarks/_timing.py).
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch.func import functional_call, grad, vmap

from _timing import interleaved, load_average, parse
from specscope.labs import sed


class FromEmbeddings(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, h):
        return sed.forward_from_embeddings(self.model, h)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kernel", choices=["explicit", "sdpa"], default="explicit")
    args = parse(ap)
    warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap's per-item fallback, measured here
    torch.manual_seed(0)
    cfg = sed.Config(kernel=args.kernel)
    data = sed.make_data(cfg, [cfg.task], torch.device("cpu"))
    model = sed.make_model(cfg, 1, 0, torch.device("cpu"))
    weights = sed.attention_weights(model)
    _, (xp, yp) = sed.fixed_inputs(data, cfg.fixed_batch, cfg.n_probe, 0)
    y, wrap = yp[:, 0], FromEmbeddings(model)
    h0 = sed.embed(model, xp).detach()
    names = [f"model.{n}.weight" for n in weights]
    stacked = [w.detach().expand(args.batch, *w.shape) + 1e-3 * torch.randn(args.batch, *w.shape) for w in weights.values()]

    def centroids_at(ws):
        total = lambda h: functional_call(wrap, dict(zip(names, ws)), (h,)).gather(1, y[:, None]).sum()  # noqa: E731
        return grad(total)(h0)

    def loop():
        for b in range(args.batch):
            with torch.no_grad():
                for w, s in zip(weights.values(), stacked):
                    w.copy_(s[b])
            sed.centroids(model, xp, y)

    def batched():
        with torch.no_grad():
            vmap(centroids_at)(stacked)

    start = load_average()
    t = interleaved({"loop": loop, "vmap": batched}, "loop", rounds=args.rounds, repeats=2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), kernel {args.kernel}, batch {args.batch}, "
          f"{start} at start")
    for name, timing in t.items():
        print(f"{name:5s} {timing.ms / args.batch:7.1f} ms per evaluation, ratio to loop {timing.ratio_text()}")


if __name__ == "__main__":
    main()
