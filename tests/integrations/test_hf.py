"""The Hugging Face TrainerCallback on real tiny Trainer fits (CPU): records equal a hand-written loop's,
gradient accumulation measured as one step, Monitor state saved with checkpoints and restored on resume."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from specscope import store  # noqa: E402
from specscope.errors import ConfigError  # noqa: E402
from specscope.integrations.hf import STATE_FILE, SpecscopeCallback, attach, optimizers  # noqa: E402
from specscope.probe import Monitor  # noqa: E402

SEQ, BATCH, ACCUM = 16, 2, 2


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


class Tokens(torch.utils.data.IterableDataset):
    """Fixed random byte sequences in a fixed order (no sampler: the Trainer sees them as listed)."""

    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(0, 256, (n, SEQ), generator=g)

    def __iter__(self):
        for r in self.rows:
            yield {"input_ids": r, "labels": r}


def args(tmp_path, steps: int, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                learning_rate=1e-3, lr_scheduler_type="constant", report_to=[], use_cpu=True, logging_steps=1,
                save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3), None


def manual_records(model, steps: int, every: int) -> list:
    """The same fit written by hand: ACCUM micro-batches and the clip inside one monitor.step, then AdamW."""
    monitor = Monitor(model, every=every)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = iter(Tokens().rows)
    model.train()
    out = []
    for step in range(steps):
        with monitor.step(step):
            for _ in range(ACCUM):
                ids = torch.stack([next(rows) for _ in range(BATCH)])
                (model(input_ids=ids, labels=ids).loss / ACCUM).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the Trainer clips before on_pre_optimizer_step
        opt.step()
        opt.zero_grad()
        monitor.after_optimizer_step()
        out += monitor.pop_records()
    return out


def by_key(records):
    return {(r.step, r.layer, r.metric): r for r in records}


def test_trainer_records_equal_a_manual_loop_with_accumulation(tmp_path):
    model = tiny_llama()
    reference = copy.deepcopy(model)
    seen = []
    monitor = Monitor(model, every=2)
    trainer = Trainer(model=model, args=args(tmp_path, 4), train_dataset=Tokens(), optimizers=adamw(model))
    run = store.Run.create(tmp_path / "runs", "hf", {"steps": 4})
    trainer.add_callback(SpecscopeCallback(monitor, trainer=trainer, run=run))
    monitor_pop = monitor.pop_records
    monitor.pop_records = lambda: seen.extend(r := monitor_pop()) or r  # keep a copy of what the callback took
    trainer.train()
    run.close()

    ref = by_key(manual_records(reference, 4, every=2))
    got = by_key(seen)
    assert {k[0] for k in got} == {0, 2} and got.keys() == ref.keys()
    for k, r in got.items():
        assert r.value == pytest.approx(ref[k].value, rel=1e-4, abs=1e-9), k
        assert (r.rows, r.shape, r.estimator) == (ref[k].rows, ref[k].shape, ref[k].estimator), k
    q = got[(0, "model.layers.0.self_attn.q_proj", "stable_rank")]
    assert q.rows == ACCUM * BATCH * SEQ  # the inputs of both micro-batches of the step

    logged = [e for e in trainer.state.log_history if any(k.startswith("specscope/") for k in e)]
    assert [e["step"] for e in logged] == [1, 3]  # after optimizer steps 0 and 2, where the Trainer logs their loss
    assert logged[0]["specscope/model.layers.0.self_attn.q_proj/stable_rank"] == q.value
    df = store.load(run.path)
    assert set(df[df.metric == "stable_rank"].step) == {0, 2} and set(df[df.metric == "loss"].step) == {0, 1, 2, 3}


def test_an_evaluation_before_training_is_logged_at_step_0(tmp_path):
    """trainer.evaluate() before train() logs at global_step 0: the run stores it at step 0 (it once passed step −1,
    which the run refuses), and training's own logs follow."""
    model = tiny_llama()
    trainer = Trainer(model=model, args=args(tmp_path, 2), train_dataset=Tokens(), eval_dataset=list(Tokens(n=4)),
                      optimizers=adamw(model))
    run = store.Run.create(tmp_path / "runs", "hf", {"steps": 2})
    trainer.add_callback(SpecscopeCallback(Monitor(model, every=1), trainer=trainer, run=run))
    trainer.evaluate()
    trainer.train()
    run.close()
    df = store.load(run.path)
    assert set(df[df.metric == "eval_loss"].step) == {0} and set(df[df.metric == "loss"].step) == {0, 1}


