"""``auto_parallelize``: trace -> analyze -> plan -> rewrite -> distribute, in that order.

Everything that can fail runs before the first change to the user's model; the commit
at the end only swaps parameters for DTensors and installs the rewritten forwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import sympy
import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, distribute_tensor
import torch.utils._pytree as pytree
from torch.nn.utils import parametrize

from .analysis import layer_of, layer_params
from .debug import dump
from .errors import PlanError, TPCompileError, UnsupportedError, warn
from .frontend import cast_floats, follow_devices, skeleton
from .frontend.guards import guards_for
from .planning import Compiled, Plan, Unit, compile_model, placement
from .rewrite import rewrite
from .rewrite.codegen import read_placement
from .runtime import Program, install
from .runtime.program import UNSPLITTABLE, config_read, hook_dicts, watch_hooks
from .runtime.agreement import InputCheck, agree_on_planning
from .runtime.checkpointing import (CheckpointingError, blocks_to_checkpoint, checkpoint_count,
                                    from_transformers, inert_hook, top_blocks,
                                    transformers_flagged)


def split_mesh(mesh: DeviceMesh) -> tuple[DeviceMesh, DeviceMesh | None]:
    """(tp mesh, dp mesh or None) from a 1-D mesh or a 2-D ("dp", "tp") mesh."""
    if mesh.ndim == 1:
        return mesh, None
    names = mesh.mesh_dim_names
    if mesh.ndim == 2 and names is not None and set(names) == {"dp", "tp"}:
        return mesh["tp"], mesh["dp"]
    raise TPCompileError(
        f"mesh {mesh} must be 1-D (all tensor parallel) or 2-D with mesh_dim_names "
        f"('dp', 'tp'); got ndim={mesh.ndim}, names={names}"
    )


def load_plan(plan: Plan | str | Path | None) -> Plan | None:
    if plan is None or isinstance(plan, Plan):
        return plan
    from .planning.files import load
    return load(plan)


def placements_for(unit: Unit, member: str, module: nn.Module) -> dict[str, list[Placement]]:
    """Absolute parameter name -> placements on the tp mesh, for one traced member."""
    out: dict[str, list[Placement]] = {}
    kinds = {l.name: l.kind for n in unit.gm.graph.nodes if (l := layer_of(n)) is not None}
    for rel, style in unit.styles.items():
        for pname, name in layer_params(module, rel).items():
            full = f"{member}.{name}" if member else name
            pl = placement(kinds.get(rel, "linear"), style, pname, unit.prop.packed.get(rel),
                           rel in unit.prop.grouped)
            out[full] = [pl if pl is not None else Replicate()]
    return out


def distribute_parameters(model: nn.Module, placements: dict[str, list[Placement]],
                          tp_mesh: DeviceMesh) -> None:
    """Swap every parameter for a DTensor on the tp mesh (sharded where the plan says,
    replicated elsewhere). New values are all made first, then set, so a failure midway
    leaves the model as it was."""
    new: list[tuple[nn.Module, str, nn.Parameter]] = []
    made: dict[int, nn.Parameter] = {}  # a tied parameter stays one parameter
    wanted: dict[int, list[Placement]] = {}  # by identity: a tied one under any of its names
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in placements:
            wanted.setdefault(id(p), placements[name])
    for name, p in model.named_parameters(remove_duplicate=False):
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if id(p) not in made:
            pl = wanted.get(id(p), [Replicate()])
            dt = distribute_tensor(p.detach(), tp_mesh, pl)
            made[id(p)] = nn.Parameter(dt, requires_grad=p.requires_grad)
        new.append((owner, attr, made[id(p)]))
    for owner, attr, param in new:
        owner.register_parameter(attr, param)


def auto_parallelize(model: nn.Module, mesh: DeviceMesh, *, example_inputs: tuple | None = None,
                     example_kwargs: dict | None = None, sequence_parallel: bool = True,
                     plan: Plan | str | Path | None = None, on_indivisible: str = "error",
                     tracer: str = "auto", init_fn: Callable[[nn.Module], None] | None = None,
                     seed: int = 0, loss_parallel: bool = False, materialize: bool = True,
                     dynamic: bool | None = None, compile: bool | dict = False,
                     activation_checkpointing: str | int | bool | None = None,
                     **fsdp_kwargs: Any) -> nn.Module:
    """Make ``model`` tensor parallel on ``mesh`` (in place; returns it).

    Args:
        model: any ``nn.Module``: a Hugging Face model, reference-style code, your own.
        mesh: 1-D (all tensor parallel) or 2-D ``("dp", "tp")`` (dp goes to FSDP2).
        example_inputs / example_kwargs: a call the model accepts (positional and keyword),
            used to trace it; batch and sequence sizes stay free. Without them, one tensor
            input is guessed from the first layer.
        tracer: ``"auto"`` (``torch.export``, then fx if export fails), ``"export"``, ``"fx"``.
        plan: a :class:`Plan` (or a plan file) to apply instead of detecting one.
        loss_parallel: the logits of a colwise head stay vocab-sharded (a DTensor
            ``Shard(-1)`` on the tp mesh), for a cross-entropy under
            ``torch.distributed.tensor.parallel.loss_parallel()``.
        materialize: a meta-device model is materialised sharded on the mesh's device
            (``init_fn(model)``, else ``model.init_weights(seed)``, else each module's
            ``reset_parameters``); ``False`` leaves it on meta, sharded.
        dynamic: plan with batch and sequence sizes symbolic from the start, so one
            program serves every size (default: only with ``compile``; otherwise the first
            program is specialised to the example's sizes, which plans faster, and a
            dynamic one is made on the first call at other sizes).
        compile: ``torch.compile`` the parallel model for you, ``fullgraph=True``: on a
            1-D mesh the whole forward, on a 2-D mesh each FSDP block's forward (FSDP2's
            hooks stay outside, as torchtitan does). A dict is passed to ``torch.compile``
            (``{"backend": "aot_eager"}``, ``{"mode": "max-autotune"}``).
        activation_checkpointing: ``"block"`` (or ``True``) runs every block (the layers of
            the model's ModuleLists) under non-reentrant ``torch.utils.checkpoint``: it keeps
            its inputs, and backward runs its forward again, collectives included; ``k``
            checkpoints the first k blocks (``Suggestion.checkpoint_blocks``); ``None`` or
            ``"none"``: off. Dropout inside sharded regions draws the same masks again.
        **fsdp_kwargs: passed to FSDP2 ``fully_shard`` on a 2-D mesh.

    The returned module takes the same inputs as ``model`` (full tensors on every rank)
    and returns the same full outputs on every tp rank; gradients of every parameter
    equal the unsharded model's. On failure the model is left untouched.

    >>> model = tpcompile.auto_parallelize(model, mesh, example_kwargs={"input_ids": ids})
    """
    try:  # planning: nothing below changes the model, and a failure stops every rank
        _refuse_parallelized(model)
        tp_mesh, dp_mesh = split_mesh(mesh)
        from .runtime.distribute import (check_fsdp_options, choose_init, materialize_sharded,
                                         on_meta, take_full_state_dicts)
        check_fsdp_options(fsdp_kwargs)
        init = choose_init(model, init_fn, seed) if materialize and on_meta(model) else None
        if init_fn is not None and init is None and materialize:
            raise TPCompileError("init_fn is for models built on the meta device; this model "
                                 "already has values. Drop init_fn or build it under "
                                 "torch.device('meta').")
        if dp_mesh is None and fsdp_kwargs:
            raise TPCompileError(f"FSDP options {sorted(fsdp_kwargs)} need a 2-D ('dp', 'tp') mesh; "
                                 f"got a 1-D mesh {mesh}")
        tp = tp_mesh.size()
        policy = fsdp_kwargs.get("mp_policy")
        param_dtype = getattr(policy, "param_dtype", None) if dp_mesh is not None else None
        sk = skeleton(model, param_dtype)
        hf_flagged = transformers_flagged(model)
        for name in hf_flagged:  # traced as the plain forward; checkpointed below, our way
            sk.get_submodule(name).gradient_checkpointing = False
        input_dtype = param_dtype if getattr(policy, "cast_forward_inputs", True) else None
        if input_dtype is not None:
            example_inputs, example_kwargs = cast_floats((example_inputs, example_kwargs), input_dtype)
        options = dict(tp=tp, sequence_parallel=sequence_parallel, on_indivisible=on_indivisible,
                       tracer=tracer, input_dtype=input_dtype,
                       packing=dp_mesh is None or param_dtype is None)
        dynamic = bool(compile) if dynamic is None else dynamic
        compiled = compile_model(model, example_inputs=example_inputs, example_kwargs=example_kwargs,
                                 given=load_plan(plan), skeleton=sk, dynamic=dynamic,
                                 **options)  # type: ignore[arg-type]
        _refuse_unsupported_layers(model, compiled)
        blocks = top_blocks(model, [m for u in compiled.units for m in u.members])
        _say_per_block_lost(model, compiled, activation_checkpointing, hf_flagged, dp_mesh, blocks)
        activation_checkpointing = from_transformers(model, hf_flagged,
                                                     activation_checkpointing, blocks)
        group = tp_mesh.get_group().group_name
        if loss_parallel and not any(
                "" in u.members and u.prop.gathered_outputs for u in compiled.units):
            raise UnsupportedError(
                "loss_parallel=True keeps a colwise head's logits sharded, but no output of "
                f"{type(model).__name__} comes from a colwise layer (the plan has "
                f"{compiled.plan.modules[0].styles or 'no sharded layers'} at the root). Drop "
                "loss_parallel, or end the model with a Linear head.")
        programs = _programs(compiled, sk, tp, group, loss_parallel)
        _warn_unsplittable(compiled, programs, tp)
        to_checkpoint = blocks_to_checkpoint(activation_checkpointing, blocks,
                                             type(model).__name__)
        placements: dict[str, list[Placement]] = {}
        for unit in compiled.units:
            for member in unit.members:
                placements.update(placements_for(unit, member, model.get_submodule(member)))
    except Exception as e:  # noqa: BLE001 - re-raised, on every rank
        agree_on_planning(mesh, e)
        raise
    agree_on_planning(mesh, None)

    def replan(root: nn.Module, args: tuple, kwargs: dict) -> None:
        """A call no program fits (another input structure, mode, or shapes): trace again
        with the same plan and add the programs. Like torch.compile's automatic dynamic
        shapes, the first programs are specialised to the example's shapes (the cheap
        export) and every later trace keeps batch and sequence dynamic, so one more
        program serves every size after. A length sequence parallelism cannot split (a
        decode step of one token, an odd prompt) gets a program without it: same
        parameters, all-reduces instead of reduce-scatter and all-gather."""
        flat, spec = pytree.tree_flatten((args, kwargs))
        held = root.__dict__["_tpcompile_runtime"].programs
        split_fails = any(p.sp and (p.fits(root.training, spec, flat) or "").startswith(
            UNSPLITTABLE) for p in held)
        variants = [sp for sp in (True, False) if sp is False or
                    (sequence_parallel and not split_fails)]
        for sp in variants:
            again = compile_model(model, example_inputs=args, example_kwargs=kwargs,
                                  given=compiled.plan, bound=True, skeleton=sk, dynamic=True,
                                  **{**options, "sequence_parallel": sp})  # type: ignore[arg-type]
            if not _sharded_styles(again.plan).items() <= _sharded_styles(compiled.plan).items():
                raise UnsupportedError(
                    f"{type(model).__name__} computes with different layers for this call "
                    "than for the one it was planned on, so one tensor-parallel plan cannot "
                    "serve both")
            inlined = _inlined_for_outputs(again)
            _refuse_hooked_blocks_inline(root, compiled, inlined)
            late = [m for m in to_checkpoint if m in inlined]
            if late and root.training and torch.is_grad_enabled():
                warn(f"tpcompile: this call computes {late[0]}"
                     + (f" (and {len(late) - 1} more)" if len(late) > 1 else "")
                     + " inline in the root's program (it asks for outputs transformers "
                     "collects inside them), where they are not checkpointed: it keeps their "
                     "activations for backward")
            _refuse_misplaced(root, again)
            progs = _programs(again, sk, tp, group, loss_parallel)
            for unit, prog in zip(again.units, progs):
                for member in unit.members:  # into the model called (a deepcopy's own)
                    install(root.get_submodule(member), prog)
            top = next(p for u, p in zip(again.units, progs) if "" in u.members)
            if top.fits(root.training, spec, flat) is None:
                return

    check = InputCheck(group, mesh.device_type)
    snapshot = _Snapshot(model)
    try:
        for name in hf_flagged:
            model.get_submodule(name).gradient_checkpointing = False
        drop_inert_hooks(model, {m for u in compiled.units for m in u.members})
        distribute_parameters(model, placements, tp_mesh)
        for unit, prog in zip(compiled.units, programs):
            for member in unit.members:
                root = member == ""
                install(model.get_submodule(member), prog, replan if root else None,
                        member or type(model).__name__, check if root else None)
        model.__dict__["_tpcompile_plan"] = compiled.plan
        model.__dict__["_tpcompile_runtime"].config_seen = config_read(model)
        unchecked = [m for u in compiled.units for m in u.t.unchecked]
        if unchecked:  # planned frozen: a call that wants gradients is refused
            model.__dict__["_tpcompile_runtime"].frozen_only = unchecked[0]
        if dp_mesh is not None:
            from .runtime.distribute import apply_fsdp
            apply_fsdp(model, compiled, dp_mesh, **fsdp_kwargs)
        if init is not None:
            materialize_sharded(model, mesh.device_type, init)
            follow_devices(sk, model)
        if compile:  # per block where a block is checkpointed: the checkpoint wraps it
            _compile(model, compiled, programs, dp_mesh is not None or bool(to_checkpoint),
                     compile if isinstance(compile, dict) else {})
        if to_checkpoint:
            from .runtime.checkpointing import apply_checkpointing
            apply_checkpointing(model, to_checkpoint)
        take_full_state_dicts(model)  # load_state_dict(full tensors), as before
        for finish in ON_COMMIT:  # (hf: a transformers model's own save_pretrained)
            finish(model)
        watch_hooks(model.__dict__["_tpcompile_runtime"], [
            (n or type(model).__name__, m) for n, m in model.named_modules()
            if "_tpcompile_runtime" not in m.__dict__])
    except BaseException:
        snapshot.restore()
        raise
    return model


# Called on each model auto_parallelize makes, last: later stages (hf) add to it, as
# this module cannot import them.
ON_COMMIT: list[Callable[[nn.Module], None]] = []


def _warn_unsplittable(compiled: Compiled, programs: list[Program], tp: int) -> None:
    """Sequence parallelism asked for, but the example's sequence cannot be split over tp
    (a ViT's 16 patches and a class token at tp 2): calls like it run the program without
    it. Right, but not what was asked for, so said once, here."""
    root = next((p for u, p in zip(compiled.units, programs) if "" in u.members), None)
    if root is None or not root.sp or tp == 1:
        return
    odd = sorted({int(e) for e in root.divisible if e.is_Integer and int(e) % tp})
    if odd:
        warn(f"tpcompile: sequence_parallel=True, but the example inputs' size {odd[0]} "
             "along the dim sequence parallelism splits (the sequence; the batch of a "
             f"sequence-first [T, B, E] layout) is not divisible by tp = {tp}: calls like it "
             "run the program without sequence parallelism (activations whole on every rank "
             "between layers). Use sizes divisible by tp (a register or padding token, "
             "say), or pass sequence_parallel=False.")


def _compile(model: nn.Module, compiled: Compiled, programs: list[Program], per_block: bool,
             options: dict) -> None:
    """``torch.compile`` the programs' entry points in place (module names, parameters and
    hooks stay as they are): the root's ``forward`` on a 1-D mesh, where the whole model
    is one graph, else each block's ``forward``, so that FSDP2's hooks, which run around
    ``forward``, stay eager."""
    random = [u.plan.path or "the root" for u, p in zip(compiled.units, programs)
              if "on_rank_rng" in p.code]
    if random:
        raise UnsupportedError(
            f"compile=True: {', '.join(random)} of {type(model).__name__} draw(s) dropout "
            "inside sharded regions, from each rank's own random stream, which torch.compile "
            "cannot trace. Build the model with dropout 0 (or compile it for eval), or leave "
            "compile off")
    options = {"fullgraph": True, **options}
    members = [m for u in compiled.units for m in u.members
               if (m != "") == per_block]
    for name in members or [""]:
        module = model.get_submodule(name)
        module.forward = torch.compile(module.__dict__["forward"], **options)  # type: ignore[method-assign]


def _sharded_styles(plan: Plan) -> dict[str, str]:
    """The styles that decide parameter placements (sequence parallelism does not)."""
    return {k: v for k, v in plan.layer_styles().items() if v != "sequence_parallel"}


def _refuse_parallelized(model: nn.Module) -> None:
    if "_tpcompile_plan" in model.__dict__:
        raise TPCompileError(f"{type(model).__name__} was already parallelized by tpcompile; "
                             "call auto_parallelize once, on the original model")
    dt = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    if dt:
        raise UnsupportedError(
            f"{type(model).__name__} already has DTensor parameters ({', '.join(dt[:3])}"
            f"{', ...' if len(dt) > 3 else ''}): it was parallelized before (parallelize_module, "
            "FSDP2 or distribute_tensor). Pass the original, unsharded model to "
            "auto_parallelize; it does tensor parallelism and FSDP2 itself.")
    wrappers = {"DistributedDataParallel", "FullyShardedDataParallel", "DataParallel"}
    if type(model).__name__ in wrappers:
        raise UnsupportedError(f"the model is wrapped in {type(model).__name__}; pass the "
                               "module inside it (model.module) to auto_parallelize")


def _programs(compiled: Compiled, sk: nn.Module, tp: int, group: str,
              loss_parallel: bool) -> list[Program]:
    out = []
    for u in compiled.units:
        try:
            rw = rewrite(u.t, u.prop, u.styles, u.q_nodes, tp, group, u.contracts,
                         loss_parallel=loss_parallel and "" in u.members)
        except PlanError:
            raise
        except Exception as e:  # a bug of ours must not look like the user's fault
            raise PlanError(f"internal error rewriting {u.plan.path or 'the root'}: {e}") from e
        dump(f"{u.plan.path or 'root'}.3-rewritten.txt", rw.code)
        q_dims = {p: u.prop.layouts[p].dim for p in u.t.inputs
                  if u.prop.layouts.get(p) is not None and u.prop.layouts[p].kind == "Q"}
        t = u.t
        out.append(Program(rw.forward, rw.code, sk.get_submodule(u.members[0]).training,
                           t.in_spec, dict(t.constants),
                           guards_for(t.inputs, t.positions, q_dims, tp), t.ranges,
                           len(t.outputs), t.out_spec, [f for _, f in t.mutations], t.positions,
                           t.out_type, _sequence_sizes(u), tp, compiled.plan.sequence_parallel,
                           t.conditions))
    return out


def _sequence_sizes(u: Unit) -> list[Any]:
    """The symbolic sizes a program splits over tp for sequence parallelism."""
    out: list[Any] = []
    for n in u.q_nodes:
        lay, val = u.prop.layouts.get(n), n.meta.get("val")
        if lay is None or lay.kind != "Q" or not isinstance(val, torch.Tensor):
            continue
        size = val.shape[lay.dim]
        expr = sympy.sympify(size.node.expr if isinstance(size, torch.SymInt) else int(size))
        if expr not in out:
            out.append(expr)
    return out


def _refuse_unsupported_layers(model: nn.Module, compiled: Compiled) -> None:
    """The rewrite computes every layer inside a traced module inline (on local shards),
    so hooks registered on those layers would silently stop running, and parametrized
    weights would be read as plain ones: refuse instead."""
    traced = {m for u in compiled.units for m in u.members}
    for name, layer in model.named_modules():
        if name in traced:
            continue
        if parametrize.is_parametrized(layer):
            raise UnsupportedError(
                f"{name} has parametrized weights ({', '.join(layer.parametrizations)}"
                ", e.g. weight_norm), which tpcompile cannot shard yet. Remove the "
                "parametrization (torch.nn.utils.parametrize.remove_parametrizations) "
                "before auto_parallelize.")
        if any(not inert_hook(h) for d in hook_dicts(layer) for h in d.values()):
            raise UnsupportedError(
                f"{name} has hooks, which tpcompile's rewrite would not run "
                "(it computes this layer inline on local shards). Remove the hooks "
                "before auto_parallelize, or fold what they do into the forward.")


def _inlined_for_outputs(compiled: Compiled) -> list[str]:
    """The blocks its programs compute inline because the call has transformers collect
    outputs inside them (attention maps, router logits), by module path."""
    return sorted({f"{m}.{r}" if m else r for u in compiled.units for m in u.members
                   for r in u.t.for_outputs})


def _say_per_block_lost(model: nn.Module, compiled: Compiled, checkpointing: Any,
                        hf_flagged: list[str], dp_mesh: DeviceMesh | None,
                        blocks: list[str]) -> None:
    """Blocks the call computes inline in the root's program, because it asks for outputs
    transformers collects inside them (attention maps, router logits), are not blocks:
    activation checkpointing asked for with no block left is refused; checkpointing and
    FSDP2's per-block gathers not applying to them is said once."""
    inlined = _inlined_for_outputs(compiled)
    if not inlined:
        return
    name = type(model).__name__
    where = f"{inlined[0]}" + (f" (and {len(inlined) - 1} more)" if len(inlined) > 1 else "")
    why = (f"the call {name} is planned on asks for outputs transformers collects inside "
           f"{where} (output_attentions or output_router_logits), so those layers are computed "
           "inline in the root's program")
    asked = checkpoint_count(checkpointing, len(inlined), name) > 0
    if asked and not blocks:
        raise CheckpointingError(
            f"activation_checkpointing={checkpointing!r}: {why}, where no block is "
            "checkpointed. Plan on a call without those outputs, or drop the option")
    lost = []
    if hf_flagged or asked:
        lost.append("activation checkpointing (transformers' gradient checkpointing too) does "
                    "not apply to them")
    if dp_mesh is not None:
        lost.append("FSDP2 gathers their parameters with the root's, not one layer at a time")
    if lost:
        warn(f"tpcompile: {why}: {'; '.join(lost)}. Planning on a call without those "
             "outputs keeps the layers as blocks")


