"""Modular-arithmetic data: answers, split disjointness, the commutativity-aware split, errors."""

import numpy
import pytest
import torch

from specscope.data.modular import TASKS, modular_dataset
from specscope.errors import ConfigError


def _codes(x: torch.Tensor, p: int) -> set[int]:
    return set((x[:, 0] * p + x[:, 1]).tolist())


@pytest.mark.parametrize("task", list(TASKS))
def test_targets_match_python_arithmetic(task):
    p = 7
    formula = {
        "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
        "div": lambda a, b: a * pow(b, -1, p), "sum_sq": lambda a, b: a * a + b * b,
        "quad": lambda a, b: a * a + a * b + b * b, "cube": lambda a, b: a**3 + a * b,
    }[task]
    d = modular_dataset(task, p, 0.5, seed=1)
    for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
        for (a, b), t in zip(x.tolist(), y[:, 0].tolist()):
            assert t == formula(a, b) % p
    n_pairs = p * (p - 1) if task == "div" else p * p  # b = 0 has no inverse
    assert len(d.x_train) + len(d.x_test) == n_pairs


@pytest.mark.parametrize("split", ["random", "commutative"])
@pytest.mark.parametrize("frac", [0.3, 0.5, 0.8])
def test_no_pair_in_both_sides_and_fraction(split, frac):
    p = 13
    d = modular_dataset("add", p, frac, split, seed=3)
    train, test = _codes(d.x_train, p), _codes(d.x_test, p)
    assert not train & test
    assert len(train) == len(d.x_train) and len(test) == len(d.x_test)  # no duplicates
    assert len(train | test) == p * p
    slack = 1 if split == "commutative" else 0  # groups of two may overshoot by one pair
    assert round(frac * p * p) <= len(train) <= round(frac * p * p) + slack


@pytest.mark.parametrize("task", ["add", "sub", "div"])
def test_commutative_split_keeps_both_orders_together(task):
    p = 11
    d = modular_dataset(task, p, 0.5, "commutative", seed=0)
    for x in (d.x_train, d.x_test):
        codes = _codes(x, p)
        # div has no pairs (a, 0), so (0, b) has no mirror
        mirrored = {b * p + a for a, b in x.tolist() if not (task == "div" and a == 0)}
        assert mirrored <= codes
    assert not d.test_mirror_in_train.any()


def test_random_split_flags_mirrors_in_train():
    p = 11
    d = modular_dataset("add", p, 0.5, "random", seed=0)
    train = _codes(d.x_train, p)
    expect = [(b * p + a) in train for a, b in d.x_test.tolist()]
    assert d.test_mirror_in_train.tolist() == expect
    assert 0 < sum(expect) < len(expect)


def test_split_is_a_function_of_the_seed():
    a, b = modular_dataset("add", 11, 0.5, seed=4), modular_dataset("add", 11, 0.5, seed=4)
    c = modular_dataset("add", 11, 0.5, seed=5)
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)


def test_multitask_shares_pairs_and_has_a_column_per_task():
    d = modular_dataset(["add", "mul", "div"], 7, 0.5, eq_token=True)
    assert d.y_train.shape == (len(d.x_train), 3)
    assert d.x_train.shape[1] == 3 and (d.x_train[:, 2] == 7).all() and d.vocab_size == 8
    assert (d.x_train[:, 1] != 0).all() and (d.x_test[:, 1] != 0).all()


@pytest.mark.parametrize("kw, words", [
    ({"p": 12}, "not a prime"), ({"tasks": "pow"}, "unknown modular task"),
    ({"train_fraction": 1.0}, "strictly between"), ({"split": "diagonal"}, "unknown split"),
])
def test_user_errors_name_the_problem(kw, words):
    args = {"tasks": "add", "p": 7, "train_fraction": 0.5, "split": "random", **kw}
    with pytest.raises(ConfigError, match=words):
        modular_dataset(**args)


@pytest.mark.parametrize("p", [2**61 - 1, 100003, 97.0, True])
def test_a_p_too_large_or_not_an_integer_is_refused_at_once(p):
    """p = 2**61 − 1 once hung in the trial-division primality test, and 100003 asked torch for 80 GB."""
    with pytest.raises(ConfigError, match=r"must be an integer prime from 2 to 4093"):
        modular_dataset(p=p)
    assert modular_dataset(p=numpy.int64(97)).p == 97
