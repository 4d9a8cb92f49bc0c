"""A resumed run continues the run it names, on the data and config it began with: a changed corpus, a
config.json that changed on disk, a lab name or --out that does not fit the run are refused; empty lists
of arms or sizes are refused before a run directory exists."""

from __future__ import annotations

import json

import pytest

from conftest import one_line_error
from specscope import store
from specscope.errors import ConfigError, RunStoreError
from specscope.labs import gpt, grokking, random_features, shardwise
from specscope.labs.config import make_config
from specscope.labs.runner import run_lab

GPT_TINY = dict(d_model=16, n_layer=1, n_head=2, seq_len=16, batch_size=4, steps=2, eval_every=2, eval_batches=1,
                probe_every=2, warmup=1, arms=["adamw"], device="cpu")


def _corpus_file(path):
    path.write_bytes(("def f(x):\n    return x * 2\n" * 400).encode())
    return path


def test_a_relative_corpus_is_stored_absolute_and_a_changed_corpus_is_not_resumed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _corpus_file(tmp_path / "text.txt")
    run = run_lab("gpt", {**GPT_TINY, "corpus": "text.txt"}, out=tmp_path / "runs", run_id="r")
    recorded = store.Run.open(run).config["corpus"]
    assert recorded == str(tmp_path / "text.txt")  # a resume from another directory reads the same file
    store.Run.open(run).set_status("interrupted")
    with open(tmp_path / "text.txt", "ab") as f:  # the data changes under the run
        f.write(b"# one more line\n")
    with pytest.raises(ConfigError, match="corpus of run .* changed since it began"):
        run_lab("", resume=run)
    assert store.Run.open(run).status == "interrupted"  # refused before anything was written


def test_an_unchanged_corpus_resumes(tmp_path):
    run = run_lab("gpt", {**GPT_TINY, "corpus": str(_corpus_file(tmp_path / "text.txt"))}, out=tmp_path, run_id="r")
    progress = json.loads((run / "progress.json").read_text())
    assert set(progress["inputs"]) == {"corpus"} and len(progress["inputs"]["corpus"]) == 64
    store.Run.open(run).set_status("interrupted")
    assert run_lab("", resume=run) == run and store.Run.open(run).status == "complete"


SPIKED_TINY = dict(n=40, d=12, m=16, steps=3, record_every=1, nus=[], activations=[], weight_decays=[], noise_taus=[],
                   jac_lambdas=[], train_scalings=["mf"], analyse_digits=False, device="cpu")


def test_a_spiked_data_file_is_stored_absolute_and_a_changed_one_is_not_resumed(tmp_path, monkeypatch):
    """The spiked lab's own data file had no fingerprint and a relative path: a resume trained on whatever the file
    (or another file of that name in the new working directory) held then."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "X.npy", np.random.default_rng(0).standard_normal((40, 12)).astype("float32"))
    run = run_lab("spiked", {**SPIKED_TINY, "data": "X.npy"}, out=tmp_path / "runs", run_id="r")
    assert store.Run.open(run).config["data"] == str(tmp_path / "X.npy")
    assert set(json.loads((run / "progress.json").read_text())["inputs"]) == {"data"}
    store.Run.open(run).set_status("interrupted")
    np.save(tmp_path / "X.npy", np.random.default_rng(1).standard_normal((40, 12)).astype("float32"))
    with pytest.raises(ConfigError, match="data of run .* changed since it began"):
        run_lab("", resume=run)
    assert store.Run.open(run).status == "interrupted"


@pytest.mark.parametrize("lab, overrides, message", [
    ("switching", {"seed": 3}, r"draws its seeds from `seeds` .* use --set seeds=\[3\]"),
    ("gated-width", {"seed": 1}, "draws its seeds from `seeds`"),
    ("embed-geometry", {"seed": 1}, "draws its seeds from `seeds`"),
    ("switching", {"rf_switch": [0, 500]}, r"rf_switch=\[0, 500\]: switch times must be distinct, in 0..rf_steps="),
    ("switching", {"rf_switch": [4, 4]}, r"'rf_switch' = \[4, 4\] repeats 4; an entry counts once"),
    ("switching", {"rf_switch": []}, r"rf_switch=\[\] has no switch time before rf_steps="),
    ("gpt", {"corpus": ""}, "an empty path; give one of stdlib or a path"),
    ("spiked", {"data": " "}, "an empty path; give one of synthetic, digits or a path"),
])
def test_settings_that_would_be_ignored_or_meaningless_are_refused(tmp_path, lab, overrides, message):
    """`seed` in a lab that reads `seeds` changed nothing while `claims` counted the reruns as seeds; switch times past
    the budget were clipped and an empty grid made SW-1/SW-2 pass by construction; an empty corpus meant stdlib."""
    with pytest.raises(ConfigError, match=message):
        run_lab(lab, overrides, out=tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_config_changed_on_disk_is_refused(finished, copy_of, cli):
    run = copy_of(finished)
    meta = json.loads((run / "config.json").read_text())
    meta["config"]["steps"] = 13  # one flipped bit in a number: 12 -> 13
    (run / "config.json").write_text(json.dumps(meta))
    with pytest.raises(RunStoreError, match="config_sha256"):
        store.Run.open(run)
    one_line_error(*cli("run", "--resume", run)[::2], "config.json", "config_sha256")


def test_resume_refuses_another_lab_and_out(finished, copy_of, cli, tmp_path):
    run = copy_of(finished)
    one_line_error(*cli("run", "gpt", "--resume", run)[::2], "grokking", "gpt")
    one_line_error(*cli("run", "--resume", run, "--out", tmp_path / "elsewhere")[::2], "--out")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("lab, key", [(gpt, "arms"), (grokking, "arms"), (grokking, "lrd_targets"), (grokking, "task"),
                                      (random_features, "activations"), (random_features, "methods"),
                                      (random_features, "sweep_widths"), (random_features, "sweep_dims")])
def test_an_empty_list_is_refused_when_the_config_is_made(lab, key):
    with pytest.raises(ConfigError, match=key):
        make_config(lab.Config, {key: []}, lab.NAME)


def test_shardwise_ranks_are_at_least_two_in_the_config():
    with pytest.raises(ConfigError, match="ranks"):
        make_config(shardwise.Config, {"ranks": [1]}, shardwise.NAME)
