"""Input validation and dtype policy shared by every linalg function.

Every public function calls `check_tensor` first, so a NaN, an Inf or an empty matrix fails loudly with
the function's name instead of silently producing a wrong number downstream. The raw polar kernels
(`newton_schulz`, `polar_express`, `gram_newton_schulz`), on an optimizer's hot path, run `check_structure`
only: reading the entries for NaN would cost a host synchronisation per call (the optimizers check their
gradients once per step instead). A list (`check_tensors`) is read once: one sum per matrix, one host read.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
from itertools import pairwise
from typing import Any, Callable

import torch
from torch import Tensor


@contextlib.contextmanager
def no_autocast():
    """torch.autocast off for CPU and CUDA where it is on: inside it a float32 product runs in bfloat16 or float16,
    and the exact routes' float32 products (and an optimizer step's) would silently lose their precision."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def unchanged_until_collected(mats: list[Tensor | None], fn: str, wait: Callable[[], Any]) -> Callable[[], Any]:
    """`wait`, refusing a result whose inputs changed in place before it was collected: a `*_later` function's
    workers read the matrices while the caller goes on, so a change made meanwhile (zeroing a gradient, the next
    momentum update) gave a random mix of old and new values."""
    versions = [None if G is None else G._version for G in mats]  # None: a matrix computed before the call returned

    def collect():
        out = wait()
        if changed := [i for i, (G, v) in enumerate(zip(mats, versions)) if G is not None and G._version != v]:
            raise ValueError(f"{fn}: mats[{changed[0]}] was changed in place after the call, while the workers read "
                             f"it; change the matrices only after calling the function {fn} returned (or pass copies)")
        return out
    return collect


def autocast_off(fn):
    """`fn` run without autocast, autograd left as it is: a function that computes in float32 (`gram`,
    `spectral_norm`) had its products run in bfloat16 inside torch.autocast (σ_1 4 % low, st(A) 9 % high)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with no_autocast():
            return fn(*args, **kwargs)
    return run


def without_graph(fn):
    """`fn` run under torch.no_grad() and without autocast, and so is the collector it returns (a `*_later`
    function's): the polar backends and the nuclear norms measure, they take no part in autograd. Their exact routes
    hand the eigensolver only a Gram's lower triangle, so autograd's derivative through them would be wrong; none is
    built, whatever the input's requires_grad (torch.linalg.matrix_norm(G, "nuc") and torch.linalg.svd are
    differentiable). Inside torch.autocast their float32 products ran in bfloat16 (error 4.9e-3 against 1.8e-7)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.no_grad(), no_autocast():
            out = fn(*args, **kwargs)
        return _measuring_collector(out) if callable(out) else out
    return run


def _measuring_collector(collect):
    @functools.wraps(collect)
    def run():
        with torch.no_grad(), no_autocast():
            return collect()
    return run


KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # what the raw polar kernels compute in
MAX_STEPS = 99  # ns_steps, as the optimizers allow: float32 Polar Express converges in ~10


def check_kernel_options(fn: str, *, eps, dtype, steps: int, restart=None, schedule=None) -> None:
    """One ValueError for a raw polar kernel's option that would give a wrong result silently (an integer dtype's
    all-zero factor, a complex one, a NaN eps or coefficient) or be ignored (an empty schedule, a restart outside the
    steps). Python comparisons only: the kernels are on the optimizers' hot path."""
    if schedule is not None and not all(
            isinstance(abc, (tuple, list)) and len(abc) == 3 and all(
                isinstance(c, numbers.Real) and not isinstance(c, bool) and math.isfinite(c) for c in abc)
            for abc in schedule):
        raise ValueError(f"{fn}: the schedule must be a list of (a, b, c) triples of finite numbers, got {schedule!r}")
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"{fn}: dtype={dtype} is not one the iteration computes in; use one of "
                         + ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{fn}: eps must be a finite number ≥ 0, got {eps!r}")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"{fn}: the iteration needs 1..{MAX_STEPS} steps, got {steps}")
    if restart is not None and (isinstance(restart, bool) or not isinstance(restart, numbers.Integral) or not 1 <= restart < steps):
        raise ValueError(f"{fn}: restart must be None or an int in 1..{steps - 1} (the step, counted from 0, before "
                         f"which the Gram is rebuilt), got {restart!r}")


