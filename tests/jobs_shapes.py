"""Layer shapes of real models (issue "Layer shapes"): a sparse mixture of experts, a
small classifier head tp does not divide, and the redundant compute of every sharded
model, counted with PyTorch's FLOP counter on one rank."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils.flop_counter import FlopCounterMode

import tpcompile
from tests import jobs_hf
from tests.harness import judge, numerics_result, tp_mesh

CLASSES = 7


class ResidualMLPClassifier(nn.Module):
    """Pre-norm residual MLP blocks over a set of tokens, mean-pooled into a 7-class head
    (the shape of an MLP-Mixer or a ViT probe, minus the patching)."""

    def __init__(self, dim: int = 16, hidden: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                          nn.Linear(hidden, dim)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x).mean(dim=1))


def build(name: str, **overrides: Any) -> tuple[nn.Module, tuple, dict]:
    """(model, args, kwargs), identical on every rank."""
    torch.manual_seed(0)
    if name == "moe":
        from models.moe import MoeConfig, MoeLM
        return MoeLM(MoeConfig()), (torch.randint(0, 64, (2, 8)),), {}
    if name == "classifier":
        return ResidualMLPClassifier(), (torch.randn(4, 8, 16),), {}
    if name.startswith(("mha", "encoder")):
        from models.stock_attention import EncoderLM, MHALM
        model = {"mha": lambda: MHALM(**overrides),
                 "mha_seq_first": lambda: MHALM(batch_first=False, **overrides),
                 "encoder_pre": lambda: EncoderLM(norm_first=True, **overrides),
                 "encoder_post": lambda: EncoderLM(norm_first=False, **overrides)}[name]()
        # sequence first ([T, B, E]), sequence parallelism splits the batch: 4, so tp 4 can
        batch = 4 if name == "mha_seq_first" else 2
        return model, (torch.randint(0, 64, (batch, 8)),), {}
    return jobs_hf.build(name, **overrides)


def sharded_fraction(par: nn.Module) -> float:
    total = sharded = 0
    for p in par.parameters():
        total += p.numel()
        if isinstance(p, DTensor) and any(pl.is_shard() or isinstance(pl, _StridedShard)
                                          for pl in p.placements[-1:]):
            sharded += p.numel()
    return sharded / total


def _flops(model: nn.Module, args: tuple, kwargs: dict, only: tuple[str, ...] = ()) -> int:
    """Matmul and attention FLOPs of one forward and backward (``only``: of the modules
    whose names end so)."""
    with FlopCounterMode(display=False) as counter:
        jobs_hf.loss_of(model(*args, **kwargs)).backward()
    if only:
        return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                   if name.endswith(only))
    return counter.get_total_flops()


def case(rank: int, name: str, tp: int, sp: bool) -> dict:
    """Numerics against the unsharded model, the warnings planning gave, the share of
    parameters sharded, and tp x this rank's FLOPs / the unsharded model's."""
    ref, args, kwargs = build(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp), example_inputs=args,
                                         example_kwargs=kwargs, sequence_parallel=sp)
    result = numerics_result(ref, par, args, kwargs=kwargs, loss_fn=jobs_hf.loss_of)
    result["warnings"] = [str(w.message) for w in caught if "tpcompile" in str(w.message)]
    result["notes"] = {n.layer: n.reason for n in tpcompile.plan_of(par).notes()}
    result["sharded"] = sharded_fraction(par)
    result["flop_ratio"] = tp * _flops(par, args, kwargs) / _flops(ref, args, kwargs)
    # kv projections under GQA with fewer kv heads than tp run on tp / n_kv ranks each
    result["kv_share"] = _flops(ref, args, kwargs, (".k_proj", ".v_proj", ".wk", ".wv")) / \
        _flops(ref, args, kwargs)
    plan = tpcompile.plan_of(par)
    result["grouped"] = {f"{m}.{rel}" if m else rel: n for mp in plan.modules
                         for m in mp.members for rel, n in mp.grouped.items()}
    result["placements"] = {k: str(p.placements[-1]) for k, p in par.named_parameters()
                            if isinstance(p, DTensor)}
    return result


class BranchOnRows(nn.Module):
    """Branches on batch x length (``kind="product"``) or on the larger of the two
    (``"longest"``, which torch.export prints with Python's ``max``): a condition no
    single size's range holds (torch.export keeps it as Python source beside the graph)."""

    def __init__(self, kind: str = "product") -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "product":
            wide = x.shape[0] * x.shape[1] > 64
        else:
            wide = max(x.shape[0], x.shape[1]) > 10
        return self.down(F.gelu(h) if wide else F.relu(h))


# by kind: the sizes planned at, a call on the same side (a dynamic program), one on the
# other side (a program of its own), one on the first side again
BRANCH_CALLS = {"product": ((4, 8), (3, 6), (16, 16), (2, 6)),
                "longest": ((4, 8), (3, 6), (4, 16), (2, 6))}


def branch_on_rows(rank: int, tp: int, kind: str = "product") -> list[dict]:
    """Planned at 4 x 8; called at ``BRANCH_CALLS[kind]``: each call against the
    unsharded model, with the number of programs the model holds after it."""
    torch.manual_seed(0)
    ref = BranchOnRows(kind)
    par = tpcompile.auto_parallelize(copy.deepcopy(ref), tp_mesh(tp),
                                     example_inputs=(torch.randn(4, 8, 8),))
    out = []
    for batch, seq in BRANCH_CALLS[kind]:
        x = torch.randn(batch, seq, 8, generator=torch.Generator().manual_seed(batch * seq))
        result = numerics_result(ref, par, (x,))
        result["programs"] = len(par.__dict__["_tpcompile_runtime"].programs)
        out.append(result)
    return out


# the config field that sets the number of blocks, by model
DEPTH = {"nanogpt": "n_layer", "reference_llama": "n_layers", "mha": "n_layers",
         "encoder_pre": "n_layers", "llama": "num_hidden_layers"}


def with_counts(rank: int, name: str, tp: int, sp: bool, depth: int) -> dict[str, Any]:
    """Collectives of one forward and one backward, by kind, with ``depth`` blocks."""
    ref, args, kwargs = build(name, **{DEPTH[name]: depth})
    par = tpcompile.auto_parallelize(ref, tp_mesh(tp), example_inputs=args,
                                     example_kwargs=kwargs, sequence_parallel=sp)
    with tpcompile.CollectiveCounter() as fwd:
        out = par(*args, **kwargs)
    with tpcompile.CollectiveCounter() as bwd:
        jobs_hf.loss_of(out).backward()
    return {"fwd": dict(fwd.counts), "bwd": dict(bwd.counts)}


def interop(rank: int, name: str, tp: int, sp: bool) -> dict:
    """``tpcompile.to_parallelize_plan`` of the detected plan applied with PyTorch's
    ``parallelize_module``: the unsharded model's numbers (every gradient, once the
    optimizer-side fix-ups of a hand plan are done), or a PlanError naming what the dict
    cannot express."""
    from torch.distributed.tensor.parallel import parallelize_module
    from tpcompile.verify import align_grads, planned_placements
    ref, args, kwargs = build(name)
    plan = tpcompile.plan(ref, tp=tp, example_inputs=args, example_kwargs=kwargs,
                          sequence_parallel=sp)
    try:
        hand = tpcompile.to_parallelize_plan(plan)
    except tpcompile.PlanError as e:
        return {"error": None, "refused": str(e)}
    pt = copy.deepcopy(ref)
    for m in pt.modules():  # what any hand plan needs: head counts used in views, per rank
        for attr in ("n_heads", "n_kv_heads"):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, getattr(m, attr) // tp)
    parallelize_module(pt, tp_mesh(tp), hand)
    rep = judge(ref, pt, args, kwargs=kwargs, loss_fn=jobs_hf.loss_of,
                placements=planned_placements(pt, plan), after_backward=align_grads)
    return {"error": None, "refused": None, "report": rep, "styles": plan.layer_styles()}
