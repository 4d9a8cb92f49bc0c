"""What the reader's integrity check costs: SQLite's quick_check alone, and the rows read without it, against
`load(run)` (quick_check, read, DataFrame) on a finished run of N records. Ratios from interleaved rounds
(benchmarks/_timing.py).

    .venv/bin/python benchmarks/store_read.py --records 200000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, load_average  # noqa: E402

from specscope.records import Record  # noqa: E402
from specscope.store import Run, load, sqlite  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(load_average())
    with tempfile.TemporaryDirectory() as tmp:
        with Run.create(tmp, "bench", {}) as run:
            for s in range(args.records // 200):  # one "step" of a 33-layer model with 6 metrics
                run.append(Record(s, f"blocks.{i % 33}.mlp", f"m{i % 6}", s / (i + 1), estimator="gram", rows=64,
                                  shape="64x64") for i in range(200))
        run = Run.open(run.path)

        def unchecked():
            with run.reader(check=False) as (con, _):
                sqlite.read_rows(con, run.metrics_path, {}, False)

        def quick_check_only():
            with run.reader(check=True):
                pass

        def integrity_check_only():
            with run.reader(check=False) as (con, _):
                con.execute("PRAGMA integrity_check(1)").fetchone()

        res = interleaved({"load(run)": lambda: load(run), "rows, no check": unchecked,
                           "quick_check alone": quick_check_only, "integrity_check alone": integrity_check_only},
                          "load(run)", rounds=args.rounds)
        print(f"{args.records} records, {run.metrics_path.stat().st_size / 2**20:.0f} MiB")
    for t in res.values():
        print(f"{t.name:22s} {t.ms:9.1f} ms  x{t.ratio_text()}")


if __name__ == "__main__":
    main()
