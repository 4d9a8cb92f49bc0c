"""Optimizer step time on a GPT's hidden matrices, and the random-feature regression check.

Not a test. Part 1 prints, per setting (one GPT block at d=768; a 4-layer model at d=256), the median
step time of torch.optim.Muon (the baseline), specscope Muon with each polar backend, SpecGD and
AutoGeometry, timed round-robin (benchmarks/_timing.py); the ratio to the baseline's step in the same
round as median [min–max] over the rounds, with the load average at start; and the polar error of the
update direction, max|u_iᵀPv_i − 1| over σ_i ≥ 0.1·σ_1 and σ_i ≥ 1e-3·σ_1 (linalg.polar_error), on the
gradient-like matrices of benchmarks/polar.py (geometric spectrum 1 … 1e-6, as the linalg benchmark);
and "ops / step", the aten ops one step dispatches (views not counted: `_timing.dispatched_ops`), which on a GPU
is about its kernel launches — what a step of a few milliseconds is bound by.
Part 2 runs random-feature regression (ReLU and SwiGLU features) with GD (lr 1/‖A‖_2²), SpecGD
(‖G‖_*/‖A‖_F²) and AutoGeometry (geometry-matched, lr 1/‖A‖_2²) and checks AutoGeometry's loss is within
10 % of the better of the two.

    .venv/bin/python benchmarks/optim_step.py --rounds 3 --repeats 3   (--device cuda --skip-rf on a GPU)

`--floor` adds a row for the float64 eigensolves of `polar="gram"` alone (one eigh per matrix's smaller Gram,
on the same one-thread workers): the part of an exact Gram-route step that no scheduling removes.
"Muon polar=gram, torch's eigh" is the same optimizer with SPECSCOPE_EIGH=torch (linalg/lapack.py): where
`polar="gram"` solves on numpy's OpenBLAS, the two rows compare the LAPACKs in one run. "Muon default, bf16 / fp32
iterations" are the default with SPECSCOPE_ITERATION_DTYPE fixed (linalg/devices.py): the default computes in
bfloat16 where the device multiplies it in hardware and in float32 elsewhere; the two rows show what that costs.
`--baseline-only STEPS` times torch.optim.Muon alone: its step at d=256 ×4 layers takes 64–65 or 86–89 ms on this
project's CPU depending on the memory layout of its tensors (`setarch -R`, no address randomisation, gave 64–65 ms in
3 of 4 processes; with it, 86–89 ms in 6 of 6), so every "× torch Muon" ratio of a run moves with it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import dispatched_ops, interleaved, load_average, parse, with_env  # noqa: E402
from polar import gradient_like  # noqa: E402  the linalg benchmark's test matrices

from specscope import linalg  # noqa: E402
from specscope.linalg import lapack, workers  # noqa: E402
from specscope.optim import AutoGeometry, Muon, SpecGD, checks  # noqa: E402
from specscope.optim._common import adjust_lr  # noqa: E402


def gpt_hidden_shapes(d: int, n_layer: int) -> list[tuple[int, int]]:
    """nn.Linear weights of Q, K, V, O (d×d), MLP up (4d×d), down (d×4d), per layer."""
    return ([(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]) * n_layer


def _params(mats: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    ps = [torch.nn.Parameter(torch.zeros_like(G)) for G in mats]
    for p, G in zip(ps, mats):
        p.grad = G.clone()
    return ps


def optimizers(mats: list[torch.Tensor], only: list[str] | None = None) -> dict[str, torch.optim.Optimizer]:
    """The baseline and the candidates (all, or the baseline plus the names in `only`)."""
    named = lambda ps: [(f"h{i}.weight", p) for i, p in enumerate(ps)]  # noqa: E731
    st = lambda layer: 3.0  # noqa: E731  a constant st(A) stands in for the probe Monitor
    out = {"torch.optim.Muon": torch.optim.Muon(_params(mats), lr=1.0, weight_decay=0.0)}
    for polar in ("default", "newton_schulz", "polar_express", "gram", "svd"):
        kw = {} if polar == "default" else {"polar": polar}
        label = "Muon default (gram_newton_schulz)" if polar == "default" else f"Muon polar={polar}"
        out[label] = Muon(_params(mats), lr=1.0, weight_decay=0.0, **kw)
    for label in ITERATION_DTYPES:
        out[label] = Muon(_params(mats), lr=1.0, weight_decay=0.0)
    out[TORCH_EIGH] = Muon(_params(mats), lr=1.0, weight_decay=0.0, polar="gram")
    out["SpecGD (gram)"] = SpecGD(named(_params(mats)), lr=1e-3, stable_rank=st)
    out["AutoGeometry (gram)"] = AutoGeometry(named(_params(mats)), lr=1e-3, monitor=st)
    if unknown := sorted(set(only or ()) - set(out)):
        print(f"optim_step.py: error: unknown optimizer {unknown[0]!r}; choose among {list(out)}", file=sys.stderr)
        raise SystemExit(2)
    return {k: o for k, o in out.items() if only is None or k == "torch.optim.Muon" or k in only}


def direction_errors(opt: torch.optim.Optimizer, mats: list[torch.Tensor]) -> tuple[float, float] | None:
    """Polar error of a Muon-style optimizer's first update from W = 0 (lr = 1, wd = 0): P = −W / scale."""
    if not isinstance(opt, (torch.optim.Muon, Muon)):
        return None
    ps = [p for g in opt.param_groups for p in g["params"]]
    Ps = [-p.detach() / adjust_lr(1.0, None, p.shape) for p in ps]
    e1 = max(float(linalg.polar_error(G, P, 0.1)) for G, P in zip(mats, Ps))
    e3 = max(float(linalg.polar_error(G, P, 1e-3)) for G, P in zip(mats, Ps))
    return e1, e3


