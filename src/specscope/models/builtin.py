"""Built-in targets for `specscope diagnose` and the demo: a small MLP on a teacher task and a small GPT on a
synthetic language with a skewed unigram distribution, plus transformers models by `hf:` name
(specscope.models.hf). Each comes with its batch iterator and loss."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from specscope.models.gpt import GPT, GPTConfig
from specscope.models.mlp import MLP

TRANSFORMER = dict(vocab_size=64, seq_len=32, n_layer=2, n_head=4, d_model=64)
BATCH = 16


def language_batches(seed: int, vocab: int = 64, seq_len: int = 32, batch: int = BATCH) -> Iterator[torch.Tensor]:
    """A synthetic language: a fixed random bigram chain whose rows are Zipf(1.2) over shuffled tokens.

    The unigram distribution is skewed (so the embedding's N/c_max is far below the vocabulary size) and
    the next token is predictable from the previous one (so the loss falls). Yields [batch, seq_len+1].
    """
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.2
    trans = torch.stack([zipf[torch.randperm(vocab, generator=g)] for _ in range(vocab)])
    trans = trans / trans.sum(1, keepdim=True)
    while True:
        tok = torch.multinomial(zipf / zipf.sum(), batch, replacement=True, generator=g)
        seq = [tok]
        for _ in range(seq_len):
            tok = torch.multinomial(trans[tok], 1, generator=g).squeeze(1)
            seq.append(tok)
        yield torch.stack(seq, 1)


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def teacher_batches(seed: int, d_in: int = 32, classes: int = 10, batch: int = 128) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Gaussian inputs labelled by a fixed random two-layer teacher."""
    g = torch.Generator().manual_seed(seed)
    W1, W2 = torch.randn(d_in, 64, generator=g), torch.randn(64, classes, generator=g)
    while True:
        x = torch.randn(batch, d_in, generator=g)
        yield x, (torch.relu(x @ W1) @ W2).argmax(1)


def mlp_loss(model, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def builtin(name: str, seed: int):
    """(model, batches, loss_fn) of a built-in model: 'mlp', 'transformer', or 'hf:<folder or gpt2|llama|bert|mixtral>'
    (a transformers model on the stdlib corpus, specscope.models.hf)."""
    if name.startswith("hf:"):
        from specscope.models.hf import hf_model

        return hf_model(name[3:], seed)
    torch.manual_seed(seed)
    if name == "mlp":
        return MLP([32, 128, 128, 10], activation="relu"), teacher_batches(seed), mlp_loss
    cfg = GPTConfig(**TRANSFORMER)
    return GPT(cfg), language_batches(seed, cfg.vocab_size, cfg.seq_len), lm_loss
