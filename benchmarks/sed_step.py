"""What one training step of the sed lab costs with each attention kernel and AdamW implementation.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sed_step.py [--steps 5] [--rounds 3]

The paper-003 encoder on a+b mod 97, batch 512, clip 1.0, AdamW: `sdpa` + torch's per-tensor AdamW loop
(the lab before `kernel` and `fused_adamw`), against `fused` (AdamW(fused=True)), `explicit`
(models.modular.explicit_attention instead of F.scaled_dot_product_attention) and both (the lab's default).
Ratios to the first, interleaved rounds (benchmarks/_timing.py).
"""

from __future__ import annotations

import argparse

import torch

from _timing import interleaved, load_average, parse
from specscope.labs import sed
from specscope.labs.grokking import Batches, loss_fn


def trainer(cfg: sed.Config, steps: int):
    device = torch.device("cpu")
    data = sed.make_data(cfg, [cfg.task], device)
    model = sed.make_model(cfg, 1, cfg.seed, device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            fused=cfg.fused_adamw or None)
    batches = Batches(data, cfg.batch_size, cfg.seed)

    def run() -> None:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(model, batches(step)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = parse(ap)
    variants = {"sdpa, per-tensor AdamW": dict(kernel="sdpa", fused_adamw=False),
                "sdpa, fused AdamW": dict(kernel="sdpa", fused_adamw=True),
                "explicit, per-tensor AdamW": dict(kernel="explicit", fused_adamw=False),
                "explicit, fused AdamW (default)": dict(kernel="explicit", fused_adamw=True)}
    runs = {name: trainer(sed.Config(**kw), args.steps) for name, kw in variants.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {load_average()}")
    timings = interleaved(runs, "sdpa, per-tensor AdamW", rounds=args.rounds)
    for name, t in timings.items():
        print(f"{name:34s} {t.ms / args.steps:7.1f} ms/step   × {t.ratio_text()}")


if __name__ == "__main__":
    main()
