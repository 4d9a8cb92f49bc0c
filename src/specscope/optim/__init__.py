"""Spectral optimizers: Muon, SpecGD, AutoGeometry, ℓ₁→ℓ₂ (L1ToL2), Hybrid groups, LowRankDecay (REFERENCE §3).

All are torch.optim.Optimizer subclasses (param groups, state_dict, step(closure)). Muon, SpecGD and
AutoGeometry are `Hybrid`s: any of their param groups may set algorithm="adamw"/"sgd"/... with its own lr.
"""

from specscope.optim._common import layer_name, mark_non_hidden
from specscope.optim.hybrid import ALGORITHMS, Hybrid, register, spectral_param_groups
from specscope.optim.muon import Muon
from specscope.optim.specgd import SpecGD
from specscope.optim.auto import AutoGeometry
from specscope.optim.l1_to_l2 import L1ToL2
from specscope.optim.lowrank_decay import LowRankDecay

__all__ = [
    "ALGORITHMS", "AutoGeometry", "Hybrid", "L1ToL2", "LowRankDecay", "Muon", "SpecGD",
    "layer_name", "mark_non_hidden", "register", "spectral_param_groups",
]
