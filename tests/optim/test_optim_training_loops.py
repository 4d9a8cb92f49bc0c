"""What a training loop does to a model around its optimizer — build it on the meta device, freeze and unfreeze
layers, put a head of its own on a backbone — and what the optimizers and the routing do then."""

import logging
import warnings

import pytest
import torch
from torch import nn

from specscope.errors import ConfigError
from specscope.optim import LowRankDecay, Muon, spectral_param_groups

T = pytest.importorskip("transformers")


def llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))


def loss_of(model) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    return model(input_ids=ids, labels=ids).loss


def test_an_optimizer_built_on_the_meta_device_refuses_to_step_the_materialized_model():
    """Built from a model on the meta device and stepped after model.to_empty(): the optimizer held the meta tensors,
    which never get a gradient, and three steps changed nothing without a word."""
    with torch.device("meta"):
        model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                 num_attention_heads=4, num_key_value_heads=2))
    opt = Muon(spectral_param_groups(model, 0.02, 3e-4))
    model.to_empty(device="cpu")
    for p in model.parameters():
        nn.init.normal_(p, std=0.02)
    loss_of(model).backward()
    with pytest.raises(ConfigError, match="is on the meta device .*build the optimizer from the materialized model"):
        opt.step()


def test_lowrank_decay_leaves_a_frozen_weight_as_it_is():
    """A frozen weight (requires_grad=False) in a LowRankDecay group moved by lr·λ·polar(W) at every step (GPT-2 with
    block 0 frozen: c_attn by 2.9e-3); torch.optim's decoupled decay leaves it. A trainable weight with no gradient
    this step is still decayed (the decay does not read gradients: it may run after zero_grad)."""
    torch.manual_seed(0)
    frozen, trained = nn.Linear(16, 16), nn.Linear(16, 16)
    frozen.requires_grad_(False)
    before = frozen.weight.detach().clone(), trained.weight.detach().clone()
    LowRankDecay([frozen.weight, trained.weight], lr=0.1, weight_decay=0.1).step()
    assert torch.equal(frozen.weight, before[0]) and not torch.equal(trained.weight, before[1])


class OwnHead(nn.Module):
    """A backbone with a head of the user's own, as a LightningModule often holds one."""

    def __init__(self, head: str):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = T.BertModel(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                 intermediate_size=64, max_position_embeddings=32))
        setattr(self, head, nn.Linear(32, 3))
        self.head_name = head

    def forward(self, ids):
        return getattr(self, self.head_name)(self.backbone(input_ids=ids).last_hidden_state[:, 0])


def _tiny_llama(vocab: int, hidden: int = 32, inter: int = 64):
    return T.LlamaModel(T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


@pytest.mark.parametrize("make", [
    lambda: _tiny_llama(64),  # vocabulary = intermediate width: up_proj and gate_proj have as many outputs
    lambda: _tiny_llama(32),  # vocabulary = hidden width: down_proj, o_proj, q_proj
    lambda: T.BertModel(T.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)),  # the pooler, output.dense
    lambda: T.BertModel(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32), add_pooling_layer=False),
])
def test_a_transformers_backbone_declaring_no_head_has_none_whatever_its_widths(make):
    """A bare LlamaModel/BertModel declares no output embedding: every block matrix is hidden. The last Linear with as many
    outputs as the vocabulary was taken for a head (a hidden matrix to AdamW) when a width equalled the vocabulary."""
    torch.manual_seed(0)
    model = make()
    adamw = [n for g in spectral_param_groups(model, 0.02, 3e-4) if g["algorithm"] == "adamw" for n, p in g["params"]
             if p.dim() >= 2]
    assert adamw == [n for n, p in model.named_parameters() if p.dim() >= 2 and "embeddings" in n or n == "embed_tokens.weight"]


def test_a_users_head_on_a_transformers_backbone_is_still_found_by_the_vocabulary():
    """A Linear of the vocabulary's outputs outside the backbone (a user's LM head on a LlamaModel) is still a head."""
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.out = _tiny_llama(48), nn.Linear(32, 48, bias=False)

    routed = {n: g["algorithm"] for g in spectral_param_groups(LM(), 0.02, 3e-4) for n, _ in g["params"]}
    assert routed["out.weight"] == "adamw" and routed["model.layers.1.mlp.down_proj.weight"] == "muon"


@pytest.mark.parametrize("head", ["classifier", "head"])
def test_a_head_of_the_users_own_goes_to_adamw_by_its_name(head):
    """`self.classifier = nn.Linear(d, C)` on a BertModel went to Muon (no structure marks it a head), while a hand-made
    Muon group refused 'head.weight' by its name. A roles= answer still wins over the name."""
    model = OwnHead(head)
    routed = {n: g["algorithm"] for g in spectral_param_groups(model, 0.02, 3e-4) for n, _ in g["params"]}
    assert routed[f"{head}.weight"] == "adamw"
    assert routed["backbone.encoder.layer.0.attention.output.dense.weight"] == "muon"
    forced = {n: g["algorithm"] for g in spectral_param_groups(OwnHead(head), 0.02, 3e-4, roles={head: "hidden"})
              for n, _ in g["params"]}
    assert forced[f"{head}.weight"] == "muon"


