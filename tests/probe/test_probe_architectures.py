"""The probe on the models people train: every weight paired with the input it multiplied (checked against
float64 references taken by module hooks, independently of the probe), fused layouts, roles, compile,
checkpointing, and the default estimator against the exact one."""

import importlib.util
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specscope import linalg
from specscope.probe import Interleaved, Monitor, input_matrix

_spec = importlib.util.spec_from_file_location("probe_accuracy", pathlib.Path(__file__).parents[2] / "benchmarks" / "probe_accuracy.py")
acc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(acc)

HF = ("gpt2", "llama", "bert")


def by(records, metric):
    return {r.layer: r for r in records if r.metric == metric}


def exact_st(chunks, groups: int = 1) -> float:
    """st(A) of the micro-batches' rows in float64; a grouped convolution's ‖A‖_F² / max_g ‖A_g‖₂² (each chunk
    group-major, as `input_matrix` lays out patches)."""
    A = torch.cat([c.double().reshape(groups, -1, c.shape[-1]) for c in chunks], 1)
    return float(A.square().sum() / torch.linalg.matrix_norm(A, 2).square().max())


def capture(model):
    """Inputs of every Linear / transformers Conv1D / Conv module, keyed by id(weight), via forward pre-hooks."""
    seen: dict[int, list] = {}
    groups: dict[int, int] = {}

    def hook(m, args):
        if torch.is_grad_enabled():
            x = args[0].detach()
            A = input_matrix(m, x) if isinstance(m, (nn.Conv1d, nn.Conv2d)) else x.reshape(-1, x.shape[-1])
            seen.setdefault(id(m.weight), []).append(A)
            groups[id(m.weight)] = getattr(m, "groups", 1)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or type(m).__name__ == "Conv1D"]
    return seen, groups, handles


def build(arch):
    if arch in HF:
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    return acc.ARCHITECTURES[arch]()


@pytest.mark.parametrize("arch", [*HF, "cnn", "builtin_gpt"])
def test_every_weight_paired_with_what_it_multiplied(arch):
    model, data, loss_fn = build(arch)
    seen, groups, handles = capture(model)
    mon = Monitor(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing unmeasured, so nothing warned
        with mon.step(0):
            loss_fn(model, next(data)).backward()
    recs = mon.pop_records()
    for h in handles:
        h.remove()
    st, nr = by(recs, "stable_rank"), by(recs, "nuclear_rank")
    assert not mon.unmeasured and not by(recs, "unmeasured")
    assert set(st) == set(mon.layers) == set(nr)
    checked = 0
    for s in mon.slots.values():
        G = s.param.grad.double().reshape(s.param.shape[0], -1)
        assert nr[s.name].value == pytest.approx(float(linalg.nuclear_rank(G)), rel=1e-6), s.name
        if id(s.param) in seen:  # Linear / Conv1D / Conv: the hook saw the input; embeddings are counted
            assert st[s.name].value == pytest.approx(exact_st(seen[id(s.param)], groups[id(s.param)]), rel=1e-4), s.name
            assert st[s.name].rows == sum(a.shape[0] for a in seen[id(s.param)])
            checked += 1
        else:
            assert st[s.name].estimator == "closed_form", s.name
    assert checked >= len(mon.layers) - 3


def test_multihead_attention_in_proj_and_out_proj():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    x = torch.randn(3, 5, 16)
    mon = Monitor(layer, estimator="exact")
    with mon.step(0):
        layer(x).square().sum().backward()
    st = by(mon.pop_records(), "stable_rank")
    attn = layer.self_attn
    with torch.no_grad():  # the attention output that out_proj multiplies, recomputed by hand
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
        heads = lambda t: t.view(3, 5, 2, 8).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(3, 5, 16)
    assert not mon.unmeasured
    assert st["self_attn.in_proj_weight"].value == pytest.approx(exact_st([x]), rel=1e-9)
    assert st["self_attn.out_proj"].value == pytest.approx(exact_st([o]), rel=1e-6)
    assert mon.advice().set_index("layer").loc["self_attn.out_proj", "measurements"] == 1


def test_multihead_cross_attention_blocks_measured_with_their_own_inputs():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    q, kv = torch.randn(3, 5, 16), torch.randn(3, 7, 16) + 1.0
    plain = Monitor(attn)
    with pytest.warns(UserWarning, match="multiply different inputs.*'q', 'k', 'v'"), plain.step(0):
        attn(q, kv, kv)[0].square().sum().backward()
    assert "in_proj_weight" in plain.unmeasured  # named, with the fix, never silent
    mon = Monitor(attn, split={"in_proj_weight": ["q", "k", "v"]})
    for step in range(2):
        attn.zero_grad()
        with mon.step(step):
            attn(q, kv, kv)[0].square().sum().backward()
        recs = mon.pop_records()
    st, nr = by(recs, "stable_rank"), by(recs, "nuclear_rank")
    assert not mon.unmeasured
    assert st["in_proj_weight.q"].value == pytest.approx(exact_st([q]), rel=1e-4)
    for part in ("k", "v"):
        assert st[f"in_proj_weight.{part}"].value == pytest.approx(exact_st([kv]), rel=1e-4)
        assert st[f"in_proj_weight.{part}"].rows == 21
    G = attn.in_proj_weight.grad.double()
    assert nr["in_proj_weight.k"].value == pytest.approx(float(linalg.nuclear_rank(G[16:32])), rel=1e-6)
    again = Monitor(attn, split={"in_proj_weight": ["q", "k", "v"]})
    again.load_state_dict(mon.state_dict())  # the k/v block's warm start travels with the state
    assert any("@16:48" in k for k in mon.state_dict()["stats"])
    assert torch.equal(next(iter(again.slots.values())).block_stats[(16, 48)].V, next(iter(mon.slots.values())).block_stats[(16, 48)].V)


def test_a_split_slice_covered_by_two_products_is_measured_on_both_inputs():
    """A slice lies in every output block a product covered: one attention used for self- then cross-attention
    multiplies q's rows by [x; h] and k's by [x; mem]. Each slice was measured with the first block's input alone
    (q and k read st(x): 6 % and 33 % off); so was `F.linear(b, W) + F.linear(a, W[:8])`'s slice 'a' (14–72 %)."""
    torch.manual_seed(0)
    att = nn.MultiheadAttention(16, 4, batch_first=True)
    x, mem = torch.randn(2, 5, 16), torch.randn(2, 7, 16) * 3 + 1.0
    mon = Monitor(att, split={"in_proj_weight": ["q", "k", "v"]})
    with mon.step(0):
        h = att(x, x, x)[0]
        att(h, mem, mem)[0].pow(2).mean().backward()
    st = by(mon.pop_records(), "stable_rank")
    assert not mon.unmeasured
    assert st["in_proj_weight.q"].value == pytest.approx(exact_st([x, h.detach()]), rel=1e-4)
    assert st["in_proj_weight.q"].rows == 20
    for part in ("k", "v"):
        assert st[f"in_proj_weight.{part}"].value == pytest.approx(exact_st([x, mem]), rel=1e-4)
        assert st[f"in_proj_weight.{part}"].rows == 24
    power = Monitor(att, split={"in_proj_weight": ["q", "k", "v"]}, estimator="power")  # no sum of Grams: said, not wrong
    with pytest.warns(UserWarning, match="in_proj_weight' is unmeasured.*estimator='gram'"), power.step(0):
        att(att(x, x, x)[0], mem, mem)[0].pow(2).mean().backward()
    assert not [r for r in power.pop_records() if r.metric == "stable_rank" and r.layer.startswith("in_proj")]

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(24, 300) / 20)

        def forward(self, a, b):
            return F.linear(b, self.W).sum() + F.linear(a, self.W[:8]).sum()

    model = Shared()
    a, b = torch.randn(30, 300) + 1.0, torch.randn(20, 300)
    mon = Monitor(model, split={"W": {"a": 8, "b": 16}})
    with mon.step(0):
        model(a, b).backward()
    st = by(mon.pop_records(), "stable_rank")
    assert st["W.a"].value == pytest.approx(exact_st([b, a]), rel=1e-4) and st["W.a"].rows == 50
    assert st["W.b"].value == pytest.approx(exact_st([b]), rel=1e-4) and st["W.b"].rows == 20


