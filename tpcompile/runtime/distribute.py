"""Stage 5: distribute. The dp mesh dimension goes to FSDP2; meta models are materialised.

``apply_fsdp`` runs after the rewrite: parameters are already DTensors on the tp mesh.
FSDP2 composes with them (its "TP path"): each parameter becomes a DTensor on the 2-D
(dp, tp) mesh, sharded over dp on dim 0 on top of its tp placement. Before a block runs,
FSDP all-gathers over dp and sets the tp DTensor back on the module, so the rewritten
graph's ``p.to_local()`` reads the tp-local shard, and the gradient it produces (a tp
DTensor) is reduce-scattered (averaged) over dp by FSDP in backward.

``materialize`` turns a model built under ``torch.device("meta")`` into real storage
after sharding, so every rank allocates only its own shards (``to_empty``), then fills
them with the model's init.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import TPCompileError

InitFn = Callable[[nn.Module], None]


def _fsdp_options() -> set[str]:
    from torch.distributed.fsdp import fully_shard
    return {n for n, p in inspect.signature(fully_shard).parameters.items()
            if p.kind is p.KEYWORD_ONLY and n != "mesh"}


def check_fsdp_options(options: dict[str, Any]) -> None:
    """Refuse unknown FSDP knobs before anything is changed."""
    known = _fsdp_options()
    bad = sorted(set(options) - known)
    if bad:
        raise TPCompileError(
            f"auto_parallelize: unknown option(s) {bad}. Options other than tpcompile's own "
            f"are passed to FSDP2 fully_shard, which accepts {sorted(known)}.")


def fsdp_targets(compiled: Any) -> list[str]:
    """Module paths to ``fully_shard`` one by one: every traced block member, deepest
    first (FSDP2 needs children wrapped before their parents). The root comes last."""
    paths = {m for unit in compiled.units for m in unit.members if m}
    return sorted(paths, key=lambda p: (-p.count("."), p))


def _strided_vector(p: nn.Parameter) -> bool:
    """A fused projection's bias: tp holds a slice of each part (strided on its only dim),
    which FSDP2 cannot shard again; it stays replicated over dp."""
    from torch.distributed.tensor.placement_types import _StridedShard
    return isinstance(p, DTensor) and p.dim() == 1 and any(
        isinstance(pl, _StridedShard) for pl in p.placements)


def _average(grad: torch.Tensor | None, group: Any) -> None:
    if grad is not None:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.AVG, group=group)


def _dp_placement(p: nn.Parameter) -> Any:
    """FSDP2's dp placement: dim 0 (its default), except for a fused projection whose tp
    shard is strided on dim 0 (a slice of each of q, k and v): two strided shards of one
    dim do not compose, so dp takes dim 1 there."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard
    if isinstance(p, DTensor) and any(isinstance(pl, _StridedShard) and pl.dim == 0
                                      for pl in p.placements) and p.dim() > 1:
        return Shard(1)
    return None


def apply_fsdp(model: nn.Module, compiled: Any, dp_mesh: DeviceMesh, **fsdp_kwargs: Any) -> nn.Module:
    """``fully_shard`` each block on ``dp_mesh``, then the root, passing ``fsdp_kwargs``
    (``reshard_after_forward``, ``mp_policy``, ``offload_policy``, ...) through."""
    from torch.distributed.fsdp import fully_shard
    check_fsdp_options(fsdp_kwargs)
    fsdp_kwargs.setdefault("shard_placement_fn", _dp_placement)
    kept = {p for p in model.parameters() if _strided_vector(p)}
    fsdp_kwargs["ignored_params"] = set(fsdp_kwargs.get("ignored_params") or ()) | kept
    for path in fsdp_targets(compiled):
        fully_shard(model.get_submodule(path), mesh=dp_mesh, **fsdp_kwargs)
    fully_shard(model, mesh=dp_mesh, **fsdp_kwargs)
    group = dp_mesh.get_group()
    for p in kept:  # what FSDP2 would do for them: the gradient averaged over dp
        p.register_post_accumulate_grad_hook(lambda q: _average(q.grad, group))
    return model


