"""Running the rewritten programs: one program per input structure, like torch.compile's
guards.

Each traced module (the root and every block member) gets a ``forward`` that flattens
its ``(args, kwargs)``, picks the program made for that structure (which optional
arguments are given, the non-tensor arguments, train or eval mode, shapes inside the
ranges the export proved), runs it, writes back buffers the forward mutates, and rebuilds
the original output structure (a ``ModelOutput``, a tuple, a dict). A call that no
program fits is planned on first use: the root traces again (on its meta skeleton) with
the same styles, and the new programs join the old ones.
"""

from __future__ import annotations

import copy
import inspect
import types
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import RuntimeShapeError, UnsupportedError
from ..frontend.blocks import canonical_call, signature_of
from ..frontend.guards import Condition, Guard, broken_condition, shape_mismatch


# how ``Program.fits`` starts its answer for a length sequence parallelism cannot split
# (the root then makes a program without it)
UNSPLITTABLE = "a sequence-parallel length"


@dataclass
class Program:
    forward: Callable
    code: str
    training: bool
    in_spec: pytree.TreeSpec
    constants: dict[int, Any]
    guards: list[Guard]
    ranges: dict[Any, tuple[int, float]]
    n_outputs: int
    out_spec: pytree.TreeSpec
    mutations: list[str]
    positions: list[int]  # flat positions of the tensor inputs the program takes
    out_type: Any = None  # the output's own class, where pytree rebuilds a plain dict
    # sizes of sequence-sharded values (sympy expressions of the export's symbols): each
    # must divide by tp. A call they do not fit runs a program without sequence parallelism.
    divisible: list[Any] = field(default_factory=list)
    tp: int = 1
    sp: bool = True  # made with sequence parallelism (a block runs its parent's variant)
    # what the traced code decided on the sizes beyond their ranges (guards.conditions_of),
    # and the input shapes last found to keep them (a training loop's every call)
    conditions: list[Condition] = field(default_factory=list)
    _kept: tuple | None = field(default=None, repr=False, compare=False)

    def fits(self, training: bool, spec: pytree.TreeSpec, flat: list[Any]) -> str | None:
        """None if this program serves the call, else why not."""
        if training != self.training:
            return f"made for {'train' if self.training else 'eval'} mode"
        if spec != self.in_spec:
            return "made for another input structure"
        for pos, value in self.constants.items():
            if flat[pos] != value:
                return f"made for input {pos} = {value!r}, got {flat[pos]!r}"
        bound: dict[Any, int] = {}
        why = shape_mismatch(self.guards, self.ranges, flat, bound)
        if why is not None:
            return why
        # a program of static sizes is held to each size. Under torch.compile each
        # condition is read as it traces (it becomes one of dynamo's guards); eager, only
        # for shapes other than the last ones found to keep them.
        if self.conditions and bound:
            compiling = torch.compiler.is_compiling()
            shapes = None if compiling else tuple(flat[g.pos].shape for g in self.guards)
            if compiling or shapes != self._kept:
                why = broken_condition(self.conditions, self.guards, flat)
                if why is not None:
                    return why
                if not compiling:
                    self._kept = shapes
        for expr in self.divisible:  # every call of every program: no sympy for the
            if expr.is_Integer:            # usual cases, a constant or one symbol
                size = int(expr)
            elif expr in bound:
                size = bound[expr]
            elif expr.free_symbols <= set(bound):
                size = int(expr.subs(bound))
            else:
                continue
            if size % self.tp:
                return f"{UNSPLITTABLE} is {size}, not divisible by tp = {self.tp}"
        return None


# while a root program runs: whether it was made with sequence parallelism (the last
# entry; a plain list, which torch.compile traces, where a ContextVar breaks the graph)
_VARIANT: list[bool] = []


