"""The role of each weight, from how it is used — never from its name.

- embedding: looked up by index (`nn.Embedding`, `F.embedding`), or the same tensor as such a weight (tied);
- head: produces the model's outputs — the first matrix product with a weight met walking the autograd graph back
  from the loss (logits, class scores; CLIP's projections, past the product of their two outputs), or, without a backward pass to look at, the model's declared output
  embedding (transformers' `get_output_embeddings()`), a transformers task model's matrices outside its
  backbone (`base_model`: a classifier, `score`, `qa_outputs`, an LM head's transform), or else the last
  Linear with as many outputs as an embedding has tokens outside the transformers library's own models (heads are
  registered last; a hidden d×d matrix matches too when d equals the vocabulary, so only the last one counts; those
  models declare their heads, and a backbone declaring none — LlamaModel, BertModel — has none; a model of remote
  code, which may not declare its head, is searched);
- hidden: everything else. Only hidden matrices take a spectral step (REFERENCE §3).

A table that is added to activations rather than multiplied (a learned positional table, a class token
stored as an nn.Parameter) is no operator on an input: it takes the embedding role — from its use on a
measured step (only additive ops touched it), or, from structure alone, when it has ≥ 3 dims and is no
convolution's kernel. So does a weight whose entries go through a nonlinear function before any other use (Mamba's
`A_log`, used as exp(A_log)): what acts on the activations is the function's value, not the weight.
"""

from __future__ import annotations

from torch import Tensor, nn

ROLES = ("embedding", "head", "hidden")
# ops that use a tensor as an additive table (positions, class tokens), not as an operator
# how a weight was used, in a Slot's other_ops, where an aten op's name would not say it
LINEAR_INPUT = "input of a linear layer"  # a tracked table fed through F.linear (whose weight is paired with it)
WEIGHTS_CAT = "cat of weights"  # concatenated with other weights into one operand (fused at run time): no table
ADDITIVE = frozenset({"add", "add_", "sub", "cat", "index_select", "index", "repeat", "expand_as", "where", LINEAR_INPUT})
# elementwise nonlinear functions: a weight used only through them holds values, not an operator (scaling ops such as
# mul and div are left out: W * scale on its way to a product is still the operator W)
NONLINEAR = frozenset({"exp", "exp2", "expm1", "log", "log1p", "log2", "sigmoid", "tanh", "softplus", "sqrt", "rsqrt",
                       "reciprocal", "sin", "cos", "_softmax", "_log_softmax", "silu", "gelu", "relu", "elu", "abs"})


# elementwise scalings of the weight itself: what follows them (a product, exp) is not seen from the weight
SCALING = frozenset({"neg", "mul", "div"})


def used_as_table(ops: set[str]) -> bool:
    """Whether the ops that touched a weight on a measured step (none of them a product the probe pairs) make it a
    table: only additive ops, or nonlinear functions of its entries."""
    return bool(ops) and ops <= ADDITIVE | NONLINEAR
# autograd nodes of a product with a weight: walking back from the loss stops at the first one
_PRODUCTS = ("MmBackward", "AddmmBackward", "ConvolutionBackward", "EmbeddingBackward", "BmmBackward", "LinearBackward")
# nodes between a weight and the product that uses it (W.T, views, casts)
_WEIGHT_PATH = ("TBackward", "ViewBackward", "TransposeBackward", "PermuteBackward", "ToCopyBackward", "SliceBackward",
                "SplitBackward", "UnsafeViewBackward", "ReshapeAlias", "AliasBackward", "ExpandBackward", "CloneBackward",
                "CatBackward")  # weights fused at run time (MobileBERT's head: cat([E.T, dense.weight]))