def test_checkpoint_carries_monitor_state_and_resume_matches_an_uninterrupted_fit(tmp_path):
    full_model = tiny_llama()
    part_model = copy.deepcopy(full_model)
    trainer = Trainer(model=full_model, args=args(tmp_path / "full", 4), train_dataset=Tokens(), optimizers=adamw(full_model))
    full = attach(trainer, every=1, estimator="gram")
    trainer.train()
    expected = full.advice(window=4)

    # the same fit stopped after step 2 (checkpoint-2), then resumed by a fresh Trainer, model and Monitor
    out, saving = tmp_path / "part", dict(save_strategy="steps", save_steps=2)
    trainer = Trainer(model=part_model, args=args(out, 2, **saving), train_dataset=Tokens(), optimizers=adamw(part_model))
    attach(trainer, every=1, estimator="gram")
    trainer.train()
    assert (out / "checkpoint-2" / STATE_FILE).is_file()
    resumed_model = tiny_llama(seed=1)  # its weights come from the checkpoint
    trainer = Trainer(model=resumed_model, args=args(out, 4, **saving), train_dataset=Tokens(), optimizers=adamw(resumed_model))
    resumed = attach(trainer, every=1, estimator="gram")
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    after = resumed.advice(window=4)
    assert set(after.measurements) == {4}  # steps 0, 1 from the checkpoint's Monitor state, 2, 3 measured now
    for col in ("stable_rank", "nuclear_rank", "spectral_advantage"):
        assert after[col].tolist() == pytest.approx(expected[col].tolist(), rel=1e-5), col


@pytest.mark.parametrize("how", ["attach", "callbacks"])
def test_resume_from_a_checkpoint_elsewhere_restores_that_checkpoints_monitor(tmp_path, how):
    """train(resume_from_checkpoint=A/checkpoint-2) with output_dir B restored the Monitor of B/checkpoint-2, another
    run's checkpoint of the same step, without a word (or none, with a warning naming B's folder); the Trainer keeps
    the folder it resumes from only in its loop's locals, and args.resume_from_checkpoint stays unset."""
    saving = dict(save_strategy="steps", save_steps=2)
    histories = {}
    for name, seed in (("A", 0), ("B", 5)):  # two runs, each with a checkpoint-2
        model = tiny_llama(seed)
        trainer = Trainer(model=model, args=args(tmp_path / name, 2, **saving), train_dataset=Tokens(seed=seed), optimizers=adamw(model))
        histories[name] = attach(trainer, every=1, estimator="gram")
        trainer.train()
    model = tiny_llama(seed=1)
    trainer = Trainer(model=model, args=args(tmp_path / "B", 3), train_dataset=Tokens(), optimizers=adamw(model),
                      callbacks=[SpecscopeCallback(every=1, estimator="gram")] if how == "callbacks" else None)
    resumed = attach(trainer, every=1, estimator="gram") if how == "attach" else None
    trainer.train(resume_from_checkpoint=str(tmp_path / "A" / "checkpoint-2"))
    resumed = resumed or next(c for c in trainer.callback_handler.callbacks if isinstance(c, SpecscopeCallback)).monitor
    before = resumed.advice(window=3)  # steps 0, 1 from a checkpoint's Monitor state, 2 measured now
    assert set(before.measurements) == {3}
    ours = histories["A"].advice(window=2).set_index("layer").stable_rank
    theirs = histories["B"].advice(window=2).set_index("layer").stable_rank
    assert not (ours == theirs).all()
    got = {k: list(v)[:2] for k, v in resumed._history.items() if k.endswith("q_proj")}
    want = {k: list(v)[:2] for k, v in histories["A"]._history.items() if k.endswith("q_proj")}
    assert got and got.keys() == want.keys() and all(got[k] == want[k] for k in got)


