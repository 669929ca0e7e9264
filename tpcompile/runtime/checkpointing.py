"""Activation checkpointing of the parallel model's blocks.

A checkpointed block keeps only its inputs in forward and runs its program again in
backward (``torch.utils.checkpoint``, non-reentrant), collectives included: the same
trade as torchtitan's per-block checkpointing, fewer saved activations for one more
forward per block. Two things the rewritten program needs on the recompute, which
torch's checkpoint does not know of, go through its ``context_fn``:

* the tp rank's own random stream (``on_rank_rng``, dropout inside sharded regions):
  the recompute draws from the state the block started with, and leaves the live stream
  where the forward left it, so the masks (and gradients) are the ones of the forward;
* which variant (with or without sequence parallelism) the root program ran: a block
  runs its parent's variant, and in backward no root program is running.

torch's checkpoint already replays the global CPU and device random streams.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..errors import TPCompileError
from ..frontend.blocks import is_output_capture_hook
from ..rewrite import collectives as C
from . import program as P

class CheckpointingError(TPCompileError):
    """An ``activation_checkpointing`` setting that names no blocks of the model."""


def checkpoint_count(setting: Any, blocks: int, model_name: str) -> int:
    """How many blocks ``setting`` checkpoints: ``None``, ``False``, ``"none"`` or 0:
    none; ``True`` or ``"block"``: every one; ``k``: the first k (what
    ``Suggestion.checkpoint_blocks`` says). Anything else is refused. (``1 in ("block",
    True)`` is True in Python: the cases are told apart by identity and type.)"""
    if setting is None or setting is False or setting == "none" or \
            type(setting) is int and setting == 0:
        return 0
    if setting is True or setting == "block":
        count = blocks
    elif type(setting) is int and 0 < setting <= blocks:
        count = setting
    else:
        raise CheckpointingError(
            f"activation_checkpointing={setting!r}: use 'none', 'block' (every block) or a "
            f"number of blocks from 1 to {blocks} ({model_name} has {blocks} "
            "blocks: the layers of its ModuleLists)")
    if not blocks:
        raise CheckpointingError(
            f"activation_checkpointing={setting!r}: {model_name} has no blocks (repeated "
            "layers in an nn.ModuleList) to checkpoint; drop the option or checkpoint inside "
            "the model")
    return count


def blocks_to_checkpoint(setting: Any, blocks: list[str], model_name: str) -> list[str]:
    """The blocks (module paths, in model order) that ``setting`` checkpoints."""
    return blocks[:checkpoint_count(setting, len(blocks), model_name)]


def transformers_flagged(model: nn.Module) -> list[str]:
    """The modules transformers' own activation checkpointing is on for
    (``model.gradient_checkpointing_enable()`` or ``activation_checkpointing_enable()``, the
    Trainer's ``gradient_checkpointing=True``): their ``gradient_checkpointing`` flag."""
    return [n for n, m in model.named_modules() if getattr(m, "gradient_checkpointing", None) is True]


def from_transformers(model: nn.Module, flagged: list[str], setting: Any, blocks: list[str]
                      ) -> Any:
    """transformers' checkpointing read as ``activation_checkpointing``. It checkpoints its
    layers' class ``forward``, which the parallel model no longer runs (each block runs its
    program), so the same layers are checkpointed here instead, around their programs
    (their collectives and the tp ranks' random streams replayed); the flags are cleared
    by the caller. Every layer is ``"block"``, the first k are ``k``; others are refused."""
    layers = [n for n in flagged if n in blocks]
    if not layers:
        return setting
    name = type(model).__name__
    if layers != blocks[:len(layers)]:
        raise CheckpointingError(
            f"transformers' gradient checkpointing is on for {len(layers)} of {name}'s "
            f"{len(blocks)} layers ({', '.join(layers[:3])}, ...), not the first ones "
            "(every_n_layers > 1), which tpcompile cannot checkpoint. Call "
            "model.gradient_checkpointing_disable() and pass activation_checkpointing='block' "
            "(every layer) or a number k (the first k) to auto_parallelize")
    ours = "block" if len(layers) == len(blocks) else len(layers)
    if checkpoint_count(setting, len(blocks), name) not in (0, len(layers)):
        raise CheckpointingError(
            f"activation_checkpointing={setting!r} disagrees with transformers' gradient "
            f"checkpointing, on for {len(layers)} of {name}'s {len(blocks)} layers: drop "
            "one (model.gradient_checkpointing_disable(), or the argument)")
    func = getattr(model.get_submodule(layers[0]), "_gradient_checkpointing_func", None)
    if getattr(func, "func", checkpoint) is not checkpoint:  # offload=True wraps it
        raise CheckpointingError(
            "transformers' gradient checkpointing was enabled with offload=True (saved "
            "activations in host memory), which tpcompile's checkpointing does not do. "
            "Enable it without offload, or pass activation_checkpointing='block' instead")
    return ours


def is_input_grads_hook(hook: Any) -> bool:
    """transformers' ``enable_input_require_grads`` hook (registered by its gradient
    checkpointing, and for adapters): it makes the embeddings' output require grad, which
    matters only to a reentrant checkpoint; the parallel model's is non-reentrant."""
    return getattr(hook, "__qualname__", "").endswith(
        "enable_input_require_grads.<locals>.make_inputs_require_grads")


def inert_hook(hook: Any) -> bool:
    """A transformers hook tpcompile takes as it is (see the two above)."""
    return is_input_grads_hook(hook) or is_output_capture_hook(hook)


def top_blocks(model: nn.Module, members: list[str]) -> list[str]:
    """The members inside no other member (a decoder layer, not the experts inside it),
    in the model's module order."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    outer = [m for m in members if m and not any(
        o and o != m and m.startswith(o + ".") for o in members)]
    return sorted(set(outer), key=order.__getitem__)


def _program_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` of one checkpointed call: the forward remembers the tp ranks'
    random streams and the running variant; the recompute runs from them."""
    streams: dict = {}
    variant: list[bool] = []

    @contextlib.contextmanager
    def forward() -> Iterator[None]:
        streams.update(C._RANK_RNG)
        variant.extend(P._VARIANT[-1:])
        yield

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        live = dict(C._RANK_RNG)
        C._RANK_RNG.clear()
        C._RANK_RNG.update(streams)
        P._VARIANT.extend(variant)
        try:
            yield
        finally:
            del P._VARIANT[len(P._VARIANT) - len(variant):]
            C._RANK_RNG.clear()
            C._RANK_RNG.update(live)

    return forward(), recompute()


def checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` run under non-reentrant activation checkpointing while autograd
    records (in ``no_grad`` and inference there is nothing to save, so it runs as is)."""
    import torch

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=_program_contexts, **kwargs)

    run.__wrapped__ = forward  # type: ignore[attr-defined]
    run._tpcompile_checkpointed = True  # type: ignore[attr-defined]
    return run


def apply_checkpointing(model: nn.Module, paths: list[str]) -> None:
    """Wrap each block's (already installed, possibly compiled) ``forward``."""
    for path in paths:
        module = model.get_submodule(path)
        module.forward = checkpointed(module.__dict__["forward"])  # type: ignore[method-assign]
