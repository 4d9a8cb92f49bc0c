"""Which matrix each weight multiplies (REFERENCE §2), seen at the operation, not the module class.

On a measured step the Monitor watches every matrix product, convolution and embedding lookup of the
forward pass (probe.watch: a `TorchFunctionMode` on a Monitor's first measured step, the weights themselves
after it): plain products (F.linear, addmm, mm, matmul) and embedding lookups are paired at the torch call,
and any other call that touches a tracked weight runs under a `TorchDispatchMode`, which sees its aten ops. When one operand is a tracked weight (or a view of it: `W.T` inside `F.linear`, a row
block of `nn.MultiheadAttention`'s `in_proj_weight`, a column block of transformers' `Conv1D` weight
stored [in, out]), the other operand is the input matrix A of that weight, in the weight's own
orientation:

    y = A @ M, M a view of W   ->  rows of A are the inputs; W's output dim is the one M's columns index
    convolution(x, W, groups)   ->  A = patches of x, [groups·positions, C/groups·k], group-major (a group's
                                    rows of W multiply that group's patches A_g only: st(A) is then
                                    Σ_g ‖A_g‖_F² / max_g ‖A_g‖₂², estimators.GroupedStats)
    embedding(W, ids)           ->  the one-hot matrix of ids (counted, never built)

Passes without gradient (evaluation) and the recomputed forwards of gradient checkpointing (they run
inside the backward pass) are not counted. A weight that is used some other way is named with the
reason; `Monitor.observe` remains for products the probe cannot see.
"""

from __future__ import annotations

import itertools
import math
import numbers
import sys
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from specscope.errors import ConfigError
from specscope.names import layer_name, name_matches

aten = torch.ops.aten
MATMULS = (aten.mm, aten.addmm)