def test_additive_position_tables_are_routed_as_embeddings():
    from specscope.optim import spectral_param_groups

    class ViTLike(nn.Module):  # a bare 2-D position table and a [1, 1, d] class token, added, never multiplied
        def __init__(self):
            super().__init__()
            self.tok, self.fc, self.head = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50)
            self.pos, self.cls = nn.Parameter(torch.zeros(8, 16)), nn.Parameter(torch.zeros(1, 1, 16))

        def forward(self, ids):
            x = torch.cat([self.cls.expand(ids.shape[0], 1, 16), self.tok(ids) + self.pos[: ids.shape[1]]], 1)
            return self.head(torch.relu(self.fc(x)))

    model = ViTLike()
    mon = Monitor(model)
    with pytest.warns(UserWarning, match="never multiplied"), mon.step(0):
        model(torch.randint(0, 50, (2, 7))).logsumexp(-1).mean().backward()
    assert mon.roles["pos"] == mon.roles["cls"] == "embedding" and mon.roles["fc"] == "hidden"
    groups = {g["algorithm"]: [n for n, _ in g["params"]] for g in spectral_param_groups(model, 0.02, 1e-3, roles=mon)}
    assert groups["muon"] == ["fc.weight"]
    static = {g["algorithm"]: [n for n, _ in g["params"]] for g in spectral_param_groups(model, 0.02, 1e-3)}
    assert "cls" in static["adamw"]  # ≥ 3-D and no convolution kernel: a table, from structure alone


def test_conv1d_column_split_gpt2():
    model, data, loss_fn = build("gpt2")
    mon = Monitor(model, split={"transformer.h.*.attn.c_attn": ["q", "k", "v"]})
    with mon.step(0):
        loss_fn(model, next(data)).backward()
    nr = by(mon.pop_records(), "nuclear_rank")
    G = model.transformer.h[1].attn.c_attn.weight.grad.double()  # [in, 3·out]: q, k, v are column blocks
    for i, part in enumerate("qkv"):
        rec = nr[f"transformer.h.1.attn.c_attn.{part}"]
        assert rec.shape == "64x64"
        assert rec.value == pytest.approx(float(linalg.nuclear_rank(G[:, 64 * i : 64 * (i + 1)])), rel=1e-6)


def test_a_split_that_cuts_across_gpt2s_fused_blocks_is_warned_once_with_the_fix():
    model, _, _ = build("gpt2")  # c_attn: 64 inputs, 192 outputs = q, k, v (Conv1D, stored [in, out])
    with pytest.warns(UserWarning) as got:
        Monitor(model, split={"transformer.h.*.attn.c_attn": ["q", "k"]})
    (w,) = [str(x.message) for x in got]
    assert got[0].filename == __file__  # the user's line (it pointed into specscope/errors.py)
    assert "transformer.h.0.attn.c_attn' and 1 more" in w and "cut across the 3 blocks of 64" in w
    assert "give 3 names" in w and "--split PATTERN=q:96,k:96" in w
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the layout given outright: nothing to warn
        Monitor(model, split={"transformer.h.*.attn.c_attn": ["q", "k", "v"]})
        Monitor(model, split={"transformer.h.*.attn.c_attn": {"q": 96, "k": 96}})