def _refuse_misplaced(root: nn.Module, now: Compiled) -> None:
    """A re-plan's programs read each parameter under the placement their plan gives the
    layers reading it; the model holds it as the first plan placed it. Where the two
    differ (a layer now in another program whose plan says otherwise) the program would
    read a shard as the whole or the whole as a shard: refused, never computed."""
    for unit in now.units:
        for member in unit.members:
            for ph, fqn in unit.t.params.items():
                if not ph.users:  # a tied weight's other name, unread by this call
                    continue
                name = f"{member}.{fqn}" if member else fqn
                p = root.get_parameter(name)
                if not isinstance(p, DTensor):
                    continue  # replaced after planning: refused by name when read
                need = read_placement(ph, unit.styles, unit.prop) or Replicate()
                if p.placements[-1] != need:
                    raise UnsupportedError(
                        f"this call's program would read {name} as {need} over tp, but the "
                        f"model holds it as {p.placements[-1]} (placed by the plan of the call "
                        "it was parallelized on, whose structure differs). Call it as it was "
                        "planned, or auto_parallelize a fresh copy with example inputs of this "
                        "call's structure")


def _refuse_hooked_blocks_inline(root: nn.Module, before: Compiled, now_inline: list[str]) -> None:
    """A re-plan may compute inline a block the first plan ran as a program of its own (a
    call asking for outputs transformers collects inside the decoder layers: attention
    weights, router logits). Hooks on it would not run there: FSDP2's, which gather its
    parameters over dp, or the user's. Refused, with the way to plan it so."""
    inlined = set(now_inline) & {m for u in before.units for m in u.members}
    for name, m in root.named_modules():
        if name in inlined and any(not inert_hook(h) for d in hook_dicts(m) for h in d.values()):
            raise UnsupportedError(
                f"this call computes {name} ({type(m).__name__}) inline in the root's program "
                "(it asks for outputs transformers collects inside it: output_attentions or "
                "output_router_logits), but it was planned as a block of its own and has hooks "
                "that would not run there (FSDP2's, which gather its parameters over dp, or "
                "yours). Ask for those outputs when parallelizing (in the model's config, or "
                "example_kwargs={..., 'output_router_logits': True}) so the plan computes those "
                "layers inline from the start")


