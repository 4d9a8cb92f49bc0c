"""Bad input to a Run is one clear error and loses nothing already logged; a failed flush keeps its records."""

import json
import math
import re
import sqlite3
from pathlib import Path

import pytest

from specscope.errors import ConfigError, RunStoreError
from specscope.records import Record
from specscope.store import Run, load
from specscope.store import sqlite as store_sqlite

np = pytest.importorskip("numpy")


def steps(run) -> list[int]:
    return load(run.path).step.tolist()


# ---- steps ---------------------------------------------------------------------------------------------


def test_a_step_sqlite_cannot_store_is_refused_and_the_buffered_records_are_kept(tmp_path):
    run = Run.create(tmp_path, "lab", {}, run_id="a1")
    for s in range(5):
        run.log(s, {"loss": 0.5})
    run.flush()
    for s in range(5, 10):
        run.log(s, {"loss": 0.5})
    with pytest.raises(ConfigError, match=r"step 9223372036854775808 \(int\) is not an int from 0 to 2\*\*63 - 1"):
        run.log(2**63, {"loss": 0.5})
    run.log(np.int64(10), {"loss": 0.5})
    run.log(2**63 - 1, {"loss": 0.5})  # the largest step SQLite stores
    run.close()
    assert run.status == "complete" and steps(run) == [*range(11), 2**63 - 1]


@pytest.mark.parametrize("step", [1.5, 2.0, "3", -1, True, None, 2**63, np.float64(2.0), np.bool_(True)])
def test_a_step_that_is_not_an_int_in_range_is_refused(tmp_path, step):
    with Run.create(tmp_path, "lab", {}) as run:
        run.log(0, {"loss": 1.0})
        with pytest.raises(ConfigError, match=r"record 'loss': step .* is not an int from 0 to 2\*\*63 - 1; pass"):
            run.log(step, {"loss": 2.0})
    assert load(run.path).value.tolist() == [1.0]


def test_one_bad_record_refuses_its_call_and_nothing_else(tmp_path):
    with Run.create(tmp_path, "lab", {}) as run:
        run.append([Record(0, "", "a", 1.0)])
        with pytest.raises(ConfigError, match="step -1"):
            run.append([Record(1, "", "a", 1.0), Record(-1, "", "a", 1.0)])
    assert steps(run) == [0]


@pytest.mark.parametrize("record,named", [
    (Record(0, "", "a", "1.5"), r"value '1.5' \(str\) is not a number"),
    (Record(0, "", "a", None), r"value None \(NoneType\) is not a number"),
    (Record(0, "", "a", 1.0, rows=2**63), r"rows 9223372036854775808 \(int\) is not an int"),
    (Record(0, "", "a", 1.0, rows=2.5), r"rows 2.5 \(float\) is not an int"),
    (Record(0, "", "a", 10**400), r"value 1000.* \(int\) is not a number within float64's range"),
    (Record(0, "emb.\udcff", "a", 1.0), r"its layer 'emb.\\udcff' is no valid text .*pass a name that encodes as UTF-8"),
    (Record(0, "", "a", 1.0, arm="\ud800"), r"its arm '\\ud800' is no valid text"),
])
def test_a_record_with_an_unstorable_value_or_rows_is_refused(tmp_path, record, named):
    """A name holding a lone surrogate was buffered, and every later flush and the close failed encoding it: the
    records buffered before and after it were lost and the run never closed. 10**400 raised OverflowError."""
    with Run.create(tmp_path, "lab", {}, flush_every=10**6) as run:
        run.log(0, {"before": 1.0})
        with pytest.raises(ConfigError, match=named):
            run.append([record])
        run.log(1, {"after": 1.0})
    assert steps(run) == [0, 1] and run.status == "complete"


# ---- a failed flush -------------------------------------------------------------------------------------


def _fail_once(monkeypatch, error: BaseException):
    raised = []

    def fault_point(name):
        if not raised:
            raised.append(name)
            raise error

    monkeypatch.setattr(store_sqlite, "fault_point", fault_point)  # just before the batch's COMMIT


