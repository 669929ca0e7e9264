"""Models from a review that looked for silent wrong numbers: each one must now either
match the unsharded model (outputs and every gradient) or be refused clearly."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import tpcompile
from tests.harness import judge, numerics_result, tp_mesh

D, H, V = 16, 32, 32


class Block(nn.Module):
    def __init__(self, act: Any = F.relu) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.w1, self.w2 = nn.Linear(D, H), nn.Linear(H, D)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(self.act_fn(self.w1(self.norm(x))))


class Stack(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class RawWeightRead(nn.Module):
    """A colwise layer's weight also read directly (a regulariser in the forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + (self.block.w1.weight ** 2).sum() * 1e-2


class _Embedded(nn.Module):
    """Token ids -> an embedding -> one block; subclasses add their own head."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.emb = emb
        self.layers = nn.ModuleList([Block()])

    def trunk(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for layer in self.layers:
            h = layer(h)
        return h


class TiedByModule(_Embedded):
    """``head.weight = emb.weight``: one Parameter under two names."""

    def __init__(self) -> None:
        super().__init__(nn.Embedding(V, D))
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(ids))


class TiedByFunction(_Embedded):
    """The head is ``F.linear(h, emb.weight)``: the embedding's weight read directly."""

    def __init__(self) -> None:
        super().__init__(nn.Embedding(V, D))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(self.trunk(ids), self.emb.weight)


class FreqScaled(_Embedded):
    def __init__(self) -> None:
        super().__init__(nn.Embedding(V, D, scale_grad_by_freq=True))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.trunk(ids)


class ListIndexHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))[:, [0, 2]]


class UnflattenAttention(nn.Module):
    """Heads split with the function ``torch.unflatten`` (not the method)."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(D)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (torch.unflatten(w(h), -1, (self.heads, D // self.heads)).transpose(1, 2)
                   for w in (self.wq, self.wk, self.wv))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.wo(o.transpose(1, 2).flatten(2))


def build(name: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    x = torch.randn(2, 8, D)
    ids = torch.randint(0, V, (2, 8))
    ids[:, :3] = 5  # repeated ids, so frequency scaling matters
    models = {
        "raw_weight": lambda: (RawWeightRead(), (x,)),
        "tied_module": lambda: (TiedByModule(), (ids,)),
        "tied_function": lambda: (TiedByFunction(), (ids,)),
        "function_attrs": lambda: (Stack([Block(F.gelu), Block(F.relu), Block(F.gelu)]), (x,)),
        # activation modules with equal settings (inplace=False), told apart by class only
        "module_classes": lambda: (Stack([Block(nn.ReLU()), Block(nn.SiLU()), Block(nn.ReLU())]), (x,)),
        "freq_scaled": lambda: (FreqScaled(), (ids,)),
        "list_index": lambda: (ListIndexHead(), (x,)),
        "torch_unflatten": lambda: (Stack([UnflattenAttention()]), (x,)),
    }
    return models[name]()


def case(rank: int, name: str, tp: int, sp: bool) -> dict:
    ref, inputs = build(name)
    try:
        par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), sequence_parallel=sp)
    except tpcompile.TPCompileError as e:
        return {"error": type(e).__name__, "message": str(e)}
    return numerics_result(ref, par, inputs)


def hooked(rank: int) -> dict:
    """A forward hook on a Linear the rewrite would inline: refused, model untouched."""
    ref, (x,) = build("function_attrs")
    ref.layers[0].w2.register_forward_hook(lambda m, i, o: o * 3.0)
    model = copy.deepcopy(ref)
    try:
        tpcompile.auto_parallelize(model, tp_mesh(2))
    except tpcompile.TPCompileError as e:
        return {"error": type(e).__name__, "message": str(e),
                "untouched": torch.equal(model(x), ref(x))}
    return {"error": None}


def twice(rank: int) -> dict:
    ref, (x,) = build("function_attrs")
    par = tpcompile.auto_parallelize(ref, tp_mesh(2))
    try:
        tpcompile.auto_parallelize(par, tp_mesh(2))
    except tpcompile.TPCompileError as e:
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": None}


class DropoutAttention(nn.Module):
    """Dropout that reads ``self.training`` (nanoGPT style), which fx bakes into a graph."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(D)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(D, D) for _ in range(4))
        self.w1, self.w2 = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm(x)
        q, k, v = (w(h).view(b, s, self.heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=0.5 if self.training else 0.0)
        x = x + self.wo(o.transpose(1, 2).reshape(b, s, -1))
        return x + F.dropout(self.w2(F.relu(self.w1(x))), 0.5, training=self.training)


def mode_switch(rank: int, start_in_train: bool) -> dict:
    """Parallelize in one mode, run in the other: eval must give the unsharded model's
    numbers, train must really drop (differ from eval)."""
    torch.manual_seed(0)
    ref, x = Stack([DropoutAttention(), DropoutAttention()]), torch.randn(2, 8, D)
    ref.train(start_in_train)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2))
    flags_kept = all(m.training == start_in_train for m in par.modules())
    ref.eval()
    par.eval()
    eval_report = judge(ref, par, (x,))
    par.train()
    with torch.no_grad():
        dropped = not torch.allclose(par(x), ref(x))
    # each mode ran its own program (the export bakes the flag in); planned on synthesized
    # inputs of another length, each mode also has its shape-dynamic program
    programs = par.layers[0].__dict__["_tpcompile_runtime"].programs
    two_programs = {p.training for p in programs} == {False, True}
    return {"flags_kept": flags_kept, "two_programs": two_programs, "error": None,
            "report": eval_report, "dropped": dropped}


