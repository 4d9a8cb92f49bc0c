import pytest
import torch

from specscope.models import GPT, GPTConfig


def _tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=32, seq_len=16, n_layer=1, n_head=2, d_model=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def _lm_step(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    # skewed unigram so N/c_max is far from the vocabulary size
    p = 1.0 / torch.arange(1, 33, dtype=torch.float64)
    return torch.multinomial(p, 6 * 17, replacement=True, generator=g).view(6, 17)


@pytest.fixture
def tiny_gpt():
    return _tiny_gpt


@pytest.fixture
def lm_step():
    return _lm_step
