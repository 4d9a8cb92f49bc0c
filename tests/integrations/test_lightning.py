"""The Lightning Callback on real CPU fits: records equal a hand-written loop's with accumulate_grad_batches=2,
values reach the logger, and the Monitor's state rides in checkpoints across a resume."""

from __future__ import annotations

import copy
import csv

import pytest
import torch

L = pytest.importorskip("lightning")

from specscope.integrations.lightning import SpecscopeCallback, spectral_optimizer  # noqa: E402
from specscope.models.builtin import TRANSFORMER, language_batches, lm_loss  # noqa: E402
from specscope.models.gpt import GPT, GPTConfig  # noqa: E402
from specscope.probe import Monitor  # noqa: E402
from specscope import store  # noqa: E402

ACCUM, MICRO_PER_EPOCH = 2, 4  # two optimizer steps per epoch


class Lit(L.LightningModule):
    def __init__(self, net, spectral: bool = False):
        super().__init__()
        self.net, self.spectral = net, spectral

    def training_step(self, batch, batch_idx):
        return lm_loss(self.net, batch)

    def configure_optimizers(self):
        return spectral_optimizer(self, 0.02, 1e-3) if self.spectral else torch.optim.AdamW(self.parameters(), lr=1e-3)


def gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TRANSFORMER, "n_layer": 1}))


def micro_batches() -> list[torch.Tensor]:
    it = language_batches(0, TRANSFORMER["vocab_size"], TRANSFORMER["seq_len"], batch=4)
    return [next(it) for _ in range(MICRO_PER_EPOCH)]


def loader():
    return torch.utils.data.DataLoader(micro_batches(), batch_size=None, shuffle=False)


def fit(module, callback, root, steps: int, ckpt_path=None, **kw):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=ACCUM, callbacks=[callback],
                        logger=L.pytorch.loggers.CSVLogger(root, name="", version=""), enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, enable_checkpointing=False, **kw)
    trainer.fit(module, train_dataloaders=loader(), ckpt_path=ckpt_path)
    return trainer


def test_fit_records_equal_a_manual_loop_and_reach_the_logger(tmp_path):
    net = gpt()
    reference = copy.deepcopy(net)
    module = Lit(net)
    seen = []
    fit(module, StepRecords(seen).wrap(SpecscopeCallback(every=2)), tmp_path, 4)

    monitor = Monitor(reference, every=2)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    batches, ref = micro_batches() * 2, []
    for step in range(4):
        with monitor.step(step):
            for b in batches[step * ACCUM:(step + 1) * ACCUM]:
                (lm_loss(reference, b) / ACCUM).backward()
        opt.step()
        opt.zero_grad()
        ref += monitor.pop_records()
    got = {(r.step, r.layer, r.metric): r for r in seen}
    want = {(r.step, "net." + r.layer, r.metric): r for r in ref}
    assert got.keys() == want.keys() and {k[0] for k in got} == {0, 2}
    for k, r in got.items():
        assert r.value == pytest.approx(want[k].value, rel=1e-5, abs=1e-9), k
        assert (r.rows, r.shape) == (want[k].rows, want[k].shape), k
    assert got[(0, "net.blocks.0.attn.q", "stable_rank")].rows == ACCUM * 4 * TRANSFORMER["seq_len"]

    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("specscope/net.blocks.0.attn.q/stable_rank")]
    assert [int(r["step"]) for r in rows] == [0, 2]
    assert float(rows[0]["specscope/net.blocks.0.attn.q/stable_rank"]) == pytest.approx(got[(0, "net.blocks.0.attn.q", "stable_rank")].value)


class StepRecords:
    """Keeps a copy of every record the callback takes from its Monitor."""

    def __init__(self, into: list):
        self.into = into

    def wrap(self, callback):
        setup = callback.setup

        def setup_and_wrap(trainer, pl_module, stage):
            setup(trainer, pl_module, stage)
            pop = callback.monitor.pop_records
            callback.monitor.pop_records = lambda: self.into.extend(r := pop()) or r

        callback.setup = setup_and_wrap
        return callback


