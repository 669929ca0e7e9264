"""Jobs the worker pool runs (module level, so they pickle by reference)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

import tpcompile
from models.llama2 import Transformer, config
from models.toy import GatedMLPStack, ToyModel
from tests.harness import full, numerics_result, tp_mesh


def build(name: str, seed: int = 0, **kw: Any) -> tuple[nn.Module, tuple]:
    """A model and inputs, identical on every rank (same seed)."""
    torch.manual_seed(seed)
    if name == "toy":
        return ToyModel(), (torch.randn(4, 10),)
    if name == "gated":
        dtype = getattr(torch, kw.get("dtype", "float32"))
        m = GatedMLPStack(dim=kw.get("dim", 32), hidden=kw.get("hidden", 64),
                          n_layers=kw.get("n_layers", 3), bias=kw.get("bias", True)).to(dtype)
        return m, (torch.randn(2, kw.get("seq", 8), kw.get("dim", 32), dtype=dtype),)
    if name == "centred":
        dtype = getattr(torch, kw.get("dtype", "float32"))
        return CentredMLP().to(dtype), (torch.randn(4, 6, 8, dtype=dtype),)
    if name in EDGES:
        return EDGES[name](), (torch.randn(4, 6, getattr(EDGES[name], "width", 8)),)
    if name == "llama":
        args = config("debug", **kw)
        m = Transformer(args)
        m.init_weights(seed)
        return m, (torch.randint(0, args.vocab_size, (2, 8)),)
    raise KeyError(name)


class CentredMLP(nn.Module):
    """The hidden activation centred and scaled over its features, by hand: a mean and a
    sum over the sharded dim, the mean read by a sharded op (the subtraction), the sum by
    a replicated one (``+ 1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        c = h - h.mean(-1, keepdim=True)
        return self.fc2(c * torch.rsqrt(c.pow(2).sum(-1, keepdim=True) + 1))


class ScaleReadTwice(nn.Module):
    """A scale vector read in slices (against fc1's sharded output) and whole (summed)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.g = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x) * self.g
        return self.fc2(torch.relu(h)) + x * self.g[:8].sum()


class FusedReadWhole(nn.Module):
    """A fused q/k/v output cut into parts by index, but also read position by position
    (scaled by a vector, then averaged into a gate): it cannot be sharded per part."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)
        self.g = nn.Parameter(torch.rand(24) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        gate = torch.sigmoid((qkv * self.g).mean(-1, keepdim=True))
        q, k, v = qkv.unflatten(-1, (3, 8)).unbind(-2)
        return self.out(q * k + v) * gate


class ClampedFusedNormed(nn.Module):
    """A fused output clamped, cut into parts by index, and also normalized whole."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out, self.ln = nn.Linear(8, 24), nn.Linear(8, 8), nn.LayerNorm(24)
        nn.init.uniform_(self.ln.weight, 0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).clamp(-1, 1)
        q, k, v = qkv.unflatten(-1, (3, 8)).unbind(-2)
        return self.out(q * k + v) * self.ln(qkv).mean(-1, keepdim=True)


class MeanIntoResidual(nn.Module):
    """A mean over the sharded features added to the residual stream, which sequence
    parallelism splits by tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.n1(x))
        return self.n2(x + self.fc2(torch.relu(h)) + h.pow(2).mean(-1, keepdim=True))


class NormWeightReadTwice(nn.Module):
    """A norm's weight read on sequence shards (the norm, under SP) and whole (a scale)."""
    width = 16

    def __init__(self) -> None:
        super().__init__()
        self.n1, self.fc1, self.fc2 = nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 16)
        nn.init.uniform_(self.n1.weight, 0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.n1(x))
        return x + self.fc2(torch.relu(h)) * self.n1.weight.sum()


class NormWeightAsGate(NormWeightReadTwice):
    """A norm's weight read on sequence shards and, doubled, in slices as a gate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.n1(x)) * (self.n1.weight * 2)
        return x + self.fc2(torch.relu(h))


class WeightNormScaled(nn.Module):
    """fc1's output divided by the norms of fc1's own weight rows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x) / self.fc1.weight.norm(dim=1)))