def test_optimizers_helper_routes_and_the_trainer_schedules_both_groups(tmp_path):
    model = tiny_llama()
    opt, sched = optimizers(model, lr_spectral=0.02, lr_adamw=3e-3)
    assert sched is None
    algos = {n: g["algorithm"] for g in opt.param_groups for n in g["param_names"]}
    assert algos["model.layers.0.self_attn.q_proj.weight"] == "muon" and algos["model.layers.1.mlp.down_proj.weight"] == "muon"
    assert algos["model.embed_tokens.weight"] == "adamw" and algos["lm_head.weight"] == "adamw"
    assert algos["model.norm.weight"] == "adamw"
    before = [p.detach().clone() for p in model.parameters()]
    callback = SpecscopeCallback(every=2)  # no trainer reference: builds its Monitor on train begin, logs to log_history
    trainer = Trainer(model=model, args=args(tmp_path, 3, lr_scheduler_type="linear", gradient_accumulation_steps=1),
                      train_dataset=Tokens(), optimizers=(opt, sched), callbacks=[callback])
    trainer.train()
    logged = [e["step"] for e in trainer.state.log_history if "specscope/lm_head/nuclear_rank" in e]
    assert logged == [1, 3] and set(callback.monitor.advice().measurements) == {2}
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] / 0.02 == pytest.approx(lrs[1] / 3e-3) and lrs[0] < 0.02  # one linear decay drives both groups
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_callback_arguments_are_checked(tmp_path):
    """Each mistake fails when the callback is made, with one message naming it — not inside trainer.train(), and
    never a silently ignored option (every= beside a Monitor, a metric name that logs nothing)."""
    from specscope.errors import ConfigError

    model = tiny_llama()
    with pytest.raises(ConfigError, match="not both"):
        SpecscopeCallback(Monitor(model), every=2)
    with pytest.raises(ConfigError, match="'evry' is not an option of Monitor; did you mean 'every'"):
        SpecscopeCallback(evry=5)
    with pytest.raises(ConfigError, match=r"Monitor\(every=0\) must be a positive int"):
        SpecscopeCallback(every=0)
    with pytest.raises(ConfigError, match="estimator='grams'"):
        SpecscopeCallback(estimator="grams")
    with pytest.raises(ConfigError, match="'stable_rnak' is not a record a Monitor makes; did you mean 'stable_rank'"):
        SpecscopeCallback(metrics=("stable_rnak",))
    with pytest.raises(ConfigError, match="a tuple of record names"):
        SpecscopeCallback(metrics="stable_rank")
    with pytest.raises(ConfigError, match="monitor=LlamaForCausalLM is not a specscope Monitor"):
        SpecscopeCallback(model)
    SpecscopeCallback(every=5, metrics=("grad_sigma_1", "stable_rank"), extras=("topk",))  # extras' records are names too
    trainer = Trainer(model=model, args=args(tmp_path, 1), train_dataset=Tokens(), optimizers=adamw(model))
    with pytest.raises(ConfigError, match="not both"):
        attach(trainer, Monitor(model), every=5)
    with pytest.raises(ConfigError, match="monitor=LlamaForCausalLM is not a specscope Monitor"):
        attach(trainer, model)
    with pytest.raises(ConfigError, match="LlamaForCausalLM is not a transformers Trainer"):
        attach(model, every=5)
    with pytest.raises(ConfigError, match="'everyy' is not an option of Monitor; did you mean 'every'"):
        attach(trainer, everyy=5)  # the README's entry point checks as the callback does, not with a TypeError
    assert trainer.callback_handler.callbacks == [c for c in trainer.callback_handler.callbacks if not isinstance(c, SpecscopeCallback)]


@pytest.mark.parametrize("fp16", [True, False])
def test_fp16_overflow_steps_are_skipped_as_the_trainer_skips_them(tmp_path, fp16):
    """fp16 loss scaling overflows on purpose (its GradScaler halves the scale and skips the step): training goes
    on, the overflow step's gradient records carry flag "nonfinite", and the later steps are measured. Without
    args.fp16 (a scaler that accelerate made, ACCELERATE_MIXED_PRECISION=fp16) a callback given in callbacks=[...]
    read the scaler of its `trainer=`, None there, and the planned overflow stopped the fit."""
    model = tiny_llama()
    run = store.Run.create(tmp_path / "runs", "hf", {"steps": 3})
    callback = SpecscopeCallback(every=1, run=run)
    trainer = Trainer(model=model, args=args(tmp_path, 3, fp16=fp16), train_dataset=Tokens(), optimizers=adamw(model),
                      callbacks=[callback])
    # the scaled loss of the first step overflows float32; the scaler then drops to 2^27 and the next steps are finite
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)
    trainer.train()
    run.close()
    assert trainer.state.global_step == 3 and callback.monitor.nonfinite == "skip"
    nr = store.load(run.path).query("metric == 'nuclear_rank'")
    first, later = nr[nr.step == 0], nr[nr.step > 0]
    assert len(first) and (first.flag == "nonfinite").all()
    assert set(later.step) == {1, 2} and (later.flag == "").all() and (later.value > 0).all()


