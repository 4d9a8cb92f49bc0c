"""Verdicts from nr/st and optimizer groups from verdicts plus structural rules."""

import math

import pytest
import torch

from specscope.errors import ConfigError
from specscope.probe import Monitor
from specscope.probe.advice import verdict


def test_verdict_margin():
    assert verdict(1.3, 0.25) == "spectral" and verdict(1.2, 0.25) == "undecided"
    assert verdict(0.79, 0.25) == "euclidean" and verdict(0.81, 0.25) == "undecided"
    assert verdict(float("nan"), 0.25) == "undecided"


@pytest.mark.parametrize("ratio, message", [(-1.0, ">= 0"), (float("-inf"), ">= 0"), ("2", "a number"), (True, "a number")])
def test_verdict_refuses_what_no_ratio_of_ranks_can_be(ratio, message):
    """nr(G)/st(A) >= 0: verdict(-1) said "euclidean", as a bad margin was refused and a bad ratio was not."""
    with pytest.raises(ConfigError, match=message):
        verdict(ratio)


def history_state(mon, ratios: dict[str, list[float]]):
    """A monitor state whose history holds the given nr/st ratios (st = 2, nr = 2·ratio)."""
    state = mon.state_dict()
    state["history"] = {k: [(i, 2.0, 2.0 * r) for i, r in enumerate(v)] for k, v in ratios.items()}
    return state


def test_advice_uses_median_over_recent_window(tiny_gpt):
    model = tiny_gpt()
    mon = Monitor(model)
    mon.load_state_dict(history_state(mon, {"blocks.0.mlp.down": [0.1, 0.1, 5, 5, 5], "blocks.0.attn.q": [3, 0.5, 0.5]}))
    df = mon.advice(window=3, margin=0.25).set_index("layer")
    assert df.loc["blocks.0.mlp.down", "verdict"] == "spectral" and df.loc["blocks.0.mlp.down", "measurements"] == 3
    assert df.loc["blocks.0.attn.q", "spectral_advantage"] == pytest.approx(0.5)
    assert df.loc["blocks.0.attn.q", "verdict"] == "euclidean"
    # no measurement is no ratio: not "undecided" (a ratio near 1), which a user would read as measured
    assert df.loc["blocks.0.attn.k", "verdict"] == "unmeasured" and math.isnan(df.loc["blocks.0.attn.k", "stable_rank"])
    assert df.loc["blocks.0.attn.k", "measurements"] == 0
    assert set(Monitor(model).advice().verdict) == {"unmeasured"}  # before any step
    assert mon.advice(window=5).set_index("layer").loc["blocks.0.mlp.down", "spectral_advantage"] == 5
    with pytest.raises(ConfigError):
        mon.advice(window=0)


def test_param_groups_structural_rules_and_cover_every_parameter(tiny_gpt):
    model = tiny_gpt(fused_qkv=True)
    mon = Monitor(model, split={"blocks.*.attn.qkv": ["q", "k", "v"]})
    everything = {n: 10.0 for n in mon.layers}
    everything["blocks.0.attn.qkv.v"] = 0.5  # one slice not spectral: the fused weight stays with AdamW
    everything["blocks.0.attn.o"] = 1.0  # undecided
    mon.load_state_dict(history_state(mon, {k: [v] for k, v in everything.items()}))
    groups = mon.param_groups(spectral_options={"lr": 0.02})
    by_alg = {g["algorithm"]: g for g in groups}
    assert set(by_alg["muon"]["param_names"]) == {"blocks.0.mlp.up.weight", "blocks.0.mlp.down.weight"}
    assert by_alg["muon"]["lr"] == 0.02
    adamw = set(by_alg["adamw"]["param_names"])
    assert {"embed.weight", "head.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.o.weight", "final_norm.weight"} <= adamw
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()) and len(set(names)) == len(names)
    assert all(p is dict(model.named_parameters())[n] for g in groups for p, n in zip(g["params"], g["param_names"]))
    opt = torch.optim.AdamW([{"params": g["params"]} for g in groups])  # groups are valid optimizer groups
    assert len(opt.param_groups) == 2


def test_a_weight_that_sat_out_the_latest_step_keeps_its_windows_verdict():
    """An MoE-style expert used on steps 0–2 and not on step 3 was 'unmeasured' (the latest step's reason), and
    param_groups sent it to AdamW; its measured window decides, while a weight never used stays unmeasured."""
    import torch
    from torch import nn

    from specscope.probe import Monitor

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.never = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            self.head = nn.Linear(16, 1)

        def forward(self, x, use_b):
            h = torch.relu(self.a(x))
            return self.head(torch.relu(self.b(h)) if use_b else h)

    torch.manual_seed(0)
    model = Experts()
    monitor = Monitor(model, every=1)
    for step in range(4):
        with monitor.step(step):
            model(torch.randn(64, 16), use_b=step < 3).square().mean().backward()
        model.zero_grad()
    table = monitor.advice().set_index("layer")
    assert table.loc["b", "measurements"] == 3 and table.loc["b", "verdict"] != "unmeasured"
    assert table.loc["never", "verdict"] == "unmeasured" and table.loc["never", "measurements"] == 0
    assert "not used in this step" in monitor.unmeasured["b"]
