"""Layers in a traced graph: which nodes compute which Linear, Embedding or norm, and
the small values the analysis passes around (contracts, segments, notes)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn

from ..frontend import BLOCK_OP, Traced
from .ops import Layout, info

aten = torch.ops.aten
Style = Literal["colwise", "rowwise", "vocab_parallel", "sequence_parallel", "replicate"]
NORM_OPS = (aten.layer_norm.default, aten.rms_norm.default)


@dataclass(frozen=True)
class Layer:
    """A layer the rewrite can shard: an ATen linear / embedding / norm whose weight is a
    parameter of the traced module. ``name`` is the module path (weight FQN less
    ``.weight``), relative to the traced module."""

    kind: Literal["linear", "conv1d", "embedding", "norm", "experts", "experts_io"]
    name: str
    weight: fx.Node
    bias: fx.Node | None
    shape: tuple[int, ...]
    options: tuple = ()  # embedding: (padding_idx, scale_grad_by_freq, sparse)
    view: fx.Node | None = None  # experts: the transpose the grouped matmul reads the weight by


# a Parameter of experts read by a grouped matmul: [E, out, in] read transposed, or
# [E, in, out] read as stored
EXPERT_KINDS = ("experts", "experts_io")
# layers that multiply their input by their weight (a Linear in any of its forms)
LINEAR_KINDS = ("linear", "conv1d", *EXPERT_KINDS)


def mark_layers(t: Traced, module: nn.Module | None = None) -> dict[str, Layer]:
    """Find the layers of a traced graph (``node.meta['tpc_layer']``). A weight tied
    between an embedding and a Linear head (export keeps one placeholder, named after
    the first) gives two layers, each named after the module that calls it; a weight
    used by two Linears makes neither a layer: they stay replicated."""
    found: dict[fx.Node, Layer] = {}
    uses: dict[fx.Node, int] = defaultdict(int)
    for ph, fqn in t.params.items():  # the op table tells parameters from other inputs
        ph.meta["tpc_param"] = fqn
    for n in t.gm.graph.nodes:
        n.meta.pop("tpc_layer", None)
        n.meta.pop("tpc_shared", None)
        if n.op != "call_function":
            continue
        if n.target is aten.linear.default:
            w, b = n.args[1], (n.args[2] if len(n.args) > 2 else None)
            kind = "linear"
        elif n.target is aten.addmm.default and len(n.args) == 3 and not n.kwargs:
            w, b, kind = n.args[2], n.args[0], "conv1d"  # GPT-2's Conv1D: bias + x @ W
        elif n.target is aten.embedding.default:
            w, b, kind = n.args[0], None, "embedding"
        elif n.target in NORM_OPS:
            w = n.args[2] if len(n.args) > 2 else None
            b = n.args[3] if n.target is aten.layer_norm.default and len(n.args) > 3 else None
            kind = "norm"
        elif is_grouped_mm(n):
            expert = _expert_weight(n, t.params)
            if expert is not None:  # a layer named after its Parameter, found once
                w, kind, view = expert
                found[n] = Layer(kind, t.params[w], w, None, tuple(info(w).shape), view=view)  # type: ignore[arg-type, union-attr]
            continue
        else:
            continue
        fqn = t.params.get(w)  # type: ignore[arg-type]
        if fqn is None or not fqn.endswith("weight"):
            continue
        layer = fqn[:-len(".weight")] if fqn.endswith(".weight") else ""
        caller = _caller(n) if module is not None else layer
        if kind == "linear" and _unembedding(module, caller, layer):
            # an Embedding's weight read by F.linear, not through a Linear of its own
            # (AI2 OLMo's F.linear(x, wte.weight), llm-foundry's SharedEmbedding(unembed=
            # True)): the output head, a layer of its own named after the embedding (just
            # the embedding's name below if this graph has no lookup of that weight)
            layer = f"{layer}{UNEMBED}"
        elif kind == "linear" and fqn.endswith(PACKED_WEIGHT) and fqn.rpartition(".")[0] == caller:
            # a Parameter of the calling module used as a Linear's weight (the packed
            # in_proj_weight of nn.MultiheadAttention): a layer named after the Parameter
            layer = caller = fqn[:-len("_weight")]
            if b is not None and t.params.get(b) != f"{layer}_bias":
                continue
        elif caller and caller != layer and not _child_linear(module, caller, layer):
            if not _holds(module, caller, "weight", module.get_parameter(fqn)):  # type: ignore[union-attr]
                continue  # another module's weight read directly (F.linear(h, emb.weight))
            layer = caller  # the tied twin: named after the module that calls it
        if not layer or b is not None and not (t.params.get(b) in (f"{layer}.bias", f"{layer}_bias") or _holds(
                module, layer, "bias", module.get_parameter(t.params.get(b, "")))):  # type: ignore[union-attr, arg-type]
            continue
        uses[w] += 1
        opts = ()
        if kind == "embedding":
            opts = (n.args[2] if len(n.args) > 2 else -1, n.args[3] if len(n.args) > 3 else False,
                    n.args[4] if len(n.args) > 4 else False)
        found[n] = Layer(kind, layer, w, b, tuple(info(w).shape), opts)  # type: ignore[arg-type, union-attr]
    looked_up = {l.weight for l in found.values() if l.kind == "embedding"}
    for n, layer in found.items():  # no lookup here to collide with: the embedding's name
        if layer.name.endswith(UNEMBED) and layer.weight not in looked_up:
            found[n] = replace(layer, name=layer.name.removesuffix(UNEMBED))
    out: dict[str, Layer] = {}
    for n, layer in found.items():
        twins = [l for l in found.values() if l.weight is layer.weight]
        kinds = sorted(l.kind for l in twins)
        if len(kinds) > 1 and kinds != ["embedding", "linear"] and layer.kind != "norm":
            # one weight, two layers of the same kind: replicated, and said so
            n.meta["tpc_shared"] = (layer.name, t.params[layer.weight],
                                    sorted({l.name for l in twins} - {layer.name}))
            continue
        n.meta["tpc_layer"] = layer
        out.setdefault(layer.name, layer)
    return out


def is_grouped_mm(n: fx.Node) -> bool:
    """A grouped matmul: rows of ``x`` [S, in], sorted by expert, times their expert's
    matrix of ``w`` [E, in, out] (``offs``: where each expert's rows end). PyTorch's
    ``_grouped_mm``, or transformers' own ``grouped_mm_fallback`` (its CPU path)."""
    if n.op != "call_function":
        return False
    if n.target is aten._grouped_mm.default:
        return True
    op = getattr(n.target, "_schema", None)
    return op is not None and op.name == "transformers::grouped_mm_fallback"


def _expert_weight(n: fx.Node, params: dict[fx.Node, str]) -> tuple[fx.Node, str, fx.Node | None] | None:
    """(parameter, kind, view) of a grouped matmul whose operand is a 3-D parameter of
    experts: stored [E, out, in] and read transposed (transformers' ``gate_up_proj`` /
    ``down_proj``, kind "experts"), or stored [E, in, out] and read as it is (gpt-oss's
    ``is_transposed`` layout, kind "experts_io"). None for any other grouped matmul (no
    ``offs``, a bias or an output dtype of its own, an input not 2-D)."""
    offs = n.args[2] if len(n.args) > 2 else n.kwargs.get("offs")
    if offs is None or any(a is not None for a in [*n.args[3:], n.kwargs.get("bias"),
                                                   n.kwargs.get("out_dtype")]):
        return None
    x, w = n.args[0], n.args[1]
    xv = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(xv, torch.Tensor) or xv.dim() != 2 or not isinstance(w, fx.Node):
        return None
    if w in params:
        return (w, "experts_io", None) if w.meta["val"].dim() == 3 else None
    if w.op != "call_function" or not w.args or w.args[0] not in params or len(w.users) != 1:
        return None
    p = w.args[0]
    if p.meta["val"].dim() != 3:  # type: ignore[union-attr]
        return None
    swaps = w.target is aten.transpose.int and {a % 3 for a in w.args[1:3]} == {1, 2} or \
        w.target is aten.permute.default and [a % 3 for a in w.args[1]] == [0, 2, 1]  # type: ignore[union-attr, operator]
    return (p, "experts", w) if swaps else None  # type: ignore[return-value]


# a 2-D weight transposed: ``w.T``, ``w.t()``, ``w.transpose(0, 1)``, ``w.permute(1, 0)``
def _transposed_param(n: Any, params: dict[fx.Node, str]) -> fx.Node | None:
    if not isinstance(n, fx.Node) or n.op != "call_function" or not n.args:
        return None
    w = n.args[0]
    if not isinstance(w, fx.Node) or w not in params or not params[w].endswith("weight"):
        return None
    val = w.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return None
    if n.target in (aten.numpy_T.default, aten.t.default):
        return w
    if n.target is aten.transpose.int and {a % 2 for a in n.args[1:3]} == {0, 1}:  # type: ignore[operator]
        return w
    if n.target is aten.permute.default and [d % 2 for d in n.args[1]] == [1, 0]:  # type: ignore[union-attr]
        return w
    return None


def canonical_linears(t: Traced) -> int:
    """Rewrite ``x @ w.T`` (and ``x @ w.T + b``) on a parameter ``w`` into the
    ``aten.linear`` it is, so a Linear written as a matmul (transformers' FalconLinear,
    hand-written reference code) is a layer like any other. Returns how many."""
    graph, count = t.gm.graph, 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not aten.matmul.default or len(n.args) != 2:
            continue
        w = _transposed_param(n.args[1], t.params)
        x = n.args[0]
        xv = x.meta.get("val") if isinstance(x, fx.Node) else None
        if w is None or not isinstance(xv, torch.Tensor) or xv.dim() < 1 or \
                xv.shape[-1] != w.meta["val"].shape[1]:
            continue
        replaced, bias = n, None
        users = list(n.users)
        if len(users) == 1 and users[0].op == "call_function" and \
                users[0].target is aten.add.Tensor and users[0].args[0] is n and \
                not users[0].kwargs:
            b = users[0].args[1]
            bv = b.meta.get("val") if isinstance(b, fx.Node) else None
            if b in t.params and t.params[b].endswith("bias") and isinstance(bv, torch.Tensor) \
                    and tuple(bv.shape) == (w.meta["val"].shape[0],):
                replaced, bias = users[0], b
        with graph.inserting_before(replaced):
            lin = graph.call_function(aten.linear.default, (x, w) if bias is None else (x, w, bias))
        lin.meta = {**n.meta, "val": replaced.meta.get("val")}
        transpose = n.args[1]
        replaced.replace_all_uses_with(lin)
        for dead in dict.fromkeys([replaced, n, transpose]):  # in order, each once
            if not dead.users:
                graph.erase_node(dead)
        count += 1
    if count:
        t.gm.recompile()
    return count


# a Parameter a module uses as a Linear weight itself (nn.MultiheadAttention's
# in_proj_weight): the layer is named ``<module>.in_proj``, its bias ``in_proj_bias``
PACKED_WEIGHT = ".in_proj_weight"
# the output head made of an embedding's weight read by F.linear: ``wte@linear`` (no
# dot: names split at dots into module and parameter)
UNEMBED = "@linear"


def layer_params(module: nn.Module, layer: str) -> dict[str, str]:
    """A layer's parameters, role ("weight", "bias") -> name relative to ``module``: a
    module's own ``weight``/``bias``, a Parameter pair ``<stem>_weight``/``<stem>_bias``
    of the module above (``attn.in_proj`` -> ``attn.in_proj_weight``), or a 3-D Parameter
    of experts, which is a layer of its own (``mlp.experts.gate_up_proj``)."""
    if layer.endswith(UNEMBED):  # the embedding's weight, read as a Linear's
        return {"weight": f"{layer.removesuffix(UNEMBED)}.weight"}
    try:
        sub = module.get_submodule(layer)
        return {r: f"{layer}.{r}" for r in ("weight", "bias") if sub._parameters.get(r) is not None}
    except AttributeError:
        owner, _, stem = layer.rpartition(".")
        held = module.get_submodule(owner)._parameters
        if held.get(stem) is not None and held[stem].dim() == 3:  # type: ignore[union-attr]
            return {"weight": layer}
        return {r: f"{layer}_{r}" for r in ("weight", "bias") if held.get(f"{stem}_{r}") is not None}


def param_role(name: str) -> tuple[str, str]:
    """(layer, role) of a parameter name: ``a.b.weight`` -> ("a.b", "weight"),
    ``attn.in_proj_bias`` -> ("attn.in_proj", "bias"); other names give role "" ."""
    owner, _, leaf = name.rpartition(".")
    for role in ("weight", "bias"):
        if leaf == role:
            return owner, role
        if "." + leaf == PACKED_WEIGHT.replace("weight", role):
            return name[:-len(role) - 1], role
    return owner, leaf


def _unembedding(module: nn.Module | None, caller: str, layer: str) -> bool:
    """``layer`` is an nn.Embedding whose weight a Linear op reads where no Linear of the
    calling module holds it: the caller is the root, the embedding itself, or a module
    without a ``weight`` of that tensor (a tied nn.Linear head holds it: named after itself)."""
    if module is None:
        return False
    try:
        emb = module.get_submodule(layer)
    except AttributeError:
        return False
    if not isinstance(emb, nn.Embedding):
        return False
    return caller in ("", layer) or not _holds(module, caller, "weight", emb.weight)


def _child_linear(module: nn.Module | None, caller: str, layer: str) -> bool:
    """``layer`` is an nn.Linear inside ``caller`` whose weight the caller passes to
    F.linear itself (nn.MultiheadAttention's out_proj): that Linear, called another way."""
    return module is not None and layer.startswith(caller + ".") and \
        isinstance(module.get_submodule(layer), nn.Linear)


def _caller(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return _clean_path(list(stack.values())[-1][0]) if stack else ""


def _holds(module: nn.Module | None, path: str, name: str, p: Any) -> bool:
    if module is None:
        return False
    try:
        return module.get_submodule(path)._parameters.get(name) is p
    except AttributeError:
        return False


def tied_pairs(gm: fx.GraphModule) -> list[tuple[Layer, Layer]]:
    """(embedding, linear) layers that share one weight."""
    layers = [l for n in gm.graph.nodes if (l := layer_of(n)) is not None]
    return [(e, h) for e in layers if e.kind == "embedding"
            for h in layers if h.kind in LINEAR_KINDS and h.weight is e.weight]


def layer_of(node: fx.Node) -> Layer | None:
    return node.meta.get("tpc_layer")


META_READS = (aten._assert_tensor_metadata.default, aten.sym_size.int)
_PASS_THROUGH = {"transpose", "t", "numpy_T", "permute", "view", "reshape", "_unsafe_view",
                 "select", "slice", "unsqueeze", "squeeze", "expand", "contiguous", "clone",
                 "_to_copy", "to", "alias", "detach", "index", "chunk", "split", "getitem"}


def _readers(node: fx.Node, depth: int = 4) -> set[str]:
    """The ops that compute with ``node``, past the views and indexing that pick from it."""
    out: set[str] = set()
    for u in node.users:
        if u.op != "call_function" or u.target in META_READS:  # an export assertion: no read
            continue
        name = getattr(u.target, "__name__", str(u.target)).split(".")[0]
        if name in _PASS_THROUGH and depth > 0:
            out |= _readers(u, depth - 1) or {name}
        else:
            out.add(name)
    return out


def unlayered_weights(t: Traced) -> list[Note]:
    """A note for each parameter of two or more dims that no Linear, Embedding or norm
    of the graph reads (transformers 5's 3-D expert weights read by index and a batched
    matmul, a Parameter multiplied in by hand): it stays replicated, and the plan says so
    instead of leaving the user to wonder. Weights shared by two layers have their own
    note already."""
    read: set[fx.Node] = set()
    for n in t.gm.graph.nodes:
        layer = layer_of(n)
        if layer is not None:
            read.add(layer.weight)
        elif n.meta.get("tpc_shared") is not None:
            read.update(a for a in n.args if isinstance(a, fx.Node) and a in t.params)
    out = []
    for ph, name in t.params.items():
        val = ph.meta.get("val")
        if ph in read or not isinstance(val, torch.Tensor) or val.dim() < 2 or not ph.users:
            continue
        ops = sorted(_readers(ph))
        out.append(Note(name, f"replicated: a {val.dim()}-D weight {list(val.shape)} that no "
                              f"Linear or Embedding reads (read by {', '.join(ops)}); only "
                              "the weights of Linears, Embeddings and norms are sharded"))
    return out


def is_block(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is BLOCK_OP


@dataclass
class Contract:
    """Layouts at a traced block's boundary: one per tensor input (in the order of the
    flattened ``(args, kwargs)``) and one per tensor output."""

    inputs: list[Layout]
    outputs: list[Layout]


@dataclass
class Propagation:
    layouts: dict[fx.Node, Layout]
    need: dict[fx.Node, dict[fx.Node, Layout]]  # consumer -> producer -> layout it needs
    found_rowwise: set[str] = field(default_factory=set)
    gathered_outputs: list[fx.Node] = field(default_factory=list)
    heads: set[str] = field(default_factory=set)  # colwise heads gathered right at the layer
    losses: list[fx.Node] = field(default_factory=list)  # losses computed over sharded classes
    packed: dict[str, int] = field(default_factory=dict)  # fused colwise layer -> parts
    # colwise layer -> n < tp: its output cut into n chunks, each computed by tp // n ranks
    # (n kv heads at a larger tp); its weight stays replicated, its gradient summed over tp
    grouped: dict[str, int] = field(default_factory=dict)
    # rowwise experts -> (the node whose value is reduced, the nodes between): the expert
    # rows' partial sums are weighted and combined per token first, then reduced
    deferred: dict[fx.Node, tuple[fx.Node, list[fx.Node]]] = field(default_factory=dict)


@dataclass
class Segment:
    kind: str
    colwise: list[str]
    rowwise: list[str]
    nodes: list[str] = field(default_factory=list)


@dataclass
class Note:
    layer: str
    reason: str
    indivisible: tuple[str, int] | None = None  # the structure is fine, a size is not
    no_rule: str | None = None  # the op without a rule that stopped the segment


def where(node: fx.Node) -> str:
    """The module path a node came from, for messages."""
    layer = layer_of(node)
    if layer is not None:
        return layer.name
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_path(path) or node.name
    return node.name


def _clean_path(path: str) -> str:
    """nn_module_stack paths of non-strict export look like ``L['self'].layers[0].mlp``
    or ``layers.0.mlp``: make them dotted."""
    import re
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = path.strip(".")
    return "" if path == "inner" else path.removeprefix("inner.")  # frontend._Flat


def source_line(node: fx.Node) -> str:
    """The user's source line of a node, for messages (``file:line``), or ''."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.splitlines() if ln.strip().startswith("File ")]
    lines = [ln for ln in lines if "/torch/" not in ln and "/tpcompile/" not in ln]
    if not lines:
        return ""
    import re
    m = re.match(r'File "([^"]+)", line (\d+)', lines[-1])
    return f"{m.group(1)}:{m.group(2)}" if m else ""


def dataflow_graph(gm: fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n)
        for p in n.all_input_nodes:
            g.add_edge(p, n)
    return g
