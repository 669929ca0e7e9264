"""The op table: how a sharded dimension passes through each ATen op.

The table is keyed by ATen overloads (``torch.ops.aten.*``), the closed op set of
``torch.export``'s training IR, which both front ends produce. Every op a segment may
contain is one row (a target -> a rule). A rule receives the layouts of the node's tensor
inputs and returns the output layout, or raises ``Unsafe`` (optionally *demanding* that
another input be sharded too, e.g. ``k`` and ``v`` once ``q`` is). Ops whose tensor inputs
are all replicated need no rule: they run replicated. Ops that never see a shard
(factories, losses, index arithmetic) are listed as ``REPLICATED_ONLY`` so that the table
states, for every op real models use, what happens to it.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

from .layout import E, Layout, P, Q, R, S, Unsafe, arg, info, norm_dim, tensor_inputs

aten = torch.ops.aten


@dataclass
class Ctx:
    tp: int
    layouts: dict[fx.Node, Layout]
    where: str = ""
    colwise: dict[fx.Node, str] = field(default_factory=dict)  # colwise output -> its layer
    packed: dict[str, int] = field(default_factory=dict)  # layer -> parts it is split into
    # (op, replicated parameter) -> the layout the op reads the parameter in: split like
    # its sharded operand (a norm's weight over a sharded projection)
    splits: dict[tuple[fx.Node, fx.Node], Layout] = field(default_factory=dict)
    # value -> the colwise layer it is an elementwise function of (a q/k norm's output):
    # a reshape into fewer heads than tp may share that layer by groups of ranks
    origin: dict[fx.Node, str] = field(default_factory=dict)

    def origin_of(self, n: fx.Node) -> str | None:
        return self.colwise.get(n) or self.origin.get(n)

    def of(self, n: Any) -> Layout:
        return self.layouts.get(n, R) if isinstance(n, fx.Node) else R


Rule = Callable[[fx.Node, Ctx], Layout]
RULES: dict[Any, Rule] = {}


def register(*targets: Any) -> Callable[[Rule], Rule]:
    def deco(rule: Rule) -> Rule:
        for t in targets:
            RULES[t] = rule
        return rule
    return deco


def rule_for(node: fx.Node) -> Rule | None:
    return RULES.get(node.target) if node.op == "call_function" else None


META_OPS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
            aten.sym_storage_offset.default, aten._assert_tensor_metadata.default}


def is_meta_op(node: fx.Node) -> bool:
    """Ops that read a tensor's metadata (shape, dtype), not its values."""
    return node.op == "call_function" and node.target in META_OPS


def _first_sharded(node: fx.Node, ctx: Ctx) -> tuple[fx.Node, Layout]:
    for n in tensor_inputs(node):
        if ctx.of(n).sharded:
            return n, ctx.of(n)
    raise AssertionError("rule called without a sharded input")


def name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", str(t))


# ----------------------------------------------------------------------------- rules

UNARY = [aten.relu.default, aten.gelu.default, aten.silu.default, aten.tanh.default,
         aten.sigmoid.default, aten.exp.default, aten.expm1.default, aten.log1p.default,
         aten.neg.default, aten.rsqrt.default,
         aten.sqrt.default, aten.abs.default, aten.cos.default, aten.sin.default,
         aten.erf.default, aten.log.default, aten.square.default, aten.reciprocal.default,
         aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
         aten.lift_fresh_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
         aten.to.other, aten._to_copy.default, aten.type_as.default, aten.dropout.default,
         aten.feature_dropout.default, aten.alpha_dropout.default,
         aten.feature_alpha_dropout.default, aten.softplus.default, aten.mish.default,
         aten.leaky_relu.default, aten.elu.default, aten.relu6.default, aten.hardtanh.default,
         aten.hardswish.default, aten.hardsigmoid.default, aten.celu.default, aten.selu.default,
         aten.log_sigmoid.default, aten.pow.Tensor_Scalar,
         aten.mul.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar, aten.rsub.Scalar,
         aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
         aten.masked_fill.Scalar, aten.eq.Scalar, aten.ne.Scalar, aten.lt.Scalar,
         aten.le.Scalar, aten.gt.Scalar, aten.ge.Scalar, aten.logical_not.default,
         aten.bitwise_not.default, aten.isnan.default, aten.isinf.default,
         aten.nan_to_num.default, aten.floor.default, aten.ceil.default, aten.round.default,
         aten.sign.default, aten.tanh_backward.default, aten.native_dropout.default,
         aten.pow.Scalar, aten.fill.Scalar, aten.zeros_like.default, aten.ones_like.default,
         aten.empty_like.default, aten.full_like.default, aten.rand_like.default,
         aten.randn_like.default, aten.bernoulli.p, aten.view_as_real.default,
         # in place, as written in forward (OLMo's ``qkv.clamp_``): on each rank's shard
         aten.clamp_.default, aten.clamp_min_.default, aten.clamp_max_.default,
         aten.relu_.default, aten.mul_.Scalar, aten.div_.Scalar, aten.add_.Scalar,
         aten.sub_.Scalar, aten.neg_.default, aten.tanh_.default, aten.sigmoid_.default]


@register(*UNARY)
def unary(node: fx.Node, ctx: Ctx) -> Layout:
    """Elementwise on one tensor (other arguments are numbers or dtypes)."""
    lay = ctx.of(node.args[0])
    if not lay.sharded:  # e.g. type_as(x, sharded): dtype only
        return R
    src = node.args[0]
    _keep_origin(node, src, ctx)
    if src in ctx.colwise and len(src.users) == 1 and info(node) is not None and \
            info(node).shape == info(src).shape:  # type: ignore[union-attr]
        # still the fused output, each element on its own (OLMo's qkv.clamp_ before the
        # split into q, k, v): its parts may be sharded each
        ctx.colwise[node] = ctx.colwise[src]
    return lay  # view_as_real too: [..., d] complex -> [..., d, 2] keeps the leading dims


