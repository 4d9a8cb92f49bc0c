"""Shared pieces of the fault suite: small grokking runs (finished, and killed by the test hook), the CLI
called in-process, and a fingerprint of every file of a run (bytes and mtime) to prove nothing changed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from specscope import store
from specscope.labs.runner import run_lab

# The quick grokking settings (T=...), with a checkpoint every 4 steps.
QUICK = {"p": 5, "steps": 12, "eval_every": 4, "d_model": 16, "d_ff": 32, "n_heads": 2, "grok_window": 2,
         "batch_size": 8, "device": "cpu", "checkpoint_every": 4}
VOLATILE = {"time", "lab_seconds"}  # wall-clock values: differ between two runs of the same config
KILLER = textwrap.dedent("""
    import sys, json
    from specscope.labs.runner import run_lab
    run_lab("grokking", json.loads(sys.argv[2]), out=sys.argv[1], run_id="victim")
""")


def fingerprint(path: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)} of every file under `path` (new, gone or changed files all show)."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def metrics(run_dir: Path):
    df = store.load(run_dir)
    df = df[~df.metric.isin(VOLATILE)].drop(columns=["run_id"])
    return df.sort_values(["arm", "metric", "layer", "step", "value"]).reset_index(drop=True)


@pytest.fixture
def cli(monkeypatch, capsys):
    """cli(*argv) -> (exit status, stdout, stderr) of `specscope argv...`, in this process."""
    from specscope.cli import main

    def call(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["specscope", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            main()
        out = capsys.readouterr()
        return e.value.code, out.out, out.err

    return call


def one_line_error(rc: int, err: str, *names) -> None:
    """Exit 2, one line on stderr, no traceback, every name in it."""
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert str(name) in lines[0], (name, err)


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> Path:
    """A complete quick grokking run (never modified: tests copy it)."""
    return run_lab("grokking", QUICK, out=tmp_path_factory.mktemp("finished"), run_id="done")


def kill_at(root: Path, fault: str, config: dict | None = None) -> Path:
    """A grokking run (QUICK, or `config`) SIGKILLed by the test hook at `fault` (e.g. "checkpoint_rename:4")."""
    import json

    env = {**os.environ, "SPECSCOPE_FAULT": fault, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(root), json.dumps(config or QUICK)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    return root / "grokking" / "victim"


@pytest.fixture(scope="session")
def killed(tmp_path_factory) -> Path:
    """Killed at the 4th checkpoint rename: arm l2 finished, arm lrd has its step-4 checkpoint."""
    run = kill_at(tmp_path_factory.mktemp("killed"), "checkpoint_rename:4")
    assert store.Run.open(run).status == "incomplete"
    return run


@pytest.fixture
def copy_of(tmp_path):
    def copy(run: Path) -> Path:
        dest = tmp_path / "runs" / "grokking" / run.name
        shutil.copytree(run, dest)
        return dest

    return copy
