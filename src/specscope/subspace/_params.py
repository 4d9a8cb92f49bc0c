"""The parameter list a subspace tool is given, checked once: the tools flatten it into one vector and write back."""

from __future__ import annotations

from torch import Tensor, nn


def checked_params(params, owner: str, *, trainable: bool = True) -> list[Tensor]:
    """`params` as a list of distinct leaf tensors; one ValueError naming the problem and the fix otherwise.
    trainable=True also refuses frozen ones (requires_grad=False): they have no gradient to take or give."""
    if isinstance(params, Tensor):
        raise ValueError(f"{owner}: params is one tensor {tuple(params.shape)}; pass a list of parameters, e.g. "
                         "[layer.weight] (a tensor would be read row by row)")
    if isinstance(params, nn.Module):
        raise ValueError(f"{owner}: params is a {type(params).__name__} module; pass its parameters, e.g. "
                         "list(model.parameters())")
    try:
        params = list(params)
    except TypeError:
        raise ValueError(f"{owner}: params must be a non-empty list of tensors (e.g. list(model.parameters())), "
                         f"got {type(params).__name__}") from None
    if not params or not all(isinstance(p, Tensor) for p in params):
        raise ValueError(f"{owner}: params must be a non-empty list of tensors (e.g. list(model.parameters()))")
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(f"{owner}: parameter {i} {tuple(p.shape)} is parameter {seen[id(p)]} again (a tied weight "
                             "listed twice); list each tensor once, e.g. list(model.parameters()), which does")
        seen[id(p)] = i
        if not p.is_leaf:
            raise ValueError(f"{owner}: parameter {i} {tuple(p.shape)} is not a leaf tensor (a view or a computed "
                             "tensor), so its .grad is not the gradient; pass the parameters themselves")
        if trainable and not p.requires_grad:
            raise ValueError(f"{owner}: parameter {i} {tuple(p.shape)} is frozen (requires_grad=False); leave it "
                             "out, e.g. [p for p in model.parameters() if p.requires_grad]")
    return params
