"""Small transformers for modular arithmetic (papers 003 and 004, REFERENCE §6).

One configurable `ModularTransformer`; `enc003` and `tf004` are the two published settings:
- paper 003: 2-layer pre-LayerNorm encoder, d 128, 4 heads, d_ff 256, GELU, learned positions,
  readout from token 0 of the input [a, b];
- paper 004: pre-RMSNorm, QK-norm (an RMSNorm on each head's queries and keys, so the attention
  scores and hence the loss do not change when W_Q or W_K is rescaled), SiLU or SwiGLU MLP, no
  biases, readout from the `=` token of [a, b, =].

Q, K, V and the output projection are separate nn.Linear named `blocks.{i}.attn.q|k|v|o`, so a
regularizer or probe selects W_Q, W_K by name. Several tasks share the encoder; each has its own head.
"""

from __future__ import annotations

import numbers
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from specscope.errors import ConfigError

Norm = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["gelu", "silu", "swiglu"]
Kernel = Literal["sdpa", "explicit"]


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v by broadcast products, [B, H, T, d]: the function F.scaled_dot_product_attention
    computes (other rounding). For the 2–3 tokens of these tasks it costs less than the CPU flash-attention
    kernel, whose fixed setup per call dominates at such lengths."""
    scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * q.shape[-1] ** -0.5  # [B, H, Tq, Tk]
    return (scores.softmax(-1).unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)


def _check_choice(name: str, value, options: tuple[str, ...]) -> None:
    """An unknown option name is refused, never mapped to a default."""
    if value not in options:
        raise ConfigError(f"{name}={value!r} is not one of {options}; pick one of those")


def _check_size(name: str, value, minimum: int = 1) -> None:
    """A whole number ≥ minimum (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"ModularTransformer {name}={value!r} must be a whole number ≥ {minimum}; give an integer ≥ {minimum}")


def _norm(kind: Norm, d: int, bias: bool) -> nn.Module:
    _check_choice("norm", kind, get_args(Norm))
    return nn.LayerNorm(d, bias=bias) if kind == "layernorm" else nn.RMSNorm(d)


def check_heads(d: int, n_heads: int) -> None:
    """d_model splits into n_heads heads of equal width."""
    if d % n_heads:
        raise ConfigError(f"d_model={d} is not divisible by n_heads={n_heads}; pick d_model a multiple of n_heads")


