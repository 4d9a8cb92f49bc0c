"""Projection interventions on a parameter set's gradient, applied between backward and the optimizer step.

With Q the orthonormal rows [k, P] of a subspace and g the flattened gradient: keep g ← Qᵀ(Q g),
remove g ← g − Qᵀ(Q g). Keep + remove = identity; both are idempotent (tested). "Rank k" here means a
k-dimensional subspace of the whole flattened parameter vector, not a matrix rank.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Literal

import torch
from torch import Tensor

from specscope.records import Record
from specscope.subspace._params import checked_params
from specscope.subspace.rolling import RollingSVD


def flatten(tensors: Iterable[Tensor | None], like: Iterable[Tensor]) -> Tensor:
    """Concatenate tensors (None -> zeros shaped like the matching entry of `like`) into one vector; each tensor
    must have its `like` entry's number of elements (a filtered list, e.g. only the non-None grads, is refused)."""
    tensors, like = list(tensors), list(like)
    if not like:
        raise ValueError("flatten: no parameters given; pass the (non-empty) list of parameters and one tensor "
                         "(or None) per parameter")
    if len(tensors) != len(like):
        raise ValueError(f"flatten: {len(tensors)} tensors for {len(like)} parameters; give one per parameter "
                         "(None for a missing gradient), in the parameters' order")
    for i, (t, p) in enumerate(zip(tensors, like)):
        if t is not None and t.numel() != p.numel():
            raise ValueError(f"flatten: tensor {i} has {t.numel()} elements, parameter {i} {tuple(p.shape)} has "
                             f"{p.numel()}; give the tensors in the parameters' order")
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(tensors, like)])


def unflatten_(vector: Tensor, into: list[Tensor]) -> None:
    """Copy consecutive slices of `vector` into the tensors of `into`, in place (sizes must add up exactly)."""
    total = sum(t.numel() for t in into)
    if vector.ndim != 1 or vector.numel() != total:
        raise ValueError(f"unflatten_: a vector of shape {tuple(vector.shape)} for tensors of {total} elements in all; "
                         "give the 1-D vector `flatten` made from these tensors")
    offset = 0
    for t in into:
        n = t.numel()
        t.copy_(vector[offset : offset + n].view_as(t))
        offset += n


def project(g: Tensor, Q: Tensor, mode: Literal["keep", "remove"]) -> Tensor:
    """Project vector g onto (keep) or away from (remove) the row space of the orthonormal rows Q, computed in
    the wider of the two dtypes (a float64 gradient is not rounded to a float32 basis), returned in g's."""
    if mode not in ("keep", "remove"):
        raise ValueError(f"project: mode must be 'keep' or 'remove', got {mode!r}")
    if not isinstance(g, Tensor) or not isinstance(Q, Tensor) or g.ndim != 1 or Q.ndim != 2 or Q.shape[1] != g.shape[0]:
        gs = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
        qs = tuple(Q.shape) if isinstance(Q, Tensor) else type(Q).__name__
        raise ValueError(f"project: g {gs} must be a 1-D vector of size P and Q {qs} rows [k, P] of the same size P; "
                         "give the flattened gradient and a basis of these parameters")
    dtype = torch.promote_types(g.dtype, Q.dtype)
    g_, Q_ = g.to(dtype), Q.to(dtype)
    kept = Q_.T @ (Q_ @ g_)
    return (kept if mode == "keep" else g_ - kept).to(g.dtype)