class UnembedOnly(nn.Module):
    """An embedding whose weight the output reads by F.linear, looked up only by another
    method (``embed``): forward's graph has no lookup of it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.wte, self.ln = nn.Linear(8, 8), nn.Embedding(32, 8), nn.LayerNorm(8)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.ln(self.inp(x)), self.wte.weight)


class ExpertsInOut(nn.Module):
    """Experts stored [E, in, out] (torchtitan's GroupedExperts, gpt-oss's transposed
    layout) and read as they are by a grouped matmul (transformers' CPU kernel; PyTorch's
    ``_grouped_mm`` has no CPU backward), gate and up as Parameters of their own; a top-2
    router of 4, the expert rows combined by ``index_add``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.integrations import moe  # noqa: F401 - registers grouped_mm_fallback
        self.router = nn.Linear(8, 4, bias=False)
        self.w1 = nn.Parameter(torch.randn(4, 8, 16) / 8 ** 0.5)
        self.w3 = nn.Parameter(torch.randn(4, 8, 16) / 8 ** 0.5)
        self.w2 = nn.Parameter(torch.randn(4, 16, 8) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = x.reshape(-1, d)
        scores, idx = torch.topk(self.router(h).softmax(-1), 2)
        order = idx.reshape(-1).argsort()
        rows = h[order // 2]
        counts = torch.histc(idx.reshape(-1)[order].float(), bins=4, min=0, max=3)
        offs = counts.cumsum(0).to(torch.int32)
        mm = torch.ops.transformers.grouped_mm_fallback
        y = mm(torch.nn.functional.silu(mm(rows, self.w1, offs)) * mm(rows, self.w3, offs),
               self.w2, offs)
        y = y * scores.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(h).index_add(0, order // 2, y).reshape(b, s, d)


class _ScaledBy(nn.Module):
    """A block of another kind that scales its output by a statistic of a weight it was
    handed (another block's)."""

    def __init__(self, w: nn.Parameter) -> None:
        super().__init__()
        self.w, self.fc = w, nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.w.square().mean()


class ExpertsReadElsewhere(nn.Module):
    """Experts in one block whose w1 another kind of block also reads, whole: one
    Parameter in two traced modules."""

    def __init__(self) -> None:
        super().__init__()
        first = ExpertsInOut()
        self.layers = nn.ModuleList([first, _ScaledBy(first.w1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


EDGES = {c.__name__: c for c in (ScaleReadTwice, FusedReadWhole, ClampedFusedNormed,
                                 MeanIntoResidual, NormWeightReadTwice, NormWeightAsGate,
                                 WeightNormScaled, UnembedOnly, ExpertsInOut,
                                 ExpertsReadElsewhere)}


def numerics(rank: int, name: str, tp: int, sp: bool, kw: dict | None = None,
             seq: int | None = None, **options: Any) -> dict:
    ref, inputs = build(name, **(kw or {}))
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), sequence_parallel=sp,
                                     **options)
    if seq is not None:  # run at a sequence length other than the traced one
        torch.manual_seed(5)
        inputs = (torch.randint(0, ref.args.vocab_size, (3, seq)),)
    return numerics_result(ref, par, inputs)


def weights_roundtrip(rank: int, tp: int) -> dict:
    ref, _ = build("llama")
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp))
    ref_sd, par_sd = ref.state_dict(), par.state_dict()
    equal = {k: bool(torch.equal(full(par_sd[k]), v)) for k, v in ref_sd.items() if k in par_sd}
    return {"ref_keys": list(ref_sd), "par_keys": list(par_sd), "equal": equal}


def collective_counts(rank: int, tp: int, sp: bool, n_layers: int) -> dict:
    """Collectives by kind in one forward and in one backward of the Llama model."""
    from tpcompile.counting import CollectiveCounter
    ref, inputs = build("llama", n_layers=n_layers)
    par = tpcompile.auto_parallelize(ref, tp_mesh(tp), sequence_parallel=sp)
    with CollectiveCounter() as fwd:
        out = par(*inputs)
    with CollectiveCounter() as bwd:
        out.pow(2).mean().backward()
    return {"fwd": dict(fwd.counts), "bwd": dict(bwd.counts)}


def indivisible(rank: int, tp: int, on_indivisible: str) -> dict:
    """A gated MLP whose hidden width (6) is not divisible by tp=4."""
    ref, inputs = build("gated", hidden=6)
    model = copy.deepcopy(ref)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        par = tpcompile.auto_parallelize(model, tp_mesh(tp), on_indivisible=on_indivisible)
    except tpcompile.TPCompileError as e:
        same = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        untouched = same and "forward" not in model.layers[0].__dict__ and not any(
            type(p).__name__ == "DTensor" for p in model.parameters())
        out_same = torch.equal(model(*inputs), ref(*inputs))
        return {"error": type(e).__name__, "message": str(e), "untouched": untouched,
                "out_same": out_same}
    return numerics_result(ref, par, inputs)


def failure_midway(rank: int, where: str) -> dict:
    """auto_parallelize fails after it has started changing the model (the second block's
    forward cannot be installed, or FSDP fails on the second block): the model must be
    exactly as before."""
    from unittest import mock

    import torch.distributed.fsdp as fsdp

    import tpcompile.api as api
    from tests.harness import mesh
    ref, inputs = build("llama")
    model = copy.deepcopy(ref)
    params_before = {k: v for k, v in model.named_parameters()}
    calls = {"n": 0}
    owner, name = (api, "install") if where == "install" else (fsdp, "fully_shard")
    real = getattr(owner, name)

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    target = mesh((2, 2), ("dp", "tp")) if where == "fsdp" else tp_mesh(2)
    with mock.patch.object(owner, name, flaky):
        try:
            tpcompile.auto_parallelize(model, target)
        except RuntimeError as e:
            assert "injected" in str(e)
    same_objects = all(p is params_before[k] for k, p in model.named_parameters())
    no_forward = not any("forward" in m.__dict__ for m in model.modules())
    classes = [type(m).__name__ for m in model.modules()]
    out_same = torch.equal(model(*inputs), ref(*inputs))
    return {"same_objects": same_objects, "no_forward": no_forward, "out_same": out_same,
            "classes": classes, "calls": calls["n"]}


class _Expert(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class _Stage(nn.Module):
    """A block that holds repeated blocks of its own."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.inner = nn.ModuleList(_Expert(dim) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for e in self.inner:
            x = e(x)
        return x


class NestedStack(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stages = nn.ModuleList(_Stage(dim) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in self.stages:
            x = s(x)
        return x


def nested(rank: int, tp: int, sp: bool) -> dict:
    torch.manual_seed(0)
    ref, inputs = NestedStack(), (torch.randn(2, 4, 16),)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), sequence_parallel=sp)
    return numerics_result(ref, par, inputs)


def loss_parallel(rank: int, tp: int, sp: bool, dp: bool = False) -> dict:
    """Cross-entropy on vocab-sharded logits (``loss_parallel=True`` and PyTorch's
    ``loss_parallel()`` context) against the reference's loss on full logits: each rank's
    logits shard, the loss, and every local gradient."""
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel as lp_context

    from tests.harness import compare, mesh
    from tpcompile.verify import check_tensor, shadow
    ref, (x,) = build("llama")
    torch.manual_seed(7)
    x = torch.randint(0, ref.args.vocab_size, (4, 8))
    target = mesh((2, tp), ("dp", "tp")) if dp else tp_mesh(tp)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), target, sequence_parallel=sp,
                                     loss_parallel=True)

    def ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def mine(t: torch.Tensor) -> torch.Tensor:  # this dp rank's rows of a full batch
        return t.chunk(2, 0)[target["dp"].get_local_rank()] if dp else t

    def step(model: torch.nn.Module) -> tuple:
        out = model(x)
        loss = ce(out, x)
        loss.backward()
        return out, loss

    sh = shadow(ref, step)
    logits = par(mine(x))
    with lp_context():
        loss = ce(logits, mine(x))
        loss.backward()
    out, ref_loss = step(ref)
    rep = compare(ref, par, mine(out), logits, shadow=sh.map_outputs(lambda o: mine(o[0])),
                  dtensor_outputs=True)
    if dp:  # the full batch's loss is the mean of the dp ranks' losses
        if isinstance(loss, DTensor):
            assert not any(p.is_partial() for p in loss.placements), loss.placements
            loss = loss.to_local()
        loss = loss.detach().clone()
        torch.distributed.all_reduce(loss, group=target["dp"].get_group())
        loss /= 2
    rep.checks.append(check_tensor("loss", loss, ref_loss.detach(),
                                   exact=sh.outputs[1].detach(),
                                   noisy=lambda: [o[1].detach() for _, o in sh.noisy]))
    return {"sharded": isinstance(logits, DTensor), "report": rep}


def loss_parallel_without_head(rank: int) -> str:
    ref, _ = build("gated")
    try:
        tpcompile.auto_parallelize(ref, tp_mesh(2), loss_parallel=True)
    except tpcompile.TPCompileError as e:
        return str(e)
    return "no error"


def meta_stays_meta(rank: int) -> dict:
    """``materialize=False``: a meta model is sharded but keeps no storage."""
    from torch.distributed.tensor import DTensor
    with torch.device("meta"):
        model = Transformer(config("debug"))
    par = tpcompile.auto_parallelize(model, tp_mesh(2), materialize=False)
    params = list(par.parameters())
    return {"dtensor": all(isinstance(p, DTensor) for p in params),
            "meta": all(p.to_local().is_meta for p in params),
            "wq_local": list(par.layers[0].attention.wq.weight.to_local().shape)}


def die_once(rank: int, marker: str) -> int:
    """Rank 0 dies the first time (the marker file does not exist yet)."""
    import os
    if rank == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return rank


def ready(rank: int) -> int:
    return rank


def stall_once(rank: int, marker: str) -> int:
    """Rank 1 stalls the first time (the marker file does not exist yet)."""
    import os
    import time
    if rank == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(60)
    return rank


def divide_by_zero(rank: int) -> int:
    return rank // 0


def frozen_custom_backward(rank: int) -> dict:
    """A model with a straight-through Function, parallelized frozen, then unfrozen."""
    from tests.test_errors import _QuantizedMLP
    torch.manual_seed(0)
    ref, x = _QuantizedMLP(), torch.randn(2, 4, 8)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref).requires_grad_(False), tp_mesh(2),
                                     example_inputs=(x,))
    out_same = torch.allclose(par(x), ref(x), atol=1e-6)
    with torch.no_grad():
        no_grad_same = torch.allclose(par(x), ref(x), atol=1e-6)
    par.requires_grad_(True)
    try:
        par(x)
        refused = ""
    except tpcompile.UnsupportedError as e:
        refused = str(e)
    return {"out_same": out_same, "no_grad_same": no_grad_same, "refused": refused}
