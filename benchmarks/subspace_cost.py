"""Cost of the rolling gradient SVD, the projection and the centroid coupling on the paper-003 model.

    .venv/bin/python benchmarks/subspace_cost.py [--device cpu|cuda] [--threads 2] [--repeats 30]

Model: paper-003 encoder (2 layers, d_model 128, 4 heads, d_ff 256) on a+b mod 97, batch 512, AdamW,
grad clip 1.0; θ_attn = the 8 attention weight matrices, P = 131,072. Each figure is the median over
`repeats` timed calls after warm-up; ratios are to the median training step. "per step" amortizes a
snapshot (every 25 steps) and a coupling checkpoint (every 250 steps) over the steps between them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specscope.labs import sed
from specscope.labs.grokking import Batches, loss_fn
from specscope.subspace import GradientProjection, coupling_ratios
from specscope.subspace.snapshots import SEDTracker


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of fn() over `repeats` calls (after two warm-up calls)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    out = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--n-probe", type=int, default=1024)
    ap.add_argument("--kernel", choices=["sdpa", "explicit"], default="sdpa")  # docs/lab-sed.md's table: sdpa
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
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

    t_step = timed(train_step, args.repeats, device)
    tracker = SEDTracker(params, {"gradient-sed": lambda: loss_fn(model, fixed)}, window=20, k=3, update=False)
    for i in range(20):
        tracker.after_backward(i, model, opt)
    rolling = tracker.seds["gradient-sed"]
    vecs = [torch.randn(P, device=device) for _ in range(4)]
    it = iter(range(10**9))

    def push_and_directions():
        rolling.push(vecs[next(it) % 4])
        rolling.directions()

    t_svd = timed(push_and_directions, args.repeats, device)
    t_snap = timed(lambda: tracker.after_backward(0, model, opt), args.repeats, device)
    loss_fn(model, batches(0)).backward()
    proj = GradientProjection(params, rolling, mode="keep", k=3)
    t_proj = timed(proj.apply, args.repeats, device)
    fn = lambda: sed.centroids(model, xp, yp[:, 0])  # noqa: E731
    V = torch.cat([rolling.directions(), torch.linalg.qr(torch.randn(P, 3, device=device))[0].T])
    t_coupling = timed(lambda: coupling_ratios(fn, params, V, n_random=20), max(3, args.repeats // 10), device)
    full_svd = timed(lambda: torch.linalg.svd(rolling._rows, full_matrices=False), max(3, args.repeats // 10), device)

    rows = [
        ("training step (batch 512)", t_step, 1.0),
        ("RollingSVD push + directions(3), per snapshot", t_svd, t_svd / t_step),
        ("  amortized per step (snapshot every 25)", t_svd / 25, t_svd / 25 / t_step),
        ("explicit SVD of the 20 × P window (reference)", full_svd, full_svd / t_step),
        ("gradient snapshot on the fixed batch (autograd.grad + push)", t_snap, t_snap / t_step),
        ("projection keep SED-3, per step", t_proj, t_proj / t_step),
        (f"R_k checkpoint: 2 SEDs × 3 + 20 random, {args.n_probe} probes", t_coupling, t_coupling / t_step),
        ("  amortized per step (checkpoint every 250)", t_coupling / 250, t_coupling / 250 / t_step),
    ]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; P = {P:,}; median of {args.repeats}")
    print("| operation | ms | × training step |\n|---|---:|---:|")
    for label, t, r in rows:
        print(f"| {label} | {t * 1e3:.2f} | {r:.3f} |")


if __name__ == "__main__":
    main()
