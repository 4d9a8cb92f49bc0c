"""Mixture-of-experts stacks [E, ·, ·] measured expert by expert: st(A) of the rows routed to each expert and nr(G) of
its gradient slice, on transformers' three expert routes, against float64 references computed here."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specscope.errors import ConfigError
from specscope.probe import Monitor
from specscope.train.distributed import spawn

T = pytest.importorskip("transformers")
ROUTES = ["grouped_mm", "eager", "batched_mm"]
UP, DOWN = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"


def st64(A: torch.Tensor) -> float:
    s = torch.linalg.svdvals(A.double())
    return float((s**2).sum() / s[0] ** 2)


def nr64(G: torch.Tensor) -> float:
    s = torch.linalg.svdvals(G.double())
    return float(s.sum() ** 2 / (s**2).sum())


def mixtral(route: str, experts: int = 4):
    torch.manual_seed(0)
    cfg = T.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=64)
    return T.MixtralForCausalLM._from_config(cfg, experts_implementation=route)


def routed(model) -> dict:
    """The experts module's inputs on each forward: (hidden states, top-k expert ids), captured by a plain hook."""
    seen = {}
    experts = model.model.layers[0].mlp.experts
    experts.register_forward_hook(lambda m, args, out: seen.update(h=args[0].detach(), idx=args[1].detach()))
    return seen


def by_layer(records, metric: str) -> dict:
    return {r.layer: r for r in records if r.metric == metric}


@pytest.mark.parametrize("route", ROUTES)
def test_every_expert_of_mixtral_is_measured_with_the_rows_routed_to_it(route):
    """Step 0 (every torch call watched) and step 1 (only the weights watched), after an AdamW step: each expert's st(A)
    of gate_up (the hidden states of the tokens routed to it) and of down (silu(gate)·up of those tokens, in float64
    from the weights), its rows, and nr(G) of its gradient slice equal the float64 references."""
    model = mixtral(route)
    seen, mon = routed(model), Monitor(model, every=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(step))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mon.step(step):
                model(input_ids=ids, labels=ids).loss.backward()
        records = mon.pop_records()
        st, nr = by_layer(records, "stable_rank"), by_layer(records, "nuclear_rank")
        experts = model.model.layers[0].mlp.experts
        assert mon.unmeasured == {}
        for e in range(4):
            A = seen["h"][(seen["idx"] == e).any(-1)].double()
            gate, up = (A @ experts.gate_up_proj[e].detach().double().T).chunk(2, dim=-1)
            for name, rows in ((f"{UP}[{e}]", A), (f"{DOWN}[{e}]", F.silu(gate) * up)):
                assert st[name].rows == len(rows) > 0
                assert st[name].value == pytest.approx(st64(rows), rel=1e-4), (step, name)
                stack = experts.gate_up_proj if name.startswith(UP) else experts.down_proj
                assert nr[name].value == pytest.approx(nr64(stack.grad[e]), rel=1e-5), (step, name)
        assert {UP, DOWN}.isdisjoint(st) and {UP, DOWN}.isdisjoint(nr)  # the stacks themselves are no weight matrix
        opt.step()
        opt.zero_grad()
    advice = mon.advice().set_index("layer")
    assert advice.loc[f"{DOWN}[3]", "kind"] == "experts" and advice.loc[f"{DOWN}[3]", "shape"] == "32x48"
    assert advice.loc[f"{DOWN}[3]", "verdict"] in ("spectral", "euclidean", "undecided")
    assert mon.roles[UP] == mon.roles[DOWN] == "hidden"