def test_load_before_train_restores_the_monitor_the_callback_builds(tmp_path):
    model = tiny_llama()
    monitor = Monitor(model, every=1)
    ids = Tokens().rows[:BATCH]
    for step in range(2):
        with monitor.step(step):
            model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad()
    (tmp_path / "ckpt").mkdir()
    torch.save(monitor.state_dict(), tmp_path / "ckpt" / STATE_FILE)

    callback = SpecscopeCallback(every=1)
    callback.load(tmp_path / "ckpt")  # as the resume warning says: before trainer.train(), the Monitor not built yet
    trainer = Trainer(model=model, args=args(tmp_path / "out", 1), train_dataset=Tokens(), optimizers=adamw(model),
                      callbacks=[callback])
    trainer.train()
    assert set(callback.monitor.advice(window=10).measurements) == {3}  # 2 loaded + 1 measured


@pytest.mark.parametrize("build", ["bert_classifier", "gpt2_classifier", "bert_mlm"])
def test_task_heads_go_to_adamw_and_optimizer_options_reach_the_spectral_group(build):
    """A transformers task model's head (classifier, score, the MLM head's transform) sits outside its backbone
    (`base_model`); without a Monitor it went to Muon. Muon's options pass through `optimizers(...)`."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

    bert = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    model = {"bert_classifier": lambda: BertForSequenceClassification(BertConfig(**bert, num_labels=3)),
             "gpt2_classifier": lambda: GPT2ForSequenceClassification(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2,
                                                                                  num_labels=3, pad_token_id=0)),
             "bert_mlm": lambda: BertForMaskedLM(BertConfig(**bert))}[build]()
    opt, _ = optimizers(model, polar="gram", momentum=0.9)
    (muon,) = [g for g in opt.param_groups if g["algorithm"] == "muon"]
    backbone = {id(p) for p in model.base_model.parameters()}
    heads = [n for n, p in model.named_parameters() if p.dim() >= 2 and id(p) not in backbone]
    assert heads and not set(heads) & set(muon["param_names"])
    hidden = [n for n in muon["param_names"] if "intermediate.dense" in n or "mlp.c_fc" in n]
    assert hidden  # a d_ff equal to the vocabulary no longer makes a hidden matrix the "head"
    assert (muon["polar"], muon["momentum"]) == ("gram", 0.9)
    with pytest.raises(Exception, match="'polr' is not an option of algorithm='muon'; did you mean 'polar'"):
        optimizers(model, polr="gram")

    class Wrapper(torch.nn.Module):  # a LightningModule's `self.model = model`
        def __init__(self):
            super().__init__()
            self.model = model

    wrapped, _ = optimizers(Wrapper())
    (muon_wrapped,) = [g for g in wrapped.param_groups if g["algorithm"] == "muon"]
    assert muon_wrapped["param_names"] == [f"model.{n}" for n in muon["param_names"]]

    monitor = Monitor(model)  # a measured step sees only the product nearest the loss: declared heads stay heads
    ids = torch.randint(1, 128, (2, 8))
    with monitor.step(0):
        out = model(input_ids=ids, labels=ids if build == "bert_mlm" else torch.tensor([0, 1]))
        out.loss.backward()
    assert {n.removesuffix(".weight") for n in heads} <= {k for k, r in monitor.roles.items() if r == "head"}
    measured, _ = optimizers(model, roles=monitor)
    (muon_measured,) = [g for g in measured.param_groups if g["algorithm"] == "muon"]
    assert muon_measured["param_names"] == muon["param_names"]


def test_an_auto_optimizers_choices_are_popped_logged_and_stored(tmp_path):
    """AutoGeometry's records (three per layer and step) are popped by the callback after every optimizer step: stored
    in the run and logged as specscope/<layer>/geometry. Before, they piled up in the optimizer for the whole fit."""
    model = tiny_llama()
    monitor = Monitor(model, every=1)
    opt, sched = optimizers(model, lr_spectral=0.02, lr_adamw=3e-3, algorithm="auto", monitor=monitor)
    run = store.Run.create(tmp_path / "runs", "hf", {})
    callback = SpecscopeCallback(monitor, run=run)
    trainer = Trainer(model=model, args=args(tmp_path, 3, gradient_accumulation_steps=1), train_dataset=Tokens(),
                      optimizers=(opt, sched), callbacks=[callback])
    trainer.train()
    assert opt._records == []
    logged = [e for e in trainer.state.log_history if "specscope/model.layers.0.mlp.down_proj/geometry" in e]
    assert [e["step"] for e in logged] == [1, 2, 3]  # optimizer steps 0, 1, 2, logged at global_step k+1 like the loss
    geometry = store.load(run, metric="geometry")
    assert sorted(geometry["step"].unique()) == [0, 1, 2]
    assert set(geometry["value"].unique()) <= {0.0, 1.0}
    # one record per quantity and step: the Monitor's nr(G), not also the optimizer's nr of its AdamW moment
    df = store.load(run)
    assert not df.duplicated(["arm", "layer", "metric", "step"]).any()
    assert set(df[df.metric == "nuclear_rank"].rows) != {0}  # the Monitor's (it counts rows; the optimizer's do not)


def test_optimizers_with_auto_and_no_monitor_names_the_missing_argument():
    with pytest.raises(ConfigError, match="algorithm='auto' .* pass monitor="):
        optimizers(tiny_llama(), algorithm="auto")


def test_a_second_train_that_restarts_at_step_0_stops_at_its_start_and_a_new_monitor_measures_it(tmp_path):
    """The Trainer restarts its step count at 0 on a second train(): the Monitor refused step 0 from inside the
    training loop, after the Trainer had started; now train() stops at its start naming both ways on."""
    model = tiny_llama()
    monitor = Monitor(model, every=1)
    trainer = Trainer(model=model, args=args(tmp_path, 2), train_dataset=Tokens(), optimizers=adamw(model))
    attach(trainer, monitor)
    trainer.train()
    assert monitor.last_step == 1 and set(monitor.advice(window=10).measurements) == {2}
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"starts at step 0.*steps up to 1.*new Monitor.*resume_from_checkpoint"):
        trainer.train()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # no step was taken
    assert monitor.last_step == 1 and set(monitor.advice(window=10).measurements) == {2}

    trainer.remove_callback(SpecscopeCallback)
    again = Monitor(model, every=1)
    attach(trainer, again)
    trainer.train()
    assert again.last_step == 1 and set(again.advice(window=10).measurements) == {2}
    logged = [e["step"] for e in trainer.state.log_history if any(k.startswith("specscope/") for k in e)]
    assert logged == [1, 2]  # the second train()'s own steps 0 and 1, logged after each


def test_a_run_that_holds_an_earlier_trainings_records_is_refused_at_step_0(tmp_path):
    """The docs say to give a second train() a new Run; the old one was taken and its steps 0… recorded twice."""
    model = tiny_llama()
    run = store.Run.create(tmp_path / "runs", "hf", {"steps": 1})
    trainer = Trainer(model=model, args=args(tmp_path, 1), train_dataset=Tokens(), optimizers=adamw(model))
    attach(trainer, Monitor(model, every=1), run=run)
    trainer.train()
    trainer.remove_callback(SpecscopeCallback)
    attach(trainer, Monitor(model, every=1), run=run)
    with pytest.raises(ConfigError, match="run= holds .* nuclear_rank records already.*Give it a new Run"):
        trainer.train()
    run.close()
    fresh = store.Run.create(tmp_path / "runs", "hf", {"steps": 1})
    trainer.remove_callback(SpecscopeCallback)
    attach(trainer, Monitor(model, every=1), run=fresh)
    trainer.train()
    fresh.close()
    assert len(store.load(fresh.path, metric="nuclear_rank")) == len(store.load(run.path, metric="nuclear_rank")) > 0


def test_a_resume_from_an_older_checkpoint_records_each_step_once(tmp_path):
    """Training stopped after step 3 with its last checkpoint at 2; a resume from checkpoint-2 into the same Run trains
    steps 2, 3 again. Their records were appended a second time (two records per step and layer). The resume drops
    the run's records of steps >= 2, with a warning, and the run ends as an uninterrupted fit's."""
    saving = dict(save_strategy="steps", save_steps=2)
    model = tiny_llama()
    fresh = copy.deepcopy(model)
    full = store.Run.create(tmp_path / "runs", "hf", {"steps": 4})
    trainer = Trainer(model=fresh, args=args(tmp_path / "full", 4), train_dataset=Tokens(), optimizers=adamw(fresh))
    attach(trainer, every=1, estimator="gram", run=full)
    trainer.train()
    full.close()

    run = store.Run.create(tmp_path / "runs", "hf", {"steps": 4})
    out = tmp_path / "part"
    trainer = Trainer(model=model, args=args(out, 4, **saving), train_dataset=Tokens(), optimizers=adamw(model))
    attach(trainer, every=1, estimator="gram", run=run)
    trainer.train()  # checkpoints at 2 and 4; the run holds steps 0..3
    run.close()
    resumed = tiny_llama(seed=1)
    run = store.Run.open(run.path)
    trainer = Trainer(model=resumed, args=args(out, 4, **saving), train_dataset=Tokens(), optimizers=adamw(resumed))
    attach(trainer, every=1, estimator="gram", run=run)
    with pytest.warns(UserWarning, match=r"resuming at step 2, .* records of steps >= 2.*dropped") as caught:
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    run.close()
    assert [w.filename for w in caught if "dropped" in str(w.message)] == [__file__]  # train()'s line, not the Trainer's
    got, want = (store.load(r.path, metric="nuclear_rank") for r in (run, full))
    assert len(got) == len(want) and not got.duplicated(["step", "layer"]).any()
    assert sorted(got.step.unique()) == [0, 1, 2, 3]
    g, w = (d.set_index(["step", "layer"]).value.sort_index() for d in (got, want))
    assert g.tolist() == pytest.approx(w.tolist(), rel=1e-5)
    loss = store.load(run.path, metric="loss")
    assert sorted(loss.step) == [0, 1, 2, 3]


def test_one_callback_per_trainer_and_attach_refuses_model_init(tmp_path):
    """A second SpecscopeCallback (attach twice, or one instance added twice) would measure and log every step once
    more: refused before any step. attach builds its Monitor at once, so a Trainer whose model_init builds the model
    at train() is refused with the way that works, which then measures the model train() built."""
    model = tiny_llama()
    trainer = Trainer(model=model, args=args(tmp_path, 1), train_dataset=Tokens(), optimizers=adamw(model))
    attach(trainer, every=1, metrics=("stable_rank",))  # metrics= as the callback's
    with pytest.raises(ConfigError, match="holds a SpecscopeCallback already"):
        attach(trainer, every=1)
    callback = SpecscopeCallback(every=1)
    trainer = Trainer(model=model, args=args(tmp_path, 1), train_dataset=Tokens(), optimizers=adamw(model), callbacks=[callback])
    trainer.add_callback(callback)
    with pytest.raises(ConfigError, match="the same SpecscopeCallback twice"):
        trainer.train()
    assert trainer.state.global_step == 0

    trainer = Trainer(model_init=lambda *_: tiny_llama(), args=args(tmp_path, 1), train_dataset=Tokens())
    with pytest.raises(ConfigError, match=r"model_init=.*SpecscopeCallback\(every=10, trainer=trainer\)"):
        attach(trainer, every=1)
    callback = SpecscopeCallback(every=1, trainer=trainer)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.monitor.last_step == 0 and callback.monitor.slots
    assert {id(s.param) for s in callback.monitor.slots.values()} <= {id(p) for p in trainer.model.parameters()}


def test_a_callback_given_in_callbacks_logs_to_the_reporters_too(tmp_path):
    """Trainer(callbacks=[SpecscopeCallback(...)]) reaches the reporting callbacks (TensorBoard, W&B, ...) as attach does."""
    class Reporter(transformers.TrainerCallback):
        def __init__(self):
            self.keys = set()

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.keys |= {k for k in logs or {} if k.startswith("specscope/")}

    model, reporter = tiny_llama(), Reporter()
    Trainer(model=model, args=args(tmp_path, 1), train_dataset=Tokens(), optimizers=adamw(model),
            callbacks=[reporter, SpecscopeCallback(every=1, metrics=("stable_rank",))]).train()
    assert reporter.keys and all(k.endswith("/stable_rank") for k in reporter.keys)


def test_load_names_a_missing_folder_and_a_frozen_weight_is_named_frozen(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder; pass a checkpoint folder"):
        SpecscopeCallback(every=1).load(tmp_path / "checkpoint-99")
    model = tiny_llama()
    monitor = attach(Trainer(model=model, args=args(tmp_path, 1), train_dataset=Tokens(), optimizers=adamw(model)), every=1)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(False)  # frozen after the Monitor was built (PEFT-style)
    ids = Tokens().rows[:BATCH]
    with pytest.warns(UserWarning, match=r"down_proj' is unmeasured: .*frozen \(requires_grad=False\)"):
        with monitor.step(0):
            model(input_ids=ids, labels=ids).loss.backward()


_KILLED_FIT = """
import os, signal, sys
sys.path.insert(0, sys.argv[3])
import torch
from transformers import Trainer, TrainerCallback
import test_hf as t
from specscope import store
from specscope.integrations.hf import attach