def drop_inert_hooks(model: nn.Module, members: set[str]) -> None:
    """Remove transformers' hooks (``inert_hook``) from the layers computed inline, where
    no hook runs: the input-require-grads hook on the embedding, the output-capturing
    hooks on attention modules (what they collect was traced as outputs). Blocks and the
    root keep theirs (they run hooks; the capturing ones stay inert there, as nothing
    activates them outside transformers' own forward)."""
    for name, m in model.named_modules():
        if name not in members:
            for k in [k for k, h in m._forward_hooks.items() if inert_hook(h)]:
                del m._forward_hooks[k]


class _Snapshot:
    """What the commit changes on each module (parameters, an instance ``forward``, the
    class FSDP2 swaps in, hooks), recorded so a failure midway can put it all back."""

    _KEYS = ("forward", "_tpcompile_code", "_tpcompile_runtime", "_tpcompile_plan",
             "gradient_checkpointing", "save_pretrained")

    def __init__(self, model: nn.Module) -> None:
        self.saved = [(m, m.__class__, dict(m._parameters), dict(m._forward_pre_hooks),
                       dict(m._forward_hooks), {k: m.__dict__[k] for k in self._KEYS
                                                if k in m.__dict__})
                      for m in model.modules()]

    def restore(self) -> None:
        for m, cls, params, pre, post, attrs in self.saved:
            m.__class__ = cls
            m._parameters.clear()
            m._parameters.update(params)
            m._forward_pre_hooks.clear()
            m._forward_pre_hooks.update(pre)
            m._forward_hooks.clear()
            m._forward_hooks.update(post)
            for k in self._KEYS:
                m.__dict__.pop(k, None)
            m.__dict__.update(attrs)


def plan_of(model: nn.Module) -> Plan:
    """The plan a module was parallelized with."""
    p = model.__dict__.get("_tpcompile_plan")
    if p is None:
        raise TPCompileError("this module was not made by tpcompile.auto_parallelize")
    return p


__all__ = ["auto_parallelize", "plan_of", "split_mesh"]