@pytest.mark.parametrize("route", ROUTES)
def test_under_autocast_every_route_measures_each_expert_with_what_it_multiplied(route):
    """bfloat16 autocast on the CPU: the per-expert and gathered routes multiply cast copies of W[e] and of W[ids]
    (an expert's copy was paired as if it were the whole stack: st(A) of every expert's rows together, no per-expert
    record); grouped_mm is not autocast and casts the rows to the stack's dtype. gate_up's st(A) of each expert is
    that of the rows as multiplied (bfloat16 where autocast cast them), in float64."""
    model = mixtral(route)
    seen, mon = routed(model), Monitor(model, every=1)
    for step in range(2):
        ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(step))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mon.step(step), torch.autocast("cpu", dtype=torch.bfloat16):
                model(input_ids=ids, labels=ids).loss.backward()
        st = by_layer(mon.pop_records(), "stable_rank")
        assert mon.unmeasured == {}
        for e in range(4):
            A = seen["h"][(seen["idx"] == e).any(-1)]
            A = A.float() if route == "grouped_mm" else A.bfloat16()
            assert st[f"{UP}[{e}]"].value == pytest.approx(st64(A), rel=1e-4), (step, e)
            assert st[f"{DOWN}[{e}]"].rows == len(A)
        model.zero_grad()


