"""Interleaved timing for the benchmarks: ratios against a baseline timed in the same run.

The machine the figures come from is shared and noisy, so a single median is not a figure. Every
benchmark times its candidates round-robin (baseline, a, b, …, then a, b, …, baseline: each round's turn starts one
candidate later), takes the median
of each candidate's repeats within a round, divides by the baseline's median of the same round, and
reports the median and min–max of that ratio over its rounds (≥ 3 for a figure; 1 is a dry run), with the load
average at the start.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """One candidate's figures: median ms over all repeats, and its ratio to the baseline per round."""

    name: str
    ms: float
    ratios: tuple[float, ...]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.ratios), max(self.ratios)

    def ratio_text(self) -> str:
        lo, hi = self.spread
        return f"{_figure(self.ratio)} [{_figure(lo)}–{_figure(hi)}]"


def _figure(x: float) -> str:
    """A ratio with two decimals, or two significant digits below 0.1 (0.0078, not 0.01; no exponent)."""
    if abs(x) >= 0.095 or x == 0:
        return f"{x:.2f}"
    digits = 1 - math.floor(math.log10(abs(x)))  # two significant ones
    return f"{x:.{digits}f}"


def with_env(fn: Callable[[], object], **env: str) -> Callable[[], object]:
    """fn run with os.environ updated by env (restored after): one arm's setting inside an interleaved run, e.g.
    SPECSCOPE_EIGH="torch" for the exact routes on torch's LAPACK (src/specscope/linalg/lapack.py)."""
    def run():
        before = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in before.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return run


def load_average() -> str:
    """The 1-minute load average and the core count, e.g. "load 0.42 on 2 cores"."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not on every platform
        return f"load unknown on {os.cpu_count()} cores"
    return f"load {load:.2f} on {os.cpu_count()} cores"


def eta(call_ms, calls: int) -> str:
    """How long `calls` calls of each candidate take, from one call's ms per candidate, e.g. "about 4 min"."""
    s = calls * sum(call_ms) / 1e3
    if s < 1:
        return "under a second"
    return f"about {s:.0f} s" if s < 99.5 else f"about {s / 60:.0f} min" if s < 5970 else f"about {s / 3600:.1f} h"


def _ms(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3


def interleaved(candidates: dict[str, Callable[[], object]], baseline: str, *, rounds: int = 3, repeats: int = 3,
                warmup: int = 1, sync: Callable[[], None] = lambda: None,
                first_ms: dict[str, float] | None = None) -> dict[str, Timing]:
    """Time every candidate round-robin; ratios are to `baseline`'s median in the same round.

    `sync` is called around each call (torch.cuda.synchronize on a GPU). Each round runs every
    candidate `repeats` times in turn (a, b, c, a, b, c, …), so slow drifts of the machine hit all
    candidates alike; round r starts the turn at the r-th candidate (b, c, a in the second round …), so over
    as many rounds as there are candidates each takes every place in the turn once, and no candidate
    always runs after the same other (whose warm caches or spinning threads it would inherit).
    Before the rounds it prints to stderr how long they will take, from each candidate's last warm-up call (or from
    `first_ms`, one call's ms per candidate timed by the caller, where warmup=0).
    """
    if baseline not in candidates:
        raise ValueError(f"baseline {baseline!r} is not among the candidates {sorted(candidates)}")
    if rounds < 1 or repeats < 1:
        raise ValueError(f"rounds={rounds} and repeats={repeats} must both be >= 1")
    once = dict(first_ms or {})
    for name, fn in candidates.items():
        for _ in range(warmup):
            once[name] = _ms(fn, sync)
    if once:
        print(f"  {len(candidates)} candidates, {rounds} rounds of {repeats}: {eta(once.values(), rounds * repeats)}",
              file=sys.stderr, flush=True)
    times: dict[str, list[list[float]]] = {n: [] for n in candidates}
    names = list(candidates)
    for r in range(rounds):
        this: dict[str, list[float]] = {n: [] for n in candidates}
        turn = names[r % len(names):] + names[:r % len(names)]
        for _ in range(repeats):
            for name in turn:
                this[name].append(_ms(candidates[name], sync))
        for name in candidates:
            times[name].append(this[name])
    out = {}
    for name in candidates:
        ratios = tuple(statistics.median(r) / statistics.median(b) for r, b in zip(times[name], times[baseline]))
        out[name] = Timing(name, statistics.median(t for r in times[name] for t in r), ratios)
    return out


# aten ops that only make a view (no kernel runs for them); everything else dispatched is counted
_VIEW_OPS = {"view", "_unsafe_view", "expand", "transpose", "permute", "select", "slice", "t", "alias", "unsqueeze",
             "squeeze", "as_strided", "diagonal", "detach", "split", "unbind", "reshape", "promote_types"}


def dispatched_ops(fn: Callable[[], object]) -> int:
    """How many aten ops fn() dispatches on the calling thread, views not counted: on a GPU, where a small step
    is bound by kernel launches rather than flops, about the number of launches (a multi-tensor `_foreach_*` op
    counts once). Ops that one-thread workers run are not seen."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "aten" and func.__name__.split(".")[0] not in _VIEW_OPS:
                self.n += 1
            return func(*args, **(kwargs or {}))

    with _Count() as c:
        fn()
    return c.n


# Options that count something (rounds, steps, sizes): a whole number ≥ 1, or ≥ 0 where 0 means "off".
AT_LEAST_1 = {"rounds", "repeats", "block", "periods", "steps", "records", "measurements", "threads", "dims", "d_model",
              "seq_len", "batch", "n_probe", "dim", "ranks", "every", "flush_every", "rf_steps", "probe_block",
              "phase_rounds", "sparse", "channels", "kernel", "size"}
AT_LEAST_0 = {"baseline_only", "moe"}


def parse(ap: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """ap.parse_args(), then one argparse error (exit 2) for a count below its range (--rounds 0, --block -2: a loop
    that ran nothing printed ratios) or a --device this machine has not (cuda without a GPU: torch's AssertionError)."""
    args = ap.parse_args(argv)
    for key, value in vars(args).items():
        low = 1 if key in AT_LEAST_1 else 0 if key in AT_LEAST_0 else None
        if low is None or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v < low:
                ap.error(f"--{key.replace('_', '-')} {v}: give a whole number ≥ {low}")
    device = getattr(args, "device", None)
    if device is not None:
        import torch

        try:
            kind = torch.device(device).type
        except (RuntimeError, ValueError):
            ap.error(f"--device {device!r} is no torch device; give cpu or cuda")
        if kind == "cuda" and not torch.cuda.is_available():
            ap.error(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}); run on cpu")
        if kind not in ("cpu", "cuda"):
            ap.error(f"--device {device}: the benchmarks run on cpu or cuda")
    return args
