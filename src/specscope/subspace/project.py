"""Projection interventions on a parameter set's gradient, applied between backward and the optimizer step.

With Q the orthonormal rows [k, P] of a subspace and g the flattened gradient: keep g ← Qᵀ(Q g),
remove g ← g − Qᵀ(Q g). Keep + remove = identity; both are idempotent (tested). "Rank k" here means a
k-dimensional subspace of the whole flattened parameter vector, not a matrix rank.
"""

from __future__ import annotations

from typing import Callable, Iterable, Literal

import torch
from torch import Tensor

from specscope.records import Record
from specscope.subspace.rolling import RollingSVD


def flatten(tensors: Iterable[Tensor | None], like: Iterable[Tensor]) -> Tensor:
    """Concatenate tensors (None -> zeros shaped like the matching entry of `like`) into one vector."""
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(tensors, like)])


def unflatten_(vector: Tensor, into: list[Tensor]) -> None:
    """Copy consecutive slices of `vector` into the tensors of `into`, in place."""
    offset = 0
    for t in into:
        n = t.numel()
        t.copy_(vector[offset : offset + n].view_as(t))
        offset += n


def project(g: Tensor, Q: Tensor, mode: Literal["keep", "remove"]) -> Tensor:
    """Project vector g onto (keep) or away from (remove) the row space of the orthonormal rows Q."""
    kept = Q.T @ (Q @ g.to(Q.dtype))
    return (kept if mode == "keep" else g - kept.to(g.dtype)).to(g.dtype)


def random_basis(dim: int, k: int, generator: torch.Generator, device=None, dtype=torch.float32) -> Tensor:
    """k orthonormal rows spanning a uniformly random k-dimensional subspace of R^dim."""
    X = torch.randn(dim, k, generator=generator, dtype=torch.float64).to(device)
    return torch.linalg.qr(X)[0].T.to(dtype)


class GradientProjection:
    """Keep or remove a k-dimensional subspace of the gradient of `params`, before the optimizer step.

    `subspace`: a RollingSVD (its current top-k directions: SED-k), "random" (a random k-dim subspace,
    drawn once when `fixed`, else fresh every step), or a callable returning orthonormal rows [k, P].
    The projection is skipped until the RollingSVD window is full. Usable from any loop:
    `loss.backward(); proj.apply(); opt.step()`, or as a callback of specscope's loop (after_backward).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        subspace: RollingSVD | Literal["random"] | Callable[[], Tensor],
        mode: Literal["keep", "remove"] = "keep",
        k: int = 3,
        fixed: bool = True,
        seed: int = 0,
        every: int = 1,
    ):
        if mode not in ("keep", "remove"):
            raise ValueError(f"GradientProjection: mode must be 'keep' or 'remove', got {mode!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"GradientProjection: k is the subspace's dimension, an int ≥ 1; got {k!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"GradientProjection: every must be an int ≥ 1, got {every!r}")
        self.params = [p for p in params]
        self.subspace, self.mode, self.k, self.fixed, self.every = subspace, mode, k, fixed, every
        self.generator = torch.Generator().manual_seed(seed)
        self._basis: Tensor | None = None
        self.applied = 0

    def basis(self) -> Tensor | None:
        """The current orthonormal rows [k, P], or None while a RollingSVD window is still filling."""
        if isinstance(self.subspace, RollingSVD):
            return self.subspace.directions(self.k) if self.subspace.full else None
        if self.subspace == "random":
            if self._basis is None or not self.fixed:
                dim = sum(p.numel() for p in self.params)
                self._basis = random_basis(dim, self.k, self.generator, self.params[0].device)
            return self._basis
        return self.subspace()

    def apply(self) -> bool:
        """Project the gradients in place; returns whether a projection happened."""
        Q = self.basis()
        if Q is None:
            return False
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        g = project(flatten(grads, self.params), Q.to(self.params[0].device), self.mode)
        for p, gr in zip(self.params, grads):
            if p.grad is None:
                p.grad = gr
        unflatten_(g, [p.grad for p in self.params])
        self.applied += 1
        return True

    def after_backward(self, step: int, model, optimizer) -> list[Record]:
        return [Record(step, "", "projected", float(self.apply()))]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "basis": self._basis, "applied": self.applied}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._basis, self.applied = state["basis"], int(state["applied"])