def test_frozen_weights_routed_from_the_start_are_stepped_once_unfrozen():
    """include_frozen=True: a frozen layer sits in its role's group, unchanged while frozen, stepped by Muon once it
    has gradients. Without it the layer is left out, and adding it back as bare tensors — what torch and Lightning's
    BaseFinetuning do — raised torch's 'all optimizer param groups should be with/without names'."""
    model = llama()
    layer = model.model.layers[1]
    layer.requires_grad_(False)
    groups = spectral_param_groups(model, 0.02, 3e-4, include_frozen=True)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert {n: g["algorithm"] for g in groups for n, _ in g["params"]}[q] == "muon"
    opt = Muon(groups)
    before = layer.self_attn.q_proj.weight.detach().clone()
    loss_of(model).backward()
    opt.step()
    opt.zero_grad()
    assert torch.equal(layer.self_attn.q_proj.weight, before)
    layer.requires_grad_(True)
    loss_of(model).backward()
    opt.step()
    assert not torch.equal(layer.self_attn.q_proj.weight, before)

    left_out = Muon(spectral_param_groups(llama().requires_grad_(True), 0.02, 3e-4))
    with pytest.raises(ConfigError, match="include_frozen=True"):
        left_out.add_param_group({"params": llama().model.layers[1].parameters(), "lr": 1e-3})


def test_lightning_base_finetuning_unfreezes_into_an_optimizer_made_with_include_frozen():
    """Lightning's BaseFinetuning freezes a layer before training and unfreezes it in epoch 1 (with a warning that the
    weights are in the optimizer already): the layer is stepped from then on."""
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import BaseFinetuning

    from specscope.integrations.lightning import spectral_optimizer

    class Unfreeze(BaseFinetuning):
        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.model.model.layers[1])

        def finetune_function(self, pl_module, epoch, optimizer):
            if epoch == 1:
                self.unfreeze_and_add_param_group(pl_module.model.model.layers[1], optimizer, lr=1e-3)

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = llama()
            self.seen = {}

        def training_step(self, batch, i):
            self.seen.setdefault(self.current_epoch, self.model.model.layers[1].mlp.up_proj.weight.detach().clone())
            return self.model(**batch).loss

        def configure_optimizers(self):
            return spectral_optimizer(self, 0.02, 3e-4, include_frozen=True)

    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))]
    lit = Lit()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, callbacks=[Unfreeze()]).fit(lit, torch.utils.data.DataLoader(data, batch_size=4))
    assert torch.equal(lit.seen[0], lit.seen[1])  # frozen through epoch 0
    assert not torch.equal(lit.seen[1], lit.seen[2])  # stepped in epoch 1


class RootStack(nn.Module):
    """A stack of experts on the root module (no "expert" in any module name), routed one expert per row."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.stack = nn.Linear(8, 8), nn.Parameter(torch.randn(4, 8, 8) / 8**0.5)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x, route):
        h = self.inp(x)
        order = torch.argsort(route, stable=True)
        offs = torch.bincount(route, minlength=4).cumsum(0).to(torch.int32)
        y = torch._grouped_mm(h[order], self.stack.transpose(-2, -1), offs=offs)
        return self.classifier(torch.empty_like(y).index_copy(0, order, y))


@pytest.mark.parametrize("algorithm", ["muon", "specgd", "auto"])
def test_roles_from_a_monitor_keep_a_measured_stack_out_of_a_one_matrix_group(algorithm):
    """The Monitor gives a stack it measured expert by expert the role 'hidden'; with roles=monitor that put the stack
    in the SpecGD/auto group (whose step then refused it) or, on a module without "expert" in its name, in the plain
    Muon group (orthogonalized as one [4, 64] matrix). A measured stack goes to Muon with stacked=True, else to AdamW."""
    from specscope.probe import Monitor

    model = RootStack()
    monitor = Monitor(model, every=1)
    with monitor.step(0):
        model(torch.randn(16, 8), torch.arange(16) % 4).square().sum().backward()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        groups = spectral_param_groups(model, 0.02, 3e-4, algorithm=algorithm, roles=monitor)
    where = {n: (g["algorithm"], g.get("stacked", False)) for g in groups for n, _ in g["params"]}
    assert where["stack"] == (("muon", True) if algorithm == "muon" else ("adamw", False))
    assert where["classifier.weight"] == ("adamw", False) and where["inp.weight"] == (algorithm, False)


def test_every_linear_of_a_users_sequential_head_is_a_head_by_its_name():
    """`self.head = nn.Sequential(...)`: head.2.weight went to Muon by spectral_param_groups while a hand-made Muon
    group refused it by name."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.body = nn.Linear(8, 8)
    model.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    where = {n: g["algorithm"] for g in spectral_param_groups(model, 0.02, 3e-4) for n, _ in g["params"]}
    assert where["head.0.weight"] == where["head.2.weight"] == "adamw" and where["body.weight"] == "muon"


def test_a_remote_code_model_with_an_undeclared_vocabulary_head_still_routes_it_to_adamw():
    """A PreTrainedModel written outside transformers (ChatGLM's layout: `output_layer`, no get_output_embeddings) holds a
    head it does not declare: excluding every transformers model from the vocabulary-width search sent it to Muon."""
    class Cfg(T.PretrainedConfig):
        model_type = "glm_like_for_test"

        def __init__(self, hidden_size=32, padded_vocab_size=64, **kw):
            self.hidden_size, self.padded_vocab_size = hidden_size, padded_vocab_size
            super().__init__(**kw)

    class Pre(T.PreTrainedModel):
        config_class, base_model_prefix = Cfg, "transformer"

    class Inner(Pre):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.word_embeddings = nn.Embedding(64, 32)
            self.encoder = nn.Sequential(nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 32))
            self.output_layer = nn.Linear(32, 64, bias=False)
            self.post_init()

        def get_input_embeddings(self):
            return self.word_embeddings

    class Outer(Pre):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.transformer = Inner(cfg)
            self.post_init()

    routed = {n: g["algorithm"] for g in spectral_param_groups(Outer(Cfg()), 0.02, 3e-4) for n, _ in g["params"]}
    assert routed["transformer.output_layer.weight"] == "adamw" and routed["transformer.encoder.0.weight"] == "muon"