# ----------------------------------------------------------------------------- meta models

def on_meta(model: nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    metas = [t.is_meta for t in tensors]
    if any(metas) and not all(metas):
        names = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        raise TPCompileError(
            f"auto_parallelize: the model is partly on the meta device ({len(names)} of "
            f"{len(tensors)} tensors, e.g. {names[:3]}). Build it all under "
            f"torch.device('meta') (materialised sharded) or all on a real device.")
    return bool(metas) and all(metas)


def choose_init(model: nn.Module, init_fn: InitFn | None, seed: int) -> InitFn:
    """The function that fills a materialised model, decided before anything changes:
    ``init_fn`` if given, else ``model.init_weights(seed)``, else a Hugging Face model's
    own ``_init_weights`` per module, else ``reset_parameters`` of every module (module
    by module at full size, then sharded)."""
    if init_fn is not None:
        return init_fn
    if callable(getattr(model, "init_weights", None)) and _takes_seed(model.init_weights):
        return lambda m: m.init_weights(seed)  # type: ignore[operator]
    if callable(getattr(model, "_init_weights", None)) and hasattr(model, "config"):
        hf = model._init_weights  # a transformers PreTrainedModel: init_weights() takes no seed
        return lambda m: by_module(m, seed, hf, buffers=True)
    orphans = [f"{mn}.{pn}".strip(".") for mn, m in model.named_modules()
               for pn, _ in m.named_parameters(recurse=False)
               if not callable(getattr(m, "reset_parameters", None))]
    buffers = [n for n, _ in model.named_buffers()]
    if orphans or buffers:
        what = (f"parameters {orphans[:4]} belong to modules without reset_parameters"
                if orphans else f"buffers {buffers[:4]} would stay uninitialised")
        raise TPCompileError(
            f"auto_parallelize: cannot initialise the meta-device model {type(model).__name__}: "
            f"{what}. Give it an init_weights(seed) method or pass init_fn=.")
    return lambda m: by_module(m, seed, _reset_parameters)


def _takes_seed(fn: Any) -> bool:
    try:
        inspect.signature(fn).bind(0)
        return True
    except (TypeError, ValueError):
        return False


def _reset_parameters(mod: nn.Module) -> None:
    if callable(getattr(mod, "reset_parameters", None)):
        mod.reset_parameters()  # type: ignore[operator]


@torch.no_grad()
def by_module(model: nn.Module, seed: int, fill: Callable[[nn.Module], None],
              buffers: bool = False) -> None:
    """``fill(module)`` for every module in ``model.modules()`` order, from one RNG seeded
    with ``seed``: each module's own parameters (and buffers) swapped for plain full-size
    tensors (one module at a time, never the whole model), then each rank keeps its shard
    of what ``fill`` wrote, so the values equal those of the same loop on the unsharded
    model."""
    torch.manual_seed(seed)
    for mod in model.modules():
        slots = {("p", n): t for n, t in mod.named_parameters(recurse=False)}
        if buffers:
            slots.update({("b", n): t for n, t in mod.named_buffers(recurse=False)})
        if not slots:
            continue
        full = {k: torch.empty(t.shape, dtype=t.dtype, device=_local(t).device)
                for k, t in slots.items()}
        for k, t in slots.items():  # what fill leaves alone stays as it was (NaN: found)
            if not isinstance(t, DTensor):
                full[k].copy_(t)
            elif t.is_floating_point():
                full[k].fill_(float("nan"))
        _fill_plain(mod, full, fill)
        for k, t in slots.items():
            copy_full_into(t, full[k])


def _fill_plain(mod: nn.Module, full: dict[tuple[str, str], torch.Tensor],
                fill: Callable[[nn.Module], None]) -> None:
    """Run ``fill(mod)`` with its parameters and buffers temporarily swapped for ``full``."""
    params, bufs = dict(mod._parameters), dict(mod._buffers)
    try:
        for (kind, n), t in full.items():
            if kind == "p":
                mod._parameters[n] = nn.Parameter(t, requires_grad=False)
            else:
                mod._buffers[n] = t
        fill(mod)
        for kind, n in full:
            now = mod._parameters[n] if kind == "p" else mod._buffers[n]
            full[(kind, n)] = now.detach()  # type: ignore[union-attr]
    finally:
        mod._parameters.clear()
        mod._parameters.update(params)
        mod._buffers.clear()
        mod._buffers.update(bufs)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def shard_like(full: torch.Tensor, p: DTensor) -> DTensor:
    """``full`` as a DTensor of ``p``'s mesh and placements (any, FSDP's strided dp shard
    included), this rank's shard cut from its own copy: no collective."""
    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)


