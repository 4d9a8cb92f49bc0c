"""GPT lab: a tiny run through the CLI, the recorded A of every weight against the tensor it multiplied,
and the optimizer routing of the four arms."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from specscope import linalg, store
from specscope.labs import gpt
from specscope.labs.runner import run_lab

TINY = dict(n_layer=1, d_model=32, n_head=2, seq_len=16, batch_size=4, steps=4, eval_every=2, eval_batches=1,
            probe_every=2, max_bytes=200_000, warmup=1, probe_estimator="exact", device="cpu")


def test_tiny_run_through_the_cli(tmp_path, monkeypatch, capsys):
    from specscope.cli import main

    args = [f"--set={k}={v}" for k, v in TINY.items()]
    monkeypatch.setattr(sys, "argv", ["specscope", "run", "gpt", *args, "--out", str(tmp_path), "--quiet"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0, capsys.readouterr().err
    run_dir = next((tmp_path / "gpt").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    ids = {c["id"] for c in summary["claims"]}
    assert {i[:5] for i in ids} == {"GPT-1", "GPT-2"}
    assert (run_dir / "report.html").is_file()
    df = store.load(run_dir)
    assert set(gpt.ARMS) <= set(df.arm)
    val = df[(df.metric == "val_loss") & (df.arm == "adamw")].sort_values("step")
    assert list(val.step) == [0, 2, 4]
    assert df[df.metric == "unigram_loss"].value.iloc[0] > 0


def test_recorded_inputs_are_the_tensors_each_weight_multiplied(tmp_path):
    """Step 0 of the adamw arm: st(A) recorded by the lab's Monitor (exact estimator) equals the stable rank
    of the input captured by a forward hook on a model rebuilt from the same seed; the embedding's st equals
    N / c_max of the batch's tokens."""
    cfg = gpt.Config(**{**TINY, "arms": ["adamw"], "mlp": "swiglu"})
    run_dir = run_lab("gpt", cfg.model_dump(), out=tmp_path)
    df = store.load(run_dir)
    st = df[(df.metric == "stable_rank") & (df.step == 0) & (df.arm == "adamw")].set_index("layer")

    torch.manual_seed(cfg.seed)
    model = gpt.make_model(cfg)
    inputs = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(lambda m, a, name=name: inputs.setdefault(name, a[0].detach()))
    corpus = gpt.make_corpus(cfg)
    x, _ = gpt.Batches(corpus.train, cfg)(0)
    model(x)
    assert set(inputs) <= set(st.index)
    for name, A in inputs.items():
        A2 = A.reshape(-1, A.shape[-1]).double()
        assert st.loc[name, "value"] == pytest.approx(float(linalg.stable_rank(A2)), rel=1e-5), name
        assert st.loc[name, "rows"] == A2.shape[0]
    assert st.loc["embed", "value"] == pytest.approx(float(linalg.onehot_stable_rank(x)), rel=1e-12)
    assert st.loc["embed", "estimator"] == "closed_form"


@pytest.mark.parametrize("arm", gpt.ARMS)
def test_routing_sends_only_hidden_matrices_to_the_spectral_update(arm):
    cfg = gpt.Config(**{**TINY, "n_layer": 2})
    model = gpt.make_model(cfg)
    groups = gpt.param_groups(cfg, model, arm)
    spectral = {n for g in groups if g.get("algorithm") != "adamw" for n in g["param_names"]}
    every = {n for g in groups for n in g["param_names"]}
    assert every == {n for n, _ in model.named_parameters()}
    assert not any(n.startswith(("embed", "head")) or "norm" in n for n in spectral)
    if arm == "adamw":
        assert not spectral
    elif arm == "muon-down":
        assert spectral and all(".mlp.down." in n for n in spectral)
    else:
        assert {n.split(".", 2)[2] for n in spectral} >= {"attn.q.weight", "attn.o.weight", "mlp.down.weight"}
