"""The optional TensorBoard sink: tags, lazy import, clear error without the package."""

import importlib.util
import math

import pytest

from specscope.records import Record
from specscope.store import MissingDependencyError, Run, TensorBoardSink, load
from specscope.store.tensorboard import tag


class FakeWriter:
    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_sink_mirrors_appended_records(tmp_path):
    writer = FakeWriter()
    with Run.create(tmp_path, "demo", {}) as run:
        run.add_sink(TensorBoardSink(writer=writer))
        run.append([Record(1, "blocks.0.attn.q", "stable_rank", 3.5, arm="muon")])
        run.log(2, {"loss": 0.25})
    assert writer.scalars == [("muon/stable_rank/blocks.0.attn.q", 3.5, 1), ("loss", 0.25, 2)]
    assert writer.closed and len(load(run)) == 2  # the store still has everything


def test_tag():
    assert tag(Record(0, "", "val_loss", 1.0, arm="adamw")) == "adamw/val_loss"


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_missing_tensorboard_is_a_clear_error(tmp_path):
    with pytest.raises(MissingDependencyError, match=r"pip install 'specscope\[tensorboard\]'"):
        TensorBoardSink(tmp_path)


def test_real_summary_writer(tmp_path):
    pytest.importorskip("tensorboard")
    sink = TensorBoardSink(tmp_path / "tb")
    sink([Record(0, "w", "stable_rank", 2.0), Record(1, "w", "stable_rank", math.nan)])
    sink.close()
    assert any((tmp_path / "tb").iterdir())
