"""Plain nn.Modules shared by labs, probe tests and benchmarks (imports only torch)."""

from specscope.models.gpt import GPT, GPTConfig
from specscope.models.mlp import MLP

__all__ = ["GPT", "GPTConfig", "MLP"]
