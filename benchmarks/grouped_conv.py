"""A measured step on a depthwise convolution, against an unprobed step: the cost of st(A) per group.

A grouped convolution's st(A) is Σ_g ‖A_g‖_F² / max_g ‖A_g‖₂², from statistics kept per group (docs/probe.md,
"What it pairs"). The candidates, interleaved (`_timing.interleaved`):
- no monitor: forward and backward of the conv alone;
- gram (the default): every group's Gram by one batched product, solved with the other Grams of its size;
- power: every group's warm block iterated at once (`estimators.GroupedPowerStats`);
- power, one group at a time: the same estimate by one `PowerStats` per group (`GroupedStats` of them, a Python
  loop over the groups), the way `power` ran before its groups were batched.

    .venv/bin/python benchmarks/grouped_conv.py --rounds 4 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved, load_average, parse  # noqa: E402

from specscope.probe import Monitor  # noqa: E402
from specscope.probe import estimators as E  # noqa: E402


def looped_power(monitor: Monitor) -> Monitor:
    """`monitor` (estimator="power") with a grouped conv's statistics kept as one PowerStats per group."""
    def new_stats(kind: str, n: int, groups: int = 1):
        st = (E.GroupedStats([E.PowerStats(n) for _ in range(groups)]) if groups > 1 else
              E.make_stats(kind, n, "power"))
        st.reset(refine=True)
        return st

    monitor._new_stats = new_stats  # what the Monitor hands its watch when a step starts
    return monitor


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=512, help="channels = groups (depthwise)")
    ap.add_argument("--kernel", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=14, help="height = width of the input")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = parse(ap, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = load_average()
    torch.manual_seed(0)
    c = args.channels
    conv = nn.Conv2d(c, c, args.kernel, groups=c, padding=args.kernel // 2)
    x = torch.randn(args.batch, c, args.size, args.size)
    monitors = {"gram (default)": Monitor(conv, estimator="gram"), "power": Monitor(conv, estimator="power"),
                "power, one group at a time": looped_power(Monitor(conv, estimator="power"))}
    steps = dict.fromkeys(monitors, 0)

    def unprobed():
        conv(x).square().mean().backward()
        conv.zero_grad(set_to_none=True)

    def measured(name: str):
        def step():
            with monitors[name].step(steps[name]):
                conv(x).square().mean().backward()
            conv.zero_grad(set_to_none=True)
            monitors[name].pop_records()
            steps[name] += 1
        return step

    base = "no monitor"
    t = interleaved({base: unprobed, **{n: measured(n) for n in monitors}}, base, rounds=args.rounds,
                    repeats=args.repeats, warmup=2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load} at start; Conv2d({c}, {c}, "
          f"{args.kernel}, groups={c}), batch {args.batch} at {args.size}×{args.size}; {args.rounds} interleaved rounds "
          f"of {args.repeats}\n")
    print("| step | ms | × no monitor, median [min–max] |\n|---|---:|---:|")
    for name, r in t.items():
        print(f"| {name} | {r.ms:.1f} | {r.ratio_text()} |")


if __name__ == "__main__":
    main()
