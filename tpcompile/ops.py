"""The op table: how a sharded dimension passes through each op.

Every op a segment may contain is one row here (a target -> a rule). A rule receives the
layouts of the node's tensor inputs and returns the output layout, or raises ``Unsafe``
(optionally *demanding* that another input be sharded too, e.g. ``k`` and ``v`` once ``q``
is). Ops whose tensor inputs are all replicated need no rule: they run replicated.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .trace import TensorInfo

from .layout import E, Q, R, S, Layout, Unsafe, arg, info, norm_dim, tensor_inputs  # noqa: F401


@dataclass
class Ctx:
    tp: int
    layouts: dict[fx.Node, Layout]
    where: str = ""

    def of(self, n: Any) -> Layout:
        return self.layouts.get(n, R) if isinstance(n, fx.Node) else R


Rule = Callable[[fx.Node, Ctx], Layout]
FUNCTION_RULES: dict[Any, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}
MODULE_RULES: dict[type, Rule] = {}
META_METHODS = {"size", "dim", "numel", "type", "get_device"}
META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}


def register(*targets: Any) -> Callable[[Rule], Rule]:
    def deco(rule: Rule) -> Rule:
        for t in targets:
            if isinstance(t, str):
                METHOD_RULES[t] = rule
            elif isinstance(t, type) and issubclass(t, nn.Module):
                MODULE_RULES[t] = rule
            else:
                FUNCTION_RULES[t] = rule
        return rule
    return deco


def rule_for(node: fx.Node, module: nn.Module | None) -> Rule | None:
    if node.op == "call_function":
        return FUNCTION_RULES.get(node.target)
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    if node.op == "call_module" and module is not None:
        return MODULE_RULES.get(type(module))
    return None


def is_meta_op(node: fx.Node) -> bool:
    """Ops that read a tensor's metadata (shape, dtype), not its values."""
    if node.op == "call_method" and node.target in META_METHODS:
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1] in META_ATTRS


def _first_sharded(node: fx.Node, ctx: Ctx) -> tuple[fx.Node, Layout]:
    for n in tensor_inputs(node):
        if ctx.of(n).sharded:
            return n, ctx.of(n)
    raise AssertionError("rule called without a sharded input")


# ----------------------------------------------------------------------------- rules

UNARY_FUNCS = [F.relu, torch.relu, F.gelu, F.silu, torch.tanh, F.tanh, torch.sigmoid,
               F.sigmoid, torch.exp, torch.neg, operator.neg, torch.rsqrt, torch.sqrt,
               F.dropout, F.softplus, F.mish, F.leaky_relu, F.elu, torch.abs, torch.square,
               F.relu6, F.hardswish, torch.erf, torch.cos, torch.sin, torch.clone]
UNARY_METHODS = ["relu", "tanh", "sigmoid", "exp", "neg", "rsqrt", "sqrt", "float", "half",
                 "bfloat16", "double", "to", "type_as", "contiguous", "clone", "abs",
                 "square", "detach", "cos", "sin", "erf"]
UNARY_MODULES = [nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity,
                 nn.Softplus, nn.Mish, nn.LeakyReLU, nn.ELU, nn.ReLU6, nn.Hardswish]


@register(*UNARY_FUNCS, *UNARY_METHODS, *UNARY_MODULES)
def unary(node: fx.Node, ctx: Ctx) -> Layout:
    src = node.args[0]
    lay = ctx.of(src)
    if not lay.sharded:  # e.g. type_as(sharded) on a replicated tensor: dtype only
        return R
    return lay


BINARY = [operator.add, operator.sub, operator.mul, operator.truediv, operator.pow,
          torch.add, torch.sub, torch.mul, torch.div, torch.where, torch.maximum,
          torch.minimum, torch.pow, "add", "sub", "mul", "div", "pow", "masked_fill",
          "maximum", "minimum", operator.iadd, operator.imul]


