"""Readers (runs, report's reading, export, compare, load) create and change nothing in a run directory:
no -wal/-shm files in a finished run, a crashed run's WAL read from a private copy, read-only runs work."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from conftest import fingerprint
from specscope import store


def readers(cli, run, tmp_path):
    other = tmp_path / "other" / run.name  # compare takes two distinct runs
    shutil.copytree(run, other, dirs_exist_ok=True)
    for argv in (["runs", "--root", run.parent.parent], ["export", run, "--out", tmp_path / "x.csv"],
                 ["compare", run, other, "--out", tmp_path / "cmp"]):
        rc, _, err = cli(*argv)
        assert rc == 0, err
    store.load(run)
    store.list_runs(run.parent.parent)


def test_finished_run_is_untouched_by_every_reader(finished, copy_of, cli, tmp_path):
    run = copy_of(finished)
    before = fingerprint(run)
    readers(cli, run, tmp_path)
    assert fingerprint(run) == before
    assert not list(run.glob("metrics.sqlite-*"))


def test_crashed_run_is_read_whole_from_a_private_copy(killed, copy_of, cli, tmp_path):
    run = copy_of(killed)
    assert (run / "metrics.sqlite-wal").stat().st_size > 0  # committed batches still in the WAL
    before = fingerprint(run)
    df = store.load(run)
    assert len(df) == store.Run.open(run).record_count() > 0
    readers(cli, run, tmp_path)
    assert fingerprint(run) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions; the fingerprint tests above cover root")
def test_read_only_run_directory(finished, copy_of, cli, tmp_path):
    run = copy_of(finished)
    for p in [run, *run.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        readers(cli, run, tmp_path)
    finally:
        for p in [run, *run.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
