"""What a user can hand the framework callbacks by mistake, and what a checkpoint folder can hold: one clear error
when the callback is made or training starts, never an AttributeError mid-training or a silently empty measurement;
a Monitor state file is read with weights_only=True and a bad one is a RunStoreError naming it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from specscope.errors import ConfigError, RunStoreError
from specscope.integrations import spectral_optimizer
from specscope.probe import Monitor

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer  # noqa: E402

from specscope.integrations.hf import STATE_FILE, SpecscopeCallback  # noqa: E402
from test_hf import Tokens, adamw, args, tiny_llama  # noqa: E402


def test_a_trainer_or_run_of_the_wrong_type_fails_when_the_callback_is_made():
    """Both failed with an AttributeError inside trainer.train(), after the first measured step."""
    with pytest.raises(ConfigError, match=r"trainer=\.\.\.\): str is not a transformers Trainer"):
        SpecscopeCallback(every=1, trainer="trainer")
    with pytest.raises(ConfigError, match="run=str has no append/log/flush; pass a specscope.store.Run"):
        SpecscopeCallback(every=1, run="runs/x")


def test_metrics_none_names_a_record_in_its_example():
    with pytest.raises(ConfigError, match=r"metrics=None: give a tuple of record names, e\.g\. metrics=\('stable_rank',\)"):
        SpecscopeCallback(metrics=None)


def test_a_monitor_of_another_model_stops_training_at_its_start(tmp_path):
    """It recorded every weight "unmeasured" (not used in this step's forward) for the whole fit."""
    model = tiny_llama()
    other = Monitor(tiny_llama(seed=1), every=1)
    trainer = Trainer(model=model, args=args(tmp_path, 2), train_dataset=Tokens(), optimizers=adamw(model),
                      callbacks=[SpecscopeCallback(other)])
    with pytest.raises(ConfigError, match="the Monitor measures the weights of another model than the LlamaForCausalLM"):
        trainer.train()
    assert trainer.state.global_step == 0 and other.pop_records() == []


def test_spectral_optimizer_refuses_a_frozen_model_and_a_monitor_of_another_model():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="spectral_optimizer: the Monitor measures the weights of another model"):
        spectral_optimizer(model, algorithm="auto", monitor=Monitor(copy.deepcopy(model)))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="every parameter of LlamaForCausalLM is frozen"):  # torch: "empty parameter list"
        spectral_optimizer(model)


def saved_state(tmp_path):
    model = tiny_llama()
    monitor = Monitor(model, every=1)
    ids = Tokens().rows[:2]
    with monitor.step(0):
        model(input_ids=ids, labels=ids).loss.backward()
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    return monitor.state_dict(), folder


