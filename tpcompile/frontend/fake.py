"""The skeleton (a meta-device copy of the user's model) and the fake tensors every
trace runs on."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv, free_unbacked_symbols

from ..errors import TraceError

# ----------------------------------------------------------------------------- skeleton

def skeleton(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` with every parameter and buffer on the meta device (tied
    parameters stay tied; hooks and Python attributes are copied). The device each
    tensor really lives on is kept, so traces see the devices the model runs on.
    ``param_dtype``: floating parameters in this dtype (FSDP2's mixed precision computes
    with parameters cast to it, and a trace bakes dtypes in)."""
    memo: dict[int, Any] = {}
    devices: dict[int, torch.device] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in memo:
            continue
        cast = param_dtype if isinstance(t, nn.Parameter) and t.is_floating_point() else None
        meta = torch.empty_like(t, device="meta", dtype=cast or t.dtype)
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
        devices[id(memo[id(t)])] = t.device
    try:
        sk = copy.deepcopy(model, memo)
    except Exception as e:  # noqa: BLE001 - an object deepcopy cannot take
        raise TraceError(f"could not copy {type(model).__name__} for tracing: {e}. tpcompile "
                         "traces a meta-device copy so your model is never changed; make "
                         "its attributes copyable (copy.deepcopy)") from e
    sk.__dict__["_tpcompile_devices"] = devices
    return sk


def follow_devices(sk: nn.Module, model: nn.Module) -> None:
    """Record where ``model``'s tensors live now (a meta-built model materialised on the
    mesh's device), so that later traces (a re-plan at another shape) fake them there and
    not on meta, where they would meet the call's CUDA inputs."""
    devices: dict[int, torch.device] = sk.__dict__["_tpcompile_devices"]
    real = {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}
    for name, t in [*sk.named_parameters(remove_duplicate=False),
                    *sk.named_buffers(remove_duplicate=False)]:
        r = real.get(name)
        if r is not None:
            devices[id(t)] = getattr(r, "_local_tensor", r).device


@contextlib.contextmanager
def fake_state(sk: nn.Module) -> Iterator[FakeTensorMode]:
    """Give the skeleton fake parameters and buffers on their real devices (no storage),
    in a fresh FakeTensorMode, for the duration of a trace."""
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    devices: dict[int, torch.device] = sk.__dict__.get("_tpcompile_devices", {})
    fakes: dict[int, Any] = {}
    saved = []
    for mod in sk.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in list(store.items()):
                if t is None:
                    continue
                device = devices.get(id(t), t.device)
                if device.type == "meta":
                    continue  # export fakes a meta tensor as it is: nothing to swap
                if id(t) not in fakes:
                    with mode:
                        f = torch.empty(t.shape, dtype=t.dtype, device=device)
                    fakes[id(t)] = nn.Parameter(f, t.requires_grad) if isinstance(t, nn.Parameter) else f
                saved.append((store, k, t))
                store[k] = fakes[id(t)]
    try:
        yield mode
    finally:
        for store, k, t in saved:
            store[k] = t


def fake_like(mode: FakeTensorMode, x: Any) -> Any:
    """A fake tensor of the same shape, dtype and device (a described tensor too)."""
    if isinstance(x, _Described):
        shape, dtype, device, grad = x.shape, x.dtype, x.device, x.requires_grad
    elif isinstance(x, torch.Tensor):
        shape, dtype, device, grad = tuple(x.shape), x.dtype, x.device, x.requires_grad
    else:
        return x
    with mode:
        return torch.empty(shape, dtype=dtype, device=device,
                           requires_grad=grad and (dtype.is_floating_point or dtype.is_complex))


@dataclass
class _Described:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool
    # in a dynamic trace, each size as the trace knows it: an int, or an expression of its
    # symbols (a block's input sizes in terms of the parent's), None if all are ints
    exprs: tuple[Any, ...] | None = None


def _describe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        exprs = tuple(s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in x.shape)
        return _Described(tuple(_hint(s) for s in x.shape), x.dtype, x.device, x.requires_grad,
                          exprs if any(not isinstance(e, int) for e in exprs) else None)
    return x


# the size a data-dependent dim (tokens routed to an expert) stands at in messages and
# shape arithmetic; inductor's fallback for unbacked sizes is the same number
UNBACKED_HINT = 8192


def _hint(s: Any) -> int:
    if isinstance(s, torch.SymInt):
        h = s.node.hint
        if h is not None:
            return int(h)
        if free_unbacked_symbols(s):
            return UNBACKED_HINT
        return int(s)
    return int(s)



def example_for(mode: FakeTensorMode, args: tuple | None, kwargs: dict | None) -> tuple[tuple, dict]:
    """The example inputs as fake tensors of ``mode`` (values do not matter to tracing)."""
    a, k = pytree.tree_map(lambda x: fake_like(mode, x), (tuple(args or ()), dict(kwargs or {})))
    return a, k


def cast_floats(tree: Any, dtype: torch.dtype) -> Any:
    import torch.utils._pytree as pytree
    return pytree.tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and
                           x.is_floating_point() else x, tree)
