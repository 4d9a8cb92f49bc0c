"""A checkpoint that hashes right (the header is a plain SHA-256 anyone can recompute) but does not fit the run
is refused before anything is written: an edited next_step, or one written by another configuration. One line,
exit 2, the run's status and files unchanged. A checkpoint one step past progress.json (a kill between the
checkpoint's rename and progress.json's write) still resumes."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
import torch

from conftest import fingerprint, metrics, one_line_error
from specscope import store
from specscope.store import integrity
from specscope.store.integrity import seal, unseal
from specscope.train.checkpoint import load_checkpoint

ARM = "lrd"  # the killed run's unfinished arm: checkpointed at step 4 of 12, every 4


def _reseal(path, edit) -> None:
    ckpt = torch.load(io.BytesIO(unseal(path, path.read_bytes(), "")), weights_only=True)
    edit(ckpt)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    path.write_bytes(seal(buf.getvalue()))


def _refused(cli, run, *names) -> None:
    status, before = store.Run.open(run).status, fingerprint(run)
    rc, _, err = cli("run", "--resume", run)
    one_line_error(rc, err, *names)
    assert "Traceback" not in err
    assert store.Run.open(run).status == status
    assert fingerprint(run) == before


@pytest.mark.parametrize("step", [1000, 12, 0, -3])
def test_an_edited_and_resealed_next_step_is_refused(killed, copy_of, cli, step):
    run = copy_of(killed)
    ckpt = run / "checkpoints" / f"{ARM}.pt"
    assert load_checkpoint(ckpt)["next_step"] == 4
    _reseal(ckpt, lambda c: c.update(next_step=step))
    _refused(cli, run, ckpt, f"step {step}")


def test_a_next_step_behind_progress_is_refused(killed, copy_of, cli):
    run = copy_of(killed)
    ckpt = run / "checkpoints" / f"{ARM}.pt"
    _reseal(ckpt, lambda c: c.update(next_step=3))
    _refused(cli, run, ckpt, run / "progress.json", "step 3", "step 4")


def test_a_checkpoint_of_another_configuration_is_refused(killed, copy_of, cli):
    run = copy_of(killed)
    ckpt = run / "checkpoints" / f"{ARM}.pt"
    name = next(k for k, v in load_checkpoint(ckpt)["model"].items() if v.dim() == 2)

    def wider(c):
        w = c["model"][name]
        c["model"][name] = torch.zeros(w.shape[0], 2 * w.shape[1])

    _reseal(ckpt, wider)
    _refused(cli, run, ckpt, "another configuration", name, "delete it")


def test_a_checkpoint_with_other_parameters_is_refused(killed, copy_of, cli):
    run = copy_of(killed)
    ckpt = run / "checkpoints" / f"{ARM}.pt"
    _reseal(ckpt, lambda c: c["model"].update(extra=torch.zeros(1)))
    _refused(cli, run, ckpt, "another configuration", "extra")


def test_a_checkpoint_ahead_of_progress_by_one_interval_resumes(killed, copy_of, finished):
    """Killed after the checkpoint's rename, before progress.json recorded it: still resumes exactly."""
    from specscope.labs.runner import run_lab

    run = copy_of(killed)
    progress = json.loads((run / "progress.json").read_text())
    progress.pop("sha256", None)
    assert progress["checkpoints"].pop(ARM)["step"] == 4
    integrity.write_json(run / "progress.json", progress, checksum=True)
    run_lab("", resume=run)
    assert store.Run.open(run).status == "complete"
    pd.testing.assert_frame_equal(metrics(run), metrics(finished))


@pytest.mark.parametrize("edit, names", [
    (lambda c: c.pop("records"), ["lacks ['records']"]),
    (lambda c: c.pop("elapsed"), ["lacks ['elapsed']"]),
    (lambda c: c.pop("rng"), ["lacks ['rng']"]),
    (lambda c: c.update(records="x"), ["records='x'"]),
    (lambda c: c.update(elapsed="x"), ["elapsed='x'"]),
    (lambda c: c.update(position=-1), ["position=-1"]),
])
def test_a_resealed_checkpoint_missing_a_field_or_of_a_wrong_kind_is_one_line(killed, copy_of, cli, edit, names):
    """A field a resume reads, missing or of another kind in a correctly sealed file: a KeyError or ValueError
    traceback (exit 1, the `elapsed` case marking the run failed), or "written by another configuration" for a
    missing rng."""
    run = copy_of(killed)
    ckpt = run / "checkpoints" / f"{ARM}.pt"
    _reseal(ckpt, edit)
    _refused(cli, run, ckpt, *names)


def test_a_sealed_plain_pickle_is_one_line_without_torchs_note(killed, copy_of, cli):
    """A correctly sealed checkpoint whose body is a plain pickle: torch's "Detected pickle protocol 4" warning came
    first, two lines on stderr where one is promised."""
    import pickle

    run = copy_of(killed)
    ckpt = run / "checkpoints" / f"{ARM}.pt"
    ckpt.write_bytes(seal(pickle.dumps({"next_step": 4}, protocol=4)))
    _refused(cli, run, ckpt, "corrupt")