@dataclass
class Runtime:
    """The programs of one module, and (at the root) how to make another."""

    programs: list[Program] = field(default_factory=list)
    replan: Callable[[nn.Module, tuple, dict], None] | None = None
    name: str = ""
    check: Callable[[list[Any], pytree.TreeSpec, bool], None] | None = None  # rank agreement
    inline: list[tuple[str, nn.Module]] = field(default_factory=list)  # (root) modules its
    #   programs compute inline: hooks on them would never run
    hook_dicts: list[dict] = field(default_factory=list)  # their hook dicts, for one any()
    signature: Any = None  # the module's own forward's, read once (torch.compile traces
    #                        a lookup keyed by a decorated function badly)
    frozen_only: str | None = None  # (root) planned frozen around a Function whose own
    #   backward the program cannot run: why a call that wants gradients is refused
    config_seen: dict[str, Any] = field(default_factory=dict)  # (root) the config values
    #   its traces read (``CONFIG_READ``), as they were when it was planned

    def __deepcopy__(self, memo: dict) -> Runtime:  # field by field (pickling is refused)
        new = Runtime.__new__(Runtime)
        memo[id(self)] = new
        for f in fields(self):
            setattr(new, f.name, copy.deepcopy(getattr(self, f.name), memo))
        return new

    def __copy__(self) -> Runtime:
        new = Runtime.__new__(Runtime)
        new.__dict__.update(self.__dict__)
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise UnsupportedError(
            "a module made by tpcompile.auto_parallelize cannot be pickled whole (torch.save(model)): its forward is a program generated for this "
            "process's mesh. Save the weights instead, torch.save(model.state_dict()) or "
            "tpcompile.checkpoint.save(dir, model, optimizer) (torch.distributed.checkpoint), and "
            "rebuild the module with auto_parallelize before loading them")

    def find(self, training: bool, spec: pytree.TreeSpec, flat: list[Any]) -> tuple[Program | None, str]:
        why = "no program yet"
        variant = _VARIANT[-1] if _VARIANT else None
        for p in self.programs:
            if variant is not None and self.replan is None and p.sp != variant:
                continue  # a block runs the variant (with or without SP) its parent runs
            reason = p.fits(training, spec, flat)
            if reason is None:
                return p, ""
            why = reason
        return None, why


UNPLANNED_UNDER_COMPILE = (
    "tpcompile: no program of this parallel model fits this call, and planning cannot run "
    "inside torch.compile's tracing. Either its programs are specialised to the sizes they "
    "were planned at (plan before compiling with auto_parallelize(..., dynamic=True): one "
    "program for every batch and sequence size; compile=True implies it), or the model's "
    "code decides on its sizes (a branch on batch x length) and this call goes a way no "
    "program was made for, or the call has another input structure: call the model once "
    "eagerly with inputs like these. Without fullgraph=True this is a graph break and the "
    "call is planned eagerly.")


# Config values a transformers forward reads on every call to decide what it computes
# and returns; a trace bakes them in, so set after auto_parallelize they would be ignored.
# The first are read by transformers' wrappers of every model; the others only where the
# model's forward reads them (a sequence classifier's pad token, its loss's problem type).
CONFIG_READ = ("output_attentions", "output_hidden_states", "output_router_logits", "return_dict")
CONFIG_READ_IF_USED = ("pad_token_id", "problem_type")