FLOOR = "gram's eigensolves alone"
TORCH_EIGH = "Muon polar=gram, torch's eigh"  # SPECSCOPE_EIGH=torch while it steps (linalg/lapack.py)
# the default with its iterations' dtype fixed (SPECSCOPE_ITERATION_DTYPE, linalg/devices.py) in every step it takes
ITERATION_DTYPES = {"Muon default, bf16 iterations": "bfloat16", "Muon default, fp32 iterations": "float32"}


def env_of(label: str) -> dict[str, str]:
    """The environment a candidate steps in (its first, measured step too)."""
    if label == TORCH_EIGH:
        return {"SPECSCOPE_EIGH": "torch"}
    if label in ITERATION_DTYPES:
        return {"SPECSCOPE_ITERATION_DTYPE": ITERATION_DTYPES[label]}
    return {}


def eigensolves(mats: list[torch.Tensor]):
    """What `polar="gram"` cannot skip: one float64 eigh per matrix's smaller Gram, on the one-thread workers
    as the step runs them (linalg/workers.py; in order on an accelerator or one thread)."""
    grams = [(G @ G.mT if G.shape[0] <= G.shape[1] else G.mT @ G).double() for G in mats]
    return lambda: workers.start(lapack.eigh, grams, [C.shape[-1] for C in grams])()


def bench_steps(label: str, d: int, n_layer: int, rounds: int, repeats: int, seed: int, device: str,
                only: list[str] | None = None, floor: bool = False) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    mats = [gradient_like(m, n, gen).to(device) for m, n in gpt_hidden_shapes(d, n_layer)]
    opts = optimizers(mats, only)
    steps = {k: with_env(o.step, **env_of(k)) for k, o in opts.items()}
    for step in steps.values():
        step()  # first step (warm-up), from W = 0: its update is the measured direction
    errs = {k: direction_errors(o, mats) for k, o in opts.items()}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    ops, once = {}, {}
    for k in opts:  # the second step of each, counted (and timed for the duration printed before the rounds: an upper
        # bound, as the count's dispatch mode slows a step bound by its launches)
        sync()
        t0 = time.perf_counter()
        ops[k] = dispatched_ops(steps[k])
        sync()
        once[k] = 1e3 * (time.perf_counter() - t0)
    if floor:
        steps[FLOOR], errs[FLOOR], ops[FLOOR] = eigensolves(mats), None, None
        t0 = time.perf_counter()
        steps[FLOOR]()
        once[FLOOR] = 1e3 * (time.perf_counter() - t0)
    print(f"{label} (the rounds of this setting):", file=sys.stderr, flush=True)
    timings = interleaved(steps, "torch.optim.Muon", rounds=rounds, repeats=repeats, warmup=0, sync=sync,
                          first_ms=once)
    return [dict(setting=label, optimizer=k, timing=t, err=errs[k], ops=ops[k]) for k, t in timings.items()]