@register(aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default,
          aten.new_full.default)
def new_tensor(node: fx.Node, ctx: Ctx) -> Layout:
    """``x.new_ones(s, s)`` (MPT's causal mask off the scores): a new tensor of the sizes
    given, whole (a sharded dim's size reads as its whole size in the program); ``x`` gives
    its dtype and device only, its shard will do."""
    return R


def _keep_origin(node: fx.Node, src: fx.Node, ctx: Ctx) -> None:
    layer = ctx.origin_of(src)
    if layer is not None and info(node) is not None and info(src) is not None and \
            info(node).shape == info(src).shape:  # type: ignore[union-attr]
        ctx.origin[node] = layer


BINARY = [aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
          aten.div.Tensor_mode, aten.pow.Tensor_Tensor, aten.where.self, aten.where.ScalarOther,
          aten.where.ScalarSelf, aten.maximum.default, aten.minimum.default,
          aten.min.other, aten.max.other,
          aten.masked_fill.Tensor, aten.eq.Tensor, aten.ne.Tensor, aten.lt.Tensor,
          aten.le.Tensor, aten.gt.Tensor, aten.ge.Tensor, aten.__and__.Tensor,
          aten.__or__.Tensor, aten.logical_and.default, aten.logical_or.default,
          aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.rsub.Tensor,
          aten.atan2.default, aten.fmod.Tensor, aten.remainder.Tensor, aten.copysign.Tensor,
          aten.addcmul.default, aten.addcdiv.default, aten.lerp.Scalar, aten.complex.default,
          aten.polar.default, operator.add, operator.mul, operator.sub]


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
            if _read_split(node, n, pos, *_first_sharded(node, ctx), ctx):
                continue
            raise Unsafe(f"{node.name}: replicated operand {n.name} {list(t.shape)} meets a "
                         f"tensor sharded on dim {d}", demand=(n, pos))
    src, lay = _first_sharded(node, ctx)
    _keep_origin(node, src, ctx)
    return lay.at(d)


@register(aten.add_.Tensor, aten.sub_.Tensor, aten.mul_.Tensor, aten.div_.Tensor)
def inplace_binary(node: fx.Node, ctx: Ctx) -> Layout:
    """In place, as written in forward (transformers' experts add their bias per expert
    with ``out.add_(bias[expert_ids])``): as the op out of place, when the tensor written
    is a sharded one (a replicated tensor cannot take a shard in place)."""
    if not ctx.of(node.args[0]).sharded:
        raise Unsafe(f"{node.name}: writes a sharded operand into a replicated tensor in place")
    return elementwise(node, ctx)


def _read_split(node: fx.Node, p: fx.Node, pos: int, src: fx.Node, lay: Layout, ctx: Ctx) -> bool:
    """Let ``node`` read ``p`` split on ``pos`` like its sharded operand ``src``, if it may
    (``_splittable_param``)."""
    if not _splittable_param(p, pos, src, lay):
        return False
    ctx.splits[node, p] = Layout("S", pos, lay.groups)
    return True


def _splittable_param(p: fx.Node, pos: int, src: fx.Node, lay: Layout) -> bool:
    """A parameter no sharded layer owns (a norm's weight), or a value made from such
    parameters alone (gpt-oss's attention sinks, ``sinks.reshape(1, -1, 1, 1).expand(..)``),
    that lines up with the sharded dim of ``src`` over its full size: the op reads this
    rank's slice of it (of a parameter itself, its group's slice too, for kv heads shared
    by groups of ranks). The parameter stays replicated; its gradient, zero outside each
    rank's slice, is summed over tp. A value made from no input and no parameter at all
    (MPT's ALiBi bias, ``arange`` times per-head slopes) is read in slices the same way; it
    has no gradient. (An activation in its place is left to the analysis: a Linear
    feeding it could be sharded instead.)"""
    t, ts = info(p), info(src)
    if lay.kind != "S" or lay.inner >= 0 or lay.outer or t is None or ts is None or \
            not 0 <= pos < len(t.shape) or t.shape[pos] != ts.shape[lay.dim]:  # (a legacy
        # empty 1-D operand of cat has no such dim)
        return False
    if p.op == "placeholder":
        return "tpc_param" in p.meta and not _sharded_layer_param(p)
    return params_alone(p) is not None or constant(p)


def _sharded_layer_param(p: fx.Node) -> bool:
    """The weight or bias of a Linear or Embedding (which may be sharded: each rank
    holds its own piece, not the whole to slice from)."""
    from .layers import layer_of
    return any((l := layer_of(u)) is not None and l.kind != "norm" and p in (l.weight, l.bias)
               for u in p.users)


def params_alone(n: fx.Node) -> set[fx.Node] | None:
    """The parameters ``n`` is computed from, if from parameters alone (through ops with a
    rule, none a layer): a cast or reshape of a weight, or its rows picked by integer
    indices (transformers' experts pick each row's bias, ``bias[expert_ids]``: integers
    carry no gradient, and replicated ones are the same on every rank). None if anything
    else feeds it."""
    from .layers import layer_of
    todo, seen, found = [n], set(), set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        if m is not n and _integers(m):
            continue
        if m.op == "placeholder":
            if "tpc_param" not in m.meta or _sharded_layer_param(m):
                return None
            found.add(m)
            continue
        if m.op != "call_function" or layer_of(m) is not None or rule_for(m) is None and \
                not is_meta_op(m) and m.target is not aten.index.Tensor:
            return None
        todo.extend(tensor_inputs(m))
    return found


def _integers(m: fx.Node) -> bool:
    """An integer (or boolean) tensor: no gradient flows through it."""
    t = info(m)
    return t is not None and not t.dtype.is_floating_point and not t.dtype.is_complex


