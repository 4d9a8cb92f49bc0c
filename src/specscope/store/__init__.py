"""Run directories on disk: `runs/<lab>/<run_id>/` with config.json, metrics.sqlite (WAL, batched),
checkpoints/, figures/, summary.json and report.html. See docs/store.md.

    run = Run.create("runs", "random-features", cfg)   # or: with Run.create(...) as run:
    run.append(records); run.log(step, {"loss": loss}); run.close()
    df = load(run)            # pandas: run_id, step, layer, metric, value, arm, estimator, rows, shape, flag
    list_runs("runs")         # run_id, lab, status, created, steps, records, path (newest first)
"""

from specscope.store.deps import MissingDependencyError
from specscope.store.readers import export, find_run, list_runs, load
from specscope.store.run import STATUSES, Run, new_run_id
from specscope.store.tensorboard import TensorBoardSink

__all__ = ["Run", "load", "list_runs", "export", "find_run", "new_run_id", "STATUSES", "TensorBoardSink",
           "MissingDependencyError"]