@dataclass(frozen=True)
class Interleaved:
    """A fused output dimension laid out [heads, len(parts), head_dim] (GPT-NeoX `query_key_value`).

    `split={"*.query_key_value": Interleaved(("q", "k", "v"), heads=8)}` measures q, k and v separately.
    """

    parts: tuple[str, ...]
    heads: int

    def __post_init__(self) -> None:
        if isinstance(self.heads, bool) or not isinstance(self.heads, numbers.Integral) or self.heads < 1:
            raise ConfigError(f"Interleaved({self.parts!r}, heads={self.heads!r}): heads must be an int ≥ 1, the attention "
                              "heads the fused dimension holds (e.g. config.num_attention_heads)")

    def indices(self, out: int) -> list[tuple[str, torch.Tensor]]:
        k = len(self.parts)
        if out % (self.heads * k):
            raise ConfigError(f"Interleaved({list(self.parts)}, heads={self.heads}): {out} outputs do not divide into heads × parts")
        layout = torch.arange(out).view(self.heads, k, out // (self.heads * k))
        return [(p, layout[:, i].reshape(-1)) for i, p in enumerate(self.parts)]


def split_indices(name: str, spec, out: int) -> list[tuple[str, slice | torch.Tensor]]:
    """(slice name, index along the output dim) of a fused weight, from a `split=` value:
    [names] (equal contiguous blocks), {name: size} (contiguous blocks) or `Interleaved`."""
    if isinstance(spec, Interleaved) and isinstance(spec.parts, str):  # Interleaved("qkv", ...) would split into letters
        raise ConfigError(f"split of '{name}': Interleaved({spec.parts!r}, ...) takes its part names as a list, e.g. "
                          "Interleaved(['q', 'k', 'v'], heads=H)")
    names = split_parts(spec)
    if len(set(map(repr, names))) < len(names) or not all(isinstance(p, str) and p for p in names):
        raise ConfigError(f"split of '{name}': part names {names} must be distinct non-empty names, e.g. ['q', 'k', 'v']")
    if isinstance(spec, Interleaved):
        return [(f"{name}.{p}", idx) for p, idx in spec.indices(out)]
    if isinstance(spec, dict):
        sizes = dict(spec)
        if bad := {p: n for p, n in sizes.items() if isinstance(n, bool) or not isinstance(n, int) or n < 1}:
            raise ConfigError(f"split of '{name}': sizes {bad} must be positive integers (rows of each part)")
    else:
        if 0 < out < len(spec):  # (a weight with no outputs is refused as such, later)
            raise ConfigError(f"split of '{name}': {out} outputs cannot be split into {len(spec)} parts {names}; give "
                              "fewer parts, or split another weight")
        if out % len(spec):
            rows = [out // len(spec) + (i < out % len(spec)) for i in range(len(spec))]  # sizes that add to out
            example = dict(zip(names, rows))
            raise ConfigError(f"split of '{name}': {out} outputs do not divide into {len(spec)} equal parts; give each "
                              f"part's rows, adding to {out}, e.g. {example} (CLI: --split PATTERN="
                              + ",".join(f"{p}:{n}" for p, n in example.items()) + ")")
        sizes = {p: out // len(spec) for p in spec}
    if sum(sizes.values()) != out:
        raise ConfigError(f"split of '{name}': sizes {sizes} add to {sum(sizes.values())}, the weight has {out} outputs")
    out_, start = [], 0
    for p, n in sizes.items():
        out_.append((f"{name}.{p}", slice(start, start + n)))
        start += n
    return out_


def expert_name(name: str, e: int) -> str:
    """The recorded name of expert e of a stacked weight [E, ·, ·]: `…experts.gate_up_proj[3]`."""
    return f"{name}[{e}]"


def split_parts(spec) -> list[str]:
    return list(spec.parts if isinstance(spec, Interleaved) else spec)


KINDS = ("", "linear", "conv", "embedding", "experts", "observed")  # how a weight was seen used (Slot.kind)


@dataclass
class Slot:
    """One tracked weight: how it was used on the current step and its input statistics."""

    name: str
    param: nn.Parameter
    split: object = None
    kind: str = ""  # one of KINDS: "" until seen, then "linear" | "conv" | "embedding" | "experts" (a stack [E, ·, ·] measured per expert) | "observed"
    n_features: int = 0
    out_dim: int = 0  # the parameter's dim that indexes outputs (1 for a weight stored [in, out])
    stats: object = None  # dense input statistics (persist across steps: warm starts)
    tokens: object = None  # embedding lookups
    role: str = "hidden"
    block_stats: dict = field(default_factory=dict)  # output range -> statistics, for blocks with their own input
    # per step
    problem: str = ""
    forward_seen: bool = False
    inputs: dict = field(default_factory=dict)  # output range -> set of input keys
    main_range: tuple | None = None  # the output range whose input `stats` holds
    slice_range: dict = field(default_factory=dict)  # slice name -> output range, when blocks differ in input
    slice_union: dict = field(default_factory=dict)  # slice name -> the output ranges holding it, when several products cover it
    other_ops: set = field(default_factory=set)
    gone: str = ""  # why the weight this slot tracked is no longer the model's (replaced after the Monitor was built)
    shape: tuple = ()  # the weight's shape its statistics were made for (a resize in place changes it)

    def __post_init__(self) -> None:
        self.shape = tuple(self.param.shape)

    def grad_matrix(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient as a matrix in the weight's stored orientation (conv kernels flattened per output); a stack
        of experts' matrices stays a stack [E, ·, ·]."""
        return g.to_dense() if self.kind == "experts" else g.to_dense().reshape(g.shape[0], -1)

    def names(self) -> list[str]:
        if self.kind == "experts":
            return [expert_name(self.name, e) for e in range(self.param.shape[0])]
        return [f"{self.name}.{p}" for p in split_parts(self.split)] if self.split is not None else [self.name]

    def slices(self, G: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(name, gradient block) per recorded weight: the whole matrix, the fused weight's slices, or a stack's
        experts."""
        if self.kind == "experts":
            return [(expert_name(self.name, e), G[e]) for e in range(G.shape[0])]
        if self.split is None:
            return [(self.name, G)]
        out = []
        for nm, idx in split_indices(self.name, self.split, G.shape[self.out_dim]):
            blk = G[idx] if self.out_dim == 0 else G[:, idx]
            out.append((nm, blk))
        return out

    def begin_step(self) -> None:
        self.problem, self.inputs, self.other_ops, self.forward_seen = "", {}, set(), False
        self.main_range, self.slice_range, self.slice_union = None, {}, {}

    def note_use(self, kind: str, n: int, out_dim: int, out_range: tuple[int, int], key) -> bool:
        """Record one use; False (with `problem` set) when it contradicts an earlier one."""
        if self.kind in ("", "embedding") or (kind == self.kind and n == self.n_features and out_dim == self.out_dim):
            self.kind, self.n_features, self.out_dim = kind, n, out_dim
        elif self.kind != "observed":
            self.problem = f"used as {kind} on {n} input features and as {self.kind} on {self.n_features}"
            return False
        self.inputs.setdefault(out_range, set()).add(key)
        return True

    def check_ranges(self) -> None:
        """Output blocks used on different inputs (cross-attention's q vs kv rows) are not one A: each slice of
        the split is measured with the inputs of the blocks that contain it (`slice_union` where there are several:
        one attention used for self- and then cross-attention multiplies q's rows by [x; h]); without such a split,
        a problem. A stack's expert e is block (e, e + 1), measured with the rows routed to it."""
        if self.kind == "experts":
            self.slice_range = {expert_name(self.name, e): (e, e + 1) for e in range(self.param.shape[0])}
            return
        if len(self.inputs) < 2 or len({frozenset(k) for k in self.inputs.values()}) < 2:
            return
        if self.split is not None:
            where, union = {}, {}
            for nm, idx in split_indices(self.name, self.split, self.param.shape[self.out_dim]):
                lo, hi = (idx.start, idx.stop) if isinstance(idx, slice) else (int(idx.min()), int(idx.max()) + 1)
                holding = tuple(sorted(r for r in self.inputs if r[0] <= lo and hi <= r[1]))
                where[nm] = holding[0] if holding else None
                if len({frozenset(self.inputs[r]) for r in holding}) > 1:
                    union[nm] = holding
            if all(r is not None for r in where.values()):
                self.slice_range, self.slice_union = where, union
                return
        blocks = ", ".join(f"{a}:{b}" for a, b in sorted(self.inputs))
        example = "['q', 'k', 'v']" if self.name.endswith("in_proj_weight") else "{name: size, ...}"
        self.problem = (f"output blocks {blocks} multiply different inputs; measure them separately with a split whose "
                        f"slices each lie in one block, e.g. split={{'{self.name}': {example}}}")


_PACKAGE = str(__import__("pathlib").Path(__file__).resolve().parents[1])  # src/specscope


def user_level() -> int:
    """warnings.warn's stacklevel (for its caller) that points at the first frame outside specscope and contextlib:
    the user's line (`with monitor.step(...)`), however many of the Monitor's own frames lie between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE)
                                 or frame.f_code.co_filename.endswith("contextlib.py")):
        frame, level = frame.f_back, level + 1
    return level


def check_patterns(kind: str, patterns) -> tuple[str, ...] | None:
    """include= / exclude= as a tuple of fnmatch patterns (None stays None); a ConfigError for a bare string, which
    would be read one character at a time, or for a pattern that is no string."""
    if patterns is None:
        return None
    if not isinstance(patterns, str) and isinstance(patterns, Iterable):
        patterns = tuple(patterns)
        if all(isinstance(k, str) for k in patterns):
            return patterns
    example = patterns if isinstance(patterns, str) else "blocks.*.attn.*"
    raise ConfigError(f"{kind}={patterns!r}: give a list of layer-name patterns (str, fnmatch), e.g. {kind}=[{example!r}]")


def _matches(name: str, patterns) -> bool:
    return any(name_matches(name, p) for p in patterns)


def frozen_names(model: nn.Module, *, include=None, exclude=()) -> set[str]:
    """The layer names of the frozen ≥2-D parameters that include/exclude (checked by `tracked_slots`) would track."""
    include, exclude = check_patterns("include", include), check_patterns("exclude", exclude) or ()
    names = {layer_name(n) for n, p in model.named_parameters() if p.dim() >= 2 and not p.requires_grad}
    return {n for n in names if (include is None or _matches(n, include)) and not _matches(n, exclude)}


def tracked_slots(model: nn.Module, *, include=None, exclude=(), split=None) -> dict[int, Slot]:
    """A slot for every trainable ≥2-D parameter whose layer name passes include/exclude."""
    split = split or {}
    if lazy := [layer_name(n) for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]:
        raise ConfigError(f"parameters {lazy[:4]}{' …' if len(lazy) > 4 else ''} are not initialized yet (lazy modules, "
                          "e.g. nn.LazyLinear or nn.LazyBatchNorm1d, take their shapes from the first forward; the model "
                          "is not whole until then, whichever weights you include): run one forward pass on a batch, then "
                          "build the Monitor")
    slots: dict[int, Slot] = {}
    straddled: dict[str, list[str]] = {}  # a warning -> the weights it concerns
    owners = {id(m.weight): m for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    names = [layer_name(n) for n, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad]
    include, exclude = check_patterns("include", include), check_patterns("exclude", exclude) or ()
    for kind, patterns in (("include", include or ()), ("exclude", exclude)):
        if unknown := [k for k in patterns if not _matches_any(k, names)]:
            raise ConfigError(f"{kind} patterns {unknown} match no weight of the model (fnmatch on layer names, "
                              f"e.g. 'blocks.*.attn.*'); names look like {names[:4]}")
    for pname, p in model.named_parameters():
        name = layer_name(pname)
        if p.dim() < 2 or not p.requires_grad:
            continue
        if (include is not None and not _matches(name, include)) or _matches(name, exclude):
            continue
        specs = [k for k in split if name_matches(name, k)]
        if len(specs) > 1 and len({repr(tuple(v) if isinstance(v := split[k], list) else v) for k in specs}) > 1:
            raise ConfigError(f"split patterns {specs} all match weight '{name}' and split it differently; make the "
                              "patterns exclusive (e.g. a full name for the one weight)")
        spec = split[specs[0]] if specs else None
        out_dim = 1 if type(owners.get(id(p))).__name__ == "Conv1D" else 0  # transformers' Conv1D stores [in, out]
        if spec is not None:
            split_indices(name, spec, p.shape[out_dim])  # a bad split fails here, not mid-training
            if (why := straddled_blocks(spec, p, out_dim)) is not None:
                straddled.setdefault(why, []).append(name)
        slots[id(p)] = Slot(name, p, spec, out_dim=out_dim)
    for why, layers in straddled.items():
        warnings.warn(f"split of {layers[0]!r}{f' and {len(layers) - 1} more' if len(layers) > 1 else ''}: {why}", stacklevel=user_level())
    if empty := [s for s in slots.values() if s.param.numel() == 0]:  # linalg refuses empty matrices mid-step
        shapes = ", ".join(f"'{s.name}' {tuple(s.param.shape)}" for s in empty[:4])
        raise ConfigError(f"weights {shapes} have a dimension of size 0: no entries, so no st(A) or nr(G) to measure; "
                          f"leave them out with exclude={[s.name for s in empty[:4]]}")
    if unknown := [k for k in split if not _matches_any(k, [s.name for s in slots.values()])]:
        raise ConfigError(f"split patterns {unknown} match no weight of the model; names look like {[s.name for s in slots.values()][:4]}")
    if names and not slots:
        given = " and ".join(f"{k}={list(v)}" for k, v in (("include", include), ("exclude", exclude))
                             if v or (k == "include" and v is not None))  # include=[] names no weight
        raise ConfigError(f"{given} leave{'s' if ' and ' not in given else ''} no weight to measure; names look "
                          f"like {names[:4]}")
    return slots


def straddled_blocks(spec, p: torch.Tensor, out_dim: int) -> str | None:
    """Why equal parts of a 2-D fused weight look wrong, or None: its output dim is k whole blocks of its
    input width (GPT-2's c_attn: 2304 = 3 × 768) and the parts cut across those blocks (two names give
    1152 each). Named sizes ({name: rows}) and `Interleaved` say the layout outright and are not checked."""
    if p.dim() != 2 or not isinstance(spec, (list, tuple)):
        return None
    out, width = p.shape[out_dim], p.shape[1 - out_dim]
    part = out // len(spec)
    if width == 0 or out % width or part % width == 0 or out == width:  # one block (a square weight split into heads): nothing fused
        return None
    k = out // width
    sizes = ",".join(f"{n}:{part}" for n in spec)
    return (f"{len(spec)} equal parts of {part} outputs cut across the {k} blocks of {width} that its {out} outputs "
            f"are made of; if it fuses {k} projections give {k} names (e.g. q,k,v), or give the sizes to keep "
            f"this split (CLI: --split PATTERN={sizes})")


def _matches_any(pattern: str, names) -> bool:
    return any(name_matches(n, pattern) for n in names)


def resolve(t: torch.Tensor, slots: dict[int, Slot], casts: dict) -> tuple[Slot, torch.Tensor] | None:
    """(slot, base) when `t` is a tracked weight, a view of one, or a view of its cast copy (autocast);
    `base` is the tensor whose storage t views. None when t is none of these."""
    for b in (t, t._base):
        if b is None:
            continue
        s = slots.get(id(b))
        if s is not None:
            return s, b
        c = casts.get(id(b))
        if c is not None and c[1]() is b:  # a weak reference: a dead copy's id, reused, matches nothing
            return c[0], b
    return None


def fsdp_aliases(model: nn.Module, slots: dict[int, Slot]) -> dict[int, tuple[Slot, torch.Tensor]]:
    """FSDP2 (`fully_shard`) runs the forward on an unsharded copy of each sharded parameter: map those
    copies to the slots of their sharded parameters (resolve() treats them like autocast copies)."""
    out: dict[int, tuple[Slot, torch.Tensor]] = {}
    for m in model.modules():
        get = getattr(m, "_get_fsdp_state", None)
        group = getattr(get(), "_fsdp_param_group", None) if callable(get) else None
        for fp in getattr(group, "fsdp_params", ()):
            s, u = slots.get(id(getattr(fp, "sharded_param", None))), getattr(fp, "_unsharded_param", None)
            if s is not None and u is not None:
                out[id(u)] = (s, weakref.ref(u))
    return out


def operand_layout(W: torch.Tensor, M: torch.Tensor) -> tuple[int, tuple[int, int], bool] | None:
    """For y = A @ M with M a 2-D view of weight W: (W's output dim, output range, whole input dim?)."""
    if W.dim() != 2 or M.dim() != 2:
        return None
    s0, s1 = W.stride()
    off = M.storage_offset() - W.storage_offset()
    r0, c0 = (off // s0, (off % s0) // s1) if s0 >= s1 and s1 > 0 else (0, 0)
    fits = lambda rows, cols: M.shape[0] <= W.shape[rows] and M.shape[1] <= W.shape[cols]  # noqa: E731
    # a size-1 dim's stride says nothing (Linear(1, k): W [k, 1] has strides (1, 1)): the shapes decide then
    if M is W or (M.stride() == (s0, s1) and fits(0, 1)):  # M = W[rows, cols]: W stored [in, out]
        return 1, (c0, c0 + M.shape[1]), M.shape[0] == W.shape[0]
    if M.stride() == (s1, s0) and fits(1, 0):  # M = W[rows, cols].T: W stored [out, in]
        return 0, (r0, r0 + M.shape[1]), M.shape[0] == W.shape[1]
    return None


def patches(x: torch.Tensor, weight_shape, stride, padding, dilation, groups: int) -> torch.Tensor:
    """Rows the kernel multiplies: [groups·B·positions, C/groups·prod(k)], columns in W.reshape(out, -1)'s order.
    Written by one copy from a strided view of x (a convolution's patches are prod(k) times its input: a second
    copy to reorder them cost as much as the first)."""
    k = tuple(weight_shape[2:])
    d = len(k)
    if x.dim() == d + 1:  # unbatched input
        x = x.unsqueeze(0)
    if any(padding):
        x = F.pad(x, [p for pd in reversed(padding) for p in (pd, pd)])
    for i in range(d):
        span = dilation[i] * (k[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])[..., :: dilation[i]]
    # x: [B, C, *out_positions, *k], a view; the rows in the order [g, B, *out_positions], columns [C/g, *k]
    B, C, positions = x.shape[0], x.shape[1], x.shape[2 : 2 + d]
    x = x.unflatten(1, (groups, C // groups)).permute(1, 0, *range(3, 3 + d), 2, *range(3 + d, 3 + 2 * d))
    out = torch.empty((groups, B, *positions, C // groups, *k), dtype=x.dtype, device=x.device)
    out.copy_(x)
    return out.view(-1, (C // groups) * math.prod(k))


def patches_shape(x_shape, weight_shape, stride, padding, dilation, groups: int) -> tuple[int, int]:
    """The shape `patches` gives, from the shapes alone: [groups·B·positions, C/groups·prod(k)]."""
    k = weight_shape[2:]
    d = len(k)
    batch = 1 if len(x_shape) == d + 1 else x_shape[0]
    sizes = x_shape[-d:]
    padding = list(padding) * d if len(padding) == 1 else padding  # aten's [0] for padding="valid"
    positions = math.prod((sizes[i] + 2 * padding[i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(d))
    return groups * batch * positions, x_shape[-d - 1] // groups * math.prod(k)


def input_matrix(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The matrix A (rows = samples/tokens/positions) whose rows module m's weight multiplies."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, m.in_features)
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.padding_mode == "zeros":
        pad = m.padding
        if pad == "valid":
            pad = (0,) * len(m.kernel_size)
        elif pad == "same":
            total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
            if any(t % 2 for t in total):
                raise TypeError("padding='same' with an even receptive field pads asymmetrically; the Monitor sees it at the operation")
            pad = tuple(t // 2 for t in total)
        return patches(x, m.weight.shape, m.stride, pad, m.dilation, m.groups)
    raise TypeError(f"no input matrix for {type(m).__name__}; the Monitor sees it at the operation")


_EMPTY = itertools.count()


def input_key(A: torch.Tensor) -> tuple:
    """Identity of an input within one step: the same activation seen by q, k and v gives one key. Inputs with no rows
    (a rank's empty share of a batch) have no data pointer to tell them apart by (it is 0): theirs is the storage
    object they view, so that views of one empty activation share a key as views of a full one do (q, k and v of one
    input: a rank whose share is empty pairs them as the others do) and distinct empty activations do not."""
    if A.numel() == 0:
        try:
            storage = A.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError):  # a tensor without storage of its own
            return ("empty", next(_EMPTY))
        return ("empty", storage, A.storage_offset(), tuple(A.shape), A.stride(), A._version, A.device)
    return (A.data_ptr(), tuple(A.shape), A.stride(), A._version, A.device)


def in_backward() -> bool:
    """True while autograd runs a backward pass (gradient checkpointing recomputes forwards there)."""
    return torch._C._current_graph_task_id() != -1
