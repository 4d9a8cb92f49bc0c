"""Hugging Face transformers as diagnose targets: `hf:<local folder>` (its weights, from_pretrained with
local_files_only) or `hf:gpt2` / `hf:llama` / `hf:bert` / `hf:mixtral` (tiny random-init configs), each with its loss on
the Python standard library's source (specscope.data.text): causal-LM, or masked-LM for BERT-like models.

Tokens are the text's bytes (vocabulary 256), or the folder's own tokenizer when it has one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch

from specscope.data.text import load_corpus, sample_batch
from specscope.errors import ConfigError

SEQ, BATCH, MASK_FRACTION = 64, 8, 0.15
CORPUS_BYTES = 1 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
MASKED_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "modernbert"}


def tiny_configs(transformers) -> dict:
    """The built-in random-init configs: 2 layers, width 64, 4 heads, byte vocabulary, no dropout."""
    drop = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return {
        "gpt2": transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=SEQ, bos_token_id=0,
                                        eos_token_id=0, **drop),
        "llama": transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ),
        "bert": transformers.BertConfig(vocab_size=257, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0),  # bytes + [MASK] = 256
        "mixtral": transformers.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                              num_experts_per_tok=2, max_position_embeddings=SEQ),  # experts measured apart
    }


def is_masked_lm(config) -> bool:
    return any("MaskedLM" in a for a in (config.architectures or [])) or config.model_type in MASKED_TYPES


def hf_model(name: str, seed: int):
    """(model, batches, loss_fn) for `hf:<name>`: a local folder if one exists at `name` (~ expanded), else a
    built-in config."""
    from specscope.store.deps import require

    transformers = require("transformers", "hf", "--model hf:...")
    torch.manual_seed(seed)
    tiny = tiny_configs(transformers)
    if name and (folder := Path(name).expanduser()).is_dir():
        model, tokenizer = _from_folder(transformers, folder)
    elif name in tiny:
        config = tiny[name]
        auto = transformers.AutoModelForMaskedLM if is_masked_lm(config) else transformers.AutoModelForCausalLM
        model, tokenizer = auto.from_config(config), None
    else:
        raise ConfigError(f"--model hf:{name}: no local folder {name!r} and no built-in config of that name; "
                          f"give a folder saved with save_pretrained or one of {sorted(tiny)}")
    config = model.config
    masked = is_masked_lm(config)
    if not masked and getattr(model, "loss_type", "") is None:  # the causal-LM loss transformers falls back to,
        model.loss_type = "ForCausalLM"                          # named, so it does not warn on every run (GPT-2)
    tokens, mask_id = _tokens(tokenizer, config, masked, name)
    seq = min(SEQ, getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or SEQ)
    return model, batches(tokens, seed, seq, mask_id if masked else None), hf_loss


def _from_folder(transformers, path: Path):
    # trust_remote_code=False: a folder's config.json may name Python files of its own (auto_map); transformers
    # would ask on a terminal whether to run them. No code runs from a data folder: refused, without asking.
    _refuse_folder_code(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        auto = transformers.AutoModelForMaskedLM if is_masked_lm(config) else transformers.AutoModelForCausalLM
        model = auto.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 — a damaged safetensors file, a config of negative sizes or thousands deep:
        # whatever transformers or safetensors raise on a folder's files is that folder's fault, named as such
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--model hf:{path}: cannot load a causal- or masked-LM from that folder "
                          f"({type(e).__name__}: {first}); check its config.json and weights files") from None
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return model, None  # byte tokens
    try:
        return model, transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 — the folder's tokenizer files: their fault, named
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--model hf:{path}: the folder's tokenizer does not load ({type(e).__name__}: {first})") from None


def _refuse_folder_code(path: Path) -> None:
    """A ConfigError where the folder's config or tokenizer config names Python code of its own (`auto_map`).
    transformers refuses that code for an unknown model type, but for a type it knows it quietly builds its own
    class instead: the model trained would not be the folder's."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # absent or unreadable: transformers' own error says so
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            raise ConfigError(f"--model hf:{path}: its {name} names Python code of its own (auto_map), which specscope "
                              "does not run or replace; load that model in a factory of your own "
                              "(--model package.module:function, with trust_remote_code=True if you trust the code)")


@lru_cache(maxsize=1)
def corpus_bytes() -> torch.Tensor:
    """The first CORPUS_BYTES of the stdlib corpus's train split (walking the stdlib takes seconds: once per process)."""
    return load_corpus(max_bytes=CORPUS_BYTES).train


def _tokens(tokenizer, config, masked: bool, name: str) -> tuple[torch.Tensor, int | None]:
    train = corpus_bytes()
    if tokenizer is not None:
        text = train.numpy().tobytes().decode("utf-8", errors="replace")
        try:
            ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        except Exception as e:  # noqa: BLE001 — a tokenizer that loads but cannot encode: the folder's
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--model hf:{name}: the folder's tokenizer fails on text ({type(e).__name__}: {first})") from None
        if ids.numel() and (int(ids.max()) >= config.vocab_size or int(ids.min()) < 0):
            raise ConfigError(f"--model hf:{name}: the folder's tokenizer gives ids up to {int(ids.max())}, and the model "
                              f"has {config.vocab_size} embeddings (vocab_size): they were made for different models")
        mask_id = tokenizer.mask_token_id
    else:
        if config.vocab_size < 256:
            raise ConfigError(f"--model hf:{name}: vocabulary of {config.vocab_size} tokens and no tokenizer in the folder; byte tokens need >= 256")
        ids, mask_id = train.long(), 256 if config.vocab_size > 256 else None
    if masked and mask_id is None:
        raise ConfigError(f"--model hf:{name}: a masked-LM needs a mask token; the folder's tokenizer has none "
                          "(or, without a tokenizer, the vocabulary needs a 257th id for it)")
    return ids, mask_id


def batches(tokens: torch.Tensor, seed: int, seq: int, mask_id: int | None, batch: int = BATCH) -> Iterator[dict]:
    """Random windows of the corpus: causal-LM (labels = inputs; the model shifts them) or masked-LM
    (MASK_FRACTION of positions replaced by mask_id, only those predicted)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        x, _ = sample_batch(tokens, batch, seq, g)
        if mask_id is None:
            yield {"input_ids": x, "labels": x}
            continue
        masked = torch.rand(x.shape, generator=g) < MASK_FRACTION
        masked[0, 0] |= not masked.any()  # at least one prediction per batch
        yield {"input_ids": x.masked_fill(masked, mask_id), "labels": x.masked_fill(~masked, -100)}


def hf_loss(model, batch: dict) -> torch.Tensor:
    return model(**batch).loss