def test_checkpoint_carries_monitor_state_and_resume_matches_an_uninterrupted_fit(tmp_path):
    net = gpt()
    part = Lit(copy.deepcopy(net))
    full = SpecscopeCallback(every=1, estimator="gram")
    fit(Lit(net), full, tmp_path / "full", 4)
    expected = full.monitor.advice(window=4)

    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    first = SpecscopeCallback(every=1, estimator="gram")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, accumulate_grad_batches=ACCUM, callbacks=[first, saver],
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(part, train_dataloaders=loader())
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    assert "monitor" in torch.load(ckpt, weights_only=False)["callbacks"]["SpecscopeCallback"]

    resumed = SpecscopeCallback(every=1, estimator="gram")
    fit(Lit(gpt(seed=1)), resumed, tmp_path / "resumed", 4, ckpt_path=str(ckpt))
    after = resumed.monitor.advice(window=4)
    assert set(after.measurements) == {4}  # steps 0, 1 from the checkpoint, 2, 3 measured after the resume
    for col in ("stable_rank", "nuclear_rank", "spectral_advantage"):
        assert after[col].tolist() == pytest.approx(expected[col].tolist(), rel=1e-5), col


def test_a_resume_from_an_older_checkpoint_records_each_step_once(tmp_path):
    """A fit to step 4 with a checkpoint at 2, resumed from it into the same Run: steps 2, 3 were recorded twice. The
    resume drops the run's records of steps >= 2 with a warning; the run then holds an uninterrupted fit's records."""
    from specscope import store

    net = gpt()
    full = store.Run.create(tmp_path / "runs", "lightning", {"steps": 4})
    fit(Lit(copy.deepcopy(net)), SpecscopeCallback(every=1, estimator="gram", run=full), tmp_path / "full", 4)
    full.close()

    run = store.Run.create(tmp_path / "runs", "lightning", {"steps": 4})
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, accumulate_grad_batches=ACCUM,
                        callbacks=[SpecscopeCallback(every=1, estimator="gram", run=run), saver], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Lit(net), train_dataloaders=loader())
    run.close()
    ckpt = next(c for c in (tmp_path / "ckpt").glob("*.ckpt") if "step=2" in c.name)
    run = store.Run.open(run.path)
    with pytest.warns(UserWarning, match=r"resuming at step 2, .* records of steps >= 2.*dropped") as caught:
        fit(Lit(gpt(seed=1)), SpecscopeCallback(every=1, estimator="gram", run=run), tmp_path / "resumed", 4, ckpt_path=str(ckpt))
    run.close()
    assert [w.filename for w in caught if "dropped" in str(w.message)] == [__file__]  # fit()'s line, not Lightning's
    got, want = (store.load(r.path, metric="nuclear_rank") for r in (run, full))
    assert len(got) == len(want) and not got.duplicated(["step", "layer"]).any()
    g, w = (d.set_index(["step", "layer"]).value.sort_index() for d in (got, want))
    assert g.tolist() == pytest.approx(w.tolist(), rel=1e-5)