@register(*BINARY)
def elementwise(node: fx.Node, ctx: Ctx) -> Layout:
    out = info(node)
    assert out is not None
    dims = set()
    for n in tensor_inputs(node):
        lay, t = ctx.of(n), info(n)
        if lay.sharded and t is not None:
            dims.add(lay.dim + out.rank - t.rank)
    if len(dims) != 1:
        raise Unsafe(f"{node.name}: operands sharded on different dims {sorted(dims)}")
    d = dims.pop()
    for n in tensor_inputs(node):
        t = info(n)
        if ctx.of(n).sharded or t is None:
            continue
        pos = d - (out.rank - t.rank)
        if pos >= 0 and t.shape[pos] != 1:
            raise Unsafe(f"{node.name}: replicated operand {n.name} {list(t.shape)} meets a "
                         f"tensor sharded on dim {d}", demand=(n, pos))
    return S(d)


def view_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of dims of equal product between two shapes of the same numel."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        ga, gb, pa, pb = [], [], 1, 1
        if i < len(a):
            ga.append(i); pa *= a[i]; i += 1
        if j < len(b):
            gb.append(j); pb *= b[j]; j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                ga.append(i); pa *= a[i]; i += 1
            elif j < len(b):
                gb.append(j); pb *= b[j]; j += 1
            else:
                raise Unsafe(f"shapes {a} and {b} do not pair up")
        groups.append((ga, gb))
    return groups


def view_out_dim(a: tuple[int, ...], b: tuple[int, ...], d: int, tp: int, name: str,
                 explicit: bool = True) -> int:
    for ga, gb in view_groups(a, b):
        if d not in ga:
            continue
        if [k for k in ga if a[k] != 1][:1] != [d]:
            raise Unsafe(f"{name}: reshape merges the sharded dim {d} of {list(a)} under "
                         f"an outer dim; the shards would interleave")
        if explicit and len(gb) > 1 and b[gb[0]] == 1 and a[d] != 1:
            # view(b, s, 1, head_dim): one head. The shard would have to split that 1.
            raise Unsafe(f"{name}: reshape {list(a)} -> {list(b)} splits the sharded dim "
                         f"into 1 group (a single head?), which cannot be split over tp",
                         indivisible=(f"dim {gb[0]} of reshape to {list(b)}", 1))
        outer = [k for k in gb if b[k] != 1]
        if not outer:
            raise Unsafe(f"{name}: reshape drops the sharded dim")
        o = outer[0]
        if b[o] % tp:
            raise Unsafe(f"{name}: reshape {list(a)} -> {list(b)} splits the sharded dim "
                         f"into {b[o]} groups, not divisible by tp={tp}",
                         indivisible=(f"dim {o} of reshape to {list(b)}", b[o]))
        return o
    raise Unsafe(f"{name}: sharded dim {d} not found in reshape")


VIEW_LIKE = ["view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", torch.reshape,
             torch.flatten, torch.unflatten, torch.unsqueeze, torch.squeeze]