def test_neox_interleaved_heads_split():
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          vocab_size=64, max_position_embeddings=16)
    model = T.GPTNeoXForCausalLM(cfg)
    mon = Monitor(model, split={"*.query_key_value": Interleaved(("q", "k", "v"), heads=4)})
    ids = torch.randint(0, 64, (2, 16))
    with mon.step(0):
        model(input_ids=ids, labels=ids).loss.backward()
    nr = by(mon.pop_records(), "nuclear_rank")
    G = model.gpt_neox.layers[0].attention.query_key_value.weight.grad.double().view(4, 3, 8, 32)  # [heads, 3, hd, in]
    for i, part in enumerate("qkv"):
        exact = float(linalg.nuclear_rank(G[:, i].reshape(32, 32)))
        assert nr[f"gpt_neox.layers.0.attention.query_key_value.{part}"].value == pytest.approx(exact, rel=1e-6)
    contiguous = float(linalg.nuclear_rank(G.reshape(96, 32)[:32]))  # what a row split would have measured
    assert abs(nr["gpt_neox.layers.0.attention.query_key_value.q"].value / contiguous - 1) > 1e-3


ROUTED = {  # arch -> (embeddings and heads by role, hidden matrices that names alone would misroute)
    "gpt2": ({"transformer.wte.weight", "transformer.wpe.weight"}, {"transformer.h.0.attn.c_proj.weight"}),
    "llama": ({"model.embed_tokens.weight", "lm_head.weight"}, {"model.layers.0.mlp.down_proj.weight"}),
    "bert": ({"bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
              "bert.embeddings.token_type_embeddings.weight"},
             {"bert.encoder.layer.0.attention.output.dense.weight", "bert.encoder.layer.1.output.dense.weight"}),
    "builtin_gpt": ({"embed.weight", "head.weight"}, {"blocks.0.attn.o.weight"}),
    "encoder": ({"embed.weight", "head.weight"}, {"layers.0.self_attn.out_proj.weight", "layers.0.self_attn.in_proj_weight"}),
    "cnn": ({"fc.weight"}, {"conv2.weight"}),
}


@pytest.mark.parametrize("arch", list(ROUTED))
def test_routing_by_role(arch):
    from specscope.optim import Muon, spectral_param_groups

    model, data, loss_fn = build(arch)
    non_hidden, hidden = ROUTED[arch]
    mon = Monitor(model)
    with mon.step(0):
        loss_fn(model, next(data)).backward()
    for roles in ([None, mon] if arch != "cnn" else [mon]):  # a CNN's classifier is found from the loss only
        groups = {g["algorithm"]: {n for n, _ in g["params"]} for g in spectral_param_groups(model, 0.02, 1e-3, roles=roles)}
        assert non_hidden <= groups["adamw"] and hidden <= groups["muon"], roles
        assert all(dict(model.named_parameters())[n].dim() >= 2 for n in groups["muon"])
        Muon(spectral_param_groups(model, 0.02, 1e-3, roles=roles))  # the spectral group's check agrees
    pg = {g["algorithm"]: set(g["param_names"]) for g in mon.param_groups()}
    assert non_hidden <= pg["adamw"]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _run(model, monitor, steps=3):
    g = torch.Generator().manual_seed(0)
    out = []
    for step in range(steps):
        model.zero_grad()
        with monitor.step(step):
            model(torch.randn(12, 8, generator=g)).square().mean().backward()
        out.append({(r.layer, r.metric): r.value for r in monitor.pop_records()})
    return out


@pytest.mark.parametrize("when", ["before", "after"])
def test_torch_compile_same_records_and_no_extra_graphs(when):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = Tiny()
    ref = _run(eager, Monitor(eager, every=2))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Tiny()
    if when == "before":
        compiled = torch.compile(model, backend="eager")
        mon = Monitor(compiled, every=2)
    else:
        mon = Monitor(model, every=2)
        compiled = torch.compile(model, backend="eager")
    counters.clear()
    got = _run(compiled, mon)
    assert [g.keys() for g in got] == [r.keys() for r in ref] and not any("_orig_mod" in k[0] for g in got for k in g)
    for g, r in zip(got, ref):
        for k, v in r.items():
            assert g[k] == pytest.approx(v, rel=1e-5), k
    assert sum(counters["graph_break"].values()) == 0
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    counters.clear()
    plain = torch.compile(Tiny(), backend="eager")
    _run(plain, Monitor(Tiny(), every=10**6))  # the same steps without any measurement
    assert graphs == counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_counts_each_forward_once(reentrant):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(32, 8, requires_grad=reentrant)
    mon = Monitor(model, estimator="exact")
    with mon.step(0):
        checkpoint(model, x, use_reentrant=reentrant).square().mean().backward()
    st = by(mon.pop_records(), "stable_rank")
    assert st["a"].rows == 32 and st["c"].rows == 32
    assert st["a"].value == pytest.approx(exact_st([x.detach()]), rel=1e-9)


def test_autogeometry_steps_unmeasured_weights_euclidean_with_a_warning():
    from specscope.optim import AutoGeometry

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)
            self.u = nn.Parameter(torch.randn(6, 6))

        def forward(self, x):
            return torch.einsum("bi,ij->bj", self.lin(x), self.u)

    torch.manual_seed(0)
    model = Odd()
    mon = Monitor(model)
    opt = AutoGeometry([(n, p) for n, p in model.named_parameters() if p.dim() == 2], lr=0.01, monitor=mon)
    with pytest.warns(UserWarning, match="'u' is unmeasured"), mon.step(0):
        model(torch.randn(10, 6)).sum().backward()
    assert "einsum" in mon.unmeasured["u"] or "bmm" in mon.unmeasured["u"] or "mm" in mon.unmeasured["u"]
    assert mon.stable_rank("u") is None and mon.stable_rank("lin") > 0
    with pytest.warns(UserWarning, match="takes the Euclidean step"):
        opt.step()
    assert opt.choices["u"] == "euclidean"
    assert any(r.layer == "u" and r.flag == "unmeasured" for r in opt.pop_records())


@pytest.mark.parametrize("arch", list(acc.ARCHITECTURES))
def test_default_estimator_within_one_percent_of_exact(arch):
    if arch in HF:
        pytest.importorskip("transformers")
    for every in (1, 5):
        r = acc.compare(arch, every, measurements=2)
        assert r["unmeasured"] == 0 and r["st_max"] <= 1e-2 and r["st_median"] <= 1e-3, r
        assert r["nr_max"] <= 1e-4 and r["verdict_flips"] == 0 and r["advice_flips"] == 0, r


