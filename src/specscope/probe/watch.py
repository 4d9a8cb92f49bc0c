"""The watch of a measured step: each tracked weight paired with the tensor it multiplied, at the operation.

Two levels (probe.pairing has the layouts):
- `CallWatch`, a TorchFunctionMode, sees every torch call of the step. A call that touches no tracked weight
  runs as is (most of a forward); a plain product with one (F.linear, addmm, mm, matmul, @ — what nn.Linear
  and transformers' Conv1D run) is paired there. Any other call that touches one runs under
- `AtenWatch`, a TorchDispatchMode, which sees its aten ops: an embedding lookup, a convolution,
  nn.MultiheadAttention's functional path, a cast, anything under autocast.
So a forward costs one Python call per torch call, not one per aten op. `Watch` holds one step's pairing
state and hands each input matrix to its slot's statistics (probe.estimators).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from specscope.probe import roles as R
from specscope.probe.estimators import GramStats, TokenCounts
from specscope.probe.pairing import MATMULS, Slot, aten, fsdp_aliases, in_backward, input_key, operand_layout, patches, resolve

_TB = torch._C.TensorBase
# torch-level products paired without descending to aten: function -> kind
PRODUCTS = {torch.nn.functional.linear: "linear", torch.addmm: "addmm", _TB.addmm: "addmm", torch.mm: "mm", _TB.mm: "mm",
            torch.matmul: "matmul", _TB.matmul: "matmul", _TB.__matmul__: "matmul"}
BACKWARDS = frozenset({torch.Tensor.backward, torch.autograd.backward})
# aten ops that only view or copy a weight on its way to a product: not a use of their own
VIEWS = (aten.t, aten.view, aten.transpose, aten.detach, aten.alias, aten._to_copy, aten.slice, aten.split, aten.chunk,
         aten.split_with_sizes, aten.unsqueeze, aten.expand)


class Watch:
    """One measured step's pairing: which inputs each slot's weight multiplied (added to its statistics), the
    cast/unsharded copies of weights, the inputs seen (shared by q, k, v), the weights producing the loss."""

    def __init__(self, model: nn.Module, slots: dict[int, Slot], new_stats: Callable[[str, int], object], serial: Iterator[int]):
        self.model, self.slots, self.new_stats, self.serial = model, slots, new_stats, serial
        self.grams: dict = {}
        self.casts: dict = {}
        self.heads: set[int] = set()
        self.recompute = False
        self.fsdp_checked: set[int] = set()
        self.fsdp = any(callable(getattr(m, "_get_fsdp_state", None)) for m in model.modules())  # FSDP2-sharded modules
        self.aten = AtenWatch(self)

    def all_seen(self) -> bool:
        """Every tracked weight was reached by a forward of this step (or is observed by hand)."""
        return all(s.forward_seen or s.kind == "observed" for s in self.slots.values())

    def see(self, op, args, recompute: bool = False) -> None:
        """One aten op of a measured forward pass: pair it if one operand is a tracked weight.

        recompute: a forward run inside the backward pass (gradient checkpointing). It is counted only for
        weights that no forward of this step reached: reentrant checkpointing runs the first forward
        without gradients, so the recompute is the only pass that sees those inputs.
        """
        self.recompute = recompute
        if op in MATMULS:
            x, M = (args[1], args[2]) if op is aten.addmm else (args[0], args[1])
            if not self.pair_product(op, x, M):
                self.other(op, args)
            return None
        if op is aten.convolution:
            x, w, _, stride, padding, dilation, transposed, _, groups = args[:9]
            s = self._whole(w)
            if s is None:
                return self.other(op, args)
            if transposed:
                s.problem = "used in a transposed convolution, which the probe does not pair; pass its inputs with monitor.observe"
                return None
            with torch.no_grad():
                A = patches(x.detach(), w.shape, stride, padding, dilation, groups)
            return self.dense(s, A, (0, (0, w.shape[0]), True), "conv", op)
        if op is aten.embedding:
            s = self._whole(args[0])
            if s is None:
                return self.other(op, args)
            if self.recompute and s.forward_seen:
                return None
            s.forward_seen |= not self.recompute
            if s.tokens is None:
                s.tokens = TokenCounts(s.param.shape[0])
            s.tokens.add(args[1].detach(), int(args[2]) if len(args) > 2 else -1)  # padding_idx: its row gets no gradient
            s.role = "embedding"
            if s.kind == "":
                s.kind = "embedding"
            return None
        return self.other(op, args)

    def _whole(self, w: torch.Tensor) -> Slot | None:
        """The slot of `w` when it is a tracked weight itself or its stand-in for the forward (autocast's cast
        copy, FSDP2's unsharded parameter): a convolution or a lookup uses the whole weight, never a view."""
        hit = resolve(w, self.slots, self.casts)
        return hit[0] if hit is not None and hit[1] is w else None

    def pair_product(self, op, x: torch.Tensor, M: torch.Tensor) -> bool:
        """y = x @ M (2-D M): pair it when exactly one operand is a tracked weight; False when neither or both is."""
        hx, hm = resolve(x, self.slots, self.casts), resolve(M, self.slots, self.casts)
        if hm is not None and hx is None:
            self.dense(hm[0], x, operand_layout(hm[1], M), "linear", op)
            return True
        if hx is not None and hm is None:  # W @ X: the columns of X are the inputs
            self.dense(hx[0], M.mT, operand_layout(hx[1], x.mT), "linear", op)
            return True
        return False

    def touches(self, args, kwargs) -> bool:
        """Whether a call's tensors (arguments, one level into lists) include a tracked weight, a view of one or
        a cast copy. A ≥2-D nn.Parameter that is none of these is checked once per step for being FSDP2's
        unsharded copy of a tracked weight. (Runs for every torch call of a measured forward: kept cheap.)"""
        slots, casts = self.slots, self.casts
        for a in ((*args, *kwargs.values()) if kwargs else args):
            if type(a) is list or type(a) is tuple:
                if self.touches(a, None):
                    return True
                continue
            if not isinstance(a, torch.Tensor):
                continue
            b = a._base
            if b is None:
                b = a
            i = id(b)
            if i in slots:
                return True
            c = casts.get(i)
            if c is not None and c[1] is b:
                return True
            if self.fsdp and b.is_leaf and b.requires_grad and i not in self.fsdp_checked and b.dim() >= 2 and isinstance(b, nn.Parameter):
                self.fsdp_checked.add(i)  # FSDP2 made this unsharded parameter on this forward
                casts.update(fsdp_aliases(self.model, self.slots))
                if i in casts:
                    return True
        return False

    def pair_call(self, kind: str, args, kwargs) -> bool:
        """Pair a torch-level product (F.linear, addmm, mm, matmul) as its aten form would be; False sends the
        call to the aten-level watch (autocast, batched or vector operands, both operands tracked)."""
        if kwargs.get("out") is not None or len(args) < 2:
            return False
        if kind == "addmm":
            if len(args) < 3:
                return False
            args = args[1:]
        x, M = args[0], args[1]
        if not (isinstance(x, torch.Tensor) and isinstance(M, torch.Tensor)) or torch.is_autocast_enabled(x.device.type):
            return False
        self.recompute = in_backward()
        if kind == "linear":  # F.linear(x, W) = x @ W.T for x of any batch shape
            return M.dim() == 2 and x.dim() >= 2 and self.pair_product(aten.addmm, x, M.mT)
        if M.dim() != 2 or x.dim() < 2 or (x.dim() > 2 and resolve(x, self.slots, self.casts) is not None):
            return False  # W @ X with a batched X, or a batched weight: matmul broadcasts (bmm), not a plain product
        return self.pair_product(aten.mm if kind != "addmm" else aten.addmm, x, M)

    def other(self, op, args) -> None:
        """A tracked weight used by an op the probe does not pair: remembered for the reason text."""
        if self.recompute:
            return
        for a in (t for x in args for t in (x if isinstance(x, (list, tuple)) else (x,))):  # cat takes a list
            if isinstance(a, torch.Tensor):
                hit = resolve(a, self.slots, self.casts)
                if hit is not None and op not in VIEWS:
                    hit[0].other_ops.add(str(op).removeprefix("aten."))

    def dense(self, s: Slot, x: torch.Tensor, layout, kind: str, op) -> None:
        if s.kind == "observed" or s.problem or (self.recompute and s.forward_seen):
            return
        s.forward_seen |= not self.recompute
        if layout is None:
            s.problem = f"used by {str(op).removeprefix('aten.')} through a view the probe cannot map to its rows/columns"
            return
        out_dim, out_range, whole_input = layout
        if not whole_input:
            s.problem = "only some of its input features multiply this input (a column block of W used as inputs)"
            return
        with torch.no_grad():
            A = x.detach().reshape(-1, x.shape[-1])
            entry = self.input(A)
            key = entry[2]
            if any(key in keys for r, keys in s.inputs.items() if r != out_range):
                return  # another output block of the same product input: A is counted once
            if not s.note_use(kind, A.shape[1], out_dim, out_range, key):
                return
            stats = self.stats_for(s, kind, A.shape[1], out_range, key)
            if isinstance(stats, GramStats):
                stats.add(A, entry, key, source=x)
            else:
                stats.add(A)

    def stats_for(self, s: Slot, kind: str, n: int, out_range: tuple, key):
        """The statistics this use adds to: the weight's own, or — for an output block whose input differs from
        the first block's (cross-attention's k/v rows) — that block's, kept across steps for warm starts."""
        if s.main_range is None or s.main_range == out_range or key in s.inputs.get(s.main_range, ()):
            s.main_range = s.main_range or out_range
            if s.stats is None:
                s.stats = self.new_stats(kind, n)
            return s.stats
        st = s.block_stats.get(out_range)
        if st is None:
            st = s.block_stats[out_range] = self.new_stats(kind, n)
        return st

    def input(self, A: torch.Tensor) -> list:
        """[A, its Gram (lazily), a serial number] for an input: weights multiplying the same activation
        (q, k, v) get the same entry. The last few entries are held, so their memory cannot be reused by
        another tensor (which would alias the key) while they can still be matched."""
        key = input_key(A)
        entry = self.grams.get(key)
        if entry is None:
            entry = self.grams[key] = [A, None, next(self.serial)]
            if len(self.grams) > 4:
                self.grams.pop(next(iter(self.grams)))
        return entry


class AtenWatch(TorchDispatchMode):
    """Sees the aten ops of one call that touches a tracked weight without being a plain product (an
    embedding lookup, a convolution, nn.MultiheadAttention's functional path, a cast), and of a backward
    pass that may recompute a checkpointed forward; hands them to the Watch."""

    def __init__(self, watch: "Watch"):
        super().__init__()
        self.watch = watch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():  # evaluation passes, and the backward pass itself
            return func(*args, **kwargs)
        op = func._overloadpacket
        self.watch.see(op, args, recompute=in_backward())
        out = func(*args, **kwargs)
        if op is aten._to_copy and isinstance(args[0], torch.Tensor):  # autocast's copy of a weight
            hit = resolve(args[0], self.watch.slots, self.watch.casts)
            if hit is not None:
                self.watch.casts[id(out)] = (hit[0], out)
        return out


class CallWatch(TorchFunctionMode):
    """Armed on measured steps only; sees every torch call of the step.

    A call that touches no tracked weight runs as is (one Python call, no aten-level watch: most of a
    forward). A plain product with one (F.linear, addmm, mm, matmul, @ — what nn.Linear and transformers'
    Conv1D run) is paired here. Any other call that touches one runs under `AtenWatch`, which sees its aten ops.
    `loss.backward()` is seen for the head role; it runs under `AtenWatch` only while some tracked weight was
    not reached by a forward (a checkpointed forward recomputed in the backward pass can still reach it)."""

    def __init__(self, watch: "Watch"):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        w = self.watch
        if func in BACKWARDS and args:  # (every call of a measured forward passes here: kept cheap)
            roots = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            for root in roots:
                if isinstance(root, torch.Tensor):
                    w.heads |= R.output_weights(root)
            if w.all_seen():
                return func(*args, **kwargs)
            with w.aten:
                return func(*args, **kwargs)
        if not torch.is_grad_enabled() or not w.touches(args, kwargs):
            return func(*args, **kwargs)
        kind = PRODUCTS.get(func)
        if kind is not None and w.pair_call(kind, args, kwargs):
            return func(*args, **kwargs)
        with w.aten:
            return func(*args, **kwargs)