@register(*VIEW_LIKE)
def view(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = _first_sharded(node, ctx)
    a, b = info(src), info(node)
    assert a is not None and b is not None
    explicit = node.target in ("view", "reshape", "unflatten", torch.reshape, torch.unflatten)
    return S(view_out_dim(a.shape, b.shape, lay.dim, ctx.tp, node.name, explicit))


@register("transpose", torch.transpose, "permute", torch.permute, "t", "mT")
def transpose(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = _first_sharded(node, ctx)
    rank = info(src).rank  # type: ignore[union-attr]
    d = lay.dim
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name in ("t", "mT"):
        perm = list(range(rank)); perm[-1], perm[-2] = perm[-2], perm[-1]
    elif name == "transpose":
        d0, d1 = norm_dim(node.args[1], rank), norm_dim(node.args[2], rank)
        perm = list(range(rank)); perm[d0], perm[d1] = d1, d0
    else:
        dims = node.args[1:] if not isinstance(node.args[1], (tuple, list)) else node.args[1]
        perm = [norm_dim(x, rank) for x in dims]
    return S(perm.index(d))


@register("expand", "expand_as")
def expand(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = _first_sharded(node, ctx)
    a, b = info(src), info(node)
    o = lay.dim + b.rank - a.rank  # type: ignore[union-attr]
    if a.shape[lay.dim] != b.shape[o]:  # type: ignore[union-attr]
        raise Unsafe(f"{node.name}: expand broadcasts the sharded dim")
    return S(o)


@register(operator.getitem)
def getitem(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = node.args[0], ctx.of(node.args[0])
    if not isinstance(src, fx.Node) or not isinstance(src.meta.get("tpc"), TensorInfo):
        return lay  # an element of a tuple (split/chunk output)
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    rank = info(src).rank  # type: ignore[union-attr]
    n_real = sum(1 for x in idx if x is not None and x is not Ellipsis)
    i = o = 0
    for x in idx:
        if x is Ellipsis:
            skip = rank - n_real
            if i <= lay.dim < i + skip:
                return S(o + lay.dim - i)
            i += skip; o += skip
        elif x is None:
            o += 1
        elif isinstance(x, slice):
            if i == lay.dim:
                if x != slice(None, None, None):
                    raise Unsafe(f"{node.name}: slices the sharded dim {lay.dim}")
                return S(o)
            i += 1; o += 1
        else:
            if i == lay.dim:
                raise Unsafe(f"{node.name}: indexes into the sharded dim {lay.dim}")
            if isinstance(x, (list, torch.Tensor)) or isinstance(x, fx.Node) and info(x) is not None:
                raise Unsafe(f"{node.name}: advanced indexing of a sharded tensor")
            i += 1
    return S(o + lay.dim - i)


def _dim_arg(node: fx.Node, i: int, rank: int) -> int | None:
    d = arg(node, i, "dim")
    return None if d is None else norm_dim(d, rank)


@register(F.softmax, torch.softmax, "softmax", F.log_softmax, torch.log_softmax, "log_softmax")
def softmax(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = _first_sharded(node, ctx)
    if _dim_arg(node, 1, info(src).rank) == lay.dim:  # type: ignore[union-attr]
        raise Unsafe(f"{node.name}: softmax over the sharded dim")
    return lay


@register("mean", "sum", "amax", "amin", "var", "std", torch.mean, torch.sum, torch.amax)
def reduction(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = _first_sharded(node, ctx)
    rank = info(src).rank  # type: ignore[union-attr]
    dims = arg(node, 1, "dim")
    if dims is None:
        raise Unsafe(f"{node.name}: reduces over every dim, including the sharded one")
    dims = [norm_dim(x, rank) for x in (dims if isinstance(dims, (tuple, list)) else [dims])]
    if lay.dim in dims:
        raise Unsafe(f"{node.name}: reduces over the sharded dim {lay.dim}")
    keep = arg(node, 2, "keepdim", False)
    return S(lay.dim if keep else lay.dim - sum(1 for x in dims if x < lay.dim))


@register(operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm")
def matmul(node: fx.Node, ctx: Ctx) -> Layout:
    a, b = node.args[0], node.args[1]
    ta, tb, to = info(a), info(b), info(node)
    la, lb = ctx.of(a), ctx.of(b)
    if ta is None or tb is None or ta.rank < 2 or tb.rank < 2:
        raise Unsafe(f"{node.name}: matmul of vectors with a sharded operand")
    if (la.sharded and la.dim == ta.rank - 1) or (lb.sharded and lb.dim == tb.rank - 2):
        raise Unsafe(f"{node.name}: matmul contracts the sharded dim (would give partial sums)")
    if la.sharded and la.dim == ta.rank - 2:
        if lb.sharded or tb.rank > 2 and any(tb.shape[k] != 1 for k in range(tb.rank - 2)):
            raise Unsafe(f"{node.name}: matmul rows sharded with a batched right operand")
        return S(to.rank - 2)  # type: ignore[union-attr]
    if lb.sharded and lb.dim == tb.rank - 1:
        if la.sharded:
            raise Unsafe(f"{node.name}: matmul with both operands sharded on different dims")
        return S(to.rank - 1)  # type: ignore[union-attr]
    # batch dims: the other operand must be sharded on the same batch dim or broadcast
    src, lay = (a, la) if la.sharded else (b, lb)
    d = lay.dim + to.rank - info(src).rank  # type: ignore[union-attr]
    for other, t, l in ((a, ta, la), (b, tb, lb)):
        pos = d - (to.rank - t.rank)  # type: ignore[union-attr]
        if l.sharded:
            if l.dim != pos:
                raise Unsafe(f"{node.name}: matmul operands sharded on different dims")
        elif pos >= 0 and t.shape[pos] != 1:
            raise Unsafe(f"{node.name}: matmul needs {other.name} sharded too",
                         demand=(other, pos))
    return S(d)


@register(F.scaled_dot_product_attention)
def sdpa(node: fx.Node, ctx: Ctx) -> Layout:
    names = ["query", "key", "value"]
    qkv = [arg(node, i, names[i]) for i in range(3)]
    rank = info(qkv[0]).rank  # type: ignore[union-attr]
    heads = rank - 3
    if rank < 3:
        raise Unsafe(f"{node.name}: attention without a heads dim")
    for n in qkv:
        lay = ctx.of(n)
        if not lay.sharded:
            raise Unsafe(f"{node.name}: attention needs {n.name} sharded on heads",
                         demand=(n, heads))
        if lay.dim != heads:
            if info(n).shape[heads] == 1:  # type: ignore[union-attr]
                raise Unsafe(f"{node.name}: {n.name} has a single head, which cannot be "
                             "split over tp", indivisible=("heads", 1))
            raise Unsafe(f"{node.name}: {n.name} sharded on dim {lay.dim}, not the heads dim")
    mask = arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node) and not ctx.of(mask).sharded:
        t = info(mask)
        pos = heads - (rank - t.rank)  # type: ignore[union-attr]
        if pos >= 0 and t.shape[pos] != 1:  # type: ignore[union-attr]
            raise Unsafe(f"{node.name}: per-head attention mask must be sharded",
                         demand=(mask, pos))
    return S(heads)


@register(torch.cat, torch.concat, torch.stack)
def cat(node: fx.Node, ctx: Ctx) -> Layout:
    parts = list(node.args[0])
    rank = info(parts[0]).rank  # type: ignore[union-attr]
    is_stack = node.target is torch.stack
    d = _dim_arg(node, 1, rank + (1 if is_stack else 0)) or 0
    lays = [ctx.of(p) for p in parts]
    sh = {l.dim for l in lays if l.sharded}
    if len(sh) != 1:
        raise Unsafe(f"{node.name}: parts sharded on different dims")
    s = sh.pop()
    for p, l in zip(parts, lays):
        if not l.sharded:
            raise Unsafe(f"{node.name}: concatenates a replicated part", demand=(p, s))
    if not is_stack and d == s:
        raise Unsafe(f"{node.name}: concatenates along the sharded dim")
    return S(s + 1 if is_stack and d <= s else s)


@register("split", "chunk", torch.split, torch.chunk, "unbind", torch.unbind)
def split(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = _first_sharded(node, ctx)
    rank = info(src).rank  # type: ignore[union-attr]
    name = node.target if isinstance(node.target, str) else node.target.__name__
    d = _dim_arg(node, 1 if name == "unbind" else 2, rank) or 0
    if d == lay.dim:
        raise Unsafe(f"{node.name}: splits the sharded dim (a fused projection? its parts "
                     "would mix across ranks)")
    return S(lay.dim - 1 if name == "unbind" and d < lay.dim else lay.dim)


@register("repeat_interleave", torch.repeat_interleave)
def repeat_interleave(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = _first_sharded(node, ctx)
    reps = arg(node, 1, "repeats")
    if not isinstance(reps, int) or arg(node, 2, "dim") is None:
        raise Unsafe(f"{node.name}: repeat_interleave needs an int repeat and a dim")
    return lay


def is_passable(node: fx.Node, module: nn.Module | None) -> bool:
    """Ops a segment may pass through (used to find candidate colwise entries)."""
    return rule_for(node, module) is not None or is_meta_op(node)


# view-like ops whose explicit size arguments must be made local when the output is sharded
SIZED_METHODS = {"view", "reshape", "expand", "unflatten"}
SIZED_FUNCTIONS = {torch.reshape, torch.unflatten}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["Layout", "R", "E", "S", "Q", "Unsafe", "Ctx", "rule_for", "info", "tensor_inputs",
           "is_meta_op", "is_passable", "math"]
