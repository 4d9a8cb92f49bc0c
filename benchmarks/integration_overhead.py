"""Cost of the Hugging Face and Lightning callbacks: a fit with the callback against the same fit without.

    .venv/bin/python benchmarks/integration_overhead.py [--framework hf|lightning|both] [--steps 40] [--rounds 3] [--repeats 2]

Model: the `hf:llama` tiny config (2 layers, width 64, 4 heads, byte vocabulary) on the stdlib corpus,
batch 8 × seq 64, gradient accumulation 2, AdamW, CPU. Each timed call builds a Trainer and runs `--steps`
optimizer steps (setup included, the same in every arm); arms are interleaved (benchmarks/_timing.py) and
the ratio is to the arm without a callback in the same round.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import tempfile

import torch

from _timing import interleaved, load_average, parse
from specscope.models.hf import hf_model

ACCUM = 2


def micro_batches(n: int) -> list[dict]:
    _, batches, _ = hf_model("llama", 0)
    return list(itertools.islice(batches, n))


def hf_arm(model, data, steps: int, every: int | None):
    import transformers
    from transformers import Trainer, TrainingArguments

    from specscope.integrations.hf import attach

    def fit() -> None:
        net = copy.deepcopy(model)
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=1, gradient_accumulation_steps=ACCUM,
                                     report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=10**9)
            trainer = Trainer(model=net, args=args, train_dataset=data, data_collator=lambda b: b[0])
            trainer.remove_callback(transformers.PrinterCallback)
            if every:
                attach(trainer, every=every)
            trainer.train()

    return fit


def lightning_arm(model, data, steps: int, every: int | None):
    import lightning as L

    from specscope.integrations.lightning import SpecscopeCallback

    class Lit(L.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            return self.net(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def fit() -> None:
        callbacks = [SpecscopeCallback(every=every)] if every else []
        trainer = L.Trainer(accelerator="cpu", max_steps=steps, accumulate_grad_batches=ACCUM, callbacks=callbacks, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Lit(copy.deepcopy(model)), torch.utils.data.DataLoader(data, batch_size=None))

    return fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--framework", choices=("hf", "lightning", "both"), default="both")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    a = parse(ap)
    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    model, _, _ = hf_model("llama", 0)
    data = micro_batches(a.steps * ACCUM)
    print(f"{load_average()}, torch {torch.__version__}, {torch.get_num_threads()} threads; {a.steps} steps per call")
    print("| framework | callback | ms per call | × no callback [min–max] |\n|---|---|---:|---|")
    for name, arm in (("hf", hf_arm), ("lightning", lightning_arm)):
        if a.framework not in (name, "both"):
            continue
        cands = {"none": arm(model, data, a.steps, None), "every 10th step": arm(model, data, a.steps, 10),
                 "every step": arm(model, data, a.steps, 1)}
        for t in interleaved(cands, "none", rounds=a.rounds, repeats=a.repeats).values():
            print(f"| {name} | {t.name} | {t.ms:.0f} | {t.ratio_text()} |")


if __name__ == "__main__":
    main()
