"""The reference GPT and MLP: shapes, causality, names the probe relies on, config errors."""

import pytest
import torch

from specscope.errors import ConfigError
from specscope.models import GPT, MLP, GPTConfig

SMALL = dict(vocab_size=20, seq_len=8, n_layer=2, n_head=2, d_model=16)


@pytest.mark.parametrize("kw", [dict(), dict(mlp="gelu", pos="learned"), dict(mlp="swiglu", qk_norm=True, fused_qkv=True),
                                dict(tie_embeddings=True, dropout=0.1)])
def test_gpt_shapes_causality_and_names(kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, **kw)).eval()
    idx = torch.randint(0, 20, (3, 8))
    logits = model(idx)
    assert logits.shape == (3, 8, 20)
    idx2 = idx.clone()
    idx2[:, 5:] = (idx2[:, 5:] + 1) % 20
    torch.testing.assert_close(model(idx2)[:, :5], logits[:, :5])  # the future does not leak
    names = {n for n, _ in model.named_modules()}
    attn = {"blocks.1.attn.qkv"} if kw.get("fused_qkv") else {"blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v"}
    assert attn | {"embed", "blocks.1.attn_norm", "blocks.1.attn.o", "blocks.1.mlp_norm", "blocks.1.mlp.up",
                   "blocks.1.mlp.down", "final_norm", "head"} <= names
    assert ("blocks.0.mlp.gate" in names) == (kw.get("mlp") == "swiglu")
    assert ("pos_embed" in names) == (kw.get("pos") == "learned")
    assert (model.head.weight is model.embed.weight) == bool(kw.get("tie_embeddings"))
    model.train()
    model(idx).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gpt_config_errors():
    for kw in (dict(mlp="relu"), dict(pos="alibi"), dict(n_head=3), dict(d_model=18, n_head=6)):
        with pytest.raises(ConfigError):
            GPTConfig(**{**SMALL, **kw})
    with pytest.raises(ConfigError, match="seq_len"):
        GPT(GPTConfig(**SMALL))(torch.zeros(1, 9, dtype=torch.long))
    assert GPTConfig(**{**SMALL, "mlp": "swiglu"}).d_ff == 48


def test_mlp():
    m = MLP([4, 8, 8, 3], activation="gelu")
    assert m(torch.randn(5, 4)).shape == (5, 3) and [n for n, _ in m.named_modules()][2:] == ["layers.0", "layers.1", "layers.2"]
    with pytest.raises(ConfigError):
        MLP([4], "relu")
    with pytest.raises(ConfigError):
        MLP([4, 2], "sigmoidish")


def test_explicit_attention_is_scaled_dot_product_attention():
    from specscope.models.modular import enc003, explicit_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(5, 4, 1, 8).double(), torch.randn(5, 4, 3, 8).double(), torch.randn(5, 4, 3, 8).double()
    torch.testing.assert_close(explicit_attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))
    x = torch.randint(0, 7, (6, 2))
    models = []
    for kernel in ("sdpa", "explicit"):
        torch.manual_seed(0)
        models.append(enc003(7, 2, d_model=16, n_heads=2, d_ff=32, kernel=kernel).double())
    torch.testing.assert_close(models[1](x), models[0](x), rtol=0, atol=1e-12)  # same weights, same function


@pytest.mark.parametrize("kw, word", [
    (dict(n_layer=-3), "n_layer"), (dict(n_layer=0), "n_layer"), (dict(d_model=0), "d_model"), (dict(d_ff=0), "d_ff"),
    (dict(n_head=0), "n_head"), (dict(n_head=-2), "n_head"), (dict(seq_len=-1), "seq_len"),
    (dict(vocab_size=-5), "vocab_size"), (dict(d_model=-16), "d_model"), (dict(d_model=16.0), "d_model"),
    (dict(n_layer=2.5), "n_layer"), (dict(n_layer=True), "n_layer"), (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"), (dict(dropout=float("nan")), "dropout"), (dict(dropout="0.1"), "dropout")])
def test_gpt_config_refuses_bad_sizes(kw, word):
    with pytest.raises(ConfigError, match=word):
        GPTConfig(**{**SMALL, **kw})


def test_gpt_forward_refuses_bad_inputs():
    model = GPT(GPTConfig(**SMALL)).eval()
    for bad in (torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bool), torch.zeros(4, dtype=torch.long),
                torch.zeros(1, 2, 4, dtype=torch.long)):
        with pytest.raises(ConfigError, match="token ids"):
            model(bad)
    assert model(torch.zeros(2, 4, dtype=torch.int32)).shape == (2, 4, 20)


@pytest.mark.parametrize("sizes", [[True, 2], [float("nan"), 2], [2.5, 2], [4, 0], [4, -1], ["4", 2]])
def test_mlp_refuses_bad_sizes(sizes):
    with pytest.raises(ConfigError, match="sizes"):
        MLP(sizes)


def test_modular_transformer_refuses_bad_options_and_sizes():
    from specscope.models.modular import ModularTransformer

    base = dict(vocab_size=8, n_classes=7, seq_len=2, d_model=8, n_heads=2, d_ff=16)
    for kw, word in ((dict(norm="bogus"), "norm"), (dict(mlp="bogus"), "mlp"), (dict(kernel="bogus"), "kernel"),
                     (dict(n_layers=-1), "n_layers"), (dict(n_layers=1.5), "n_layers"), (dict(d_model=0), "d_model"),
                     (dict(d_ff=-1), "d_ff"), (dict(n_heads=0), "n_heads"), (dict(n_tasks=0), "n_tasks"),
                     (dict(vocab_size=2.0), "vocab_size")):
        with pytest.raises(ConfigError, match=word) as e:
            ModularTransformer(**{**base, **kw})
        if "bogus" in kw.values():
            assert "bogus" in str(e.value) and "(" in str(e.value)  # lists the valid names
    model = ModularTransformer(**base, n_layers=0)  # 0 layers: embeddings → norm → head, a supported baseline
    assert model(torch.zeros(3, 2, dtype=torch.long)).shape == (3, 7)
    model = ModularTransformer(**base)
    with pytest.raises(ConfigError, match="seq_len"):
        model(torch.zeros(3, 3, dtype=torch.long))
    for bad in (torch.zeros(3, 2), torch.zeros(2, dtype=torch.long)):
        with pytest.raises(ConfigError, match="token ids"):
            model(bad)


@pytest.mark.parametrize("bad", [16, 99, -1])
def test_gpt_names_a_token_id_outside_its_vocabulary(bad):
    """torch's embedding said only "IndexError: index out of range in self"."""
    model = GPT(GPTConfig(vocab_size=16, seq_len=8, n_layer=1, n_head=1, d_model=8))
    with pytest.raises(ConfigError, match=rf"token id {bad} is outside GPTConfig.vocab_size=16 \(ids 0..15\)"):
        model(torch.tensor([[1, 2, bad]]))
    assert model(torch.tensor([[0, 15]])).shape == (1, 2, 16)


def test_hf_model_expands_a_home_folder(tmp_path, monkeypatch):
    """`--model hf:~/mymodel` failed with "no local folder '~/mymodel'": the ~ was taken as a folder name."""
    transformers = pytest.importorskip("transformers")
    from specscope.models.hf import hf_model, tiny_configs

    saved = transformers.LlamaForCausalLM(tiny_configs(transformers)["llama"])
    saved.save_pretrained(tmp_path / "mymodel")
    monkeypatch.setenv("HOME", str(tmp_path))
    model, _, _ = hf_model("~/mymodel", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
