"""The role of each weight, from how it is used — never from its name.

- embedding: looked up by index (`nn.Embedding`, `F.embedding`), or the same tensor as such a weight (tied);
- head: produces the model's outputs — the first matrix product met walking the autograd graph back from
  the loss (logits, class scores), or, without a backward pass to look at, the model's declared output
  embedding (transformers' `get_output_embeddings()`), a transformers task model's matrices outside its
  backbone (`base_model`: a classifier, `score`, `qa_outputs`, an LM head's transform), or else the last
  Linear with as many outputs as an embedding has tokens (heads are registered last; a hidden d×d matrix
  matches too when d equals the vocabulary, so only the last one counts);
- hidden: everything else. Only hidden matrices take a spectral step (REFERENCE §3).

A table that is added to activations rather than multiplied (a learned positional table, a class token
stored as an nn.Parameter) is no operator on an input: it takes the embedding role — from its use on a
measured step (only additive ops touched it), or, from structure alone, when it has ≥ 3 dims and is no
convolution's kernel.
"""

from __future__ import annotations

from torch import Tensor, nn

ROLES = ("embedding", "head", "hidden")
# ops that use a tensor as an additive table (positions, class tokens), not as an operator
ADDITIVE = frozenset({"add", "add_", "sub", "cat", "index_select", "index", "repeat", "expand_as", "where"})
# autograd nodes of a product with a weight: walking back from the loss stops at the first one
_PRODUCTS = ("MmBackward", "AddmmBackward", "ConvolutionBackward", "EmbeddingBackward", "BmmBackward", "LinearBackward")
# nodes between a weight and the product that uses it (W.T, views, casts)
_WEIGHT_PATH = ("TBackward", "ViewBackward", "TransposeBackward", "PermuteBackward", "ToCopyBackward", "SliceBackward",
                "SplitBackward", "UnsafeViewBackward", "ReshapeAlias", "AliasBackward", "ExpandBackward", "CloneBackward")


def static_roles(model: nn.Module) -> dict[int, str]:
    """id(param) -> "embedding" / "head" from the model's structure (no forward pass needed)."""
    roles: dict[int, str] = {}
    embeds = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    inp = _call(model, "get_input_embeddings")
    tokens = inp if isinstance(inp, nn.Embedding) else max(embeds, key=lambda m: m.num_embeddings, default=None)
    vocab = {tokens.num_embeddings} if tokens is not None else set()  # the token table, not positions
    out_emb = _call(model, "get_output_embeddings")
    task = _task_head(model)
    if out_emb is None and not task:  # the last vocabulary-sized Linear: a hidden d×d matrix can match when d equals the vocabulary
        out_emb = next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear) and m.out_features in vocab), None)
    if out_emb is not None and isinstance(getattr(out_emb, "weight", None), Tensor):
        roles[id(out_emb.weight)] = "head"
    for p in task:
        roles[id(p)] = "head"
    for m in embeds:  # tied beats head: the tensor is an embedding
        roles[id(m.weight)] = "embedding"
    kernels = {id(m.weight) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    for p in model.parameters():
        if p.dim() >= 3 and id(p) not in kernels:  # [1, tokens, d] position tables, [1, 1, d] class tokens
            roles[id(p)] = "embedding"
    return roles


def _task_head(model: nn.Module) -> list[Tensor]:
    """The ≥ 2-D parameters of a transformers task model (…ForSequenceClassification, …ForMaskedLM) that are not
    in its backbone `base_model`: the head the task added. [] for a backbone itself or any other model."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model or not getattr(model, "base_model_prefix", ""):
        return []  # base_model_prefix: a transformers PreTrainedModel, not any module with such an attribute
    inside = {id(p) for p in base.parameters()}
    return [p for p in model.parameters() if p.dim() >= 2 and id(p) not in inside]


def _call(model: nn.Module, name: str):
    """transformers' get_input_embeddings()/get_output_embeddings(), None elsewhere or when not provided."""
    try:
        return getattr(model, name)()
    except (AttributeError, NotImplementedError, TypeError):
        return None


def output_weights(root: Tensor, max_nodes: int = 100_000) -> set[int]:
    """ids of the weights of the products nearest to `root` (the loss) in its autograd graph."""
    fn = root.grad_fn
    if fn is None:
        return set()
    found: set[int] = set()
    stack, seen = [fn], set()
    while stack and len(seen) < max_nodes:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith(_PRODUCTS):
            found |= _leaf_weights(node)
            continue
        stack.extend(n for n, _ in node.next_functions)
    return found


def _leaf_weights(node, depth: int = 4) -> set[int]:
    """Parameters reaching a product node through view/transpose/cast nodes only (its weight operand)."""
    out: set[int] = set()
    frontier = [n for n, _ in node.next_functions]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n is None:
                continue
            var = getattr(n, "variable", None)
            if var is not None:
                if var.dim() >= 2:
                    out.add(id(var))
            elif type(n).__name__.startswith(_WEIGHT_PATH):
                nxt.extend(m for m, _ in n.next_functions)
        frontier = nxt
    return out