@torch.no_grad()
def copy_full_into(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full-size value into ``p``, keeping only this rank's shard if ``p`` is a
    DTensor."""
    if isinstance(p, DTensor):
        p.to_local().copy_(shard_like(full.to(p.dtype), p).to_local())
    else:
        p.copy_(full.to(p.dtype))


def take_full_state_dicts(model: nn.Module) -> None:
    """Let ``load_state_dict`` take full tensors, as the unsharded model does: a
    ``load_state_dict`` pre-hook on each module holding a DTensor parameter or buffer
    turns a plain tensor of the full shape, given for it, into a DTensor of the same
    placements (this rank's shard cut from it; no collective, so a rank may load alone),
    which torch then copies into the shards. DTensors given (a sharded ``state_dict``)
    load as before; a tensor of another shape is left to torch's size-mismatch error;
    ``assign=True`` is not served (the program would read a plain tensor as its shard:
    refused at the next call)."""
    from torch.distributed.fsdp import FSDPModule
    owner: dict[nn.Module, Any] = {}  # module -> the innermost FSDP module sharding it
    for fm in model.modules():  # (outer ones first)
        if isinstance(fm, FSDPModule):
            owner.update((m, fm) for m in fm.modules())
    for mod in model.modules():
        if any(isinstance(t, DTensor) for t in [*mod._parameters.values(), *mod._buffers.values()]):
            mod.register_load_state_dict_pre_hook(
                functools.partial(_shard_full_tensors, fsdp=owner.get(mod)))


def _shard_full_tensors(mod: nn.Module, state_dict: dict, prefix: str, local_metadata: dict,
                        *_: Any, fsdp: Any = None) -> None:
    # torch hands the hooks its own shallow copy of the caller's dict: the caller's
    # dict and tensors are left as they were. With assign=True the given tensors would
    # become the parameters: left as given (a plain one is refused at the next call)
    if local_metadata.get("assign_to_params_buffers"):
        return
    if fsdp is not None:  # its sharded parameters on the module, not the unsharded tp ones
        fsdp.reshard()    # a forward may have left (the root's are, until a backward)
    for name, t in [*mod._parameters.items(), *mod._buffers.items()]:
        given = state_dict.get(prefix + name)
        if isinstance(t, DTensor) and isinstance(given, torch.Tensor) and \
                not isinstance(given, DTensor) and given.shape == t.shape and not given.is_meta:
            state_dict[prefix + name] = shard_like(given.detach().to(t.device), t)


@torch.no_grad()
def materialize_sharded(model: nn.Module, device: str | torch.device, init: InitFn) -> None:
    """Allocate this rank's shards on ``device`` and fill them with ``init``. A value the
    init left unwritten would be garbage, so every float tensor is first set to NaN and
    checked after."""
    model.to_empty(device=device)
    for t in [*model.parameters(), *model.buffers()]:
        if _local(t).is_floating_point():
            _local(t).fill_(float("nan"))
    init(model)
    missed = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
              if _local(t).is_floating_point() and bool(_local(t).isnan().any())]
    if missed:
        raise TPCompileError(
            f"auto_parallelize: after materialising the meta-device model, the init left "
            f"{len(missed)} tensor(s) unset (NaN), e.g. {missed[:4]}. The init (init_fn, "
            f"init_weights or reset_parameters) must write every parameter and buffer.")


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage this rank holds (its shards only)."""
    return sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