class _Runs:
    """Unpickling this calls Path.touch on the marker: the file would run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


@pytest.mark.parametrize("content", ["garbage", "code", "list", "cut"])
def test_a_corrupt_state_file_is_a_run_store_error_naming_it(tmp_path, content):
    """A truncated or replaced specscope_monitor.pt gave torch's UnpicklingError, whose text advises weights_only=False."""
    state, folder = saved_state(tmp_path)
    path, marker = folder / STATE_FILE, tmp_path / "ran"
    torch.save(state, path)
    whole = path.read_bytes()
    path.write_bytes({"garbage": b"not a torch file", "code": pickle.dumps(_Runs(marker)), "list": b"",
                      "cut": whole[: len(whole) // 2]}[content])
    if content == "list":
        torch.save([1, 2], path)
    for callback in (SpecscopeCallback(every=1), SpecscopeCallback(Monitor(tiny_llama(), every=1))):
        with pytest.raises(RunStoreError, match=f"{STATE_FILE}.*(not a Monitor state this callback saved|holds a list)") as e:
            callback.load(folder)
        assert "weights_only=False" not in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("tamper", ["stats", "history", "slots"])
def test_a_state_file_with_values_of_the_wrong_type_is_a_run_store_error(tmp_path, tamper):
    state, folder = saved_state(tmp_path)
    layer = next(iter(state["slots"]))
    if tamper == "stats":
        state["stats"] = {k: "x" for k in state["stats"]}
    elif tamper == "history":
        state["history"] = {k: 5 for k in state["history"]}
    else:
        state["slots"][layer] = {**state["slots"][layer], "n_features": "many"}
    torch.save(state, folder / STATE_FILE)
    with pytest.raises(RunStoreError, match=f"{STATE_FILE} holds a Monitor state this Monitor cannot load"):
        SpecscopeCallback(Monitor(tiny_llama(), every=1)).load(folder)
    held = SpecscopeCallback(every=1)
    held.load(folder)  # held until train begin builds the Monitor: the error comes there, naming the file all the same
    model = tiny_llama()
    trainer = Trainer(model=model, args=args(tmp_path / "out", 1), train_dataset=Tokens(), optimizers=adamw(model),
                      callbacks=[held])
    with pytest.raises(RunStoreError, match=f"{STATE_FILE} holds a Monitor state this Monitor cannot load"):
        trainer.train()


class _FailingOnce(Trainer):
    """compute_loss raises on its `fail_at`-th call (a bad batch, an OOM), once."""

    fail_at = 2

    def compute_loss(self, *a, **kw):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.fail_at:
            raise RuntimeError("bad batch")
        return super().compute_loss(*a, **kw)


def test_training_again_after_train_raised_mid_step_measures_from_the_start(tmp_path):
    """The Trainer has no exception event: the step it was measuring stayed open, and train() again said
    "step 0 was measured already" (the Monitor had to be rebuilt) while the weights stayed wrapped. A callback given
    to Trainer(callbacks=[...]), which is not told its Trainer, finds it at train begin: the step is closed as the
    micro-batch raises — before, the first step's function mode, which sees every torch call in the process, stayed
    on until the next train()."""
    from specscope.probe.watch import WatchedParameter

    model = tiny_llama()
    monitor = Monitor(model, every=1)
    trainer = _FailingOnce(model=model, args=args(tmp_path, 3, gradient_accumulation_steps=2), train_dataset=Tokens(),
                           optimizers=adamw(model), callbacks=[SpecscopeCallback(monitor)])
    with pytest.raises(RuntimeError, match="bad batch"):
        trainer.train()  # the 2nd micro-batch of optimizer step 0, measured, open
    assert not torch.overrides._get_current_function_mode_stack()
    assert not any(isinstance(p, WatchedParameter) for p in model.parameters())
    assert monitor._step is None
    trainer.train()  # from step 0 again: the step that raised is measured anew
    assert not any(isinstance(p, WatchedParameter) for p in model.parameters())
    for name in ("train", "training_step"):  # wrapped once, however many times train() ran
        assert not hasattr(vars(trainer)[name].__wrapped__, "specscope_closes")
    steps = {h["step"] for h in trainer.state.log_history if "specscope/model.layers.0.mlp.up_proj/nuclear_rank" in h}
    assert steps == {1, 2, 3}


def test_a_callback_not_told_its_trainer_closes_the_step_when_gradient_clipping_raises(tmp_path):
    """Trainer(callbacks=[...]) without trainer=: the Trainer clips the gradient after a measured step's last
    micro-batch, outside training_step. A raise there (here from the accelerator's clip_grad_norm_) left the step
    open — the first step's function mode on, seeing every torch call in the process — until the next train()."""
    from specscope.probe.watch import WatchedParameter

    model = tiny_llama()
    monitor = Monitor(model, every=1)
    trainer = Trainer(model=model, args=args(tmp_path, 3, gradient_accumulation_steps=2, max_grad_norm=1.0),
                      train_dataset=Tokens(), optimizers=adamw(model), callbacks=[SpecscopeCallback(monitor)])
    clip, calls = trainer.accelerator.clip_grad_norm_, []

    def clip_failing_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("clip failed")
        return clip(*a, **kw)

    trainer.accelerator.clip_grad_norm_ = clip_failing_once
    with pytest.raises(RuntimeError, match="clip failed"):
        trainer.train()  # optimizer step 0, measured: both micro-batches done, gradients not yet handed over
    assert not torch.overrides._get_current_function_mode_stack()
    assert not any(isinstance(p, WatchedParameter) for p in model.parameters())
    assert monitor._step is None
    trainer.train()
    steps = {h["step"] for h in trainer.state.log_history if "specscope/model.layers.0.mlp.up_proj/nuclear_rank" in h}
    assert steps == {1, 2, 3}
    assert not hasattr(vars(trainer.accelerator)["clip_grad_norm_"].__wrapped__, "specscope_closes")  # wrapped once


@pytest.mark.parametrize("where", ["floating_point_ops", "_track_num_input_tokens", "optimizer"])
def test_a_callback_not_told_its_trainer_closes_the_step_when_the_trainers_bookkeeping_raises(tmp_path, where):
    """Between a measured step's calls the Trainer counts flops and tokens and steps the optimizer; a raise there
    left the step open (the function mode on) until the next train(). transformers ≥ 5 runs all of it inside
    `_run_epoch`, which the callback now closes on error too."""
    from specscope.probe.watch import WatchedParameter

    model = tiny_llama()
    monitor = Monitor(model, every=1)
    optimizer, _ = adamw(model)
    trainer = Trainer(model=model, args=args(tmp_path, 3, include_num_input_tokens_seen=True),
                      train_dataset=Tokens(), optimizers=(optimizer, None), callbacks=[SpecscopeCallback(monitor)])
    if not hasattr(trainer, where if where != "optimizer" else "_run_epoch"):
        pytest.skip(f"this transformers has no {where} inside a running step (or runs it outside any wrapped call)")
    owner, name = (optimizer, "step") if where == "optimizer" else (trainer, where)
    real, calls = getattr(owner, name), []

    def failing_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bookkeeping failed")
        return real(*a, **kw)

    setattr(owner, name, failing_once)
    with pytest.raises(RuntimeError, match="bookkeeping failed"):
        trainer.train()
    assert not torch.overrides._get_current_function_mode_stack()
    assert not any(isinstance(p, WatchedParameter) for p in model.parameters())
    assert monitor._step is None


class _BrokenAfter(Tokens):
    """Its iterator raises after `rows` rows (a corrupt shard, a worker that died)."""

    def __init__(self, rows: int):
        super().__init__()
        self.limit = rows

    def __iter__(self):
        for i, row in enumerate(super().__iter__()):
            if i == self.limit:
                raise RuntimeError("bad shard")
            yield row


def test_a_data_loader_that_raises_inside_an_accumulated_step_leaves_no_step_open(tmp_path):
    """The Trainer reads all of a step's micro-batches before the step begins: a data loader that fails on the second
    micro-batch of step 1 (measured) fails before the Monitor opens it, with or without trainer=."""
    from specscope.probe.watch import WatchedParameter
    from test_hf import BATCH

    model = tiny_llama()
    monitor = Monitor(model, every=1)
    trainer = Trainer(model=model, args=args(tmp_path, 3, gradient_accumulation_steps=2), train_dataset=_BrokenAfter(3 * BATCH),
                      optimizers=adamw(model), callbacks=[SpecscopeCallback(monitor)])
    with pytest.raises(RuntimeError, match="bad shard"):
        trainer.train()
    assert trainer.state.global_step == 1  # step 0 done; step 1's second micro-batch could not be read
    assert not torch.overrides._get_current_function_mode_stack()
    assert not any(isinstance(p, WatchedParameter) for p in model.parameters())
    assert monitor._step is None


def test_a_trainer_the_callback_knows_closes_the_open_step_when_train_raises(tmp_path):
    """attach(trainer, ...) (or SpecscopeCallback(trainer=...)) closes the measured step train() was in when it
    raised: the weights are plain parameters right after, before any second train(); the next train() measures
    from the start as before."""
    from specscope.integrations.hf import attach
    from specscope.probe.watch import WatchedParameter

    model = tiny_llama()
    trainer = _FailingOnce(model=model, args=args(tmp_path, 3, gradient_accumulation_steps=2), train_dataset=Tokens(),
                           optimizers=adamw(model))
    monitor = attach(trainer, every=1)
    with pytest.raises(RuntimeError, match="bad batch"):
        trainer.train()
    assert not any(isinstance(p, WatchedParameter) for p in model.parameters())
    assert not torch.overrides._get_current_function_mode_stack()  # the first step's mode, which sees every op, is off
    assert monitor._step is None
    trainer.train()
    steps = {h["step"] for h in trainer.state.log_history if "specscope/model.layers.0.mlp.up_proj/nuclear_rank" in h}
    assert steps == {1, 2, 3}


def test_metrics_an_extra_records_need_that_extra_when_the_callback_is_made(tmp_path):
    """metrics= naming a record of an extra the Monitor is not given (extras=, or a sigma past topk) logged nothing."""
    from specscope.integrations.hf import attach

    with pytest.raises(ConfigError, match=r"'grad_sigma_1' is recorded only with extras=\('topk',\)"):
        SpecscopeCallback(every=1, metrics=("grad_sigma_1", "entropy_rank", "weight_stable_rank"))
    with pytest.raises(ConfigError, match=r"'entropy_rank' is recorded only with extras=\('entropy_rank',\)"):
        SpecscopeCallback(every=1, metrics=("grad_sigma_1", "entropy_rank"), extras=("topk",))
    with pytest.raises(ConfigError, match=r"'grad_sigma_9' is recorded only up to topk \(4 here\); pass topk=9"):
        SpecscopeCallback(every=1, metrics=("grad_sigma_9",), extras=("topk",))
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"'grad_sigma_3' is recorded only up to topk \(2 here\)"):
        SpecscopeCallback(Monitor(model, extras=("topk",), topk=2), metrics=("grad_sigma_3",))
    trainer = Trainer(model=model, args=args(tmp_path, 1), train_dataset=Tokens(), optimizers=adamw(model))
    with pytest.raises(ConfigError, match=r"'weight_stable_rank' is recorded only with extras=\('weight_stable_rank',\)"):
        attach(trainer, every=1, metrics=("weight_stable_rank",))
    SpecscopeCallback(every=1, metrics=("grad_sigma_9", "entropy_rank", "weight_stable_rank"),
                      extras=("topk", "entropy_rank", "weight_stable_rank"), topk=9)


def test_a_closed_run_fails_when_the_callback_is_made_or_training_starts(tmp_path):
    """A Run closed by its with block passed the checks and failed inside train(), at the first measured step."""
    from specscope import store
    from specscope.integrations.hf import attach

    with store.Run.create(tmp_path / "runs", "hf", {}) as closed:
        pass
    with pytest.raises(ConfigError, match=r"run= .* was closed.*store\.Run\.open"):
        SpecscopeCallback(every=1, run=closed)
    model = tiny_llama()
    trainer = Trainer(model=model, args=args(tmp_path, 1), train_dataset=Tokens(), optimizers=adamw(model))
    with store.Run.create(tmp_path / "runs", "hf", {}) as run:
        attach(trainer, every=1, run=run)
    with pytest.raises(ConfigError, match=r"run= .* was closed"):
        trainer.train()
    assert trainer.state.global_step == 0