def constant(n: fx.Node) -> bool:
    """``n`` is computed from no input, parameter or buffer (factories such as ``arange``,
    then any ops but layers and random draws; sizes read off tensors are fine): the same
    on every rank, with no gradient."""
    from .layers import layer_of
    todo, seen = [n], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        if m.op != "call_function" or layer_of(m) is not None or _random(m):
            return False
        if not is_meta_op(m):
            todo.extend(tensor_inputs(m))
    return True


def _random(n: fx.Node) -> bool:
    name = getattr(n.target, "__name__", str(n.target))
    return any(w in name for w in ("rand", "bernoulli", "normal", "uniform", "dropout",
                                   "multinomial", "exponential", "geometric", "poisson"))


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


def view_out_dim(a: tuple[int, ...], b: tuple[int, ...], d: int, tp: int, where: str,
                 layer: str | None = None, shards: int = 0) -> int:
    """The dim of ``b`` that the sharded dim ``d`` of ``a`` becomes (cut into ``shards``
    chunks, tp by default). ``layer``: the colwise layer whose output ``a`` is, which
    could instead be shared by groups of ranks when the view splits it into fewer
    groups than tp (n kv heads, n dividing tp)."""
    shards = shards or tp
    for ga, gb in view_groups(a, b):
        if d not in ga:
            continue
        if a[d] == 1 and shards == 1:  # one head, not split: a 1 kept, or merged (repeat_kv)
            ones = [k for k in gb if b[k] == 1]
            return ones[0] if len(gb) > len(ga) and ones else gb[0]
        if [k for k in ga if a[k] != 1][:1] != [d]:
            raise Unsafe(f"{where}: reshape merges the sharded dim {d} of {list(a)} under "
                         f"an outer dim; the shards would interleave")
        if len(gb) > 1 and b[gb[0]] == 1 and a[d] != 1 and gb[0] > 0:
            # view(b, s, 1, head_dim): one head. The shard would have to split that 1,
            # unless it is cut into one chunk (tp 1, or a head shared by every rank). A 1
            # in front of everything is a batch of one ([H, T, hd] -> [1, H, T, hd]).
            if shards == 1:
                return gb[0]
            raise Unsafe(f"{where}: reshape {list(a)} -> {list(b)} splits the sharded dim "
                         f"into 1 group (a single head?), which cannot be split over tp",
                         indivisible=(f"dim {gb[0]} of reshape to {list(b)}", 1),
                         group=(layer, 1) if layer and shards == tp else None)
        outer = [k for k in gb if b[k] != 1]
        if not outer:
            raise Unsafe(f"{where}: reshape drops the sharded dim")
        o = outer[0]
        if b[o] % shards:
            fits = layer is not None and shards == tp and tp % b[o] == 0
            raise Unsafe(f"{where}: reshape {list(a)} -> {list(b)} splits the sharded dim "
                         f"into {b[o]} groups (heads?), not divisible by tp = {tp}"
                         + ("" if fits or shards != tp or b[o] % tp == 0 else
                            f" and not dividing it (each head could be shared by "
                            f"tp / {b[o]} ranks if {b[o]} divided tp)"),
                         indivisible=(f"dim {o} of reshape to {list(b)}", b[o]),
                         group=(layer, b[o]) if fits else None)
        return o
    raise Unsafe(f"{where}: sharded dim {d} not found in reshape")


VIEW_LIKE = [aten.view.default, aten.reshape.default, aten._unsafe_view.default,
             aten.flatten.using_ints, aten.unflatten.int, aten.unsqueeze.default,
             aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.view_as.default,
             aten.reshape_as.default, aten.view_as_complex.default]


