"""Mirror appended records to TensorBoard (optional: needs the `tensorboard` package, extra `tensorboard`).

    run.add_sink(TensorBoardSink(run.path / "tensorboard"))

The run's metrics.sqlite stays the record of truth; TensorBoard is a live view of it.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from specscope.records import Record
from specscope.store.deps import require


def tag(r: Record) -> str:
    """`arm/metric/layer` without the empty parts, e.g. "muon/stable_rank/blocks.0.attn.q" or "loss"."""
    return "/".join(p for p in (r.arm, r.metric, r.layer) if p)


class TensorBoardSink:
    """Calls `writer.add_scalar(tag(r), r.value, r.step)` for every record handed to it.

    `writer` defaults to a `torch.utils.tensorboard.SummaryWriter(log_dir)`, imported only here, so
    specscope works without tensorboard; asking for the sink without it raises MissingDependencyError.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer: Any = None):
        if writer is None:
            require("tensorboard", "tensorboard", "TensorBoardSink")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        self.writer = writer

    def __call__(self, records: Iterable[Record]) -> None:
        for r in records:
            self.writer.add_scalar(tag(r), r.value, r.step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
