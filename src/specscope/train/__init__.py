"""The one training loop the labs share: steps, evaluation, probes, checkpoints, resume, progress."""

from specscope.train.checkpoint import load_checkpoint, save_checkpoint
from specscope.train.loop import ArmResult, Interrupt, Trainer, arm_seed, sigint_ignored, to_device
from specscope.train.progress import Progress

__all__ = [
    "ArmResult",
    "Interrupt",
    "Progress",
    "Trainer",
    "arm_seed",
    "load_checkpoint",
    "save_checkpoint",
    "sigint_ignored",
    "to_device",
]