class Attention(nn.Module):
    """Multi-head self-attention (no mask: the inputs are a set of operands). With `qk_norm`, queries and
    keys are RMS-normalized per head before the dot product (with a learned gain), which makes the
    output invariant to the scale of W_Q and W_K; their biases are then off to keep that exact. `kernel`:
    F.scaled_dot_product_attention, or `explicit_attention` (cheaper for a few tokens)."""

    def __init__(self, d: int, n_heads: int, bias: bool, qk_norm: bool, kernel: Kernel = "sdpa"):
        super().__init__()
        _check_choice("kernel", kernel, get_args(Kernel))
        self.attend = explicit_attention if kernel == "explicit" else F.scaled_dot_product_attention
        check_heads(d, n_heads)
        self.n_heads, self.head_dim = n_heads, d // n_heads
        qk_bias = bias and not qk_norm
        self.q, self.k = nn.Linear(d, d, bias=qk_bias), nn.Linear(d, d, bias=qk_bias)
        self.v, self.o = nn.Linear(d, d, bias=bias), nn.Linear(d, d, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else None

    def forward(self, x: torch.Tensor, x_query: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of `x`; with `x_query` only those positions ask (keys and values still come from all)."""
        xq = x if x_query is None else x_query
        heads = lambda t: t.view(t.shape[0], t.shape[1], self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q(xq)), heads(self.k(x)), heads(self.v(x))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        y = self.attend(q, k, v)
        return self.o(y.transpose(1, 2).reshape(xq.shape))


class MLP(nn.Module):
    """up -> activation -> down; `swiglu` adds a gate: down(silu(gate x) * up x)."""

    def __init__(self, d: int, d_ff: int, kind: MLPKind, bias: bool):
        super().__init__()
        _check_choice("mlp", kind, get_args(MLPKind))
        self.kind = kind
        self.up, self.down = nn.Linear(d, d_ff, bias=bias), nn.Linear(d_ff, d, bias=bias)
        self.gate = nn.Linear(d, d_ff, bias=bias) if kind == "swiglu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        act = F.gelu if self.kind == "gelu" else F.silu
        return self.down(act(self.up(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d: int, n_heads: int, d_ff: int, norm: Norm, mlp: MLPKind, bias: bool, qk_norm: bool,
                 kernel: Kernel = "sdpa"):
        super().__init__()
        self.norm1, self.attn = _norm(norm, d, bias), Attention(d, n_heads, bias, qk_norm, kernel)
        self.norm2, self.mlp = _norm(norm, d, bias), MLP(d, d_ff, mlp, bias)

    def forward(self, x: torch.Tensor, only: int | None = None) -> torch.Tensor:
        """`only`: compute the output at that position alone (the last block before a single-token readout:
        the same numbers for that position at a fraction of the cost)."""
        h = self.norm1(x)
        if only is not None:
            x, hq = x[:, [only]], h[:, [only]]
            x = x + self.attn(h, hq)
        else:
            x = x + self.attn(h)
        return x + self.mlp(self.norm2(x))


class ModularTransformer(nn.Module):
    """Token + learned position embeddings, `n_layers` pre-norm blocks, a final norm, and one linear head
    per task reading the hidden state at position `readout`.

    forward(x [B, T] token ids) -> logits [B, p] for one task, [B, n_tasks, p] for several.
    """

    def __init__(
        self,
        vocab_size: int,
        n_classes: int,
        seq_len: int,
        n_tasks: int = 1,
        d_model: int = 128,
        n_heads: int = 4,
        d_ff: int = 256,
        n_layers: int = 2,
        norm: Norm = "layernorm",
        mlp: MLPKind = "gelu",
        qk_norm: bool = False,
        bias: bool = True,
        readout: int = 0,
        kernel: Kernel = "sdpa",
    ):
        super().__init__()
        for name, value in dict(vocab_size=vocab_size, n_classes=n_classes, seq_len=seq_len, n_tasks=n_tasks,
                                d_model=d_model, n_heads=n_heads, d_ff=d_ff).items():
            _check_size(name, value)
        _check_size("n_layers", n_layers, 0)  # 0 layers: embeddings → norm → head (forward reads `readout`)
        if isinstance(readout, bool) or not isinstance(readout, numbers.Integral):
            raise ConfigError(f"ModularTransformer readout={readout!r} must be a whole-number position")
        _check_choice("norm", norm, get_args(Norm))
        _check_choice("mlp", mlp, get_args(MLPKind))
        _check_choice("kernel", kernel, get_args(Kernel))
        if not -seq_len <= readout < seq_len:
            raise ConfigError(f"readout position {readout} is outside a sequence of length {seq_len}")
        self.readout, self.n_tasks = readout, n_tasks
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, norm, mlp, bias, qk_norm, kernel) for _ in range(n_layers))
        self.norm = _norm(norm, d_model, bias)
        self.heads = nn.ModuleList(nn.Linear(d_model, n_classes, bias=bias) for _ in range(n_tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"ModularTransformer input must be integer token ids [batch, seq_len]; got shape "
                              f"{tuple(x.shape)}, dtype {x.dtype} (use x.long(), add a batch dimension with x[None])")
        if x.shape[1] > self.pos.shape[0]:
            raise ConfigError(f"sequence length {x.shape[1]} exceeds ModularTransformer seq_len={self.pos.shape[0]}")
        h = self.embed(x) + self.pos[: x.shape[1]]
        for i, block in enumerate(self.blocks):
            h = block(h, self.readout if i == len(self.blocks) - 1 else None)
        h = self.norm(h[:, -1 if len(self.blocks) else self.readout])
        if self.n_tasks == 1:
            return self.heads[0](h)
        return torch.stack([head(h) for head in self.heads], dim=1)


def enc003(p: int, n_tasks: int = 1, *, seq_len: int = 2, d_model: int = 128, n_heads: int = 4,
           d_ff: int = 256, n_layers: int = 2, mlp: MLPKind = "gelu", kernel: Kernel = "sdpa") -> ModularTransformer:
    """Paper 003's encoder: pre-LayerNorm, GELU, biases, readout from token 0 of [a, b]."""
    return ModularTransformer(p + 1, p, seq_len, n_tasks, d_model, n_heads, d_ff, n_layers,
                              norm="layernorm", mlp=mlp, qk_norm=False, bias=True, readout=0, kernel=kernel)


def tf004(p: int, n_tasks: int = 1, *, seq_len: int = 3, d_model: int = 128, n_heads: int = 4,
          d_ff: int = 512, n_layers: int = 2, mlp: MLPKind = "swiglu") -> ModularTransformer:
    """Paper 004's transformer: pre-RMSNorm, QK-norm (loss invariant to the scale of W_Q, W_K), SwiGLU,
    no biases, readout from the last token (`=` in [a, b, =])."""
    return ModularTransformer(p + 1, p, seq_len, n_tasks, d_model, n_heads, d_ff, n_layers,
                              norm="rmsnorm", mlp=mlp, qk_norm=True, bias=False, readout=-1)


def qk_weights(model: nn.Module, targets: tuple[str, ...] = ("q", "k")) -> dict[str, nn.Parameter]:
    """The weights of the attention projections named in `targets` (q, k, v, o), by qualified name
    (`blocks.0.attn.q`), in model order."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 2)[-2:-1] == ["attn"] and name.rsplit(".", 1)[-1] in targets:
            out[name] = module.weight
    return out