def test_hf_gradient_checkpointing_gives_the_same_records():
    out = []
    for ckpt in (False, True):
        model, data, loss_fn = build("llama")
        if ckpt:
            model.gradient_checkpointing_enable()
        model.train()
        mon = Monitor(model)
        with mon.step(0):
            loss_fn(model, next(data)).backward()
        out.append({(r.layer, r.metric): (r.value, r.rows) for r in mon.pop_records()})
    assert out[0].keys() == out[1].keys()
    for k, (v, rows) in out[0].items():
        assert out[1][k][1] == rows and out[1][k][0] == pytest.approx(v, rel=1e-4), k


def test_structural_head_is_the_last_vocabulary_sized_linear_when_d_model_equals_the_vocabulary():
    """The built-in transformer has vocab 64 and d_model 64: every q/k/v/o is 64×64 like the head, and only the
    head (registered last) may leave the spectral group when routing has no backward pass to look at."""
    from specscope.models.builtin import builtin
    from specscope.optim import spectral_param_groups

    model, _, _ = builtin("transformer", 0)
    groups = {g["algorithm"]: {n for n, _ in g["params"]} for g in spectral_param_groups(model, 0.02, 1e-3)}
    assert "head.weight" in groups["adamw"] and "embed.weight" in groups["adamw"]
    assert {"blocks.0.attn.q.weight", "blocks.1.attn.o.weight", "blocks.0.mlp.up.weight"} <= groups["muon"]


@pytest.mark.parametrize("arch", [*HF, "encoder", "cnn", "builtin_gpt"])
def test_products_paired_at_the_torch_call_match_the_aten_watch(arch, monkeypatch):
    """F.linear / addmm / matmul paired at the torch call give the records the aten-level watch gives."""
    from specscope.probe import watch as M

    def records(products):
        monkeypatch.setattr(M, "PRODUCTS", products)
        model, data, loss_fn = build(arch)
        mon, opt = Monitor(model), torch.optim.AdamW(model.parameters(), lr=1e-2)
        out = []
        for step in range(3):  # weights and inputs change between measurements
            opt.zero_grad()
            with mon.step(step):
                loss_fn(model, next(data)).backward()
            opt.step()
            out.append({(r.layer, r.metric): (r.value, r.rows, r.shape) for r in mon.pop_records()})
        return out, mon.roles

    fast, aten_only = records(M.PRODUCTS), records({})
    assert fast[1] == aten_only[1]
    for a, b in zip(fast[0], aten_only[0]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k][1:] == b[k][1:], k
            assert a[k][0] == b[k][0] or (a[k][0] != a[k][0] and b[k][0] != b[k][0]), k  # bit for bit (NaN: both)


def test_a_measured_forward_sends_only_non_product_calls_to_the_aten_watch(monkeypatch):
    """Cost: the built-in GPT's ≈ 300 forward aten ops no longer each enter Python, and its calls that touch a
    tracked weight — plain products and the embedding lookup — are paired at the torch call: nothing reaches the
    aten-level watch (entering it costs ≈ 70 µs of host time)."""
    from specscope.probe import watch as M

    seen = []
    real = M.AtenWatch.__torch_dispatch__

    def counting(self, func, types, args=(), kwargs=None):
        seen.append(func._overloadpacket)
        return real(self, func, types, args, kwargs)

    monkeypatch.setattr(M.AtenWatch, "__torch_dispatch__", counting)
    model, data, loss_fn = build("builtin_gpt")
    mon = Monitor(model)
    with mon.step(0):
        loss_fn(model, next(data)).backward()
    recs = mon.pop_records()
    assert not mon.unmeasured and by(recs, "stable_rank")["embed"].estimator == "closed_form"
    assert seen == []


def test_autocast_products_are_paired_through_the_cast_copies():
    """Under CPU autocast (bfloat16) each Linear multiplies a cast copy of its weight and of its input: every
    weight is still paired, with the st(A) of the input it multiplied (bf16-rounded: within 1 %)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 8))
    seen, groups, handles = capture(model)
    mon = Monitor(model)
    x = torch.randn(64, 24) @ torch.randn(24, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16), mon.step(0):
        model(x).float().square().mean().backward()
    for h in handles:
        h.remove()
    st = by(mon.pop_records(), "stable_rank")
    assert not mon.unmeasured and set(st) == {"0", "2"}
    for s in mon.slots.values():
        assert st[s.name].value == pytest.approx(exact_st(seen[id(s.param)], groups[id(s.param)]), rel=1e-2), s.name
        assert st[s.name].rows == 64


def test_autocast_convolutions_are_paired_through_the_cast_copy():
    """A Conv2d under CPU autocast convolves a bfloat16 copy of its kernel: still measured, with st(A) of its
    patches within bf16 rounding of the float32 run's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x = torch.randn(4, 3, 8, 8)
    st = {}
    for cast in (False, True):
        mon = Monitor(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast), mon.step(0):
            model(x).float().square().mean().backward()
        model.zero_grad()
        assert not mon.unmeasured
        st[cast] = {k: r.value for k, r in by(mon.pop_records(), "stable_rank").items()}
    assert set(st[True]) == {"0", "3"}
    for name, value in st[False].items():
        assert st[True][name] == pytest.approx(value, rel=1e-2), name


def _hf_more(name):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gpt_neox":
        cfg = T.GPTNeoXConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        return T.GPTNeoXForCausalLM(cfg), lambda g: dict(input_ids=(ids := torch.randint(128, (4, 16), generator=g)), labels=ids)
    if name == "t5":
        cfg = T.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0)
        return T.T5ForConditionalGeneration(cfg), lambda g: dict(input_ids=torch.randint(128, (4, 16), generator=g),
                                                                 labels=torch.randint(128, (4, 8), generator=g))
    cfg = T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8, num_labels=10)
    return T.ViTForImageClassification(cfg), lambda g: dict(pixel_values=torch.randn(4, 3, 32, 32, generator=g),
                                                           labels=torch.randint(10, (4,), generator=g))


