"""Cost of the probe on a small GPT on CPU, and the error of its fast estimators against exact values.

    .venv/bin/python benchmarks/probe_overhead.py [--repeats 5] [--block 10] [--threads N]

Model: GPT 4 layers, d_model 256, 4 heads, seq 128, batch 16, vocab 256, ReLU² MLP, AdamW.
Timing: configurations are run in interleaved blocks of `block` steps (rotating order), each with its
own model, optimizer and Monitor; a configuration's time per step is the block time / block, and the
table shows the median over repeats. "every 100th" is derived from the measured cost of a measured step
(t_none + (t_every1 - t_none) / 100), since a block of 10 steps cannot contain 1/100 of a measurement.
Estimator error: after the timing, one more step of the every-step model is measured at once by the warm
power monitor, a cold one, and `gram` and `exact` monitors; errors are relative to `exact` (float64 SVD).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from specscope.models import GPT, GPTConfig
from specscope.probe import Monitor

CFG = dict(vocab_size=256, seq_len=128, n_layer=4, n_head=4, d_model=256)
BATCH = 16


def batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, CFG["vocab_size"] + 1, dtype=torch.float64)  # Zipf-skewed tokens
    while True:
        yield torch.multinomial(p, BATCH * (CFG["seq_len"] + 1), replacement=True, generator=g).view(BATCH, -1)


def loss_fn(model, b):
    return F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())


DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class Arm:
    def __init__(self, every: int | None, estimator: str = "power", **kw):
        torch.manual_seed(0)
        self.model = GPT(GPTConfig(**CFG)).to(DEVICE)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.monitor = Monitor(self.model, every=every, estimator=estimator, **kw) if every else None
        self.data, self.step_no = batches(0), 0

    def step(self, extra: list[Monitor] = ()) -> None:
        b = next(self.data).to(DEVICE)
        self.opt.zero_grad(set_to_none=True)
        ctxs = [m.step(self.step_no) for m in ([self.monitor] if self.monitor else []) + list(extra)]
        for c in ctxs:
            c.__enter__()
        loss_fn(self.model, b).backward()
        for c in reversed(ctxs):
            c.__exit__(None, None, None)
        self.opt.step()
        if self.monitor:
            self.monitor.pop_records()
        self.step_no += 1


def timing(repeats: int, block: int) -> dict[str, float]:
    arms = {"no monitor": Arm(None), "every step": Arm(1), "every 10th": Arm(10), "every step, gram": Arm(1, "gram"),
            "every step, float32 Grams of G": Arm(1, grad_gram_dtype=torch.float32)}
    for arm in arms.values():  # warm-up: allocator, first measurement
        for _ in range(2):
            arm.step()
        arm.step_no = 0
    per_step = {k: [] for k in arms}
    names = list(arms)
    for r in range(repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            sync()
            t = time.perf_counter()
            for _ in range(block):
                arms[k].step()
            sync()
            per_step[k].append((time.perf_counter() - t) / block)
    med = {k: statistics.median(v) for k, v in per_step.items()}
    med["every 100th (derived)"] = med["no monitor"] + (med["every step"] - med["no monitor"]) / 100
    return med, arms["every step"]


def estimator_errors(arm: Arm) -> list[tuple[str, float, float]]:
    cold = Monitor(arm.model, estimator="power")
    gram = Monitor(arm.model, estimator="gram")
    gram32 = Monitor(arm.model, estimator="gram", grad_gram_dtype=torch.float32)
    exact = Monitor(arm.model, estimator="exact")
    arm.step(extra=[cold, gram, gram32, exact])
    recs = {name: {(r.layer, r.metric): r.value for r in m.pop_records()} for name, m in
            (("warm", arm.monitor), ("cold", cold), ("gram", gram), ("gram32", gram32), ("exact", exact))}
    # arm.step popped the warm monitor's records already; re-measure them from its latest values
    recs["warm"] = {(layer, "stable_rank"): arm.monitor.stable_rank(layer) for layer in arm.monitor.layers}
    rows = []
    for label, src, metric in (("st(A), power, warm-started (default)", "warm", "stable_rank"),
                               ("st(A), power, cold start", "cold", "stable_rank"),
                               ("st(A), gram", "gram", "stable_rank"),
                               ("nr(G), gram (float64 Gram, default)", "gram", "nuclear_rank"),
                               ("nr(G), gram (float32 Gram)", "gram32", "nuclear_rank")):
        errs = [abs(v / recs["exact"][key] - 1) for key, v in recs[src].items()
                if key[1] == metric and key[0] != "embed" and v is not None]
        rows.append((label, statistics.median(errs), max(errs)))
    return rows


def components(arm: Arm) -> list[tuple[str, float]]:
    """Median time of the probe's parts on the current gradients and one batch of real activations."""
    from specscope.probe.estimators import PowerStats, gradient_spectra

    grads = [s.grad_matrix(s.param.grad) for s in arm.monitor.slots.values()]
    acts = []
    hooks = [m.register_forward_pre_hook(lambda m, a: acts.append(a[0].detach().reshape(-1, m.in_features)))
             for m in arm.model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        arm.model(next(arm.data)[:, :-1].to(DEVICE))
    for h in hooks:
        h.remove()
    stats = [PowerStats(A.shape[1]) for A in acts]

    def timed(fn, n=3):
        ts = []
        for _ in range(n):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    def power():
        for st, A in zip(stats, acts):
            st.reset()
            st.add(A)
            st.finish()

    return [("nr(G) of all weights (float64 Grams + batched eigvalsh)", timed(lambda: gradient_spectra(grads))),
            ("st(A) of all Linear inputs (power: add + finish)", timed(power))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {DEVICE}, {torch.get_num_threads()} threads, GPT {CFG}, batch {BATCH}")
    med, arm = timing(args.repeats, args.block)
    base = med["no monitor"]
    print("\n| Monitor | ms / step | × no monitor |\n|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {1e3 * v:.0f} | {v / base:.3f} |")
    print("\n| estimator (vs exact float64 SVD, all weights but the embedding) | median rel. error | max rel. error |\n|---|---:|---:|")
    for label, m, mx in estimator_errors(arm):
        print(f"| {label} | {m:.1e} | {mx:.1e} |")
    print("\n| part of one measured step | ms |\n|---|---:|")
    for label, t in components(arm):
        print(f"| {label} | {1e3 * t:.1f} |")


if __name__ == "__main__":
    main()