where, root = sys.argv[1], sys.argv[2]

class Kill(TrainerCallback):  # listed before the SpecscopeCallback that attach adds
    def on_step_end(self, args, state, control, **kw):
        if where == "step_end" and state.global_step == 5:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save(self, args, state, control, **kw):  # checkpoint-4 written, the callback's on_save not yet run
        if where == "on_save" and state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)

model = t.tiny_llama()
run = store.Run.create(root + "/runs", "hf", {"steps": 6}, run_id="r")
trainer = Trainer(model=model, args=t.args(root + "/out", 6, save_strategy="steps", save_steps=2), train_dataset=t.Tokens(),
                  optimizers=t.adamw(model), callbacks=[Kill()])
attach(trainer, every=1, estimator="gram", run=run)
trainer.train()
"""


@pytest.mark.parametrize("where", ["step_end", "on_save"])
def test_a_fit_killed_after_a_checkpoint_resumes_to_an_uninterrupted_fits_records_and_monitor(tmp_path, where):
    """SIGKILL at step 5 (checkpoint-4 written): the records of steps 0-3 were still buffered, so the resume from
    checkpoint-4 left them out for good and `runs` called the run complete. SIGKILL between the Trainer's writing of
    checkpoint-4 and the callback's on_save: the Monitor's state was lost ("saved without specscope")."""
    import os
    import subprocess
    import sys
    import warnings

    here = os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, "-c", _KILLED_FIT, where, str(tmp_path), here], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "out" / "checkpoint-4").is_dir()

    full_model = tiny_llama()
    full_run = store.Run.create(tmp_path / "runs", "hf", {"steps": 6}, run_id="full")
    trainer = Trainer(model=full_model, args=args(tmp_path / "full", 6), train_dataset=Tokens(), optimizers=adamw(full_model))
    full = attach(trainer, every=1, estimator="gram", run=full_run)
    trainer.train()
    full_run.close()

    model = tiny_llama(seed=1)
    run = store.Run.open(tmp_path / "runs" / "hf" / "r")
    trainer = Trainer(model=model, args=args(tmp_path / "out", 6, save_strategy="steps", save_steps=2),
                      train_dataset=Tokens(), optimizers=adamw(model))
    resumed = attach(trainer, every=1, estimator="gram", run=run)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "without Monitor state"
        trainer.train(resume_from_checkpoint=True)
    run.close()
    got, want = (store.load(r.path, metric="nuclear_rank") for r in (run, full_run))
    assert sorted(got.step.unique()) == [0, 1, 2, 3, 4, 5] and len(got) == len(want)
    # the Trainer's own records of the checkpointed step (logged after its step ended, before the checkpoint) too
    assert sorted(store.load(run.path, metric="loss").step) == sorted(store.load(full_run.path, metric="loss").step) == list(range(6))
    g, w = (d.set_index(["step", "layer"]).value.sort_index() for d in (got, want))
    assert g.tolist() == pytest.approx(w.tolist(), rel=1e-5)
    a, b = resumed.advice(window=6), full.advice(window=6)
    assert a["stable_rank"].tolist() == pytest.approx(b["stable_rank"].tolist(), rel=1e-5)
    assert not list((tmp_path / "out").glob(f".{STATE_FILE}-*"))  # the staged states were cleared by the next saves


def test_save_strategy_best_leaves_no_staged_state_behind(tmp_path):
    """With save_strategy="best" the Monitor's state is staged after every evaluation (the Trainer decides to save
    after it); the evaluations that were not the best left theirs in output_dir for good."""
    model = tiny_llama()
    trainer = Trainer(model=model, args=args(tmp_path, 6, save_strategy="best", eval_strategy="steps", eval_steps=2,
                                             metric_for_best_model="loss", greater_is_better=False),
                      train_dataset=Tokens(), eval_dataset=Tokens(16, seed=1), optimizers=adamw(model))
    attach(trainer, every=1, estimator="gram")
    trainer.train()
    saved = sorted(tmp_path.glob("checkpoint-*"))
    assert saved and all((c / STATE_FILE).is_file() for c in saved)
    assert not list(tmp_path.glob(f".{STATE_FILE}-*"))


def test_every_value_the_trainer_logs_reaches_the_run_once(tmp_path):
    """Values logged at one step after training (two evaluations, a metric logged twice, an infinite perplexity)
    each reach the run: the run dropped every key already logged at that step, and every non-finite value. Only the
    end-of-training log's repeat of the last "epoch" is left out."""
    model = tiny_llama()
    trainer = Trainer(model=model, args=args(tmp_path, 1), train_dataset=Tokens(), optimizers=adamw(model))
    run = store.Run.create(tmp_path / "runs", "hf", {"steps": 1})
    attach(trainer, every=1, run=run)
    trainer.train()
    trainer.evaluate(list(Tokens(n=4, seed=1)))
    trainer.evaluate(list(Tokens(n=4, seed=2)))
    trainer.log({"val_acc": 0.25, "val_ppl": float("inf")})
    trainer.log({"val_acc": 0.75})
    run.close()
    df = store.load(run.path).query("layer == ''")
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert sorted(df[df.metric == "eval_loss"].value) == sorted(evals) and evals[0] != evals[1]
    assert sorted(df[df.metric == "val_acc"].value) == [0.25, 0.75]
    assert df[df.metric == "val_ppl"].value.tolist() == [float("inf")]
    assert set(df.step) == {0} and len(df[df.metric == "epoch"]) == 1


