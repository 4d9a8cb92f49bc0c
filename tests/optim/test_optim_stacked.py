"""Mixture-of-experts weight stacks [experts, out, in]: Muon with stacked=True orthogonalizes each expert's matrix
on its own (as separate 2-D parameters would be), and `spectral_param_groups` routes transformers' Mixtral
expert stacks to such a group."""

import warnings

import pytest
import torch

from specscope import linalg
from specscope.errors import ConfigError
from specscope.optim import Hybrid, Muon, spectral_param_groups
from specscope.optim._common import adjust_lr


@pytest.mark.parametrize("polar", ["gram", "gram_newton_schulz"])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_a_stack_steps_as_its_matrices_would_one_by_one(polar, adjust_lr_fn):
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(3, 24, 40, generator=g)
    grads = [torch.randn(3, 24, 40, generator=g) for _ in range(3)]
    stack = torch.nn.Parameter(W0.clone())
    single = [torch.nn.Parameter(w.clone()) for w in W0]
    opt_stack = Muon([stack], lr=0.05, polar=polar, adjust_lr_fn=adjust_lr_fn, stacked=True)
    opt_single = Muon(single, lr=0.05, polar=polar, adjust_lr_fn=adjust_lr_fn)
    for G in grads:
        stack.grad = G.clone()
        for p, Gi in zip(single, G):
            p.grad = Gi.clone()
        opt_stack.step()
        opt_single.step()
    torch.testing.assert_close(stack.detach(), torch.stack([p.detach() for p in single]), rtol=0, atol=1e-6)


def test_each_expert_gets_its_own_polar_factor_scaled_as_one_matrix():
    """From W = 0 without weight decay or momentum memory: W₁ = −lr·s·polar(G_e) per expert, s from [out, in]."""
    g = torch.Generator().manual_seed(1)
    G = torch.randn(4, 48, 16, generator=g) @ torch.diag(torch.logspace(0, -2, 16))
    p = torch.nn.Parameter(torch.zeros(4, 48, 16))
    p.grad = G.clone()
    Muon([p], lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False, polar="gram", stacked=True).step()
    P = -p.detach() / adjust_lr(0.1, None, torch.Size([48, 16]))
    assert float(linalg.polar_error(G, P, 1e-2).max()) < 1e-4
    whole = linalg.polar(G.flatten(1), "svd")  # what the conv-kernel reading [4, 48·16] would have given
    assert (P.flatten(1) - whole).abs().max() > 0.1


def test_stacked_is_checked_when_the_optimizer_is_built():
    with pytest.raises(ConfigError, match=r"stacked=True: parameter 0 .* shape \(8, 8\)"):
        Muon([torch.nn.Parameter(torch.zeros(8, 8))], stacked=True)
    with pytest.raises(ConfigError, match="stacked must be True or False"):
        Muon([torch.nn.Parameter(torch.zeros(2, 8, 8))], stacked="yes")
    with pytest.raises(ConfigError, match="stacked"):  # a misspelt key in a hand-made group
        Muon([{"params": [torch.nn.Parameter(torch.zeros(2, 8, 8))], "stackd": True}])


def _tensors(group: dict) -> list[torch.Tensor]:
    return [p for _, p in group["params"]]  # spectral_param_groups gives (name, parameter) pairs


def _train(model, opt, steps: int) -> list[float]:
    """Causal-LM steps on one fixed batch of 4 × 16 tokens; the losses."""
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


TINY_MOE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                num_local_experts=4, num_experts_per_tok=2, vocab_size=64, max_position_embeddings=32)


def _tiny(family: str, **extra):
    """transformers' {family}ForCausalLM from a tiny random-init config (seed 0)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, f"{family}Config"):
        pytest.skip(f"this transformers has no {family}")
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{family}Config")(**TINY_MOE, **extra)
    return getattr(transformers, f"{family}ForCausalLM")(cfg)


def _tiny_mixtral():
    model = _tiny("Mixtral")
    stacks = {n: p for n, p in model.named_parameters() if p.ndim == 3}
    if not stacks:
        pytest.skip("this transformers keeps Mixtral's experts as separate nn.Linear modules")
    return model, stacks


def test_mixtral_expert_stacks_go_to_a_stacked_muon_group_and_train():
    model, stacks = _tiny_mixtral()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "go to AdamW" warning: the stacks are routed
        groups = spectral_param_groups(model, 0.02, 3e-3, polar="gram")
    stacked = [g for g in groups if g.get("stacked")]
    assert len(stacked) == 1 and {id(p) for p in _tensors(stacked[0])} == {id(p) for p in stacks.values()}
    assert all(p.ndim == 2 for g in groups if g["algorithm"] == "muon" and not g.get("stacked") for p in _tensors(g))
    before = {n: p.detach().clone() for n, p in stacks.items()}
    losses = _train(model, Muon(groups, lr=0.02), steps=8)
    assert losses[-1] < losses[0]
    name, W = next(iter(stacks.items()))
    moved = before[name] - W.detach()
    assert all(float(m.norm()) > 0 for m in moved), "every expert that received tokens moved"


def test_other_algorithms_and_excluded_stacks_stay_on_adamw_with_the_fix_named():
    model, stacks = _tiny_mixtral()
    with pytest.warns(UserWarning, match="algorithm='muon' orthogonalizes mixture-of-experts stacks"):
        groups = spectral_param_groups(model, 0.02, 3e-3, algorithm="specgd")
    adamw = next(g for g in groups if g["algorithm"] == "adamw")
    assert {id(p) for p in stacks.values()} <= {id(p) for p in _tensors(adamw)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stacks go where exclude= asked: nothing to warn about
        groups = spectral_param_groups(model, 0.02, 3e-3, exclude=["*.experts.*"])
    assert not any(g.get("stacked") for g in groups)
    Hybrid(groups, "muon")  # the groups build


@pytest.mark.parametrize("stacked", [True, False])
def test_stacked_is_no_routing_option_the_routing_sets_it_per_group(stacked):
    """stacked=True went into the 2-D weights' group too (Muon then refused it, naming a 2-D weight) and sent the stacks
    to AdamW; the routing makes the stacked group itself, and exclude= keeps stacks on AdamW."""
    model, _ = _tiny_mixtral()
    with pytest.raises(ConfigError, match=rf"stacked={stacked} is set per group by the routing.*exclude=\['\*.experts.\*'\]"):
        spectral_param_groups(model, 0.02, 3e-3, stacked=stacked)


def test_gpt_oss_expert_biases_are_vectors_on_adamw_and_its_stacks_train():
    """GPT-OSS keeps one bias per expert as a 2-D [experts, out] parameter: a stack of vectors, not a matrix."""
    model = _tiny("GptOss", head_dim=8, layer_types=["full_attention"] * 2,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    for algorithm in ("muon", "specgd"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # specgd: the stacks go to AdamW, with a warning tested above
            groups = spectral_param_groups(model, 0.02, 3e-3, algorithm=algorithm)
        adamw = {n for g in groups if g["algorithm"] == "adamw" for n, _ in g["params"]}
        assert {n for n, p in model.named_parameters() if n.endswith("_proj_bias")} <= adamw
    groups = spectral_param_groups(model, 0.02, 3e-3)
    assert sorted(n.rsplit(".", 1)[-1] for g in groups if g.get("stacked") for n, _ in g["params"]) == \
        ["down_proj", "down_proj", "gate_up_proj", "gate_up_proj"]
    losses = _train(model, Muon(groups, lr=0.02), steps=6)
    assert losses[-1] < losses[0]
