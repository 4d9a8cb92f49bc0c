"""The dtype the polynomial polar iterations compute in by default, per device (docs/linalg.md "Iteration dtype").

bfloat16 where the device multiplies it in hardware, as torch.optim.Muon computes: a CUDA GPU of compute capability
≥ 8 (bfloat16 tensor cores), any other accelerator, a CPU with AVX512_BF16, AMX or Arm's BF16. float32 elsewhere: a
CPU without those units multiplies bfloat16 through float32, slower than float32 itself (the iterations of one GPT
block 3.2× slower on an Intel Xeon of the Ice Lake generation), and float32 is also the more accurate.
SPECSCOPE_ITERATION_DTYPE=bfloat16 or float32 fixes the choice on every device (unset or "auto": the rule above).
"""
from __future__ import annotations

import functools
import sys

import torch

from specscope import settings

from . import _cpu

ENV = "SPECSCOPE_ITERATION_DTYPE"
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


def iteration_dtype(device: torch.device | str) -> torch.dtype:
    """The default compute dtype of `polar_express` and `gram_newton_schulz` (and so of `Muon`'s default step) for
    tensors on `device`. Raises ValueError for a SPECSCOPE_ITERATION_DTYPE it does not know."""
    fixed = DTYPES[settings.read(ENV)]
    if fixed is not None:
        return fixed
    device = torch.device(device)
    return torch.bfloat16 if _multiplies_bfloat16(device.type, device.index) else torch.float32


@functools.cache
def _multiplies_bfloat16(kind: str, index: int | None) -> bool:
    if kind == "cpu":
        return _cpu.bfloat16_units()
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("iteration_dtype('cuda'): this torch has no CUDA device; pass a device tensors live on")
        return torch.cuda.get_device_capability(index)[0] >= 8
    return True  # other accelerators (MPS, XPU, …): as before this rule, unmeasured


def is_dtensor(t: object) -> bool:
    """Whether `t` is a torch.distributed DTensor, read without importing torch.distributed.tensor (≈ 1 s: it brings
    sympy): a DTensor exists only once that module is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)