@pytest.mark.parametrize("name", ["gpt_neox", "t5", "vit"])
def test_more_hf_architectures_paired_at_the_torch_call_as_at_aten(name, monkeypatch):
    """GPT-NeoX (fused query_key_value), T5 (encoder-decoder, cross-attention) and ViT (conv patches, a class
    token and position table concatenated/added): the same records from torch-call and aten-level pairing."""
    import copy

    from specscope.probe import watch as M

    model, batch = _hf_more(name)
    runs = []
    for products in (M.PRODUCTS, {}):
        monkeypatch.setattr(M, "PRODUCTS", products)
        m = copy.deepcopy(model)
        torch.manual_seed(0)  # the same dropout masks
        mon, opt, g, out = Monitor(m), torch.optim.AdamW(m.parameters(), lr=1e-3), torch.Generator().manual_seed(1), []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(2):
                opt.zero_grad()
                with mon.step(step):
                    m(**batch(g)).loss.backward()
                opt.step()
                out.append({(r.layer, r.metric): r.value for r in mon.pop_records()})
        runs.append((out, dict(mon.unmeasured), mon.roles))
    assert runs[0][1:] == runs[1][1:]
    for a, b in zip(runs[0][0], runs[1][0]):
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)  # bit for bit (NaN: both)
    if name == "vit":  # the class token enters by cat, the position table by add: both named as embedding tables
        assert set(runs[0][1]) == {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"}
        assert all("added to activations" in why for why in runs[0][1].values())
        assert "(cat)" in runs[0][1]["vit.embeddings.cls_token"]
    else:
        assert not runs[0][1]


def test_splitting_a_square_weight_into_heads_is_not_called_a_cut_across_fused_blocks():
    """--split layers.1=q,k on a 128×128 weight warned "cut across the 1 blocks of 128 … give 1 names"."""
    from specscope.probe.pairing import straddled_blocks

    assert straddled_blocks(["h0", "h1"], torch.zeros(128, 128), 0) is None
    assert "cut across the 3 blocks of 8" in straddled_blocks(["q", "k"], torch.zeros(24, 8), 0)


def test_a_layer_with_one_input_feature_is_measured():
    """nn.Linear(1, k): its [k, 1] weight has strides (1, 1), read as a column block of W stored [in, out], and the
    layer was reported unmeasured ("only some of its input features ...")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 5), nn.ReLU(), nn.Linear(5, 1), nn.Linear(1, 3))
    monitor = Monitor(model, every=1)
    x = torch.randn(7, 1)
    with monitor.step(0):
        model(x).square().sum().backward()
    records = {(r.layer, r.metric): r.value for r in monitor.pop_records()}
    assert monitor.unmeasured == {}
    assert records[("0", "stable_rank")] == pytest.approx(1.0) and records[("3", "stable_rank")] == pytest.approx(1.0)
    h = torch.relu(model[0](x)).detach().double()
    assert records[("2", "stable_rank")] == pytest.approx(float(h.square().sum() / torch.linalg.matrix_norm(h, 2) ** 2), rel=1e-5)


class Raw(nn.Module):
    """Weights used the ways a module hook would miss: W.T and a row block of W in `@`, a float64 cast copy,
    nn.MultiheadAttention's functional path, a product under torch.func.vmap, a tied head by matmul, a
    reentrant checkpointed block."""

    def __init__(self, d=32, vocab=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.up = nn.Parameter(torch.randn(2 * d, d) / d**0.5)
        self.down = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.cast = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.mapped = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.block = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, ids):
        from torch.utils.checkpoint import checkpoint

        h = self.embed(ids)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        gate, val = (h @ self.up.T).chunk(2, -1)
        h = h + (torch.sigmoid(gate) * val) @ self.down[:, : h.shape[-1]].T
        h = h + (h.double() @ self.cast.double().T).float()
        h = h + torch.func.vmap(lambda row: row @ self.mapped.T)(h)
        h = h + checkpoint(self.block, h, use_reentrant=True)
        return h @ self.embed.weight.T


def _raw():
    g = torch.Generator().manual_seed(1)
    return Raw(), iter(lambda: torch.randint(64, (4, 12), generator=g), None), lm_loss_of


def lm_loss_of(m, ids):
    return F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("arch", [*HF, "gpt_neox", "t5", "vit", "encoder", "cnn", "builtin_gpt", "raw", "raw_autocast",
                                  "gpt2_checkpointing"])
def test_weights_watching_themselves_give_the_records_of_the_mode(arch, monkeypatch):
    """After a Monitor's first measured step the tracked weights watch their own calls for the step
    (`ParamWatch`), not a TorchFunctionMode that sees every call: the same records, bit for bit, as the mode
    gives on every step — on the models people train and on one that uses its weights the ways module hooks
    miss. The weights are plain nn.Parameters again once a step ends."""
    from specscope.probe import watch as M

    def records(param_watch):
        monkeypatch.setattr(M, "PARAM_WATCH", param_watch)
        torch.manual_seed(0)  # the same weights: Raw() draws them from the global generator (alone, the first model differed)
        if arch in ("gpt_neox", "t5", "vit"):
            model, batch = _hf_more(arch)
            g = torch.Generator().manual_seed(1)
            data, loss_fn = iter(lambda: batch(g), None), lambda m, b: m(**b).loss
        else:
            model, data, loss_fn = _raw() if arch.startswith("raw") else build(arch.removesuffix("_checkpointing"))
        if arch.endswith("_checkpointing"):  # transformers' own (non-reentrant) activation checkpointing
            model.train().gradient_checkpointing_enable()
        torch.manual_seed(0)  # the same dropout masks
        mon, opt = Monitor(model), torch.optim.AdamW(model.parameters(), lr=1e-2)
        watched, out = [], []
        first = next(iter(mon.slots.values())).param
        model.register_forward_pre_hook(lambda m, a: watched.append(
            (type(first) is not nn.Parameter, len(torch.overrides._get_current_function_mode_stack()))))
        for step in range(3):
            opt.zero_grad()
            with warnings.catch_warnings(), torch.autocast("cpu", torch.bfloat16, enabled=arch == "raw_autocast"), mon.step(step):
                warnings.simplefilter("ignore")
                loss_fn(model, next(data)).float().backward()
            opt.step()
            out.append({(r.layer, r.metric): (r.value, r.rows, r.shape) for r in mon.pop_records()})
            assert all(type(s.param) is nn.Parameter for s in mon.slots.values())
        return out, mon.roles, dict(mon.unmeasured), watched

    fast, mode = records(True), records(False)
    assert fast[3][0] == (False, 1) and all(w == (True, 0) for w in fast[3][1:])  # the mode on step 0 only
    assert all(w == (False, 1) for w in mode[3])
    assert fast[1:3] == mode[1:3]
    for a, b in zip(fast[0], mode[0]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k][1:] == b[k][1:], k
            assert a[k][0] == b[k][0] or (a[k][0] != a[k][0] and b[k][0] != b[k][0]), k  # bit for bit (NaN: both)
    if arch == "raw":  # (under autocast the checkpointed block's recompute multiplies autocast's cached copies)
        assert not fast[2] and {"up", "down", "cast", "mapped", "attn.in_proj_weight", "attn.out_proj", "block.0", "block.2"} <= {
            layer for layer, metric in fast[0][-1] if metric == "stable_rank"}


def test_weights_are_plain_parameters_after_a_step_that_raises_and_in_copies_made_during_one():
    import copy
    import io

    torch.manual_seed(0)
    model = Tiny()
    mon = Monitor(model)
    x = torch.randn(12, 8)
    with mon.step(0):
        model(x).square().mean().backward()
    with mon.step(1):  # watched by the weights themselves
        assert type(model.a.weight) is not nn.Parameter and isinstance(model.a.weight, nn.Parameter)
        ema = copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
        model(x).square().mean().backward()
    assert {type(p) for p in [*ema.parameters(), *torch.load(io.BytesIO(buf.getvalue()), weights_only=False).parameters()]} == {nn.Parameter}
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"), mon.step(2):
        model(torch.randn(12, 7))
    assert all(type(p) is nn.Parameter for p in model.parameters())
    mon.pop_records()
    with mon.step(3):
        model(x).square().mean().backward()
    st = by(mon.pop_records(), "stable_rank")
    assert st["a"].value == pytest.approx(exact_st([x]), rel=1e-4) and st["a"].rows == 12


def test_an_input_without_storage_is_named_not_a_crash():
    """A wrapper tensor subclass (like DTensor activations under tensor parallelism) has no storage to read: the
    forward runs as it would, and the weight it multiplied is unmeasured with the reason and the fix."""
    from torch.testing._internal.two_tensor import TwoTensor

    torch.manual_seed(0)
    model = Tiny()
    mon = Monitor(model)
    for step in range(2):  # the mode, then the weights watching themselves
        x = torch.randn(12, 8)
        with mon.step(step):
            side = model.a(TwoTensor(x, x.clone()))  # a side branch: no gradient reaches `a` through it
            model.c(torch.relu(model.b(torch.randn(12, 16)))).square().mean().backward()
        assert torch.allclose(side.a, model.a(x)) and torch.allclose(side.b, model.a(x))
        assert "without storage" in mon.unmeasured["a"] and "monitor.observe" in mon.unmeasured["a"]
        assert set(by(mon.pop_records(), "stable_rank")) == {"b", "c"}


def test_an_optimizer_step_inside_a_measured_step_trains_as_without_the_probe():
    """Training is unchanged even with opt.step() inside `with monitor.step()`: the weights' class for the step
    counts as a plain Parameter in torch.optim's foreach/fused choice (the default on CUDA), and the step gives
    the parameters an unprobed run gets, bit for bit."""
    import contextlib

    from torch.optim.optimizer import _foreach_supported_types

    runs = []
    for probed in (False, True):
        torch.manual_seed(0)
        model = Tiny()
        opt, mon = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True), Monitor(model) if probed else None
        g = torch.Generator().manual_seed(0)
        for step in range(4):
            opt.zero_grad()
            with mon.step(step) if mon else contextlib.nullcontext():
                model(torch.randn(12, 8, generator=g)).square().mean().backward()
                if mon and step:  # watched by the weights themselves
                    assert type(model.a.weight) is not nn.Parameter and all(type(p) in _foreach_supported_types for p in model.parameters())
                opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_convolution_through_a_full_view_of_its_kernel_is_paired_as_the_kernel_itself():
    """transformers' Mamba runs its depthwise conv as F.conv1d(x, conv1d.weight.squeeze(1).unsqueeze(1), …): a view
    of the whole kernel, which the probe refused ("used by convolution, squeeze, which the probe does not pair")."""
    torch.manual_seed(0)
    conv = nn.Conv1d(8, 8, 4, groups=8, padding=3)
    x = torch.randn(2, 8, 16)
    kernels = {"itself": lambda w: w, "squeeze-unsqueeze": lambda w: w.squeeze(1).unsqueeze(1), "view": lambda w: w.view(8, 1, 4),
               "part of it": lambda w: w[:, :, :2]}
    got = {}
    for name, kernel in kernels.items():
        mon = Monitor(conv)
        with warnings.catch_warnings(record=True), mon.step(0):
            F.conv1d(x, kernel(conv.weight), conv.bias, padding=3, groups=8).square().sum().backward()
        conv.zero_grad()
        got[name] = ({r.metric: r.value for r in mon.pop_records()}, dict(mon.unmeasured))
    assert got["squeeze-unsqueeze"] == got["view"] == got["itself"] and not got["itself"][1]
    assert "stable_rank" in got["itself"][0]
    assert "convolution" in got["part of it"][1]["weight"]  # two of its four taps: no input matrix of the weight


def test_mamba_is_measured_and_its_a_log_is_a_table_not_a_matrix():
    """transformers' Mamba: the conv kernel (passed as a view) is paired, and A_log — used only as exp(A_log), never
    multiplied — takes the embedding role, so `spectral_param_groups(roles=monitor)` leaves it to AdamW; it was
    'hidden' and Muon orthogonalized it as if it were an operator."""
    T = pytest.importorskip("transformers")
    from specscope.optim import spectral_param_groups

    torch.manual_seed(0)
    model = T.MambaForCausalLM(T.MambaConfig(vocab_size=128, hidden_size=32, state_size=8, num_hidden_layers=1))
    ids = torch.randint(0, 128, (2, 16))
    mon = Monitor(model)
    with pytest.warns(UserWarning, match=r"A_log' is unmeasured: used through exp, never multiplied"), mon.step(0):
        model(input_ids=ids, labels=ids).loss.backward()
    records = mon.pop_records()
    assert set(mon.unmeasured) == {"backbone.layers.0.mixer.A_log"}
    assert "backbone.layers.0.mixer.conv1d" in by(records, "stable_rank")
    assert mon.roles["backbone.layers.0.mixer.A_log"] == "embedding" and mon.roles["backbone.layers.0.mixer.conv1d"] == "hidden"
    groups = {g["algorithm"]: [n for n, _ in g["params"]] for g in spectral_param_groups(model, 0.02, 1e-3, roles=mon)}
    assert "backbone.layers.0.mixer.A_log" in groups["adamw"] and "backbone.layers.0.mixer.in_proj.weight" in groups["muon"]


def test_a_weight_scaled_on_its_way_to_a_product_stays_hidden():
    """Only nonlinear functions of a weight make it a table: F.linear(x, W * scale) still multiplies by W's operator."""
    lin, head = nn.Linear(16, 16), nn.Linear(16, 4)
    mon = Monitor(nn.ModuleDict({"lin": lin, "head": head}))
    with warnings.catch_warnings(record=True), mon.step(0):
        head(F.linear(torch.randn(8, 16), lin.weight * 0.5)).square().sum().backward()
    assert mon.roles["lin"] == "hidden" and "mul" in mon.unmeasured["lin"]


def test_clip_projections_are_the_heads_of_its_contrastive_loss():
    """CLIP's loss comes from text_embeds @ image_embeds.T, a product of two activations: the walk back from the loss
    stopped there, found no weight, and left both projections 'hidden' (routed to Muon)."""
    T = pytest.importorskip("transformers")
    from specscope.optim import spectral_param_groups

    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)
    model = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    mon = Monitor(model)
    with warnings.catch_warnings(record=True), mon.step(0):
        model(input_ids=torch.randint(0, 64, (3, 8)), pixel_values=torch.randn(3, 3, 16, 16), return_loss=True).loss.backward()
    assert mon.roles["visual_projection"] == mon.roles["text_projection"] == "head"
    assert mon.roles["text_model.encoder.layers.0.mlp.fc1"] == "hidden"
    groups = {g["algorithm"]: [n for n, _ in g["params"]] for g in spectral_param_groups(model, 0.02, 1e-3, roles=mon)}
    assert {"visual_projection.weight", "text_projection.weight"} <= set(groups["adamw"])