def weight_normed(rank: int) -> dict:
    ref, _ = build("function_attrs")
    nn.utils.parametrizations.weight_norm(ref.layers[1].w1)
    try:
        tpcompile.auto_parallelize(ref, tp_mesh(2))
    except tpcompile.TPCompileError as e:
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": None}


class InlineNormBlock(nn.Module):
    """An RMSNorm written inline in the block's own forward (no norm module)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(D))
        self.w1, self.w2 = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale
        return x + self.w2(F.relu(self.w1(h)))


def plan_roundtrip_inline_norm(rank: int, path: str) -> dict:
    """A detected plan, saved and applied again, gives the same numbers."""
    torch.manual_seed(0)
    ref, x = Stack([InlineNormBlock(), InlineNormBlock()]), torch.randn(2, 8, D)
    if rank == 0:
        tpcompile.save_plan(tpcompile.plan(ref, tp=2), path)
    torch.distributed.barrier()
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), plan=path)
    return numerics_result(ref, par, (x,))


class GatedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.w1, self.w2 = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x: torch.Tensor, gate: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + self.w2(F.relu(self.w1(self.norm(x)))) * gate * scale


class KeywordStack(nn.Module):
    """Blocks called with keyword arguments, HF style (``layer(x, attention_mask=m)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GatedBlock() for _ in range(2))
        self.norm = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(x.mean(-1, keepdim=True))
        for layer in self.layers:
            x = layer(x=x, gate=gate)
        return self.norm(x)


def keyword_blocks(rank: int, sp: bool) -> dict:
    torch.manual_seed(0)
    ref, x = KeywordStack(), torch.randn(2, 8, D)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), sequence_parallel=sp)
    return numerics_result(ref, par, (x,))


class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.w1, self.w2, self.drop = nn.Linear(D, H), nn.Linear(H, D), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(self.drop(F.relu(self.w1(self.norm(x)))))


def dropout_streams(rank: int) -> dict:
    """Dropout on a sharded tensor draws from this rank's own stream; the global stream,
    which replicated regions share, is left where it was."""
    import torch.distributed as dist

    from tpcompile.rewrite import collectives as C
    torch.manual_seed(0)
    par = tpcompile.auto_parallelize(Stack([DropoutMLP()]), tp_mesh(2))
    mesh = tp_mesh(2)
    group = mesh.get_group().group_name
    before = torch.get_rng_state()
    mask = C.on_rank_rng(F.dropout, group, torch.ones(4096), 0.5) > 0
    untouched = torch.equal(before, torch.get_rng_state())
    masks = [torch.zeros_like(mask) for _ in range(2)]
    dist.all_gather(masks, mask, group=mesh.get_group())
    return {"routed": "on_rank_rng" in par.layers[0]._tpcompile_code,
            "untouched": untouched, "differ": not torch.equal(masks[0], masks[1]),
            "rate": mask.float().mean().item()}


class Output(OrderedDict):
    """What a Hugging Face ``ModelOutput`` is to the caller: an OrderedDict subclass."""


class OutputStack(Stack):
    """Returns its hidden state and a block's output in an ``Output``."""

    def forward(self, x: torch.Tensor) -> Output:  # type: ignore[override]
        first = self.layers[0](x)
        for layer in self.layers[1:]:
            x = layer(first)
        return Output(last_hidden_state=self.norm(x), first=first)


def output_container(rank: int, sp: bool) -> dict:
    torch.manual_seed(0)
    ref, x = OutputStack([Block(), Block()]), torch.randn(2, 8, D)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), sequence_parallel=sp)
    return numerics_result(ref, par, (x,))


class CountingBlock(nn.Module):
    """Buffers changed in forward: a call counter and a running mean of the activations
    (updated under no_grad, BatchNorm style)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.zeros(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.block(x)
        with torch.no_grad():
            self.running.mul_(0.9).add_(h.mean((0, 1)), alpha=0.1)
        return h


def buffers_advance(rank: int, sp: bool) -> dict:
    """Three steps of the reference and the parallel model: the buffers the forward
    changes must advance alike (and the numbers match at the last step)."""
    torch.manual_seed(0)
    ref = CountingBlock()
    x = torch.randn(2, 8, D)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(2), sequence_parallel=sp)
    for _ in range(2):
        ref(x).sum().backward()
        par(x).sum().backward()
    out = numerics_result(ref, par, (x,))
    out["calls"] = (int(ref.calls), int(par.calls))
    out["running"] = float((ref.running - par.running).abs().max())
    return out