@register(*VIEW_LIKE)
def view(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = _first_sharded(node, ctx)
    if src is not node.args[0]:
        raise Unsafe(f"{node.name}: a view shaped after a sharded tensor")
    a, b = info(src), info(node)
    assert a is not None and b is not None
    if node.target is aten.view_as_complex.default:  # [..., d, 2] -> [..., d]
        if lay.dim >= b.rank or lay.inner >= 0:
            raise Unsafe(f"{node.name}: view_as_complex of the sharded real/imag pair")
        return lay
    if lay.inner >= 0:
        return Layout(lay.kind, _merge_groups(a.shape, b.shape, lay, node.name))
    if lay.outer:
        return _unfold(a.shape, b.shape, lay, ctx.tp, node.name)
    layer = ctx.colwise.get(src)
    if layer is not None and lay.standard and len(src.users) == 1:  # read nowhere else:
        # cut per part, each rank's values are no contiguous chunk of the whole any more
        parts = _indexed_parts(node, a.shape, b.shape, lay.dim, ctx.tp)
        if parts is not None:  # [.., 3 * E] -> [.., 3, E], then q, k, v picked by index
            _packed(node, ctx, layer, parts[1], a.shape[lay.dim])
            return lay.at(parts[0] + 1)
    folded = _fold(a.shape, b.shape, lay.dim, ctx.tp, node.name)
    if folded is not None:
        return Layout(lay.kind, folded[0], outer=folded[1])
    out = view_out_dim(a.shape, b.shape, lay.dim, ctx.tp, node.name,
                       ctx.origin_of(src), lay.shards(ctx.tp))
    if src in ctx.colwise and len(src.users) == 1 and a.shape[lay.dim] == b.shape[out]:
        ctx.colwise[node] = ctx.colwise[src]  # still the fused output (Conv1D's view back)
    return lay.at(out)


def _group_of(a: tuple[int, ...], b: tuple[int, ...], d: int) -> tuple[list[int], list[int]]:
    return next((ga, gb) for ga, gb in view_groups(a, b) if d in ga)


def _prod(xs: Iterator[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _fold(a: tuple[int, ...], b: tuple[int, ...], d: int, tp: int,
          where: str) -> tuple[int, int] | None:
    """A reshape that folds the heads of the sharded dim ``d`` into unsharded dims before
    it (``[T, B, E] -> [T, B * H, hd]``, as nn.MultiheadAttention does): (the folded
    dim, the outer factor), or None when nothing outer is merged in."""
    ga, gb = _group_of(a, b, d)
    outer_dims = [k for k in ga if k < d and a[k] != 1]
    if not outer_dims:
        return None
    nb = [k for k in gb if b[k] != 1]
    outer = _prod(a[k] for k in outer_dims)
    if any(a[k] != 1 for k in ga if k > d) or not nb or b[nb[0]] % outer:
        raise Unsafe(f"{where}: reshape {list(a)} -> {list(b)} merges the sharded dim {d} "
                     "with the dims around it; the shards would interleave")
    heads = b[nb[0]] // outer
    if heads % tp or heads * _prod(b[k] for k in nb[1:]) != a[d]:
        raise Unsafe(f"{where}: reshape {list(a)} -> {list(b)} folds {heads} heads into the "
                     f"batch, not divisible by tp = {tp}",
                     indivisible=(f"heads folded into dim {nb[0]} of reshape to {list(b)}", heads))
    return nb[0], outer


def _unfold(a: tuple[int, ...], b: tuple[int, ...], lay: Layout, tp: int, where: str) -> Layout:
    """Heads folded into the batch (``[B * H, T, hd]``) split out again (``[B, H, T, hd]``):
    a plain shard of the heads dim. A reshape that keeps the fold keeps the layout."""
    ga, gb = _group_of(a, b, lay.dim)
    nb = [k for k in gb if b[k] != 1]
    if [k for k in ga if a[k] != 1] == [lay.dim]:
        if len(nb) == 1:
            return lay.at(nb[0])  # the folded dim kept whole (a 1 added or dropped)
        seen = 1
        for i, k in enumerate(nb):
            if seen == lay.outer:
                if b[k] % tp == 0 and b[k] * _prod(b[j] for j in nb[i + 1:]) * lay.outer == a[lay.dim]:
                    return Layout(lay.kind, k)
                break
            seen *= b[k]
    raise Unsafe(f"{where}: reshape {list(a)} -> {list(b)} does not split the heads folded "
                 f"into dim {lay.dim} back out of the batch ({lay.outer})")


_MOVES = {aten.unsqueeze.default, aten.squeeze.dim, aten.transpose.int, aten.permute.default,
          aten.contiguous.default, aten.clone.default, aten.alias.default}


def _indexed_parts(node: fx.Node, a: tuple[int, ...], b: tuple[int, ...],
                   d: int, tp: int) -> tuple[int, int] | None:
    """A fused projection's output reshaped to ``[..., parts, E]`` or ``[..., parts, H,
    hd]`` whose parts are then picked by index (nn.MultiheadAttention: ``unflatten(-1,
    (3, E))``, moved to the front, ``[0]``, ``[1]``, ``[2]``; timm's ViT: ``reshape(B, N,
    3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)``): (the parts dim, the part count), or
    None. The dim after the parts (E, or the heads H) is the sharded one."""
    ga, gb = _group_of(a, b, d)
    nb = [k for k in gb if b[k] != 1]
    if [k for k in ga if a[k] != 1] != [d] or len(nb) not in (2, 3) or \
            nb != list(range(nb[0], nb[0] + len(nb))) or b[nb[0]] > 4:
        return None
    parts, pos, n = b[nb[0]], nb[0], node
    while len(n.users) == 1 and next(iter(n.users)).target in _MOVES:
        n = next(iter(n.users))
        pos = _moved(n, pos)
        if pos is None:
            return None
    picked = set()
    for u in n.users:
        if u.target is aten.select.int and norm_dim(u.args[1], len(info(n).shape)) == pos:  # type: ignore[union-attr]
            picked.add(u.args[2] % parts)
        elif u.target is aten.unbind.int and norm_dim(arg(u, 1, "dim", 0), len(info(n).shape)) == pos:  # type: ignore[union-attr]
            picked.update(range(parts))
        else:
            return None
    if picked != set(range(parts)):
        return None
    if len(nb) == 3 and b[nb[1]] % tp:
        raise Unsafe(f"{node.name}: reshape {list(a)} -> {list(b)} splits each part into "
                     f"{b[nb[1]]} heads, not divisible by tp = {tp}",
                     indivisible=(f"heads (dim {nb[1]} of reshape to {list(b)})", b[nb[1]]))
    return nb[0], parts


def _moved(n: fx.Node, pos: int) -> int | None:
    """Where dim ``pos`` of ``n``'s input is in ``n``'s output (None: squeezed away)."""
    rank = len(info(n.args[0]).shape)  # type: ignore[union-attr]
    if n.target is aten.unsqueeze.default:
        return pos + (1 if norm_dim(n.args[1], rank + 1) <= pos else 0)
    if n.target is aten.squeeze.dim:
        s = norm_dim(n.args[1], rank)
        return None if s == pos else pos - (1 if s < pos else 0)
    if n.target is aten.transpose.int:
        d0, d1 = norm_dim(n.args[1], rank), norm_dim(n.args[2], rank)
        return d1 if pos == d0 else d0 if pos == d1 else pos
    if n.target is aten.permute.default:
        return [norm_dim(x, rank) for x in n.args[1]].index(pos)
    return pos


def _merge_groups(a: tuple[int, ...], b: tuple[int, ...], lay: Layout, where: str) -> int:
    """kv heads expanded to their q heads (``[b, n_kv, n_rep, s, hd]``, dim ``n_kv`` in
    groups, ``n_rep`` the inner dim) merged into one heads dim: the merged dim holds
    chunk r of tp on rank r, a plain shard."""
    for ga, gb in view_groups(a, b):
        if lay.dim in ga:
            if [k for k in ga if a[k] != 1 or k == lay.dim] == [lay.dim, lay.inner] and \
                    len([k for k in gb if b[k] != 1]) == 1:
                return next(k for k in gb if b[k] != 1)
            break
    raise Unsafe(f"{where}: reshape {list(a)} -> {list(b)} does not merge the kv heads "
                 f"(dim {lay.dim}) with their repeats (dim {lay.inner})")


@register(aten.transpose.int, aten.permute.default, aten.t.default, aten.swapaxes.default,
          aten.movedim.int, aten.numpy_T.default, aten.mT.default)
def transpose(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = _first_sharded(node, ctx)
    rank = info(src).rank  # type: ignore[union-attr]
    d = lay.dim
    perm = list(range(rank))
    if node.target in (aten.t.default, aten.mT.default, aten.numpy_T.default):
        perm[-1], perm[-2] = perm[-2], perm[-1]
        if node.target is aten.numpy_T.default:
            perm = perm[::-1]
    elif node.target in (aten.transpose.int, aten.swapaxes.default):
        d0, d1 = norm_dim(node.args[1], rank), norm_dim(node.args[2], rank)
        perm[d0], perm[d1] = d1, d0
    elif node.target is aten.movedim.int:
        s0, d1 = norm_dim(node.args[1], rank), norm_dim(node.args[2], rank)
        perm.remove(s0)
        perm.insert(d1, s0)
    else:
        perm = [norm_dim(x, rank) for x in node.args[1]]
    return lay.at(perm.index(d))


@register(aten.expand.default, aten.expand_as.default)
def expand(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = _first_sharded(node, ctx)
    if src is not node.args[0]:
        raise Unsafe(f"{node.name}: expand shaped after a sharded tensor")
    a, b = info(src), info(node)
    o = lay.dim + b.rank - a.rank  # type: ignore[union-attr]
    if a.shape[lay.dim] != b.shape[o]:  # type: ignore[union-attr]
        raise Unsafe(f"{node.name}: expand broadcasts the sharded dim")
    if lay.groups and lay.inner < 0 and lay.dim + 1 < a.rank and a.shape[lay.dim + 1] == 1 and \
            b.shape[o + 1] % (ctx.tp // lay.groups) == 0:  # type: ignore[union-attr]
        # repeat_kv: [b, n_kv, 1, s, hd] -> [b, n_kv, n_rep, s, hd]; rank r keeps the
        # repeats of its own q heads, chunk r % (tp / n_kv) of n_rep
        return Layout(lay.kind, o, lay.groups, o + 1)
    return lay.at(o)


@register(aten.slice.Tensor)
def slice_(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = node.args[0], ctx.of(node.args[0])
    rank = info(src).rank  # type: ignore[union-attr]
    d = norm_dim(arg(node, 1, "dim", 0), rank)
    if d == lay.dim:
        start, end, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
        full = info(src).shape[d]  # type: ignore[union-attr]
        if (start in (None, 0)) and (end is None or (isinstance(end, int) and end >= full)) \
                and step in (None, 1):
            return lay
        if isinstance(step, int) and step > 1 and (start is None or isinstance(start, int) and
                                                   0 <= start < step) and \
                (end is None or isinstance(end, int) and end >= full) and lay.standard:
            # every step-th element from the start (gpt-oss's gate_up[..., ::2] and [..., 1::2],
            # gate and up interleaved): each rank's block, starting at a multiple of step,
            # picks its own elements, the same slice locally
            if (full // ctx.tp) % step:
                raise Unsafe(f"{node.name}: takes every {step}th element of the sharded dim "
                             f"{d}, whose {full // ctx.tp} per rank is no multiple of {step}",
                             indivisible=("interleaved features per rank", full // ctx.tp))
            return lay
        parts = _sliced_parts(src, d, full)
        layer = ctx.colwise.get(src)
        if layer is None or parts is None:
            raise Unsafe(f"{node.name}: slices the sharded dim {d}" + (
                f" of {layer} into unequal parts (q larger than k and v under GQA): no "
                "DTensor placement holds a slice of each of unequal parts" if layer else ""))
        return _packed(node, ctx, layer, parts, full)
    return lay


def slice_bounds(node: fx.Node, full: int) -> tuple[int, int] | None:
    """(start, end) of a step-1 slice with constant bounds, clamped to ``full``."""
    start, end, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
    start = 0 if start is None else start
    end = full if end is None else end
    if not (isinstance(start, int) and isinstance(end, int)) or step not in (None, 1):
        return None
    start, end = (x + full if x < 0 else x for x in (start, end))
    return max(0, min(start, full)), max(0, min(end, full))


def _sliced_parts(src: fx.Node, d: int, full: int) -> int | None:
    """A fused projection cut by slices (Phi-3's ``qkv[..., :q]``, ``[..., q:q+k]``, ...):
    the number of parts if every use of ``src`` is a constant slice on ``d`` and the
    slices cut ``[0, full)`` into equal parts; else None."""
    cuts = {0, full}
    for user in src.users:
        if user.target is not aten.slice.Tensor or \
                norm_dim(arg(user, 1, "dim", 0), info(src).rank) != d:  # type: ignore[union-attr]
            return None
        bounds = slice_bounds(user, full)
        if bounds is None:
            return None
        cuts.update(bounds)
    edges = sorted(cuts)
    gaps = {b - a for a, b in zip(edges, edges[1:])}
    return len(edges) - 1 if len(gaps) == 1 and len(edges) > 2 else None


def _packed(node: fx.Node, ctx: Ctx, layer: str, parts: int, full: int) -> Layout:
    """``layer``'s colwise output cut into ``parts`` equal parts: each rank holds its
    slice of every part (a ``_StridedShard`` weight), so the cut stays local."""
    if not ctx.of(node.args[0]).standard:
        raise Unsafe(f"{node.name}: a fused projection with fewer kv heads than tp")
    if not PACKING["enabled"]:
        raise Unsafe(f"{node.name}: a fused projection (split into {parts} parts) is "
                     "sharded per part only without FSDP2 (a 1-D mesh) for now")
    if (full // parts) % ctx.tp:
        raise Unsafe(f"{node.name}: a part of the fused projection has {full // parts} "
                     f"features, not divisible by tp = {ctx.tp}",
                     indivisible=("part size", full // parts))
    ctx.packed[layer] = parts  # q|k|v or gate|up: each rank holds its slice of each part
    return ctx.of(node.args[0])


@register(aten.select.int)
def select(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = node.args[0], ctx.of(node.args[0])
    d = norm_dim(node.args[1], info(src).rank)  # type: ignore[union-attr]
    if d == lay.dim:
        raise Unsafe(f"{node.name}: indexes into the sharded dim {d}")
    return lay.at(lay.dim - (1 if d < lay.dim else 0))


@register(operator.getitem)
def getitem(node: fx.Node, ctx: Ctx) -> Layout:
    """An element of a tuple (split/chunk/unbind output): the tuple's layout."""
    return ctx.of(node.args[0])


def _dim_arg(node: fx.Node, i: int, rank: int, name: str = "dim") -> int | None:
    d = arg(node, i, name)
    return None if d is None else norm_dim(d, rank)


@register(aten._softmax.default, aten.softmax.int, aten._log_softmax.default,
          aten.log_softmax.int, aten.cumsum.default, aten.cumprod.default,
          aten.logcumsumexp.default)
def softmax(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = _first_sharded(node, ctx)
    if _dim_arg(node, 1, info(src).rank) == lay.dim:  # type: ignore[union-attr]
        raise Unsafe(f"{node.name}: {name(node)} over the sharded dim")
    return lay


# reductions over the sharded dim that leave each rank a term of the value (``P``). The
# rewrite scales the local result: a mean by 1 / tp; a sum by groups / tp, where each of
# ``groups`` chunks is held by tp / groups ranks (1 for the usual tp chunks)
PARTIAL_REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList)


@register(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
          aten.var.correction, aten.std.correction, aten.var.dim, aten.std.dim,
          aten.logsumexp.default, aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default,
          aten.prod.dim_int, aten.max.dim, aten.min.dim, aten.any.dim, aten.all.dim,
          aten.argmax.default, aten.argmin.default)
def reduction(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = _first_sharded(node, ctx)
    rank = info(src).rank  # type: ignore[union-attr]
    pos = 2 if node.target in (aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default) else 1
    dims = arg(node, pos, "dim")
    if dims is None or dims == []:
        raise Unsafe(f"{node.name}: reduces over every dim, including the sharded one")
    dims = [norm_dim(x, rank) for x in (dims if isinstance(dims, (tuple, list)) else [dims])]
    if lay.dim in dims:
        if node.target in PARTIAL_REDUCTIONS and lay.kind == "S" and lay.inner < 0 and \
                not lay.outer and (not lay.groups or info(node).dtype.is_floating_point):  # type: ignore[union-attr]
            # (an integer sum over a dim shared by groups would need a fractional share)
            return P  # each rank's term; all-reduced where first read
        raise Unsafe(f"{node.name}: reduces over the sharded dim {lay.dim}")
    keep = arg(node, pos + 1, "keepdim", False)
    return lay.at(lay.dim if keep else lay.dim - sum(1 for x in dims if x < lay.dim))


@register(aten.layer_norm.default, aten.rms_norm.default)
def norm(node: fx.Node, ctx: Ctx) -> Layout:
    """A norm over trailing dims the shard is not in (a per-head q/k LayerNorm over
    head_dim on a tensor sharded by heads): per row, as elementwise ops are. Its weight
    and bias, replicated, meet each rank's rows only: their gradients are summed over tp
    (the E layout, as every replicated operand of a sharded op).

    A norm over dims the shard is in (OLMo's q/k norms over the whole projection) runs on
    each rank's slice with its statistics summed over tp (``sharded_norm`` in the rewrite);
    its weight and bias are read in slices like the activation's."""
    src, lay = node.args[0], ctx.of(node.args[0])
    if not lay.sharded or src is not _first_sharded(node, ctx)[0]:
        raise Unsafe(f"{node.name}: {name(node)} with a sharded weight")
    rank, normalized = info(src).rank, len(node.args[1])  # type: ignore[union-attr]
    if lay.dim >= rank - normalized:
        params = [p for p in node.args[2:4 if node.target is aten.layer_norm.default else 3]
                  if isinstance(p, fx.Node)]
        pos = lay.dim - (rank - normalized)
        if lay.kind != "S" or lay.inner >= 0 or lay.outer or \
                not all(_splittable_param(p, pos, src, lay) for p in params):
            raise Unsafe(f"{node.name}: {name(node)} normalizes over the sharded dim {lay.dim}")
        for p in params:
            _read_split(node, p, pos, src, lay, ctx)
    _keep_origin(node, src, ctx)
    return lay


def sharded_norm_dims(node: fx.Node, lay: Layout) -> bool:
    """Whether a layer_norm / rms_norm normalizes over its input's sharded dim."""
    t = info(node.args[0])
    return lay.sharded and t is not None and lay.dim >= t.rank - len(node.args[1])  # type: ignore[arg-type]


@register(aten.matmul.default, aten.bmm.default)
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
        return la.at(to.rank - 2)  # type: ignore[union-attr]
    if lb.sharded and lb.dim == tb.rank - 1:
        if la.sharded:
            raise Unsafe(f"{node.name}: matmul with both operands sharded on different dims")
        return lb.at(to.rank - 1)  # type: ignore[union-attr]
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
    return lay.at(d)


@register(aten.scaled_dot_product_attention.default)
def sdpa(node: fx.Node, ctx: Ctx) -> Layout:
    qkv = [node.args[i] for i in range(3)]
    rank = info(qkv[0]).rank  # type: ignore[union-attr]
    heads = rank - 3
    if rank < 3:
        raise Unsafe(f"{node.name}: attention without a heads dim")
    gqa = node.kwargs.get("enable_gqa", False)
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
    q, k, v = (ctx.of(n) for n in qkv)
    # enable_gqa pairs local q head i with local kv head i // (local q / local kv heads),
    # right for kv heads cut into tp chunks and for kv heads shared by groups of ranks
    if k != v or not q.standard or (k != q and not gqa) or k.inner >= 0:
        raise Unsafe(f"{node.name}: q, k and v spread differently over tp ({q}, {k}, {v})")
    mask = arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node) and not ctx.of(mask).sharded:
        t = info(mask)
        pos = heads - (rank - t.rank)  # type: ignore[union-attr]
        if pos >= 0 and t.shape[pos] != 1:  # type: ignore[union-attr]
            raise Unsafe(f"{node.name}: per-head attention mask must be sharded",
                         demand=(mask, pos))
    return q


@register(aten.cat.default, aten.stack.default, aten.concat.default, aten.hstack.default)
def cat(node: fx.Node, ctx: Ctx) -> Layout:
    parts = list(node.args[0])
    rank = info(parts[0]).rank  # type: ignore[union-attr]
    is_stack = node.target is aten.stack.default
    d = _dim_arg(node, 1, rank + (1 if is_stack else 0)) or 0
    if node.target is aten.hstack.default:
        d = 1 if rank > 1 else 0
    lays = [ctx.of(p) for p in parts]
    sh = {l.dim for l in lays if l.sharded}
    if len(sh) != 1:
        raise Unsafe(f"{node.name}: parts sharded on different dims")
    s = sh.pop()
    for p, l in zip(parts, lays):
        if not l.sharded:
            src, lay = next((q, m) for q, m in zip(parts, lays) if m.sharded)
            if _read_split(node, p, s - (rank - info(p).rank), src, lay, ctx):  # type: ignore[union-attr]
                continue
            raise Unsafe(f"{node.name}: concatenates a replicated part", demand=(p, s))
    if not is_stack and d == s:
        raise Unsafe(f"{node.name}: concatenates along the sharded dim")
    return lays[0].at(s + 1 if is_stack and d <= s else s)


@register(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
          aten.unbind.int, aten.tensor_split.sections)
def split(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = node.args[0], ctx.of(node.args[0])
    rank = info(src).rank  # type: ignore[union-attr]
    unbind = node.target is aten.unbind.int
    d = _dim_arg(node, 1 if unbind else 2, rank) or 0
    if d == lay.dim:
        parts = _equal_parts(node, info(src).shape[d])  # type: ignore[union-attr]
        layer = ctx.colwise.get(src)
        if layer is not None and parts is not None and not PACKING["enabled"]:
            raise Unsafe(f"{node.name}: a fused projection (split into {parts} parts) is "
                         "sharded per part only without FSDP2 (a 1-D mesh) for now")
        if layer is not None and parts is None and len(src.users) == 1:
            sizes = node.args[1] if node.target is aten.split_with_sizes.default else None
            raise Unsafe(f"{node.name}: splits the output of {layer} into unequal parts"
                         + (f" {list(sizes)} (a fused q/k/v under GQA, q larger than k and "
                            "v; or a latent beside a rope key, as in MLA)"
                            if sizes is not None else "") +
                         ": no DTensor placement holds a slice of each of unequal parts "
                         "(separate Linears per part, or equal parts, would be sharded)")
        if layer is None or parts is None or len(src.users) != 1:
            raise Unsafe(f"{node.name}: splits the sharded dim into unequal parts or after "
                         "other ops (a fused projection tpcompile cannot shard per part)")
        return _packed(node, ctx, layer, parts, info(src).shape[d])  # type: ignore[union-attr]
    return lay.at(lay.dim - 1 if unbind and d < lay.dim else lay.dim)


# Fused projections sharded per part need a strided placement (``_StridedShard``); under
# FSDP2 with a param_dtype (mixed precision) auto_parallelize turns packing off (the
# bias FSDP2 cannot shard again would not be cast).
PACKING = {"enabled": True}


@contextlib.contextmanager
def toggled(flag: dict[str, bool], enabled: bool) -> Iterator[None]:
    """``flag["enabled"]`` set to ``enabled`` for the duration (a module-level switch)."""
    old = flag["enabled"]
    flag["enabled"] = enabled
    try:
        yield
    finally:
        flag["enabled"] = old


def packing(enabled: bool) -> contextlib.AbstractContextManager[None]:
    return toggled(PACKING, enabled)


def _equal_parts(node: fx.Node, size: int) -> int | None:
    """The number of parts when a split cuts ``size`` into equal parts, else None."""
    if node.target is aten.chunk.default:
        n = node.args[1]
        return n if size % n == 0 else None
    if node.target is aten.split.Tensor:
        step = node.args[1]
        return size // step if isinstance(step, int) and size % step == 0 else None
    if node.target is aten.split_with_sizes.default:
        sizes = list(node.args[1])
        return len(sizes) if len(set(sizes)) == 1 else None
    return None


@register(aten.repeat_interleave.self_int)
def repeat_interleave(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = _first_sharded(node, ctx)
    d = arg(node, 2, "dim")
    if d is None:
        raise Unsafe(f"{node.name}: repeat_interleave without a dim flattens the tensor")
    if lay.groups and norm_dim(d, info(src).rank) == lay.dim:  # type: ignore[union-attr]
        # kv heads shared by groups of ranks, repeated to q heads: each rank makes only
        # its own q heads' copies (repeats / (tp / n_kv)), a plain shard after
        reps = arg(node, 1, "repeats")
        if not isinstance(reps, int) or reps % (ctx.tp // lay.groups):
            raise Unsafe(f"{node.name}: repeat_interleave of kv heads shared by groups of "
                         f"ranks, {reps} repeats not divisible by {ctx.tp // lay.groups}")
        return Layout(lay.kind, lay.dim)
    return lay


@register(aten.triu.default, aten.tril.default)
def triangle(node: fx.Node, ctx: Ctx) -> Layout:
    src, lay = _first_sharded(node, ctx)
    if lay.dim >= info(src).rank - 2:  # type: ignore[union-attr]
        raise Unsafe(f"{node.name}: {name(node)} over the sharded dim")
    return lay


@register(aten.cross_entropy_loss.default)
def cross_entropy(node: fx.Node, ctx: Ctx) -> Layout:
    """Class scores sharded on their class dim (a colwise head's logits): the rewrite
    computes the loss vocab-parallel (each rank its classes' log-sum-exp and target logit,
    one small all-gather of those per row), so the loss is whole on every rank and the
    logits are never gathered for it. Class-index targets only, without class weights."""
    if not VOCAB_LOSS["enabled"]:
        raise Unsafe(f"{node.name}: vocab-parallel losses turned off")
    x, target = node.args[0], node.args[1]
    lay, tx, tt = ctx.of(x), info(x), info(target)
    if tx is None or tt is None or tx.rank < 2 or lay.kind != "S" or lay.dim != 1 or \
            not lay.standard or ctx.of(target).sharded:
        raise Unsafe(f"{node.name}: cross_entropy on scores sharded on dim {lay.dim}, not "
                     "their class dim")
    if tt.dtype.is_floating_point:
        raise Unsafe(f"{node.name}: cross_entropy with class-probability targets over "
                     "sharded classes")
    if arg(node, 2, "weight") is not None:
        raise Unsafe(f"{node.name}: cross_entropy with class weights over sharded classes")
    return R


# The rule above on (default) or off (``vocab_losses(False)`` around auto_parallelize: the
# logits are gathered for the loss, as before; bench/hf_tp.py measures the difference).
VOCAB_LOSS = {"enabled": True}


def vocab_losses(enabled: bool) -> contextlib.AbstractContextManager[None]:
    return toggled(VOCAB_LOSS, enabled)


# ops whose rule takes scores sharded on their classes to a whole loss (the rewrite runs
# them vocab-parallel): a segment may end in one, as in a rowwise Linear or an output
LOSSES = {aten.cross_entropy_loss.default}


# Ops that never receive a sharded tensor in any segment tpcompile builds: they make new
# tensors, compute losses or index arithmetic. Listed so the table is explicit about them;
# a sharded input reaching one is refused like any op without a rule.
REPLICATED_ONLY = {
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.full.default,
    aten.ones.default, aten.zeros.default, aten.empty.memory_format, aten.scalar_tensor.default,
    aten.tensor.default, aten.linspace.default, aten.rand.default,
    aten.randn.default, aten.randint.low, aten.embedding.default, aten.linear.default,
    aten.group_norm.default,
    aten.nll_loss_nd.default, aten.nll_loss.default,
    aten.mse_loss.default, aten.binary_cross_entropy_with_logits.default,
    aten.index.Tensor, aten.index_select.default, aten.gather.default, aten.diff.default,
    aten.pad.default, aten.constant_pad_nd.default, aten.one_hot.default,
    aten.sort.default, aten.topk.default, aten.masked_select.default, aten.nonzero.default,
    aten.item.default, aten._local_scalar_dense.default, aten.outer.default, aten.mm.default,
    aten.addmm.default, aten.baddbmm.default, aten.einsum.default, aten.conv1d.default,
    aten.conv2d.default, aten.max_pool2d.default, aten.avg_pool2d.default,
    aten.adaptive_avg_pool2d.default, aten.batch_norm.default, aten.repeat.default,
    aten.flip.default, aten.roll.default, aten.index_put.default, aten.scatter.src,
    aten.scatter_add.default, aten.bucketize.Tensor, aten.searchsorted.Tensor,
    aten.unfold.default, aten.as_strided.default, aten.numel.default, aten.dim.default,
    aten.is_nonzero.default, aten.sum.default, aten.mean.default, aten.max.default,
    aten.min.default, aten.any.default, aten.all.default, aten.lift_fresh.default,
    aten.dot.default, aten.vdot.default, aten.tile.default, aten.broadcast_to.default,
}


def has_rule(target: Any) -> bool:
    """Whether the table states what happens to ``target`` (a rule or replicated-only)."""
    return target in RULES or target in REPLICATED_ONLY or target in META_OPS


def is_passable(node: fx.Node) -> bool:
    """Ops a segment may pass through (used to find candidate colwise entries)."""
    return rule_for(node) is not None or is_meta_op(node)


# ops whose explicit size arguments must be made local when the output is sharded
SIZED = {aten.view.default: 1, aten.reshape.default: 1, aten._unsafe_view.default: 1,
         aten.expand.default: 1, aten.unflatten.int: 2}
# splits whose sizes are divided by tp when they cut the sharded dim (a fused projection)
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}


__all__ = ["Layout", "R", "E", "S", "Q", "Unsafe", "Ctx", "rule_for", "info", "tensor_inputs",
           "is_meta_op", "is_passable", "has_rule", "SIZED", "REPLICATED_ONLY"]