@pytest.mark.parametrize("error,expected", [(sqlite3.OperationalError("disk I/O error"), RunStoreError),
                                            (KeyboardInterrupt(), KeyboardInterrupt)])
def test_a_failed_flush_keeps_its_records_for_the_next_one(tmp_path, monkeypatch, error, expected):
    run = Run.create(tmp_path, "lab", {}, flush_every=10**6, flush_seconds=math.inf)
    for s in range(5):
        run.log(s, {"loss": 0.5})
    _fail_once(monkeypatch, error)
    with pytest.raises(expected):
        run.flush()
    assert steps(run) == []  # the half batch was rolled back
    run.log(5, {"loss": 0.5})
    run.flush()
    run.close()
    assert steps(run) == list(range(6)) and run.status == "complete"


def test_a_failed_close_can_be_retried_without_losing_records(tmp_path, monkeypatch):
    run = Run.create(tmp_path, "lab", {}, flush_every=10**6, flush_seconds=math.inf)
    run.log(0, {"loss": 0.5})
    _fail_once(monkeypatch, sqlite3.OperationalError("disk I/O error"))
    with pytest.raises(RunStoreError, match="cannot append records"):
        run.close()
    run.close()
    assert steps(run) == [0] and Run.open(run.path).status == "complete"


# ---- arguments that are not what a method takes ---------------------------------------------------------


def test_log_values_must_be_a_mapping(tmp_path):
    with Run.create(tmp_path, "lab", {}) as run:
        with pytest.raises(ConfigError, match=r"log: the values 1.0 \(float\) are not a dict; .*run.log\(step, "):
            run.log(0, 1.0)


@pytest.mark.parametrize("records,named", [([1, 2], r"append got 1 \(int\), not a specscope.records.Record"),
                                           (5, r"append got 5 \(int\): pass a list of specscope.records.Record"),
                                           ({"loss": 1.0}, r"append got 'loss' \(str\), not a")])
def test_append_takes_records(tmp_path, records, named):
    with Run.create(tmp_path, "lab", {}) as run:
        with pytest.raises(ConfigError, match=named):
            run.append(records)


def test_append_takes_a_single_record(tmp_path):
    with Run.create(tmp_path, "lab", {}) as run:
        run.append(Record(4, "w", "stable_rank", 2.0))
    assert load(run)[["step", "layer", "value"]].values.tolist() == [[4, "w", 2.0]]


def test_delete_after_and_rewind_take_ints(tmp_path):
    with Run.create(tmp_path, "lab", {}) as run:
        run.log(0, {"a": 1.0})
        with pytest.raises(ConfigError, match=r"delete_after: step 'x' \(str\) is not an int from -1"):
            run.delete_after("x")
        with pytest.raises(ConfigError, match=r"rewind: position 1.5 \(float\) is not an int >= 0"):
            run.rewind("", 1.5)
        run.flush()
        assert steps(run) == [0]
        assert run.delete_after(-1) == 1  # -1: every record of the arm
    assert steps(run) == []


@pytest.mark.parametrize("filters,named", [({"metric": 3}, r"metric=3 \(int\): a metric filter is a name or a list"),
                                           ({"layer": [1]}, r"layer=\[1\] \(list\): a layer filter")])
def test_load_filters_are_names(tmp_path, filters, named):
    with Run.create(tmp_path, "lab", {}) as run:
        run.log(0, {"a": 1.0})
    with pytest.raises(ConfigError, match=named):
        load(run.path, **filters)


@pytest.mark.parametrize("root", ["file", "file/below"])
def test_create_under_a_file_names_the_file(tmp_path, root):
    (tmp_path / "file").write_text("not a folder")
    named = re.escape(f"{tmp_path / 'file'} is a file, not a folder; give a root that is a folder")
    with pytest.raises(RunStoreError, match=named):
        Run.create(tmp_path / root, "lab", {})
    assert (tmp_path / "file").read_text() == "not a folder"


def test_create_where_the_lab_folder_is_a_file_names_it(tmp_path):
    (tmp_path / "lab").write_text("not a folder")
    with pytest.raises(RunStoreError, match=re.escape(f"{tmp_path / 'lab'} is a file, not a folder")):
        Run.create(tmp_path, "lab", {})


