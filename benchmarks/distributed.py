"""Optimizer step time and bytes sent per step under FSDP2: global Muon vs shard-wise Muon vs AdamW.

Not a test. For each rank count (gloo CPU processes; 1 = one process, no sharding) the gpt lab's model
(d_model 128, 2 layers, 4·d MLP) is wrapped with `fully_shard` per block, one backward fills the gradients,
and three optimizers on the same parameters are stepped round-robin (benchmarks/_timing.py: ratios to
AdamW in the same round, median and min–max over the rounds; a barrier closes each timed step so ranks
do not drift apart). Bytes: what rank 0 sends to other ranks in one step of each optimizer, counted by
specscope.optim (all_to_all exactly; an all_reduce as a ring's 2·(world−1)/world of its buffer).
Muon groups: the gpt lab's routing (hidden matrices Muon, newton_schulz; embedding, head, gains AdamW).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distributed.py --ranks 1 2 4 --rounds 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, load_average, parse  # noqa: E402

from specscope.labs import gpt  # noqa: E402
from specscope.optim import Hybrid, _distributed  # noqa: E402
from specscope.train.distributed import shard, spawn  # noqa: E402


def _optimizers(model, cfg) -> dict[str, Hybrid]:
    """AdamW on everything, Muon (global), Muon (shard-wise): the gpt lab's groups, same parameters."""
    out = {"adamw": Hybrid(gpt.param_groups(cfg, model, "adamw"), algorithm="adamw")}
    for name, shardwise in (("muon-global", False), ("muon-shardwise", True)):
        groups = gpt.param_groups(cfg, model, "muon")
        for g in groups:
            if g.get("algorithm") == "muon":  # an AdamW group has no such option
                g["shardwise"] = shardwise
        out[name] = Hybrid(groups, algorithm="adamw")
    return out


def _bench(rank: int, world: int, d_model: int, rounds: int, repeats: int) -> dict:
    cfg = gpt.Config(d_model=d_model, n_layer=2, seq_len=32, batch_size=8, muon_polar="newton_schulz")
    torch.manual_seed(0)
    model = gpt.make_model(cfg)
    if world > 1:
        shard(model, model.blocks)
    x = torch.randint(0, 256, (cfg.batch_size, cfg.seq_len))
    gpt.loss_fn(model, (x, x)).backward()
    opts = _optimizers(model, cfg)
    sent = {}
    for name, opt in opts.items():
        opt.step()  # warm state (momentum, moments) before counting and timing
        _distributed.TRAFFIC.reset()
        opt.step()
        sent[name] = _distributed.TRAFFIC.bytes_sent
    barrier = dist.barrier if world > 1 else (lambda: None)
    timings = interleaved({n: o.step for n, o in opts.items()}, "adamw", rounds=rounds, repeats=repeats, sync=barrier)
    return {"sent": sent, "timings": {n: (t.ms, t.ratio_text()) for n, t in timings.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    a = parse(ap)
    print(f"# {load_average()} at start; torch {torch.__version__}; gloo on CPU; gpt lab model d_model={a.d_model}, 2 layers")
    print("| ranks | optimizer | step ms (median) | ratio to AdamW, median [min–max] | bytes sent per step (rank 0) |")
    print("|---|---|---|---|---|")
    for world in a.ranks:
        r0 = spawn(_bench, world, a.d_model, a.rounds, a.repeats)[0]
        for name, (ms, ratio) in r0["timings"].items():
            print(f"| {world} | {name} | {ms:.1f} | {ratio} | {r0['sent'][name]:,} |", flush=True)


if __name__ == "__main__":
    main()
