"""Refusals found by a review: each bad input gets one ValueError naming the argument, never a raw torch error or
a silently different computation (an unknown mode treated as "remove", k ≥ P random directions, a loss merged
with the update window, dropout-noised couplings, an overflowed Gram reported as a window of zero vectors)."""

from __future__ import annotations

import pytest
import torch

from specscope.subspace import GradientProjection, RollingSVD, SEDTracker, coupling_ratios, flatten, project, random_basis


def _param(n: int = 8, seed: int = 0) -> torch.nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(n, generator=g))
    p.grad = torch.randn(n, generator=g)
    return p


def test_project_refuses_an_unknown_mode_and_a_basis_of_another_size():
    with pytest.raises(ValueError, match="mode must be 'keep' or 'remove', got 'Keep'"):
        project(torch.ones(3), torch.eye(3)[:1], "Keep")  # returned the "remove" result
    with pytest.raises(ValueError, match=r"g \(3,\).*Q \(1, 4\)"):
        project(torch.ones(3), torch.eye(4)[:1], "keep")


def test_gradient_projection_refuses_k_spanning_every_parameter_and_a_foreign_window():
    p = _param()
    with pytest.raises(ValueError, match="k=50 random directions in 8 parameters"):
        GradientProjection([p], "random", k=50)  # used 8 rows: keep = identity, remove = zero gradient
    with pytest.raises(ValueError, match="k=8 random directions in 8 parameters"):
        GradientProjection([p], "random", k=8)
    with pytest.raises(ValueError, match="seed must be an int"):
        GradientProjection([p], "random", seed="a")
    sed = RollingSVD(2, 1)
    for _ in range(2):
        sed.push(torch.randn(5))
    with pytest.raises(ValueError, match="vectors of 5 entries, the parameters have 8"):
        GradientProjection([p], sed, k=1)
    late = RollingSVD(2, 1)
    proj = GradientProjection([p], late, k=1)  # empty at construction: checked when it is used
    for _ in range(2):
        late.push(torch.randn(5))
    with pytest.raises(ValueError, match="vectors of 5 entries, the parameters have 8"):
        proj.apply()  # was "size mismatch" from inside torch
    with pytest.raises(ValueError, match="lacks"):
        GradientProjection([p], "random").load_state_dict({})  # KeyError 'generator'


def test_random_basis_and_flatten_name_their_arguments():
    g = torch.Generator().manual_seed(0)
    for k in (-1, 0, 4):
        with pytest.raises(ValueError, match=r"k must be an int with 1 ≤ k ≤ dim \(3\)"):
            random_basis(3, k, g)
    with pytest.raises(ValueError, match="no parameters given"):
        flatten([], [])