def test_a_checkpoint_state_the_monitor_refuses_names_the_checkpoint_and_one_without_state_warns(tmp_path):
    """Resuming with other Monitor options than the run that saved, or from an altered entry, is the checkpoint's
    fault, named with its path; a checkpoint saved without the callback resumes with a warning (the advice window
    starts empty), as the HF callback does."""
    import warnings

    from specscope.errors import RunStoreError

    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, accumulate_grad_batches=ACCUM,
                        callbacks=[SpecscopeCallback(every=1), saver], logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Lit(gpt()), train_dataloaders=loader())
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    with pytest.raises(RunStoreError, match=f"{ckpt.name} holds a SpecscopeCallback state this Monitor cannot load .*other weights"):
        fit(Lit(gpt()), SpecscopeCallback(every=1, exclude=["*mlp*"]), tmp_path / "other", 4, ckpt_path=str(ckpt))
    altered = torch.load(ckpt, weights_only=False)
    altered["callbacks"]["SpecscopeCallback"]["monitor"] = {"junk": 1}
    torch.save(altered, tmp_path / "altered.ckpt")
    with pytest.raises(RunStoreError, match=r"altered.ckpt holds .*not a Monitor's state.*delete checkpoint\['callbacks'\]"):
        fit(Lit(gpt()), SpecscopeCallback(every=1), tmp_path / "altered", 4, ckpt_path=str(tmp_path / "altered.ckpt"))

    del altered["callbacks"]["SpecscopeCallback"]
    torch.save(altered, tmp_path / "plain.ckpt")
    resumed = SpecscopeCallback(every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(Lit(gpt()), resumed, tmp_path / "plain", 3, ckpt_path=str(tmp_path / "plain.ckpt"))
    assert [w.filename for w in caught if "resuming at step 2 without Monitor state" in str(w.message)] == [__file__]
    assert set(resumed.monitor.advice(window=4).measurements) == {1}  # step 2 only


def test_configure_optimizers_helper_trains_hidden_matrices_with_muon(tmp_path):
    module = Lit(gpt(), spectral=True)
    trainer = fit(module, SpecscopeCallback(every=1), tmp_path, 2)
    opt = trainer.optimizers[0]
    algos = {n: g["algorithm"] for g in opt.param_groups for n in g["param_names"]}
    assert algos["net.blocks.0.attn.q.weight"] == "muon" and algos["net.embed.weight"] == "adamw"
    assert all(opt.state[p] for g in opt.param_groups for p in g["params"])  # every parameter was stepped


def test_16_mixed_overflow_steps_are_skipped_as_lightning_skips_them(tmp_path):
    """fp16 loss scaling overflows on purpose; its scaler skips the step. The fit goes on (it stopped with a
    NonFiniteError), the overflow step's records carry flag "nonfinite" and the next step is measured."""
    from lightning.pytorch.plugins import MixedPrecision

    from specscope import store

    run = store.Run.create(tmp_path / "runs", "lit", {"steps": 2})
    callback = SpecscopeCallback(every=1, run=run)
    # step 0 overflows float32; the scaler then drops to 2^10, which fp16 activations carry
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-117)
    trainer = fit(Lit(gpt()), callback, tmp_path, 2, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    run.close()
    assert trainer.global_step == 2 and callback.monitor.nonfinite == "skip"
    nr = store.load(run.path).query("metric == 'nuclear_rank'")
    assert set(nr.step) == {0, 1}
    assert (nr[nr.step == 0].flag == "nonfinite").all() and (nr[nr.step == 1].flag == "").all()


def test_callback_arguments_are_checked_when_it_is_made():
    from specscope.errors import ConfigError

    with pytest.raises(ConfigError, match="'evry' is not an option of Monitor; did you mean 'every'"):
        SpecscopeCallback(evry=5)
    with pytest.raises(ConfigError, match="a tuple of record names"):
        SpecscopeCallback(metrics="stable_rank")
    with pytest.raises(ConfigError, match="monitor=GPT is not a specscope Monitor"):
        SpecscopeCallback(gpt())
    with pytest.raises(ConfigError, match=r"'entropy_rank' is recorded only with extras=\('entropy_rank',\)"):
        SpecscopeCallback(every=1, metrics=("entropy_rank",))  # it logged nothing
    with pytest.raises(ConfigError, match=r"'grad_sigma_9' is recorded only up to topk \(4 here\)"):
        SpecscopeCallback(Monitor(gpt(), extras=("topk",)), metrics=("grad_sigma_9",))


class LitAuto(Lit):
    """AutoGeometry fed by the Monitor the callback measures with."""

    def __init__(self, net, monitor):
        super().__init__(net)
        self.monitor = monitor

    def configure_optimizers(self):
        return spectral_optimizer(self, 0.02, 1e-3, algorithm="auto", monitor=self.monitor)


def test_an_auto_optimizers_choices_are_popped_and_logged(tmp_path):
    """The optimizer's records are popped after every optimizer step (they piled up for the whole fit before) and its
    choices logged as specscope/<layer>/geometry."""
    module = LitAuto(gpt(), None)
    module.monitor = Monitor(module, every=1)
    trainer = fit(module, SpecscopeCallback(module.monitor), tmp_path, 2)
    assert trainer.optimizers[0]._records == []
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    chosen = [r for r in rows if r.get("specscope/net.blocks.0.mlp.down/geometry")]
    assert [int(r["step"]) for r in chosen] == [0, 1]


class TwoOptimizers(L.LightningModule):
    """A GAN-style module: two optimizers, each stepped after its own backward pass."""

    def __init__(self, net):
        super().__init__()
        self.net, self.automatic_optimization = net, False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        for opt, scale in ((first, 1.0), (second, 2.0)):
            opt.zero_grad()
            self.manual_backward(scale * lm_loss(self.net, batch))
            opt.step()

    def configure_optimizers(self):
        ps = list(self.net.parameters())
        return torch.optim.SGD(ps[: len(ps) // 2], lr=1e-3), torch.optim.SGD(ps[len(ps) // 2:], lr=1e-3)


def test_two_optimizers_stop_the_fit_at_its_start_naming_the_fix(tmp_path):
    """The first optimizer's step closed the Monitor step: the second's weights were measured with the first loss's
    gradient (a GAN's generator with the discriminator's), silently."""
    from specscope.errors import ConfigError

    callback = SpecscopeCallback(every=1)
    with pytest.raises(ConfigError, match="TwoOptimizers has 2 optimizers.*spectral_optimizer"):
        L.Trainer(accelerator="cpu", devices=1, max_steps=2, callbacks=[callback], logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False).fit(TwoOptimizers(gpt()), train_dataloaders=loader())
    assert callback.monitor.pop_records() == []


class ManualOne(Lit):
    """Manual optimization, one optimizer stepped every second batch."""

    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        self.manual_backward(lm_loss(self.net, batch) / 2)
        if batch_idx % 2 == 1:
            opt.step()
            opt.zero_grad()


def test_manual_optimization_with_one_optimizer_is_measured_per_optimizer_step(tmp_path):
    callback = SpecscopeCallback(every=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, callbacks=[callback], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(ManualOne(gpt()), train_dataloaders=loader())
    table = callback.monitor.advice()
    assert set(table.measurements) == {2} and not callback.monitor.unmeasured
    assert set(table.rows) == {2 * 4 * TRANSFORMER["seq_len"]}  # both batches of each optimizer step


def test_a_run_or_monitor_that_does_not_fit_fails_before_training(tmp_path):
    from specscope.errors import ConfigError

    with pytest.raises(ConfigError, match="run=str has no append/log/flush"):
        SpecscopeCallback(every=1, run="runs/x")
    other = Monitor(gpt(seed=1), every=1)
    with pytest.raises(ConfigError, match="the Monitor measures the weights of another model than the Lit"):
        fit(Lit(gpt()), SpecscopeCallback(other), tmp_path, 2)
    assert other.pop_records() == []
    lit = Lit(gpt())  # a Monitor of the inner model names its weights without the module's "net." (it failed at step 1)
    with pytest.raises(ConfigError, match=r"'net.embed' here is 'embed' to it.*Monitor\(self, ...\)"):
        spectral_optimizer(lit, algorithm="auto", monitor=Monitor(lit.net))
    spectral_optimizer(lit, algorithm="auto", monitor=Monitor(lit))


def test_a_second_fit_from_step_0_with_the_same_callback_stops_at_its_start(tmp_path):
    """A new Trainer given the callback of a finished fit starts at step 0: the Monitor refused it from inside the fit.
    It now stops at its start, naming a new callback or ckpt_path; a new callback measures it."""
    from specscope.errors import ConfigError

    module = Lit(gpt())
    callback = SpecscopeCallback(every=1)
    fit(module, callback, tmp_path / "a", 2)
    assert callback.monitor.last_step == 1
    weights = copy.deepcopy(module.state_dict())
    with pytest.raises(ConfigError, match=r"starts at step 0.*steps up to 1.*new SpecscopeCallback.*ckpt_path"):
        fit(module, callback, tmp_path / "b", 2)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in weights.items())
    assert callback.monitor.last_step == 1 and set(callback.monitor.advice(window=10).measurements) == {2}
    fresh = SpecscopeCallback(every=1)
    fit(module, fresh, tmp_path / "c", 2)
    assert fresh.monitor.last_step == 1 and set(fresh.monitor.advice(window=10).measurements) == {2}


def test_the_runs_records_are_on_disk_before_a_checkpoint_that_covers_them():
    """Lightning writes the checkpoint of step 2 while the run's records of steps 0, 1 could still be buffered: a
    kill then lost them for good (the resume starts after them). They are flushed before the checkpoint is written."""
    import tempfile
    from pathlib import Path

    from specscope import store

    on_disk = {}

    class Peek(L.Callback):  # after ModelCheckpoint: the checkpoint of step 2 is written when step 3 ends
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3 and 3 not in on_disk:
                on_disk[3] = sorted(store.load(run.path, metric="nuclear_rank").step.unique())

    with tempfile.TemporaryDirectory() as tmp:
        run = store.Run.create(Path(tmp) / "runs", "lightning", {}, flush_every=10**6, flush_seconds=1e9)
        saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=Path(tmp) / "ckpt", every_n_train_steps=2, save_top_k=-1)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, accumulate_grad_batches=ACCUM,
                            callbacks=[SpecscopeCallback(every=1, estimator="gram", run=run), saver, Peek()], logger=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Lit(gpt()), train_dataloaders=loader())
        run.close()
    assert on_disk[3] == [0, 1]


class SkipsOne(Lit):
    def training_step(self, batch, batch_idx):
        return None if batch_idx == 2 else lm_loss(self.net, batch)  # Lightning skips the backward and the step


def test_a_training_step_that_returns_none_is_not_measured_and_warns_nothing(tmp_path):
    """Lightning calls on_before_optimizer_step for a batch whose training_step returned None, with no gradient: every
    weight was recorded "unmeasured", each with a warning to run backward inside the block (not the user's fault)."""
    import warnings

    run = store.Run.create(tmp_path / "runs", "lightning", {"steps": 4})
    callback = SpecscopeCallback(every=1, run=run)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers|LightningModule|logging interval|returned `None`).*")
        L.Trainer(accelerator="cpu", devices=1, max_steps=4, callbacks=[callback], logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False).fit(SkipsOne(gpt()), train_dataloaders=loader())
    run.close()
    df = store.load(run.path)
    assert not (df.flag == "unmeasured").any() and (df.metric == "nuclear_rank").any()
    assert not callback.monitor.unmeasured


