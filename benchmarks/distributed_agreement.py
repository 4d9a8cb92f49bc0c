"""How far a multi-process Muon fit is from one process on the same global batches (a measurement, not a timing).

A tiny random-init transformers Llama (hidden 64, 2 layers, vocab 256) trains `--steps` Muon steps
(`spectral_param_groups`, lr 0.02 / 3e-3) with a Monitor every 2nd step, once in one process on the global batch of 8
sequences and once under DDP or FSDP2 (`specscope.train.distributed.shard`) at `--ranks` gloo processes, each on its
rows of the same batches. Per polar backend it prints the largest parameter difference between ranks (the global
update is computed once per matrix: 0) and against the one process, and the largest relative difference of the
probe's stable_rank / nuclear_rank / spectral_advantage records. The difference comes from the rounding of the
gradient reduction, which the polar map amplifies; the bf16 default amplifies it most.

    .venv/bin/python benchmarks/distributed_agreement.py [--ranks 2] [--steps 4] [--wrap ddp|fsdp2] [--polar gram gram_newton_schulz]
"""

from __future__ import annotations

import argparse

import torch

from _timing import parse
from specscope.optim import Muon, spectral_param_groups
from specscope.probe import Monitor
from specscope.train import distributed as D

SEQ, GLOBAL, EVERY = 16, 8, 2
MEASURED = ("stable_rank", "nuclear_rank", "spectral_advantage")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def fit(rank: int, world: int, steps: int, polar: str, wrap: str | None):
    """Train on this rank's rows of every global batch: (records {(step, layer, metric): value}, whole parameters)."""
    torch.set_num_threads(1)
    model = tiny_llama()
    run = model
    if wrap == "ddp":
        run = torch.nn.parallel.DistributedDataParallel(model)
    elif wrap == "fsdp2":
        D.shard(model, model.model.layers)
    opt, monitor = Muon(spectral_param_groups(model, 0.02, 3e-3, polar=polar)), Monitor(model, every=EVERY)
    g, records = torch.Generator().manual_seed(0), {}
    for step in range(steps):
        rows = torch.randint(0, 256, (GLOBAL, SEQ), generator=g).chunk(world)[rank]
        with monitor.step(step):
            run(input_ids=rows, labels=rows).loss.backward()
        opt.step()
        opt.zero_grad()
        records.update({(r.step, r.layer, r.metric): r.value for r in monitor.pop_records() if r.metric in MEASURED})
        D.heartbeat()
    whole = {n: (p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()).clone() for n, p in model.named_parameters()}
    return records, whole


def largest(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def relative(a: dict, b: dict) -> float:
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-30) for k in b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--wrap", choices=("ddp", "fsdp2"), default="ddp")
    ap.add_argument("--polar", nargs="+", default=["gram", "gram_newton_schulz"])
    a = parse(ap)
    print(f"torch {torch.__version__}; tiny Llama, {a.steps} Muon steps, {a.wrap} at {a.ranks} gloo ranks against one process")
    print("| polar | params: rank 0 − rank r | params: ranks − one process | records: ranks vs one process (relative) |")
    print("|---|---:|---:|---:|")
    for polar in a.polar:
        one_records, one = fit(0, 1, a.steps, polar, None)
        results = D.spawn(fit, a.ranks, a.steps, polar, a.wrap, timeout=300)
        between = max(largest(results[0][1], r[1]) for r in results[1:])
        print(f"| {polar} | {between:.1e} | {largest(results[0][1], one):.1e} | {relative(results[0][0], one_records):.1e} |")


if __name__ == "__main__":
    main()