def test_weights_concatenated_into_one_operand_are_no_tables():
    """F.linear(h, cat([q.weight, k.weight])) (weights fused at run time; MobileBERT's head cat([E.T, dense.weight]))
    made q and k 'embedding' tables ("used as a table (cat) … never multiplied"), and roles=monitor sent them to AdamW."""
    from specscope.optim import spectral_param_groups

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.q, self.k, self.head = nn.Embedding(64, 16), nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False), nn.Linear(32, 64)

        def forward(self, ids):
            return self.head(torch.relu(F.linear(self.emb(ids), torch.cat([self.q.weight, self.k.weight], 0))))

    model, ids = Fused(), torch.randint(0, 64, (4, 8))
    mon = Monitor(model)
    with pytest.warns(UserWarning, match="used by cat of weights, which the probe does not pair"), mon.step(0):
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    assert mon.roles["q"] == mon.roles["k"] == "hidden"
    groups = {g["algorithm"]: [n for n, _ in g["params"]] for g in spectral_param_groups(model, 0.02, 1e-3, roles=mon)}
    assert groups["muon"] == ["q.weight", "k.weight"]


def test_a_head_fused_at_run_time_is_the_head():
    """logits = h @ cat([E.T, dense.weight], 1) (MobileBERT's MLM head): both weights are the head's operand."""
    emb, dense, body = nn.Embedding(50, 8), nn.Linear(4, 8, bias=False), nn.Linear(8, 8)  # dense.weight: [8, 4]
    model = nn.ModuleDict({"emb": emb, "dense": dense, "body": body})
    ids = torch.randint(0, 50, (3, 5))
    mon = Monitor(model)
    with warnings.catch_warnings(record=True), mon.step(0):
        h = torch.relu(body(emb(ids)))
        logits = (h @ torch.cat([emb.weight.T, dense.weight], 1))[..., :50]
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    assert mon.roles["dense"] == "head" and mon.roles["emb"] == "embedding" and mon.roles["body"] == "hidden"


