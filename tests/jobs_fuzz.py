"""Unusual and bad input, one model per class of input a sceptical user tries. Each must
give correct numbers (outputs and every gradient vs the unsharded model) or a
``TPCompileError`` with the user's model exactly as before (state, buffers, attributes,
no forward installed). Add a case for every new class of input found."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import tpcompile
from tests.harness import numerics_result, tp_mesh

D, H = 8, 16


class MLP(nn.Module):
    def __init__(self, hidden: int = H, bias: bool = True) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(D, hidden, bias=bias), nn.Linear(hidden, D, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Frozen(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.up.requires_grad_(False)


class DetachedBranch(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(x))
        return self.down(h) + self.down(h.detach()) * 0.5


class NoGradLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = MLP(), MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.first(x)
        return self.second(x)


class DictOut(MLP):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = super().forward(x)
        return {"out": h, "aux": (h ** 2).mean()}


class OptionalScale(MLP):
    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                flag: bool = False) -> torch.Tensor:
        h = super().forward(x)
        if scale is not None:
            h = h * scale
        return -h if flag else h


class IntBuffer(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offsets", torch.arange(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.offsets.to(x.dtype)


class DataDependent(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if h.mean() > 0:
            h = h * 2
        return self.down(h)


class AssignsTensor(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(x))
        self.last = h
        return self.down(h)


class Hooked(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.down.register_forward_hook(lambda m, i, o: o * 2)


class SharedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = MLP(), MLP()
        self.b.up.weight = self.a.up.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class GradCheckpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MLP(), MLP()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint
        for layer in self.layers:
            x = x + checkpoint(layer, x, use_reentrant=False)
        return x


def _x(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


# name -> (build the model, its call (args, kwargs), what is expected: "numbers" or the
# TPCompileError subclass)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[tuple, dict]], str]] = {
    "frozen_layer": (Frozen, lambda: ((_x(2, 4, D),), {}), "numbers"),
    "detached_branch": (DetachedBranch, lambda: ((_x(2, 4, D),), {}), "numbers"),
    "no_grad_layer": (NoGradLayer, lambda: ((_x(2, 4, D),), {}), "numbers"),
    "dict_output": (DictOut, lambda: ((_x(2, 4, D),), {}), "numbers"),
    "optional_given": (OptionalScale, lambda: ((_x(2, 4, D),), {"scale": _x(2, 4, D)}),
                       "numbers"),
    "optional_flag": (OptionalScale, lambda: ((_x(2, 4, D),), {"flag": True}), "numbers"),
    "int_buffer": (IntBuffer, lambda: ((_x(2, 4, D),), {}), "numbers"),
    "no_bias": (lambda: MLP(bias=False), lambda: ((_x(2, 4, D),), {}), "numbers"),
    "two_dim_input": (MLP, lambda: ((_x(3, D),), {}), "numbers"),
    "bf16": (lambda: MLP().to(torch.bfloat16),
             lambda: ((_x(2, 4, D, dtype=torch.bfloat16),), {}), "numbers"),
    "checkpointed": (GradCheckpointed, lambda: ((_x(2, 4, D),), {}), "numbers"),
    "shared_weight": (SharedWeight, lambda: ((_x(2, 4, D),), {}), "numbers"),
    "indivisible": (lambda: MLP(hidden=7), lambda: ((_x(2, 4, D),), {}), "IndivisibleError"),
    "data_dependent": (DataDependent, lambda: ((_x(2, 4, D),), {}), "TraceError"),
    "assigns_tensor": (AssignsTensor, lambda: ((_x(2, 4, D),), {}), "UnsupportedError"),
    "hooked": (Hooked, lambda: ((_x(2, 4, D),), {}), "UnsupportedError"),
}


# parameters the loss does not reach, on purpose
NO_GRAD = {"no_grad_layer": ["first.up.weight", "first.up.bias", "first.down.weight",
                             "first.down.bias"]}


def _state(model: nn.Module) -> dict[str, Any]:
    """Everything a failed call must leave as it was."""
    out: dict[str, Any] = {}
    for path, m in model.named_modules():
        out[f"{path}:class"] = type(m)
        out[f"{path}:dict"] = {k: v for k, v in vars(m).items()
                               if k not in ("_parameters", "_buffers", "_modules")
                               and not isinstance(v, (dict, list))}
        for k, v in list(m._parameters.items()) + list(m._buffers.items()):
            out[f"{path}.{k}"] = (type(v), None if v is None else v.detach().clone(),
                                  None if v is None else v.requires_grad)
        out[f"{path}:hooks"] = (len(m._forward_hooks), len(m._forward_pre_hooks))
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    bad = [k for k in a if k not in b] + [k for k in b if k not in a]
    for k, v in a.items():
        w = b.get(k)
        if isinstance(v, tuple) and len(v) == 3 and isinstance(v[1], torch.Tensor):
            if not (v[0] is w[0] and torch.equal(v[1], w[1]) and v[2] == w[2]):
                bad.append(k)
        elif k.endswith(":dict"):
            if v.keys() != w.keys() or any(v[n] is not w[n] and v[n] != w[n] for n in v):
                bad.append(k)
        elif v != w:
            bad.append(k)
    return bad


def run_case(rank: int, name: str) -> dict:
    make, call, expect = CASES[name]
    torch.manual_seed(0)
    ref = make()
    torch.manual_seed(1)
    args, kwargs = call()
    model = copy.deepcopy(ref)
    before = _state(model)
    try:
        par = tpcompile.auto_parallelize(model, tp_mesh(2), example_inputs=args,
                                         example_kwargs=kwargs)
    except tpcompile.TPCompileError as e:
        changed = _same(before, _state(model))
        return {"expect": expect, "error": type(e).__name__, "message": str(e),
                "changed": changed}
    except Exception as e:  # noqa: BLE001 - reported: anything else is a defect
        return {"expect": expect, "error": f"raw {type(e).__name__}", "message": str(e),
                "changed": []}
    return {**numerics_result(ref, par, args, kwargs=kwargs,
                                  no_grad=NO_GRAD.get(name, ())), "expect": expect}


def wrapped(rank: int, kind: str) -> dict:
    """A model already wrapped for data parallelism: DDP, or FSDP2's ``fully_shard``."""
    import torch.distributed as dist
    torch.manual_seed(0)
    inner = MLP()
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        model: nn.Module = DistributedDataParallel(inner)
    else:
        from torch.distributed.fsdp import fully_shard
        from tests.harness import mesh
        model = fully_shard(inner, mesh=mesh((dist.get_world_size(),), ("dp",)))
    try:
        tpcompile.auto_parallelize(model, tp_mesh(2))
    except tpcompile.TPCompileError as e:
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": None}