def test_rolling_svd_refuses_an_overflowing_gram_instead_of_reporting_no_direction():
    s = RollingSVD(2, 1, dtype=torch.float64)
    s.push(torch.ones(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="Gram matrix overflowed float64"):
        s.push(torch.full((8,), 1e200, dtype=torch.float64))  # σ = inf, directions() empty, "zero vectors" warning
    assert len(s) == 1 and torch.equal(s._rows[1], torch.zeros(8, dtype=torch.float64))  # refused push left no trace
    s.push(torch.ones(8, dtype=torch.float64))
    assert s.directions().shape == (1, 8)
    with pytest.raises(ValueError, match="overflow this tracker's torch.float32"):
        RollingSVD(2, 1).push(torch.full((8,), 1e200, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        RollingSVD(2, 1).push(torch.tensor([1.0, float("inf")]))
    fresh = RollingSVD(2, 1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fresh.push(torch.tensor([1.0, float("nan")]))
    assert fresh.state_dict()["rows"] is None  # a refused first push allocates nothing


def test_rolling_svd_refuses_a_list_and_a_malformed_state():
    with pytest.raises(ValueError, match="must be a real torch.Tensor, got list"):
        RollingSVD(3, 2).push([1.0, 2.0])
    with pytest.raises(ValueError, match=r"lacks \['rows', 'gram', 'count', 'previous'\]"):
        RollingSVD(3, 1).load_state_dict({})
    s = RollingSVD(3, 1)
    s.push(torch.randn(5))
    with pytest.raises(ValueError, match="count=-5 must be an int ≥ 0"):
        RollingSVD(3, 1).load_state_dict({**s.state_dict(), "count": -5})


def test_sed_tracker_refuses_bad_settings_at_construction():
    W = torch.nn.Parameter(torch.randn(3, 2))
    loss = lambda: W.pow(2).sum()  # noqa: E731
    for every in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="every must be an int ≥ 1"):
            SEDTracker([W], {"g": loss}, every=every)
    with pytest.raises(ValueError, match="'update-sed' is reserved"):
        SEDTracker([W], {"update-sed": loss})  # was merged with the update window
    SEDTracker([W], {"update-sed": loss}, update=False)  # no update window: the name is free
    with pytest.raises(ValueError, match="losses must be a dict"):
        SEDTracker([W], [loss])
    with pytest.raises(ValueError, match=r"losses\['g'\] must map a str name to a callable"):
        SEDTracker([W], {"g": 3.0})
    with pytest.raises(ValueError, match="params must be a non-empty list of tensors"):
        SEDTracker([], {"g": loss})
    with pytest.raises(ValueError, match=r"holds windows \[\], this tracker has \['g', 'update-sed'\]"):
        SEDTracker([W], {"g": loss}).load_state_dict({"seds": {}, "before": None})


def test_sed_tracker_names_a_loss_that_is_not_a_differentiable_scalar():
    W = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.SGD([W], lr=0.1)
    bad = {"vector": (lambda: W.sum(1), "a tensor of shape \\(3,\\)"),
           "detached": (lambda: W.pow(2).sum().detach(), "a tensor that does not require grad"),
           "number": (lambda: 1.0, "float")}
    for name, (fn, match) in bad.items():
        with pytest.raises(ValueError, match=f"loss '{name}' returned {match}"):
            SEDTracker([W], {name: fn}, every=1).after_backward(0, None, opt)


def test_sed_tracker_refuses_a_loss_of_other_parameters_instead_of_pushing_zeros():
    """A closure over another model's weights pushed zero vectors into its window, and the SED came out empty."""
    W, other = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.SGD([W], lr=0.1)
    tracker = SEDTracker([W], {"gradient-sed": lambda: other.pow(2).sum()}, window=2, k=1, every=1)
    with pytest.raises(ValueError, match="loss 'gradient-sed' does not depend on any tracked parameter"):
        tracker.after_backward(0, None, opt)
    assert tracker.seds["gradient-sed"]._count == 0  # nothing pushed
    both = SEDTracker([W, other], {"gradient-sed": lambda: W.pow(2).sum()}, window=2, k=1, every=1)
    both.after_backward(0, None, opt)  # a loss of some of the tracked parameters is a snapshot (zeros for the rest)
    assert both.seds["gradient-sed"]._count == 1


def _coupling_setup():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 3)
    return W, x, torch.randn(2, 12)


def test_coupling_refuses_random_centroids_and_names_its_arguments():
    W, x, V = _coupling_setup()
    drop = torch.nn.Dropout(0.5)  # training mode, as in a freshly built model
    with pytest.raises(ValueError, match=r"different values in two calls.*model.eval\(\)"):
        coupling_ratios(lambda: drop(x @ W.T), [W], V, n_random=3)  # returned plausible ratios ≈ 1
    drop.eval()
    ratios, baseline = coupling_ratios(lambda: drop(x @ W.T), [W], V, n_random=3)
    assert len(ratios) == 2 and baseline > 0
    with pytest.raises(ValueError, match="eps_rel=1e-300 is at or below torch.float32's rounding"):
        coupling_ratios(lambda: x @ W.T, [W], V, eps_rel=1e-300, n_random=3)  # blamed NaN centroids
    with pytest.raises(ValueError, match="eps_rel must be a number in"):
        coupling_ratios(lambda: x @ W.T, [W], V, eps_rel="0.1")
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        coupling_ratios(lambda: x @ W.T, [W], V, generator=3)
    with pytest.raises(ValueError, match="returned a 0-d tensor"):
        coupling_ratios(lambda: (x @ W.T).sum(), [W], V, n_random=3)
    with pytest.raises(ValueError, match="returned list"):
        coupling_ratios(lambda: [1.0], [W], V, n_random=3)
    with pytest.raises(ValueError, match="params must be a non-empty list"):
        coupling_ratios(lambda: x @ W.T, [], V)


def test_coupling_refuses_a_step_that_underflows_to_no_change():
    from specscope.subspace import directional_coupling

    W, x, V = _coupling_setup()
    with pytest.raises(ValueError, match="changes no parameter in torch.float32"):
        directional_coupling(lambda: x @ W.T, [W], V[0], eps=1e-50)  # returned A = 0.0: no step at all


def test_rolling_svd_refuses_a_vector_whose_squared_norm_underflows():
    """A float64 vector of 1e-170 has a squared norm of 1e-340, below float64's range: it read σ = 0 and no direction."""
    s = RollingSVD(2, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="underflows float64.*rescale"):
        s.push(torch.full((8,), 1e-170, dtype=torch.float64))
    assert s.state_dict()["rows"] is None  # refused, nothing kept
    s.push(torch.full((8,), 1e-150, dtype=torch.float64))  # 8e-300: inside the range
    assert float(s.singular_values()[0]) == pytest.approx(1e-150 * 8 ** 0.5, rel=1e-12)
    s.push(torch.zeros(8, dtype=torch.float64))  # a zero vector is no underflow
    assert len(s) == 2


def test_a_nan_snapshot_names_its_loss_and_step_and_a_bad_saved_before_is_refused():
    """A NaN fixed-batch loss raised only RollingSVD's 'the vector has NaN or Inf entries' (no loss, no step); a
    state whose 'before' was of another size loaded and failed at the next after_step with a size mismatch."""
    from specscope.errors import NonFiniteError

    W = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.SGD([W], lr=0.1)
    tracker = SEDTracker([W], {"fixed": lambda: W.sum() * float("nan")}, window=2, k=1, every=1)
    with pytest.raises(NonFiniteError, match=r"gradient of loss 'fixed' at step 7 has NaN or Inf entries"):
        tracker.after_backward(7, None, opt)
    good = SEDTracker([W], {"fixed": lambda: W.pow(2).sum()}, window=2, k=1, every=1)
    good.after_backward(0, None, opt)
    state = good.state_dict()
    for before in (torch.zeros(3), torch.full((16,), float("nan")), "x"):
        with pytest.raises(ValueError, match=r"SEDTracker.load_state_dict: 'before' is .*not None or the 16 finite"):
            SEDTracker([W], {"fixed": lambda: W.pow(2).sum()}, window=2, k=1, every=1).load_state_dict(state | {"before": before})


def test_a_projection_refuses_more_directions_than_its_window_another_k_and_sparse_gradients():
    """k=5 from a window of 2 projected on 2 directions in silence; a saved random basis of k=2 loaded into a k=3
    projection kept projecting on 2; a sparse embedding gradient raised torch's NotImplementedError."""
    p = _param(20)
    with pytest.raises(ValueError, match=r"k=5 directions from a RollingSVD of window 2"):
        GradientProjection([p], RollingSVD(window=2, k=1), k=5)
    two = GradientProjection([p], "random", k=2)
    two.apply()
    with pytest.raises(ValueError, match=r"saved basis has 2 random directions, this projection 3"):
        GradientProjection([p], "random", k=3).load_state_dict(two.state_dict())
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="the gradient of parameter 0 is sparse"):
        GradientProjection([emb.weight], "random", k=2).apply()
    with pytest.raises(ValueError, match="RollingSVD.push: the vector is sparse"):
        RollingSVD(window=2, k=1).push(emb.weight.grad)