def test_a_head_computed_from_its_weight_is_not_walked_past():
    """The walk from the loss passes a product of two activations (CLIP); a head whose operand is computed from its
    weight (F.linear(h, W * c), a weight-normed head) is still a weight's product: the layer below is no head."""
    body, head = nn.Linear(8, 8), nn.Linear(8, 5)
    mon = Monitor(nn.ModuleDict({"body": body, "head": head}))
    with warnings.catch_warnings(record=True), mon.step(0):
        F.linear(torch.relu(body(torch.randn(6, 8))), head.weight * 2.0).logsumexp(-1).mean().backward()
    assert mon.roles["body"] == "hidden"


@pytest.mark.parametrize("autocast", [False, True])
def test_a_tracked_table_fed_through_a_linear_layer_is_its_input(autocast):
    """DeBERTa feeds its relative-position table (a parameter) through key_proj: F.linear(table, W) with both tracked
    was left unpaired ("used by addmm, which the probe does not pair"), and a projection also used on the tokens
    silently lost the table's rows from its st(A). Under autocast the product reaches the aten level as x @ W.T."""
    import contextlib

    table, pos_proj, proj, out = nn.Parameter(torch.randn(16, 8)), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
    model = nn.ModuleDict({"pos_proj": pos_proj, "proj": proj, "out": out})
    model.table = table
    x = torch.randn(32, 8)
    mon = Monitor(model)
    for step in range(2):  # the first measured step (a function mode) and a later one (the weights watch themselves)
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with pytest.warns(UserWarning) if step == 0 else warnings.catch_warnings(record=True), mon.step(step), cast:
            out(proj(x) + pos_proj(table).mean(0) + proj(table).mean(0)).square().mean().backward()
        rows = {r.layer: r.rows for r in by(mon.pop_records(), "stable_rank").values()}
        assert rows == {"pos_proj": 16, "proj": 48, "out": 32}
        assert set(mon.unmeasured) == {"table"} and "input of a linear layer" in mon.unmeasured["table"]
        assert mon.roles["table"] == "embedding"


