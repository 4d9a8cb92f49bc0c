"""What ending the caller's idle OpenMP team at each hand-over to the workers saves (`linalg.workers.RELEASE_OPENMP`).

    .venv/bin/python benchmarks/openmp_release.py [--rounds 5] [--repeats 3]

After each parallel region torch runs, libgomp's threads spin-wait for the next one (by default for milliseconds).
When the caller then hands jobs to the one-thread workers and waits, that spinning thread takes a core from them.
Two measurements, on a multi-thread CPU with torch's libgomp:
- the CPU time the caller's other threads (its OpenMP team) use while `polar_later` solves one d=256 GPT block's
  six gradient-like matrices (`benchmarks/polar.py`'s), with the team ended at the hand-over and left spinning;
- interleaved timings (benchmarks/_timing.py: median [min–max] over rounds of the ratio to torch.optim.Muon's step in
  the same round) of `polar_later(…, "gram")` on that block and of `Muon(polar="gram")`'s step on the GPT d=256
  ×4 layers of `benchmarks/optim_step.py`, each with the release on ("release") and off ("spin");
- the same for a probe's measured training step (`benchmarks/probe_overhead.py`'s GPT d=256, a Monitor measuring
  every step; `--probe-block` steps per call), as a ratio to the unprobed step.
The last line says which of the two `SPECSCOPE_OPENMP_RELEASE` unset ("auto") picks on this CPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, load_average, parse  # noqa: E402
from optim_step import _params, gpt_hidden_shapes  # noqa: E402
from polar import block_shapes, gradient_like  # noqa: E402

from probe_overhead import Arm  # noqa: E402

from specscope.linalg import polar_later, workers  # noqa: E402
from specscope.linalg._cpu import cpu_vendor  # noqa: E402
from specscope.optim import Muon  # noqa: E402


def worker_ids() -> set[str]:
    """The native thread ids of the pool's workers: one job each, held at a barrier until all have started."""
    n = workers.count(torch.device("cpu"))
    barrier = threading.Barrier(n)
    return {str(i) for i in workers.start(lambda _: (barrier.wait(10), threading.get_native_id())[1], list(range(n)))()}


def _threads_cpu_ms(skip: set[str]) -> dict[str, float]:
    """CPU ms used so far by each of this process's threads not in `skip` (/proc schedstat)."""
    out = {}
    for tid in set(os.listdir("/proc/self/task")) - skip:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[tid] = int(f.read().split()[0]) / 1e6
        except OSError:  # a thread that ended meanwhile
            continue
    return out


def with_release(on: bool, fn):
    def run():
        workers.RELEASE_OPENMP = on
        return fn()
    return run


def team_cpu(mats: list[torch.Tensor], step, calls: int = 10) -> dict[str, float]:
    """Median CPU ms of the caller's OpenMP team during one polar_later of `mats`, right after a Muon step."""
    skip = worker_ids() | {str(threading.get_native_id())}
    out = {}
    for on in (True, False):
        workers.RELEASE_OPENMP = on
        used = []
        for _ in range(calls):
            step()  # parallel regions: the team is idle and spinning when polar_later starts
            before = _threads_cpu_ms(skip)
            polar_later(mats, "gram")()
            after = _threads_cpu_ms(skip)  # an ended team's thread is gone: only its time before `before` is lost
            used.append(sum(ms - before.get(tid, 0.0) for tid, ms in after.items()))
        out["release" if on else "spin"] = statistics.median(used)
    workers.RELEASE_OPENMP = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (ratios: median and min–max over them)")
    ap.add_argument("--repeats", type=int, default=3, help="calls per candidate per round")
    ap.add_argument("--probe-block", type=int, default=5, help="training steps per call in the probe's rows")
    args = parse(ap)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load_average()} at start")
    if not workers.count(torch.device("cpu")) or workers._omp_pause() is None or not os.path.exists("/proc/self/task"):
        raise SystemExit("needs a CPU with ≥ 2 torch threads, torch's libgomp and Linux /proc")
    gen = torch.Generator().manual_seed(0)
    block = [gradient_like(m, n, gen) for m, n in block_shapes(256)]
    layers = [gradient_like(m, n, gen) for m, n in gpt_hidden_shapes(256, 4)]
    block_muon = torch.optim.Muon(_params(block), lr=1.0, weight_decay=0.0)
    layers_muon = torch.optim.Muon(_params(layers), lr=1.0, weight_decay=0.0)
    exact = {on: Muon(_params(layers), lr=1.0, weight_decay=0.0, polar="gram") for on in (True, False)}
    for opt in (block_muon, layers_muon, *exact.values()):
        opt.step()

    cpu = team_cpu(block, block_muon.step)
    print(f"\nOpenMP team's CPU during one polar_later of the d=256 block (median of 10): release {cpu['release']:.1f} ms, "
          f"spin {cpu['spin']:.1f} ms")
    rows = []
    res = interleaved({"torch.optim.Muon": block_muon.step,
                       "polar_later gram, release": with_release(True, lambda: polar_later(block, "gram")()),
                       "polar_later gram, spin": with_release(False, lambda: polar_later(block, "gram")())},
                      "torch.optim.Muon", rounds=args.rounds, repeats=args.repeats)
    rows += [("GPT block d=256", k, t) for k, t in res.items()]
    res = interleaved({"torch.optim.Muon": layers_muon.step,
                       "Muon(polar='gram'), release": with_release(True, exact[True].step),
                       "Muon(polar='gram'), spin": with_release(False, exact[False].step)},
                      "torch.optim.Muon", rounds=args.rounds, repeats=args.repeats, warmup=0)
    rows += [("GPT d=256 ×4 layers", k, t) for k, t in res.items()]
    arms = {"no monitor": Arm(None), "every step, release": Arm(1), "every step, spin": Arm(1)}
    res = interleaved({"no monitor": lambda: arms["no monitor"].run(args.probe_block),
                       "every step, release": with_release(True, lambda: arms["every step, release"].run(args.probe_block)),
                       "every step, spin": with_release(False, lambda: arms["every step, spin"].run(args.probe_block))},
                      "no monitor", rounds=args.rounds, repeats=1)
    rows += [("probe, GPT d=256 training step", k, t) for k, t in res.items()]
    workers.RELEASE_OPENMP = None
    print(f"\nauto (SPECSCOPE_OPENMP_RELEASE unset) on this CPU ({cpu_vendor() or 'vendor unknown'}): "
          f"{'release' if workers.releases_openmp() else 'spin'}")
    print("\n| setting | candidate | median ms | × the first row of its setting |\n|---|---|---:|---:|")
    for setting, k, t in rows:
        print(f"| {setting} | {k} | {t.ms:.1f} | {t.ratio_text()} |")


if __name__ == "__main__":
    main()
