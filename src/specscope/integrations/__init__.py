"""Thin adapters into other people's training loops (DESIGN.md "integrations").

    specscope.integrations.hf          SpecscopeCallback (a transformers TrainerCallback), attach, optimizers
    specscope.integrations.lightning   SpecscopeCallback (a lightning Callback), spectral_optimizer

Each callback only translates its framework's events (optimizer step begins, gradients complete, optimizer
step done, checkpoint save/load, log) into `Monitor` calls; no measuring happens here. transformers and
lightning are imported by their own module only (pip install 'specscope[hf]' / 'specscope[lightning]'), so
`import specscope` stays torch-only.
"""

from specscope.integrations.common import StepMeasure, log_values, spectral_optimizer

__all__ = ["StepMeasure", "log_values", "spectral_optimizer"]
