"""The watch of a measured step: each tracked weight paired with the tensor it multiplied, at the operation.

What sees the calls:
- `CallWatch`, a TorchFunctionMode, on a Monitor's first measured step (and wherever `ParamWatch` cannot
  be used): every torch call of the step, and `loss.backward()`, whose graph names the head.
- `ParamWatch` on the steps after: the tracked weights themselves, as an nn.Parameter subclass for the
  step, see only the calls that touch them; every other call of the forward runs at full speed.
Either hands a call that touches a tracked weight to `Watch.call`: a plain product with one (F.linear, addmm,
mm, matmul, @ — what nn.Linear and transformers' Conv1D run) and an F.embedding lookup are paired there; any
other call runs under
- `AtenWatch`, a TorchDispatchMode, which sees its aten ops: a convolution, nn.MultiheadAttention's
  functional path, a cast, anything under autocast, a lookup with max_norm.
So a forward costs one Python call per torch call at most, never one per aten op (probe.pairing has the
layouts). `Watch` holds one step's pairing state and hands each input matrix to its slot's statistics
(probe.estimators).
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from specscope.probe import roles as R
from specscope.probe.estimators import Deferred, GramStats, GroupedPowerStats, GroupedStats, TokenCounts, groups_of, rows_of
from specscope.probe.pairing import MATMULS, Slot, aten, fsdp_aliases, in_backward, input_key, operand_layout, patches, patches_shape, resolve

_TB = torch._C.TensorBase
# torch-level products (and lookups) paired without descending to aten: function -> kind
PRODUCTS = {torch.nn.functional.linear: "linear", torch.addmm: "addmm", _TB.addmm: "addmm", torch.mm: "mm", _TB.mm: "mm",
            torch.matmul: "matmul", _TB.matmul: "matmul", _TB.__matmul__: "matmul", F.embedding: "embedding"}
EMBEDDING_BAGS = (aten._embedding_bag, aten._embedding_bag_forward_only)
PARAM_WATCH = True  # later measured steps are watched by ParamWatch where it applies (False: CallWatch always)
BACKWARDS = frozenset({torch.Tensor.backward, torch.autograd.backward})
# aten ops that only view or copy a weight on its way to a product: not a use of their own
VIEWS = (aten.t, aten.view, aten.transpose, aten.detach, aten.alias, aten._to_copy, aten.slice, aten.split, aten.chunk,
         aten.split_with_sizes, aten.unsqueeze, aten.squeeze, aten.permute, aten._unsafe_view, aten.select, aten.unbind,
         aten.expand)


def _transposed(t: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether `t` is the 2-D `base` transposed (`W.t()`, `W.T`): the same memory read column for row."""
    return (t.dim() == base.dim() == 2 and t.data_ptr() == base.data_ptr() and tuple(t.shape) == tuple(base.shape)[::-1]
            and tuple(t.stride()) == tuple(base.stride())[::-1] and tuple(t.stride()) != tuple(base.stride()))


def _all_tracked(tensors, watch) -> bool:
    """Whether every tensor in a cat's list is a tracked weight or a view of one."""
    return all(isinstance(t, torch.Tensor) and resolve(t, watch.slots, watch.casts) is not None for t in tensors)


def sharded(model: nn.Module) -> bool:
    """Whether FSDP2 (`fully_shard`) shards some module of `model` (it must, before a Monitor takes its weights)."""
    return any(callable(getattr(m, "_get_fsdp_state", None)) for m in model.modules())


