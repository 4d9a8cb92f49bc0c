"""What recording costs: N records written 200 per `append` (one "step" of a 33-layer model with 6 metrics)
at each `flush_every`, then `close()`, `load` of the whole run and of one layer and metric, and the file size.

    .venv/bin/python benchmarks/store_write.py --records 1000000

One pass per setting, the settings one after another (each writes its own run); the load times are the median of
three reads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _timing import load_average, parse  # noqa: E402

from specscope.records import Record  # noqa: E402
from specscope.store import Run, load  # noqa: E402


def step_records(s: int) -> list[Record]:
    return [Record(s, f"blocks.{i % 33}.mlp", f"m{i % 6}", s / (i + 1), estimator="gram", rows=64, shape="64x64")
            for i in range(200)]


def median_seconds(fn, times: int = 3) -> float:
    out = []
    for _ in range(times):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def one_setting(root: str, records: int, flush_every: int) -> str:
    steps = [step_records(s) for s in range(records // 200)]  # made before the clock starts
    t = time.perf_counter()
    with Run.create(root, "bench", {}, flush_every=flush_every) as run:
        for batch in steps:
            run.append(batch)
    wrote = time.perf_counter() - t
    path = run.path
    whole = median_seconds(lambda: load(path))
    some = median_seconds(lambda: load(path, layer="blocks.0.mlp", metric="m0"))
    rows = len(load(path, layer="blocks.0.mlp", metric="m0"))
    size = Path(run.metrics_path).stat().st_size / 2**20
    return (f"| {flush_every} | {records / wrote / 1e3:.0f}k | {1e6 * wrote / len(steps):.0f} | {whole:.1f} | "
            f"{1e3 * some:.0f} ({rows} rows) | {size:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000, help="records to write, 200 per step (at least 200)")
    ap.add_argument("--flush-every", type=int, nargs="+", default=[100, 1000, 10000])
    args = parse(ap)
    if args.records < 200:
        ap.error(f"--records {args.records}: give at least 200 (one step of 200 records)")
    print(f"{args.records} records, {load_average()} at start\n")
    print("| flush_every | records/s written | µs per 200-record step | load all (s) | load one layer+metric (ms) | file (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for every in args.flush_every:
        with tempfile.TemporaryDirectory() as tmp:
            print(one_setting(tmp, args.records, every), flush=True)


if __name__ == "__main__":
    main()