class Regression(torch.nn.Module):
    """y ≈ W2 relu(W1 x), its loss returned as the Trainer reads it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)

    def forward(self, x, y):
        return {"loss": torch.nn.functional.mse_loss(self.out(torch.relu(self.hidden(x))), y)}


class Rows(torch.utils.data.IterableDataset):
    """Random (x, y) rows in a fixed order, row `nan` with a NaN in x."""

    def __init__(self, nan: int, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
        self.x[nan, 0] = float("nan")

    def __iter__(self):
        for x, y in zip(self.x, self.y):
            yield {"x": x, "y": y}


@pytest.mark.parametrize("step, fix", [(0, r"check the model's initialization and the data \(no update has been made yet, so "
                                           r"the learning rate is not the cause\)"),
                                       (1, r"lower the learning rate or check the data")])
def test_a_nan_input_names_the_learning_rate_only_after_an_update(tmp_path, step, fix):
    """A NaN in the data of step 0 said "lower the learning rate" too, though no update had been made."""
    from specscope.errors import NonFiniteError

    rows = Rows(step * BATCH)
    model = Regression()
    trainer = Trainer(model=model, args=args(tmp_path, 3, gradient_accumulation_steps=1), train_dataset=rows,
                      optimizers=adamw(model))
    attach(trainer, every=1)
    with pytest.raises(NonFiniteError, match=rf"non-finite activation entering 'hidden' at step {step} .*; {fix}") as e:
        trainer.train()
    assert e.value.before_update == (step == 0)
