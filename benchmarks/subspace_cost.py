"""Cost of the rolling gradient SVD, the projection and the centroid coupling on the paper-003 model.

    .venv/bin/python benchmarks/subspace_cost.py [--device cpu|cuda] [--threads 2] [--rounds 5] [--repeats 3]

Model: paper-003 encoder (2 layers, d_model 128, 4 heads, d_ff 256) on a+b mod 97, batch 512, AdamW,
grad clip 1.0; θ_attn = the 8 attention weight matrices, P = 131,072. The operations are timed round-robin
with the training step (benchmarks/_timing.py): ms is the median over every timed call, × step the median
[min–max] over the rounds of the ratio to the training step's median in the same round. "per step"
amortizes a snapshot (every 25 steps) and a coupling checkpoint (every 250 steps) over the steps between them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from specscope.labs import sed
from specscope.labs.grokking import Batches, loss_fn
from specscope.subspace import GradientProjection, coupling_ratios
from specscope.subspace.snapshots import SEDTracker

sys.path.insert(0, str(Path(__file__).parent))
from _timing import Timing, interleaved, load_average, parse  # noqa: E402

STEP = "training step (batch 512)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (ratios: median and min–max over them)")
    ap.add_argument("--repeats", type=int, default=3, help="calls of each operation per round")
    ap.add_argument("--n-probe", type=int, default=1024)
    ap.add_argument("--kernel", choices=["sdpa", "explicit"], default="sdpa")  # docs/lab-sed.md's table: sdpa
    args = parse(ap)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = load_average()
    cfg = sed.Config(device=args.device, kernel=args.kernel)
    data = sed.make_data(cfg, [cfg.task], device)
    model = sed.make_model(cfg, 1, 0, device)
    params = list(sed.attention_weights(model).values())
    P = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    batches = Batches(data, cfg.batch_size, 0)
    fixed, (xp, yp) = sed.fixed_inputs(data, cfg.fixed_batch, args.n_probe, 0)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batches(0)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

    tracker = SEDTracker(params, {"gradient-sed": lambda: loss_fn(model, fixed)}, window=20, k=3, update=False)
    for i in range(20):
        tracker.after_backward(i, model, opt)
    rolling = tracker.seds["gradient-sed"]
    vecs = [torch.randn(P, device=device) for _ in range(4)]
    it = iter(range(10**9))

    def push_and_directions():
        rolling.push(vecs[next(it) % 4])
        rolling.directions()

    train_step()  # gradients for the projection to act on (each training step leaves new ones)
    proj = GradientProjection(params, rolling, mode="keep", k=3)
    fn = lambda: sed.centroids(model, xp, yp[:, 0])  # noqa: E731
    V = torch.cat([rolling.directions(), torch.linalg.qr(torch.randn(P, 3, device=device))[0].T])
    snap, svd, proj_row, full = ("RollingSVD push + directions(3), per snapshot",
                                 "gradient snapshot on the fixed batch (autograd.grad + push)",
                                 "projection keep SED-3, per step", "explicit SVD of the 20 × P window (reference)")
    coupling = f"R_k checkpoint: 2 SEDs × 3 + 20 random, {args.n_probe} probes"
    t = interleaved({STEP: train_step, snap: push_and_directions, svd: lambda: tracker.after_backward(0, model, opt),
                     proj_row: proj.apply, full: lambda: torch.linalg.svd(rolling._rows, full_matrices=False),
                     coupling: lambda: coupling_ratios(fn, params, V, n_random=20)},
                    STEP, rounds=args.rounds, repeats=args.repeats, warmup=2,
                    sync=torch.cuda.synchronize if device.type == "cuda" else (lambda: None))
    every = lambda x, k, label: Timing(label, x.ms / k, tuple(r / k for r in x.ratios))  # noqa: E731
    rows = [t[STEP], t[snap], every(t[snap], 25, "  amortized per step (snapshot every 25)"), t[full], t[svd],
            t[proj_row], t[coupling], every(t[coupling], 250, "  amortized per step (checkpoint every 250)")]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {load} at start; P = {P:,}; "
          f"{args.rounds} interleaved rounds of {args.repeats} calls")
    print("| operation | ms | × training step, median [min–max] |\n|---|---:|---:|")
    for r in rows:
        lo, hi = r.spread
        print(f"| {r.name} | {r.ms:.2f} | {r.ratio:.3f} [{lo:.3f}–{hi:.3f}] |")


if __name__ == "__main__":
    main()