def test_a_closed_run_fails_when_the_callback_is_made_or_the_fit_starts(tmp_path):
    """A Run closed by its with block passed the checks and failed inside fit(), at the first measured step."""
    from specscope.errors import ConfigError

    with store.Run.create(tmp_path / "runs", "lightning", {}) as closed:
        pass
    with pytest.raises(ConfigError, match=r"run= .* was closed"):
        SpecscopeCallback(every=1, run=closed)
    with store.Run.create(tmp_path / "runs", "lightning", {}) as run:
        callback = SpecscopeCallback(every=1, run=run)
    with pytest.raises(ConfigError, match=r"run= .* was closed"):
        fit(Lit(gpt()), callback, tmp_path, 2)
    assert callback.monitor.last_step is None


class Regression(L.LightningModule):
    """y ≈ W2 relu(W1 x) on float rows, one of them NaN."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.out(torch.relu(self.hidden(x))), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("step, fix", [(0, r"check the model's initialization and the data \(no update has been made yet, so "
                                           r"the learning rate is not the cause\)"),
                                       (1, r"lower the learning rate or check the data")])
def test_a_nan_input_names_the_learning_rate_only_after_an_update(tmp_path, step, fix):
    """A NaN in the data of step 0 said "lower the learning rate" too, though no update had been made."""
    from specscope.errors import NonFiniteError

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 4, generator=g), torch.randn(4, 1, generator=g)) for _ in range(3)]
    batches[step][0][0, 0] = float("nan")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, callbacks=[SpecscopeCallback(every=1)], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(NonFiniteError, match=rf"non-finite activation entering 'hidden' at step {step} .*; {fix}") as e:
        trainer.fit(Regression(), train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert e.value.before_update == (step == 0)
