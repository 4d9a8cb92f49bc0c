"""Tokens/s of the `gpt` lab's training step, per optimizer arm, without the probe and with it every 10th / every step.

    python benchmarks/gpt_throughput.py                        # lab defaults, device auto
    OMP_NUM_THREADS=2 taskset -c 0,1 python benchmarks/gpt_throughput.py --steps 40
    python benchmarks/gpt_throughput.py --set device=cuda --set d_model=256

Each measurement builds the lab's arm (same model, optimizer, Monitor, callbacks) and times the shared
loop's own step (`Trainer._step`: forward, backward, probe, clip, optimizer, schedule, records) over
`--steps` steps after `--warmup` untimed ones. Evaluation is not included. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from specscope import store
from specscope.labs import gpt
from specscope.labs.base import resolve_device
from specscope.labs.config import make_config, parse_overrides
from specscope.train import Trainer

PROBES = {"off": None, "every 10": 10, "every 1": 1}


def time_arm(cfg: gpt.Config, arm_name: str, probe: int | None, steps: int, warmup: int, run) -> float:
    """Seconds per step of one arm with the probe every `probe` steps (None: no Monitor)."""
    device = resolve_device(cfg.device)
    cfg = cfg.model_copy(update={"arms": [arm_name], "probe_every": probe or 10**9})
    arm = gpt.build(cfg, device)[1]
    if probe is None and arm_name != "auto":  # AutoGeometry needs the probe's st(A)
        arm.monitor = None
    arm.model.to(device)
    trainer = Trainer(run, device, cfg.seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for s in range(warmup):
        trainer._step(arm, s)
    sync()
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        trainer._step(arm, s)
    sync()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--arms", default=",".join(gpt.ARMS))
    ap.add_argument("--probes", default=",".join(PROBES))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="lab config override")
    args = ap.parse_args()
    cfg = make_config(gpt.Config, {"max_bytes": 2_000_000, **parse_overrides(gpt.Config, args.set, "gpt")}, "gpt")
    tokens = cfg.batch_size * cfg.seq_len
    print(f"device {resolve_device(cfg.device)}, torch threads {torch.get_num_threads()}, d_model {cfg.d_model}, "
          f"n_layer {cfg.n_layer}, {tokens} tokens/step, {args.steps} timed steps\n")
    print("| arm | probe | ms/step | tokens/s | probe overhead |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        run = store.Run.create(tmp, "gpt-bench", cfg.model_dump(mode="json"))
        for arm in args.arms.split(","):
            base = None
            for label in args.probes.split(","):
                probe = PROBES[label]
                if probe is None and arm == "auto":
                    continue
                dt = time_arm(cfg, arm, probe, args.steps, args.warmup, run)
                base = dt if base is None else base
                print(f"| {arm} | {label} | {dt * 1e3:.1f} | {tokens / dt:,.0f} | {dt / base - 1:+.0%} |", flush=True)
        run.close()


if __name__ == "__main__":
    main()