def check_tensor(x: Tensor, fn: str, name: str = "input", *, min_ndim: int = 2) -> Tensor:
    """Validate `x` and return it as a real floating tensor (ints become float32)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}; wrap it with torch.as_tensor(...)")
    x = check_structure(x, fn, name, min_ndim=min_ndim)
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(x.numel() - finite.sum()) - n_nan
        raise ValueError(f"{fn}: {name} has {n_nan} NaN and {n_inf} Inf entries (shape {tuple(x.shape)}); "
                         f"fix the step that produced it (e.g. a diverged loss) or clean it with torch.nan_to_num")
    return x


def check_tensors(mats, fn: str, name: str = "mats") -> list[Tensor]:
    """`check_tensor` for each matrix of a list, reading the entries once per device: one sum per matrix, stacked,
    and one host read. A NaN or Inf entry makes its matrix's sum non-finite; so can an overflow of finite entries,
    so only the flagged matrices get `check_tensor`'s exact scan (which raises, naming the first bad one). One host
    synchronisation for the list instead of one per matrix."""
    mats = [check_structure(x, fn, f"{name}[{i}]") for i, x in enumerate(as_list(mats, fn, name))]
    by_device: dict[torch.device, list[int]] = {}
    for i, x in enumerate(mats):
        by_device.setdefault(x.device, []).append(i)
    for idx in by_device.values():
        sums = torch.stack([mats[i].sum(dtype=torch.promote_types(mats[i].dtype, torch.float32)).double() for i in idx])
        for j in torch.nonzero(~torch.isfinite(sums)).flatten().tolist():
            check_tensor(mats[idx[j]], fn, f"{name}[{idx[j]}]")
    return mats


def as_list(mats, fn: str, name: str = "mats") -> list:
    """`mats` as a list of matrices; a single tensor (whose rows iteration would take for matrices) is refused."""
    if isinstance(mats, Tensor):
        raise ValueError(f"{fn}: {name} must be a list of matrices, got one tensor of shape {tuple(mats.shape)}; pass [G] "
                         "(or list(batch.unbind()) for a batch)")
    try:
        return list(mats)
    except TypeError:
        raise ValueError(f"{fn}: {name} must be a list of matrices, got {type(mats).__name__}") from None


def check_gram_dtype(dtype, fn: str, name: str = "dtype") -> torch.dtype:
    """A dtype a Gram is formed in: float32 or float64."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{fn}: {name}={dtype!r} is not one a Gram is formed in; use torch.float64 (exact) or torch.float32")
    return dtype


FLOAT8 = tuple(getattr(torch, n) for n in dir(torch) if n.startswith("float8_") and isinstance(getattr(torch, n), torch.dtype))


def check_structure(x: Tensor, fn: str, name: str = "input", *, min_ndim: int = 2) -> Tensor:
    """The checks that read no entry (so no device-to-host copy: the kernels on an optimizer's hot path run
    them): a dense real tensor of ≥ `min_ndim` dims with data, returned as a floating tensor (ints -> float32)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}; wrap it with torch.as_tensor(...)")
    if x.layout != torch.strided:
        raise ValueError(f"{fn}: {name} is a {x.layout} tensor; pass a dense one (x.to_dense())")
    if x.is_meta:
        raise ValueError(f"{fn}: {name} is on the meta device and has no values; materialize it (e.g. module.to_empty() "
                         "and load the weights) first")
    if x.is_complex():
        raise ValueError(f"{fn}: {name} is complex ({x.dtype}); only real matrices are supported")
    if x.is_quantized or x.dtype in FLOAT8:
        raise ValueError(f"{fn}: {name} is {'quantized' if x.is_quantized else x.dtype} ({x.dtype}), which torch's linear "
                         f"algebra does not compute in; pass {name}.dequantize() or {name}.float()" if x.is_quantized else
                         f"{fn}: {name} is {x.dtype}, which torch's linear algebra does not compute in; pass {name}.float()")
    if x.ndim < min_ndim:
        raise ValueError(f"{fn}: {name} must have at least {min_ndim} dims ([..., m, n]), got shape {tuple(x.shape)}; "
                         f"use x.unsqueeze(0) for a single row")
    if x.numel() == 0:
        raise ValueError(f"{fn}: {name} is empty (shape {tuple(x.shape)}); pass a matrix with at least one row and one column")
    return x if x.is_floating_point() else x.float()


def work_dtype(x: Tensor) -> torch.dtype:
    """Result dtype: float64 stays float64; float32/float16/bfloat16 are reported in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def smaller_gram(x: Tensor) -> Tensor:
    """X Xᵀ if m <= n else Xᵀ X: the Gram matrix on the smaller side, in x's dtype."""
    return x @ x.mT if x.shape[-2] <= x.shape[-1] else x.mT @ x


LOWER_GRAM_MIN = 128


def lower_gram(x: Tensor, blocks: int = 4) -> Tensor:
    """The smaller Gram of x [..., m, n] where eigvalsh/eigh read it — its lower triangle and diagonal (UPLO="L",
    torch's default; above the diagonal blocks it is zero) — in x's dtype: row block i of X times X's rows up to
    block i, (blocks + 1)/(2·blocks) of `smaller_gram`'s multiply-adds (5/8 for 4 blocks). Its trace is the full
    Gram's. On an accelerator, where one product beats four launches, the whole Gram (`smaller_gram`); so too
    below LOWER_GRAM_MIN rows of the Gram, where one product costs less than four (12 against 63 µs for a 32×128
    float64 matrix, 2 threads; even at 128)."""
    if x.device.type != "cpu" or min(x.shape[-2:]) < LOWER_GRAM_MIN:
        return smaller_gram(x)
    X = x if x.shape[-2] <= x.shape[-1] else x.mT
    k = X.shape[-2]
    C = X.new_zeros(*X.shape[:-2], k, k)
    edges = [k * i // blocks for i in range(blocks + 1)]
    for a, b in pairwise(edges):
        if b > a:
            C[..., a:b, :b] = X[..., a:b, :] @ X[..., :b, :].mT
    return C