def random_basis(dim: int, k: int, generator: torch.Generator, device=None, dtype=torch.float32) -> Tensor:
    """k orthonormal rows spanning a uniformly random k-dimensional subspace of R^dim (1 ≤ k ≤ dim)."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"random_basis: dim must be an int ≥ 1, got {dim!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= dim:
        raise ValueError(f"random_basis: k must be an int with 1 ≤ k ≤ dim ({dim}), got {k!r}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"random_basis: generator must be a torch.Generator, got {type(generator).__name__}")
    X = torch.randn(dim, k, generator=generator, dtype=torch.float64).to(device)
    return torch.linalg.qr(X)[0].T.to(dtype)


class GradientProjection:
    """Keep or remove a k-dimensional subspace of the gradient of `params`, before the optimizer step.

    `subspace`: a RollingSVD (its current top-k directions: SED-k), "random" (a random k-dim subspace,
    drawn once when `fixed`, else fresh every step), or a callable returning orthonormal rows [k, P] (or None:
    no projection at that call). `k`: the subspace's dimension, by default the RollingSVD's own k (3 random
    directions). `params`: distinct, trainable leaf tensors (a frozen, tied-twice or non-leaf one is refused). A
    parameter without a gradient at `apply()` counts as a zero gradient and gets the projection's component of it
    (it then has a .grad, and the optimizer steps it).
    The projection is skipped until the RollingSVD window is full, and (with a warning) while the window
    holds only zero vectors: "keep" would zero the gradient. Usable from any loop:
    `loss.backward(); proj.apply(); opt.step()`, or as a callback of specscope's loop (after_backward).
    `every` is read by specscope's loop, which calls it every `every` steps; `apply()` itself projects at
    every call, so a hand-written loop decides when to call it.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        subspace: RollingSVD | Literal["random"] | Callable[[], Tensor],
        mode: Literal["keep", "remove"] = "keep",
        k: int | None = None,
        fixed: bool = True,
        seed: int = 0,
        every: int = 1,
    ):
        if mode not in ("keep", "remove"):
            raise ValueError(f"GradientProjection: mode must be 'keep' or 'remove', got {mode!r}")
        if k is None:  # a RollingSVD's own k; 3 random directions
            k = subspace.k if isinstance(subspace, RollingSVD) else 3
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"GradientProjection: k is the subspace's dimension, an int ≥ 1; got {k!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"GradientProjection: every must be an int ≥ 1, got {every!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"GradientProjection: seed must be an int, got {seed!r}")
        self.params = checked_params(params, "GradientProjection")
        if not (isinstance(subspace, RollingSVD) or (isinstance(subspace, str) and subspace == "random") or callable(subspace)):
            what = f"a tensor {tuple(subspace.shape)}" if isinstance(subspace, Tensor) else repr(subspace)
            raise ValueError(f"GradientProjection: subspace={what}: give a RollingSVD, 'random', or a callable "
                             "returning orthonormal rows [k, P] (a fixed basis Q: subspace=lambda: Q)")
        self.dim = sum(p.numel() for p in self.params)
        if isinstance(subspace, str) and k >= self.dim:
            raise ValueError(f"GradientProjection: k={k} random directions in {self.dim} parameters span them all "
                             f"(keep = identity, remove = a zero gradient); use k < {self.dim}")
        if isinstance(subspace, RollingSVD) and k > subspace.window:
            raise ValueError(f"GradientProjection: k={k} directions from a RollingSVD of window {subspace.window}, which "
                             f"has at most {subspace.window}; use k ≤ {subspace.window} (or k=None: the RollingSVD's own k)")
        if isinstance(subspace, RollingSVD) and subspace._rows is not None and subspace._rows.shape[1] != self.dim:
            raise ValueError(f"GradientProjection: the RollingSVD holds vectors of {subspace._rows.shape[1]} entries, "
                             f"the parameters have {self.dim} in all; push these parameters' flattened gradients")
        self._warned_empty = False
        self.subspace, self.mode, self.k, self.fixed, self.every = subspace, mode, k, fixed, every
        self.generator = torch.Generator().manual_seed(seed)
        self._basis: Tensor | None = None
        self.applied = 0

    def basis(self) -> Tensor | None:
        """The current orthonormal rows [k, P], or None while a RollingSVD window is still filling."""
        if isinstance(self.subspace, RollingSVD):
            if not self.subspace.full:
                return None
            Q = self.subspace.directions(self.k)
            if Q.shape[1] != self.dim:
                raise ValueError(f"GradientProjection: the RollingSVD holds vectors of {Q.shape[1]} entries, the "
                                 f"parameters have {self.dim} in all; push these parameters' flattened gradients")
            return Q
        if self.subspace == "random":
            if self._basis is None or not self.fixed:
                dtype = torch.promote_types(self.params[0].dtype, torch.float32)
                self._basis = random_basis(self.dim, self.k, self.generator, self.params[0].device, dtype)
            return self._basis
        return self._checked(self.subspace())

    def _checked(self, Q) -> Tensor | None:
        """A callable's basis: rows [k, P] of these parameters' size, finite, orthonormal (to 1e-3); None skips
        this call's projection (a subspace not ready yet)."""
        if Q is None:
            return None
        if not isinstance(Q, Tensor) or Q.ndim != 2 or Q.shape[1] != self.dim:
            shape = tuple(Q.shape) if isinstance(Q, Tensor) else type(Q).__name__
            raise ValueError(f"GradientProjection: the subspace callable returned {shape}; it must return orthonormal "
                             f"rows [k, {self.dim}] ({self.dim} = the parameters' total size)")
        if not bool(torch.isfinite(Q).all()):
            raise ValueError("GradientProjection: the subspace callable returned NaN or Inf entries")
        G = Q.double() @ Q.double().T
        if Q.shape[0] and float((G - torch.eye(len(G), dtype=G.dtype, device=G.device)).abs().max()) > 1e-3:
            raise ValueError("GradientProjection: the subspace callable's rows are not orthonormal (Q Qᵀ ≠ I); "
                             "orthonormalize them, e.g. torch.linalg.qr(Q.T)[0].T")
        return Q

    def apply(self) -> bool:
        """Project the gradients in place; returns whether a projection happened."""
        Q = self.basis()
        if Q is None:
            return False
        if Q.shape[0] == 0:
            if not self._warned_empty:
                warnings.warn("GradientProjection: the subspace has no direction (a RollingSVD window of zero vectors: "
                              "gradients pushed after zero_grad, or an lr of 0?); the gradient is left unchanged",
                              stacklevel=2)
                self._warned_empty = True
            return False
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if sparse := [i for i, g in enumerate(grads) if g.layout != torch.strided]:
            raise ValueError(f"GradientProjection.apply: the gradient of parameter {sparse[0]} is sparse; a projection "
                             "mixes every entry: use nn.Embedding(..., sparse=False), whose gradient is dense")
        for i, g in enumerate(grads):
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"GradientProjection.apply: the gradient of parameter {i} {tuple(g.shape)} has NaN or "
                                 "Inf entries; a projection would spread them to every parameter (under "
                                 "torch.amp.GradScaler an overflowing step has Inf gradients after unscale_: skip apply() "
                                 "on that step, which the scaler skips too)")
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
        missing = [key for key in ("generator", "basis", "applied") if key not in state] if isinstance(state, dict) else None
        if missing is None or missing:
            raise ValueError(f"GradientProjection.load_state_dict: the state lacks {missing or 'everything (not a dict)'}; "
                             "give the dict GradientProjection.state_dict() returned")
        basis, generator, applied = state["basis"], state["generator"], state["applied"]
        if basis is not None and (not isinstance(basis, Tensor) or basis.ndim != 2 or basis.shape[1] != self.dim):
            raise ValueError(f"GradientProjection.load_state_dict: the saved basis is not rows [k, {self.dim}]; "
                             "it was saved for other parameters")
        if basis is not None and self.subspace == "random" and basis.shape[0] != self.k:
            raise ValueError(f"GradientProjection.load_state_dict: the saved basis has {basis.shape[0]} random directions, "
                             f"this projection {self.k}; give the state of a projection with k={self.k}")
        if not (isinstance(generator, Tensor) and generator.dtype == torch.uint8 and generator.ndim == 1):
            raise ValueError(f"GradientProjection.load_state_dict: 'generator' must be the uint8 tensor "
                             f"torch.Generator.get_state() returns, got {type(generator).__name__}; give the dict "
                             "GradientProjection.state_dict() returned")
        if isinstance(applied, bool) or not isinstance(applied, int) or applied < 0:
            raise ValueError(f"GradientProjection.load_state_dict: 'applied' must be an int ≥ 0, got {applied!r}; give "
                             "the dict GradientProjection.state_dict() returned")
        try:
            self.generator.set_state(generator.clone())
        except RuntimeError as e:
            raise ValueError(f"GradientProjection.load_state_dict: 'generator' is not a CPU generator's state ({e}); "
                             "give the dict GradientProjection.state_dict() returned") from None
        self._basis, self.applied = (None if basis is None else basis.detach().clone()), applied
