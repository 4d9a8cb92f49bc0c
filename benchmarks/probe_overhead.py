"""Cost of the probe on a small GPT: time per training step with and without a Monitor.

    .venv/bin/python benchmarks/probe_overhead.py [--rounds 3] [--block 10] [--threads N] [--device cpu|cuda] [--moe E]
        [--floor | --phases [--consecutive] | --sparse K [--periods P] | --ops | --profile]

Model: GPT 4 layers, d_model 256, 4 heads, seq 128, batch 16, vocab 256, ReLU² MLP, AdamW. `--moe E`: transformers'
Mixtral of the same width, depth, heads and data instead, E experts a layer (2 per token, inner width 2·d_model),
each expert measured as a weight of its own (needs the `hf` extra).
Candidates (benchmarks/_timing.interleaved: round-robin, ratio to "no monitor" per round, median and
min–max over rounds, machine load at start): each call runs `block` training steps of its own model,
optimizer and Monitor. "every 10th" is timed when `block` is a multiple of 10 (one measured step per
call); "every 10th / 100th (derived)" are t_none + (t_every_step − t_none)/k from the same round. "every step,
torch's LAPACK" is the default with SPECSCOPE_EIGH=torch: the exact routes' float64 Grams and eigenvalues on torch's
MKL instead of numpy's OpenBLAS (src/specscope/linalg/lapack.py; the same on a CPU where auto picks torch anyway).
"every step, OpenMP team ended" (or "… left spinning", on a CPU where ending it is the default) is the default with
SPECSCOPE_OPENMP_RELEASE flipped: whether handing the finish to the workers ends the caller's idle OpenMP team
(src/specscope/linalg/workers.py). On CUDA, "every step, CUDA graphs" is the default with SPECSCOPE_CUDA_GRAPHS=on:
nr(G)'s polar iterations and st(A)'s warm Krylov solves replayed as captured graphs (src/specscope/linalg/graphs.py);
`SPECSCOPE_CUDA_GRAPHS=on … --sparse 10` times the every-10th step with them.

`--floor` times instead what an exact measured step cannot skip, against the same unprobed steps, on the gradients
and inputs of a real step: the exact nr(G) of every gradient (`linalg.nuclear_norms`: float64 Grams and
eigenvalues, one job per gradient on the one-thread workers), st(A) of every distinct input by one warm
block-Krylov solve of depth 0 (`probe.estimators.krylov_top`, the default route's cheapest case: two passes over
the input and a power step's two one-column products; the inputs of one shape solved together, as the Monitor does:
a list on a CPU, in the cache-sized runs of `linalg.workers.cache_chunks`, a stacked batch on an accelerator), and both together as a measured step finishes them (the solves
queued ahead of the eigensolves, on one worker: `probe.estimators.finish_implicit`). 1 + the last ratio is the cost below which no probe with these
estimates can go on this machine, before any pairing, hook or bookkeeping; "floor on torch's LAPACK" is the same with
SPECSCOPE_EIGH=torch.

`--sparse K` times one measured step in K directly, step by step: a Monitor(every=K), an unprobed model and a
Monitor(every=1) take turns one step at a time, in rotating order, each probed step against the unprobed step of its turn (per-step
medians over `--periods` periods of K steps per round), so a measured step K steps after the last one (an older warm
state, colder caches) is timed as itself, and the K − 1 steps between are timed too; the block-timed "every 10th"
row above, one measured step in a 2-second call, moves by ±0.1 from round to round.

`--ops` counts instead the aten ops each phase dispatches (views not counted: on a GPU about its kernel launches),
on this device's route and, on a CPU, on the accelerator's route forced there.

`--profile` profiles the finishing phase of measured steps (every step, default) instead of timing: the CPU time of
the caller, the workers and the process's other threads (the caller's spinning OpenMP team) per finish and the cores
they kept busy (Linux), cProfile's top functions by cumulative host time (a host synchronisation shows as time in the
call that waits, e.g. `tolist`), the host synchronisations per finish on CUDA (torch.cuda.set_sync_debug_mode), and
torch.profiler's ops by device time and by host time: where a GPU's finishing time goes.

`--phases` times a probed step (every step, default; and on torch's LAPACK) and an unprobed one phase by phase — forward, backward,
finishing (the measurement's own phase: leaving `monitor.step`), optimizer step — steps alternating, `block` steps per round:
where a measured step's extra time goes; with `--consecutive` each arm runs its `block` steps in a row, as in the
ratio runs. On CUDA `--phases` and `--profile` also count the caching allocator's cudaMalloc calls during the timed
steps and finishes (none in a steady loop).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _timing import dispatched_ops, interleaved, load_average, parse, with_env  # noqa: E402

from specscope.linalg import workers  # noqa: E402
from specscope.models import GPT, GPTConfig  # noqa: E402
from specscope.probe import Monitor  # noqa: E402

CFG = dict(vocab_size=256, seq_len=128, n_layer=4, n_head=4, d_model=256)
BATCH = 16
DEVICE = torch.device("cpu")
TORCH_LAPACK = "every step, torch's LAPACK"  # the default with SPECSCOPE_EIGH=torch (src/specscope/linalg/lapack.py)
GRAPHS = "every step, CUDA graphs"  # the default with SPECSCOPE_CUDA_GRAPHS=on (src/specscope/linalg/graphs.py)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


MOE = 0  # --moe E: transformers' Mixtral of the same size with E experts a layer (2 per token) instead of the GPT


def make_model() -> torch.nn.Module:
    if not MOE:
        return GPT(GPTConfig(**CFG))
    import transformers

    d = CFG["d_model"]
    config = transformers.MixtralConfig(vocab_size=CFG["vocab_size"], hidden_size=d, intermediate_size=2 * d,
                                        num_hidden_layers=CFG["n_layer"], num_attention_heads=CFG["n_head"],
                                        num_key_value_heads=CFG["n_head"], num_local_experts=MOE, num_experts_per_tok=2,
                                        max_position_embeddings=CFG["seq_len"])
    model = transformers.MixtralForCausalLM(config)
    model.forward = lambda x, _f=model.forward: _f(input_ids=x).logits  # the GPT's call: token ids in, logits out
    return model


class Arm:
    """A model, its AdamW and (optionally) a Monitor; `run(k)` trains k steps."""

    def __init__(self, every: int | None, **kw):
        torch.manual_seed(0)
        self.model = make_model().to(DEVICE)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.monitor = Monitor(self.model, every=every, **kw) if every else None
        g = torch.Generator().manual_seed(0)
        p = 1.0 / torch.arange(1, CFG["vocab_size"] + 1, dtype=torch.float64)  # Zipf-skewed tokens
        self.batches = [torch.multinomial(p, BATCH * (CFG["seq_len"] + 1), replacement=True, generator=g).view(BATCH, -1).to(DEVICE)
                        for _ in range(4)]
        self.step_no = 0
        self.finish_mallocs = 0  # cudaMalloc calls during the finishing phases `phase_times` timed

    def run(self, k: int) -> None:
        for _ in range(k):
            b = self.batches[self.step_no % len(self.batches)]
            self.opt.zero_grad(set_to_none=True)
            ctx = self.monitor.step(self.step_no) if self.monitor else torch.enable_grad()
            with ctx:
                F.cross_entropy(self.model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()).backward()
            self.opt.step()
            if self.monitor:
                self.monitor.pop_records()
            self.step_no += 1


PHASES = ("forward", "backward", "finishing", "optimizer")


def cuda_mallocs() -> int:
    """cudaMalloc calls the caching allocator has made so far in this process (its segments allocated); 0 off CUDA.
    A steady training loop makes none: each one is a slow, synchronising call, and a count that grows while arms
    take turns says the allocator's cached blocks did not fit a phase's tensors."""
    return int(torch.cuda.memory_stats(DEVICE).get("segment.all.allocated", 0)) if DEVICE.type == "cuda" else 0


def phase_times(arm: Arm) -> tuple[float, ...]:
    """One training step of `arm`, timed by phase (ms): forward, backward, finishing (the measurement: leaving
    `monitor.step`), optimizer step."""
    b = arm.batches[arm.step_no % len(arm.batches)]
    arm.opt.zero_grad(set_to_none=True)
    ctx = arm.monitor.step(arm.step_no) if arm.monitor else torch.enable_grad()
    t = [time.perf_counter()]
    ctx.__enter__()
    loss = F.cross_entropy(arm.model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
    sync()
    t.append(time.perf_counter())
    loss.backward()
    sync()
    t.append(time.perf_counter())
    before = cuda_mallocs()
    ctx.__exit__(None, None, None)
    sync()
    t.append(time.perf_counter())
    arm.finish_mallocs += cuda_mallocs() - before
    arm.opt.step()
    if arm.monitor:
        arm.monitor.pop_records()
    sync()
    t.append(time.perf_counter())
    arm.step_no += 1
    return tuple(1e3 * (b - a) for a, b in zip(t, t[1:]))


def other_release() -> tuple[str, str]:
    """The row that flips what SPECSCOPE_OPENMP_RELEASE unset picks on this CPU (src/specscope/linalg/workers.py):
    its name and the setting it runs with."""
    if workers.releases_openmp():
        return "every step, OpenMP team left spinning", "off"
    return "every step, OpenMP team ended", "on"


def phases(rounds: int, block: int, consecutive: bool = False) -> None:
    """Per phase, the probed step (every step, default; and the same on torch's LAPACK) against the unprobed one,
    steps alternating (or, `consecutive`, each arm's `block` steps in a row), the arms' order rotating turn by turn
    (round by round when `consecutive`)."""
    arms = {"no monitor": Arm(None), "every step": Arm(1), TORCH_LAPACK: Arm(1)}
    timed = {k: (lambda a=a: phase_times(a)) for k, a in arms.items()}
    timed[TORCH_LAPACK] = with_env(timed[TORCH_LAPACK], SPECSCOPE_EIGH="torch")
    for a in arms.values():
        a.run(2)  # warm
    per_round = []
    mallocs = cuda_mallocs()
    names = list(timed)
    turn = 0  # the arms' order rotates turn by turn, so that each arm follows each other arm as often
    for r in range(rounds):
        got = {k: [] for k in arms}
        if consecutive:
            for k in names[r % 3:] + names[:r % 3]:
                got[k] += [timed[k]() for _ in range(block)]
        else:
            for _ in range(block):
                for k in names[turn % 3:] + names[:turn % 3]:
                    got[k].append(timed[k]())
                turn += 1
        per_round.append({k: [statistics.median(x[i] for x in v) for i in range(len(PHASES))] + [statistics.median(map(sum, v))]
                          for k, v in got.items()})
    how = "steps in a row per arm" if consecutive else "alternating steps"
    print(f"\n{rounds} rounds of {block} {how}; ms, median of the round medians [min–max]\n")
    print("| phase | no monitor | every step | difference | on torch's LAPACK | difference |\n|---|---:|---:|---:|---:|---:|")
    for i, ph in enumerate((*PHASES, "whole step")):
        none = [r["no monitor"][i] for r in per_round]
        cells = []
        for arm in ("every step", TORCH_LAPACK):
            probed = [r[arm][i] for r in per_round]
            diff = [p - n for p, n in zip(probed, none)]
            cells.append(f"{statistics.median(probed):.2f} | {statistics.median(diff):+.2f} [{min(diff):+.2f} – {max(diff):+.2f}]")
        print(f"| {ph} | {statistics.median(none):.2f} | {' | '.join(cells)} |")
    if DEVICE.type == "cuda":
        print(f"\ncudaMalloc calls over the {rounds * block} timed steps per arm: {cuda_mallocs() - mallocs} in all, during "
              "the finishing phases " + ", ".join(f"{k} {a.finish_mallocs}" for k, a in arms.items()))


def step_ms(arm: Arm) -> float:
    """One training step of `arm`, wall ms."""
    sync()
    t0 = time.perf_counter()
    arm.run(1)
    sync()
    return 1e3 * (time.perf_counter() - t0)


def ordinal(k: int) -> str:
    """2 -> "2nd", 10 -> "10th"."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def sparse(rounds: int, k: int, periods: int) -> None:
    """One measured step in k, timed step by step: a Monitor(every=k), an unprobed model and a Monitor(every=1) take
    turns step by step (the order rotating, so that each arm follows each other arm as often), `periods` periods of k
    steps per round. Per round, with medians over the round's steps:
    - the every-k arm against itself: its measured step's time over its unmeasured steps' time u gives m, and
      1 + m/(k·u) (the same model instance on both sides; an unmeasured step runs none of the Monitor's code);
    - against the unprobed model: each probed step minus the unprobed step of its turn, for the measured step (m₀),
      an unmeasured one (u₀) and the every-step arm's (m₁), and 1 + (m₀ + (k − 1)·u₀)/(k·t), t the unprobed step; a
      u₀ ≠ 0 is the two models' own difference (where their tensors lie in memory) plus noise;
    - "derived": 1 + m₁/(k·t), which assumes a measured step costs the same one step or k steps after the last."""
    kth, every = f"every {ordinal(k)}", "every step"
    arms = {"no monitor": Arm(None), kth: Arm(k), every: Arm(1)}
    for a in arms.values():
        a.run(k)  # warm: the every-k arm's next step is a measured one
    names = list(arms)
    rows = {key: [] for key in ("own", "ratio", "derived", "m", "m0", "u0", "m1", "none")}
    turn = 0  # counted over the whole run: the measured step's turn (j = 0) rotates too, period by period
    for _ in range(rounds):
        t = {name: [] for name in names}  # t[name][i]: the i-th turn's step, j = i % k its position in the period
        for _ in range(periods):
            for j in range(k):
                order = names[turn % 3:] + names[:turn % 3]  # each arm follows each other arm about as often
                turn += 1
                for name in order:
                    t[name].append(step_ms(arms[name]))
        med = statistics.median
        is_measured = [i % k == 0 for i in range(len(t[kth]))]
        own_m = med(x for x, first in zip(t[kth], is_measured) if first)
        own_u = med(x for x, first in zip(t[kth], is_measured) if not first)
        diff = [x - n for x, n in zip(t[kth], t["no monitor"])]
        m0 = med(d for d, first in zip(diff, is_measured) if first)
        u0 = med(d for d, first in zip(diff, is_measured) if not first)
        m1 = med(x - n for x, n in zip(t[every], t["no monitor"]))
        base = med(t["no monitor"])
        rows["own"].append(1 + (own_m - own_u) / (k * own_u))
        rows["ratio"].append(1 + (m0 + (k - 1) * u0) / (k * base))
        rows["derived"].append(1 + m1 / (k * base))
        for key, v in (("m", own_m - own_u), ("m0", m0), ("u0", u0), ("m1", m1), ("none", base)):
            rows[key].append(v)

    def cell(xs, fmt):
        return f"{format(statistics.median(xs), fmt)} [{format(min(xs), fmt)}–{format(max(xs), fmt)}]"

    print(f"\n{rounds} rounds of {periods} periods of {k} steps per arm, arms taking turns step by step; "
          "median [min–max] over rounds\n")
    print("| figure | value |\n|---|---:|")
    print(f"| unprobed step, ms | {cell(rows['none'], '.1f')} |")
    print(f"| {kth}: measured step, ms over its unmeasured steps | {cell(rows['m'], '+.1f')} |")
    print(f"| **{kth}, × its unmeasured steps** | **{cell(rows['own'], '.3f')}** |")
    print(f"| {kth}: measured step, ms over the unprobed step | {cell(rows['m0'], '+.1f')} |")
    print(f"| {kth}: unmeasured step, ms over the unprobed step | {cell(rows['u0'], '+.1f')} |")
    print(f"| {kth}, × no monitor | {cell(rows['ratio'], '.3f')} |")
    print(f"| {every}: measured step, ms over the unprobed step | {cell(rows['m1'], '+.1f')} |")
    print(f"| {kth} derived from every step, × no monitor | {cell(rows['derived'], '.3f')} |")


def op_counts() -> None:
    """Aten ops (views not counted) per phase of an unprobed and a measured step; on a CPU also with the accelerator's
    route forced (batched Krylov solves, matmul-only ‖G‖_*, CholeskyQR2), since a GPU's step is bound by launches."""
    from specscope.probe import estimators as E

    routes = {"as on this device": {}}
    if DEVICE.type == "cpu":
        routes["accelerator's route, forced on the CPU"] = dict(NUCLEAR_METHOD="polar", orthonormal=E.cholesky_qr,
                                                                solves_in_batches=lambda device: True)
    print("\naten ops dispatched per phase (views not counted; ops run on one-thread workers are not seen)\n")
    print("| route | monitor | forward | backward | finishing |\n|---|---|---:|---:|---:|")
    for route, patch in routes.items():
        saved = {k: getattr(E, k) for k in patch}
        for k, v in patch.items():
            setattr(E, k, v)
        try:
            for label, every in (("none", None), ("every step", 1)):
                arm = Arm(every)
                arm.run(3)  # warm blocks
                b = arm.batches[0]
                arm.opt.zero_grad(set_to_none=True)
                ctx = arm.monitor.step(arm.step_no) if arm.monitor else torch.enable_grad()
                loss = []
                fwd = dispatched_ops(lambda: (ctx.__enter__(), loss.append(
                    F.cross_entropy(arm.model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()))))
                bwd = dispatched_ops(lambda: loss[0].backward())
                fin = dispatched_ops(lambda: ctx.__exit__(None, None, None))
                print(f"| {route} | {label} | {fwd} | {bwd} | {fin} |")
        finally:
            for k, v in saved.items():
                setattr(E, k, v)


def profile(steps: int) -> None:
    """The finishing phase of `steps` measured steps, profiled three ways (see the module's `--profile`)."""
    import cProfile
    import io
    import pstats
    import warnings

    arm = Arm(1)
    arm.run(3)  # warm blocks

    def finishes(k: int, each=None) -> float:
        """k measured steps; the finishing phases' total wall ms, `each` wrapped around each."""
        total = 0.0
        for _ in range(k):
            b = arm.batches[arm.step_no % len(arm.batches)]
            arm.opt.zero_grad(set_to_none=True)
            ctx = arm.monitor.step(arm.step_no)
            ctx.__enter__()
            F.cross_entropy(arm.model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten()).backward()
            sync()
            t0 = time.perf_counter()
            if each is None:
                ctx.__exit__(None, None, None)
            else:
                each(lambda: ctx.__exit__(None, None, None))
            sync()
            total += time.perf_counter() - t0
            arm.opt.step()
            arm.monitor.pop_records()
            arm.step_no += 1
        return 1e3 * total

    mallocs = cuda_mallocs()
    print(f"\nfinishing, {steps} measured steps: {finishes(steps) / steps:.2f} ms each (wall, synchronised)"
          + (f"; cudaMalloc calls during them: {cuda_mallocs() - mallocs}" if DEVICE.type == "cuda" else ""))
    if Path("/proc/self/task").is_dir():
        print_thread_cpu(finishes, steps)
    prof = cProfile.Profile()
    finishes(steps, lambda fn: prof.runcall(fn))
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(30)
    print(f"\ncProfile of the finishing phase, {steps} steps, by cumulative host time (s):")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip() and not line.startswith("   Ordered")))
    if DEVICE.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                finishes(1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
        print(f"\nhost synchronisations in one finish: {sum(where.values())} (file:line of the call, times): "
              + ", ".join(f"{k} ×{n}" for k, n in where.most_common()))
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    total: dict[str, list[float]] = {}  # op: [calls, self host µs, self device µs], summed over the finishes

    def profiled(fn) -> None:
        with torch.profiler.profile(activities=acts) as tp:
            fn()
            sync()
        for e in tp.key_averages():
            row = total.setdefault(e.key, [0, 0.0, 0.0])
            row[0] += e.count
            row[1] += e.self_cpu_time_total
            row[2] += getattr(e, "self_device_time_total", 0.0)

    finishes(steps, profiled)
    for col, what in ([(2, "device")] if DEVICE.type == "cuda" else []) + [(1, "host")]:
        top = sorted(total.items(), key=lambda kv: -kv[1][col])[:25]
        print(f"\ntorch.profiler, the finishing phase, by self {what} time (per finish, µs)\n")
        print("| op | calls | self host | self device |\n|---|---:|---:|---:|")
        for name, (n, host, dev) in top:
            print(f"| {name[:70]} | {n / steps:.0f} | {host / steps:.0f} | {dev / steps:.0f} |")


def _thread_cpu_ms() -> dict[int, float]:
    """CPU time (ms) of each thread of this process, from /proc (Linux): the scheduler's nanosecond count
    (schedstat) where the kernel keeps it, else user + system time at the kernel's tick resolution (stat)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0]) / 1e6
        except (OSError, ValueError, IndexError):
            try:
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                out[int(tid)] = (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")
            except OSError:  # the thread ended meanwhile
                continue
    return out


def print_thread_cpu(finishes, steps: int) -> None:
    """CPU time per thread during the finishing phases of `steps` measured steps, per finish: the caller, the
    one-thread workers (linalg.workers) and the process's other threads (the caller's OpenMP team, which spins for a
    while after each parallel region): where the finish's CPU goes, beside its wall time; and the cores kept busy
    (all of it over the finishes' wall time: below the core count, some core sat idle)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    caller = threading.get_native_id()
    total: dict[int, float] = {}

    def measured(fn) -> None:
        before = _thread_cpu_ms()
        fn()
        for tid, ms in _thread_cpu_ms().items():
            total[tid] = total.get(tid, 0.0) + ms - before.get(tid, 0.0)

    wall = finishes(steps, measured)
    groups: dict[str, float] = {}
    for tid, ms in total.items():
        name = names.get(tid, "")
        label = "caller" if tid == caller else "workers" if name.startswith("specscope-worker") else "other threads"
        groups[label] = groups.get(label, 0.0) + ms
    print("CPU per finish (ms, /proc): "
          + ", ".join(f"{k} {groups.get(k, 0.0) / steps:.1f}" for k in ("caller", "workers", "other threads"))
          + f"; cores busy (all threads' CPU / wall) {sum(groups.values()) / wall:.2f} of {os.cpu_count()}")


def step_tensors() -> tuple[Arm, list[torch.Tensor], list[torch.Tensor]]:
    """An unprobed arm after four steps, with its last step's weight gradients and distinct Linear inputs."""
    arm = Arm(None)
    arm.run(3)
    inputs: dict[int, torch.Tensor] = {}

    def keep(module, args, out) -> None:  # q, k, v read one input: kept once
        inputs.setdefault(args[0].data_ptr(), args[0].detach().flatten(0, -2))

    hooks = [m.register_forward_hook(keep) for m in arm.model.modules() if isinstance(m, torch.nn.Linear)]
    arm.run(1)
    for h in hooks:
        h.remove()
    return arm, [p.grad for p in arm.model.parameters() if p.ndim >= 2 and p.grad is not None], list(inputs.values())


def floor_candidates(block: int) -> dict:
    """The unprobed step and the exact estimates' arithmetic on one step's gradients and inputs."""
    from specscope.linalg import nuclear_norms, workers
    from specscope.probe.estimators import BLOCK, _initial_block, gradient_spectra_later, krylov_top, verified_top

    arm, grads, As = step_tensors()
    by_shape: dict[tuple, list] = {}  # the inputs of one shape solved together, as the Monitor solves them
    for A in As:
        by_shape.setdefault(tuple(A.shape), []).append((A, verified_top(A, _initial_block(A.shape[-1], BLOCK, A.device), 4)[1]))

    def st_all():
        for same in by_shape.values():
            if DEVICE.type != "cpu":
                krylov_top(torch.stack([A for A, _ in same]), torch.stack([V for _, V in same]), depth=0)
                continue
            for run in workers.cache_chunks([A.numel() * A.element_size() for A, _ in same]):  # as the Monitor's job
                krylov_top([same[i][0] for i in run], torch.stack([same[i][1] for i in run]), depth=0)

    def both():
        spectra = gradient_spectra_later(grads)
        workers.start(lambda _: st_all(), [None], device=DEVICE, first=True)()
        spectra()

    print(f"floor: {len(grads)} gradients {sorted({tuple(g.shape) for g in grads})}, {len(As)} distinct inputs "
          f"{sorted({tuple(A.shape) for A in As})}")
    return {"no monitor": lambda: arm.run(block),
            "exact nr(G), every gradient": lambda: [nuclear_norms(grads) for _ in range(block)],
            "st(A), depth-0 Krylov per input": lambda: [st_all() for _ in range(block)],
            "both, as a measured step finishes them": lambda: [both() for _ in range(block)],
            "both, on torch's LAPACK": with_env(lambda: [both() for _ in range(block)], SPECSCOPE_EIGH="torch")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ratios: median and min–max over them)")
    ap.add_argument("--block", type=int, default=10,
                    help="training steps per call; a multiple of 10 also times 'every 10th' (one measured step per call)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (one GPU: the CUDA rows, graphs included)")
    ap.add_argument("--floor", action="store_true",
                    help="time instead only what an exact measured step cannot skip: exact nr(G) of every gradient and "
                         "a depth-0 st(A) solve per input, on one real step's tensors; prints 'floor: 1 + both'")
    ap.add_argument("--phases", action="store_true", help="time forward, backward, finishing (the measurement's own phase) "
                                                          "and the optimizer step apart, probed against unprobed steps")
    ap.add_argument("--consecutive", action="store_true", help="with --phases: each arm runs its --block steps in a row "
                                                               "(as the ratio runs do) instead of the arms alternating step by step")
    ap.add_argument("--sparse", type=int, default=None, metavar="K",
                    help="time one measured step in K step by step, each probed step against the unprobed step beside it "
                         "(--periods periods of K steps per round), and a measured step of an every-step Monitor")
    ap.add_argument("--periods", type=int, default=5, help="with --sparse: periods of K steps per arm per round")
    ap.add_argument("--ops", action="store_true", help="count the aten ops each phase dispatches instead of timing (views "
                                                       "not counted; on a GPU about its kernel launches), on this "
                                                       "device's route and, on a CPU, on the accelerator's route forced")
    ap.add_argument("--profile", action="store_true", help="profile the finishing phase of --block measured steps instead "
                                                           "of timing: cProfile, host synchronisations (CUDA), torch.profiler")
    ap.add_argument("--d-model", type=int, default=CFG["d_model"],
                    help="model width; a tiny model (--d-model 32 --seq-len 16 --batch 2) leaves the probe's host time: "
                         "what a measured step costs where the device's arithmetic is nearly free")
    ap.add_argument("--seq-len", type=int, default=CFG["seq_len"], help="tokens per sequence")
    ap.add_argument("--moe", type=int, default=0, metavar="E",
                    help="train transformers' Mixtral of the same width, depth and heads instead, E experts a layer (2 per "
                         "token, inner width 2·d): what measuring every expert apart costs")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    args = parse(ap)
    if args.sparse is not None and args.sparse < 2:
        ap.error(f"--sparse {args.sparse}: K is the measuring interval, an int >= 2 (--sparse 10: one measured step in ten)")
    if args.periods < 1:
        ap.error(f"--periods {args.periods}: an int >= 1")
    if args.moe == 1 or args.moe < 0:
        ap.error(f"--moe {args.moe}: the experts a layer, an int >= 2 (each token goes to 2 of them), or 0 for the GPT")
    global DEVICE, BATCH, MOE
    DEVICE = torch.device(args.device)
    MOE = args.moe
    CFG.update(d_model=args.d_model, seq_len=args.seq_len)
    BATCH = args.batch
    if args.threads:
        torch.set_num_threads(args.threads)
    what = f"Mixtral ({MOE} experts a layer, 2 per token)" if MOE else "GPT"
    print(f"torch {torch.__version__}, {DEVICE}, {torch.get_num_threads()} threads, {load_average()}; {what} {CFG}, batch {BATCH}")
    if args.sparse:
        sparse(args.rounds, args.sparse, args.periods)
        return
    if args.phases:
        phases(args.rounds, args.block, args.consecutive)
        return
    if args.ops:
        op_counts()
        return
    if args.profile:
        profile(args.block)
        return
    if args.floor:
        res = interleaved(floor_candidates(args.block), "no monitor", rounds=args.rounds, repeats=1, warmup=1, sync=sync)
        print(f"\n{args.rounds} rounds of {args.block} steps\n\n| per step | ms | × no monitor, median [min–max] |\n|---|---:|---:|")
        for k, t in res.items():
            print(f"| {k} | {t.ms / args.block:.1f} | {t.ratio_text()} |")
        for name, row in (("floor: 1 + both", "both, as a measured step finishes them"),
                          ("floor on torch's LAPACK", "both, on torch's LAPACK")):
            floor = [1 + r for r in res[row].ratios]
            print(f"| {name} | | {statistics.median(floor):.3f} [{min(floor):.3f}–{max(floor):.3f}] |")
        return
    arms = {"no monitor": Arm(None), "every step (default: gram)": Arm(1), "every step, estimator='power'": Arm(1, estimator="power"),
            TORCH_LAPACK: Arm(1)}
    flipped, value = other_release()
    arms[flipped] = Arm(1)
    if DEVICE.type == "cuda":
        arms[GRAPHS] = Arm(1)
    if args.block % 10 == 0:
        arms["every 10th"] = Arm(10)
    calls = {k: (lambda a=a: a.run(args.block)) for k, a in arms.items()}
    calls[TORCH_LAPACK] = with_env(calls[TORCH_LAPACK], SPECSCOPE_EIGH="torch")
    calls[flipped] = with_env(calls[flipped], SPECSCOPE_OPENMP_RELEASE=value)
    if GRAPHS in calls:
        calls[GRAPHS] = with_env(calls[GRAPHS], SPECSCOPE_CUDA_GRAPHS="on")
    res = interleaved(calls, "no monitor",
                      rounds=args.rounds, repeats=1, warmup=1, sync=sync)
    one = res["every step (default: gram)"]
    print(f"\n{args.rounds} rounds of {args.block} steps per candidate\n\n| Monitor | ms / step | × no monitor, median [min–max over rounds] |\n|---|---:|---:|")
    for k, t in res.items():
        print(f"| {k} | {t.ms / args.block:.0f} | {t.ratio_text()} |")
    for k in (10, 100):
        derived = [1 + (r - 1) / k for r in one.ratios]
        print(f"| every {k}th (derived) | | {statistics.median(derived):.3f} [{min(derived):.3f}–{max(derived):.3f}] |")


if __name__ == "__main__":
    main()
