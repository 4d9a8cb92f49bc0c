"""Modular-arithmetic datasets for grokking (papers 003 and 004, REFERENCE §6).

Every example is a pair (a, b) of residues mod a prime p, fed as tokens [a, b] (paper 003) or
[a, b, =] (paper 004, `=` is token p). The target is op(a, b) mod p. A multitask dataset uses one pair
set for all its tasks, so a pair is on the same side of the split for every task and `y` has one column
per task (one head per task in the model).

Splits. `random` shuffles the ordered pairs. `commutative` shuffles unordered pairs {a, b} and puts both
orders on the same side: a memorizer of (a, b) then cannot answer (b, a) of a commutative task for free
(REFERENCE §6, split pitfall). For the random split `test_mirror_in_train` says which held-out pairs had
their mirror (b, a) trained, so accuracy on the clean remainder is the commutativity-aware figure.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from specscope.errors import ConfigError

Op = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def _inverse(b: torch.Tensor, p: int) -> torch.Tensor:
    """b^(p-2) mod p: the inverse of b ≠ 0 mod a prime (Fermat), by square-and-multiply on int64."""
    out, base, e = torch.ones_like(b), b % p, p - 2
    while e:
        if e & 1:
            out = out * base % p
        base, e = base * base % p, e >> 1
    return out


TASKS: dict[str, tuple[str, Op, bool]] = {
    # name: (formula, op, commutative)
    "add": ("a+b", lambda a, b, p: (a + b) % p, True),
    "sub": ("a-b", lambda a, b, p: (a - b) % p, False),
    "mul": ("a*b", lambda a, b, p: a * b % p, True),
    "div": ("a/b", lambda a, b, p: a * _inverse(b, p) % p, False),
    "sum_sq": ("a^2+b^2", lambda a, b, p: (a * a + b * b) % p, True),
    "quad": ("a^2+ab+b^2", lambda a, b, p: (a * a + a * b + b * b) % p, True),
    "cube": ("a^3+ab", lambda a, b, p: (a * a % p * a + a * b) % p, False),
}
SPLITS = ("random", "commutative")


@dataclass
class ModularData:
    """Tensors of one split, all on one device. x: [n, seq] token ids; y: [n, n_tasks] targets."""

    tasks: tuple[str, ...]
    p: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_mirror_in_train: torch.Tensor  # [n_test] bool: (b, a) is a training pair

    @property
    def vocab_size(self) -> int:
        return self.p + 1  # residues and the `=` token

    @property
    def seq_len(self) -> int:
        return self.x_train.shape[1]

    @property
    def train_fraction(self) -> float:
        return self.x_train.shape[0] / (self.x_train.shape[0] + self.x_test.shape[0])

    def to(self, device: torch.device | str) -> "ModularData":
        move = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return ModularData(**move)


MAX_P = 4093  # the largest prime below 2**12: p² pairs, int64, stay under half a GiB per tensor


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def check_tasks(tasks: str | Sequence[str]) -> tuple[str, ...]:
    """Task names as a tuple; an unknown name is a ConfigError listing the known ones."""
    names = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    if not names:
        raise ConfigError("no modular task given; choose from " + ", ".join(TASKS))
    for t in names:
        if t not in TASKS:
            known = ", ".join(f"{k} ({v[0]})" for k, v in TASKS.items())
            raise ConfigError(f"unknown modular task {t!r}; choose from {known}")
    return names


def all_pairs(p: int, tasks: Sequence[str]) -> torch.Tensor:
    """Every ordered pair (a, b), a, b in [0, p); b = 0 is left out when a task divides by b."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs = torch.stack([a.flatten(), b.flatten()], dim=1)
    if "div" in tasks:
        pairs = pairs[pairs[:, 1] != 0]
    return pairs


def targets(pairs: torch.Tensor, p: int, tasks: Sequence[str]) -> torch.Tensor:
    """[n, n_tasks] answers op(a, b) mod p, one column per task."""
    a, b = pairs[:, 0], pairs[:, 1]
    return torch.stack([TASKS[t][1](a, b, p) for t in tasks], dim=1)


def split_mask(pairs: torch.Tensor, p: int, train_fraction: float, split: str, seed: int) -> torch.Tensor:
    """Bool mask of training pairs: round(train_fraction · n) ordered pairs (the commutative split may
    exceed that by one, as it moves pairs in groups of one or two).

    `commutative` draws unordered groups {a, b} in random order and adds both orders of each.
    """
    n = pairs.shape[0]
    n_train = round(train_fraction * n)
    g = torch.Generator().manual_seed(seed)
    if split == "random":
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=g)[:n_train]] = True
        return mask
    lo, hi = pairs.min(dim=1).values, pairs.max(dim=1).values
    group = lo * p + hi  # the same id for (a, b) and (b, a)
    ids, inverse, sizes = torch.unique(group, return_inverse=True, return_counts=True)
    order = torch.randperm(len(ids), generator=g)
    taken = torch.cumsum(sizes[order], 0) - sizes[order] < n_train  # group starts below the target
    in_train = torch.zeros(len(ids), dtype=torch.bool)
    in_train[order[taken]] = True
    return in_train[inverse]


def modular_dataset(
    tasks: str | Sequence[str] = "add",
    p: int = 97,
    train_fraction: float = 0.5,
    split: str = "random",
    seed: int = 0,
    eq_token: bool = False,
    device: torch.device | str = "cpu",
) -> ModularData:
    """Build the train/test split of op(a, b) mod p for one or several tasks.

    `eq_token` appends the `=` token (id p) as in paper 004. The split depends only on (p, tasks with
    or without `div`, train_fraction, split, seed), so every arm and task of a run sees the same pairs.
    """
    names = check_tasks(tasks)
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or not 2 <= p <= MAX_P:
        raise ConfigError(f"p={p!r} must be an integer prime from 2 to {MAX_P}: the dataset holds all p² pairs "
                          f"({MAX_P}² ≈ 17M); the published setups use 97 and 113")
    p = int(p)
    if not is_prime(p):
        raise ConfigError(f"p={p} is not a prime; modular division and the published setups need a prime (e.g. 97, 113)")
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(f"train_fraction={train_fraction} must lie strictly between 0 and 1")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    pairs = all_pairs(p, names)
    mask = split_mask(pairs, p, train_fraction, split, seed)
    if mask.all() or not mask.any():
        raise ConfigError(f"train_fraction={train_fraction} leaves an empty train or test set at p={p}; use a larger p")
    x = pairs if not eq_token else torch.cat([pairs, torch.full((len(pairs), 1), p)], dim=1)
    y = targets(pairs, p, names)
    code = pairs[:, 0] * p + pairs[:, 1]
    train_codes = code[mask]
    mirror = pairs[~mask][:, 1] * p + pairs[~mask][:, 0]
    data = ModularData(
        tasks=names, p=p, x_train=x[mask], y_train=y[mask], x_test=x[~mask], y_test=y[~mask],
        test_mirror_in_train=torch.isin(mirror, train_codes),
    )
    return data.to(device)