def baseline_ms(d: int, n_layer: int, steps: int, seed: int, device: str) -> str:
    """Median [min–max] ms of `steps` torch.optim.Muon steps on the setting's matrices, after one warm-up step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Muon(_params([gradient_like(m, n, gen).to(device) for m, n in gpt_hidden_shapes(d, n_layer)]),
                           lr=1.0, weight_decay=0.0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    opt.step()
    ms = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        opt.step()
        sync()
        ms.append(1e3 * (time.perf_counter() - t))
    return f"median {statistics.median(ms):.1f} ms [{min(ms):.1f}–{max(ms):.1f}] over {steps} steps"


def rf_check(steps: int, seed: int) -> list[dict]:
    rows = []
    for act in ("relu", "swiglu"):
        A, Y = checks.random_features(act, d=32, width=512, n=1024, d_out=16, seed=seed)
        loss = {o: checks.run(o, A, Y, steps) for o in ("gd", "specgd", "auto")}
        best = min(loss["gd"], loss["specgd"])
        rows.append(dict(activation=act, st=float(linalg.stable_rank(A)), **loss,
                         ratio=loss["auto"] / best, ok=loss["auto"] <= 1.1 * best))
    return rows


def markdown(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ratios: median and min–max over them)")
    ap.add_argument("--repeats", type=int, default=3, help="steps per optimizer per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rf-steps", type=int, default=50)
    ap.add_argument("--skip-rf", action="store_true")
    ap.add_argument("--optimizers", nargs="*", default=None, help='only these candidates (the baseline always runs)')
    ap.add_argument("--settings", nargs="*", default=None, help='only these settings, e.g. "GPT block d=768"')
    ap.add_argument("--floor", action="store_true", help=f'also time "{FLOOR}": the float64 eigh of every matrix\'s '
                    "smaller Gram, on the workers as polar=\"gram\" runs them (what no exact Gram route can skip)")
    ap.add_argument("--baseline-only", type=int, metavar="STEPS", default=0,
                    help="time only torch.optim.Muon, STEPS steps per setting in this process, and print the median "
                         "and min–max ms (its speed depends on its tensors' memory layout: run it several times)")
    args = parse(ap)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{load_average()} at start; iterations in {str(linalg.iteration_dtype(args.device)).removeprefix('torch.')} "
          "by default (linalg.iteration_dtype)\n")
    settings = (("GPT block d=768", 768, 1), ("GPT d=256 ×4 layers", 256, 4))
    if unknown := sorted(set(args.settings or ()) - {label for label, *_ in settings}):
        print(f"optim_step.py: error: unknown setting {unknown[0]!r}; choose among {[label for label, *_ in settings]}",
              file=sys.stderr)
        raise SystemExit(2)
    if args.baseline_only:
        for label, d, n_layer in settings:
            if not args.settings or label in args.settings:
                print(f"{label}: torch.optim.Muon {baseline_ms(d, n_layer, args.baseline_only, args.seed, args.device)}")
        return
    rows = []
    for label, d, n_layer in settings:
        if args.settings and label not in args.settings:
            continue
        rows += bench_steps(label, d, n_layer, args.rounds, args.repeats, args.seed, args.device, args.optimizers,
                            args.floor)
    fmt = [dict(setting=r["setting"], optimizer=r["optimizer"], ms=f"{r['timing'].ms:.1f}",
                ratio=r["timing"].ratio_text(),
                e1="–" if r["err"] is None else f"{r['err'][0]:.1e}",
                e3="–" if r["err"] is None else f"{r['err'][1]:.1e}", ops="–" if r["ops"] is None else str(r["ops"]))
           for r in rows]
    for r in fmt:
        r["× torch Muon"], r["median ms"], r["err σ≥0.1σ₁"], r["err σ≥1e-3σ₁"] = r["ratio"], r["ms"], r["e1"], r["e3"]
    for r in fmt:
        r["ops / step"] = r["ops"]
    print(markdown(fmt, ["setting", "optimizer", "median ms", "× torch Muon", "err σ≥0.1σ₁", "err σ≥1e-3σ₁", "ops / step"]))
    print("\n× torch Muon: median [min–max] over the interleaved rounds of the ratio to torch.optim.Muon's step in the same round;"
          "\nops / step: aten ops one step dispatches on the calling thread, views not counted (on a GPU about its kernel"
          "\nlaunches; a one-thread worker's ops, as polar=\"gram\" runs them on a multi-thread CPU, are not seen)")
    if args.skip_rf:
        return
    rf = rf_check(args.rf_steps, args.seed)
    print(f"\nrandom-feature regression, T = {args.rf_steps} steps, final ½‖WA − Y‖²\n")
    print(markdown([{"activation": r["activation"], "st(A)": f"{r['st']:.1f}", "GD": f"{r['gd']:.4g}",
                     "SpecGD": f"{r['specgd']:.4g}", "AutoGeometry": f"{r['auto']:.4g}",
                     "Auto / best": f"{r['ratio']:.3f}", "within 10 %": str(r["ok"])} for r in rf],
                   ["activation", "st(A)", "GD", "SpecGD", "AutoGeometry", "Auto / best", "within 10 %"]))


if __name__ == "__main__":
    main()
