"""Tokens/s of the `gpt` lab's training step, per optimizer arm, without the probe and with it every 10th / every step.

    python benchmarks/gpt_throughput.py                        # lab defaults, device auto
    OMP_NUM_THREADS=2 taskset -c 0,1 python benchmarks/gpt_throughput.py --rounds 5
    python benchmarks/gpt_throughput.py --set device=cuda --set d_model=256

Each candidate (arm × probe setting) builds the lab's arm (same model, optimizer, Monitor, callbacks) and runs
the shared loop's own step (`Trainer._step`: forward, backward, probe, clip, optimizer, schedule, records) in
blocks of `--block` consecutive steps; the candidates take turns block by block (benchmarks/_timing.py), and each
ratio is per round against the first candidate's block in the same round (median [min–max] over the rounds), or
against the same arm without the probe. Evaluation is not included. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from specscope import store
from specscope.labs import gpt
from specscope.labs.base import resolve_device
from specscope.labs.config import make_config, parse_overrides
from specscope.train import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved, load_average, parse  # noqa: E402

PROBES = {"off": None, "every 10": 10, "every 1": 1}


def arm_block(cfg: gpt.Config, arm_name: str, probe: int | None, block: int, run) -> Callable[[], None]:
    """`block` consecutive steps of one arm with the probe every `probe` steps (None: no Monitor); each call
    goes on where the last stopped, so a block of 10 holds exactly one measured step at every 10th."""
    device = resolve_device(cfg.device)
    cfg = cfg.model_copy(update={"arms": [arm_name], "probe_every": probe or 10**9})
    arm = gpt.build(cfg, device)[1]
    if probe is None and arm_name != "auto":  # AutoGeometry needs the probe's st(A)
        arm.monitor = None
    arm.model.to(device)
    trainer = Trainer(run, device, cfg.seed)
    step = itertools.count()

    def run_block() -> None:
        for _ in range(block):
            trainer._step(arm, next(step))

    return run_block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (ratios: median and min–max over them)")
    ap.add_argument("--block", type=int, default=10, help="steps per timed call (10: one measured step at every 10th)")
    ap.add_argument("--arms", default=",".join(gpt.ARMS))
    ap.add_argument("--probes", default=",".join(PROBES))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="lab config override")
    args = parse(ap)
    load = load_average()
    cfg = make_config(gpt.Config, {"max_bytes": 2_000_000, **parse_overrides(gpt.Config, args.set, "gpt")}, "gpt")
    tokens = cfg.batch_size * cfg.seq_len
    device = resolve_device(cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        run = store.Run.create(tmp, "gpt-bench", cfg.model_dump(mode="json"))
        blocks = {(arm, label): arm_block(cfg, arm, PROBES[label], args.block, run)
                  for arm in args.arms.split(",") for label in args.probes.split(",")
                  if not (PROBES[label] is None and arm == "auto")}
        names = {key: f"{key[0]} / {key[1]}" for key in blocks}
        baseline = names[next(iter(blocks))]
        t = interleaved({names[k]: fn for k, fn in blocks.items()}, baseline, rounds=args.rounds, repeats=1, warmup=1,
                        sync=torch.cuda.synchronize if device.type == "cuda" else (lambda: None))
        run.close()
    print(f"device {device}, torch threads {torch.get_num_threads()}, {load} at start; d_model {cfg.d_model}, "
          f"n_layer {cfg.n_layer}, {tokens} tokens/step; {args.rounds} interleaved rounds of {args.block} steps\n")
    print(f"| arm | probe | ms/step | tokens/s | × {baseline}, median [min–max] | × the arm without the probe |")
    print("|---|---|---:|---:|---:|---:|")
    for (arm, label), name in names.items():
        x, off = t[name], t.get(names.get((arm, "off"), ""))
        ms = x.ms / args.block
        own = [a / b for a, b in zip(x.ratios, off.ratios)] if off is not None and off is not x else []
        own_text = f"{statistics.median(own):.2f} [{min(own):.2f}–{max(own):.2f}]" if own else "—"
        print(f"| {arm} | {label} | {ms:.1f} | {tokens / ms * 1e3:,.0f} | {x.ratio_text()} | {own_text} |")


if __name__ == "__main__":
    main()