@pytest.mark.parametrize("kwargs,named", [
    ({"flush_every": 0}, r"flush_every 0 \(int\) is not an int >= 1"), ({"flush_every": 2.5}, "flush_every 2.5"),
    ({"flush_every": True}, "flush_every True"),
    ({"flush_seconds": -1}, r"flush_seconds -1 \(int\) is not a number >= 0"),
    ({"flush_seconds": math.nan}, "flush_seconds nan"), ({"flush_seconds": "5"}, "flush_seconds '5'"),
])
def test_flush_settings_out_of_range_are_refused_before_a_run_directory(tmp_path, kwargs, named):
    with pytest.raises(ConfigError, match=named):
        Run.create(tmp_path, "lab", {}, **kwargs)
    assert not (tmp_path / "lab").exists()


def test_flush_settings_at_their_bounds_work(tmp_path):
    with Run.create(tmp_path, "lab", {}, flush_every=1, flush_seconds=math.inf) as run:
        run.log(0, {"a": 1.0})
        assert steps(run) == [0]  # written by the append itself: one record is a batch
    with pytest.raises(ConfigError, match="flush_every 0"):
        Run.open(run.path, flush_every=0)


# ---- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,named", [
    ({"o": object()}, r"config\['o'\] = <object object at .*\(object\) is not JSON data"),
    ({"opt": {"betas": [0.9, {1, 2}]}}, r"config\['opt'\]\['betas'\]\[1\] = \{1, 2\} \(set\) is not JSON data"),
    ({"a": np.zeros(2)}, r"config\['a'\] = array\(\[0., 0.\]\) \(ndarray\) is not JSON data.*value.tolist\(\)"),
    ({"lr": math.nan}, r"config\['lr'\] = nan: a run's config is standard JSON, which has no NaN or Infinity"),
    ({"clip": {"max": -math.inf}}, r"config\['clip'\]\['max'\] = -inf: .* no NaN or Infinity"),
    ({"lr": np.float32("nan")}, r"config\['lr'\] = nan"),
    ({"m": {1: "a"}}, r"config\['m'\] has the key 1 \(int\): config keys are strings"),
])
def test_a_config_value_that_is_not_json_is_refused_naming_its_key(tmp_path, config, named):
    with pytest.raises(ConfigError, match=named):
        Run.create(tmp_path, "lab", config)
    assert not (tmp_path / "lab").exists()


def test_numpy_scalars_tensors_and_paths_in_a_config_are_stored_as_json(tmp_path):
    torch = pytest.importorskip("torch")
    config = {"lr": torch.tensor(0.5), "width": np.int64(8), "on": np.bool_(True), "data": Path("a/b"),
              "betas": (np.float32(0.25), 1)}
    run = Run.create(tmp_path, "lab", config)
    run.close()
    stored = json.loads((run.path / "config.json").read_text(), parse_constant=lambda c: pytest.fail(c))["config"]
    expected = {"lr": 0.5, "width": 8, "on": True, "data": "a/b", "betas": [0.25, 1]}
    assert stored == expected and Run.open(run.path).config == expected == run.config


# ---- a closed run ---------------------------------------------------------------------------------------


def test_a_closed_run_refuses_records_and_a_reopened_one_takes_them(tmp_path):
    run = Run.create(tmp_path, "lab", {})
    run.log(0, {"a": 1.0})
    run.close()
    before = (run.path / "config.json").read_bytes()
    with pytest.raises(RunStoreError, match="was closed: a closed Run writes nothing more; .*Run.open"):
        run.log(1, {"a": 1.0})
    with pytest.raises(RunStoreError, match="was closed"):
        run.append([Record(1, "", "a", 1.0)])
    run.flush()  # nothing buffered: harmless
    run.close()
    assert steps(run) == [0] and (run.path / "config.json").read_bytes() == before
    resumed = Run.open(run.path)
    resumed.log(1, {"a": 1.0})
    resumed.close()
    assert steps(run) == [0, 1] and Run.open(run.path).status == "complete"
