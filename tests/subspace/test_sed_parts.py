"""SEDTracker and GatedProjection: snapshots are the true gradients/updates and never touch training."""

from __future__ import annotations

import pytest
import torch

from specscope.subspace import GradientProjection
from specscope.subspace.snapshots import UPDATE, GatedProjection, SEDTracker


def setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    return W, b, x


def test_tracker_pushes_the_fixed_batch_gradient_and_the_optimizer_step():
    W, b, x = setup()
    fixed = lambda: ((x @ W.T + b) ** 2).sum()  # noqa: E731
    tracker = SEDTracker([W], {"gradient-sed": fixed}, window=3, k=1, every=1, update=True, update_delta="step")
    opt = torch.optim.SGD([W, b], lr=0.1)
    for step in range(4):
        opt.zero_grad()
        (x @ W.T + b).sin().sum().backward()  # the training loss differs from the fixed-batch loss
        train_grad = W.grad.clone()
        expected = 2 * ((x @ W.T + b).T @ x).detach()  # d/dW of the fixed-batch loss
        before = W.detach().clone()
        tracker.after_backward(step, None, opt)
        assert torch.equal(W.grad, train_grad)  # .grad untouched
        opt.step()
        tracker.after_step(step, None, opt)
        n = min(step + 1, 3)
        rows = {name: sed._rows[step % 3] for name, sed in tracker.seds.items()}  # float32 ring buffers
        assert torch.allclose(rows["gradient-sed"], expected.reshape(-1).float(), rtol=1e-6)
        assert torch.allclose(rows[UPDATE], (W.detach() - before).reshape(-1).float(), rtol=1e-6)
        assert len(tracker.seds[UPDATE]) == n


def test_tracker_records_gap_and_rotation_only_once_full():
    W, b, x = setup()
    tracker = SEDTracker([W, b], {"g": lambda: (x @ W.T + b).pow(3).sum()}, window=2, k=1, every=1, update=False)
    r0 = tracker.after_backward(0, None, None)
    assert {r.metric for r in r0} == {"snapshot_norm"}
    with torch.no_grad():
        W.add_(0.3)
    r1 = {r.metric for r in tracker.after_backward(1, None, None)}
    assert {"sed_gap", "sed_sigma1"} <= r1 and "sed_rotation" not in r1  # nothing to compare with yet
    with torch.no_grad():
        W.add_(0.3)
    assert "sed_rotation" in {r.metric for r in tracker.after_backward(2, None, None)}


def test_gated_projection_waits_for_the_window_then_keeps_the_subspace():
    W, b, x = setup()
    tracker = SEDTracker([W], {"g": lambda: (x @ W.T + b).pow(2).sum()}, window=2, k=1, every=1, update=False)
    sed = tracker.seds["g"]
    gate = GatedProjection(GradientProjection([W], sed, mode="keep", k=1), lambda: sed.full)
    W.grad = torch.ones_like(W)
    tracker.after_backward(0, None, None)
    assert gate.after_backward(0, None, None) == [] and torch.equal(W.grad, torch.ones_like(W))
    with torch.no_grad():
        W.mul_(1.5)
    tracker.after_backward(1, None, None)
    gate.after_backward(1, None, None)
    v = sed.directions(1)[0].double()
    g = torch.ones(12, dtype=torch.float64)
    assert torch.allclose(W.grad.reshape(-1), (v @ g) * v, atol=1e-6)


def test_tracker_state_survives_a_checkpoint_and_continues_identically(tmp_path):
    from specscope.train import load_checkpoint, save_checkpoint

    W, b, x = setup()
    loss = lambda: (x @ W.T + b).tanh().sum()  # noqa: E731
    a = SEDTracker([W], {"g": loss}, window=3, k=2, every=1)
    for step in range(4):
        a.after_backward(step, None, None)
        with torch.no_grad():
            W.mul_(0.9)
        a.after_step(step, None, None)
    save_checkpoint(tmp_path / "c.pt", {"tracker": a.state_dict()})
    b_ = SEDTracker([W], {"g": loss}, window=3, k=2, every=1)
    b_.load_state_dict(load_checkpoint(tmp_path / "c.pt")["tracker"])
    ra, rb = a.after_backward(4, None, None), b_.after_backward(4, None, None)
    assert ra == rb
    for name in ("g", UPDATE):
        assert torch.equal(a.seds[name].directions(), b_.seds[name].directions())


def test_update_without_decay_is_minus_lr_times_the_adam_direction():
    """AdamW: θ_t = θ_{t−1}(1 − lr·wd) − lr·adam; with exclude_decay the pushed update is −lr·adam,
    identical to the step of Adam (no decay) from the same state."""
    W, b, x = setup()
    loss = lambda: (x @ W.T + b).sin().sum()  # noqa: E731
    W2 = torch.nn.Parameter(W.detach().clone())
    tracker = SEDTracker([W], {}, window=2, k=1, every=1, update=True, update_delta="step", exclude_decay=True)
    opt = torch.optim.AdamW([{"params": [W], "weight_decay": 0.5}, {"params": [b]}], lr=0.1)
    plain = torch.optim.Adam([W2], lr=0.1)
    for step in range(2):
        opt.zero_grad()
        plain.zero_grad()
        loss().backward()
        W2.grad = W.grad.clone()
        tracker.after_backward(step, None, opt)
        before = W.detach().clone()
        opt.step()
        tracker.after_step(step, None, opt)
        w2 = W2.detach().clone()
        plain.step()  # Adam from the same moments: its step is −lr·adam on W's gradient history
        assert torch.allclose(tracker.seds[UPDATE]._rows[step], (W2.detach() - w2).reshape(-1).float(), atol=1e-7)
        assert not torch.allclose((W.detach() - before).reshape(-1).float(), tracker.seds[UPDATE]._rows[step])
        W2.data.copy_(W.detach())  # keep the two on the same θ so only the decay differs


def test_update_between_snapshots_is_the_accumulated_change():
    """update_delta="snapshots": the pushed update is θ at this snapshot minus θ at the previous one,
    i.e. the sum of the `every` optimizer steps in between; the first snapshot pushes nothing."""
    W, b, x = setup()
    tracker = SEDTracker([W], {}, window=3, k=1, every=3, update=True)
    opt = torch.optim.AdamW([W, b], lr=0.05, weight_decay=0.1)
    at_snapshot = []
    for step in range(7):
        opt.zero_grad()
        (x @ W.T + b).sin().sum().backward()
        if step % 3 == 0:
            tracker.after_backward(step, None, opt)
        opt.step()
        if step % 3 == 0:
            tracker.after_step(step, None, opt)
            at_snapshot.append(W.detach().clone().reshape(-1).float())
    sed = tracker.seds[UPDATE]
    assert len(sed) == 2  # snapshots at steps 0, 3, 6 -> two differences
    for i in range(2):
        assert torch.allclose(sed._rows[i], at_snapshot[i + 1] - at_snapshot[i], atol=1e-7)
    with pytest.raises(ValueError, match="update_delta='step'"):
        SEDTracker([W], {}, exclude_decay=True)
