"""specscope.train.distributed.save and load in one process: a save before the first step leaves the training as it
was, and a checkpoint loaded into objects it does not fit is one clear error."""

import copy

import pytest
import torch

from specscope.errors import ConfigError, RunStoreError
from specscope.optim import AutoGeometry, Muon
from specscope.probe import Monitor
from specscope.train import distributed as D


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3))


def _optimizer(kind, model, monitor):
    named = list(model.named_parameters())
    weights = [(n, p) for n, p in named if n.endswith("weight")]
    biases = {"params": [(n, p) for n, p in named if n.endswith("bias")], "algorithm": "adamw", "lr": 1e-2}
    if kind == "muon":
        return Muon([{"params": weights}, biases], lr=0.02, polar="gram")
    if kind == "auto":
        return AutoGeometry([{"params": weights}, biases], lr=0.05, monitor=monitor, hysteresis=0.5)
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(kind, save_first, tmp_path):
    model = _net()
    monitor = Monitor(model)
    opt = _optimizer(kind, model, monitor)
    if save_first:
        D.save(tmp_path / f"{kind}-initial", model, opt, monitor)
    records = []
    for step in range(3):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step))
        with monitor.step(step):
            model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        records += [(r.step, r.layer, r.metric, r.value) for r in getattr(opt, "pop_records", list)()]
    return {n: p.detach().clone() for n, p in model.named_parameters()}, records, copy.deepcopy(getattr(opt, "choices", None))


@pytest.mark.parametrize("kind", ["muon", "auto", "adamw"])
def test_a_save_before_the_first_step_changes_nothing_that_follows(kind, tmp_path):
    """torch's get_state_dict gives a never-stepped optimizer its state by a zero-gradient, lr=0 step: AdamW's step
    count shifted its bias correction (parameters off by 3.7e-3 after two steps), and AutoGeometry decided every
    layer from the zero gradient and recorded that step."""
    plain, saved = _train(kind, False, tmp_path), _train(kind, True, tmp_path)
    for name, p in plain[0].items():
        assert torch.equal(saved[0][name], p), name
    assert saved[1] == plain[1] and saved[2] == plain[2]


def test_a_checkpoint_loaded_into_objects_it_does_not_fit_is_one_clear_error(tmp_path):
    """torch's CheckpointException is a BaseException whose message names only the ranks; the cause was in the
    traceback."""
    model = _net()
    opt = _optimizer("adamw", model, None)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    D.save(tmp_path / "ck", model, opt)
    with pytest.raises(ConfigError, match=r"does not fit .*Missing key in checkpoint state_dict: monitor.*without a Monitor"):
        D.load(tmp_path / "ck", model, opt, Monitor(model))
    other = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 4))
    with pytest.raises(ConfigError, match=r"does not fit .*Size mismatch"):
        D.load(tmp_path / "ck", other, _optimizer("adamw", other, None))


