"""Stage 1: trace a module into a torch.fx graph and annotate every node with its shape.

Repeated blocks (the children of an ``nn.ModuleList`` / ``nn.ModuleDict``) are traced as
opaque calls in their parent's graph and traced on their own once per distinct
*signature*, so planning cost grows with the number of distinct blocks, not the depth.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .errors import TPCompileError, TraceError, UnsupportedError

TracerName = Literal["fx", "export"]


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool = False  # in the traced run: whether a gradient can flow back to it

    @property
    def rank(self) -> int:
        return len(self.shape)


def find_blocks(module: nn.Module) -> dict[str, nn.Module]:
    """Module path -> block, for every child of a ModuleList/ModuleDict below ``module``
    that is reachable without entering another block."""
    found: dict[str, nn.Module] = {}

    def visit(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            path = f"{prefix}{name}"
            if isinstance(mod, (nn.ModuleList, nn.ModuleDict)) and not _is_torch_leaf(child):
                found[path] = child
            else:
                visit(child, path + ".")

    visit(module, "")
    return found


def _is_torch_leaf(m: nn.Module) -> bool:
    return m.__module__.startswith("torch.nn") and not isinstance(m, nn.Sequential)


def block_signature(block: nn.Module) -> tuple:
    """Blocks with equal signatures trace to the same graph (same class, same parameter and
    buffer shapes, same plain Python settings, the very same other attribute objects: an
    activation function held as an attribute is baked into the traced graph), so one
    analysis serves them all."""
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters())
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in block.named_buffers())
    settings = []
    for path, sub in block.named_modules():
        for k, v in sorted(vars(sub).items()):
            if k.startswith("_") or k == "training":
                continue
            if isinstance(v, (int, float, bool, str, type(None))) or (
                isinstance(v, tuple) and all(isinstance(e, (int, float, bool, str)) for e in v)
            ):
                settings.append((path, k, v))
            else:  # a function, a tensor, a config object: the same object, or not the same
                settings.append((path, k, ("id", id(v))))
    return (type(block), params, buffers, tuple(settings))


class _BlockTracer(fx.Tracer):
    def __init__(self, opaque: Iterable[nn.Module]) -> None:
        super().__init__()
        self.proxy_buffer_attributes = True  # buffers sliced by a traced length stay in the graph
        self._opaque = {id(m) for m in opaque}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._opaque or _is_torch_leaf(m)


def trace(module: nn.Module, *, tracer: TracerName = "fx", where: str = "") -> fx.GraphModule:
    """Trace ``module``'s forward with its own blocks kept as opaque calls."""
    if tracer != "fx":
        raise UnsupportedError(f"tracer {tracer!r} is not available yet; use tracer='fx'")
    blocks = find_blocks(module)
    t = _BlockTracer(blocks.values())
    try:
        graph = t.trace(module)
    except Exception as e:  # the tracer raises many types; we add where it happened
        frame = _user_frame(e)
        label = where or type(module).__name__
        raise TraceError(
            f"could not trace {label} ({type(module).__name__}) with torch.fx: {e}"
            f"{frame}. Make the forward free of Python control flow on tensor values or "
            "shapes, or mark the offending function with torch.fx.wrap."
        ) from e
    return fx.GraphModule(module, graph, class_name=type(module).__name__)


def _user_frame(e: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename}:{f.lineno}: {f.line})"


def tensor_info(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return TensorInfo(tuple(int(s) for s in val.shape), val.dtype, val.requires_grad)
    if isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val):
        return [tensor_info(v) for v in val]
    return None


class _ShapeProp(fx.Interpreter):
    """Runs the graph on fake tensors; stores ``node.meta['tpc']`` (a TensorInfo, a list
    of them for tuple outputs, or None) and the fake args each opaque block got."""

    def __init__(self, gm: fx.GraphModule, opaque: set[str], on_block: Callable) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # our errors from nested blocks keep their own message
        self._opaque = opaque
        self._on_block = on_block

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        n.meta["tpc"] = tensor_info(out)
        n.meta["tpc_val"] = out if not isinstance(out, torch.Tensor) else None
        return out

    def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
        if target in self._opaque:
            return self._on_block(target, args, kwargs)
        return super().call_module(target, args, kwargs)


def propagate_shapes(
    gm: fx.GraphModule,
    args: tuple,
    mode: FakeTensorMode,
    opaque: set[str] = frozenset(),  # type: ignore[assignment]
    on_block: Callable | None = None,
    where: str = "",
) -> Any:
    """Annotate ``gm``'s nodes with shapes from running it on fake ``args``."""
    def default_block(target: str, a: Any, k: Any) -> Any:
        return gm.get_submodule(target)(*a, **k)

    interp = _ShapeProp(gm, set(opaque), on_block or default_block)
    try:
        with mode:
            return interp.run(*args)
    except TPCompileError:  # raised while planning a nested block: already clear
        raise
    except Exception as e:
        raise TraceError(
            f"could not run {where or gm.__class__.__name__} on example inputs of shapes "
            f"{[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]}: {e}. "
            "Pass example_inputs=(...) that the model accepts."
        ) from e


def synthesize_inputs(model: nn.Module, gm: fx.GraphModule, batch: int, seq: int) -> tuple:
    """Example inputs when the user gives none: token ids for a placeholder consumed by an
    Embedding, activations [batch, seq, features] for one consumed by a Linear or a norm
    (looking inside a block for its first such layer)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def make(mod: nn.Module) -> torch.Tensor | None:
        if isinstance(mod, nn.Embedding):
            return torch.zeros(batch, seq, dtype=torch.long, device=device)
        if isinstance(mod, nn.Linear):
            return torch.zeros(batch, seq, mod.in_features, dtype=dtype, device=device)
        if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) and mod.normalized_shape:
            return torch.zeros(batch, seq, *mod.normalized_shape, dtype=dtype, device=device)
        for sub in mod.children():  # a block: its first layer that tells the width
            made = make(sub)
            if made is not None:
                return made
        return None

    out = []
    for ph in (n for n in gm.graph.nodes if n.op == "placeholder"):
        made = None
        for user in ph.users:
            if user.op == "call_module":
                made = make(gm.get_submodule(user.target))
            if made is not None:
                break
        if made is None:
            if ph.args:  # has a default value
                break
            raise TraceError(
                f"cannot guess an example value for input {ph.target!r} of "
                f"{type(model).__name__}; pass example_inputs=(...) to tpcompile"
            )
        out.append(made)
    return tuple(out)
