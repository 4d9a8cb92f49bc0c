"""What the reader's checks cost, against `load(run)` (SQLite's integrity_check, the rows read, their checksums
verified, the record counts checked, the DataFrame) on a finished run of N records: the rows read and verified
without the integrity check, the record checksums alone (store.checksum), and SQLite's quick_check and
integrity_check alone. Ratios from interleaved rounds (benchmarks/_timing.py).

    .venv/bin/python benchmarks/store_read.py --records 200000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, load_average, parse  # noqa: E402

import pandas as pd  # noqa: E402

from specscope.records import Record  # noqa: E402
from specscope.store import Run, checksum, load, sqlite  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = parse(ap)
    print(load_average())
    with tempfile.TemporaryDirectory() as tmp:
        with Run.create(tmp, "bench", {}) as run:
            for s in range(args.records // 200):  # one "step" of a 33-layer model with 6 metrics
                run.append(Record(s, f"blocks.{i % 33}.mlp", f"m{i % 6}", s / (i + 1), estimator="gram", rows=64,
                                  shape="64x64") for i in range(200))
        run = Run.open(run.path)

        with run.reader(check=False) as (con, _):
            rows, _ = sqlite.read_rows(con, run.metrics_path, {}, False)
        frame = pd.DataFrame.from_records(rows, columns=[*sqlite.COLUMNS, *sqlite.READ_CHECKS])

        def unchecked():  # the rows read, as a DataFrame, their checksums verified: load less SQLite's check
            with run.reader(check=False) as (con, _):
                got, _ = sqlite.read_rows(con, run.metrics_path, {}, False)
            sqlite.verify(pd.DataFrame.from_records(got, columns=[*sqlite.COLUMNS, *sqlite.READ_CHECKS]),
                          run.metrics_path, False)

        def pragma(name):
            def check():
                with run.reader(check=False) as (con, _):
                    con.execute(f"PRAGMA {name}(1)").fetchone()
            return check

        res = interleaved({"load(run)": lambda: load(run), "rows, no integrity check": unchecked,
                           "record checksums alone": lambda: checksum.mismatched(frame),
                           "quick_check alone": pragma("quick_check"), "integrity_check alone": pragma("integrity_check")},
                          "load(run)", rounds=args.rounds)
        print(f"{args.records} records, {run.metrics_path.stat().st_size / 2**20:.0f} MiB")
    for t in res.values():
        print(f"{t.name:26s} {t.ms:9.1f} ms  x{t.ratio_text()}")


if __name__ == "__main__":
    main()