def config_read(model: nn.Module) -> dict[str, Any]:
    """The values of ``CONFIG_READ`` (and of ``CONFIG_READ_IF_USED`` the model's forward
    reads) in ``model.config``, as they are now."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        source = ""
    # a sequence classifier's loss reads problem_type (in transformers' loss function)
    classifier = "ForSequenceClassification" in type(model).__name__
    keys = [*CONFIG_READ, *(k for k in CONFIG_READ_IF_USED if k in source or classifier)]
    return {k: getattr(config, k) for k in keys if hasattr(config, k)}


def _refuse_config_changes(self: nn.Module, seen: dict[str, Any], given: dict) -> None:
    """Refuse a call after a value in ``seen`` changed in the config, unless the call
    gives it itself (transformers then reads the call's)."""
    config = self.config
    changed = [k for k, v in seen.items() if k not in given and getattr(config, k, v) != v]
    if changed:
        raise UnsupportedError(
            f"{type(self).__name__}'s config changed after auto_parallelize ("
            + ", ".join(f"{k}: {seen[k]!r} -> {getattr(config, k)!r}" for k in changed)
            + "); its programs were traced with the old values and would ignore the new "
            "ones. Set them before auto_parallelize, or pass them to the call where the "
            "forward takes them (output_hidden_states=True, return_dict=False, ...)")


def _dispatch(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    rt: Runtime = self.__dict__["_tpcompile_runtime"]
    if rt.config_seen and not torch.compiler.is_compiling():
        _refuse_config_changes(self, rt.config_seen, kwargs)
    args, kwargs = canonical_call(type(self).forward.__get__(self), args, kwargs, rt.signature)
    flat, spec = pytree.tree_flatten((args, kwargs))
    if rt.hook_dicts and not torch.compiler.is_compiling() and any(rt.hook_dicts):
        _refuse_late_hooks(rt.inline)
    if rt.check is not None:
        rt.check(flat, spec, self.training)
    if rt.frozen_only is not None and torch.is_grad_enabled() and \
            any(p.requires_grad for p in self.parameters()):
        raise UnsupportedError(f"{rt.frozen_only}. It was planned with its parameters frozen; "
                               "call it under torch.no_grad(), or freeze them again")
    prog, why = rt.find(self.training, spec, flat)
    if prog is None:
        if rt.replan is None:
            raise RuntimeShapeError(
                f"{rt.name or type(self).__name__} was called in a way its parent's program "
                f"did not plan for ({why}). Call the model at its root; if you did, the model "
                "changed after auto_parallelize (its parameters' dtype, e.g. .to(torch."
                "bfloat16)): convert it before auto_parallelize, or let FSDP2's "
                "MixedPrecisionPolicy cast (mp_policy=...)")
        if torch.compiler.is_compiling():  # fullgraph=True stops here, with this message
            torch._dynamo.graph_break(msg=UNPLANNED_UNDER_COMPILE)
        _eager(rt.replan)(self, args, kwargs)  # tracing and planning: never compiled
        prog, why = rt.find(self.training, spec, flat)
        if prog is None:
            raise RuntimeShapeError(f"tpcompile made a program for this call but it does not "
                                    f"fit ({why}); please report this")
    root = rt.replan is not None
    if root:
        _VARIANT.append(prog.sp)
    try:
        outs = prog.forward(self, *[flat[i] for i in prog.positions])
    finally:
        if root:
            _VARIANT.pop()
    n = prog.n_outputs
    if prog.mutations:
        with torch.no_grad():
            for fqn, v in zip(prog.mutations, outs[n:]):
                self.get_buffer(fqn).copy_(v)
    out = pytree.tree_unflatten(list(outs[:n]), prog.out_spec)
    cls = prog.out_type
    if cls is not None and type(out) is not cls and isinstance(out, dict) and issubclass(cls, dict):
        out = cls(out)  # an OrderedDict subclass pytree flattened as a dict
    return out


def hook_dicts(m: nn.Module) -> tuple[dict, ...]:
    """The module's own hooks around forward and backward (what a program computing it
    inline would skip)."""
    return (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)


def watch_hooks(rt: Runtime, inline: list[tuple[str, nn.Module]]) -> None:
    """Remember the modules a root's programs compute inline, and their hook dicts (one
    ``any()`` over them per call: about 30 us for 1000 modules)."""
    rt.inline = inline
    rt.hook_dicts = [d for _, m in inline for d in hook_dicts(m)]


def _refuse_late_hooks(inline: list[tuple[str, nn.Module]]) -> None:
    """A hook added after ``auto_parallelize`` to a module the program computes inline
    (a Linear, a norm, an attention module inside a block) would never run: refused."""
    from .checkpointing import is_input_grads_hook
    for name, m in inline:
        if any(is_input_grads_hook(h) for d in hook_dicts(m) for h in d.values()):
            raise UnsupportedError(
                f"transformers' gradient checkpointing was turned on after auto_parallelize "
                f"(its input-grads hook is on {name}); the Trainer does this when "
                "TrainingArguments(gradient_checkpointing=True). Turn it on before "
                "(model.gradient_checkpointing_enable(), then auto_parallelize), or pass "
                "activation_checkpointing='block' to auto_parallelize; and leave the "
                "Trainer's gradient_checkpointing False")
        if any(hook_dicts(m)):
            raise UnsupportedError(
                f"{name} ({type(m).__name__}) has a hook added after auto_parallelize; the "
                "parallel program computes it inline, so the hook would never run. Register "
                "hooks before auto_parallelize (tpcompile then refuses or keeps what it can), "
                "or on a block or the root, which still run their hooks (a block's hooks see "
                "sequence-sharded activations under sequence parallelism)")


def _eager(fn: Callable) -> Callable:
    """``fn`` run outside torch.compile's tracing (a graph break where it is called)."""
    return torch.compiler.disable(fn, recursive=True)


def install(module: nn.Module, program: Program, replan: Callable | None = None,
            name: str = "", check: Callable | None = None) -> None:
    """Make ``module`` run its programs (an instance attribute shadows the class
    ``forward``; parameters are still looked up on the module at every call). ``check``
    (the root only): called with each call's flat inputs before anything runs."""
    rt = module.__dict__.get("_tpcompile_runtime")
    if rt is None:
        rt = Runtime(replan=replan, name=name, check=check,
                     signature=signature_of(type(module).forward.__get__(module)))
        module.__dict__["_tpcompile_runtime"] = rt
        module.forward = types.MethodType(_dispatch, module)  # type: ignore[method-assign]
    rt.programs.append(program)
    module.__dict__.setdefault("_tpcompile_code", program.code)  # the first program