def test_the_three_routes_of_gpt_oss_stacks_stored_in_by_out_agree():
    """GPT-OSS stores its experts [E, in, out] (is_transposed) with a bias per expert: the same weights and batch
    measured through grouped_mm, the per-expert loop and the gathered bmm give the same records."""
    cfg = T.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=64, layer_types=["full_attention"])
    torch.manual_seed(0)
    state = T.GptOssForCausalLM(cfg).state_dict()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    got = {}
    for route in ROUTES:
        model = T.GptOssForCausalLM._from_config(cfg, experts_implementation=route)
        model.load_state_dict(state)
        mon = Monitor(model, every=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mon.step(0):
                model(input_ids=ids, labels=ids).loss.backward()
        got[route] = {(r.layer, r.metric): (r.value, r.rows) for r in mon.pop_records()
                      if "[" in r.layer and r.metric in ("stable_rank", "nuclear_rank")}
        biases = {f"model.layers.0.mlp.experts.{w}_bias" for w in ("gate_up_proj", "down_proj")}
        assert set(mon.unmeasured) == biases and all("a stack of biases" in mon.unmeasured[b] for b in biases)
    names = {layer for layer, _ in got["grouped_mm"]}
    assert names == {f"model.layers.0.mlp.experts.{w}[{e}]" for w in ("gate_up_proj", "down_proj") for e in range(4)}
    for route in ("eager", "batched_mm"):
        assert got[route].keys() == got["grouped_mm"].keys()
        for key, (value, rows) in got["grouped_mm"].items():
            assert got[route][key][1] == rows and got[route][key][0] == pytest.approx(value, rel=1e-4), (route, key)


class TopOne(nn.Module):
    """A hand-written MoE layer: token t goes to expert route[t], the rows sorted by expert, one grouped product."""

    def __init__(self, experts: int = 4, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(d, d)
        self.experts = nn.Parameter(torch.randn(experts, d, d) / d**0.5)  # [E, out, in]

    def forward(self, x, route):
        h = self.inp(x)
        order = torch.argsort(route, stable=True)
        offs = torch.bincount(route, minlength=self.experts.shape[0]).cumsum(0).to(torch.int32)
        y = torch._grouped_mm(h[order], self.experts.transpose(-2, -1), offs=offs)
        return torch.empty_like(y).index_copy(0, order, y)


def test_an_expert_no_row_was_routed_to_has_no_stable_rank_and_a_zero_gradient():
    model = TopOne()
    mon = Monitor(model, every=1)
    x, route = torch.randn(12, 8), torch.tensor([0, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0])  # expert 3 sits out
    with mon.step(0):
        model(x, route).square().sum().backward()
    records = mon.pop_records()
    st, fro = by_layer(records, "stable_rank"), by_layer(records, "grad_fro_norm")
    assert {f"experts[{e}]" for e in range(3)} <= set(st) and "experts[3]" not in st
    assert fro["experts[3]"].value == 0 and fro["experts[3]"].flag == "zero_gradient"
    h = model.inp(x).detach()
    assert st["experts[2]"].value == pytest.approx(st64(h[route == 2]), rel=1e-4) and st["experts[2]"].rows == 3
    assert mon.unmeasured == {}


def test_a_stack_has_no_one_stable_rank_and_specgd_says_so():
    """An optimizer that scales a step by st(A) takes a stack as one matrix: asking the Monitor for the stack's st(A)
    names the per-expert measurement and the fix, through SpecGD too (not "the Monitor does not track it")."""
    from specscope.optim import SpecGD

    model = TopOne()
    mon = Monitor(model, every=1)
    with mon.step(0):
        model(torch.randn(12, 8), torch.arange(12) % 4).square().sum().backward()
    assert mon.stable_rank("experts[1]") > 0
    with pytest.raises(ConfigError, match="stack of 4 experts, measured expert by expert"):
        mon.stable_rank("experts")
    opt = SpecGD([{"params": [(n, p) for n, p in model.named_parameters() if n == "experts"]}], lr=0.1, stable_rank=mon)
    with pytest.raises(ConfigError, match="stacked=True"):
        opt.step()


def test_a_resumed_monitor_measures_the_experts_as_the_uninterrupted_one():
    """state_dict after two measured steps, loaded into a fresh Monitor (which has not seen the stack as experts yet):
    the third measurement is the same as the uninterrupted Monitor's."""
    def third(resume: bool):
        model = TopOne()
        mon = Monitor(model, every=1)
        for step in range(3):
            if step == 2 and resume:
                state = mon.state_dict()
                mon = Monitor(model, every=1)
                mon.load_state_dict(state)
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
            with mon.step(step):
                model(x, torch.arange(16) % 4).square().sum().backward()
            model.zero_grad()
        return [(r.layer, r.metric, r.value) for r in mon.pop_records() if r.step == 2]
    assert third(resume=True) == third(resume=False)


def test_experts_multiplied_all_at_once_stay_unmeasured_with_the_routes_named():
    """Every expert on every token through einsum (bmm of the whole stack): no expert's rows to be told apart."""
    model = TopOne()
    mon = Monitor(model, every=1)
    with pytest.warns(UserWarning, match="'experts' is unmeasured"), mon.step(0):
        torch.einsum("ni,eoi->eno", model.inp(torch.randn(16, 8)), model.experts).sum(0).square().sum().backward()
    assert "grouped_mm" in mon.unmeasured["experts"] and "batched_mm" in mon.unmeasured["experts"]


def _distributed_run(rank: int, world: int) -> list[tuple]:
    """Two steps on rank's half of a batch of 16 tokens; on step 0 the second half routes nothing to experts 2 and 3."""
    model = TopOne()
    mon = Monitor(model, every=1)
    out = []
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        x, route = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        if step == 0:
            route[8:] = route[8:] % 2
        rows = slice(rank * 16 // world, (rank + 1) * 16 // world)
        with mon.step(step):
            (model(x[rows], route[rows]).square().sum() * world).backward()
        out += [(r.step, r.layer, r.metric, r.value, r.rows) for r in mon.pop_records() if r.metric in ("stable_rank", "nuclear_rank")]
        model.zero_grad()
    return out


def _distributed_worker(rank, world):
    return _distributed_run(rank, world)


def test_two_gloo_ranks_measure_each_expert_as_one_process_on_the_whole_batch():
    """Rank 1's half routes no token to experts 2 and 3 on step 0 while rank 0's does: every rank reduces every expert's
    statistics (no hang, no mismatched all-reduce) and records what one process records on the whole batch. (The two
    empty batches rank 1 added once shared a key, id() of a freed tensor, and finish_grams gave expert 3 expert 2's
    st(A) there.)"""
    results = spawn(_distributed_worker, 2, timeout=180)
    single = _distributed_run(0, 1)
    assert results[0] == results[1]
    assert [r[:3] + r[4:] for r in results[0]] == [r[:3] + r[4:] for r in single]
    for a, b in zip(results[0], single):
        assert a[3] == pytest.approx(b[3], rel=1e-4), (a, b)


def test_verdict_groups_put_a_stack_whose_experts_all_want_muon_in_a_stacked_group():
    """monitor.param_groups: a stack goes to Muon (stacked=True) only when every expert's verdict is spectral; the
    optimizer built from the groups steps it expert by expert."""
    from specscope.optim import Muon

    model = mixtral("grouped_mm")
    mon = Monitor(model, every=1)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mon.step(0):
            model(input_ids=ids, labels=ids).loss.backward()
    verdicts = dict(zip(*mon.advice()[["layer", "verdict"]].T.values))
    groups = mon.param_groups(spectral_options={"lr": 0.02}, euclidean_options={"lr": 3e-4})
    where = {n: g for g in groups for n in g["param_names"]}
    for stack in (UP, DOWN):
        all_spectral = all(verdicts[f"{stack}[{e}]"] == "spectral" for e in range(4))
        group = where[stack]
        assert (group["algorithm"], group.get("stacked", False)) == (("muon", True) if all_spectral else ("adamw", False))
    assert any(g.get("stacked") for g in groups)  # at initialization every expert here reads spectral
    opt = Muon(groups)
    before = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    opt.step()
    assert not torch.equal(before, model.model.layers[0].mlp.experts.down_proj.detach())


def test_an_expert_never_routed_is_unmeasured_in_the_advice_with_its_reason():
    """An expert no token reached on any measured step read 'undecided' with 0 measurements and no reason."""
    model = TopOne()
    mon = Monitor(model, every=1)
    for step in range(2):
        with mon.step(step):
            model(torch.randn(12, 8), torch.arange(12) % 3).square().sum().backward()  # expert 3 never
    advice = mon.advice().set_index("layer")
    assert advice.loc["experts[3]", "verdict"] == "unmeasured" and advice.loc["experts[3]", "measurements"] == 0
    assert advice.loc["experts[0]", "verdict"] != "unmeasured"
    groups = mon.param_groups(spectral_options={"lr": 0.02}, euclidean_options={"lr": 1e-3})
    assert {n: g["algorithm"] for g in groups for n in g["param_names"]}["experts"] == "adamw"


def _fsdp_run(rank: int, world: int) -> list[tuple]:
    """Two measured steps of Mixtral with every layer and the root sharded by FSDP2 (dim 0 of each expert stack split
    across ranks), each rank on its sequence of the batch; one process takes the whole batch unsharded."""
    model = mixtral("grouped_mm")
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    mon = Monitor(model, every=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    out = []
    for step in range(2):
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(step))
        rows = slice(rank * 2 // world, (rank + 1) * 2 // world)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mon.step(step):
                model(input_ids=ids[rows], labels=ids[rows]).loss.backward()
        out += [(r.step, r.layer, r.metric, r.value, r.rows) for r in mon.pop_records()
                if "[" in r.layer and r.metric in ("stable_rank", "nuclear_rank")]
        opt.step()
        opt.zero_grad()
    return out


def _fsdp_worker(rank, world):
    return _fsdp_run(rank, world)


def test_fsdp2_sharded_expert_stacks_are_measured_as_one_process_measures_them():
    results = spawn(_fsdp_worker, 2, timeout=240)
    single = _fsdp_run(0, 1)
    assert len(single) == 2 * 2 * 4 * 2  # steps × metrics × experts × stacks
    assert [r[:3] + r[4:] for r in results[0]] == [r[:3] + r[4:] for r in results[1]] == [r[:3] + r[4:] for r in single]
    for a, b in zip(results[0], single):
        assert a[3] == pytest.approx(b[3], rel=1e-4), (a, b)


def test_the_probe_benchmark_runs_on_a_mixture_of_experts_model():
    """benchmarks/probe_overhead.py --moe E (smoke test at a tiny size: the figures are the benchmark's own)."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[2] / "benchmarks" / "probe_overhead.py"
    res = subprocess.run([sys.executable, str(script), "--moe", "4", "--rounds", "1", "--block", "1", "--d-model", "32",
                          "--seq-len", "16", "--batch", "2", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Mixtral (4 experts a layer, 2 per token)" in res.stdout and "| every step (default: gram) |" in res.stdout
