"""Do a measured step's block Krylov solves pay for being solved in cache-sized runs?

    .venv/bin/python benchmarks/cache_runs.py [--rounds 9] [--phase-rounds 6] [--block 8]

On a CPU, a measured step's st(A) solves are one job of a one-thread worker, which solves the inputs of one shape
as a list (`probe.estimators._solved`): four passes over every input, the small algebra between them batched. The
default splits that list into consecutive runs of at most 1/16 of the last-level cache (`linalg.workers.cache_chunks`);
"one run" is the rule before it, all inputs of a shape together. Model and inputs: probe_overhead.py's GPT (4 layers,
d_model 256, batch 16 × 128 tokens: 13 inputs of 2048 × 256, 4 of 2048 × 1024), one real step's inputs and warm blocks.

1. The job alone, one thread, a 96 MiB buffer written before each call so that the inputs come from memory, as after a
   backward pass: ms per call for one run, the default's runs, and runs of a fixed number of inputs (medians and
   min–max over `--rounds`, candidates in turn).
2. The measured step (as `probe_overhead.py --phases`): an unprobed model and two every-step Monitors, one per rule,
   take turns step by step (rotating order), `--block` steps per round; the finishing phase and the whole step per
   round (medians of the round medians, min–max over rounds) and the whole step's ratio to the unprobed one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import probe_overhead as po  # noqa: E402
from _timing import load_average, parse  # noqa: E402

from specscope.linalg import workers  # noqa: E402
from specscope.linalg._cpu import last_level_cache  # noqa: E402
from specscope.probe import estimators as E  # noqa: E402

RULE = "SPECSCOPE_BENCH_RUNS"  # this benchmark's switch between the two rules: "one" or unset (the default)
_cache_chunks = workers.cache_chunks


def _runs(nbytes, cache=None):
    return _cache_chunks(nbytes, cache=0 if os.environ.get(RULE) == "one" else cache)


def step_inputs() -> dict:
    """{i: (A, warm block, depth)}: one real training step's distinct Linear inputs, each with its warm block."""
    _, _, inputs = po.step_tensors()
    return {i: (A, E.verified_top(A, E._initial_block(A.shape[-1], E.BLOCK, A.device), 4)[1], E.KRYLOV_DEPTH)
            for i, A in enumerate(inputs)}


def job_alone(rounds: int) -> None:
    problems = step_inputs()
    keys = list(problems)
    junk = torch.zeros(96 * 2**20 // 4)

    def fixed(k: int):
        return lambda: [E._solved({j: problems[j] for j in keys[i : i + k]}) for i in range(0, len(keys), k)]

    def rule(name: str):
        def run():
            os.environ[RULE] = name
            try:
                E._solved(problems)
            finally:
                os.environ.pop(RULE)
        return run

    cands = {"one run (all of a shape together)": rule("one"), "default (cache-sized runs)": rule("default")}
    cands.update({f"runs of {k}": fixed(k) for k in (1, 2, 4)})
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for name, fn in cands.items():
            junk.add_(1.0)
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    shapes = sorted({tuple(A.shape) for A, _, _ in problems.values()})
    print(f"\n1. the solves' job alone, one thread, {len(problems)} inputs {shapes}, caches flushed; {rounds} rounds\n")
    print("| job | ms, median [min–max] |\n|---|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} [{min(ts):.1f}–{max(ts):.1f}] |")


def measured_steps(rounds: int, block: int) -> None:
    arms = {"no monitor": (po.Arm(None), None), "every step, one run": (po.Arm(1), "one"),
            "every step, default (cache-sized runs)": (po.Arm(1), None)}
    for arm, _ in arms.values():
        arm.run(2)
    per_round: dict[str, list[list[float]]] = {k: [] for k in arms}
    names = list(arms)
    for _ in range(rounds):
        this: dict[str, list[tuple]] = {k: [] for k in arms}
        for i in range(block):
            for name in names[i % 3:] + names[: i % 3]:
                arm, value = arms[name]
                if value is None:
                    os.environ.pop(RULE, None)
                else:
                    os.environ[RULE] = value
                this[name].append(po.phase_times(arm))
        os.environ.pop(RULE, None)
        for name in arms:
            per_round[name].append([statistics.median(col) for col in zip(*this[name])])
    print(f"\n2. measured steps, {rounds} rounds of {block} alternating steps; ms, median of the round medians [min–max]\n")
    print("| arm | finishing | whole step | × no monitor |\n|---|---:|---:|---:|")
    base = [sum(r[:4]) for r in per_round["no monitor"]]
    for name, rows in per_round.items():
        fin = [r[2] for r in rows]
        whole = [sum(r[:4]) for r in rows]
        ratio = [w / b for w, b in zip(whole, base)]
        print(f"| {name} | {statistics.median(fin):.1f} [{min(fin):.1f}–{max(fin):.1f}] | "
              f"{statistics.median(whole):.1f} [{min(whole):.1f}–{max(whole):.1f}] | "
              f"{statistics.median(ratio):.3f} [{min(ratio):.3f}–{max(ratio):.3f}] |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9, help="rounds of the job-alone comparison")
    ap.add_argument("--phase-rounds", type=int, default=6, help="rounds of the measured-step comparison")
    ap.add_argument("--block", type=int, default=8, help="alternating steps per round")
    args = parse(ap)
    if bad := [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v < 1]:
        ap.error(f"{', '.join(bad)}: each must be an int >= 1")
    workers.cache_chunks = _runs
    print(f"torch {torch.__version__}, {load_average()}; last-level cache {last_level_cache() / 2**20:.0f} MiB "
          f"(runs of at most {last_level_cache() // workers.CACHE_SHARE / 2**20:.1f} MiB)")
    torch.set_num_threads(1)
    job_alone(args.rounds)
    torch.set_num_threads(2)
    measured_steps(args.phase_rounds, args.block)


if __name__ == "__main__":
    main()