class Watch:
    """One measured step's pairing: which inputs each slot's weight multiplied (added to its statistics), the
    cast/unsharded copies of weights, the inputs seen (shared by q, k, v), the weights producing the loss."""

    def __init__(self, model: nn.Module, slots: dict[int, Slot], new_stats: Callable[..., object], serial: Iterator[int],
                 fsdp: bool | None = None):
        self.model, self.slots, self.new_stats, self.serial = model, slots, new_stats, serial
        self.grams: dict = {}
        self.casts: dict = {}
        self.heads: set[int] = set()
        self.backward_seen = False
        self.recompute = False
        self.fsdp_checked: set[int] = set()
        self.fsdp = sharded(model) if fsdp is None else fsdp
        self.gathers: dict = {}  # id(W[expert_ids]) -> (slot, that tensor, expert_ids): a stack gathered per row
        self.cast_experts: dict = {}  # id(a cast copy of W[e]) -> e (autocast on the per-expert route)
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
            # built where they are read, a group's alone where that is all the reader needs: prod(k) times the input,
            # held to the step's end or whole at once they would cost the memory the forward pass itself takes
            layout = (w.shape, stride, padding, dilation, groups)
            A = Deferred(lambda x: patches(x, *layout), patches_shape(x.shape, *layout), x.dtype, x.device, x,
                         lambda x, g0, g1: _groups_patches(x, *layout, g0, g1))
            return self.dense(s, A, (0, (0, w.shape[0]), True), "conv", op, groups)
        if op is aten.embedding:
            s = self._whole(args[0])
            if s is None:
                return self.other(op, args)
            return self.lookup(s, args[1], int(args[2]) if len(args) > 2 else -1)
        if op in EMBEDDING_BAGS and (s := self._whole(args[0])) is not None:
            return self.bag(s)
        if op is aten._grouped_mm and len(args) > 2 and self.grouped(*args[:3]):
            return None
        if op is aten.bmm and self.gathered_product(args[0], args[1]):
            return None
        return self.other(op, args)

    def bag(self, s: Slot) -> None:
        """An nn.EmbeddingBag lookup: a table, whose input — bags of ids, summed or averaged — has no closed-form st(A)."""
        if self.recompute and s.forward_seen:
            return
        s.forward_seen |= not self.recompute
        s.role = "embedding"
        s.problem = s.problem or ("looked up by bags of ids (nn.EmbeddingBag: rows summed or averaged per bag), whose input "
                                  "matrix has no closed form the probe counts: routed as an embedding, it has no st(A)")

    # -- the experts of a stack [E, ·, ·] (a mixture-of-experts layer), each measured with the rows routed to it --
    def grouped(self, x: torch.Tensor, w: torch.Tensor, offs) -> bool:
        """torch._grouped_mm(x, w, offs) with w a tracked stack (or its transpose) and x [rows, in] sorted by
        expert: expert e multiplies rows offs[e-1]:offs[e] (transformers' experts_implementation="grouped_mm")."""
        hit = resolve(w, self.slots, self.casts)
        if hit is None or not isinstance(offs, torch.Tensor) or x.dim() != 2 or w.dim() != 3 or hit[1].dim() != 3:
            return False
        s, base = hit
        if w.data_ptr() != base.data_ptr() or w.shape[0] != base.shape[0] or x.shape[-1] not in base.shape[1:]:
            return False
        ends = offs.tolist()  # one host read per grouped product of a measured step
        for e, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends)):
            if hi > lo:
                self.expert_rows(s, e, x[lo:hi])
        return True

    def gathered_product(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """torch.bmm with a stack's matrices gathered per row (`W[expert_ids]`, transformers'
        experts_implementation="batched_mm"): W_s @ x_s ([S, out, in] @ [S, in, 1]) or x_s @ W_s ([S, 1, in] @
        [S, in, out]); row s goes to expert expert_ids[s]."""
        for W, x, col in ((a, b, True), (b, a, False)):
            g = next((g for t in (W, W._base) if t is not None and (g := self.gathers.get(id(t))) is not None and g[1] is t), None)
            if g is not None and x.dim() == 3 and x.shape[2 if col else 1] == 1 and x.shape[0] == g[2].shape[0]:
                s, ids = g[0], g[2]
                A = x[:, :, 0] if col else x[:, 0, :]
                order = torch.argsort(ids, stable=True)
                counts = torch.bincount(ids, minlength=s.param.shape[0]).tolist()
                for e, rows in enumerate(A[order].split(counts)):
                    if len(rows):
                        self.expert_rows(s, e, rows)
                for k in (id(g[1]), *g[3:]):  # the gathered stack ([S, out, in]: large) is not held past its product
                    self.gathers.pop(k, None)
                    self.casts.pop(k, None)
                return True
        return False

    def gather(self, args, out) -> None:
        """Remember `W[expert_ids]` of a tracked stack W (aten.index on its first dim) for the bmm that follows."""
        if len(args) < 2 or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
            return
        idx = args[1]
        if not (isinstance(idx, (list, tuple)) and len(idx) == 1 and isinstance(idx[0], torch.Tensor) and idx[0].dim() == 1
                and not idx[0].is_floating_point() and idx[0].dtype is not torch.bool):
            return
        hit = resolve(args[0], self.slots, self.casts)
        if hit is None or hit[1].shape != args[0].shape or hit[1].data_ptr() != args[0].data_ptr():
            return  # not the whole stack
        self.gathers[id(out)] = (hit[0], out, idx[0].detach())
        self.casts[id(out)] = (hit[0], weakref.ref(out))  # the bmm that uses it touches the weight (ParamWatch: watched)

    def expert_cast(self, t: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> None:
        """Autocast's copy `out` of `t`: of one expert W[e] of a stack, or of a stack gathered per row, is that still."""
        self.cast_experts.pop(id(out), None)  # an earlier copy's, whose id this one reuses
        if base.dim() == 3 and (e := expert_of(base, t)) is not None:
            self.cast_experts[id(out)] = e
        g = self.gathers.get(id(base))
        if g is not None and g[1] is base and t.shape == base.shape:
            self.gathers[id(out)] = (g[0], out, g[2], id(base))  # the copy's product lets go of both

    def expert_rows(self, s: Slot, e: int, x: torch.Tensor) -> None:
        """Rows x [rows, in] that expert e of the stack s multiplied: added to that expert's statistics."""
        if s.kind == "observed" or s.problem or (self.recompute and s.forward_seen):
            return
        s.forward_seen |= not self.recompute
        if s.split is not None:
            s.problem = "split= does not apply to a stack of experts, which the probe measures expert by expert; drop its split"
            return
        if _unreadable(s, x):
            return
        A = x.detach().reshape(-1, x.shape[-1])
        key = input_key(A)
        if not s.note_use("experts", A.shape[1], 0, (e, e + 1), key):
            return
        for k in range(s.param.shape[0]):  # every expert has statistics (and a warm start) once the stack is measured
            if (k, k + 1) not in s.block_stats:
                s.block_stats[(k, k + 1)] = self.new_stats("experts", A.shape[1])
        stats = s.block_stats[(e, e + 1)]
        if isinstance(stats, GramStats):
            stats.add(A, None, key, source=x)
        else:
            stats.add(A)

    def lookup(self, s: Slot, ids: torch.Tensor, padding_idx: int) -> None:
        """An embedding lookup of `ids` in a tracked weight: counted (its row `padding_idx` gets no gradient)."""
        if self.recompute and s.forward_seen:
            return
        s.forward_seen |= not self.recompute
        if s.tokens is None:
            s.tokens = TokenCounts(s.param.shape[0])
        s.tokens.add(ids.detach(), padding_idx)
        s.role = "embedding"
        if s.kind == "":
            s.kind = "embedding"

    def pair_embedding(self, args, kwargs) -> bool:
        """F.embedding(ids, W, padding_idx) counted as its aten form would be; False sends the call to the aten-level
        watch (a max_norm that renormalizes W in place, a torch.func transform's or a wrapper subclass's tensor)."""
        names = ("input", "weight", "padding_idx", "max_norm")
        given = {**dict(zip(names, args)), **kwargs}
        ids, W, pad = given.get("input"), given.get("weight"), given.get("padding_idx")
        if given.get("max_norm") is not None or not isinstance(ids, torch.Tensor) or not isinstance(W, torch.Tensor):
            return False
        s = self._whole(W)
        if s is None or not _readable(ids):
            return False
        self.recompute = in_backward()
        self.lookup(s, ids, -1 if pad is None else (pad if pad >= 0 else W.shape[0] + pad))
        return True

    def _whole(self, w: torch.Tensor) -> Slot | None:
        """The slot of `w` when it is a tracked weight itself or its stand-in for the forward (autocast's cast
        copy, FSDP2's unsharded parameter), or a view of all of it row for row — the same memory, both contiguous,
        the same first dim, so the same matrix [out, rest] (Mamba's `conv1d.weight.squeeze(1).unsqueeze(1)`):
        a convolution or a lookup uses the whole weight, never part of it."""
        hit = resolve(w, self.slots, self.casts)
        if hit is None:
            return None
        s, base = hit
        if base is w or (w.data_ptr() == base.data_ptr() and w.numel() == base.numel() and w.shape[:1] == base.shape[:1]
                         and w.is_contiguous() and base.is_contiguous()):
            return s
        return None

    def pair_product(self, op, x: torch.Tensor, M: torch.Tensor) -> bool:
        """y = x @ M (2-D M): pair it when exactly one operand is a tracked weight; False when neither or both is."""
        hx, hm = resolve(x, self.slots, self.casts), resolve(M, self.slots, self.casts)
        if hm is not None and hx is None and hm[0].param.dim() == 3 and id(hm[1]) not in self.gathers:
            e = expert_of(hm[1], M) if hm[1].dim() == 3 else self.cast_experts.get(id(hm[1]))  # W[e], or autocast's copy of it
            if e is not None and M.shape[0] == x.shape[-1]:  # x @ W[e].T (F.linear) or x @ W[e] (a stack stored [E, in, out])
                self.expert_rows(hm[0], e, x)
                return True
        if hm is not None and hx is None:
            self.dense(hm[0], x, operand_layout(hm[1], M), "linear", op)
            return True
        if hx is not None and hm is None:  # W @ X: the columns of X are the inputs
            self.dense(hx[0], M.mT, operand_layout(hx[1], x.mT), "linear", op)
            return True
        if hx is not None and hm is not None and _transposed(M, hm[1]) and not _transposed(x, hx[1]):
            hx[0].other_ops.add(R.LINEAR_INPUT)  # x @ W.T, F.linear's form (under autocast, at this level): W is the operator
            self.dense(hm[0], x, operand_layout(hm[1], M), "linear", op)
            return True
        if hx is not None and hm is not None and not self.recompute:  # which one is the operator is not said here
            for a, b in ((hx[0], hm[0]), (hm[0], hx[0])):
                a.problem = a.problem or (f"multiplied with another tracked weight ('{b.name}', {str(op).removeprefix('aten.')}): "
                                          "neither is the other's input matrix; pass its inputs with "
                                          f"monitor.observe('{a.name}', weight, inputs), or exclude= one of them")
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
            if c is not None and c[1]() is b:
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
        if not (isinstance(x, torch.Tensor) and isinstance(M, torch.Tensor)) or torch._C._is_any_autocast_enabled():
            return False
        if _wrapped(x) or _wrapped(M):  # under torch.func.vmap/grad: the aten level sees the unwrapped product
            return False
        self.recompute = in_backward()
        if kind == "linear":  # F.linear(x, W) = x @ W.T for x of any batch shape
            if M.dim() != 2 or x.dim() < 2:
                return False
            hm = resolve(M, self.slots, self.casts)
            if hm is not None and hm[1] is M:  # nn.Linear: the whole W
                if (hx := resolve(x, self.slots, self.casts)) is not None:  # a tracked table as the input (DeBERTa's
                    hx[0].other_ops.add(R.LINEAR_INPUT)                       # relative positions through key_proj)
                self.dense(hm[0], x, (0, (0, M.shape[0]), x.shape[-1] == M.shape[1]), "linear", aten.addmm)
                return True
            return self.pair_product(aten.addmm, x, M.mT)
        if M.dim() != 2 or x.dim() < 2 or (x.dim() > 2 and resolve(x, self.slots, self.casts) is not None):
            return False  # W @ X with a batched X, or a batched weight: matmul broadcasts (bmm), not a plain product
        return self.pair_product(aten.mm if kind != "addmm" else aten.addmm, x, M)

    def call(self, func, args, kwargs):
        """Run a torch call that touches a tracked weight under grad mode: a plain product or an embedding lookup
        is paired here; any other call runs under `AtenWatch`, which sees its aten ops."""
        kind = PRODUCTS.get(func)
        if kind is not None and (self.pair_embedding(args, kwargs) if kind == "embedding" else self.pair_call(kind, args, kwargs)):
            return func(*args, **kwargs)
        with self.aten:
            return func(*args, **kwargs)

    def other(self, op, args) -> None:
        """A tracked weight used by an op the probe does not pair: remembered for the reason text."""
        if self.recompute:
            return
        for a in (t for x in args for t in (x if isinstance(x, (list, tuple)) else (x,))):  # cat takes a list
            if isinstance(a, torch.Tensor):
                hit = resolve(a, self.slots, self.casts)
                if hit is not None and op not in VIEWS:
                    hit[0].other_ops.add(R.WEIGHTS_CAT if op is aten.cat and _all_tracked(args[0], self) else str(op).removeprefix("aten."))

    def dense(self, s: Slot, x: torch.Tensor, layout, kind: str, op, groups: int = 1) -> None:
        """A product of the tracked weight of `s` with the input rows x (a convolution's patches: `groups` groups'
        rows, group-major), added to the statistics of its output block."""
        if s.kind == "observed" or s.problem or (self.recompute and s.forward_seen):
            return
        s.forward_seen |= not self.recompute
        if layout is None:
            s.problem = (f"multiplied one matrix at a time, as the experts of a stack {list(s.param.shape)} are (a "
                         "mixture-of-experts layer): the probe measures whole weight matrices, not a stack's experts"
                         if s.param.dim() >= 3 and kind == "linear" else
                         f"used by {str(op).removeprefix('aten.')} through a view the probe cannot map to its rows/columns")
            return
        if s.param.dim() >= 3 and kind == "linear":  # a 2-D product with a matrix the probe could not map to one expert
            s.problem = (f"multiplied through a 2-D matrix of the stack {list(s.param.shape)} that the probe cannot map to "
                         "one expert (a copy of part of it?): it measures a stack's experts where it sees each expert's rows")
            return
        out_dim, out_range, whole_input = layout
        if not whole_input:
            s.problem = "only some of its input features multiply this input (a column block of W used as inputs)"
            return
        source = x.source if isinstance(x, Deferred) else x
        if _unreadable(s, source):
            return
        A = x if isinstance(x, Deferred) else x.detach().reshape(-1, x.shape[-1])  # detached: what follows records no graph
        # a convolution's patches are a copy no other weight multiplies: an entry of their own, not one the last few
        # inputs' cache would hold (prod(k) times the conv's input each, for four more products)
        entry = [A, None, next(self.serial)] if kind == "conv" else self.input(A)
        key = entry[2]
        if any(key in keys for r, keys in s.inputs.items() if r != out_range):
            return  # another output block of the same product input: A is counted once
        if not s.note_use(kind, A.shape[1], out_dim, out_range, key):
            return
        stats = self.stats_for(s, kind, A.shape[1], out_range, key, groups)
        if stats is None:
            return
        if isinstance(stats, GramStats):
            stats.add(A, entry, key, source=source)
        elif isinstance(stats, (GroupedStats, GroupedPowerStats)):
            stats.add(A, key, source=source)
        else:
            stats.add(rows_of(A))

    def stats_for(self, s: Slot, kind: str, n: int, out_range: tuple, key, groups: int = 1):
        """The statistics this use adds to: the weight's own, or — for an output block whose input differs from
        the first block's (cross-attention's k/v rows) — that block's, kept across steps for warm starts. A
        convolution's groups get statistics each (`GroupedStats`); None (with `problem` set) when one step uses
        the kernel with two group counts."""
        if s.main_range is None or s.main_range == out_range or key in s.inputs.get(s.main_range, ()):
            s.main_range = s.main_range or out_range
            if s.stats is not None and groups_of(s.stats) != groups:
                if s.stats.rows:
                    s.problem = (f"used as a convolution kernel with groups={groups_of(s.stats)} and groups={groups} in one "
                                 "step: its input has no one st(A)")
                    return None
                s.stats = None  # regrouped since its last measured step: its warm blocks are another layout's
            if s.stats is None:
                s.stats = self.new_stats(kind, n, groups)
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


def expert_of(base: torch.Tensor, M: torch.Tensor) -> int | None:
    """e when the 2-D `M` is matrix e of the stack `base` [E, ·, ·] (`base[e]`, or its transpose), else None."""
    if M.dim() != 2 or base.dim() != 3 or base.shape[0] == 0:
        return None
    offset, step = M.storage_offset() - base.storage_offset(), base.stride(0)
    if step <= 0 or offset < 0 or offset % step or offset // step >= base.shape[0]:
        return None
    own = sorted(zip(base.shape[1:], base.stride()[1:]))
    return offset // step if sorted(zip(M.shape, M.stride())) == own and M.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() else None


def _wrapped(t: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _groups_patches(x: torch.Tensor, weight_shape, stride, padding, dilation, groups: int, g0: int, g1: int) -> torch.Tensor:
    """The patches of groups g0..g1-1 of a grouped convolution alone: those groups' input channels, g1 - g0 groups."""
    per = x.shape[-len(weight_shape) + 1] // groups  # input channels a group (the channel axis: 0 unbatched, else 1)
    channels = x.narrow(x.dim() - len(weight_shape) + 1, g0 * per, (g1 - g0) * per)
    return patches(channels, weight_shape, stride, padding, dilation, g1 - g0)


def _unreadable(s: Slot, x: torch.Tensor) -> bool:
    """Whether the input x of slot s cannot be read (then s has that problem)."""
    if _readable(x):
        return False
    s.problem = (f"multiplied a {type(x).__name__} input without storage of its own (a wrapper tensor subclass), which "
                 f"the probe does not read; pass its inputs with monitor.observe('{s.name}', weight, inputs)")
    return True


def _readable(t: torch.Tensor) -> bool:
    """Whether an input's entries are its own storage: not a wrapper subclass (DTensor, anything with its own
    __torch_dispatch__) nor a torch.func transform's tensor. A plain subclass is read as a tensor."""
    return type(t).__torch_dispatch__ is torch._C._disabled_torch_dispatch_impl and not _wrapped(t)


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
        if op is aten.index and torch.is_grad_enabled():  # W[expert_ids] of a stack, for the bmm that follows
            self.watch.gather(args, out)
        if op is aten._to_copy and isinstance(args[0], torch.Tensor):  # autocast's copy of a weight
            hit = resolve(args[0], self.watch.slots, self.watch.casts)
            if hit is not None:
                self.watch.casts[id(out)] = (hit[0], weakref.ref(out))  # not held: a micro-batch's copies go with it
                self.watch.expert_cast(args[0], hit[1], out)
        return out


class CallWatch(TorchFunctionMode):
    """The watch of a first measured step; sees every torch call of the step.

    A call that touches no tracked weight runs as is (one Python call, no aten-level watch: most of a
    forward). One that does goes to `Watch.call`. `loss.backward()` is seen for the head role; it runs under
    `AtenWatch` only while some tracked weight was not reached by a forward (a checkpointed forward recomputed
    in the backward pass can still reach it). Later measured steps take `ParamWatch` where they can."""

    def __init__(self, watch: "Watch"):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        w = self.watch
        if func in BACKWARDS and args:  # (every call of a measured forward passes here: kept cheap)
            w.backward_seen = True
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
        return w.call(func, args, kwargs)


# property reads of a weight that neither use it nor make a view of it: passed straight through
PASSIVE = frozenset(getattr(torch.Tensor, n).__get__ for n in (
    "shape", "dtype", "device", "requires_grad", "is_leaf", "grad", "grad_fn", "layout", "ndim", "is_cuda", "is_sparse",
    "is_meta", "is_quantized", "is_nested", "data", "_base", "_version", "output_nr", "itemsize", "nbytes"))
PASSIVE |= {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.stride, torch.Tensor.is_contiguous,
            torch.Tensor.data_ptr, torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.element_size,
            torch.Tensor.__len__, torch.Tensor.storage_offset, torch.Tensor.untyped_storage}


class ParamWatch:
    """The watch of a measured step by the weights themselves, for as long as the step lasts: each tracked
    weight's class becomes `WatchedParameter`, whose `__torch_function__` hands the calls that touch it to
    `Watch.call`, and every other call of the step runs at full speed. (A TorchFunctionMode costs ≈ 5 µs of
    host time on each of the ≈ 200 torch calls of a small GPT's forward; this costs one Python call for each
    use of a tracked weight.) Views and cast copies of a weight are handed back as `WatchedParameter` too, so
    that a product with `W.T` or with `W.to(torch.bfloat16)` is seen as one with W.

    It needs plain nn.Parameter weights (not FSDP2's DTensors, not another subclass) and a head role already
    known: the backward pass is not seen here, so `Monitor` takes it on a step watched by `CallWatch` first."""

    def __init__(self, watch: "Watch"):
        self.token = _Token(watch)
        self.params = [s.param for s in watch.slots.values()]

    @staticmethod
    def applies(watch: "Watch") -> bool:
        return not watch.fsdp and all(type(s.param) is nn.Parameter for s in watch.slots.values())

    def __enter__(self) -> "ParamWatch":
        for p in self.params:
            p.__class__, p._specscope_watch = WatchedParameter, self.token
        return self

    def __exit__(self, *exc) -> None:
        for p in self.params:
            p.__class__ = nn.Parameter
            del p._specscope_watch
        self.token.watch = None  # a view handed out during the step and kept by the user passes through from now on


class _Token:
    """What a watched weight and its views point to: the step's Watch while the step lasts, then None."""

    __slots__ = ("watch",)

    def __init__(self, watch: "Watch"):
        self.watch = watch


def _watch_of(args) -> _Token | None:
    for a in args:
        if type(a) is WatchedParameter:
            return a._specscope_watch
        if (type(a) is list or type(a) is tuple) and (t := _watch_of(a)) is not None:  # cat takes a list
            return t
    return None


class WatchedParameter(nn.Parameter):
    """A tracked weight (or a view or cast copy of one) during a measured step watched by `ParamWatch`."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        token = _watch_of((*args, *kwargs.values()) if kwargs else args)
        w = None if token is None else token.watch
        with torch._C.DisableTorchFunctionSubclass():
            if w is None or func in PASSIVE or not torch.is_grad_enabled():
                return func(*args, **kwargs)
            out = w.call(func, args, kwargs)
        return out if func in PRODUCTS else _still_watched(out, token, args)  # a product's output is no weight

    def __deepcopy__(self, memo):
        """A copy made during the step (an EMA model) holds plain nn.Parameters (pickling gives them already)."""
        if id(self) not in memo:
            memo[id(self)] = nn.Parameter(self.data.clone(memory_format=torch.preserve_format), self.requires_grad)
        return memo[id(self)]


def _still_watched(out, token: _Token, args):
    """The outputs that are views or cast copies of a tracked weight, as WatchedParameter; the rest (a product's
    output, the weight itself from an in-place op) as they are."""
    if isinstance(out, torch.Tensor):
        w = token.watch
        if type(out) is WatchedParameter or any(out is a for a in args) or resolve(out, w.slots, w.casts) is None:
            return out
        view = out.as_subclass(WatchedParameter)
        view._specscope_watch = token
        return view
    if type(out) is tuple or type(out) is list:  # split, chunk, unbind
        return type(out)(_still_watched(o, token, args) for o in out)
    return out


# an optimizer step taken inside a measured step keeps torch.optim's foreach / fused path (as DTensor registers itself)
_OPTIM_TYPES = getattr(importlib.import_module("torch.optim.optimizer"), "_foreach_supported_types", None)
if isinstance(_OPTIM_TYPES, list) and WatchedParameter not in _OPTIM_TYPES:
    _OPTIM_TYPES.append(WatchedParameter)