def static_roles(model: nn.Module) -> dict[int, str]:
    """id(param) -> "embedding" / "head" from the model's structure (no forward pass needed). A transformers
    model inside another module (a LightningModule's `self.model`) declares its embeddings and heads as it
    would on its own."""
    roles: dict[int, str] = {}
    embeds = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    declared = [model, *(m for m in model.modules() if m is not model and _is_transformers_model(m))]
    inp = next((e for e in map(lambda m: _call(m, "get_input_embeddings"), declared) if isinstance(e, nn.Embedding)), None)
    tokens = inp if inp is not None else max(embeds, key=lambda m: m.num_embeddings, default=None)
    vocab = {tokens.num_embeddings} if tokens is not None else set()  # the token table, not positions
    outs = [o for o in (_call(m, "get_output_embeddings") for m in declared) if isinstance(getattr(o, "weight", None), Tensor)]
    task = task_heads(model)
    if not outs and not task:  # the last vocabulary-sized Linear: a hidden d×d matrix can match when d equals the vocabulary
        # not inside one of transformers' own models: they declare their heads, and one declaring none (LlamaModel,
        # BertModel) has none; a model of remote code (ChatGLM's output_layer) may hold an undeclared one
        backbone = {id(m) for t in declared if _is_transformers_model(t) and _from_transformers(t) for m in t.modules()}
        last = next((m for m in reversed(list(model.modules()))
                     if isinstance(m, nn.Linear) and m.out_features in vocab and id(m) not in backbone), None)
        outs = [last] if last is not None else []
    for o in outs:
        roles[id(o.weight)] = "head"
    for pid in task:
        roles[pid] = "head"
    for m in embeds:  # tied beats head: the tensor is an embedding
        roles[id(m.weight)] = "embedding"
    kernels = conv_kernels(model)
    for p in model.parameters():
        if p.dim() >= 3 and id(p) not in kernels:  # [1, tokens, d] position tables, [1, 1, d] class tokens
            roles[id(p)] = "embedding"
    return roles


def conv_kernels(model: nn.Module, gains: bool = False) -> set[int]:
    """ids of the convolutions' kernel parameters: `weight`, or, for a parametrized kernel (a weight-normed conv, as
    Wav2Vec2's positional one: `m.weight` is then computed anew on each access), the tensors of the kernel's shape it
    is made from (weight norm's direction); with `gains`, the parametrization's other tensors too (its gain)."""
    import torch
    from torch.nn.utils import parametrize

    out: set[int] = set()
    for m in model.modules():
        if not isinstance(m, nn.modules.conv._ConvNd):
            continue
        if parametrize.is_parametrized(m, "weight"):
            with torch.no_grad():
                shape = m.weight.shape
            out |= {id(p) for p in m.parametrizations.weight.parameters() if gains or p.shape == shape}
        elif isinstance(m.weight, Tensor):
            out.add(id(m.weight))
    return out


def task_heads(model: nn.Module) -> set[int]:
    """ids of the ≥ 2-D parameters a transformers task model (…ForSequenceClassification, …ForMaskedLM) adds
    outside its backbone `base_model`: the task's head, at `model` or at any depth inside it. These stay heads
    whatever a measured step sees (a masked-LM head's transform is no product nearest the loss)."""
    out: set[int] = set()
    for m in model.modules():
        base = getattr(m, "base_model", None)
        if not _is_transformers_model(m) or not isinstance(base, nn.Module) or base is m:
            continue  # a backbone itself, or no transformers model
        inside = {id(p) for p in base.parameters()}
        out |= {id(p) for p in m.parameters() if p.dim() >= 2 and id(p) not in inside}
    return out


def _is_transformers_model(m: nn.Module) -> bool:
    """A transformers PreTrainedModel (by its `base_model_prefix`, not any module with a `base_model` attribute)."""
    return bool(getattr(m, "base_model_prefix", "")) and callable(getattr(m, "get_output_embeddings", None))


def _from_transformers(m: nn.Module) -> bool:
    """A class of the transformers library itself (transformers.models.*), not a subclass written elsewhere."""
    return type(m).__module__.startswith("transformers.")


def _call(model: nn.Module, name: str):
    """transformers' get_input_embeddings()/get_output_embeddings(), None elsewhere or when not provided."""
    try:
        return getattr(model, name)()
    except (AttributeError, NotImplementedError, TypeError):
        return None


def output_weights(root: Tensor, max_nodes: int = 100_000) -> set[int]:
    """ids of the weights of the products nearest to `root` (the loss) in its autograd graph: products of two
    activations are passed through, to the weights that made them."""
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
            weights = _leaf_weights(node)
            found |= weights
            if weights or _weight_made(node):
                continue
            # a product of two activations (CLIP's text·image similarities) is walked through
        stack.extend(n for n, _ in node.next_functions)
    return found


def _weight_made(node, depth: int = 4) -> bool:
    """Whether an operand of a product node is computed from a ≥ 2-D parameter by ops that are no products within
    `depth` nodes (W * c, a weight norm): an operator, though not a view of one weight, so no walking past it."""
    frontier = [n for n, _ in node.next_functions]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n is None or type(n).__name__.startswith(_PRODUCTS):
                continue
            var = getattr(n, "variable", None)
            if var is not None and var.dim() >= 2:
                return True
            nxt.extend(m for m, _ in n.next_functions)
        frontier = nxt
    return False


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
