"""Stage 4: rewrite a traced ATen graph into an SPMD program on local shards.

The new graph computes on plain local tensors. It reads each parameter through the
live module (``self.self_attn.q_proj.weight``), takes its local shard (``p.to_local()``),
and calls the conversions of :mod:`tpcompile.rewrite.collectives` where a producer's layout
differs from what its consumer needs. The program is a function of the traced module's
flattened inputs; :mod:`tpcompile.runtime.program` binds it as the ``forward`` of the original
module objects, so parameter names, ``state_dict`` keys and module hooks (FSDP2's
included) stay exactly the user's.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from ..analysis import ops
from ..analysis.layers import EXPERT_KINDS, LINEAR_KINDS, NORM_OPS, Contract, Propagation, is_block, layer_of, where
from ..analysis.layout import Layout, R, info
from ..errors import PlanError
from ..frontend.blocks import TensorInfo
from ..frontend.export import Traced
from ..planning.value import placement
from . import collectives as C
from .loss import vocab_cross_entropy
from .overlap import OVERLAP, overlap_input_grads

aten = torch.ops.aten


@dataclass
class Rewritten:
    graph: fx.Graph
    forward: Callable  # unbound: forward(self, *flat_inputs) -> tuple of outputs
    code: str


@dataclass(frozen=True)
class Site:
    """Why a collective node is in the rewritten graph (``node.meta["tpc_site"]``): the
    layer or edge it serves, and the full (logical) tensor it moves."""

    at: str
    why: str
    tensor: TensorInfo
    src: str | None = None  # the original graph's node names of the edge, if any
    dst: str | None = None


_WHY = {
    ("R", "E"): "input of colwise layers: gradient summed over tp",
    ("Q", "E"): "sequence-parallel input of colwise layers",
    ("S", "R"): "sharded tensor read replicated",
    ("Q", "R"): "sequence-sharded tensor read replicated",
    ("R", "S"): "replicated tensor split (gradient gathered)",
    ("R", "Q"): "replicated tensor split on the sequence",
    ("P", "R"): "terms of a sum over the sharded dim, added up",
    ("P", "E"): "terms of a sum over the sharded dim, added up (gradient summed over tp)",
    ("P", "Q"): "terms of a sum over the sharded dim, added up into sequence shards",
}


def _conversion(x: fx.Node, src: Layout, dst: Layout, g: fx.Graph, group: str) -> fx.Node:
    if not (src.standard and dst.standard):  # the analysis keeps these inside a segment
        raise PlanError(f"no conversion from {src} to {dst} (kv heads shared by groups of ranks)")
    k = (src.kind, dst.kind)
    if k == ("R", "E"):
        return g.call_function(C.enter, (x, group))
    if k == ("P", "R"):
        return g.call_function(C.all_reduce, (x, group))
    if k == ("P", "E"):
        return g.call_function(C.add_terms, (x, group))
    if k == ("P", "Q"):  # read by a sequence-parallel op: summed and scattered; in backward
        return g.call_function(C.reduce_scatter, (x, dst.dim, group))  # the gradient gathered
    if k == ("Q", "E"):
        return g.call_function(C.sp_gather, (x, src.dim, group))
    if src.sharded and dst.kind == "R":
        return g.call_function(C.gather, (x, src.dim, group))
    if src.kind == "R" and dst.sharded:
        return g.call_function(C.split, (x, dst.dim, group))
    raise PlanError(f"no conversion from {src} to {dst}")


# ops that draw random numbers: on a sharded tensor every rank draws its own
RANDOM = {aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default,
          aten.alpha_dropout.default, aten.feature_alpha_dropout.default, aten.bernoulli.p,
          aten.rand_like.default, aten.randn_like.default}
DROPOUTS = {aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default,
            aten.alpha_dropout.default, aten.feature_alpha_dropout.default}  # (x, p, train)
META_DEVICE = torch.device("meta")


def _draws_random(n: fx.Node) -> bool:
    if n.target is aten.scaled_dot_product_attention.default:
        p = n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)
        return p != 0.0
    if n.target in DROPOUTS and isinstance(n.args[1], (int, float)) and n.args[1] == 0:
        return False  # p = 0 draws nothing that matters (and compiles without an RNG)
    return n.target in RANDOM


class _Builder:
    def __init__(self, t: Traced, prop: Propagation, styles: dict[str, str],
                 q_nodes: set[fx.Node], tp: int, group: str, contracts: dict[fx.Node, Contract],
                 loss_parallel: bool = False):
        self.t, self.gm, self.prop, self.styles, self.q = t, t.gm, prop, styles, q_nodes
        self.tp, self.group, self.contracts = tp, group, contracts
        self.g = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.conv: dict[tuple[fx.Node, Layout], fx.Node] = {}
        self.loss_parallel = loss_parallel
        self.gathered: dict[fx.Node, fx.Node] = {}
        self.device: fx.Node | None = None
        self.owner: dict[fx.Node, set[fx.Node]] = {}  # sharded param -> the layers using it
        # replicated parameters some op reads a slice of (``ops.Ctx.splits``)
        self.split_params = {p for needs in prop.need.values() for p, want in needs.items()
                             if p in t.params and want.kind == "S"}
        for n in self.gm.graph.nodes:
            layer = layer_of(n)
            if layer is not None and self._placement(layer.weight) is not None:
                self.owner.setdefault(layer.weight, set()).add(n)
                if layer.view is not None:  # experts: read through the transpose
                    self.owner[layer.weight].add(layer.view)
                if layer.bias is not None and self._placement(layer.bias) is not None:
                    self.owner.setdefault(layer.bias, set()).add(n)

    def _placement(self, p: fx.Node) -> Any:
        return read_placement(p, self.styles, self.prop)

    # -- parameters: read once at the top; replicated ones feeding Q ops get synced grads
    def _inputs(self) -> None:
        t, g = self.t, self.g
        for ph in t.inputs:
            self.env[ph] = g.placeholder(ph.name)
        sync: list[fx.Node] = []
        names = tuple(t.params.values())
        shards = g.call_function(C.locals_of, (names, *[g.get_attr(f) for f in names]))
        for i, (ph, fqn) in enumerate(t.params.items()):
            self.env[ph] = g.call_function(operator.getitem, (shards, i))
            if self._placement(ph) is None and self._partial_reads_only(ph):
                sync.append(ph)
        for ph, fqn in t.buffers.items():
            self.env[ph] = g.get_attr(fqn)
        for ph, name in t.consts.items():
            value = t.ep.constants[name]
            if isinstance(value, torch.Tensor) and value.is_meta:
                raise PlanError(f"the traced graph holds a constant tensor {name} made on the "
                                "meta device, whose values are unknown; make it on a real "
                                "device or register it as a buffer")
            self.env[ph] = g.call_function(C.constant, (C.keep_constant(value), self._device()))
        self.synced = set(sync)
        if sync:
            out = g.call_function(C.sync_grads, (self.group, *[self.env[p] for p in sync]))
            shapes = [info(p) for p in sync]
            out.meta["tpc_site"] = Site(
                ", ".join(t.params[p] for p in sync),
                "gradients of replicated parameters used on sequence shards, by heads "
                "shared by groups of ranks, or read in slices",
                TensorInfo((sum(_numel(s.shape) for s in shapes),), shapes[0].dtype, True))  # type: ignore[union-attr]
            for i, p in enumerate(sync):
                self.env[p] = g.call_function(operator.getitem, (out, i))

    def _partial_reads_only(self, p: fx.Node) -> bool:
        """A replicated parameter whose every read leaves each rank part of its gradient:
        on sequence shards (a norm's weight under SP), by a layer shared by groups of
        ranks, or in slices (a norm's weight over a sharded projection). Its whole
        gradient is summed over tp, in one bucket with the others'. A parameter also read
        whole (its gradient from that read complete on every rank) is not: each partial
        read then sums its own gradient (``enter``)."""
        reads = [u for u in p.users if not ops.is_meta_op(u)]
        return bool(reads) and all(
            u in self.q or
            (l := layer_of(u)) is not None and l.name in self.prop.grouped and p in (l.weight, l.bias) or
            p in self.split_params and self.prop.need.get(u, {}).get(p, R).kind == "S"
            for u in reads)

    def _entered(self, p: fx.Node, v: fx.Node, at: str) -> fx.Node:
        """A replicated parameter read here for part of its gradient, summed over tp by
        this read (it is read whole elsewhere, so not in the bucket)."""
        out = self.g.call_function(C.enter, (v, self.group))
        out.meta["tpc_site"] = Site(at, "replicated, read in part here: gradient summed over "
                                    "tp", info(p), p.name)  # type: ignore[arg-type]
        return out

    def _device(self) -> fx.Node:
        """The device the program runs on, read at run time off a parameter or an input."""
        if self.device is None:
            first = next(iter(self.t.params), None) or next(
                (p for p in self.t.inputs if p.meta.get("tpc") is not None), None)
            if first is None:
                raise PlanError("a traced module with neither parameters nor tensor inputs "
                                "creates tensors; tpcompile cannot tell their device")
            self.device = self.g.call_function(C.device_of, (self.env[first],))
        return self.device

    # -- values with conversions
    def value(self, p: fx.Node, consumer: fx.Node) -> Any:
        v = self.env[p]
        if p in self.owner and consumer not in self.owner[p]:
            return self._direct_read(p)
        if not isinstance(v, fx.Node) or p.meta.get("tpc") is None:
            return v
        src = self.prop.layouts.get(p, R)
        dst = self.prop.need.get(consumer, {}).get(p, R)
        if p in self.t.params and consumer in self.q and dst.kind == "R" and \
                p not in self.synced:  # read on this rank's tokens: a partial gradient
            dst = Layout("E")
        if src == dst:
            return v
        key = (p, dst)
        if key not in self.conv and src.kind == "R" and dst.kind == "S" and (
                p in self.split_params or not dst.standard):
            # a replicated parameter (or a value made from parameters alone, read by kv
            # heads shared by groups of ranks): this rank's (group's) rows, the gradient of
            # this read, zero outside them, summed over tp; of a parameter whose whole
            # gradient is summed already (read on sequence shards too), the rows alone
            if p not in self.synced:
                v = self._entered(p, v, f"{p.name} -> {where(consumer)}")
            self.conv[key] = self.g.call_function(
                C.group_chunk, (v, dst.dim, dst.shards(self.tp), self.group))
        if key not in self.conv:
            node = _conversion(v, src, dst, self.g, self.group)
            node.meta["tpc_site"] = Site(f"{p.name} -> {where(consumer)}", _WHY[(src.kind, dst.kind)],
                                         info(p), p.name, consumer.name)  # type: ignore[arg-type]
            self.conv[key] = node
        return self.conv[key]

    def args(self, node: fx.Node) -> tuple[Any, Any]:
        f = lambda p: self.value(p, node)  # noqa: E731
        a, k = map_arg(node.args, f), map_arg(node.kwargs, f)
        return self._on_device(a), self._on_device(k)

    def _on_device(self, x: Any) -> Any:
        """The trace ran on meta: a device argument becomes the program's runtime device."""
        if isinstance(x, torch.device) and x == META_DEVICE:
            return self._device()
        if isinstance(x, tuple):
            return tuple(self._on_device(v) for v in x)
        if isinstance(x, list):
            return [self._on_device(v) for v in x]
        if isinstance(x, dict):
            return {k: self._on_device(v) for k, v in x.items()}
        return x

    # -- the walk
    def build(self) -> fx.Graph:
        self._inputs()
        # rowwise experts whose partial sums are reduced further on: where -> whose
        reduce_at = {point: layer_of(n).name for n, (point, _) in self.prop.deferred.items()}  # type: ignore[union-attr]
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                continue
            self.env[n] = self._node(n)
            if n in reduce_at:
                self.env[n] = self._reduce(n, reduce_at[n], self.env[n])
        return self.g

    def _node(self, n: fx.Node) -> Any:
        g = self.g
        if n.op == "output":
            return self._output(n)
        if n.op == "get_attr":  # a subgraph of a higher-order op (a no_grad region)
            return g.call_function(C.kept, (C.keep_constant(getattr(self.gm, str(n.target))),))
        if n.target is aten._assert_tensor_metadata.default:
            return None  # a dtype/device assertion of the trace; shapes are local now
        layer = layer_of(n)
        if layer is not None and layer.kind in EXPERT_KINDS:
            return self._experts(n, layer)
        if layer is not None and layer.kind in LINEAR_KINDS:
            return self._linear(n, layer)
        if layer is not None and layer.kind == "embedding" and \
                self.styles.get(layer.name) == "vocab_parallel":
            ids, w = self.value(n.args[1], n), self.env[layer.weight]
            padding = layer.options[0]
            return self._reduce(n, layer.name, g.call_function(
                C.vocab_embedding, (ids, w, self.group, padding)))
        if is_block(n):
            return self._block(n)
        src_lay = self._sharded_input(n)
        if src_lay is not None and ops.is_meta_op(n):
            return self._meta(n, src_lay)
        lay = self.prop.layouts.get(n, R)
        if lay.sharded and _draws_random(n):  # each rank's shard its own mask
            a, k = self.args(n)
            return g.call_function(C.on_rank_rng, (C.keep_constant(n.target), self.group, *a), k)
        if n.target in ops.LOSSES and src_lay is not None:
            return self._loss(n)
        if lay.kind == "P":
            return self._term(n)
        if n.target in NORM_OPS and ops.sharded_norm_dims(n, self.prop.layouts.get(n.args[0], R)):
            return self._sharded_norm(n)
        if lay.kind == "S" and n.target in ops.SIZED:
            return self._sized(n, lay)
        if n.target is aten.repeat_interleave.self_int and src_lay is not None and \
                src_lay.groups and lay.standard:  # kv heads shared by groups: own copies only
            a, k = self.args(n)
            reps = ops.arg(n, 1, "repeats") // (self.tp // src_lay.groups)
            return g.create_node(n.op, n.target, (a[0], reps, *a[2:]), k, n.name)
        if lay.kind == "S" and n.target in ops.SPLITS and \
                ops.norm_dim(ops.arg(n, 2, "dim", 0), info(n.args[0]).rank) == lay.dim:  # type: ignore[union-attr]
            a, k = self.args(n)
            sizes = a[1] // self.tp if isinstance(a[1], int) else [x // self.tp for x in a[1]]
            return g.create_node(n.op, n.target, (a[0], sizes, *a[2:]), k, n.name)
        if lay.kind == "S" and n.target is aten.slice.Tensor and \
                ops.norm_dim(ops.arg(n, 1, "dim", 0), info(n.args[0]).rank) == lay.dim:  # type: ignore[union-attr]
            return self._slice(n, lay)
        a, k = self.args(n)
        return g.create_node(n.op, n.target, a, k, n.name)

    def _term(self, n: fx.Node) -> fx.Node:
        """This rank's term of a sum or mean over the sharded dim (``ops.PARTIAL_REDUCTIONS``):
        the terms of all tp ranks add up to the value. Each of the dim's chunks is held by
        tp / chunks ranks (1, but for kv heads shared by groups of ranks)."""
        a, k = self.args(n)
        local = self.g.create_node(n.op, n.target, a, k, n.name)
        chunks = self.prop.layouts[n.args[0]].shards(self.tp)
        scale = 1 / self.tp if n.target is aten.mean.dim else chunks / self.tp
        return local if scale == 1 else self.g.call_function(aten.mul.Tensor, (local, scale))

    def _sharded_norm(self, n: fx.Node) -> fx.Node:
        """layer_norm / rms_norm over dims the shard is in: each rank normalizes its slice
        of every row with the row's statistics summed over tp (one all-reduce each way
        per statistic: the mean, for layer_norm, and the mean square)."""
        g, a = self.g, self.args(n)[0]
        layer = n.target is aten.layer_norm.default
        weight = a[2] if len(a) > 2 else None
        bias = a[3] if layer and len(a) > 3 else None
        eps = (a[4] if len(a) > 4 else 1e-5) if layer else (a[3] if len(a) > 3 else None)
        dims, numel = len(n.args[1]), _numel(tuple(n.args[1]))  # type: ignore[arg-type]
        chunks = self.prop.layouts[n.args[0]].shards(self.tp)  # type: ignore[index]
        x = info(n.args[0])
        stats = TensorInfo(x.shape[:x.rank - dims] + (1,) * dims, torch.float32, True)  # type: ignore[union-attr]

        def row_mean(v: fx.Node, what: str) -> fx.Node:
            term = g.call_function(C.row_term, (v, dims, chunks, self.group))
            total = g.call_function(C.add_terms, (term, self.group))
            total.meta["tpc_site"] = Site(where(n), f"{what} of rows of a norm over the "
                                          "sharded dim, summed over tp", stats, n.name)
            return g.call_function(aten.div.Tensor, (total, numel))

        xf = g.call_function(C.norm_input, (a[0],))
        if layer:
            xf = g.call_function(aten.sub.Tensor, (xf, row_mean(xf, "the sums")))
        square = row_mean(g.call_function(aten.mul.Tensor, (xf, xf)), "the sums of squares")
        return g.call_function(C.norm_output, (a[0], xf, square, eps, weight, bias))

    def _slice(self, n: fx.Node, lay: Any) -> fx.Node:
        """A slice of one part of a fused projection: its bounds on the local shard."""
        a, k = self.args(n)
        full = info(n.args[0]).shape[lay.dim]  # type: ignore[union-attr]
        bounds = ops.slice_bounds(n, full)
        if bounds is None or bounds == (0, full):
            return self.g.create_node(n.op, n.target, a, k, n.name)
        start, end = (b // self.tp for b in bounds)
        return self.g.create_node("call_function", aten.slice.Tensor, (a[0], lay.dim, start, end),
                                  {}, n.name)

    def _loss(self, n: fx.Node) -> fx.Node:
        """``cross_entropy_loss`` over scores sharded on their classes: vocab-parallel."""
        a, _ = self.args(n)
        smoothing = ops.arg(n, 5, "label_smoothing", 0.0)
        out = self.g.call_function(vocab_cross_entropy, (
            a[0], a[1], ops.arg(n, 3, "reduction", 1), ops.arg(n, 4, "ignore_index", -100),
            smoothing, self.group))
        scores = info(n.args[0])
        rows = _numel(scores.shape) // scores.shape[1]  # type: ignore[union-attr]
        stats = TensorInfo((rows, (3 if smoothing else 2) * self.tp), torch.float32)
        out.meta["tpc_site"] = Site(
            self._feeding_layer(n) or where(n), "vocab-parallel cross-entropy: each row's "
            "log-sum-exp and target logit gathered", stats, None, n.name)
        return out

    def _feeding_layer(self, n: fx.Node) -> str | None:
        """The colwise layer whose sharded output reaches ``n``."""
        todo, seen = [n], set()
        while todo:
            m = todo.pop()
            layer = layer_of(m)
            if m is not n and layer is not None:
                if self.styles.get(layer.name) == "colwise":
                    return layer.name
                continue
            for p in m.all_input_nodes:
                if p not in seen and self.prop.layouts.get(p, R).sharded:
                    seen.add(p)
                    todo.append(p)
        return None

    def _output(self, n: fx.Node) -> fx.Node:
        values = list(self.t.outputs) + [v for v, _ in self.t.mutations]
        out = []
        for p in values:
            if not isinstance(p, fx.Node):
                out.append(p)
            elif self.loss_parallel and self.prop.layouts.get(p, R).kind == "S":
                out.append(self.g.call_function(C.as_dtensor, (self.env[p],
                                                               self.prop.layouts[p].dim, self.group)))
            else:
                out.append(self.value(p, n))
        return self.g.output(tuple(out))

    def _direct_read(self, p: fx.Node) -> fx.Node:
        """A sharded parameter read other than by its own layer (a regulariser, a tied
        head): gathered to full, so that code sees what it saw before."""
        if p not in self.gathered:
            placement = self._placement(p)
            node = self.g.call_function(C.gather, (self.env[p], placement.dim, self.group))
            node.meta["tpc_site"] = Site(self.t.params[p], "sharded parameter read directly",
                                         info(p))  # type: ignore[arg-type]
            self.gathered[p] = node
        return self.gathered[p]

    def _sharded_input(self, n: fx.Node) -> Layout | None:
        x = n.args[0] if n.args else None
        if isinstance(x, fx.Node):
            lay = self.prop.layouts.get(x, R)
            return lay if lay.sharded else None
        return None

    def _linear(self, n: fx.Node, layer: Any) -> fx.Node:
        g, style = self.g, self.styles.get(layer.name)
        conv = layer.kind == "conv1d"  # addmm(bias, x, weight (in, out))
        x = self.value(n.args[1] if conv else n.args[0], n)
        w = self.env[layer.weight]
        b = self.env[layer.bias] if layer.bias is not None else None
        groups = self.prop.grouped.get(layer.name)
        if groups:  # this rank's group's rows of a replicated weight (its gradient summed
            #         over tp in the bucket, or here where the weight is also read whole)
            w, b = (v if v is None or p in self.synced else self._entered(p, v, layer.name)
                    for p, v in ((layer.weight, w), (layer.bias, b)))
            w = g.call_function(C.group_chunk, (w, 1 if conv else 0, groups, self.group))
            if b is not None:
                b = g.call_function(C.group_chunk, (b, 0, groups, self.group))
        if style != "rowwise":
            y = g.call_function(aten.addmm.default, (b, x, w)) if conv else \
                g.call_function(aten.linear.default, (x, w, b))
            if layer.name not in self.prop.heads:
                return y
            out = g.call_function(C.gather, (y, info(n).rank - 1, self.group))  # type: ignore[union-attr]
            out.meta["tpc_site"] = Site(layer.name, "colwise head output gathered (a loss "
                                        "inside the model reads the logits)", info(n), n.name)  # type: ignore[arg-type]
            return out
        y = g.call_function(aten.mm.default, (x, w)) if conv else \
            g.call_function(aten.linear.default, (x, w))
        y = self._reduce(n, layer.name, y)
        return g.call_function(aten.add.Tensor, (y, b)) if b is not None else y

    def _experts(self, n: fx.Node, layer: Any) -> fx.Node:
        """A grouped matmul over this rank's slice of every expert (its weight, or the
        transpose the model reads it by, is the local shard already): colwise, each rank's
        features of every row; rowwise, each rank's partial sums, reduced here or, once
        weighted and combined per token, where the analysis says (``deferred``)."""
        args = [self.env[a] if a is (layer.view or layer.weight) else self.value(a, n)
                if isinstance(a, fx.Node) else a for a in n.args]
        y = self.g.call_function(n.target, tuple(args), dict(n.kwargs))
        if self.styles.get(layer.name) != "rowwise":
            return y
        if n in self.prop.deferred:  # reduced once the rows are combined per token
            claimed = [c for c in self.prop.deferred[n][1] if c in self.q]
            if claimed:
                raise PlanError(f"{layer.name}: its partial sums pass through {claimed[0].name}, "
                                "which sequence parallelism shards (a tpcompile bug: please "
                                "report it)")
            return y
        return self._reduce(n, layer.name, y)

    def _reduce(self, n: fx.Node, name: str, partial: fx.Node) -> fx.Node:
        style = self.styles.get(name)
        if n in self.q:
            out = self.g.call_function(C.reduce_scatter, (partial, 1, self.group))
            why = f"{style} partial sums, to sequence shards"
        else:
            out = self.g.call_function(C.all_reduce, (partial, self.group))
            why = f"{style} partial sums"
        out.meta["tpc_site"] = Site(name, why, info(n), n.name)  # type: ignore[arg-type]
        return out

    def _block(self, n: fx.Node) -> fx.Node:
        call = self.t.blocks[n]
        tensors = [self.value(p, n) for p in n.args[1]]
        key = C.keep_constant(call)
        return self.g.call_function(C.call_block, (self.g.get_attr(call.member), key, tensors))

    def _meta(self, n: fx.Node, lay: Layout) -> fx.Node:
        x = self.env[n.args[0]]
        g = self.g
        if lay.inner >= 0:
            raise PlanError(f"{n.name}: the shape of expanded kv heads read before the reshape")
        if n.target is aten.sym_numel.default:
            return g.call_function(C.logical_numel, (x, lay.dim, lay.shards(self.tp)))
        if n.target is aten.sym_size.int:
            return g.call_function(C.logical_size, (x, lay.dim, lay.shards(self.tp), n.args[1]))
        if n.target is aten._assert_tensor_metadata.default:
            return None  # type: ignore[return-value]
        a, k = self.args(n)
        return g.create_node(n.op, n.target, a, k, n.name)

    def _sized(self, n: fx.Node, lay: Layout) -> fx.Node:
        """``view(x, [b, s, n_heads, hd])`` on a shard -> ``view(x, [b, s, n_heads // tp, hd])``."""
        a, k = self.args(n)
        pos = ops.SIZED[n.target]
        n_dim = lay.shards(self.tp)
        if n.target is aten.unflatten.int:
            d0 = ops.norm_dim(a[1], info(n.args[0]).rank)  # type: ignore[union-attr]
            sizes = self.g.call_function(C.localize_shape, (list(a[2]), lay.dim - d0, n_dim))
        else:
            sizes = self.g.call_function(C.localize_shape, (list(a[pos]), lay.dim, n_dim))
            if lay.inner >= 0:  # expanded kv heads: this rank's share of the repeats
                sizes = self.g.call_function(C.localize_shape, (sizes, lay.inner, self.tp // n_dim))
        a = list(a)
        a[pos if n.target is not aten.unflatten.int else 2] = sizes
        return self.g.create_node(n.op, n.target, tuple(a), k, n.name)


def read_placement(p: fx.Node, styles: dict[str, str], prop: Propagation) -> Any:
    """The tp placement a program reads a parameter placeholder under (None: replicated),
    from the style of any layer that uses it (tied layers agree, the analysis made sure)."""
    for n in [*p.users, *(v for u in p.users for v in u.users)]:  # experts: a view between
        layer = layer_of(n)
        if layer is not None and p in (layer.weight, layer.bias):
            pname = "weight" if p is layer.weight else "bias"
            pl = placement(layer.kind, styles.get(layer.name), pname,
                           prop.packed.get(layer.name), layer.name in prop.grouped)
            if pl is not None:
                return pl
    return None


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _impure(n: fx.Node) -> bool:
    """Kept without users: side effects (in-place ops), and grad-mode regions (export's
    ``wrap_with_set_grad_enabled``), whose body may update a buffer under no_grad."""
    return n.is_impure() or (n.op == "call_function" and
                             isinstance(n.target, torch._ops.HigherOrderOperator))


def rewrite(t: Traced, prop: Propagation, styles: dict[str, str], q_nodes: set[fx.Node],
            tp: int, group: str, contracts: dict[fx.Node, Contract],
            loss_parallel: bool = False) -> Rewritten:
    """The SPMD program of one traced module. ``loss_parallel``: outputs sharded on their
    features (a colwise head's logits) are returned as DTensors ``Shard(-1)`` on the tp
    mesh instead of being gathered, for a vocab-parallel loss."""
    C.remember(group)
    graph = _Builder(t, prop, styles, q_nodes, tp, group, contracts, loss_parallel).build()
    graph.eliminate_dead_code(is_impure_node=_impure)
    if OVERLAP["enabled"]:
        overlap_input_grads(graph)
    graph.lint()
    code = graph.python_code(root_module="self")
    scope: dict[str, Any] = dict(code.globals)
    exec(compile(code.src, f"<tpcompile:{type(t.gm).__name__}>", "exec"), scope)
    return Rewritten(graph, scope["forward"], code.src)
