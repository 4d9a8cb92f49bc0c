"""Accuracy of the probe's default estimators against exact float64 values, on real architectures.

    .venv/bin/python benchmarks/probe_accuracy.py [--every 1 5 100] [--measurements 4] [--arch gpt2 llama ...]

Architectures (tiny random-init configs, generated data, CPU): transformers' GPT-2, Llama and BERT (needs
`transformers`), `nn.TransformerEncoderLayer`, a CNN with a grouped convolution, and specscope's built-in GPT.
Each trains with AdamW (lr 3e-3) for (measurements - 1)·every + 1 steps, so the weights and the inputs change
between measurements. On every measured step two Monitors watch the same forward/backward: the default one
and an `exact` one (keeps A: float64 Gram eigenvalues; nr(G) by linalg.nuclear_rank, float64 Gram eigenvalues of G). Printed per architecture and cadence: median /
max relative error of st(A) and nr(G) over every weight and measured step, and how many per-step verdicts
(probe.advice.verdict of nr/st) and final advice() verdicts differ from the exact ones.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from specscope.probe import Monitor, verdict
from specscope.probe import estimators as E

VOCAB, SEQ, BATCH = 128, 32, 8


def tokens(seed: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)  # Zipf-skewed tokens
    while True:
        yield torch.multinomial(p, BATCH * SEQ, replacement=True, generator=g).view(BATCH, SEQ)


def hf_causal(model: nn.Module):
    return model, tokens(1), lambda m, ids: m(input_ids=ids, labels=ids).loss


def gpt2():
    import transformers as T

    return hf_causal(T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=SEQ)))


def llama():
    import transformers as T

    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ)
    return hf_causal(T.LlamaForCausalLM(cfg))


def bert():
    import transformers as T

    cfg = T.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       vocab_size=VOCAB, max_position_embeddings=SEQ)
    return T.BertForMaskedLM(cfg), tokens(1), lambda m, ids: m(input_ids=ids, labels=ids).loss


class Encoder(nn.Module):
    """Embedding, two nn.TransformerEncoderLayers (nn.MultiheadAttention inside), a head."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True) for _ in range(2))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def lm_loss(m, ids):
    return F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def encoder():
    return Encoder(), tokens(1), lm_loss


class CNN(nn.Module):
    """Conv2d, a grouped Conv2d (groups=4), a depthwise Conv1d over rows, a Linear classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.conv3 = nn.Conv1d(32, 32, 3, padding=1, groups=32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.relu(self.conv2(h))  # [B, 32, 8, 8]
        h = F.relu(self.conv3(h.flatten(2)))  # [B, 32, 64]
        return self.fc(h.mean(-1))


def images(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(10, 3, 16, 16, generator=g)
    while True:
        y = torch.randint(0, 10, (32,), generator=g)
        yield protos[y] + 0.5 * torch.randn(32, 3, 16, 16, generator=g), y


def cnn():
    return CNN(), images(1), lambda m, b: F.cross_entropy(m(b[0]), b[1])


def builtin_gpt():
    from specscope.models import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=VOCAB, seq_len=SEQ, n_layer=2, n_head=4, d_model=64)), tokens(1), lm_loss


ARCHITECTURES: dict[str, Callable] = {"gpt2": gpt2, "llama": llama, "bert": bert, "encoder": encoder, "cnn": cnn,
                                      "builtin_gpt": builtin_gpt}


def compare(arch: str, every: int, measurements: int, **monitor_kw) -> dict:
    """Train `arch` and measure with the default and the exact Monitor side by side; the errors."""
    torch.manual_seed(0)
    model, data, loss_fn = ARCHITECTURES[arch]()
    fast, exact = Monitor(model, every=every, **monitor_kw), Monitor(model, every=every, estimator="exact")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    err = {"stable_rank": [], "nuclear_rank": []}
    flips = total = 0
    seconds = 0.0
    for step in range((measurements - 1) * every + 1):
        opt.zero_grad(set_to_none=True)
        batch = next(data)
        t = time.perf_counter()
        with exact.step(step), fast.step(step):
            loss_fn(model, batch).backward()
        seconds += time.perf_counter() - t
        opt.step()
        got = {(r.layer, r.metric): r.value for r in fast.pop_records()}
        ref = {(r.layer, r.metric): r.value for r in exact.pop_records()}
        if got.keys() != ref.keys():
            raise AssertionError(f"{arch}: the default and exact monitors recorded different weights: {sorted(got.keys() ^ ref.keys())[:4]}")
        for (layer, metric), v in ref.items():
            if metric in err:
                err[metric].append(abs(got[(layer, metric)] / v - 1))
            if metric == "spectral_advantage":
                total += 1
                flips += verdict(got[(layer, metric)]) != verdict(v)
    a, b = fast.advice(window=measurements), exact.advice(window=measurements)
    return {
        "arch": arch, "every": every, "weights": len(fast.layers), "unmeasured": len(fast.unmeasured),
        "st_median": statistics.median(err["stable_rank"]), "st_max": max(err["stable_rank"]),
        "nr_median": statistics.median(err["nuclear_rank"]), "nr_max": max(err["nuclear_rank"]),
        "verdict_flips": flips, "verdicts": total, "advice_flips": int((a["verdict"] != b["verdict"]).sum()),
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, nargs="+", default=[1, 5, 100])
    ap.add_argument("--measurements", type=int, default=4)
    ap.add_argument("--arch", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    ap.add_argument("--estimator", default="gram")
    ap.add_argument("--implicit-min", type=int, default=None,
                    help="inputs at least this wide take the implicit (Krylov) route; 1 = every dense input "
                         f"(default {E.IMPLICIT_MIN}: of these tiny models, only the 256-wide MLP inputs)")
    ap.add_argument("--nuclear", choices=["auto", "eigh", "polar"], default="auto",
                    help="route of ‖G‖_* (linalg.nuclear_norms): auto = float64 eigenvalues on the CPU, the matmul-only "
                         "polar route on an accelerator; polar = that route here too")
    from _timing import parse  # here: tests load this file as a module, without benchmarks/ on sys.path

    args = parse(ap)
    E.NUCLEAR_METHOD = args.nuclear
    if args.implicit_min is not None:
        E.IMPLICIT_MIN = args.implicit_min
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; estimator {args.estimator!r} vs exact float64; "
          f"implicit route for inputs ≥ {E.IMPLICIT_MIN} features; ‖G‖_* route {args.nuclear!r}")
    print("\n| architecture | every | weights | unmeasured | st(A) median | st(A) max | nr(G) median | nr(G) max | verdicts differing |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arch in args.arch:
        for every in args.every:
            r = compare(arch, every, args.measurements, estimator=args.estimator)
            print(f"| {arch} | {every} | {r['weights']} | {r['unmeasured']} | {r['st_median']:.1e} | {r['st_max']:.1e} | "
                  f"{r['nr_median']:.1e} | {r['nr_max']:.1e} | {r['verdict_flips']} of {r['verdicts']} (advice: {r['advice_flips']}) |")


if __name__ == "__main__":
    main()