class _Branchy(torch.nn.Module):
    """`b` is used from step 2 on: before that the optimizer holds no state for it (a branch, an expert not routed to)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = (torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x, use_b):
        return self.head(self.b(self.a(x)) if use_b else self.a(x))


def _branchy(kind):
    model = _Branchy()
    named = list(model.named_parameters())
    if kind == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, Muon([{"params": [p for n, p in named if n.endswith("weight")]},
                        {"params": [p for n, p in named if n.endswith("bias")], "algorithm": "adamw", "lr": 1e-2}], lr=0.02)


def _steps(model, opt, steps):
    for step in steps:
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        model(x, use_b=step >= 2).square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("kind", ["adamw", "muon"])
@pytest.mark.parametrize("at", [0, 1])
def test_a_run_resumed_from_a_checkpoint_with_stateless_parameters_steps_as_the_saving_one(kind, at, tmp_path):
    """Saved before the first step (at 0), the checkpoint held the zero step's state (AdamW step 1: the resumed
    parameters were 0.047 off after three steps); saved while `b` had no state yet (at 1), torch wrote no keys for it
    and the load into fresh objects failed ("Missing key in checkpoint state_dict: optim.state.b.weight.step")."""
    model, opt = _branchy(kind)
    _steps(model, opt, range(at))
    D.save(tmp_path / "ck", model, opt)
    _steps(model, opt, range(at, 4))
    again, opt2 = _branchy(kind)
    D.load(tmp_path / "ck", again, opt2)
    assert not any(opt2.state.get(p) for p in again.b.parameters())
    _steps(again, opt2, range(at, 4))
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name


def test_an_extra_that_cannot_be_loaded_is_refused_before_anything_is_written(tmp_path):
    """load reads `extra` with weights_only=True: an object of a class of the user's was saved, then the resume raised
    torch's UnpicklingError; a lambda raised pickle's error from inside DCP."""
    model, opt = _branchy("adamw")
    for extra in ({"cfg": _Branchy}, {"f": lambda: 1}, [1, 2]):
        with pytest.raises(ConfigError, match=r"save\(extra="):
            D.save(tmp_path / "ck", model, opt, extra=extra)
        assert not (tmp_path / "ck").exists()
    D.save(tmp_path / "ck", model, opt, extra={"step": 3, "note": "ok", "t": torch.ones(2)})
    assert D.load(tmp_path / "ck", *_branchy("adamw"))["step"] == 3


def test_a_checkpoint_that_cannot_be_written_is_a_run_store_error_not_torchs_checkpoint_exception(tmp_path):
    (tmp_path / "file").write_text("x")
    model, opt = _branchy("adamw")
    with pytest.raises(RunStoreError, match=r"could not write the checkpoint .*file'"):
        D.save(tmp_path / "file", model, opt)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_checkpoint_file_is_named_not_loaded_as_wrong_weights(tmp_path, damage):
    """DCP's shards carried no checksum: one flipped bit in a weight loaded as -3.2e35 without a word, a truncated shard
    read as 'does not fit what it is loaded into' with the fix of loading it elsewhere."""
    model, opt = _branchy("adamw")
    _steps(model, opt, range(2))
    D.save(tmp_path / "ck", model, opt)
    (shard,) = (tmp_path / "ck").glob("*.distcp")
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:100]))
    else:
        shard.unlink()
    what = "missing" if damage == "delete" else "changed since it was saved"
    with pytest.raises(RunStoreError, match=rf"checkpoint .*ck: {shard.name} \({what}\); the checkpoint is damaged"):
        D.load(tmp_path / "ck", *_branchy("adamw"))


def test_a_checkpoint_saved_before_checksums_were_kept_still_loads(tmp_path):
    model, opt = _branchy("adamw")
    _steps(model, opt, range(2))
    D.save(tmp_path / "ck", model, opt)
    (tmp_path / "ck" / D.CHECKSUMS).unlink()
    again, opt2 = _branchy("adamw")
    D.load(tmp_path / "ck", again, opt2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_gradients_held_at_a_save_or_a_load_do_not_drop_the_optimizer_state(kind, tmp_path):
    """torch initialises optimizer state only where no parameter holds a gradient: a save after backward and before
    the first step wrote no optimizer keys (its load then failed), and a load into a model that had run a backward
    loaded no optimizer state at all, in silence (the AdamW moments gone)."""
    model, opt = _branchy(kind)
    model(torch.randn(8, 4), use_b=True).square().mean().backward()
    D.save(tmp_path / "first", model, opt)  # gradients present, no step yet
    assert all(p.grad is not None for p in model.parameters()) and not opt.state
    D.load(tmp_path / "first", *_branchy(kind))
    _steps(model, opt, range(3))
    D.save(tmp_path / "later", model, opt)
    _steps(model, opt, range(3, 5))
    again, opt2 = _branchy(kind)
    again(torch.randn(8, 4), use_b=True).sum().backward()  # a stray backward before the load
    D.load(tmp_path / "later", again, opt2)
    assert any(opt2.state.get(p) for p in again.parameters())
    opt2.zero_grad()
    _steps(again, opt2, range(3, 5))
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_file_of_a_checkpoint_without_checksums_is_named_as_damage(tmp_path, damage):
    """Without checksums.json (saved before it was written) a missing or truncated shard read as "does not fit what it
    is loaded into", with the fix of loading it into other objects."""
    model, opt = _branchy("adamw")
    _steps(model, opt, range(2))
    D.save(tmp_path / "ck", model, opt)
    (tmp_path / "ck" / D.CHECKSUMS).unlink()
    (shard,) = (tmp_path / "ck").glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:100]) if damage == "truncate" else shard.unlink()
    with pytest.raises(RunStoreError, match=r"a file of the checkpoint .*ck' is missing or damaged .*saved without checksums.json"):
        D.load(tmp_path / "ck", *_branchy("adamw"))


def _auto(model, euclidean):
    named = list(model.named_parameters())
    return AutoGeometry([{"params": [(n, p) for n, p in named if n.endswith("weight")]},
                         {"params": [(n, p) for n, p in named if n.endswith("bias")], "algorithm": "adamw", "lr": 1e-2}],
                        lr=0.05, monitor=lambda layer: 2.0, euclidean=euclidean, polar="gram")


def _auto_steps(model, opt, steps):
    for step in steps:
        model(torch.randn(16, 6, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_another_optimizers_state_in_a_checkpoint_is_one_config_error_not_dropped(tmp_path):
    """DCP loads the keys its target asks for and ignores the others: AutoGeometry(euclidean="adamw")'s checkpoint
    loaded into one with euclidean="sgd" in silence, its group now "adamw" and its Adam moments gone."""
    model = _net()
    opt = _auto(model, "adamw")
    _auto_steps(model, opt, range(2))
    D.save(tmp_path / "ck", model, opt)
    again = _net()
    with pytest.raises(ConfigError, match=r"holds optimizer state this optimizer does not keep \(for parameter '0\.weight': "
                                          r"\['adam_step', 'exp_avg', 'exp_avg_sq'\].*build the optimizer as the run that saved it"):
        D.load(tmp_path / "ck", again, _auto(again, "sgd"))
    D.load(tmp_path / "ck", again, _auto(again, "adamw"))  # the optimizer it was saved with loads


def test_autogeometry_choices_after_a_load_are_the_saved_ones(tmp_path):
    """They were those of the zero-gradient step that gives a fresh optimizer its state for the load (every layer
    "euclidean"), until the next step."""
    model = _net()
    opt = _auto(model, "adamw")
    _auto_steps(model, opt, range(3))
    assert "spectral" in opt.choices.values()
    D.save(tmp_path / "ck", model, opt)
    again = _net()
    opt2 = _auto(again, "adamw")
    D.load(tmp_path / "ck", again, opt2)
    assert opt2.choices == opt.choices
