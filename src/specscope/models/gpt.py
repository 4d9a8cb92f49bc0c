"""A small reference decoder-only GPT (nanoGPT-like): RMSNorm, causal SDPA, rotary or learned positions.

Module names are part of the contract the probe and the labs rely on (REFERENCE §2 pairing):
`embed`, `pos_embed` (learned positions only), `blocks.{i}.attn_norm`, `blocks.{i}.attn.{q,k,v,o}`
(or `.qkv` when `fused_qkv`), `blocks.{i}.mlp_norm`, `blocks.{i}.mlp.{up,gate,down}`, `final_norm`, `head`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specscope.errors import ConfigError

MLP_KINDS = ("relu2", "gelu", "swiglu")
POS_KINDS = ("rope", "learned")


def _check_size(name: str, value, minimum: int = 1) -> None:
    """A whole number ≥ minimum (not a bool, not a float), else a ConfigError naming GPTConfig.<name>."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"GPTConfig.{name}={value!r} must be a whole number ≥ {minimum}; give a positive integer")


@dataclass
class GPTConfig:
    vocab_size: int = 256
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    d_ff: int | None = None  # default 4·d_model, or 8/3·d_model (rounded to 8) for SwiGLU
    mlp: str = "relu2"
    qk_norm: bool = False
    pos: str = "rope"
    tie_embeddings: bool = False
    fused_qkv: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            _check_size(name, getattr(self, name))
        if self.d_ff is not None:
            _check_size("d_ff", self.d_ff)
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:  # NaN fails 0 <= p
            raise ConfigError(f"GPTConfig.dropout={p!r} must be a probability in [0, 1); give e.g. 0.0 or 0.1")
        if self.mlp not in MLP_KINDS:
            raise ConfigError(f"GPTConfig.mlp={self.mlp!r} is not one of {MLP_KINDS}")
        if self.pos not in POS_KINDS:
            raise ConfigError(f"GPTConfig.pos={self.pos!r} is not one of {POS_KINDS}")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.pos == "rope" and (self.d_model // self.n_head) % 2:
            raise ConfigError(f"rotary positions need an even head size; got {self.d_model // self.n_head}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.mlp != "swiglu" else 8 * ((8 * self.d_model // 3 + 7) // 8)


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [seq_len, head_dim/2] of the rotary frequencies."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) of the two halves of the head dimension by the position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d, self.n_head, self.fused = cfg.d_model, cfg.n_head, cfg.fused_qkv
        if self.fused:
            self.qkv = nn.Linear(d, 3 * d, bias=False)
        else:
            self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o = nn.Linear(d, d, bias=False)
        hd = d // cfg.n_head
        self.q_norm = nn.RMSNorm(hd) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(hd) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1) if self.fused else (self.q(x), self.k(x), self.v(x))
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope[0][:T], rope[1][:T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False) if cfg.mlp == "swiglu" else None
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "relu2":
            h = F.relu(h).square()
        elif self.kind == "gelu":
            h = F.gelu(h)
        else:
            h = F.silu(self.gate(x)) * h
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), rope))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    """Decoder-only transformer: forward(idx [B, T] of token ids) -> logits [B, T, vocab_size]."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.seq_len, cfg.d_model // cfg.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        # GPT-2 scaling: residual-branch outputs shrink with depth so the residual stream stays O(1).
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.ndim != 2:
            raise ConfigError(f"GPT input must be token ids of shape [batch, seq_len]; got shape {tuple(idx.shape)} "
                              "(add a batch dimension with idx[None])")
        if idx.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"GPT input must be integer token ids (torch.long); got dtype {idx.dtype} (use idx.long())")
        T = idx.shape[-1]
        if T > self.cfg.seq_len:
            raise ConfigError(f"sequence length {T} exceeds GPTConfig.seq_len={self.cfg.seq_len}")
        # checked on a CPU only: on an accelerator it would wait for the device each step, compiled it would break the graph
        if idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():
            lo, hi = (int(v) for v in torch.aminmax(idx))
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ConfigError(f"token id {lo if lo < 0 else hi} is outside GPTConfig.vocab_size={self.cfg.vocab_size} "
                                  f"(ids 0..{self.cfg.vocab_size - 1}); build the model with the tokenizer's vocabulary size")
        x = self.embed(idx)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(T, device=idx.device))
        x = self.drop(x)
        rope = (self.rope_cos, self.rope_sin) if self.cfg.pos == "rope" else None
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.final_norm(x))