def test_a_product_of_two_tracked_weights_names_both_instead_of_measuring_part():
    """x @ (U @ V): which of U, V is the operator is not said; both are unmeasured with that reason, and U, also used
    on x alone, is not measured on part of its uses."""
    U, V = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))
    model = nn.Module()
    model.U, model.V = U, V
    x = torch.randn(10, 8)
    mon = Monitor(model)
    with warnings.catch_warnings(record=True), mon.step(0):
        ((x @ (U @ V)).sum() + (x @ U).sum()).backward()
    assert set(mon.unmeasured) == {"U", "V"}
    assert "multiplied with another tracked weight ('V', mm)" in mon.unmeasured["U"]
    assert "embedding" not in (mon.roles["U"], mon.roles["V"])  # operators, whichever: no tables


def test_a_weight_normed_convolution_keeps_its_kernel_a_kernel():
    """Wav2Vec2's positional conv is weight-normed: its direction v was taken for a ≥ 3-D table ('embedding'), and
    spectral_param_groups warned it was an MoE-like stack to route to Muon by hand."""
    from specscope.optim import spectral_param_groups

    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 3), dim=2), nn.Flatten(),
                          nn.Linear(96, 2))
    mon = Monitor(model)
    with warnings.catch_warnings(record=True), mon.step(0):
        model(torch.randn(4, 4, 16)).square().mean().backward()
    v, g = "1.parametrizations.weight.original1", "1.parametrizations.weight.original0"
    assert mon.roles[v] == "hidden" and mon.roles[g] == "embedding"  # the gain is no operator
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        groups = {g_["algorithm"]: [n for n, _ in g_["params"]] for g_ in spectral_param_groups(model, 0.02, 1e-3, roles=mon)}
    assert not [w for w in said if "stacked" in str(w.message)]
    assert v in groups["muon"] and g in groups["adamw"]


@pytest.mark.parametrize("experts", ["grouped_mm", "eager", "batched_mm"])
def test_mixtral_expert_stacks_are_measured_per_expert_and_the_rest_too(experts):
    """transformers 5 keeps Mixtral's experts as [experts, out, in] tensors, multiplied by torch._grouped_mm, one
    expert at a time, or gathered per token into bmm: each expert is recorded under `…[e]` (they were unmeasured,
    and the gathered route's reason called the stacks tables); attention, router and embeddings are measured too.
    tests/probe/test_probe_experts.py checks the values against float64."""
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    model, ids = T.MixtralForCausalLM._from_config(cfg, experts_implementation=experts), torch.randint(0, 128, (2, 16))
    mon = Monitor(model)
    with warnings.catch_warnings(record=True), mon.step(0):
        model(input_ids=ids, labels=ids).loss.backward()
    assert mon.unmeasured == {}
    measured = set(by(mon.pop_records(), "stable_rank"))
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate"} <= measured
    assert {f"model.layers.0.mlp.experts.{w}[{e}]" for w in ("gate_up_proj", "down_proj") for e in range(4)} <= measured


def test_a_weight_scaled_before_a_function_the_probe_cannot_see_says_how_to_route_it():
    """exp(-W): the probe sees only the negation of W (what follows acts on -W), which could as well precede a product;
    the weight stays hidden, and its reason said only "pass its inputs with monitor.observe", which a table has none of."""
    class Decay(nn.Module):
        def __init__(self):
            super().__init__()
            self.A_log, self.fc = nn.Parameter(torch.randn(16, 16)), nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(x) * torch.exp(-self.A_log).mean(0)

    model = Decay()
    monitor = Monitor(model, every=1)
    with pytest.warns(UserWarning, match=r"used by neg.*as in exp\(-W\), the weight is a table: route it with"), monitor.step(0):
        model(torch.randn(8, 16)).sum().backward()
    assert monitor.roles["A_log"] == "hidden"


def test_a_split_into_unequal_parts_suggests_sizes_that_add_up():
    """64 outputs into 3 named parts do not divide: the error's example names the user's parts with sizes adding
    to 64 (it suggested {'q': 64, 'k': 64} whatever the weight, which failed again when followed)."""
    from specscope.errors import ConfigError

    with pytest.raises(ConfigError, match=r"adding to 64, e\.g\. \{'a': 22, 'b': 21, 'c': 21\} \(CLI: --split PATTERN=a:22,b:21,c:21\)"):
        Monitor(nn.Linear(4, 64), split={"weight": ["a", "b", "c"]})
    model = nn.Linear(4, 64)
    mon = Monitor(model, split={"weight": {"a": 22, "b": 21, "c": 21}})  # the suggestion works
    with mon.step(0):
        model(torch.randn(8, 4)).square().sum().backward()
    assert {r.layer for r in mon.pop_records() if r.metric == "nuclear_rank"} == {"weight.a", "weight.b", "weight.c"}


def test_a_split_into_more_parts_than_outputs_is_refused_without_an_example():
    from specscope.errors import ConfigError

    with pytest.raises(ConfigError, match="2 outputs cannot be split into 3 parts"):
        Monitor(nn.Linear(3, 2), split={"weight": ["q", "k", "v"]})
